"""The registry's decision now for each violation record, so that a site approved since it was
blocked shows as allowed in the table, the status page and the ISMS report, not as unfiled."""

from __future__ import annotations

from typing import Any

from ..config.settings import Config
from ..names.hostname import parent_names
from ..policy.decide import Policy
from ..policy.pack import load_pack
from ..registry.store import Registry, open_registry

# As the ISMS report and the status page say it.
STATE_ZH = {"block": "已阻断", "allow": "已备案放行"}


async def annotate(registry: Registry, config: Config, records: list[dict[str, Any]]) -> None:
    """Set `current` = {"action", "reason"} on each record with a host; None for junk and overflow."""
    pack = load_pack(config.policy_pack)
    names = sorted({name for record in records if record["domain"] for name in parent_names(record["host"])})
    policy = Policy(pack.policy, config.provider.id, await registry.index_for(names))
    for record in records:
        if not record["domain"]:
            record["current"] = None
            continue
        verdict = policy.decide(record["host"], record["ip"], record["port"], record["proto"])
        record["current"] = {"action": verdict.action.value, "reason": verdict.reason.value}


async def annotate_from_file(config: Config, records: list[dict[str, Any]]) -> None:
    """For the CLI: from the registry file when there is one; without it nothing is known (None)."""
    if not config.registry_path.is_file():
        for record in records:
            record["current"] = None
        return
    async with open_registry(config.registry_path, create=False) as registry:
        await annotate(registry, config, records)


def current_zh(record: dict[str, Any]) -> str:
    current = record.get("current")
    return "%s（%s）" % (STATE_ZH[current["action"]], current["reason"]) if current else "-"


def current_en(record: dict[str, Any]) -> str:
    current = record.get("current")
    return "%s (%s)" % ("blocked" if current["action"] == "block" else "allowed", current["reason"]) if current else "-"
