"""The violation log in SQLite: batched upserts from the workers, queries for the CLI and the API.

It is a file of its own, not a table in the registry: a feed snapshot holds the registry's write
lock for a minute, and violation writes must never wait behind it, nor wake the workers that
follow the registry's changes. Several workers write to it; WAL and a busy timeout serialise them.

Hosts come from clients: they are stored with their control characters escaped
(telemetry/printable.py), and escaped again as records are read, for a log an older version wrote,
so that no reader (the CLI's table and exports, the status page, the admin API) gets a raw one.

Every write moves a record's `change_seq` past all others (triggers, so no writer can forget):
the fleet's shipper sends what changed after the mark the central store holds (docs/fleet.md).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from ..names.suffixes import registrable_domain
from ..telemetry.printable import printable, printable_name
from .customers import Customer, CustomerMap

SCHEMA = """
CREATE TABLE IF NOT EXISTS violations (
    id INTEGER PRIMARY KEY,
    domain TEXT NOT NULL,           -- the registrable domain; '' for junk, overflow and public suffixes
    host TEXT NOT NULL,
    ip TEXT NOT NULL,
    port INTEGER NOT NULL,
    proto TEXT NOT NULL,
    reason TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    count INTEGER NOT NULL,
    passed INTEGER NOT NULL DEFAULT 0,  -- of count, let through by a stale-feed mode
    client TEXT,
    dns_state TEXT,                 -- NULL until checked: confirmed, not_hosted or error
    dns_addresses TEXT,             -- JSON list of the addresses the host resolved to
    dns_detail TEXT,
    dns_checked_at REAL,
    UNIQUE (host, ip, port, proto, reason)
);
CREATE INDEX IF NOT EXISTS violations_last_seen ON violations (last_seen);
CREATE INDEX IF NOT EXISTS violations_dns_checked ON violations (dns_checked_at);
-- What the operator has done about a record (docs/violations.md): no row means open.
CREATE TABLE IF NOT EXISTS handling (
    violation_id INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('acknowledged', 'resolved')),
    note TEXT NOT NULL,
    at REAL NOT NULL
);
-- The customer map: address ranges to customer and contract (icpgate customers import).
CREATE TABLE IF NOT EXISTS customers (
    network TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    contract TEXT NOT NULL,
    line INTEGER NOT NULL
);
-- Filed names the gate relayed on our addresses (gate/relayed_table.py): site inspection's sign
-- that a site whose DNS points elsewhere is still served here.
CREATE TABLE IF NOT EXISTS relayed (
    host TEXT NOT NULL,
    ip TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (host, ip)
) WITHOUT ROWID;
"""

UPSERT_RELAYED = """
INSERT INTO relayed VALUES (?, ?, ?, ?) ON CONFLICT (host, ip) DO UPDATE SET
    first_seen = min(first_seen, excluded.first_seen), last_seen = max(last_seen, excluded.last_seen)
