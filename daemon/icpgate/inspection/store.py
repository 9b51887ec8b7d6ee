"""The inspection history in its own SQLite file: the latest class of each filing domain, the first
and last time it was seen in each class, and the passes, with the cursor a pass resumes from.

A file of its own, beside the registry: a pass writes for hours, and neither the registry's
writers nor the violation log's should wait behind it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from .classify import LIVE, STATE_GRACE, STATE_HOLLOW, STATE_LIVE, STATE_UNKNOWN

SCHEMA = """
CREATE TABLE IF NOT EXISTS filings (
    licence TEXT PRIMARY KEY,
    site_name TEXT NOT NULL,
    subject_name TEXT NOT NULL,
    access TEXT NOT NULL,           -- our access record's status: active or first_review
    first_inspected REAL NOT NULL,
    pass INTEGER NOT NULL           -- the last pass that inspected it
);
CREATE TABLE IF NOT EXISTS domains (
    domain TEXT PRIMARY KEY,
    licence TEXT NOT NULL,
    class TEXT NOT NULL,            -- the latest: hosted, indirect, elsewhere, unresolved or error
    detail TEXT NOT NULL,
    addresses TEXT NOT NULL,        -- JSON list
    checked_at REAL NOT NULL,
    last_live REAL,                 -- last seen hosted or indirect; NULL: never
    pass INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS domains_by_licence ON domains (licence);
CREATE TABLE IF NOT EXISTS seen (
    domain TEXT NOT NULL,
    class TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (domain, class)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS passes (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    session_started REAL NOT NULL,  -- this pass was last started or resumed at
    finished REAL,
    state TEXT NOT NULL CHECK (state IN ('running', 'paused', 'done')),
    cursor TEXT NOT NULL DEFAULT '', -- the last licence done, in licence order
    filings INTEGER NOT NULL DEFAULT 0,
    domains INTEGER NOT NULL DEFAULT 0,
    queries INTEGER NOT NULL DEFAULT 0
);
"""

# Per filing: live now, an error now, the last time live, first inspected; the states follow in SQL.
_FILING_STATES = """
SELECT f.licence, f.site_name, f.subject_name, f.access, max(d.class IN (%s)) AS live_now,
       max(d.class = 'error') AS error_now, coalesce(max(d.last_live), f.first_inspected) AS since
FROM filings f JOIN domains d USING (licence) GROUP BY f.licence
""" % ", ".join("'%s'" % klass for klass in sorted(LIVE))
_STATE = """CASE WHEN live_now THEN '%s' WHEN :now - since < :grace THEN '%s'
    WHEN error_now THEN '%s' ELSE '%s' END""" % (STATE_LIVE, STATE_GRACE, STATE_UNKNOWN, STATE_HOLLOW)


@dataclass(frozen=True, slots=True)
class Pass:
    id: int
    started: float
    session_started: float
    finished: float | None
    state: str
    cursor: str
    filings: int
    domains: int
    queries: int

    def to_json(self) -> dict:
        return {"id": self.id, "started": self.started, "finished": self.finished, "state": self.state,
                "filings": self.filings, "domains": self.domains, "queries": self.queries}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DomainResult:
    domain: str
    licence: str
    klass: str
    detail: str
    addresses: tuple[str, ...]


class InspectionStore:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    async def last_pass(self) -> Pass | None:
        async with self.db.execute("SELECT * FROM passes ORDER BY id DESC LIMIT 1") as cursor:
            row = await cursor.fetchone()
        return Pass(*row) if row else None

    async def last_complete(self) -> float | None:
        """When the last pass that went through every filing finished."""
        async with self.db.execute("SELECT max(finished) FROM passes WHERE state = 'done'") as cursor:
            (finished,) = await cursor.fetchone()
        return finished

    async def start_pass(self, now: float) -> Pass:
        """Resume the last pass if it did not finish (a restart, or max_run_time), else begin one."""
        last = await self.last_pass()
        if last is not None and last.state != "done":
            await self.db.execute("UPDATE passes SET state = 'running', session_started = ? WHERE id = ?",
                                  (now, last.id))  # fmt: skip
        else:
            await self.db.execute("INSERT INTO passes (started, session_started, state) VALUES (?, ?, 'running')",
                                  (now, now))  # fmt: skip
        return await self.last_pass()

    async def record(self, run: Pass, filings: list[tuple[str, str, str, str]], results: list[DomainResult],
                     cursor: str, queries: int, now: float) -> None:  # fmt: skip
        """One batch of filings (licence, site, subject, access) and their domains' results, and the
        cursor past them, in one transaction: a pass interrupted anywhere resumes after the last batch."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany(
                "INSERT INTO filings VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (licence) DO UPDATE SET"
                " site_name = excluded.site_name, subject_name = excluded.subject_name, access = excluded.access,"
                " pass = excluded.pass",
                [(*filing, now, run.id) for filing in filings],
            )
            live = [(result.domain, now) for result in results if result.klass in LIVE]
            await self.db.executemany(
                "INSERT INTO domains VALUES (?, ?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (domain) DO UPDATE SET"
                " licence = excluded.licence, class = excluded.class, detail = excluded.detail,"
                " addresses = excluded.addresses, checked_at = excluded.checked_at, pass = excluded.pass",
                [(r.domain, r.licence, r.klass, r.detail, json.dumps(r.addresses), now, run.id) for r in results],
            )
            await self.db.executemany("UPDATE domains SET last_live = ? WHERE domain = ?",
                                      [(at, domain) for domain, at in live])  # fmt: skip
            await self.db.executemany(
                "INSERT INTO seen VALUES (?, ?, ?, ?) ON CONFLICT (domain, class) DO UPDATE SET"
                " last_seen = excluded.last_seen",
                [(r.domain, r.klass, now, now) for r in results],
            )
            await self.db.execute(
                "UPDATE passes SET cursor = ?, filings = filings + ?, domains = domains + ?, queries = queries + ?"
                " WHERE id = ?",
                (cursor, len(filings), len(results), queries, run.id),
            )
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")

    async def end_session(self, run: Pass, *, done: bool, now: float) -> None:
        """Pause the pass, or finish it: then what it did not reach is no longer ours, and is forgotten."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            if done:
                await self.db.execute("DELETE FROM filings WHERE pass < ?", (run.id,))
                await self.db.execute("DELETE FROM domains WHERE pass < ? OR licence NOT IN (SELECT licence FROM"
                                      " filings)", (run.id,))  # fmt: skip
                await self.db.execute("DELETE FROM seen WHERE domain NOT IN (SELECT domain FROM domains)")
            await self.db.execute("UPDATE passes SET state = ?, finished = ? WHERE id = ?",
                                  ("done" if done else "paused", now if done else None, run.id))  # fmt: skip
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")

    async def counts(self, now: float, grace: float) -> tuple[dict[str, int], dict[str, int]]:
        """(domains by class, filings by state)."""
        async with self.db.execute("SELECT class, count(*) FROM domains GROUP BY class") as cursor:
            classes = dict(await cursor.fetchall())
        sql = "SELECT %s, count(*) FROM (%s) GROUP BY 1" % (_STATE, _FILING_STATES)
        async with self.db.execute(sql, {"now": now, "grace": grace}) as cursor:
            states = dict(await cursor.fetchall())
        return classes, states

    async def filings(self, states: tuple[str, ...], now: float, grace: float, limit: int,
                      offset: int = 0) -> tuple[int, list[dict]]:  # fmt: skip
        """(total, one page) of the filings in `states`, hollow the longest first, with their domains."""
        marks = ", ".join("?" * len(states))
        base = "SELECT *, %s AS state FROM (%s)" % (_STATE.replace(":now", "?").replace(":grace", "?"), _FILING_STATES)
        where = "WHERE state IN (%s)" % marks
        params = [now, grace, *states]
        async with self.db.execute("SELECT count(*) FROM (%s) %s" % (base, where), params) as cursor:
            (total,) = await cursor.fetchone()
        sql = "SELECT * FROM (%s) %s ORDER BY since, licence LIMIT ? OFFSET ?" % (base, where)
        async with self.db.execute(sql, [*params, limit, offset]) as cursor:
            rows = await cursor.fetchall()
        items = []
        for row in rows:
            items.append({"licence": row["licence"], "site_name": row["site_name"],
                          "subject_name": row["subject_name"], "access": row["access"], "state": row["state"],
                          "since": row["since"], "domains": await self._domains(row["licence"])})  # fmt: skip
        return total, items

    async def _domains(self, licence: str) -> list[dict]:
        sql = """SELECT d.*, s.first_seen AS class_since FROM domains d
                 JOIN seen s ON s.domain = d.domain AND s.class = d.class WHERE d.licence = ? ORDER BY d.domain"""
        async with self.db.execute(sql, (licence,)) as cursor:
            return [{"domain": row["domain"], "class": row["class"], "detail": row["detail"],
                     "addresses": json.loads(row["addresses"]), "checked_at": row["checked_at"],
                     "class_since": row["class_since"], "last_live": row["last_live"]}
                    for row in await cursor.fetchall()]  # fmt: skip

    async def written_after(self, mark: tuple[int, str], limit: int) -> Written:
        """Up to `limit` filings written after `mark` (pass, licence), with their domains and those
        domains' history, in one read snapshot. Passes write their filings in (pass, licence) order,
        so the last one returned is a high-water mark: the fleet's shipper resumes after it."""
        await self.db.execute("BEGIN")
        try:
            async with self.db.execute("SELECT * FROM filings WHERE (pass, licence) > (?, ?) ORDER BY pass, licence"
                                       " LIMIT ?", (*mark, limit)) as cursor:  # fmt: skip
                filings = [dict(row) for row in await cursor.fetchall()]
            licences = json.dumps([filing["licence"] for filing in filings])
            async with self.db.execute("SELECT * FROM domains WHERE licence IN (SELECT value FROM json_each(?))",
                                       (licences,)) as cursor:  # fmt: skip
                domains = [dict(row) for row in await cursor.fetchall()]
            async with self.db.execute("SELECT s.* FROM seen s JOIN domains d USING (domain) WHERE d.licence IN"
                                       " (SELECT value FROM json_each(?))", (licences,)) as cursor:  # fmt: skip
                seen = [dict(row) for row in await cursor.fetchall()]
            last = await self.last_pass()
            async with self.db.execute("SELECT id, finished FROM passes WHERE state = 'done' ORDER BY id DESC"
                                       " LIMIT 1") as cursor:  # fmt: skip
                done = await cursor.fetchone()
        finally:
            await self.db.execute("COMMIT")
        return Written(filings, domains, seen, last, tuple(done) if done else None)


@dataclass(frozen=True, slots=True)
class Written:
    """What `written_after` read: rows as dicts, the last pass, and the last complete one's (id, finished)."""

    filings: list[dict]
    domains: list[dict]
    seen: list[dict]
    last: Pass | None
    done: tuple[int, float] | None


@asynccontextmanager
async def open_inspection(path: Path) -> AsyncIterator[InspectionStore]:
    """Open (creating) the inspection history at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA busy_timeout = 10000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.executescript(SCHEMA)
        yield InspectionStore(db, path)
    finally:
        await db.close()
