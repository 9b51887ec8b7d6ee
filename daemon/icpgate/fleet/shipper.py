"""Shipping the violation log to the central store: at least once, never twice (docs/fleet.md).

SQLite and PostgreSQL share no transaction. Each write of the local log gives the record a new
`change_seq`; the central store keeps this edge's mark (every change up to it is there) and moves
it in the same transaction as the rows it covers. A batch starts by locking and reading that mark,
so a batch retried after a lost commit, a restart or a `kill -9` starts after what did commit.
The local copy of the mark only guards the local retention; the central one is the truth.

Runs in the service process: the workers never wait on the central store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiosqlite
import psycopg

from ..config.settings import Config
from ..telemetry import metrics
from ..violations.store import ViolationStore
from .central import CentralError, connect
from .handling import take_back
from .heartbeat import utc

log = logging.getLogger("icpgate.fleet")
BACKOFF_MAX = 30.0
# Another kind of row shipped after the violations in each round (fleet/inspection_shipper.py).
Step = Callable[[psycopg.AsyncConnection, "Edge"], Awaitable[None]]

_UPSERT = """
INSERT INTO fleet.violations (edge_uuid, host, ip, port, proto, reason, domain, first_seen, last_seen, count, passed,
    client, dns_state, dns_addresses, dns_detail, dns_checked_at, handling_state, handling_note, handling_at,
    local_id, local_count, local_passed, change_seq, changed_at)
VALUES (%(edge)s, %(host)s, %(ip)s, %(port)s, %(proto)s, %(reason)s, %(domain)s, %(first_seen)s, %(last_seen)s,
    %(count)s, %(passed)s, %(client)s, %(dns_state)s, %(dns_addresses)s::jsonb, %(dns_detail)s, %(dns_checked_at)s,
    %(handling_state)s, %(handling_note)s, %(handling_at)s, %(local_id)s, %(local_count)s, %(local_passed)s,
    %(change_seq)s, %(changed_at)s)
ON CONFLICT (edge_uuid, host, ip, port, proto, reason) DO UPDATE SET
    domain = excluded.domain, first_seen = least(fleet.violations.first_seen, excluded.first_seen),
    last_seen = greatest(fleet.violations.last_seen, excluded.last_seen),
    count = excluded.count, passed = excluded.passed, client = excluded.client, dns_state = excluded.dns_state,
    dns_addresses = excluded.dns_addresses, dns_detail = excluded.dns_detail, dns_checked_at = excluded.dns_checked_at,
    handling_state = excluded.handling_state, handling_note = excluded.handling_note,
    handling_at = excluded.handling_at, local_id = excluded.local_id, local_count = excluded.local_count,
    local_passed = excluded.local_passed, change_seq = excluded.change_seq, changed_at = excluded.changed_at,
    shipped_at = now()
"""
_DELTA = """
INSERT INTO fleet.violation_deltas (bucket, edge_uuid, site, edge_id, host, ip, port, proto, reason, domain, count,
    passed, first_sighting, change_seq, changed_at)