"""

# The local schema's versions after SCHEMA (PRAGMA user_version): each a list of statements, run
# once, in order, in one transaction.
_BUMP = """UPDATE changes SET seq = seq + 1; UPDATE violations SET change_seq = (SELECT seq FROM changes),
    changed_at = (julianday('now') - 2440587.5) * 86400.0 WHERE id = %s;"""
MIGRATIONS = (
    # 1: a change sequence for the fleet's shipper, the edge's identity and how far it has shipped.
    (
        "ALTER TABLE violations ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE violations ADD COLUMN changed_at REAL",
        """CREATE TABLE changes (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,           -- the last change_seq given
            edge_uuid TEXT NOT NULL,        -- this log's identity in the fleet, made once
            shipped INTEGER NOT NULL,       -- the central store holds every change up to this one
            dropped INTEGER NOT NULL        -- unshipped records dropped past fleet.max_backlog, ever
        )""",
        "UPDATE violations SET change_seq = id, changed_at = last_seen",
        "INSERT INTO changes VALUES (1, (SELECT coalesce(max(id), 0) FROM violations), :uuid, 0, 0)",
        "CREATE INDEX violations_change_seq ON violations (change_seq)",
        "CREATE TRIGGER violations_inserted AFTER INSERT ON violations BEGIN %s END" % (_BUMP % "NEW.id"),
        "CREATE TRIGGER violations_updated AFTER UPDATE OF domain, first_seen, last_seen, count, passed, client,"
        " dns_state, dns_addresses, dns_detail, dns_checked_at ON violations BEGIN %s END" % (_BUMP % "NEW.id"),
        "CREATE TRIGGER handling_inserted AFTER INSERT ON handling BEGIN %s END" % (_BUMP % "NEW.violation_id"),
        "CREATE TRIGGER handling_updated AFTER UPDATE ON handling BEGIN %s END" % (_BUMP % "NEW.violation_id"),
        "CREATE TRIGGER handling_deleted AFTER DELETE ON handling BEGIN %s END" % (_BUMP % "OLD.violation_id"),
    ),
    # 2: handling set at the fleet's centre and taken back here (`central` = 1, with who set it) is
    # no local change: it does not move change_seq, so it is not shipped back. `open` is stored too,
    # so that a local reopen is newer than the centre's handling it takes back.
    (
        """CREATE TABLE handling_new (
            violation_id INTEGER PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
            note TEXT NOT NULL,
            at REAL NOT NULL,
            by_name TEXT,                   -- who set it at the centre; NULL when set here
            central INTEGER NOT NULL DEFAULT 0
        )""",
        "INSERT INTO handling_new (violation_id, state, note, at) SELECT violation_id, state, note, at FROM handling",
        "DROP TABLE handling",
        "ALTER TABLE handling_new RENAME TO handling",
        "CREATE TRIGGER handling_inserted AFTER INSERT ON handling WHEN NEW.central = 0 BEGIN %s END"
        % (_BUMP % "NEW.violation_id"),
        "CREATE TRIGGER handling_updated AFTER UPDATE ON handling WHEN NEW.central = 0 BEGIN %s END"
        % (_BUMP % "NEW.violation_id"),
        "CREATE TRIGGER handling_deleted AFTER DELETE ON handling BEGIN %s END" % (_BUMP % "OLD.violation_id"),
    ),
)
# The centre's handling of a record, taken back unless this edge set a newer one itself.
_CENTRAL_HANDLING = """
INSERT INTO handling (violation_id, state, note, at, by_name, central)
SELECT id, ?, ?, ?, ?, 1 FROM violations WHERE host = ? AND ip = ? AND port = ? AND proto = ? AND reason = ?
ON CONFLICT (violation_id) DO UPDATE SET state = excluded.state, note = excluded.note, at = excluded.at,
    by_name = excluded.by_name, central = 1 WHERE excluded.at > handling.at
"""

UPSERT = """
INSERT INTO violations (domain, host, ip, port, proto, reason, first_seen, last_seen, count, passed, client)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (host, ip, port, proto, reason) DO UPDATE SET
    first_seen = min(first_seen, excluded.first_seen),
    last_seen = max(last_seen, excluded.last_seen),
    count = count + excluded.count,
    passed = passed + excluded.passed,
    client = coalesce(excluded.client, client)
