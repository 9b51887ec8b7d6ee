"""Connections to the central store, and what its owner runs: migrations and retention."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from ..config.settings import FleetConfig
from .schema import EDGE_GROUP, MIGRATIONS, OPERATOR_GROUP, READER_GROUP, VERSION_TABLE

log = logging.getLogger("icpgate.fleet")


class CentralError(Exception):
    """The central store refused or could not be reached; the message says what to do."""


def connect_args(fleet: FleetConfig, dsn: str | None = None) -> dict:
    """psycopg's connect() arguments for `dsn` (default fleet.dsn, with fleet.password_file): no
    prepared statements behind a transaction-pooling pgbouncer. Another DSN (the owner's, a
    reader's) brings its own password, or libpq finds it (PGPASSWORD, ~/.pgpass)."""
    arguments: dict = {"conninfo": dsn or fleet.dsn, "connect_timeout": max(1, round(fleet.connect_timeout)),
                       "application_name": "icpgate"}  # fmt: skip
    if fleet.password_file is not None and not dsn:
        try:
            arguments["password"] = fleet.password_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise CentralError("fleet.password_file: %s" % error) from None
    if fleet.transaction_pooling:
        arguments["prepare_threshold"] = None  # a prepared statement lives in one server session
    return arguments


async def connect(fleet: FleetConfig, dsn: str | None = None) -> psycopg.AsyncConnection:
    try:
        return await psycopg.AsyncConnection.connect(**connect_args(fleet, dsn))
    except psycopg.Error as error:
        raise CentralError("cannot connect to the central store: %s" % _first_line(error)) from None


def migrate(connection: psycopg.Connection) -> tuple[int, int]:
    """Create or bring the schema to the last version, each migration in its own transaction;
    returns (version before, version after). Run as the owner role (docs/fleet.md)."""
    known = {name for (name,) in connection.execute("SELECT rolname FROM pg_roles").fetchall()}
    missing = [group for group in (EDGE_GROUP, READER_GROUP, OPERATOR_GROUP) if group not in known]
    if missing:
        raise CentralError("the role(s) %s do not exist: run the SQL of `icpgate fleet migrate --print-roles`"
                           " as a superuser first (after an upgrade, only its lines for them)"
                           % ", ".join(missing))  # fmt: skip
    with connection.transaction():
        connection.execute("CREATE SCHEMA IF NOT EXISTS fleet")
        connection.execute(VERSION_TABLE)
        connection.execute("LOCK TABLE fleet.schema_version IN EXCLUSIVE MODE")  # two migrators: one waits
        (before,) = connection.execute("SELECT coalesce(max(version), 0) FROM fleet.schema_version").fetchone()
    if before > len(MIGRATIONS):
        raise CentralError("the central schema is at version %d, newer than this icpgate knows (%d): upgrade it"
                           % (before, len(MIGRATIONS)))  # fmt: skip
    for number in range(before, len(MIGRATIONS)):
        with connection.transaction():
            connection.execute("LOCK TABLE fleet.schema_version IN EXCLUSIVE MODE")
            (current,) = connection.execute("SELECT coalesce(max(version), 0) FROM fleet.schema_version").fetchone()
            if current > number:
                continue
            for statement in MIGRATIONS[number]:
                connection.execute(statement)
            connection.execute("INSERT INTO fleet.schema_version (version) VALUES (%s)", (number + 1,))
    ensure_months(connection, datetime.now(UTC), 2)
    return before, len(MIGRATIONS)


def ensure_months(connection: psycopg.Connection, start: datetime, months: int) -> None:
    """The history's partitions for `months` months from `start`'s (edges also ask as they ship)."""
    with connection.transaction():
        for month in range(months):
            connection.execute("SELECT fleet.ensure_partition(%s)", (_add_months(start, month),))


def maintain(connection: psycopg.Connection, retention_days: int, now: datetime | None = None) -> dict:
    """Retention: drop the history's months that end before the retention window (whole partitions:
    no vacuum debt) and the current aggregates last seen before it; make next month's partition."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    dropped = []
    with connection.transaction():
        partitions = connection.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid ="
            " i.inhrelid WHERE i.inhparent = 'fleet.violation_deltas'::regclass").fetchall()  # fmt: skip
        for name, bound in partitions:
            upper = bound.rsplit("TO ('", 1)[-1].split("'", 1)[0]
            if datetime.fromisoformat(upper) <= cutoff:
                connection.execute(sql.SQL("DROP TABLE fleet.{}").format(sql.Identifier(name)))
                dropped.append(name)
        removed = connection.execute("DELETE FROM fleet.violations WHERE last_seen < %s", (cutoff,)).rowcount
        # A key no edge holds any more loses its number, its handling and their audit trail with it.
        connection.execute(
            "DELETE FROM fleet.records r WHERE NOT EXISTS (SELECT 1 FROM fleet.violations v WHERE"
            " (v.host, v.ip, v.port, v.proto, v.reason) = (r.host, r.ip, r.port, r.proto, r.reason))"
        )
    forgotten = forget_inspection(connection)
    ensure_months(connection, now, 2)
    return {"cutoff": cutoff.isoformat(), "partitions_dropped": sorted(dropped), "records_removed": removed,
            "inspection_rows_removed": forgotten}  # fmt: skip


def forget_inspection(connection: psycopg.Connection) -> int:
    """Remove the inspection rows each edge itself forgot: those of passes before its last complete
    one (the edge cannot delete; readers skip them meanwhile). 0 before the schema's version 5."""
    removed = 0
    with connection.transaction():
        (present,) = connection.execute("SELECT to_regclass('fleet.inspection_passes') IS NOT NULL").fetchone()
        if not present:
            return 0
        for table in ("inspection_domains", "inspection_filings"):
            removed += connection.execute(
                sql.SQL("DELETE FROM fleet.{} t USING fleet.inspection_passes p WHERE t.edge_uuid = p.edge_uuid"
                        " AND t.pass < p.done_pass").format(sql.Identifier(table))).rowcount  # fmt: skip
        removed += connection.execute(
            "DELETE FROM fleet.inspection_seen s WHERE NOT EXISTS (SELECT 1 FROM fleet.inspection_domains d WHERE"
            " d.edge_uuid = s.edge_uuid AND d.domain = s.domain)").rowcount  # fmt: skip
    return removed


def _add_months(moment: datetime, months: int) -> datetime:
    month = moment.month - 1 + months
    return moment.replace(year=moment.year + month // 12, month=month % 12 + 1, day=1)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