VALUES (date_trunc('hour', %(last_seen)s AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', %(edge)s, %(site)s, %(edge_id)s,
    %(host)s, %(ip)s, %(port)s, %(proto)s, %(reason)s, %(domain)s, %(delta_count)s, %(delta_passed)s,
    %(first_sighting)s, %(change_seq)s, %(changed_at)s)
"""
_HEARTBEAT_COLUMNS = ("version", "config_digest", "mode", "mode_rule", "registry_serial", "registry_checksum",
                      "registry_filings", "feed_state", "feed_age", "workers", "workers_ready", "open_connections",
                      "decisions", "blocks", "backlog", "oldest_unshipped_age", "dropped", "bypass",
                      "publisher_serial", "publisher_checksum", "feed_serials_behind",
                      "feed_seconds_behind")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Edge:
    uuid: str  # the violation log's own (violations/store.py): it travels with the backlog
    edge_id: str
    site: str


async def register(connection: psycopg.AsyncConnection, edge: Edge) -> None:
    """Make (or relabel) this edge's row and its mark. A UUID that another role registered is
    refused by row-level security: one edge cannot write under another's name."""
    try:
        async with connection.transaction():
            await connection.execute(
                "INSERT INTO fleet.edges (edge_uuid, edge_id, site, started_at) VALUES (%s, %s, %s, now())"
                " ON CONFLICT (edge_uuid) DO UPDATE SET edge_id = excluded.edge_id, site = excluded.site,"
                " started_at = excluded.started_at, last_seen = now()",
                (edge.uuid, edge.edge_id, edge.site))  # fmt: skip
            await connection.execute("INSERT INTO fleet.ship_marks (edge_uuid) VALUES (%s) ON CONFLICT DO NOTHING",
                                     (edge.uuid,))  # fmt: skip
    except psycopg.errors.InsufficientPrivilege as error:
        raise CentralError("the central store refuses edge %s (%s): %s" % (edge.edge_id, edge.uuid, error)) from None


async def ship_batch(connection: psycopg.AsyncConnection, store: ViolationStore, edge: Edge, limit: int) -> int:
    """Ship up to `limit` changes after the central mark in one transaction; returns how many."""
    async with connection.transaction():
        cursor = await connection.execute(
            "SELECT shipped_seq FROM fleet.ship_marks WHERE edge_uuid = %s FOR UPDATE", (edge.uuid,))  # fmt: skip
        row = await cursor.fetchone()
        if row is None:
            raise CentralError("edge %s (%s) has no mark the central store shows this role" % (edge.edge_id, edge.uuid))
        (mark,) = row
        rows = await store.changed_after(mark, limit)
        if not rows:
            await store.mark_shipped(mark)
            return 0
        known = await _central_state(connection, edge, rows)
        records = [_record(edge, local, known.get(_key(local))) for local in rows]
        for month in sorted({record["last_seen"].replace(day=1, hour=0, minute=0, second=0, microsecond=0)
                             for record in records}):  # fmt: skip
            await connection.execute("SELECT fleet.ensure_partition(%s)", (month,))
        async with connection.cursor() as batch:
            await batch.executemany(_UPSERT, records)
            deltas = [record for record in records if record["delta_count"] or record["delta_passed"]]
            if deltas:
                await batch.executemany(_DELTA, deltas)
        new_mark = rows[-1]["change_seq"]
        await connection.execute(
            "UPDATE fleet.ship_marks SET shipped_seq = %s, shipped_at = now() WHERE edge_uuid = %s",
            (new_mark, edge.uuid))  # fmt: skip
    await store.mark_shipped(new_mark)
    return len(rows)


async def send_heartbeat(connection: psycopg.AsyncConnection, edge: Edge, health: dict,
                         known: tuple[str, ...] = _HEARTBEAT_COLUMNS) -> None:  # fmt: skip
    """Update this edge's row with the columns of `health` that the central schema has."""
    columns = ", ".join("%s = %%(%s)s" % (name, name) for name in _HEARTBEAT_COLUMNS if name in known)
    async with connection.transaction():
        await connection.execute("UPDATE fleet.edges SET %s, edge_id = %%(edge_id)s, site = %%(site)s, last_seen ="
                                 " now() WHERE edge_uuid = %%(edge)s" % columns,
                                 health | {"edge": edge.uuid, "edge_id": edge.edge_id, "site": edge.site})  # fmt: skip


async def _central_features(connection: psycopg.AsyncConnection) -> tuple[bool, tuple[str, ...]]:
    """What the central schema has: handling (version 2), and which heartbeat columns. An edge
    upgraded before its centre ships on, and says once per connection what it cannot send."""
    async with connection.transaction():
        cursor = await connection.execute(
            "SELECT to_regclass('fleet.handling') IS NOT NULL, array(SELECT column_name::text FROM"
            " information_schema.columns WHERE table_schema = 'fleet' AND table_name = 'edges')")  # fmt: skip
        handling, present = await cursor.fetchone()
    columns = tuple(name for name in _HEARTBEAT_COLUMNS if name in present)
    missing = ["handling"] * (not handling) + [name for name in _HEARTBEAT_COLUMNS if name not in columns]
    if missing:
        log.warning("fleet: the central schema predates this edge (no %s): run `icpgate fleet migrate` at the"
                    " centre", ", ".join(missing))  # fmt: skip
    return handling, columns


def _key(row) -> tuple:
    return row["host"], row["ip"], row["port"], row["proto"], row["reason"]


async def _central_state(connection: psycopg.AsyncConnection, edge: Edge, rows: list) -> dict[tuple, tuple]:
    """What the centre holds for these records: (count, passed, local id, local count, local passed, last seen)."""
    keys = [_key(row) for row in rows]
    cursor = await connection.execute(
        "SELECT host, ip, port, proto, reason, count, passed, local_id, local_count, local_passed, last_seen"
        " FROM fleet.violations WHERE edge_uuid = %s AND (host, ip, port, proto, reason) IN"
        " (SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[], %s::text[]))",
        (edge.uuid, *map(list, zip(*keys, strict=True))))  # fmt: skip
    return {tuple(row[:5]): tuple(row[5:]) for row in await cursor.fetchall()}


def _record(edge: Edge, local: aiosqlite.Row, central: tuple | None) -> dict:
    """The central row for a local record, and the delta the history gets. The centre keeps longer
    than the edge: a record the edge expired and saw again is a new local record (another id, first
    seen after the old one was last seen), whose counts add to what the centre has."""
    first, last = utc(local["first_seen"]), utc(local["last_seen"])
    count, passed = local["count"], local["passed"]
    delta_count, delta_passed, first_sighting = count, passed, central is None
    if central is not None:
        c_count, c_passed, c_local_id, c_local_count, c_local_passed, c_last = central
        same = c_local_id == local["id"] and first <= c_last and count >= c_local_count and passed >= c_local_passed
        if same:
            delta_count, delta_passed = count - c_local_count, passed - c_local_passed
        count, passed = c_count + delta_count, c_passed + delta_passed
        last = max(last, c_last)
    return {
        "edge": edge.uuid, "site": edge.site, "edge_id": edge.edge_id, "host": local["host"], "ip": local["ip"],
        "port": local["port"], "proto": local["proto"], "reason": local["reason"], "domain": local["domain"],
        "first_seen": first,  # the upsert keeps the earlier of this and the centre's
        "last_seen": last, "count": count, "passed": passed, "client": local["client"],
        "dns_state": local["dns_state"], "dns_addresses": local["dns_addresses"] or "[]",
        "dns_detail": local["dns_detail"], "dns_checked_at": utc(local["dns_checked_at"]),
        "handling_state": local["handling_state"], "handling_note": local["handling_note"],
        "handling_at": utc(local["handling_at"]), "local_id": local["id"], "local_count": local["count"],
        "local_passed": local["passed"], "change_seq": local["change_seq"],
        "changed_at": utc(local["changed_at"] or local["last_seen"]), "delta_count": delta_count,
        "delta_passed": delta_passed, "first_sighting": first_sighting,
    }  # fmt: skip


class Shipper:
    """The service process's loop: connect, register, then ship and beat until the centre goes
    away; back off and start again. Nothing here can stop the gate: a failure is logged, counted
    and retried, and the backlog waits in the local log."""

    def __init__(self, config: Config, store: ViolationStore, health: Callable[[], Awaitable[dict]],
                 steps: Sequence[Step] = ()) -> None:  # fmt: skip
        self.config = config
        self.store = store
        self.health = health
        self.steps = steps
        self.edge: Edge | None = None

    async def run(self) -> None:
        fleet = self.config.fleet
        state = await self.store.shipping_state()
        self.edge = Edge(state["edge_uuid"], fleet.edge_id, fleet.site)
        backoff = 1.0
        while True:
            try:
                connection = await connect(fleet)
                async with connection:
                    await register(connection, self.edge)
                    log.info("fleet: shipping to the central store as %s (%s)", fleet.edge_id, self.edge.uuid)
                    backoff = 1.0
                    await self._serve(connection, *await _central_features(connection))
            except (CentralError, psycopg.Error, OSError) as error:
                metrics.FLEET_FAILURES.inc()
                log.warning("fleet: central store: %s; retrying in %gs", str(error).strip().splitlines()[0], backoff)
            await self._refresh_gauges()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _serve(self, connection: psycopg.AsyncConnection, central_handling: bool,
                     columns: tuple[str, ...]) -> None:  # fmt: skip
        fleet = self.config.fleet
        next_beat = 0.0
        while True:
            await self.ship_all(connection)
            for step in self.steps:
                await step(connection, self.edge)
            if central_handling:
                await take_back(connection, self.store, self.edge.uuid)
            if time.monotonic() >= next_beat:
                await send_heartbeat(connection, self.edge, await self.health(), columns)
                next_beat = time.monotonic() + fleet.heartbeat_interval
            await asyncio.sleep(min(fleet.ship_interval, fleet.heartbeat_interval))

    async def ship_all(self, connection: psycopg.AsyncConnection) -> int:
        """Batches until the backlog is empty; the gauges follow each one."""
        total = 0
        while True:
            shipped = await ship_batch(connection, self.store, self.edge, self.config.fleet.batch_size)
            total += shipped
            metrics.FLEET_SHIPPED.inc(shipped)
            metrics.FLEET_LAST_SHIP.set(time.time())
            await self._refresh_gauges()
            if shipped < self.config.fleet.batch_size:
                return total

    async def _refresh_gauges(self) -> None:
        try:
            state = await self.store.shipping_state()
        except Exception as error:  # the log locked past its busy timeout: next round
            log.warning("fleet: cannot read the shipping state: %s", error)
            return
        metrics.FLEET_BACKLOG.set(state["backlog"])
        oldest = state["oldest_unshipped"]
        metrics.FLEET_OLDEST_UNSHIPPED.set(0 if oldest is None else max(0.0, time.time() - oldest))
