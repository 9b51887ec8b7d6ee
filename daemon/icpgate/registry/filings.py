"""The filing record as icpgate stores it: one website filing with its domains and access records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum


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
        return {
            **self.extra,
            "licence": self.licence,
            "subject_licence": self.subject_licence,
            "subject_name": self.subject_name,
            "subject_type": self.subject_type.value,
            "site_name": self.site_name,
            "status": self.status.value,
            "limit_access": self.limit_access,
            "domains": list(self.domains),
            "access": [{"provider": a.provider, "status": a.status.value, "ips": list(a.ips)} for a in self.access],
            "updated_at": self.updated_at,
        }

    def canonical_json(self) -> str:
        """One line that is the same wherever the same filing is stored: keys sorted, domains,
        access records and their addresses in sorted order. Feed checksums hash this form."""
        record = self.to_json()
        record["domains"] = sorted(self.domains)
        record["access"] = sorted(
            ({"provider": a.provider, "status": a.status.value, "ips": sorted(a.ips)} for a in self.access),
            key=lambda access: (access["provider"], access["status"], access["ips"]),
        )
        return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    def digest(self) -> bytes:
        """SHA-256 of the canonical form: what the registry checksum is built from."""
        return hashlib.sha256(self.canonical_json().encode()).digest()
