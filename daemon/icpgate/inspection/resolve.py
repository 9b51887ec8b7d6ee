"""DNS lookups for site inspection: A and AAAA through the configured resolvers, CNAME chains
followed, a query rate limit, and retries of what failed.

Each query is one UDP datagram sent by this module (dns.asyncquery), never a resolver library's
own retries, so the rate limit counts exactly what the resolvers receive. A resolver that gives
the CNAME without its target is asked for the target in turn, up to MAX_CHAIN names.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver

MAX_CHAIN = 16


@dataclass(frozen=True, slots=True)
class Lookup:
    """What one name resolves to, A and AAAA together."""

    addresses: tuple[str, ...]
    chain: tuple[str, ...]  # the CNAME targets followed, in order
    nxdomain: bool  # the name (or the end of its chain) does not exist
    error: str  # "" when both types were answered; else why one failed after its retries


class LookupFailed(Exception):
    """No resolver answered with NOERROR or NXDOMAIN, retries included."""


class RateLimiter:
    """A token bucket: `rate` tokens a second, bursts of up to one second's worth (at least one)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.tokens = self.burst
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        async with self._lock:  # first come, first served: no waiter starves behind newer ones
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


def system_resolvers() -> tuple[tuple[str, int], ...]:
    """The resolvers of /etc/resolv.conf, for a config that names none."""
    return tuple((str(server), 53) for server in dns.resolver.Resolver().nameservers)


class DnsClient:
    """Resolves names at most `rate` queries a second; `queries` counts every datagram sent."""

    def __init__(self, resolvers: tuple[tuple[str, int], ...], rate: float, timeout: float, retries: int) -> None:
        if not resolvers:
            raise ValueError("no resolver to ask")
        self.resolvers = resolvers
        self.timeout = timeout
        self.retries = retries
        self.limiter = RateLimiter(rate)
        self.queries = 0

    async def lookup(self, name: str) -> Lookup:
        (v4, chain4, nx4, error4), (v6, chain6, nx6, error6) = await asyncio.gather(
            self._resolve(name, dns.rdatatype.A), self._resolve(name, dns.rdatatype.AAAA)
        )
        return Lookup(tuple(v4 + v6), max(chain4, chain6, key=len), nx4 and nx6, error4 or error6)

    async def _resolve(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[list[str], tuple, bool, str]:
        """(addresses, chain, NXDOMAIN, error) for one record type, chasing a CNAME the resolver left open."""
        chain: list[str] = []
        current = dns.name.from_text(name)
        while True:
            try:
                response = await self._ask(current, rdtype)
            except LookupFailed as error:
                return [], tuple(chain), False, str(error)
            cnames, data = {}, {}
            for rrset in response.answer:
                if rrset.rdtype == dns.rdatatype.CNAME:
                    cnames[rrset.name] = rrset[0].target
                elif rrset.rdtype == rdtype:
                    data[rrset.name] = [rdata.address for rdata in rrset]
            asked = current
            while current in cnames and len(chain) < MAX_CHAIN:
                current = cnames[current]
                chain.append(current.to_text(omit_final_dot=True).lower())
            if current in data:
                return data[current], tuple(chain), False, ""
            if response.rcode() == dns.rcode.NXDOMAIN:
                return [], tuple(chain), True, ""
            if current == asked:  # NOERROR without data for the name: no address of this type
                return [], tuple(chain), False, ""
            if len(chain) >= MAX_CHAIN:
                return [], tuple(chain), False, "CNAME chain longer than %d names" % MAX_CHAIN

    async def _ask(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        """One question, asked again (of the next resolver) after a timeout, SERVFAIL or REFUSED."""
        failure = ""
        for attempt in range(self.retries + 1):
            address, port = self.resolvers[attempt % len(self.resolvers)]
            query = dns.message.make_query(name, rdtype)
            await self.limiter.take()
            self.queries += 1
            try:
                response = await dns.asyncquery.udp(query, address, timeout=self.timeout, port=port)
                if response.flags & dns.flags.TC:
                    await self.limiter.take()
                    self.queries += 1
                    response = await dns.asyncquery.tcp(query, address, timeout=self.timeout, port=port)
            except dns.exception.Timeout:
                failure = "timeout after %gs" % self.timeout
                continue
            except (OSError, dns.exception.DNSException) as error:
                failure = "DNS error: %s" % (error or type(error).__name__)
                continue
            rcode = response.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            failure = dns.rcode.to_text(rcode)
        tries = self.retries + 1
        raise LookupFailed("%s (%d %s)" % (failure, tries, "try" if tries == 1 else "tries"))
