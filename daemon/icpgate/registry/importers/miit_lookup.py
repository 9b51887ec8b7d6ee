"""The stored filings a download file's cancellations name, found by the province system's ids
that an earlier download left in each filing's extra fields (`miit_ztid`, `miit_wzid`, `miit_jrids`).

One scan of the filings table per import that carries cancellations, read-only, before the import's
own transaction begins.
"""

from __future__ import annotations

import json

from ..filings import Filing
from ..store import Registry
from .miit_xml import ACCESS, SUBJECT, WEBSITE, Cancellation

_FIND = """SELECT licence FROM filings WHERE extra != '{}' AND (
    json_extract(extra, '$.miit_ztid') IN (SELECT value FROM json_each(?))
    OR json_extract(extra, '$.miit_wzid') IN (SELECT value FROM json_each(?))
    OR EXISTS (SELECT 1 FROM json_each(extra, '$.miit_jrids') WHERE key IN (SELECT value FROM json_each(?))))"""


async def stored_filings(registry: Registry, cancellations: list[Cancellation]) -> dict[str, Filing]:
    ids = {kind: json.dumps(sorted({c.record_id for c in cancellations if c.kind == kind}))
           for kind in (SUBJECT, WEBSITE, ACCESS)}  # fmt: skip
    async with registry.db.execute(_FIND, (ids[SUBJECT], ids[WEBSITE], ids[ACCESS])) as cursor:
        licences = [licence for (licence,) in await cursor.fetchall()]
    found = {}
    for licence in licences:
        filing = await registry.get_filing(licence)
        if filing is not None:
            found[licence] = filing
    return found
