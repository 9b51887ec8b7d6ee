"""Handling done at the fleet's centre (docs/fleet.md): an operator acknowledges, resolves or
reopens a record for the whole fleet, the audit trail keeps who, when and why, and each edge takes
the handling of its own records back into its local log.

Who is recorded is who is connected (the PostgreSQL role, enforced by row-level security), with the
name the operator gives. The latest handling wins, wherever it was set: an edge's own later one
stands, and the centre's is taken back only when it is newer than what the edge shipped.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..violations.store import SET_STATES, ViolationStore, iso

_KEY = ("host", "ip", "port", "proto", "reason")


def handle(connection: psycopg.Connection, ids: list[int], state: str, note: str, by: str | None) -> list[int]:
    """Set the handling of fleet records `ids` in one transaction, and log it; returns the ids that
    do not exist (nothing is set then)."""
    if state not in SET_STATES:
        raise ValueError("state must be one of %s" % ", ".join(SET_STATES))
    with connection.transaction():
        found = {number for (number,) in connection.execute("SELECT id FROM fleet.records WHERE id = ANY(%s)",
                                                              (ids,)).fetchall()}  # fmt: skip
        missing = [number for number in ids if number not in found]
        if missing:
            return missing
        connection.execute(
            "INSERT INTO fleet.handling (record_id, host, ip, port, proto, reason, state, note, by_name)"
            " SELECT id, host, ip, port, proto, reason, %s, %s, %s FROM fleet.records WHERE id = ANY(%s)"
            " ON CONFLICT (record_id) DO UPDATE SET state = excluded.state, note = excluded.note,"
            " at = excluded.at, role = current_user, by_name = excluded.by_name",
            (state, note, by, ids))  # fmt: skip
        connection.execute("INSERT INTO fleet.handling_log (record_id, state, note, by_name)"
                           " SELECT unnest(%s::bigint[]), %s, %s, %s", (ids, state, note, by))  # fmt: skip
    return []


def history(connection: psycopg.Connection, ids: list[int]) -> list[dict[str, Any]]:
    """The audit trail of records `ids`, oldest first."""
    with connection.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            "SELECT l.record_id, r.host, r.ip, r.port, r.proto, r.reason, l.state, l.note, l.at, l.role, l.by_name"
            " FROM fleet.handling_log l JOIN fleet.records r ON r.id = l.record_id WHERE l.record_id = ANY(%s)"
            " ORDER BY l.record_id, l.id", (ids,)).fetchall()  # fmt: skip
    return [{"id": row["record_id"], **{name: row[name] for name in _KEY}, "state": row["state"],
             "note": row["note"] or None, "at": iso(row["at"].timestamp()), "role": row["role"],
             "by": row["by_name"]} for row in rows]  # fmt: skip


def who(role: str, by_name: str | None) -> str:
    """How the edge and the views name who set a handling: the name given, and the role."""
    return "%s (%s)" % (by_name, role) if by_name else role


async def take_back(connection: psycopg.AsyncConnection, store: ViolationStore, edge_uuid: str) -> int:
    """Bring the centre's handling of this edge's records into its local log, where it is newer than
    what the edge shipped; returns how many. The edge's central rows are set to match in the same
    transaction, committed after the local write: a failure in between takes it back again, which
    changes nothing. Row-level security shows an edge the handling of its own keys only."""
    async with connection.transaction():
        cursor = await connection.execute(
            "SELECT v.host, v.ip, v.port, v.proto, v.reason, h.state, h.note, h.at, h.role, h.by_name"
            " FROM fleet.handling h JOIN fleet.violations v USING (host, ip, port, proto, reason)"
            " WHERE v.edge_uuid = %s AND h.at > coalesce(v.handling_at, '-infinity')"
            " FOR UPDATE OF v", (edge_uuid,))  # fmt: skip
        rows = await cursor.fetchall()
        if not rows:
            return 0
        taken = []
        for row in rows:
            state, note, at, role, by_name = row[5:]
            taken.append((tuple(row[:5]), (state, note, at.timestamp(), who(role, by_name))))
        await store.take_central_handling(taken)
        async with connection.cursor() as update:
            await update.executemany(
                "UPDATE fleet.violations SET handling_state = CASE WHEN %s = 'resolved' AND last_seen > %s"
                " THEN 'reopened' ELSE %s END, handling_note = %s, handling_at = %s WHERE edge_uuid = %s"
                " AND host = %s AND ip = %s AND port = %s AND proto = %s AND reason = %s",
                [(row[5], row[7], row[5], row[6], row[7], edge_uuid, *row[:5]) for row in rows])  # fmt: skip
    return len(rows)
