"""The filings registry: SQLite (WAL) through aiosqlite, with versioned migrations.

An import is one transaction. Records are staged in temporary tables as they are parsed, checked
against each other and against what is stored with set queries, and merged only when nothing is
wrong (or, with `skip_invalid`, when the wrong ones are dropped). A failed import leaves the
registry exactly as it was.

Every committed change moves the registry's serial forward and records, per licence, the serial
of its latest change (removals leave a tombstone). That is what the feed publishes (changes since
a serial), what the shared index (registry/index_store.py) is patched forward from, and what the checksum
in the feed is checked against: the sum of the per-filing digests (SHA-256 of the canonical
records) modulo 2^256, kept up to date by each change in the change's own transaction, so a change
costs time in proportion to its size, never to the registry's.

After each commit the shared index file is brought to the new serial before `apply` returns, so
the workers see the change at their next lookup.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiosqlite

from .filings import AccessRecord, AccessStatus, Filing, FilingStatus, SubjectType
from .index import DictIndex, IndexBuilder
from .index_store import IndexError_, SyncOutcome, sync_index
from .interchange import ParsedFiling, RecordError
from .staging import StagedFiling, staged

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
    # 2: per-filing digests, the serial and the change log the feed publishes and workers follow.
    """
    ALTER TABLE filings ADD COLUMN digest BLOB;
    CREATE INDEX filings_digest ON filings (licence, digest);
    CREATE TABLE changes (
        licence TEXT PRIMARY KEY,
        serial INTEGER NOT NULL,
        removed INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE INDEX changes_by_serial ON changes (serial);
    CREATE TABLE serials (
        serial INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        checksum TEXT NOT NULL,
        upserts INTEGER NOT NULL,
        removals INTEGER NOT NULL,
        source TEXT NOT NULL
    );
    CREATE TABLE state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        serial INTEGER NOT NULL,
        floor INTEGER NOT NULL,
        checksum TEXT NOT NULL,
        changed_at TEXT NOT NULL
    );
    INSERT INTO state VALUES (1, 0, 0, '', '');
    CREATE TABLE sync_status (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        status TEXT NOT NULL
    );
    """,
    # 3: the checksum becomes the sum of the digests modulo 2^256, updated incrementally
    # (computed once here; `_rebase_checksum`).
    "",
    # 4: the number of filings, kept by each change: counting 10M rows on every commit costs a second.
    "ALTER TABLE state ADD COLUMN filings INTEGER NOT NULL DEFAULT 0; UPDATE state SET filings = (SELECT COUNT(*)"
    " FROM filings)",
    # 5: the registry's identity, random, made once (`_give_identity`): the shared index names the
    # registry it was built from, so a registry deleted and re-created, or another one copied in, is
    # told from the one the gate serves (registry/index_store.py).
    "ALTER TABLE state ADD COLUMN registry_id TEXT NOT NULL DEFAULT ''",
)
CHECKSUM_MODULUS = 1 << 256

_STAGING = """
DROP TABLE IF EXISTS temp.stage_filings; DROP TABLE IF EXISTS temp.stage_domains;
DROP TABLE IF EXISTS temp.stage_access;
CREATE TEMP TABLE stage_filings (
    line INTEGER NOT NULL, licence TEXT NOT NULL, subject_licence TEXT, subject_name TEXT,
    subject_type TEXT, site_name TEXT, status TEXT, limit_access INTEGER, updated_at TEXT, extra TEXT,
    digest BLOB);
