"""Shipping site inspection's results to the central store (docs/fleet.md, "Site inspection").

The edge that runs `[inspect]` copies its inspection history (inspection/store.py) to the centre
in batches, as the violation log is shipped: at least once, never twice. A pass writes its filings
in (pass, licence) order, so the (pass, licence) of the last filing shipped is a high-water mark;
it is kept centrally and moves in the same transaction as the rows it covers, so a batch retried
after a lost commit or a restart rewrites the same keyed rows and doubles nothing. The pass itself
(its state, counts, the last complete one) is written by the batch that reaches the end of what
the edge holds, so the centre never shows a pass further along than the rows it has.
"""

from __future__ import annotations

import json
import logging
import sqlite3

import psycopg

from ..config.settings import InspectConfig
from ..inspection.store import InspectionStore, Written
from .central import CentralError
from .heartbeat import utc
from .shipper import Edge

log = logging.getLogger("icpgate.fleet")
BATCH = 500  # filings per transaction

_FILING = """
INSERT INTO fleet.inspection_filings (edge_uuid, licence, site_name, subject_name, access, first_inspected, pass)
VALUES (%(edge)s, %(licence)s, %(site_name)s, %(subject_name)s, %(access)s, %(first_inspected)s, %(pass)s)
ON CONFLICT (edge_uuid, licence) DO UPDATE SET site_name = excluded.site_name, subject_name = excluded.subject_name,
    access = excluded.access, first_inspected = excluded.first_inspected, pass = excluded.pass
"""
_DOMAIN = """
INSERT INTO fleet.inspection_domains (edge_uuid, domain, licence, class, detail, addresses, checked_at, last_live, pass)
VALUES (%(edge)s, %(domain)s, %(licence)s, %(class)s, %(detail)s, %(addresses)s::jsonb, %(checked_at)s,
    %(last_live)s, %(pass)s)
ON CONFLICT (edge_uuid, domain) DO UPDATE SET licence = excluded.licence, class = excluded.class,
    detail = excluded.detail, addresses = excluded.addresses, checked_at = excluded.checked_at,
    last_live = excluded.last_live, pass = excluded.pass
"""
_SEEN = """
INSERT INTO fleet.inspection_seen (edge_uuid, domain, class, first_seen, last_seen)
VALUES (%(edge)s, %(domain)s, %(class)s, %(first_seen)s, %(last_seen)s)
ON CONFLICT (edge_uuid, domain, class) DO UPDATE SET first_seen = excluded.first_seen, last_seen = excluded.last_seen
"""
_PASS = """
UPDATE fleet.inspection_passes SET pass = %(pass)s, started = %(started)s, finished = %(finished)s, state = %(state)s,
    filings = %(filings)s, domains = %(domains)s, queries = %(queries)s, last_complete = %(last_complete)s,
    done_pass = %(done_pass)s, grace_period = %(grace_period)s, hollow_alert_share = %(hollow_alert_share)s,
    shipped_at = now()
WHERE edge_uuid = %(edge)s
"""


async def central_has_inspection(connection: psycopg.AsyncConnection) -> bool:
    """The central schema is at version 5 or later; an older one is said once, and nothing is shipped."""
    async with connection.transaction():
        cursor = await connection.execute("SELECT to_regclass('fleet.inspection_passes') IS NOT NULL")
        (present,) = await cursor.fetchone()
    if not present:
        log.warning("fleet: the central schema has no inspection tables: run `icpgate fleet migrate` at the centre;"
                    " site inspection's results wait on this edge")  # fmt: skip
    return present


async def ship_inspection(connection: psycopg.AsyncConnection, store: InspectionStore, edge: Edge,
                          settings: InspectConfig, limit: int = BATCH) -> int:  # fmt: skip
    """Ship up to `limit` filings written after the central mark, in one transaction; returns how many."""
    async with connection.transaction():
        await connection.execute("INSERT INTO fleet.inspection_passes (edge_uuid) VALUES (%s) ON CONFLICT DO NOTHING",
                                 (edge.uuid,))  # fmt: skip
        cursor = await connection.execute(
            "SELECT mark_pass, mark_licence FROM fleet.inspection_passes WHERE edge_uuid = %s FOR UPDATE",
            (edge.uuid,))  # fmt: skip
        row = await cursor.fetchone()
        if row is None:
            raise CentralError("edge %s (%s): the central store shows this role no inspection mark"
                               % (edge.edge_id, edge.uuid))  # fmt: skip
        written = await store.written_after((row[0], row[1]), limit)
        if written.filings:
            await _rows(connection, edge, written)
            last = written.filings[-1]
            await connection.execute(
                "UPDATE fleet.inspection_passes SET mark_pass = %s, mark_licence = %s WHERE edge_uuid = %s",
                (last["pass"], last["licence"], edge.uuid))  # fmt: skip
        if len(written.filings) < limit:
            await connection.execute(_PASS, _pass(edge, written, settings))
    return len(written.filings)


async def ship_all_inspection(connection: psycopg.AsyncConnection, store: InspectionStore, edge: Edge,
                              settings: InspectConfig, limit: int = BATCH) -> int:  # fmt: skip
    """Batches until the centre holds all the edge has."""
    total = 0
    while (shipped := await ship_inspection(connection, store, edge, settings, limit)) == limit:
        total += shipped
    return total + shipped


async def _rows(connection: psycopg.AsyncConnection, edge: Edge, written: Written) -> None:
    async with connection.cursor() as batch:
        await batch.executemany(_FILING, [row | {"edge": edge.uuid, "first_inspected": utc(row["first_inspected"])}
                                          for row in written.filings])  # fmt: skip
        if written.domains:
            await batch.executemany(_DOMAIN, [
                row | {"edge": edge.uuid, "addresses": json.dumps(json.loads(row["addresses"])),
                       "checked_at": utc(row["checked_at"]), "last_live": utc(row["last_live"])}
                for row in written.domains])  # fmt: skip
        if written.seen:
            await batch.executemany(_SEEN, [
                row | {"edge": edge.uuid, "first_seen": utc(row["first_seen"]), "last_seen": utc(row["last_seen"])}
                for row in written.seen])  # fmt: skip


def _pass(edge: Edge, written: Written, settings: InspectConfig) -> dict:
    last = written.last
    done_pass, last_complete = written.done or (None, None)
    return {
        "edge": edge.uuid, "pass": last.id if last else None, "started": utc(last.started) if last else None,
        "finished": utc(last.finished) if last else None, "state": last.state if last else None,
        "filings": last.filings if last else None, "domains": last.domains if last else None,
        "queries": last.queries if last else None, "last_complete": utc(last_complete), "done_pass": done_pass,
        "grace_period": settings.grace_period, "hollow_alert_share": settings.hollow_alert_share,
    }  # fmt: skip


class InspectionShipping:
    """The shipper's extra step (fleet/shipper.py) on the edge that runs `[inspect]`: after the
    violations, the inspection history; the central schema is looked at once per connection."""

    def __init__(self, store: InspectionStore, settings: InspectConfig) -> None:
        self.store = store
        self.settings = settings
        self._connection: psycopg.AsyncConnection | None = None
        self._present = False

    async def __call__(self, connection: psycopg.AsyncConnection, edge: Edge) -> None:
        if self._connection is not connection:
            self._present = await central_has_inspection(connection)
            self._connection = connection
        if not self._present:
            return
        try:
            await ship_all_inspection(connection, self.store, edge, self.settings)
        except sqlite3.Error as error:  # the history locked past its busy timeout: the next round
            log.warning("fleet: cannot read the inspection history: %s", error)