"""

# Confirmed violations first everywhere, then the busiest.
ORDER = "ORDER BY (dns_state = 'confirmed') DESC, count DESC, last_seen DESC, id"
DNS_STATES = ("confirmed", "not_hosted", "error", "unchecked")
# A resolved record seen again after it was resolved is open again: `reopened`.
HANDLING_STATES = ("open", "acknowledged", "resolved", "reopened")
SET_STATES = ("open", "acknowledged", "resolved")
MAX_NOTE = 1000
_HANDLING = """CASE WHEN h.state IS NULL THEN 'open'
    WHEN h.state = 'resolved' AND v.last_seen > h.at THEN 'reopened' ELSE h.state END"""
_SELECT = (
    "SELECT v.*, %s AS handling_state, h.note AS handling_note, h.at AS handling_at, h.by_name AS handling_by "
    "FROM violations v LEFT JOIN handling h ON h.violation_id = v.id" % _HANDLING
)


@dataclass(frozen=True, slots=True)
class Filters:
    confirmed: bool = False
    since: float | None = None  # last seen at or after this Unix time
    domain: str | None = None  # the registrable domain or the host
    ip: str | None = None
    reason: str | None = None
    dns: str | None = None  # one of DNS_STATES
    state: str | None = None  # one of HANDLING_STATES; `open` takes `reopened` in too

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if self.confirmed:
            clauses.append("dns_state = 'confirmed'")
        if self.since is not None:
            clauses.append("last_seen >= ?")
            params.append(self.since)
        if self.domain:
            clauses.append("(domain = ? OR host = ?)")
            params += [self.domain, self.domain]
        if self.ip:
            clauses.append("ip = ?")
            params.append(self.ip)
        if self.reason:
            clauses.append("reason = ?")
            params.append(self.reason)
        if self.dns == "unchecked":
            clauses.append("dns_state IS NULL")
        elif self.dns:
            clauses.append("dns_state = ?")
            params.append(self.dns)
        if self.state == "open":
            clauses.append("(%s) IN ('open', 'reopened')" % _HANDLING)
        elif self.state:
            clauses.append("(%s) = ?" % _HANDLING)
            params.append(self.state)
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


class ViolationStore:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    async def write(self, records: Mapping[tuple, list]) -> int:
        """Add a batch from a worker's violation table in one transaction; returns how many records."""
        rows = [_row(key, record) for key, record in records.items()]
        if rows:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self.db.executemany(UPSERT, rows)
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")
        return len(rows)

    async def write_relayed(self, records: Mapping[tuple[str, str], list[float]]) -> None:
        """Add a batch of relayed names from a worker's table, in one transaction."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany(UPSERT_RELAYED, [(host, ip, first, last) for (host, ip), (first, last)
                                                       in records.items()])  # fmt: skip
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")

    async def relayed_since(self, since: float) -> list[tuple[str, str, float]]:
        """(host, destination IP, last seen) of every name relayed at or after `since`."""
        async with self.db.execute("SELECT host, ip, last_seen FROM relayed WHERE last_seen >= ?", (since,)) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def prune(self, before: float, *, hold_unshipped: bool = False) -> int:
        """Delete records last seen before `before` (sample client addresses go with them); with
        `hold_unshipped` (a fleet edge), only those the central store already holds."""
        await self.db.execute("DELETE FROM relayed WHERE last_seen < ?", (before,))
        held = " AND change_seq <= (SELECT shipped FROM changes)" if hold_unshipped else ""
        cursor = await self.db.execute("DELETE FROM violations WHERE last_seen < ?" + held, (before,))
        await self.db.execute("DELETE FROM handling WHERE violation_id NOT IN (SELECT id FROM violations)")
        return cursor.rowcount

    async def drop_held(self, before: float, bound: int) -> int:
        """Past retention, unshipped records are held for the central store, at most `bound` of them:
        the oldest changes beyond it are deleted and counted in `changes.dropped`; returns how many."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            cursor = await self.db.execute(
                "DELETE FROM violations WHERE id IN (SELECT id FROM violations WHERE last_seen < ? AND change_seq >"
                " (SELECT shipped FROM changes) ORDER BY change_seq DESC LIMIT -1 OFFSET ?)",
                (before, bound))  # fmt: skip
            dropped = cursor.rowcount
            await self.db.execute("UPDATE changes SET dropped = dropped + ?", (dropped,))
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")
        return dropped

    async def shipping_state(self) -> dict[str, Any]:
        """The edge's identity, its shipping mark, and the backlog behind it (for heartbeats and metrics)."""
        async with self.db.execute(
            "SELECT edge_uuid, seq, shipped, dropped, (SELECT count(*) FROM violations WHERE change_seq > shipped),"
            " (SELECT min(changed_at) FROM violations WHERE change_seq > shipped) FROM changes"
        ) as cursor:
            edge_uuid, seq, shipped, dropped, backlog, oldest = await cursor.fetchone()
        return {"edge_uuid": edge_uuid, "seq": seq, "shipped": shipped, "dropped": dropped, "backlog": backlog,
                "oldest_unshipped": oldest}  # fmt: skip

    async def changed_after(self, seq: int, limit: int) -> list[aiosqlite.Row]:
        """Records whose last change comes after `seq`, in change order, with their handling."""
        sql = "%s WHERE v.change_seq > ? ORDER BY v.change_seq LIMIT ?" % _SELECT
        async with self.db.execute(sql, (seq, limit)) as cursor:
            return list(await cursor.fetchall())

    async def mark_shipped(self, seq: int) -> None:
        """The central store has committed every change up to `seq` (a copy of its mark: never back)."""
        await self.db.execute("UPDATE changes SET shipped = max(shipped, ?)", (seq,))

    async def query(self, filters: Filters, limit: int = 100, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, one page of records) in the order operators read them: confirmed first."""
        where, params = filters.where()
        join = "FROM violations v LEFT JOIN handling h ON h.violation_id = v.id "
        async with self.db.execute("SELECT count(*) " + join + where, params) as cursor:
            (total,) = await cursor.fetchone()
        sql = "%s %s %s LIMIT ? OFFSET ?" % (_SELECT, where, ORDER)
        async with self.db.execute(sql, [*params, limit, offset]) as cursor:
            rows = await cursor.fetchall()
        customers = await self.customers()
        return total, [record_json(row, customers) for row in rows]

    async def get(self, violation_id: int) -> dict[str, Any] | None:
        async with self.db.execute(_SELECT + " WHERE v.id = ?", (violation_id,)) as cursor:
            row = await cursor.fetchone()
        return record_json(row, await self.customers()) if row else None

    async def set_handling(self, violation_ids: list[int], state: str, note: str, at: float) -> list[int]:
        """Acknowledge, resolve or reopen records; returns the ids that do not exist (nothing is set then)."""
        if state not in SET_STATES:
            raise ValueError("state must be one of %s" % ", ".join(SET_STATES))
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            missing = []
            for violation_id in violation_ids:
                async with self.db.execute("SELECT 1 FROM violations WHERE id = ?", (violation_id,)) as cursor:
                    if await cursor.fetchone() is None:
                        missing.append(violation_id)
            if not missing:
                await self.db.executemany(
                    "INSERT OR REPLACE INTO handling (violation_id, state, note, at) VALUES (?, ?, ?, ?)",
                    [(i, state, note, at) for i in violation_ids])  # fmt: skip
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT" if not missing else "ROLLBACK")
        return missing

    async def take_central_handling(self, rows: list[tuple]) -> None:
        """The fleet centre's handling of these records ((key), (state, note, at, by)), as one write that
        moves no change_seq: what came from the centre is not shipped back to it. A record handled
        here after the centre's time keeps its own."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany(_CENTRAL_HANDLING, [(*handling, *key) for key, handling in rows])
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")

    async def customers(self) -> CustomerMap:
        """The customer map as stored now: read per query, so an import shows without a restart."""
        async with self.db.execute("SELECT network, name, contract FROM customers") as cursor:
            return CustomerMap([Customer(*row) for row in await cursor.fetchall()])

    async def replace_customers(self, customers: list[Customer]) -> None:
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.execute("DELETE FROM customers")
            await self.db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)",
                                      [(c.network, c.name, c.contract, c.line) for c in customers])  # fmt: skip
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")

    async def summary(self) -> dict[str, int]:
        """Record counts by DNS state, for the status page and `/readyz`'s neighbours."""
        async with self.db.execute(
            "SELECT coalesce(dns_state, 'unchecked'), count(*), sum(count) FROM violations GROUP BY 1"
        ) as cursor:
            return {state: records for state, records, _ in await cursor.fetchall()}

    async def hosts_to_check(self, now: float, recheck_after: float, limit: int) -> list[tuple[str, list[str]]]:
        """Violating hosts with no DNS answer yet, or an old one, busiest first, with their IPs."""
        sql = """SELECT host, group_concat(DISTINCT ip) FROM violations
                 WHERE domain != '' AND (dns_checked_at IS NULL OR dns_checked_at < ?)
                 GROUP BY host ORDER BY max(count) DESC LIMIT ?"""
        async with self.db.execute(sql, (now - recheck_after, limit)) as cursor:
            return [(host, ips.split(",")) for host, ips in await cursor.fetchall()]

    async def set_dns(self, host: str, ip: str, state: str, addresses: list[str], detail: str, at: float) -> None:
        await self.db.execute(
            "UPDATE violations SET dns_state = ?, dns_addresses = ?, dns_detail = ?, dns_checked_at = ? "
            "WHERE host = ? AND ip = ?",
            (state, json.dumps(addresses), detail, at, host, ip),
        )


