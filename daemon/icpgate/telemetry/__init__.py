"""Metrics and logs: what the gate reports about itself (Prometheus registries, multiprocess files,
latency buckets, process names, log formats). A leaf: imports only the package's version.
"""
