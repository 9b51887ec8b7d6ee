"""The filing record as icpgate stores it: one website filing with its domains and access records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum

import orjson


class FilingStatus(StrEnum):
    APPROVED = "approved"
    PENDING = "pending"
    DEREGISTERED = "deregistered"


class AccessStatus(StrEnum):
    ACTIVE = "active"
    # The provider's own first review (接入初审) passed; the bureau has not decided yet.
    FIRST_REVIEW = "first_review"
    CANCELLED = "cancelled"


class SubjectType(StrEnum):
    ENTERPRISE = "enterprise"
    INDIVIDUAL = "individual"
    GOVERNMENT = "government"
    INSTITUTION = "institution"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class AccessRecord:
    provider: str
    status: AccessStatus
    ips: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Filing:
    licence: str
    subject_licence: str
    subject_name: str
    subject_type: SubjectType
    site_name: str
    status: FilingStatus
    limit_access: bool
    domains: tuple[str, ...]
    access: tuple[AccessRecord, ...]
    updated_at: str
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """The interchange form (docs/filings-format.md), unknown fields kept."""
        access = [{"provider": a.provider, "status": a.status.value, "ips": list(a.ips)} for a in self.access]
        return self._record(list(self.domains), access)

    def _record(self, domains: list[str], access: list[dict[str, object]]) -> dict[str, object]:
        """Every field, around `domains` and `access`: the interchange and canonical forms differ
        only in the order of those two."""
        return {
            **self.extra,
            "licence": self.licence,
            "subject_licence": self.subject_licence,
            "subject_name": self.subject_name,
            "subject_type": self.subject_type.value,
            "site_name": self.site_name,
            "status": self.status.value,
            "limit_access": self.limit_access,
            "domains": domains,
            "access": access,
            "updated_at": self.updated_at,
        }

    def canonical_json(self) -> str:
        """One line that is the same wherever the same filing is stored: keys sorted, domains,
        access records and their addresses in sorted order. Feed checksums hash this form."""
        form = self._canonical()
        return form if isinstance(form, str) else form.decode()

    def canonical_bytes(self) -> bytes:
        """The canonical form in UTF-8, without a round trip through str when orjson wrote it."""
        form = self._canonical()
        return form.encode() if isinstance(form, str) else form

    def _canonical(self) -> bytes | str:
        """The canonical form is `json.dumps(record, ensure_ascii=False, sort_keys=True,
        separators=(",", ":"))`, byte for byte, whatever version wrote it: publishers and edges add
        up each other's digests. orjson writes it several times faster but agrees with json.dumps
        only on strings, bools, None and 64-bit ints in lists and dicts with string keys, so it
        writes only such records (in UTF-8); it refuses lone surrogates and larger ints itself.
        Those records, and those with floats or other types in `extra`, go through json.dumps (a
        str). tests/test_canonical_digest.py holds the two to the same bytes."""
        access = sorted(
            ({"provider": a.provider, "status": a.status.value, "ips": sorted(a.ips)} for a in self.access),
            key=_access_order,
        )
        record = self._record(sorted(self.domains), access)
        if not self.extra or _plain_json(self.extra):
            try:
                return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
            except orjson.JSONEncodeError:  # a lone surrogate, an int beyond 64 bits, nesting too deep
                pass
        return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    def digest(self) -> bytes:
        """SHA-256 of the canonical form: what the registry checksum is built from."""
        return hashlib.sha256(self.canonical_bytes()).digest()


def _access_order(access: dict) -> tuple:
    return access["provider"], access["status"], access["ips"]


_PLAIN_SCALARS = frozenset({str, bool, int, type(None)})
_PLAIN_LIMIT = 10_000


def _plain_json(value: object) -> bool:
    """Whether `value` holds only what orjson writes as json.dumps does: exact str, bool, int, None,
    in lists and dicts with str keys. No float (their text differs: `1e+300`, `NaN`), no subclass,
    no tuple. Iterative, so that nesting as deep as json.loads allows does not overflow the stack;
    gives up after _PLAIN_LIMIT values, so that a cycle (json.dumps refuses it) ends too."""
    stack = [value]
    for _ in range(_PLAIN_LIMIT):
        if not stack:
            return True
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            for key in item:
                if type(key) is not str:
                    return False
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind not in _PLAIN_SCALARS:
            return False
    return False