CREATE TEMP TABLE stage_domains (line INTEGER NOT NULL, licence TEXT NOT NULL, name TEXT NOT NULL);
CREATE TEMP TABLE stage_access (licence TEXT NOT NULL, provider TEXT, status TEXT, ips TEXT);
DROP TABLE IF EXISTS temp.stage_removals; DROP TABLE IF EXISTS temp.gone;
CREATE TEMP TABLE stage_removals (licence TEXT PRIMARY KEY);
"""
_STAGING_INDEXES = (
    "CREATE INDEX stage_filings_licence ON stage_filings (licence)",
    "CREATE INDEX stage_domains_name ON stage_domains (name)",
)
_STAGE_BATCH = 5000
MAX_REPORTED_ERRORS = 1000
MAX_LISTED_CHANGES = 1000  # licences listed per kind in a report; the counts are always whole


@dataclass(frozen=True, slots=True)
class Update:
    """What to apply: parsed filings, plus what the rest of the registry should become.

    `replace`: the filings are the whole registry (a snapshot); stored ones not among them are
    removed. `removals`: licences to remove (a change set). `serial`: the serial to record (a
    feed's); None moves the local serial on by one. `checksum`: what the registry's checksum must
    be afterwards, or the update is refused.
    """

    items: Iterable[ParsedFiling | StagedFiling | RecordError]
    source: str
    fmt: str
    replace: bool = False
    removals: Sequence[str] = ()
    serial: int | None = None
    checksum: str | None = None


@dataclass(frozen=True, slots=True)
class Guard:
    """The mass-change guard (docs/cli.md): what an update may change of a registry at once.

    Removals are guarded at every size, because a removal blocks a filed site: an update may remove
    at most `share` of the filings (one filing always, so a small registry can lose a withdrawn
    filing), and never every filing. Additions only open sites, and a small registry is still
    being filled: more than `share` is refused once the registry holds `min_filings` or more.
    """

    share: float
    min_filings: int


class Refusal(StrEnum):
    """Why a well-formed update was not applied (record errors are reported separately)."""

    GUARD = "guard"
    CHECKSUM = "checksum"
    ROLLBACK = "rollback"


@dataclass
class ImportReport:
    source: str
    records: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0
    errors: list[RecordError] = field(default_factory=list)
    error_count: int = 0
    warnings: list[str] = field(default_factory=list)
    committed: bool = False
    refused: Refusal | None = None
    refusal: str = ""  # what the refusal is about, in words
    forced: str = ""  # what the guard would have refused, when `force` applied it anyway
    serial: int = 0  # the registry's serial afterwards (before, when nothing was committed)
    checksum: str = ""
    filings_before: int = 0
    listed: dict[str, list[str]] = field(default_factory=dict)  # added/changed/removed licences (capped)
    index_note: str = ""  # committed, but the index the gate serves was not brought to it (why)

    def add_error(self, error: RecordError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)


@dataclass(frozen=True, slots=True)
class RegistryState:
    serial: int
    floor: int  # changes since a serial below this one are no longer known (tombstones pruned)
    checksum: str
    changed_at: str
    filings: int
    registry_id: str  # made when the registry was created (schema 5): which registry this is


class Registry:
    """One open registry database."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self.inode = _inode(path)  # of the file opened: `follow` notices another one at the path
        self._following = asyncio.Lock()
        # One transaction at a time on the connection: coroutines sharing this Registry (the admin
        # API's concurrent requests, the feed client) take turns; `_turn` says whose it is.
        self._turns = asyncio.Lock()
        self._holder: asyncio.Task | None = None

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """The connection to this task alone until the block ends; a nested call from the task that
        holds it goes on. Without it, two requests reading at once both began a transaction, and the
        second failed ("cannot start a transaction within a transaction"): a 500 from /readyz."""
        task = asyncio.current_task()
        if self._holder is task:
            yield
            return
        async with self._turns:
            self._holder = task
            try:
                yield
            finally:
                self._holder = None

    def replaced(self) -> bool:
        """True when the file at the path is not the one open here (deleted, or another moved in)."""
        return _inode(self.path) != self.inode

    async def follow(self, *, create: bool = False, sync_status: dict | None = None) -> bool:
        """Reopen the registry at the path when the file there is not the one open here; without
        `create`, a path with nothing at it keeps the open one. True when it reopened.

        `sync_status`, when given, goes into the registry followed. One created here appears at the
        path whole, with it already in it: the admin API reads the file as soon as it is there, and a
        feed check of a registry that never synced says "expired" (a 503 from /readyz, which inline
        routes the hosted ranges around). One found there (moved in by hand) gets it written."""
        async with self._following, self._turn():
            if not self.replaced() or (not create and _inode(self.path) is None):
                return False
            made = _inode(self.path) is None and await _place_new(self.path, sync_status or {})
            db = await _connect(self.path)
            old, self.db, self.inode = self.db, db, _inode(self.path)  # in its turn: no read is open
            await old.close()
            if sync_status is not None and not made:
                await self.set_sync_status(sync_status)
            return True

    async def import_filings(
        self,
        items: Iterable[ParsedFiling | StagedFiling | RecordError],
        *,
        source: str,
        fmt: str,
        skip_invalid: bool = False,
        progress: Callable[[int], None] | None = None,
        replace: bool = False,
        guard: Guard | None = None,
        force: bool = False,
        dry_run: bool = False,
    ) -> ImportReport:
        """A local import (`icpgate import`): the serial moves on by one if anything changed.

        The feed's guard applies here too: a one-line file given to `--replace` must not empty a
        registry that edges follow. `force` goes past it, and the override is recorded with the import.
        """
        return await self.apply(Update(items, source, fmt, replace=replace), skip_invalid=skip_invalid,
                                progress=progress, guard=guard, force=force, dry_run=dry_run)  # fmt: skip

    async def apply(self, update: Update, **options: Any) -> ImportReport:
        """Apply an update as one transaction, in this connection's turn (`_apply` has the options)."""
        async with self._turn():
            return await self._apply(update, **options)

    async def _apply(
        self,
        update: Update,
        *,
        skip_invalid: bool = False,
        progress: Callable[[int], None] | None = None,
        guard: Guard | None = None,
        force: bool = False,
        dry_run: bool = False,
    ) -> ImportReport:
        """Apply an update as one transaction; see the module docstring and `Update`.

        `force`: what `guard` refuses is applied anyway, and the report's `forced` says what it was.
        `dry_run` goes as far as the commit, reports what would change, and rolls back.
        """
        report = ImportReport(update.source)
        started = _now()
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            state = await self._state()
            report.serial, report.checksum, report.filings_before = state.serial, state.checksum, state.filings
            if update.serial == state.serial and update.checksum == state.checksum:
                await self.db.execute("ROLLBACK")  # already applied (by another process): nothing to do
                return report
            if update.serial is not None and update.serial <= state.serial:
                return await self._refuse(report, Refusal.ROLLBACK, "serial %d is not after the registry's %d"
                                          % (update.serial, state.serial))  # fmt: skip
            for statement in _STAGING.split(";"):
                if statement.strip():
                    await self.db.execute(statement)
            await self.db.executemany("INSERT OR IGNORE INTO stage_removals VALUES (?)",
                                      [(licence,) for licence in update.removals])  # fmt: skip
            unparsed = await self._stage(update.items, report, progress)
            conflicts = await self._conflicts(update.replace)
            for error in conflicts:
                report.add_error(error)
            if report.error_count and not skip_invalid:
                await self.db.execute("ROLLBACK")
                return report
            dropped = await self._drop_lines({error.line for error in conflicts})
            report.records -= dropped
            report.skipped = unparsed + dropped
            await self._classify(report, update.replace)
            if guard and (message := _guard_breach(guard, report)):
                if not force:
                    return await self._refuse(report, Refusal.GUARD, message)
                report.forced = message
            if dry_run:
                await self.db.execute("ROLLBACK")
                return report
            delta = await self._checksum_delta()
            await self._merge()
            source = update.source + (" (guard overridden: %s)" % report.forced if report.forced else "")
            changed = report.inserted + report.updated + report.removed
            if changed or update.serial is not None:
                serial = state.serial + 1 if update.serial is None else update.serial
                checksum = _checksum_hex(int(state.checksum or "0", 16) + delta)
                await self._log_changes(serial, checksum, report, source)
                if update.checksum is not None and checksum != update.checksum:
                    return await self._refuse(report, Refusal.CHECKSUM, "the registry's checksum would be %s, the"
                                              " update says %s" % (checksum, update.checksum))  # fmt: skip
                report.serial, report.checksum = serial, checksum
            await self.db.execute(
                "INSERT INTO imports (source, format, started_at, finished_at, records, inserted, updated, skipped)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (source, update.fmt, started, _now(), report.records, report.inserted, report.updated,
                 report.skipped),
            )  # fmt: skip
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        report.committed = True
        if report.serial != state.serial:
            try:
                report.index_note = (await self.sync_index()).kept
            except IndexError_ as error:  # the workers bring it forward within registry.reload_interval
                report.index_note = "the index could not be written: %s" % error
        return report

    async def sync_index(self, *, rebuild: bool = False, adopt: bool = False) -> SyncOutcome:
        """Bring the shared index to the registry's serial (in a thread: it may wait for another
        writer, and a rebuild takes a while). `adopt`: even from another registry, or backwards."""
        return await asyncio.to_thread(sync_index, self.path, rebuild=rebuild, adopt=adopt)

    async def _refuse(self, report: ImportReport, refused: Refusal, message: str) -> ImportReport:
        await self.db.execute("ROLLBACK")
        report.refused, report.refusal = refused, message
        return report

    async def _stage(self, items, report: ImportReport, progress) -> int:
        """Stage parsed records in batches; each batch is written while the next one is parsed.
        Returns how many records were refused (a record may have several errors)."""
        filings, domains, access = [], [], []
        refused_lines: set[int] = set()
        writing: asyncio.Future | None = None
        for item in items:
            if isinstance(item, RecordError):
                report.add_error(item)
                refused_lines.add(item.line)
                continue
            if not isinstance(item, StagedFiling):
                item = staged(item)
            report.records += 1
            report.warnings.extend("line %d: %s" % (item.line, w) for w in item.warnings)
            filings.append(item.filing)
            domains.extend(item.domains)
            access.extend(item.access)
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
        return len(refused_lines)

    async def _flush_stage(self, filings: list, domains: list, access: list) -> None:
        await self.db.executemany("INSERT INTO stage_filings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", filings)
        await self.db.executemany("INSERT INTO stage_domains VALUES (?, ?, ?)", domains)
        await self.db.executemany("INSERT INTO stage_access VALUES (?, ?, ?, ?)", access)

    async def _conflicts(self, replace: bool) -> list[RecordError]:
        """Duplicates inside the file, and domains that another stored filing keeps (unless that
        filing goes: every stored filing outside a replacing update, and removed licences)."""
        queries = [
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
        ]
        if not replace:
            queries.append(
                "SELECT s.line, 'domains', 'domain ' || s.name || ' is already filed under ' || f.licence"
                " FROM stage_domains s JOIN domains d ON d.name = s.name JOIN filings f ON f.id = d.filing_id"
                " WHERE f.licence != s.licence AND f.licence NOT IN (SELECT licence FROM stage_filings)"
                " AND f.licence NOT IN (SELECT licence FROM stage_removals)"
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

    async def _classify(self, report: ImportReport, replace: bool) -> None:
        """Count (and list) what the update adds, changes and removes; unstage what it leaves as is."""
        # What goes is decided before unchanged filings are unstaged: they stay.
        going = "SELECT licence FROM stage_removals WHERE licence IN (SELECT licence FROM filings)"
        if replace:
            going = "SELECT licence FROM filings"
        await self.db.execute(
            "CREATE TEMP TABLE gone AS %s EXCEPT SELECT licence FROM stage_filings ORDER BY 1" % going
        )
        same = "SELECT s.licence FROM stage_filings s JOIN filings f USING (licence) WHERE f.digest = s.digest"
        await self.db.execute("DELETE FROM stage_access WHERE licence IN (%s)" % same)
        await self.db.execute("DELETE FROM stage_domains WHERE licence IN (%s)" % same)
        async with self.db.execute("DELETE FROM stage_filings WHERE licence IN (%s)" % same) as cursor:
            report.unchanged = cursor.rowcount
        lists = {
            "added": "SELECT licence FROM stage_filings WHERE licence NOT IN (SELECT licence FROM filings)",
            "changed": "SELECT licence FROM stage_filings WHERE licence IN (SELECT licence FROM filings)",
            "removed": "SELECT licence FROM gone",
        }
        counts = {}
        for kind, query in lists.items():
            async with self.db.execute("SELECT COUNT(*) FROM (%s)" % query) as cursor:
                (counts[kind],) = await cursor.fetchone()
            async with self.db.execute(query + " ORDER BY 1 LIMIT %d" % MAX_LISTED_CHANGES) as cursor:
                report.listed[kind] = [licence for (licence,) in await cursor.fetchall()]
        report.inserted, report.updated, report.removed = counts["added"], counts["changed"], counts["removed"]

    async def _merge(self) -> None:
        replaced = "SELECT id FROM filings WHERE licence IN (SELECT licence FROM stage_filings)"
        await self.db.execute("DELETE FROM domains WHERE filing_id IN (%s)" % replaced)
        await self.db.execute("DELETE FROM access WHERE filing_id IN (%s)" % replaced)
        await self.db.execute(
            "INSERT INTO filings (licence, subject_licence, subject_name, subject_type, site_name, status,"
            " limit_access, updated_at, extra, digest)"
            " SELECT licence, subject_licence, subject_name, subject_type, site_name, status, limit_access,"
            " updated_at, extra, digest FROM stage_filings WHERE true"
            " ON CONFLICT (licence) DO UPDATE SET subject_licence = excluded.subject_licence,"
            " subject_name = excluded.subject_name, subject_type = excluded.subject_type,"
            " site_name = excluded.site_name, status = excluded.status, limit_access = excluded.limit_access,"
            " updated_at = excluded.updated_at, extra = excluded.extra, digest = excluded.digest"
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
        await self.db.execute("DELETE FROM filings WHERE licence IN (SELECT licence FROM gone)")  # cascades

    async def _checksum_delta(self) -> int:
        """What the staged change adds to the checksum: new digests in, replaced and removed ones out.
        Run before `_merge`, while the stored digests are still the old ones."""
        added = await self._digest_sum("SELECT digest FROM stage_filings")
        replaced = await self._digest_sum(
            "SELECT digest FROM filings WHERE licence IN (SELECT licence FROM stage_filings)"
            " UNION ALL SELECT digest FROM filings WHERE licence IN (SELECT licence FROM gone)"
        )
        return added - replaced

    async def _digest_sum(self, query: str) -> int:
        total = 0
        async with self.db.execute(query) as cursor:
            while rows := await cursor.fetchmany(20000):
                total += sum(int.from_bytes(digest) for (digest,) in rows)
        return total

    async def _log_changes(self, serial: int, checksum: str, report: ImportReport, source: str) -> None:
        """Record the new serial, its checksum and what it changed."""
        await self.db.execute("INSERT OR REPLACE INTO changes SELECT licence, ?, 0 FROM stage_filings", (serial,))
        await self.db.execute("INSERT OR REPLACE INTO changes SELECT licence, ?, 1 FROM gone", (serial,))
        now = _now()
        await self.db.execute("UPDATE state SET serial = ?, checksum = ?, changed_at = ?, filings = filings + ?",
                              (serial, checksum, now, report.inserted - report.removed))  # fmt: skip
        await self.db.execute(
            "INSERT OR REPLACE INTO serials VALUES (?, ?, ?, ?, ?, ?)",
            (serial, now, checksum, report.inserted + report.updated, report.removed, source),
        )

    async def _checksum(self) -> str:
        """The checksum recomputed over every filing (docs/feed-protocol.md): what the
        incremental one must always equal."""
        return _checksum_hex(await self._digest_sum("SELECT digest FROM filings"))

    async def _state(self) -> RegistryState:
        query = "SELECT serial, floor, checksum, changed_at, filings, registry_id FROM state"
        async with self.db.execute(query) as cursor:
            return RegistryState(*await cursor.fetchone())

    async def state(self) -> RegistryState:
        """Serial, checksum and size as of the last commit."""
        async with self._read():
            return await self._state()

    async def verify_checksum(self) -> tuple[str, str]:
        """(recorded, recomputed) checksum: they differ only if the database was changed behind icpgate."""
        async with self._read():
            state = await self._state()
            return state.checksum, await self._checksum()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[None]:
        """One read transaction: every query inside sees the same commit."""
        async with self._turn():
            if self.db.in_transaction:  # inside this task's own write transaction
                yield
                return
            await self.db.execute("BEGIN")
            try:
                yield
            finally:
                await self.db.execute("COMMIT")

    async def changes_since(self, serial: int) -> tuple[RegistryState, list[tuple[str, Filing | None]]]:
        """The state, and each licence changed after `serial` with its filing now (None: removed),
        oldest change first. The caller checks `serial` against the state's floor."""
        async with self._read():
            state = await self._state()
            changes = []
            async for licence, filing in self._changed_records(serial):
                changes.append((licence, filing))
            return state, changes

    async def _changed_records(self, serial: int) -> AsyncIterator[tuple[str, Filing | None]]:
        query = _RECORDS.replace("FROM filings f", "FROM changes c LEFT JOIN filings f USING (licence)")
        query = query.replace("SELECT f.id, f.licence", "SELECT f.id, c.licence")
        async for row in self._rows(query + " WHERE c.serial > ? ORDER BY c.serial, c.licence", (serial,)):
            yield row[1], (_filing_from_row(row) if row[0] is not None else None)

    async def records(self) -> AsyncIterator[Filing]:
        """Every filing in licence order, for snapshots. Run inside `snapshot_read`."""
        async for row in self._rows(_RECORDS + " ORDER BY f.licence", ()):
            yield _filing_from_row(row)

    @asynccontextmanager
    async def snapshot_read(self) -> AsyncIterator[RegistryState]:
        """A read transaction for `records`, yielding the state the records belong to."""
        async with self._read():
            yield await self._state()

    async def prune_history(self, before: str) -> int:
        """Forget removals recorded before `before` (RFC 3339): changes since older serials can no
        longer be told, so the floor rises to the newest forgotten serial. Returns the floor."""
        async with self._turn():
            return await self._prune_history(before)

    async def _prune_history(self, before: str) -> int:
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            async with self.db.execute("SELECT COALESCE(MAX(serial), 0) FROM serials WHERE at < ?", (before,)) as cur:
                (newest_old,) = await cur.fetchone()
            await self.db.execute("DELETE FROM changes WHERE removed = 1 AND serial <= ?", (newest_old,))
            await self.db.execute("DELETE FROM serials WHERE serial < ?", (newest_old,))
            await self.db.execute("UPDATE state SET floor = MAX(floor, ?)", (newest_old,))
            async with self.db.execute("SELECT floor FROM state") as cursor:
                (floor,) = await cursor.fetchone()
            await self.db.execute("COMMIT")
            return floor
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def sync_status(self) -> dict:
        """What the feed client last recorded (docs/feed-protocol.md): {} before the first sync."""
        async with self.db.execute("SELECT status FROM sync_status") as cursor:
            row = await cursor.fetchone()
        return json.loads(row[0]) if row else {}

    async def set_sync_status(self, status: dict) -> None:
        await _write_sync_status(self.db, status)

    async def load_index(self) -> DictIndex:
        """The whole index built in this process's memory: the reference the shared index is
        checked against, and the measure of what it saves (bench/registry_bench.py)."""
        async with self._read():
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

    async def filings_with_access(self, provider: str, after: str, limit: int) -> list[tuple[str, str, str, str, list]]:
        """(licence, site name, subject name, our access status, domains) of the filings not
        deregistered whose access record names `provider` as active or in first review, in
        licence order after `after`: what site inspection resolves (docs/inspection.md)."""
        query = (
            "SELECT f.licence, f.site_name, f.subject_name, CASE WHEN max(a.status = 'active') THEN 'active'"
            " ELSE 'first_review' END, (SELECT group_concat(name, ' ') FROM domains WHERE filing_id = f.id)"
            " FROM filings f JOIN access a ON a.filing_id = f.id WHERE a.provider = ? AND a.status IN"
            " ('active', 'first_review') AND f.status != 'deregistered' AND f.licence > ?"
            " GROUP BY f.id ORDER BY f.licence LIMIT ?"
        )
        async with self.db.execute(query, (provider, after, limit)) as cursor:
            rows = await cursor.fetchall()
        return [(licence, site, subject, access, sorted((domains or "").split()))
                for licence, site, subject, access, domains in rows]  # fmt: skip

    async def get_filing(self, licence: str) -> Filing | None:
        """The full stored record, for explanations and the admin side."""
        async with self.db.execute(_RECORDS + " WHERE f.licence = ?", (licence,)) as cursor:
            row = await cursor.fetchone()
        return _filing_from_row(row) if row else None


# Whole filings, one row each: domains space-separated, access records one a line (tab-separated).
_RECORDS = (
    "SELECT f.id, f.licence, f.subject_licence, f.subject_name, f.subject_type, f.site_name, f.status,"
    " f.limit_access, f.updated_at, f.extra,"
    " (SELECT group_concat(name, ' ') FROM domains WHERE filing_id = f.id),"
    " (SELECT group_concat(a.provider || char(9) || a.status || char(9) || a.ips, char(10))"
    "  FROM access a WHERE a.filing_id = f.id)"
    " FROM filings f"
)


def _filing_from_row(row: tuple) -> Filing:
    access = []
    for line in (row[11] or "").split("\n"):
        if line:
            provider, status, ips = line.split("\t")
            access.append(AccessRecord(provider, AccessStatus(status), tuple(ips.split())))
    return Filing(
        licence=row[1], subject_licence=row[2], subject_name=row[3], subject_type=SubjectType(row[4]),
        site_name=row[5], status=FilingStatus(row[6]), limit_access=bool(row[7]),
        domains=tuple(sorted((row[10] or "").split())), access=tuple(access), updated_at=row[8],
        extra=json.loads(row[9]),
    )  # fmt: skip


def recompute(db: sqlite3.Connection) -> tuple[str, list[str]]:
    """The checksum recomputed from the filings themselves, each digest made afresh from its
    record, and the licences whose stored digest differs: what a backup and a restore check a
    registry file with (backup/database.py), in a read transaction the caller holds."""
    total, differing = 0, []
    cursor = db.execute(_RECORDS.replace(" FROM filings f", ", f.digest FROM filings f"))
    while rows := cursor.fetchmany(5000):
        for row in rows:
            digest = _filing_from_row(row).digest()  # the stored digest is the row's last column
            total += int.from_bytes(digest)
            if digest != row[-1]:
                differing.append(row[1])
    return _checksum_hex(total), differing


def _guard_breach(guard: Guard, report: ImportReport) -> str:
    """Why the guard refuses this update, or "" when it passes."""
    size, removed, added = report.filings_before, report.removed, report.inserted
    if size and removed == size:
        if added:
            return "it would remove every filing (%d of %d) and add %d new in their place" % (size, size, added)
        return "it would remove every filing (%d of %d) and leave the registry empty" % (size, size)
    if removed > max(1.0, guard.share * size):
        return _over_share("remove", removed, size, guard)
    if size and size >= guard.min_filings and added > guard.share * size:
        return _over_share("add", added, size, guard)
    return ""


def _over_share(kind: str, count: int, size: int, guard: Guard) -> str:
    return "it would %s %d of %d filings (%.0f%%), more than the guard's %.0f%%" % (
        kind, count, size, 100 * count / size, 100 * guard.share)  # fmt: skip


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        (version,) = await cursor.fetchone()
    if version > len(MIGRATIONS):
        raise RegistryError("%s has schema version %d; this icpgate knows up to %d" % (path, version, len(MIGRATIONS)))
    for number in range(version, len(MIGRATIONS)):
        await db.execute("BEGIN IMMEDIATE")
        async with db.execute("PRAGMA user_version") as cursor:
            (now,) = await cursor.fetchone()
        if now > number:  # another process (a worker starting beside this one) applied it meanwhile
            await db.execute("ROLLBACK")
            continue
        for statement in MIGRATIONS[number].split(";"):
            if statement.strip():
                await db.execute(statement)
        if number == 1:
            await _start_change_log(Registry(db, path))
        if number == 2:
            await _rebase_checksum(Registry(db, path))
        if number == 4:
            await db.execute("UPDATE state SET registry_id = ?", (secrets.token_hex(16),))
        await db.execute("PRAGMA user_version = %d" % (number + 1))
        await db.execute("COMMIT")


async def _start_change_log(registry: Registry) -> None:
    """Migration 2, inside its transaction: digest the filings already stored; they make serial 1."""
    rows = [(_filing_from_row(row).digest(), row[0]) async for row in registry._rows(_RECORDS, ())]
    await registry.db.executemany("UPDATE filings SET digest = ? WHERE id = ?", rows)
    serial = 1 if rows else 0
    await registry.db.execute("INSERT INTO changes SELECT licence, ?, 0 FROM filings", (serial,))
    checksum = ""  # migration 3 computes it
    await registry.db.execute("UPDATE state SET serial = ?, checksum = ?, changed_at = ?", (serial, checksum, _now()))
    if serial:
        await registry.db.execute(
            "INSERT INTO serials VALUES (1, ?, ?, ?, 0, 'schema migration')", (_now(), checksum, len(rows))
        )


async def _rebase_checksum(registry: Registry) -> None:
    """Migration 3, inside its transaction: the checksum as a sum of digests, computed once; from
    here on each change updates it. (Older serials keep the checksum they were published with.)"""
    checksum = await registry._checksum()
    await registry.db.execute("UPDATE state SET checksum = ?", (checksum,))
    await registry.db.execute("UPDATE serials SET checksum = ? WHERE serial = (SELECT serial FROM state)", (checksum,))


def _checksum_hex(total: int) -> str:
    return "%064x" % (total % CHECKSUM_MODULUS)


class RegistryError(RuntimeError):
    """The registry database cannot be used (wrong schema, unreadable file)."""


def require_registry(path: Path) -> None:
    """Raise the one clear error for a registry that is not there yet."""
    if not path.is_file():
        raise RegistryError("registry %s does not exist: import filings first (icpgate import), or use the config"
                            " the daemon runs with" % path)  # fmt: skip


@asynccontextmanager
async def open_registry(path: Path, *, create: bool = True) -> AsyncIterator[Registry]:
    """Open the registry at `path`, migrating it; create it unless `create` is False."""
    if not create:
        require_registry(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    registry = Registry(await _connect(path), path)
    try:
        yield registry
    finally:
        await registry.db.close()  # the one open now: `follow` may have replaced the first


async def _connect(path: Path) -> aiosqlite.Connection:
    """A connection to the registry at `path`, created and migrated as needed."""
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except Exception as error:  # sqlite3 raises OperationalError for unopenable paths
        raise RegistryError("cannot open registry %s: %s" % (path, error)) from error
    try:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA temp_store = MEMORY")
        # Up to 512 MiB of page cache, allocated only as used: a bulk import merges millions of rows
        # into four B-trees, and with the default 2 MiB each insert goes back to the file.
        await db.execute("PRAGMA cache_size = -524288")
        await _migrate(db, path)
    except BaseException:
        await db.close()
        raise
    return db


async def _write_sync_status(db: aiosqlite.Connection, status: dict) -> None:
    await db.execute("INSERT OR REPLACE INTO sync_status VALUES (1, ?)", (json.dumps(status, ensure_ascii=False),))


async def _place_new(path: Path, sync_status: dict) -> bool:
    """Make a registry beside `path` with its sync status, then link it there: no reader finds it
    half made. A file someone else put at the path meanwhile (`icpgate import`) is kept: False."""
    staging = path.with_name(".%s.new-%d" % (path.name, os.getpid()))
    try:
        for leftover in _with_journals(staging):  # of a process killed here
            leftover.unlink(missing_ok=True)
        db = await _connect(staging)
        try:
            await _write_sync_status(db, sync_status)
            await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all of it in the file that is linked
        finally:
            await db.close()
        try:
            os.link(staging, path)  # unlike a rename, never over another file
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a rename, unless a file came meanwhile
            if _inode(path) is not None:
                return False
            os.rename(staging, path)
        return True
    finally:
        for staged in _with_journals(staging):
            staged.unlink(missing_ok=True)


def _with_journals(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
