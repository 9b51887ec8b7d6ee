"""The admin API (aiohttp): metrics, health, decisions, violations, filings, feed, status page.

Control plane, in the service process. May import feed, reports, gate-free parts below; never
imported by the gate, the policy or the registry.
"""