def _row(key: tuple, record: list) -> tuple:
    """An UPSERT row from a violation table's key and record; the host escaped."""
    host, ip, port, proto, reason = key
    first, last, count, passed, client = record
    name = printable_name(host)
    return (_domain_of(name), name, ip, port, proto, reason, first, last, count, passed, client)


def _domain_of(host: str) -> str:
    if host.startswith("("):  # (junk), (overflow)
        return ""
    return registrable_domain(host) or ""


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_json(row: aiosqlite.Row, customers: CustomerMap) -> dict[str, Any]:
    return {
        "id": row["id"],
        "domain": printable_name(row["domain"]) or None,
        "host": printable_name(row["host"]),
        "ip": row["ip"],
        "port": row["port"],
        "proto": row["proto"],
        "reason": row["reason"],
        "first_seen": iso(row["first_seen"]),
        "last_seen": iso(row["last_seen"]),
        "count": row["count"],
        "blocked": row["count"] > row["passed"],
        "passed": row["passed"],
        "client": row["client"],
        "dns": {
            "state": row["dns_state"] or "unchecked",
            "addresses": json.loads(row["dns_addresses"]) if row["dns_addresses"] else [],
            "detail": printable(row["dns_detail"]) if row["dns_detail"] else None,
            "checked_at": iso(row["dns_checked_at"]),
        },
        "customer": customers.lookup(row["ip"]),
        "handling": {
            "state": row["handling_state"],
            "note": printable(row["handling_note"]) if row["handling_note"] else None,
            "at": iso(row["handling_at"]),
            "by": row["handling_by"],  # set at the fleet's centre, by this operator; None when set here
        },
    }


