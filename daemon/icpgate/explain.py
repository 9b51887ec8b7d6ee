"""Explain one decision: the same `Policy.decide` the gate runs, plus the facts behind it."""

from __future__ import annotations

from typing import Any

from .config import Config
from .hostname import HostKind, normalize_host, parent_names
from .policy import Policy, Verdict
from .policy_pack import LoadedPack
from .registry import Registry, open_registry
from .suffixes import registrable_domain


async def explain(
    config: Config, pack: LoadedPack, host: str, ip: str | None, port: int | None, proto: str, path: str | None
) -> dict[str, Any]:
    """Decide with an index of just the filings that could match `host`, and describe the result."""
    async with open_registry(config.registry_path, create=False) as registry:
        return await explain_with(registry, config, pack, host, ip, port, proto, path)


async def explain_with(registry: Registry, config: Config, pack: LoadedPack, host: str, ip: str | None,
                       port: int | None, proto: str, path: str | None) -> dict[str, Any]:  # fmt: skip
    """`explain` on an open registry (the admin API keeps one)."""
    normalized = normalize_host(host)
    candidates = list(parent_names(normalized.value)) if normalized.kind is HostKind.NAME else []
    policy = Policy(pack.policy, config.provider.id, await registry.index_for(candidates))
    verdict = policy.decide(host, ip, port, proto, path)
    filing = await _full_filing(registry, verdict)
    return {
        "host": host,
        "normalized": normalized.value or None,
        "host_kind": normalized.kind.value,
        "registrable_domain": registrable_domain(normalized.value) if normalized.kind is HostKind.NAME else None,
        "destination": {"ip": ip, "port": port, "proto": proto},
        "matched": verdict.matched,
        "action": verdict.action.value,
        "reason": verdict.reason.value,
        "rule": verdict.rule,
        "detail": verdict.detail or None,
        "filing": filing,
        "provider": config.provider.id,
        "policy_pack": pack.policy.name,
    }


async def _full_filing(registry: Registry, verdict: Verdict) -> dict[str, Any] | None:
    if verdict.filing is None:
        return None
    filing = await registry.get_filing(verdict.filing.licence)
    return filing.to_json() if filing else None


def render_explanation(facts: dict[str, Any]) -> str:
    """The human form of `explain`'s result, one fact a line."""
    lines = [("host", facts["host"])]
    if facts["host_kind"] == "invalid":
        lines.append(("normalized", "(invalid: %s)" % facts["detail"]))
    else:
        lines.append(("normalized", "%s (%s)" % (facts["normalized"], facts["host_kind"])))
    if facts["registrable_domain"]:
        lines.append(("registrable", facts["registrable_domain"]))
    destination = facts["destination"]
    if destination["ip"] or destination["port"]:
        lines.append(
            (
                "destination",
                "%s port %s (%s)" % (destination["ip"] or "-", destination["port"] or "-", destination["proto"]),
            )
        )
    if facts["matched"]:
        relation = "the name itself" if facts["matched"] == facts["normalized"] else "parent of " + facts["normalized"]
        lines.append(("matched", "%s (%s)" % (facts["matched"], relation)))
    filing = facts["filing"]
    if filing:
        lines += [
            ("filing", filing["licence"]),
            ("  subject", "%s %s (%s)" % (filing["subject_licence"], filing["subject_name"], filing["subject_type"])),
            ("  site", filing["site_name"]),
            ("  status", filing["status"] + (", limit_access" if filing["limit_access"] else "")),
            ("  domains", " ".join(filing["domains"])),
            ("  updated", filing["updated_at"]),
        ]
        for access in filing["access"] or [{"provider": "(none)", "status": "", "ips": []}]:
            ours = "  ← ours" if access["provider"] == facts["provider"] else ""
            lines.append(
                (
                    "  access",
                    ("%s %s %s" % (access["provider"], access["status"], " ".join(access["ips"]))).rstrip() + ours,
                )
            )
    elif facts["host_kind"] == "name":
        lines.append(("filing", "none for %s or any parent" % facts["normalized"]))
    lines.append(("rule", "%s (pack %s, provider %s)" % (facts["rule"], facts["policy_pack"], facts["provider"])))
    lines.append(("verdict", "%s (%s)" % (facts["action"].upper(), facts["reason"])))
    width = max(len(label) for label, _ in lines)
    return "\n".join("%s  %s" % (label.ljust(width), value) for label, value in lines)
