"""How fresh the registry is, and what that means for enforcement (docs/feed-protocol.md).

Pure functions of the feed config and the time of the last successful sync, shared by the
workers (which relax blocks when the feed is past `max_staleness` in `monitor` or `open` mode),
`icpgate feed status` and the admin side.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..config.settings import FeedConfig


@dataclass(frozen=True, slots=True)
class Freshness:
    state: str  # "local" (no feed configured), "fresh", "stale" (past stale_after), "expired" (past max_staleness)
    age: float | None  # seconds since the last successful sync; None before the first
    enforcement: str  # "enforce", "monitor" or "open": what the gate does now


def freshness(feed: FeedConfig, last_success: str | None, now: datetime) -> Freshness:
    if not feed.urls:
        return Freshness("local", None, "enforce")
    age = (now - datetime.fromisoformat(last_success)).total_seconds() if last_success else None
    if age is not None and age <= feed.stale_after:
        return Freshness("fresh", age, "enforce")
    if age is not None and age <= feed.max_staleness:
        return Freshness("stale", age, "enforce")
    return Freshness("expired", age, feed.stale_mode)