@asynccontextmanager
async def open_violations(path: Path) -> AsyncIterator[ViolationStore]:
    """Open (creating) the violation log at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA busy_timeout = 10000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.executescript(SCHEMA)
        await _migrate(db)
        yield ViolationStore(db, path)
    finally:
        await db.close()


async def _migrate(db: aiosqlite.Connection) -> None:
    """Bring the local schema to the last version; the lock keeps two processes from both doing it."""
    async with db.execute("PRAGMA user_version") as cursor:
        (version,) = await cursor.fetchone()
    if version >= len(MIGRATIONS):
        return
    await db.execute("BEGIN IMMEDIATE")
    try:
        async with db.execute("PRAGMA user_version") as cursor:
            (version,) = await cursor.fetchone()
        for number in range(version, len(MIGRATIONS)):
            for statement in MIGRATIONS[number]:
                await db.execute(statement, {"uuid": str(uuid.uuid4())} if ":uuid" in statement else ())
        await db.execute("PRAGMA user_version = %d" % len(MIGRATIONS))
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")


def parse_since(text: str) -> float:
    """An ISO 8601 time (UTC when it has no zone) or a duration back from now: 90s, 15m, 24h, 7d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC).timestamp() - int(text[:-1]) * units[text[-1]]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("%r is neither an ISO 8601 time nor a duration like 24h" % text) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
