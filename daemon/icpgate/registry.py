"""The filings registry: SQLite (WAL) through aiosqlite, with versioned migrations.

An import is one transaction. Records are staged in temporary tables as they are parsed, checked
against each other and against what is stored with set queries, and merged only when nothing is
wrong (or, with `skip_invalid`, when the wrong ones are dropped). A failed import leaves the
registry exactly as it was.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from .filings import AccessRecord, AccessStatus, Filing, FilingStatus, SubjectType
from .index import DictIndex, IndexBuilder
from .interchange import ParsedFiling, RecordError

MIGRATIONS: Sequence[str] = (
    # 1: filings, their domains and access records, import history.
    """
    CREATE TABLE filings (
        id INTEGER PRIMARY KEY,
        licence TEXT NOT NULL UNIQUE,
        subject_licence TEXT NOT NULL,
        subject_name TEXT NOT NULL,
        subject_type TEXT NOT NULL,
        site_name TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('approved', 'pending', 'deregistered')),
        limit_access INTEGER NOT NULL,
        updated_at TEXT NOT NULL,
        extra TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE domains (
        name TEXT PRIMARY KEY,
        filing_id INTEGER NOT NULL REFERENCES filings (id) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX domains_by_filing ON domains (filing_id);
    CREATE TABLE access (
        filing_id INTEGER NOT NULL REFERENCES filings (id) ON DELETE CASCADE,
        provider TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'first_review', 'cancelled')),
        ips TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX access_by_filing ON access (filing_id);
    CREATE TABLE imports (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        format TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        records INTEGER NOT NULL,
        inserted INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        skipped INTEGER NOT NULL
    );
    """,
)

_STAGING = """
DROP TABLE IF EXISTS temp.stage_filings; DROP TABLE IF EXISTS temp.stage_domains;
DROP TABLE IF EXISTS temp.stage_access;
CREATE TEMP TABLE stage_filings (
    line INTEGER NOT NULL, licence TEXT NOT NULL, subject_licence TEXT, subject_name TEXT,
    subject_type TEXT, site_name TEXT, status TEXT, limit_access INTEGER, updated_at TEXT, extra TEXT);
