"""The approved-filings feed: the protocol, the client that keeps a registry in sync, the publisher.

Control plane. May import policy, registry, config and the leaves. The gate's hot path never
imports this package: workers follow the registry's serial instead.
"""
