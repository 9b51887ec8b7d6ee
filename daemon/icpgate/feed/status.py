"""The feed's state as data: what `icpgate feed status --json` prints and the admin API's /api/v1/feed serves."""

from __future__ import annotations

from datetime import UTC, datetime

from ..config.settings import Config
from ..policy.freshness import freshness
from ..registry.store import Registry
from .client import Outcome


async def feed_status(config: Config, registry: Registry) -> dict:
    """What `feed status --json` and the admin API's /api/v1/feed show."""
    state = await registry.state()
    sync = await registry.sync_status()
    fresh = freshness(config.feed, sync.get("last_success"), datetime.now(UTC))
    return {
        "registry": str(config.registry_path), "serial": state.serial, "floor": state.floor,
        "checksum": state.checksum, "filings": state.filings, "changed_at": state.changed_at,
        "freshness": {"state": fresh.state, "age": fresh.age, "enforcement": fresh.enforcement},
        "signatures": {"required": bool(config.feed.public_keys), "keys": len(config.feed.public_keys),
                       "allow_unsigned": config.feed.allow_unsigned},
        "sync": sync,
    }  # fmt: skip


def outcome_json(outcome: Outcome) -> dict:
    report = outcome.report
    data = {"result": outcome.result.value, "message": outcome.message, "source": outcome.source,
            "serial": outcome.serial, "target": outcome.target, "checksum_mismatch": outcome.checksum_mismatch,
            "failures": outcome.failures}  # fmt: skip
    if report:
        data["changes"] = {"added": report.inserted, "changed": report.updated, "removed": report.removed,
                           "unchanged": report.unchanged, "listed": report.listed}  # fmt: skip
        data["errors"] = [{"line": e.line, "field": e.field, "message": e.message} for e in report.errors]
    return data
