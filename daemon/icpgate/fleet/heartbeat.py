"""An edge's health as its heartbeat row carries it: what /readyz and /metrics say, in one row."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime

from .. import __version__
from ..admin.state_metrics import readiness, sample_values, worker_families
from ..config.settings import Config
from ..config.tomlschema import ConfigError
from ..inline.bypass import BypassSets, NftError, ranges_of
from ..registry.store import Registry
from ..violations.store import ViolationStore


class BypassProbe:
    """The bypass state, asked of nft (a subprocess) at most every `interval` seconds."""

    def __init__(self, config: Config, interval: float = 30.0) -> None:
        self.config = config
        self.interval = interval
        self._state = "unknown"
        self._next = 0.0

    async def state(self) -> str:
        if time.monotonic() >= self._next:
            self._state = await asyncio.to_thread(bypass_state, self.config)
            self._next = time.monotonic() + self.interval
        return self._state


async def edge_health(config: Config, registry: Registry, store: ViolationStore,
                      bypass: BypassProbe | None = None) -> dict:  # fmt: skip
    """The heartbeat's columns (fleet.edges), read now from the workers' metrics, the registry and
    the violation log's shipping state."""
    families = worker_families()
    sync = await registry.sync_status()
    checks = readiness(config, families, sync)
    state = await registry.state()
    shipping = await store.shipping_state()
    decisions = sample_values(families, "icpgate_decisions_total")
    oldest = shipping["oldest_unshipped"]
    publisher = sync.get("publisher_serial")
    behind = None if publisher is None else publisher - state.serial
    return {
        "version": __version__,
        "config_digest": _digest(config),
        "mode": checks["enforcement"]["mode"],
        "mode_rule": checks["enforcement"]["rule"],
        "registry_serial": state.serial,
        "registry_checksum": state.checksum,
        "registry_filings": state.filings,
        "feed_state": checks["feed"]["state"],
        "feed_age": checks["feed"]["age"],
        "publisher_serial": publisher,
        "publisher_checksum": sync.get("publisher_checksum"),
        "feed_serials_behind": behind,
        "feed_seconds_behind": None if behind is None else _seconds_behind(behind, sync),
        "bypass": await (bypass or BypassProbe(config)).state(),
        "workers": config.gate.workers,
        "workers_ready": len(sample_values(families, "icpgate_index_serial")),
        "open_connections": int(sum(value for _, value in sample_values(families, "icpgate_active_connections"))),
        "decisions": int(sum(value for _, value in decisions)),
        "blocks": int(sum(value for labels, value in decisions if labels.get("action") == "block")),
        "backlog": shipping["backlog"],
        "oldest_unshipped_age": None if oldest is None else max(0.0, time.time() - oldest),
        "dropped": shipping["dropped"],
    }


def _seconds_behind(behind: int, sync: dict) -> float:
    """0 at the publisher's serial; else since the feed client was last there (the last success
    when it never was)."""
    if behind <= 0:
        return 0.0
    since = sync.get("in_step_at") or sync.get("last_success")
    return max(0.0, time.time() - datetime.fromisoformat(since).timestamp()) if since else 0.0


def bypass_state(config: Config) -> str:
    """Inline mode's failure bypass for the hosted ranges (inline/bypass.py): on, off or partial;
    unknown where nft cannot tell (not installed, no inline ruleset, no CAP_NET_ADMIN)."""
    try:
        return BypassSets().status(ranges_of(config)[0]).state
    except (NftError, ConfigError, OSError):
        return "unknown"


def _digest(config: Config) -> str:
    """The config file's SHA-256: two edges meant to be alike show the same digest."""
    try:
        return hashlib.sha256(config.source.read_bytes()).hexdigest()
    except OSError:
        return ""


def utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
