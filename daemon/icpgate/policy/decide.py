"""The decision: may this host be served on this destination? One pure, synchronous function.

`Policy.decide` answers the gate, `icpgate check` and the admin API alike, so an explanation is
always the real decision. It reads the index reference once, so an index swapped in the middle
of a decision cannot mix two registries. `Policy.applied` then says what the gate does with a
block in the mode in force (monitor mode, a pilot range, a stale feed), again for all three alike.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import NamedTuple

from ..names.hostname import HostKind, normalize_host, parent_names
from ..registry.filings import AccessStatus, FilingStatus
from ..registry.index import FilingIndex, IndexedAccess, IndexedFiling, IPNetwork

ACME_PREFIX = "/.well-known/acme-challenge/"


class Action(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"


class Reason(StrEnum):
    """The closed set of reason codes (docs/statuses.md), shared by pages, JSON, metrics, logs and the CLI."""

    FILED = "filed"
    ACCESS_PENDING = "access_pending"
    UNFILED = "unfiled"
    PENDING = "pending"
    FILED_ELSEWHERE = "filed_elsewhere"
    ACCESS_CANCELLED = "access_cancelled"
    DEREGISTERED = "deregistered"
    LIMITED = "limited"
    NOT_ENFORCED = "not_enforced"
    EXEMPT = "exempt"
    IP_LITERAL = "ip_literal"
    NO_HOST = "no_host"
    INVALID = "invalid"


# Reasons that say something about the site's filing; the ACME exception may lift these.
FILING_REASONS = frozenset({
    Reason.UNFILED, Reason.PENDING, Reason.FILED_ELSEWHERE, Reason.ACCESS_CANCELLED,
    Reason.DEREGISTERED, Reason.LIMITED,
})  # fmt: skip


class Mode(StrEnum):
    """What the gate does with the policy's blocks (docs/policy.md, "Monitor mode and pilots")."""

    ENFORCE = "enforce"  # blocks are blocks
    MONITOR = "monitor"  # a deliberate watch: gate.enforcement, enforce.monitor_ranges, or feed.stale_mode
    OPEN = "open"  # the feed expired and feed.stale_mode gives up enforcing what rests on filing data


# What monitor mode (gate.enforcement, enforce.monitor_ranges) lets through: every block the policy
# makes about a host. Never `invalid`: traffic the gate cannot parse it cannot follow either, and a
# backend may read it otherwise (a parser differential); nor the gate's own protocol refusals.
MONITOR_REASONS = FILING_REASONS | {Reason.NO_HOST, Reason.IP_LITERAL}
# What an expired feed's stale_mode lets through: only the blocks that rest on registry data.
STALE_REASONS = FILING_REASONS


class Verdict(NamedTuple):
    action: Action  # what the gate does: a block let through by a mode is ALLOW here, see `mode`
    reason: Reason
    rule: str  # the pack key or registry fact that decided, e.g. `rules.ip_literal`, `filing.status`
    host: str  # the normalised host, or the raw text when it is invalid
    matched: str | None = None  # the filed domain (the name or a parent) that matched
    filing: IndexedFiling | None = None
    detail: str = ""  # why a host is invalid
    # ENFORCE: `action` is the policy's. MONITOR or OPEN: the policy blocked and this mode let it through.
    mode: Mode = Mode.ENFORCE

    @property
    def passed(self) -> bool:
        """A block the mode in force let through: counted, logged and recorded as a violation."""
        return self.mode is not Mode.ENFORCE


@dataclass(frozen=True, slots=True)
class PolicyPack:
    """A loaded policy pack (see policies/default.toml for what each key means)."""

    name: str
    enforce_ranges: tuple[IPNetwork, ...] | None  # None: every destination
    enforce_ports: frozenset[int] | None  # None: every port
    exempt_ranges: tuple[IPNetwork, ...]
    exempt_domains: frozenset[str]
    access_pending: Action
    ip_literal: Action
    no_host: Action
    acme_http01: bool
    require_access_ip: bool
    h2c: Action  # `Upgrade: h2c` (prior-knowledge h2c is always refused: there is no Host to check)
    connect: Action  # CONNECT requests (their authority is checked like a Host when allowed)
    monitor_ranges: tuple[IPNetwork, ...] = ()  # a pilot: decided and recorded as enforced, nothing blocked
    quic_unknown_version: Action = Action.BLOCK  # a QUIC Initial of a version the gate cannot decrypt


@lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Destination address; IPv4-mapped IPv6 (dual-stack sockets) counts as the IPv4 address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _in_any(address, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in networks)


_ACCESS_RANK = {AccessStatus.ACTIVE: 3, AccessStatus.FIRST_REVIEW: 2, AccessStatus.CANCELLED: 1}


def daemon_mode(enforcement: str, stale: str) -> tuple[Mode, str]:
    """The mode of the whole daemon and the key that set it ('' when enforcing): `gate.enforcement`
    = "monitor" wins, else the feed's mode now (policy/freshness.py: "enforce", or the expired feed's
    stale_mode). Pilot ranges are per destination: `Policy.mode_for`."""
    if enforcement == Mode.MONITOR:
        return Mode.MONITOR, "gate.enforcement"
    if stale != Mode.ENFORCE:
        return Mode(stale), "feed.stale_mode"
    return Mode.ENFORCE, ""


class Policy:
    """A policy pack bound to our provider id, the daemon's `gate.enforcement` and the current index
    (swapped by assignment)."""

    def __init__(self, pack: PolicyPack, provider_id: str, index: FilingIndex, enforcement: str = "enforce") -> None:
        self.pack = pack
        self.provider_id = provider_id
        self.index = index
        self.enforcement = enforcement  # gate.enforcement: "enforce" or "monitor"
        # The default pack enforces every destination: skip the destination check entirely.
        self._every_destination = pack.enforce_ranges is None and pack.enforce_ports is None and not pack.exempt_ranges
        # Whether any block could be let through by monitor mode: the gate's block path asks this first.
        self.monitors = enforcement == Mode.MONITOR or bool(pack.monitor_ranges)

    def decide(
        self, host: str | None, dst_ip: str | None, dst_port: int | None, proto: str, path: str | None = None
    ) -> Verdict:
        """Decide for one connection or request. `path` is the HTTP request target, for ACME."""
        verdict = self._decide(host, dst_ip, dst_port)
        if (
            verdict.action is Action.BLOCK
            and self.pack.acme_http01
            and proto == "http"
            and path is not None
            and path.startswith(ACME_PREFIX)
            and verdict.reason in FILING_REASONS
        ):
            return verdict._replace(action=Action.ALLOW, reason=Reason.EXEMPT, rule="rules.acme_http01")
        return verdict

    def mode_for(self, dst_ip: str | None, stale: str = "enforce") -> tuple[Mode, str]:
        """The mode in force for a destination and the key that set it ('' when enforcing).

        Monitor (gate.enforcement, then enforce.monitor_ranges) comes before the feed's mode: it is
        the operator's choice and lets through everything a stale mode would. An unparsable
        destination is in no pilot range (fail closed)."""
        if self.enforcement == Mode.MONITOR:
            return Mode.MONITOR, "gate.enforcement"
        if self.pack.monitor_ranges and dst_ip is not None:
            address = _address(dst_ip)
            if address is not None and _in_any(address, self.pack.monitor_ranges):
                return Mode.MONITOR, "enforce.monitor_ranges"
        return daemon_mode(Mode.ENFORCE, stale)

    def applied(self, verdict: Verdict, dst_ip: str | None, stale: str = "enforce") -> Verdict:
        """What the gate does with `verdict` on this destination: a block that the mode in force
        lets through comes back allowed, with its reason and rule kept and the mode set.

        `stale` is the feed's mode now ("enforce" while it is fresh). Monitor lets through
        MONITOR_REASONS, a stale feed's mode STALE_REASONS; `invalid` is refused in every mode."""
        if verdict.action is not Action.BLOCK or verdict.reason is Reason.INVALID:
            return verdict
        mode, key = self.mode_for(dst_ip, stale)
        if mode is Mode.ENFORCE:
            return verdict
        if verdict.reason in (STALE_REASONS if key == "feed.stale_mode" else MONITOR_REASONS):
            return verdict._replace(action=Action.ALLOW, mode=mode)
        return verdict

    def _decide(self, host: str | None, dst_ip: str | None, dst_port: int | None) -> Verdict:
        pack = self.pack
        index = self.index
        if not self._every_destination:
            not_enforced = self._destination_rule(dst_ip, dst_port)
            if not_enforced:
                return Verdict(Action.ALLOW, Reason.NOT_ENFORCED, not_enforced, host or "")
        if not host:
            return Verdict(pack.no_host, Reason.NO_HOST, "rules.no_host", "")
        normalized = normalize_host(host)
        if normalized.kind is HostKind.INVALID:
            return Verdict(Action.BLOCK, Reason.INVALID, "host.invalid", host, detail=normalized.error)
        name = normalized.value
        if normalized.kind is not HostKind.NAME:
            return Verdict(pack.ip_literal, Reason.IP_LITERAL, "rules.ip_literal", name)
        if pack.exempt_domains:
            exempt = _first_parent_in(name, pack.exempt_domains)
            if exempt:
                return Verdict(Action.ALLOW, Reason.EXEMPT, "enforce.exempt_domains", name, exempt)
        match = index.lookup(name)
        if match is None:
            return Verdict(Action.BLOCK, Reason.UNFILED, "registry.no_filing", name)
        return self._filing_verdict(name, match.domain, match.filing, dst_ip)

    def _destination_rule(self, dst_ip: str | None, dst_port: int | None) -> str:
        """The rule that puts this destination outside enforcement, or ''."""
        pack = self.pack
        if pack.enforce_ports is not None and dst_port is not None and dst_port not in pack.enforce_ports:
            return "enforce.ports"
        if dst_ip is None or (pack.enforce_ranges is None and not pack.exempt_ranges):
            return ""
        address = _address(dst_ip)
        if address is None:
            return ""  # an unparsable destination is enforced: fail closed
        if pack.enforce_ranges is not None and not _in_any(address, pack.enforce_ranges):
            return "enforce.ranges"
        if _in_any(address, pack.exempt_ranges):
            return "enforce.exempt_ranges"
        return ""

    def _filing_verdict(self, name: str, matched: str, filing: IndexedFiling, dst_ip: str | None) -> Verdict:
        if filing.status is FilingStatus.DEREGISTERED:
            reason, rule = Reason.DEREGISTERED, "filing.status"
        elif filing.status is FilingStatus.PENDING:
            reason, rule = Reason.PENDING, "filing.status"
        elif filing.limit_access:
            reason, rule = Reason.LIMITED, "filing.limit_access"
        else:
            access = self._our_access(filing.access, dst_ip)
            if access is None:
                reason = Reason.FILED_ELSEWHERE
                rule = "rules.require_access_ip" if self._ours_elsewhere(filing.access) else "access.none_here"
            elif access.status is AccessStatus.ACTIVE:
                return Verdict(Action.ALLOW, Reason.FILED, "access.status", name, matched, filing)
            elif access.status is AccessStatus.FIRST_REVIEW:
                return Verdict(
                    self.pack.access_pending, Reason.ACCESS_PENDING, "rules.access_pending", name, matched, filing
                )
            else:
                reason, rule = Reason.ACCESS_CANCELLED, "access.status"
        return Verdict(Action.BLOCK, reason, rule, name, matched, filing)

    def _our_access(self, records: tuple[IndexedAccess, ...], dst_ip: str | None) -> IndexedAccess | None:
        """Our provider's most advanced access record that applies to this destination."""
        best = None
        provider_id = self.provider_id
        for record in records:
            if record.provider != provider_id or not self._covers_destination(record, dst_ip):
                continue
            if best is None or _ACCESS_RANK[record.status] > _ACCESS_RANK[best.status]:
                best = record
        return best

    def _covers_destination(self, record: IndexedAccess, dst_ip: str | None) -> bool:
        if not self.pack.require_access_ip or not record.networks or dst_ip is None:
            return True
        address = _address(dst_ip)
        return address is not None and _in_any(address, record.networks)

    def _ours_elsewhere(self, records: tuple[IndexedAccess, ...]) -> bool:
        """True when we hold an access record, only for other IPs (the `require_access_ip` switch)."""
        return self.pack.require_access_ip and any(r.provider == self.provider_id for r in records)


def _first_parent_in(name: str, domains: frozenset[str]) -> str | None:
    return next((parent for parent in parent_names(name) if parent in domains), None)
