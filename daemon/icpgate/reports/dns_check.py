"""DNS confirmation: does a violating host resolve into our ranges (a real site hosted here), or
elsewhere (a spoofed Host, a scanner, a stranger's domain pointed at one of our addresses)?

Each new violating host is resolved once for A and AAAA (CNAME chains followed) through the
configured resolvers, at most `dns.rate` queries a second, and the answer cached for its TTL
within [min_ttl, max_ttl]. Every record of the host is then marked `confirmed` (an address is in
our hosted ranges, or is the address the host was seen on), `not_hosted`, or `error` (NXDOMAIN,
SERVFAIL, REFUSED, timeout), with the addresses and the time of the check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from ..config.settings import DnsConfig
from ..telemetry.metrics import DNS_CHECKS
from ..violations.store import ViolationStore

log = logging.getLogger("icpgate.dns")
BATCH = 50
IDLE = 1.0  # seconds between looks at the log when nothing waits for a check
CACHE_LIMIT = 50_000
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Lookup:
    addresses: tuple[str, ...]
    error: str  # "" when the name resolved (even to nothing); else NXDOMAIN, SERVFAIL, timeout...
    chain: tuple[str, ...]  # the CNAMEs followed, in order
    expires: float  # monotonic


def classify(lookup: Lookup, seen_on: str, ranges: Sequence[Network]) -> str:
    if lookup.error and not lookup.addresses:
        return "error"
    for text in lookup.addresses:
        address = ipaddress.ip_address(text)
        if text == seen_on or any(address in network for network in ranges):
            return "confirmed"
    return "not_hosted"


def describe(lookup: Lookup) -> str:
    parts = []
    if lookup.chain:
        parts.append("via CNAME " + " -> ".join(lookup.chain))
    if lookup.error:
        parts.append(lookup.error)
    elif not lookup.addresses:
        parts.append("no A or AAAA records")
    return "; ".join(parts)


class RateLimiter:
    """A token bucket: `rate` tokens a second, bursts of up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.updated = time.monotonic()

    async def take(self, tokens: float = 1.0) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= tokens:
                self.tokens -= tokens
                return
            await asyncio.sleep((tokens - self.tokens) / self.rate)


class Confirmer:
    def __init__(self, config: DnsConfig, store: ViolationStore, ranges: Sequence[Network]) -> None:
        self.config = config
        self.store = store
        self.ranges = tuple(ranges)
        self.resolver = dns.asyncresolver.Resolver(configure=not config.resolvers)
        if config.resolvers:
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in config.resolvers]
        self.resolver.timeout = config.timeout
        self.resolver.lifetime = config.timeout
        self.limiter = RateLimiter(config.rate)
        self.cache: dict[str, Lookup] = {}

    async def run(self) -> None:
        """Check for ever; a failure of the log or the resolver library is logged, not fatal."""
        while True:
            try:
                checked = await self.check_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("DNS confirmation failed; trying again")
                checked = 0
            if not checked:
                await asyncio.sleep(IDLE)

    async def check_pending(self) -> int:
        """Check one batch of hosts waiting for confirmation; returns how many hosts."""
        pending = await self.store.hosts_to_check(time.time(), self.config.recheck_after, BATCH)
        for host, ips in pending:
            lookup = await self.lookup(host)
            at = time.time()
            for ip in ips:
                state = classify(lookup, ip, self.ranges)
                await self.store.set_dns(host, ip, state, list(lookup.addresses), describe(lookup), at)
                DNS_CHECKS.labels(state).inc()
        return len(pending)

    async def lookup(self, host: str) -> Lookup:
        cached = self.cache.get(host)
        if cached is not None and cached.expires > time.monotonic():
            return cached
        await self.limiter.take(2.0)  # A and AAAA
        answers = await asyncio.gather(self._resolve(host, "A"), self._resolve(host, "AAAA"))
        addresses = tuple(address for found, _, _, _ in answers for address in found)
        errors = [error for _, error, _, _ in answers if error]
        chain = max((chain for _, _, chain, _ in answers), key=len)
        ttls = [ttl for _, _, _, ttl in answers if ttl is not None]
        ttl = min(ttls) if ttls else self.config.min_ttl
        ttl = min(self.config.max_ttl, max(self.config.min_ttl, ttl))
        lookup = Lookup(addresses, errors[0] if errors and not addresses else "", chain, time.monotonic() + ttl)
        if len(self.cache) >= CACHE_LIMIT:
            self.cache.clear()
        self.cache[host] = lookup
        return lookup

    async def _resolve(self, host: str, rdtype: str) -> tuple[list[str], str, tuple[str, ...], float | None]:
        """(addresses, error, CNAME chain, TTL) for one record type."""
        try:
            answer = await self.resolver.resolve(host, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return [], "NXDOMAIN", (), None
        except dns.resolver.NoAnswer as error:
            chain = _chain(error.response(), host) if error.kwargs.get("response") else ()
            return [], "", chain, None
        except dns.resolver.NoNameservers:
            return [], "SERVFAIL or REFUSED from every resolver", (), None
        except dns.exception.Timeout:
            return [], "timeout after %gs" % self.config.timeout, (), None
        except dns.exception.DNSException as error:
            return [], "DNS error: %s" % error, (), None
        addresses = [rdata.address for rdata in answer]
        return addresses, "", _chain(answer.response, host), answer.rrset.ttl


def _chain(response, host: str) -> tuple[str, ...]:
    """The CNAME targets followed from `host`, in order, as the response gives them."""
    cnames = {}
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.CNAME:
            cnames[rrset.name.to_text(omit_final_dot=True).lower()] = rrset[0].target.to_text(omit_final_dot=True)
    chain, name = [], host.lower()
    while name in cnames and len(chain) < 16:
        name = cnames[name].lower()
        chain.append(name)
    return tuple(chain)


def hosted_ranges(config: DnsConfig, enforce_ranges: Sequence[Network] | None) -> tuple[Network, ...]:
    """dns.hosted_ranges, else the policy pack's enforce_ranges, else none (the seen-on IP only)."""
    return tuple(config.hosted_ranges) or tuple(enforce_ranges or ())
