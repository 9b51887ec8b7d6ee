"""An edge's health as its heartbeat row carries it: what /readyz and /metrics say, in one row."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime

from .. import __version__
from ..admin.state_metrics import readiness, sample_values, worker_families
from ..config.settings import Config
from ..registry.store import Registry
from ..violations.store import ViolationStore


async def edge_health(config: Config, registry: Registry, store: ViolationStore) -> dict:
    """The heartbeat's columns (fleet.edges), read now from the workers' metrics, the registry and
    the violation log's shipping state."""
    families = worker_families()
    sync = await registry.sync_status()
    checks = readiness(config, families, sync)
    state = await registry.state()
    shipping = await store.shipping_state()
    decisions = sample_values(families, "icpgate_decisions_total")
    oldest = shipping["oldest_unshipped"]
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
        "workers": config.gate.workers,
        "workers_ready": len(sample_values(families, "icpgate_index_serial")),
        "open_connections": int(sum(value for _, value in sample_values(families, "icpgate_active_connections"))),
        "decisions": int(sum(value for _, value in decisions)),
        "blocks": int(sum(value for labels, value in decisions if labels.get("action") == "block")),
        "backlog": shipping["backlog"],
        "oldest_unshipped_age": None if oldest is None else max(0.0, time.time() - oldest),
        "dropped": shipping["dropped"],
    }


def _digest(config: Config) -> str:
    """The config file's SHA-256: two edges meant to be alike show the same digest."""
    try:
        return hashlib.sha256(config.source.read_bytes()).hexdigest()
    except OSError:
        return ""


def utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
