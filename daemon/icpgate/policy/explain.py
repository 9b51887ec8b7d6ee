"""Explain one decision: the same `Policy.decide` and `Policy.applied` the gate runs, plus the facts behind it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..config.settings import Config
from ..names.hostname import HostKind, normalize_host, parent_names
from ..names.suffixes import registrable_domain
from ..registry.store import Registry, open_registry
from .decide import Action, Policy, Verdict
from .freshness import freshness
from .pack import LoadedPack


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
    policy = Policy(pack.policy, config.provider.id, await registry.index_for(candidates), config.gate.enforcement)
    verdict = policy.decide(host, ip, port, proto, path)
    stale = freshness(config.feed, (await registry.sync_status()).get("last_success"), datetime.now(UTC)).enforcement
    mode, mode_rule = policy.mode_for(ip, stale)
    applied = policy.applied(verdict, ip, stale)
    filing = await _full_filing(registry, verdict)
    return {
        "host": host,
        "normalized": normalized.value or None,
        "host_kind": normalized.kind.value,
        "registrable_domain": registrable_domain(normalized.value) if normalized.kind is HostKind.NAME else None,
        "destination": {"ip": ip, "port": port, "proto": proto},
        "matched": verdict.matched,
        "action": applied.action.value,  # what the gate does
        "policy_action": verdict.action.value,  # what the policy decided, before the mode
        "mode": mode.value,  # in force for this destination: enforce, monitor or open
        "mode_rule": mode_rule or None,  # the key that set it
        "passed": applied.passed,  # a block the mode lets through
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
    if facts["mode"] != "enforce":
        lines.append(("mode", "%s (%s)" % (facts["mode"], facts["mode_rule"])))
    lines.append(("verdict", _verdict_text(facts)))
    width = max(len(label) for label, _ in lines)
    return "\n".join("%s  %s" % (label.ljust(width), value) for label, value in lines)


def _verdict_text(facts: dict[str, Any]) -> str:
    """`BLOCK (unfiled)`; in monitor or open mode, what the policy decided and what the gate does."""
    if facts["passed"]:
        return "would BLOCK (%s) — %s mode: passed" % (facts["reason"], facts["mode"])
    text = "%s (%s)" % (facts["action"].upper(), facts["reason"])
    if facts["mode"] != "enforce" and facts["action"] == Action.BLOCK:
        return text + " — refused in %s mode too" % facts["mode"]
    return text
