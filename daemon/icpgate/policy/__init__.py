"""The decision: `Policy.decide` over the index and the policy pack, the packs themselves, feed
freshness (stale modes) and the explanation of a decision.

Pure and synchronous on the hot path. May import registry, config and names; never the gate or
anything above it.
"""
