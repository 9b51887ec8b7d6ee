"""A parsed filing as the import's stage tables take it (registry/store.py, `_STAGING`).

Built where the filing was parsed: in the importer, or in a worker process of the import's pool
(registry/importers/pool.py), which then hands back plain tuples instead of the Filing objects,
since tuples of strings cross a process boundary at a third of a Filing's cost.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from .interchange import ParsedFiling


class StagedFiling(NamedTuple):
    line: int
    warnings: tuple[str, ...]
    filing: tuple  # a row of stage_filings
    domains: list[tuple[int, str, str]]  # rows of stage_domains
    access: list[tuple[str, str, str, str]]  # rows of stage_access


def staged(item: ParsedFiling) -> StagedFiling:
    """The stage rows of one parsed filing, its digest among them."""
    filing = item.filing
    row = (item.line, filing.licence, filing.subject_licence, filing.subject_name, filing.subject_type.value,
           filing.site_name, filing.status.value, int(filing.limit_access), filing.updated_at,
           _extra_json(filing.extra), filing.digest())  # fmt: skip
    domains = [(item.line, filing.licence, name) for name in filing.domains]
    access = [(filing.licence, a.provider, a.status.value, " ".join(a.ips)) for a in filing.access]
    return StagedFiling(item.line, item.warnings, row, domains, access)


def _extra_json(extra: dict[str, object]) -> str:
    """The unknown fields as stored; most records have none, and json.dumps({}) is "{}"."""
    return json.dumps(extra, ensure_ascii=False) if extra else "{}"
