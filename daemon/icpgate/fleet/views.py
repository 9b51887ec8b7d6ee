"""What the operations centre reads out of the central store: the edges with their flags, and the
violations across the fleet in the shape `icpgate violations` gives them (reports/export.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..config.settings import Config
from ..reports.current import annotate_from_file
from ..violations.store import Filters, iso, open_violations
from .handling import who

FLAGS = ("silent", "not_enforcing", "behind", "checksum_differs")


def edges(connection: psycopg.Connection, silent_after: float) -> list[dict[str, Any]]:
    """Every edge with its last heartbeat and its flags:
    - silent: no heartbeat for `silent_after` seconds;
    - not_enforcing: in monitor mode, or letting traffic through on an expired feed;
    - behind: a registry serial below the fleet's newest or the publisher's, or a feed past its
      stale_after;
    - checksum_differs: at the publisher's serial with another checksum than the publisher's, or,
      where the publisher's is not known, not the most common one among the edges at its serial
      (edges at different serials differ legitimately while a change propagates)."""
    with connection.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            "SELECT e.*, m.shipped_seq, m.shipped_at, extract(epoch FROM now() - e.last_seen)::float8 AS silence"
            " FROM fleet.edges e LEFT JOIN fleet.ship_marks m USING (edge_uuid) ORDER BY e.site, e.edge_id"
        ).fetchall()
    serials = [row["registry_serial"] for row in rows if row["registry_serial"] is not None]
    newest = max(serials, default=None)
    by_serial: dict[int, Counter] = {}
    for row in rows:
        if row["registry_serial"] is not None:
            by_serial.setdefault(row["registry_serial"], Counter())[row["registry_checksum"]] += 1
    result = []
    for row in rows:
        serial = row["registry_serial"]
        flags = []
        if row["silence"] > silent_after:
            flags.append("silent")
        if row["mode"] not in (None, "enforce"):
            flags.append("not_enforcing")
        if ((serial is not None and serial < newest) or row["feed_state"] in ("stale", "expired")
                or (row["feed_serials_behind"] or 0) > 0):  # fmt: skip
            flags.append("behind")
        if serial is not None and (publisher_differs(row) if row["publisher_checksum"] else
                                   _minority(by_serial[serial], row["registry_checksum"])):  # fmt: skip
            flags.append("checksum_differs")
        result.append(_edge_json(row, newest, flags))
    return result


def publisher_differs(row: dict) -> bool:
    """At the publisher's serial, with another checksum than the publisher's (fleet.edges' row)."""
    return (row["publisher_checksum"] is not None and row["registry_serial"] == row["publisher_serial"]
            and row["registry_checksum"] != row["publisher_checksum"])  # fmt: skip


def _minority(checksums: Counter, checksum: str) -> bool:
    if len(checksums) < 2:
        return False
    top = checksums.most_common()
    return checksums[checksum] < top[0][1] or (checksums[checksum] == top[0][1] and top[1][1] == top[0][1])


def _edge_json(row: dict, newest: int | None, flags: list[str]) -> dict[str, Any]:
    return {
        "edge_id": row["edge_id"], "site": row["site"], "uuid": str(row["edge_uuid"]), "role": row["role"],
        "version": row["version"], "config_digest": row["config_digest"], "mode": row["mode"],
        "mode_rule": row["mode_rule"], "registry": {"serial": row["registry_serial"],
        "checksum": row["registry_checksum"], "filings": row["registry_filings"],
        "behind": None if row["registry_serial"] is None else newest - row["registry_serial"]},
        "feed": {"state": row["feed_state"], "age": row["feed_age"], "publisher_serial": row["publisher_serial"],
                 "serials_behind": row["feed_serials_behind"], "seconds_behind": row["feed_seconds_behind"]},
        "bypass": row["bypass"],
        "workers": row["workers"], "workers_ready": row["workers_ready"], "open_connections": row["open_connections"],
        "decisions": row["decisions"], "blocks": row["blocks"],
        "shipping": {"backlog": row["backlog"], "oldest_unshipped_age": row["oldest_unshipped_age"],
                     "dropped": row["dropped"], "mark": row["shipped_seq"], "last_ship": _iso(row["shipped_at"])},
        "started_at": _iso(row["started_at"]), "last_seen": _iso(row["last_seen"]), "silence": row["silence"],
        "flags": flags,
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class FleetFilters:
    """`icpgate violations`' filters, and the edge and site the records were seen at."""

    base: Filters
    edge: str | None = None
    site: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        inner, params = ["true"], []
        f = self.base
        for clause, value in (("v.last_seen >= to_timestamp(%s)", f.since), ("v.ip = %s", f.ip),
                              ("v.reason = %s", f.reason), ("e.edge_id = %s", self.edge),
                              ("e.site = %s", self.site)):  # fmt: skip
            if value is not None:
                inner.append(clause)
                params.append(value)
        if f.domain:
            inner.append("(v.domain = %s OR v.host = %s)")
            params += [f.domain, f.domain]
        return " AND ".join(inner), params

    def having(self) -> tuple[str, list[Any]]:
        outer, params = ["true"], []
        f = self.base
        if f.confirmed:
            outer.append("dns_state = 'confirmed'")
        if f.dns:
            outer.append("dns_state = %s")
            params.append(f.dns)
        if f.state == "open":
            outer.append("handling_state IN ('open', 'reopened')")
        elif f.state:
            outer.append("handling_state = %s")
            params.append(f.state)
        return " AND ".join(outer), params


# One row per record key across the fleet, numbered by fleet.records. Its DNS state is the best any
# edge found (a resolver at one site may fail where another's answered); its handling is the latest
# set, at the centre (fleet/handling.py) or at any edge.
_GROUPED = """
WITH grouped AS (
    SELECT v.host, v.ip, v.port, v.proto, v.reason, max(v.domain) AS domain,
        min(v.first_seen) AS first_seen, max(v.last_seen) AS last_seen, sum(v.count)::bigint AS count,
        sum(v.passed)::bigint AS passed, (array_agg(v.client ORDER BY v.last_seen DESC))[1] AS client,
        CASE WHEN bool_or(v.dns_state = 'confirmed') THEN 'confirmed' WHEN bool_or(v.dns_state = 'not_hosted')
             THEN 'not_hosted' WHEN bool_or(v.dns_state = 'error') THEN 'error' ELSE 'unchecked' END AS dns_state,
        (array_agg(v.dns_addresses ORDER BY v.dns_state = 'confirmed' DESC, v.dns_checked_at DESC NULLS LAST))[1]
            AS dns_addresses,
        (array_agg(v.dns_detail ORDER BY v.dns_state = 'confirmed' DESC, v.dns_checked_at DESC NULLS LAST))[1]
            AS dns_detail,
        max(v.dns_checked_at) AS dns_checked_at,
        (array_agg(v.handling_state ORDER BY v.handling_at DESC NULLS LAST))[1] AS edge_handling_state,
        (array_agg(v.handling_note ORDER BY v.handling_at DESC NULLS LAST))[1] AS edge_handling_note,
        max(v.handling_at) AS edge_handling_at,
        jsonb_agg(jsonb_build_object('edge_id', e.edge_id, 'site', e.site, 'count', v.count,
                  'dns', coalesce(v.dns_state, 'unchecked'), 'handling', v.handling_state) ORDER BY e.site, e.edge_id)
            AS edges
    FROM fleet.violations v JOIN fleet.edges e USING (edge_uuid)
    WHERE %s
    GROUP BY v.host, v.ip, v.port, v.proto, v.reason
), numbered AS (
    SELECT g.*, r.id AS record_id, CASE WHEN c.central THEN h.role END AS handling_role,
        CASE WHEN c.central THEN h.by_name END AS handling_by,
        CASE WHEN NOT c.central THEN g.edge_handling_state WHEN h.state = 'resolved' AND g.last_seen > h.at
             THEN 'reopened' ELSE h.state END AS handling_state,
        CASE WHEN c.central THEN h.note ELSE g.edge_handling_note END AS handling_note,
        CASE WHEN c.central THEN h.at ELSE g.edge_handling_at END AS handling_at
    FROM grouped g JOIN fleet.records r USING (host, ip, port, proto, reason)
    LEFT JOIN fleet.handling h ON h.record_id = r.id
    CROSS JOIN LATERAL (SELECT h.at IS NOT NULL AND h.at >= coalesce(g.edge_handling_at, '-infinity') AS central) c
)
"""


def violations(connection: psycopg.Connection, filters: FleetFilters, limit: int,
               offset: int = 0) -> tuple[int, list[dict]]:  # fmt: skip
    """(total matching, one page of records) across the fleet, confirmed first, then the busiest."""
    where, params = filters.where()
    having, having_params = filters.having()
    head = _GROUPED % where
    with connection.cursor(row_factory=dict_row) as cursor:
        (total,) = cursor.execute(head + "SELECT count(*) AS n FROM numbered WHERE " + having,
                                  params + having_params).fetchone().values()  # fmt: skip
        rows = cursor.execute(
            head + "SELECT * FROM numbered WHERE %s ORDER BY (dns_state = 'confirmed') DESC, count DESC, last_seen"
            " DESC, host, ip, port, proto, reason LIMIT %%s OFFSET %%s" % having,
            params + having_params + [limit, offset]).fetchall()  # fmt: skip
    return total, [_record_json(row) for row in rows]


def handling_counts(connection: psycopg.Connection) -> dict[str, int]:
    """The fleet's records by handling state (the fleet's status page)."""
    rows = connection.execute(_GROUPED % "true" + "SELECT handling_state, count(*) FROM numbered GROUP BY 1")
    return dict(rows.fetchall())


async def annotate(config: Config, records: list[dict]) -> None:
    """The customer map imported on this machine (`icpgate customers import`) and the decision of
    its registry now, as the edge's own views have them."""
    if config.violations.path.is_file():
        async with open_violations(config.violations.path) as store:
            customers = await store.customers()
        for record in records:
            record["customer"] = customers.lookup(record["ip"])
    await annotate_from_file(config, records)


NEW_WITHIN = 900.0  # seconds: a record an edge first saw this recently is a new violation
DNS_STATES = ("confirmed", "not_hosted", "error", "unchecked")


def new_violations(connection: psycopg.Connection, within: float = NEW_WITHIN) -> list[tuple[str, str, str, int]]:
    """(edge, site, DNS state, records) for every edge and state: the records the edge first saw in
    the last `within` seconds, by the edge's own first sighting, not by when the centre took them.
    A backlog shipped after an outage is history: its first sightings are as old as the outage,
    so it does not count again; a record an edge has just seen does, whatever other edges saw."""
    return connection.execute(
        "SELECT e.edge_id, e.site, s.dns, count(v.edge_uuid) FROM fleet.edges e CROSS JOIN unnest(%s::text[]) s(dns)"
        " LEFT JOIN fleet.violations v ON v.edge_uuid = e.edge_uuid AND coalesce(v.dns_state, 'unchecked') = s.dns"
        " AND v.first_seen >= now() - make_interval(secs => %s) GROUP BY 1, 2, 3 ORDER BY 2, 1, 3",
        (list(DNS_STATES), within)).fetchall()  # fmt: skip


def labels(connection: psycopg.Connection) -> tuple[set[str], set[str]]:
    """The edge labels and sites the central store knows, to refuse a filter naming neither."""
    rows = connection.execute("SELECT edge_id, site FROM fleet.edges").fetchall()
    return {edge for edge, _ in rows}, {site for _, site in rows}


def _record_json(row: dict) -> dict[str, Any]:
    """The shape of violations/store.record_json, so the exports serve both; `id` is the fleet's
    number of the record (what `fleet violations ack` takes), `edges` who saw it."""
    return {
        "id": row["record_id"], "domain": row["domain"] or None, "host": row["host"], "ip": row["ip"],
        "port": row["port"], "proto": row["proto"], "reason": row["reason"], "first_seen": _iso(row["first_seen"]),
        "last_seen": _iso(row["last_seen"]), "count": row["count"], "blocked": row["count"] > row["passed"],
        "passed": row["passed"], "client": row["client"],
        "dns": {"state": row["dns_state"], "addresses": row["dns_addresses"] or [], "detail": row["dns_detail"] or None,
                "checked_at": _iso(row["dns_checked_at"])},
        "customer": None,
        "handling": {"state": row["handling_state"], "note": row["handling_note"] or None,
                     "at": _iso(row["handling_at"]),
                     "by": who(row["handling_role"], row["handling_by"]) if row["handling_role"] else None},
        "edges": row["edges"],
    }  # fmt: skip


def _iso(moment) -> str | None:
    return None if moment is None else iso(moment.timestamp())