CREATE TEMP TABLE stage_domains (line INTEGER NOT NULL, licence TEXT NOT NULL, name TEXT NOT NULL);
CREATE TEMP TABLE stage_access (licence TEXT NOT NULL, provider TEXT, status TEXT, ips TEXT);
"""
_STAGING_INDEXES = (
    "CREATE INDEX stage_filings_licence ON stage_filings (licence)",
    "CREATE INDEX stage_domains_name ON stage_domains (name)",
)
_STAGE_BATCH = 5000
MAX_REPORTED_ERRORS = 1000


@dataclass
class ImportReport:
    source: str
    records: int = 0
    inserted: int = 0
    updated: int = 0
    skipped: int = 0
    errors: list[RecordError] = field(default_factory=list)
    error_count: int = 0
    warnings: list[str] = field(default_factory=list)
    committed: bool = False

    def add_error(self, error: RecordError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)


class Registry:
    """One open registry database."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    async def import_filings(
        self,
        items: Iterable[ParsedFiling | RecordError],
        *,
        source: str,
        fmt: str,
        skip_invalid: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> ImportReport:
        """Import parsed filings as one transaction; see the module docstring."""
        report = ImportReport(source)
        started = _now()
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _STAGING.split(";"):
                if statement.strip():
                    await self.db.execute(statement)
            await self._stage(items, report, progress)
            parse_errors = report.error_count  # records that were never staged
            conflicts = await self._conflicts()
            for error in conflicts:
                report.add_error(error)
            if report.error_count and not skip_invalid:
                await self.db.execute("ROLLBACK")
                return report
            dropped = await self._drop_lines({error.line for error in conflicts})
            report.records -= dropped
            report.skipped = parse_errors + dropped
            await self._merge(report)
            await self.db.execute(
                "INSERT INTO imports (source, format, started_at, finished_at, records, inserted, updated, skipped)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (source, fmt, started, _now(), report.records, report.inserted, report.updated, report.skipped),
            )
            await self.db.execute("COMMIT")
            report.committed = True
            return report
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def _stage(self, items, report: ImportReport, progress) -> None:
        """Stage parsed records in batches; each batch is written while the next one is parsed."""
        filings, domains, access = [], [], []
        writing: asyncio.Future | None = None
        for item in items:
            if isinstance(item, RecordError):
                report.add_error(item)
                continue
            report.records += 1
            report.warnings.extend("line %d: %s" % (item.line, w) for w in item.warnings)
            filing = item.filing
            filings.append(
                (item.line, filing.licence, filing.subject_licence, filing.subject_name, filing.subject_type.value,
                 filing.site_name, filing.status.value, int(filing.limit_access), filing.updated_at,
                 json.dumps(filing.extra, ensure_ascii=False))
            )  # fmt: skip
            domains.extend((item.line, filing.licence, name) for name in filing.domains)
            access.extend((filing.licence, a.provider, a.status.value, " ".join(a.ips)) for a in filing.access)
            if len(filings) >= _STAGE_BATCH:
                if writing:
                    await writing
                writing = asyncio.ensure_future(self._flush_stage(filings, domains, access))
                if progress:
                    progress(len(filings))
                filings, domains, access = [], [], []
        if writing:
            await writing
        await self._flush_stage(filings, domains, access)
        if progress and filings:
            progress(len(filings))
        for statement in _STAGING_INDEXES:
            await self.db.execute(statement)

    async def _flush_stage(self, filings: list, domains: list, access: list) -> None:
        await self.db.executemany("INSERT INTO stage_filings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", filings)
        await self.db.executemany("INSERT INTO stage_domains VALUES (?, ?, ?)", domains)
        await self.db.executemany("INSERT INTO stage_access VALUES (?, ?, ?, ?)", access)

    async def _conflicts(self) -> list[RecordError]:
        """Duplicates inside the file, and domains that another stored filing keeps."""
        queries = (
            (
                "SELECT s.line, 'licence', 'duplicate licence ' || s.licence || ', first at line ' || f.first"
                " FROM stage_filings s JOIN (SELECT licence, MIN(line) AS first FROM stage_filings"
                " GROUP BY licence HAVING COUNT(*) > 1) f USING (licence) WHERE s.line > f.first"
            ),
            (
                "SELECT s.line, 'domains', 'domain ' || s.name || ' is also in the record at line ' || f.first"
                " FROM stage_domains s JOIN (SELECT name, MIN(line) AS first FROM stage_domains"
                " GROUP BY name HAVING COUNT(*) > 1) f USING (name) WHERE s.line > f.first"
            ),
            (
                "SELECT s.line, 'domains', 'domain ' || s.name || ' is already filed under ' || f.licence"
                " FROM stage_domains s JOIN domains d ON d.name = s.name JOIN filings f ON f.id = d.filing_id"
                " WHERE f.licence != s.licence AND f.licence NOT IN (SELECT licence FROM stage_filings)"
            ),
        )
        errors = []
        for query in queries:
            async with self.db.execute(query + " ORDER BY 1") as cursor:
                errors.extend(RecordError(line, fld, msg) for line, fld, msg in await cursor.fetchall())
        return errors

    async def _drop_lines(self, lines: set[int]) -> int:
        """Unstage the records at these lines (all of them, not only the reported ones)."""
        if not lines:
            return 0
        await self.db.execute("CREATE TEMP TABLE IF NOT EXISTS bad_lines (line INTEGER PRIMARY KEY)")
        await self.db.execute("DELETE FROM bad_lines")
        await self.db.executemany("INSERT INTO bad_lines VALUES (?)", [(line,) for line in sorted(lines)])
        bad_licences = "SELECT licence FROM stage_filings WHERE line IN (SELECT line FROM bad_lines)"
        await self.db.execute("DELETE FROM stage_access WHERE licence IN (%s)" % bad_licences)
        await self.db.execute("DELETE FROM stage_domains WHERE licence IN (%s)" % bad_licences)
        async with self.db.execute("DELETE FROM stage_filings WHERE line IN (SELECT line FROM bad_lines)") as cursor:
            return cursor.rowcount

    async def _merge(self, report: ImportReport) -> None:
        async with self.db.execute("SELECT COUNT(*) FROM stage_filings JOIN filings USING (licence)") as cursor:
            (report.updated,) = await cursor.fetchone()
        report.inserted = report.records - report.updated
        replaced = "SELECT id FROM filings WHERE licence IN (SELECT licence FROM stage_filings)"
        await self.db.execute("DELETE FROM domains WHERE filing_id IN (%s)" % replaced)
        await self.db.execute("DELETE FROM access WHERE filing_id IN (%s)" % replaced)
        await self.db.execute(
            "INSERT INTO filings (licence, subject_licence, subject_name, subject_type, site_name, status,"
            " limit_access, updated_at, extra)"
            " SELECT licence, subject_licence, subject_name, subject_type, site_name, status, limit_access,"
            " updated_at, extra FROM stage_filings WHERE true"
            " ON CONFLICT (licence) DO UPDATE SET subject_licence = excluded.subject_licence,"
            " subject_name = excluded.subject_name, subject_type = excluded.subject_type,"
            " site_name = excluded.site_name, status = excluded.status, limit_access = excluded.limit_access,"
            " updated_at = excluded.updated_at, extra = excluded.extra"
        )
        # A domain that moved from a stored filing to one in this import leaves its old owner.
        await self.db.execute("DELETE FROM domains WHERE name IN (SELECT name FROM stage_domains)")
        await self.db.execute(
            "INSERT INTO domains (name, filing_id)"
            " SELECT s.name, f.id FROM stage_domains s JOIN filings f USING (licence)"
        )
        await self.db.execute(
            "INSERT INTO access (filing_id, provider, status, ips)"
            " SELECT f.id, s.provider, s.status, s.ips FROM stage_access s JOIN filings f USING (licence)"
        )

    async def load_index(self) -> DictIndex:
        """Build the whole in-memory index from the registry."""
        return await self._build_index(None, ())

    async def index_for(self, names: Sequence[str]) -> DictIndex:
        """An index holding only the filings that cover these names: same data, same decisions."""
        marks = ", ".join("?" * len(names)) or "NULL"
        return await self._build_index("SELECT filing_id FROM domains WHERE name IN (%s)" % marks, tuple(names))

    async def _build_index(self, filing_ids: str | None, params: tuple) -> DictIndex:
        """Build an index of all filings, or of those whose id the `filing_ids` subquery yields.

        One pass over domains joined to their filing, ordered by filing, so no per-filing table
        is held while building; access records come concatenated and are shared by the builder.
        """
        only = " WHERE d.filing_id IN (%s)" % filing_ids if filing_ids else ""
        query = (
            "SELECT d.filing_id, d.name, f.licence, f.status, f.limit_access,"
            " (SELECT group_concat(a.provider || char(9) || a.status || char(9) || a.ips, char(10))"
            "  FROM access a WHERE a.filing_id = f.id)"
            " FROM domains d JOIN filings f ON f.id = d.filing_id" + only + " ORDER BY d.filing_id"
        )
        builder = IndexBuilder()
        async for filing_id, name, licence, status, limit_access, access in self._rows(query, params):
            builder.add(filing_id, name, licence, status, limit_access, access or "")
        return builder.build()

    async def _rows(self, query: str, params: tuple) -> AsyncIterator[tuple]:
        async with self.db.execute(query, params) as cursor:
            cursor.arraysize = 10000
            async for row in cursor:
                yield row

    async def get_filing(self, licence: str) -> Filing | None:
        """The full stored record, for explanations and the admin side."""
        async with self.db.execute(
            "SELECT id, licence, subject_licence, subject_name, subject_type, site_name, status, limit_access,"
            " updated_at, extra FROM filings WHERE licence = ?",
            (licence,),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        filing_id = row[0]
        async with self.db.execute("SELECT name FROM domains WHERE filing_id = ? ORDER BY name", (filing_id,)) as cur:
            domains = tuple(name for (name,) in await cur.fetchall())
        async with self.db.execute(
            "SELECT provider, status, ips FROM access WHERE filing_id = ? ORDER BY rowid", (filing_id,)
        ) as cur:
            access = tuple(AccessRecord(p, AccessStatus(s), tuple(ips.split())) for p, s, ips in await cur.fetchall())
        return Filing(
            licence=row[1], subject_licence=row[2], subject_name=row[3], subject_type=SubjectType(row[4]),
            site_name=row[5], status=FilingStatus(row[6]), limit_access=bool(row[7]), domains=domains,
            access=access, updated_at=row[8], extra=json.loads(row[9]),
        )  # fmt: skip


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        (version,) = await cursor.fetchone()
    if version > len(MIGRATIONS):
        raise RegistryError("%s has schema version %d; this icpgate knows up to %d" % (path, version, len(MIGRATIONS)))
    for number in range(version, len(MIGRATIONS)):
        await db.executescript("BEGIN;%s;PRAGMA user_version = %d;COMMIT;" % (MIGRATIONS[number], number + 1))


class RegistryError(RuntimeError):
    """The registry database cannot be used (wrong schema, unreadable file)."""


@asynccontextmanager
async def open_registry(path: Path, *, create: bool = True) -> AsyncIterator[Registry]:
    """Open the registry at `path`, migrating it; create it unless `create` is False."""
    if not create and not path.is_file():
        raise RegistryError("registry %s does not exist: import filings first (icpgate import)" % path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except Exception as error:  # sqlite3 raises OperationalError for unopenable paths
        raise RegistryError("cannot open registry %s: %s" % (path, error)) from error
    try:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA temp_store = MEMORY")
        await _migrate(db, path)
        yield Registry(db, path)
    finally:
        await db.close()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
