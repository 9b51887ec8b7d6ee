"""The filings index interface (name -> the filing that covers it, by exact lookups only) and the
in-memory `DictIndex`.

The gate's workers use the shared index file (registry/index_store.py), updated in place by its writer;
`DictIndex` serves one-off decisions on a few filings (explain, the admin API, exports) and is the
reference the shared index is tested against. A `DictIndex` is never mutated after it is built.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple, Protocol

from .filings import AccessStatus, FilingStatus

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class IndexedAccess(NamedTuple):
    provider: str
    status: AccessStatus
    networks: tuple[IPNetwork, ...]


class IndexedFiling(NamedTuple):
    """What a decision needs of a filing; the full record stays in the registry."""

    licence: str
    status: FilingStatus
    limit_access: bool
    access: tuple[IndexedAccess, ...]


class Match(NamedTuple):
    domain: str  # the label that matched: the name itself or one of its parents
    filing: IndexedFiling


class FilingIndex(Protocol):
    def lookup(self, name: str) -> Match | None:
        """The filing covering a normalised name: the name, then each parent label in turn."""

    def __len__(self) -> int:
        """How many filings the index holds."""

    def generation(self) -> int:
        """Changes whenever the data behind lookups may have changed: caches of decisions key on it."""


class DictIndex:
    """A dict from filed domain to its filing; O(labels) lookups."""

    __slots__ = ("_by_domain", "_filings")

    def __init__(self, by_domain: dict[str, IndexedFiling], filings: int) -> None:
        self._by_domain = by_domain
        self._filings = filings

    def lookup(self, name: str) -> Match | None:
        get = self._by_domain.get
        while True:
            filing = get(name)
            if filing is not None:
                return Match(name, filing)
            dot = name.find(".")
            if dot < 0:
                return None
            name = name[dot + 1 :]

    def __len__(self) -> int:
        return self._filings

    def generation(self) -> int:
        return 0  # never changes: a new one is a new object

    @property
    def domain_count(self) -> int:
        return len(self._by_domain)


class IndexBuilder:
    """Collects (filing, domain) rows, ordered by filing, and shares what filings have in common.

    Most filings at one provider carry the same few access records, so identical access tuples
    and networks are stored once; that keeps a million filings in a few hundred bytes each.
    """

    def __init__(self) -> None:
        self._by_domain: dict[str, IndexedFiling] = {}
        self._filings = 0
        self._last: tuple[int, IndexedFiling] | None = None
        self._accesses: dict[str, tuple[IndexedAccess, ...]] = {}
        self._networks: dict[str, IPNetwork] = {}

    def add(self, filing_id: int, domain: str, licence: str, status: str, limit_access: int, access: str) -> None:
        """One domain of one filing. `access`: records as `provider TAB status TAB ips`, one a line."""
        if self._last is None or self._last[0] != filing_id:
            filing = IndexedFiling(licence, FilingStatus(status), bool(limit_access), self._access(access))
            self._last = (filing_id, filing)
            self._filings += 1
        self._by_domain[domain] = self._last[1]

    def _access(self, text: str) -> tuple[IndexedAccess, ...]:
        shared = self._accesses.get(text)
        if shared is None:
            shared = self._accesses[text] = tuple(self._record(line) for line in text.split("\n") if line)
        return shared

    def _record(self, line: str) -> IndexedAccess:
        return access_record(line, self._networks, None)

    def build(self) -> DictIndex:
        return DictIndex(self._by_domain, self._filings)


EMPTY_INDEX = DictIndex({}, 0)


def access_record(line: str, networks: dict[str, IPNetwork], limit: int | None) -> IndexedAccess:
    """One stored access record (`provider<TAB>status<TAB>cidr cidr…`), its networks parsed once:
    `networks` is a cache shared by the records of one index (cleared past `limit`, if given)."""
    provider, status, ips = line.split("\t")
    parsed = []
    for text in ips.split():
        network = networks.get(text)
        if network is None:
            if limit is not None and len(networks) >= limit:
                networks.clear()
            network = networks[text] = ipaddress.ip_network(text)
        parsed.append(network)
    return IndexedAccess(provider, AccessStatus(status), tuple(parsed))
