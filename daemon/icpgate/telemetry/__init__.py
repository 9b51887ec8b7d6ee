"""Metrics and logs: what the gate reports about itself."""
