"""The admin API (aiohttp): metrics, health, decisions, violations, filings, feed, status page."""
