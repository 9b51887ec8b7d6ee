"""One inspection session: resume the unfinished pass or begin one, and resolve the filings with
our access batch by batch, until every one is done or `inspect.max_run_time` has passed.

A batch's results and the cursor past it are committed together, so a session stopped anywhere (a
restart, SIGHUP, max_run_time) is resumed after the last committed batch. One session at a time:
a lock file beside the history keeps the CLI and the service process from running two.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config.settings import Config
from ..names.hostname import parent_names
from ..names.suffixes import registrable_domain
from ..registry.store import Registry
from ..violations.store import open_violations
from .classify import Network, best, classify
from .resolve import DnsClient, system_resolvers
from .store import DomainResult, InspectionStore, Pass

log = logging.getLogger("icpgate.inspect")
BATCH = 50  # filings per committed batch
QUERIES_PER_NAME = 2  # A and AAAA


class Busy(Exception):
    """Another process holds the inspection lock."""


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the inspection lock (a file beside the history) or raise Busy; the kernel releases it
    when the process dies, so a crash never leaves it held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy("another inspection is running on %s" % path) from None
        yield
    finally:
        os.close(fd)


def resolvers(config: Config) -> tuple[tuple[str, int], ...]:
    return config.inspect.resolvers or config.dns.resolvers or system_resolvers()


def names_of(domain: str) -> tuple[str, ...]:
    """The names resolved for a filing domain: itself, and `www.` for a bare registrable name."""
    return (domain, "www." + domain) if registrable_domain(domain) == domain else (domain,)


@dataclass(frozen=True, slots=True)
class Estimate:
    filings: int
    domains: int
    names: int
    queries: int  # at least: A and AAAA per name, before CNAME chases and retries
    seconds: float  # at inspect.rate


async def estimate(config: Config, registry: Registry) -> Estimate:
    """What a full pass would ask, and how long it takes at the configured rate (`--dry-run`)."""
    filings = domains = names = 0
    after = ""
    while batch := await registry.filings_with_access(config.provider.id, after, 1000):
        filings += len(batch)
        for *_, filing_domains in batch:
            domains += len(filing_domains)
            names += sum(len(names_of(domain)) for domain in filing_domains)
        after = batch[-1][0]
    queries = names * QUERIES_PER_NAME
    return Estimate(filings, domains, names, queries, queries / config.inspect.rate)


class Inspection:
    def __init__(self, config: Config, registry: Registry, store: InspectionStore, client: DnsClient) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.client = client
        self.ranges: tuple[Network, ...] = config.dns.hosted_ranges
        self._limit = asyncio.Semaphore(config.inspect.concurrency)

    async def session(self) -> Pass:
        """Run until the pass is done or max_run_time has passed; returns the pass as it stands."""
        inspect = self.config.inspect
        started = time.monotonic()
        run = await self.store.start_pass(time.time())
        log.info("inspection pass %d: %s after %r", run.id, "resumed" if run.cursor else "started", run.cursor)
        relayed = await self._relayed_names()
        cursor, done, batches = run.cursor, False, 0
        while True:
            batch = await self.registry.filings_with_access(self.config.provider.id, cursor, BATCH)
            if not batch:
                done = True
                break
            if batches and time.monotonic() - started >= inspect.max_run_time:  # every session makes progress
                break
            batches += 1
            sent = self.client.queries
            results = await asyncio.gather(*(self._domain(licence, domain, relayed) for licence, *_, domains in batch
                                             for domain in domains))  # fmt: skip
            cursor = batch[-1][0]
            filings = [(licence, site, subject, access) for licence, site, subject, access, _ in batch]
            await self.store.record(run, filings, list(results), cursor, self.client.queries - sent, time.time())
        await self.store.end_session(run, done=done, now=time.time())
        run = await self.store.last_pass()
        log.info("inspection pass %d %s: %d filings, %d domains, %d DNS queries so far", run.id,
                 "done" if done else "paused at max_run_time", run.filings, run.domains, run.queries)  # fmt: skip
        return run

    async def _domain(self, licence: str, domain: str, relayed: frozenset[str]) -> DomainResult:
        async with self._limit:
            names = names_of(domain)
            lookups = await asyncio.gather(*(self.client.lookup(name) for name in names))
        results = []
        addresses: list[str] = []
        for name, lookup in zip(names, lookups, strict=True):
            klass, why = classify(lookup, self.ranges, self.config.inspect.cdn_suffixes, name in relayed)
            results.append((name, klass, why))
            addresses += [address for address in lookup.addresses if address not in addresses]
        klass, why = best(results)
        return DomainResult(domain, licence, klass, why, tuple(addresses))

    async def _relayed_names(self) -> frozenset[str]:
        """Every name the gate relayed filed traffic for on our addresses within inspect.relayed_within,
        with its parents: `example.cn` counts as relayed when `shop.example.cn` was."""
        path = self.config.violations.path
        if not path.is_file():
            return frozenset()
        async with open_violations(path) as violations:
            rows = await violations.relayed_since(time.time() - self.config.inspect.relayed_within)
        names: set[str] = set()
        for host, ip, _ in rows:
            if _inside(ip, self.ranges):
                names.update(parent_names(host))
        return frozenset(names)


def _inside(ip: str, ranges: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    return any(address in network for network in ranges)


def client_for(config: Config) -> DnsClient:
    inspect = config.inspect
    return DnsClient(resolvers(config), inspect.rate, inspect.timeout, inspect.retries)
