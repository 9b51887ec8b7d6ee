"""The classes of an inspected name and the state of a filing (docs/inspection.md). Pure functions."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence

from .resolve import Lookup

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HOSTED = "hosted"  # resolves into our hosted ranges
INDIRECT = "indirect"  # behind a CDN we know of, or relayed here by the gate recently: not hollow
ELSEWHERE = "elsewhere"  # resolves, only outside our ranges, with no such sign
UNRESOLVED = "unresolved"  # NXDOMAIN, or no address: no site
ERROR = "error"  # the lookup failed, retries included: nothing can be concluded
# Best first: a filing domain counts as the best of its names (the domain and its `www.`), and an
# error outranks a hollow answer, since the failed lookup might have been the hosted one.
CLASSES = (HOSTED, INDIRECT, ERROR, ELSEWHERE, UNRESOLVED)
LIVE = frozenset({HOSTED, INDIRECT})

# Filing states, from the classes of its domains and their history.
STATE_LIVE = "live"  # a domain is hosted or indirect now
STATE_GRACE = "grace"  # none is, but one was (or the filing was first inspected) within the grace period
STATE_UNKNOWN = "unknown"  # none is, past the grace period, and a lookup failed: inspect again
STATE_HOLLOW = "hollow"  # none is, past the grace period: review for 取消接入
STATES = (STATE_LIVE, STATE_GRACE, STATE_UNKNOWN, STATE_HOLLOW)


def classify(lookup: Lookup, ranges: Sequence[Network], cdn_suffixes: Collection[str],
             relayed_here: bool) -> tuple[str, str]:  # fmt: skip
    """(class, why) of one name. `relayed_here`: the gate relayed filed traffic for it on our addresses lately."""
    addresses = [ipaddress.ip_address(text) for text in lookup.addresses]
    inside = [str(address) for address in addresses if any(address in network for network in ranges)]
    if inside:
        return HOSTED, "resolves to %s" % ", ".join(inside)
    if lookup.error:
        return ERROR, lookup.error
    cdn = next((name for name in lookup.chain if _under(name, cdn_suffixes)), None)
    if addresses and cdn:
        return INDIRECT, "CNAME into %s (inspect.cdn_suffixes)" % cdn
    if addresses and relayed_here:
        return INDIRECT, "resolves to %s; the gate relayed it on our addresses lately" % ", ".join(lookup.addresses)
    if addresses:
        return ELSEWHERE, "resolves to %s only" % ", ".join(lookup.addresses)
    return UNRESOLVED, "NXDOMAIN" if lookup.nxdomain else "no A or AAAA record"


def best(results: Sequence[tuple[str, str, str]]) -> tuple[str, str]:
    """(class, why) of a filing domain from its names' (name, class, why): the best class wins."""
    name, klass, why = min(results, key=lambda result: CLASSES.index(result[1]))
    return klass, "%s: %s" % (name, why)


def _under(name: str, suffixes: Collection[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def filing_state(live_now: bool, error_now: bool, since: float, now: float, grace: float) -> str:
    """`since`: the last time a domain of the filing was live, else when it was first inspected."""
    if live_now:
        return STATE_LIVE
    if now - since < grace:
        return STATE_GRACE
    return STATE_UNKNOWN if error_now else STATE_HOLLOW
