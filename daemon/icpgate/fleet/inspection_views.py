"""Site inspection's results as the centre holds them (docs/fleet.md, "Site inspection"): the same
report as the inspecting edge's own `icpgate inspect --report` (inspection/report.py), read from
the rows it shipped, and the 新增接入 list from the violations every edge shipped.

One inspection per fleet: the report is the one of the edge with the newest pass. Every edge that
shipped a pass is listed, and more than one shipping lately is a warning, since each pass queries
the same names again and two passes disagree while they run.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..config.settings import Config
from ..inspection.classify import CLASSES, LIVE, STATE_GRACE, STATE_HOLLOW, STATE_LIVE, STATE_UNKNOWN, STATES
from ..inspection.report import AWAITING_DNS_FILTERS, MAX_NEW_ACCESS, NEW_ACCESS_FILTERS, new_access_of
from ..registry.store import open_registry
from ..violations.store import iso
from . import views

OLD_SCHEMA = "the central schema predates site inspection (version 5): run `icpgate fleet migrate`"
# The inspecting edge's rows, of its last complete pass and after (what the edge itself keeps).
_ROWS = """
WITH f AS (SELECT * FROM fleet.inspection_filings WHERE edge_uuid = %%(edge)s AND pass >= %%(done)s),
d AS (SELECT * FROM fleet.inspection_domains WHERE edge_uuid = %%(edge)s AND pass >= %%(done)s
      AND licence IN (SELECT licence FROM f)),
per_filing AS (
    SELECT f.licence, f.site_name, f.subject_name, f.access, bool_or(d.class IN (%s)) AS live_now,
        bool_or(d.class = 'error') AS error_now,
        extract(epoch FROM coalesce(max(d.last_live), f.first_inspected))::float8 AS since
    FROM f JOIN d USING (licence) GROUP BY f.licence, f.site_name, f.subject_name, f.access, f.first_inspected
), states AS (
    SELECT *, CASE WHEN live_now THEN '%s' WHEN %%(now)s - since < %%(grace)s THEN '%s' WHEN error_now THEN '%s'
        ELSE '%s' END AS state FROM per_filing
)
""" % (", ".join("'%s'" % klass for klass in sorted(LIVE)), STATE_LIVE, STATE_GRACE, STATE_UNKNOWN, STATE_HOLLOW)


def inspecting_edges(connection: psycopg.Connection, active_within: float) -> list[dict[str, Any]]:
    """Every edge that shipped a pass, the newest pass first; `active`: it shipped within `active_within`
    seconds (an edge running `[inspect]` ships every fleet.ship_interval, even with nothing new)."""
    with connection.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            "SELECT p.*, e.edge_id, e.site, extract(epoch FROM now() - p.shipped_at)::float8 AS silence"
            " FROM fleet.inspection_passes p JOIN fleet.edges e USING (edge_uuid) WHERE p.pass IS NOT NULL"
            " ORDER BY p.started DESC, e.edge_id").fetchall()  # fmt: skip
    return [{"edge_id": row["edge_id"], "site": row["site"], "uuid": str(row["edge_uuid"]), "pass": row["pass"],
             "state": row["state"], "started": _iso(row["started"]), "last_complete": _iso(row["last_complete"]),
             "shipped_at": _iso(row["shipped_at"]), "active": row["silence"] <= active_within,
             "_row": row} for row in rows]  # fmt: skip


def report(connection: psycopg.Connection, now: float, limit: int, offset: int, states: tuple[str, ...],
           active_within: float) -> dict[str, Any]:  # fmt: skip
    """The inspecting edge's report (inspection/report.report's shape), with `inspection` besides:
    which edge it is, every edge that shipped a pass, and the warnings."""
    (migrated,) = connection.execute("SELECT to_regclass('fleet.inspection_passes') IS NOT NULL").fetchone()
    edges = inspecting_edges(connection, active_within) if migrated else []
    chosen = edges[0]["_row"] if edges else None
    active = [edge for edge in edges if edge["active"]]
    warnings = [] if migrated else [OLD_SCHEMA]
    if len(active) > 1:
        warnings.append("%d edges ship site inspections (%s): one inspection per fleet; set inspect.enabled = false"
                        " on all but one" % (len(active), ", ".join(edge["edge_id"] for edge in active)))  # fmt: skip
    if chosen is None:
        total, items, summary = 0, [], _summary(None, {}, {})
    else:
        params = {"edge": chosen["edge_uuid"], "done": chosen["done_pass"] or 0, "now": now,
                  "grace": chosen["grace_period"]}  # fmt: skip
        classes, by_state = _counts(connection, params)
        summary = _summary(chosen, classes, by_state)
        total, items = _filings(connection, params, states, limit, offset)
    for edge in edges:
        del edge["_row"]
    return {
        "summary": summary,
        "filings": {"total": total, "limit": limit, "offset": offset, "items": items},
        "inspection": {"edge": edges[0]["edge_id"] if edges else None, "site": edges[0]["site"] if edges else None,
                       "edges": edges, "warnings": warnings},
    }  # fmt: skip


def _counts(connection: psycopg.Connection, params: dict) -> tuple[dict[str, int], dict[str, int]]:
    classes = dict(connection.execute(_ROWS + "SELECT class, count(*) FROM d GROUP BY class", params).fetchall())
    by_state = dict(connection.execute(_ROWS + "SELECT state, count(*) FROM states GROUP BY state", params).fetchall())
    return classes, by_state


def _summary(row: dict | None, classes: dict[str, int], by_state: dict[str, int]) -> dict[str, Any]:
    total = sum(by_state.values())
    last = None
    if row is not None:
        last = {"id": row["pass"], "started": _iso(row["started"]), "finished": _iso(row["finished"]),
                "state": row["state"], "filings": row["filings"], "domains": row["domains"],
                "queries": row["queries"]}  # fmt: skip
    return {
        "last_pass": last,
        "last_complete": _iso(row["last_complete"]) if row else None,
        "domains": {klass: classes.get(klass, 0) for klass in CLASSES},
        "filings": {state: by_state.get(state, 0) for state in STATES},
        "filings_total": total,
        "hollow_share": by_state.get(STATE_HOLLOW, 0) / total if total else 0.0,
        "hollow_alert_share": row["hollow_alert_share"] if row else 0.0,
        "grace_period": row["grace_period"] if row else 0.0,
    }


def _filings(connection: psycopg.Connection, params: dict, states: tuple[str, ...], limit: int,
             offset: int) -> tuple[int, list[dict]]:  # fmt: skip
    """(total, one page) in `states`, hollow the longest first, licences in byte order as the edge's SQLite has them."""
    params = params | {"states": list(states), "limit": limit, "offset": offset}
    (total,) = connection.execute(_ROWS + "SELECT count(*) FROM states WHERE state = ANY(%(states)s)",
                                  params).fetchone()  # fmt: skip
    with connection.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(_ROWS + "SELECT * FROM states WHERE state = ANY(%(states)s) ORDER BY since,"
                              ' licence COLLATE "C" LIMIT %(limit)s OFFSET %(offset)s', params).fetchall()  # fmt: skip
        domains = cursor.execute(
            _ROWS + "SELECT d.*, s.first_seen AS class_since FROM d JOIN fleet.inspection_seen s ON s.edge_uuid ="
            " d.edge_uuid AND s.domain = d.domain AND s.class = d.class WHERE d.licence = ANY(%(licences)s)"
            ' ORDER BY d.domain COLLATE "C"',
            params | {"licences": [row["licence"] for row in rows]}).fetchall()  # fmt: skip
    by_licence: dict[str, list[dict]] = {}
    for domain in domains:
        by_licence.setdefault(domain["licence"], []).append({
            "domain": domain["domain"], "class": domain["class"], "detail": domain["detail"],
            "addresses": domain["addresses"], "checked_at": _iso(domain["checked_at"]),
            "class_since": _iso(domain["class_since"]), "last_live": _iso(domain["last_live"])})  # fmt: skip
    items = [{"licence": row["licence"], "site_name": row["site_name"], "subject_name": row["subject_name"],
              "access": row["access"], "state": row["state"], "since": iso(row["since"]),
              "domains": by_licence.get(row["licence"], [])} for row in rows]  # fmt: skip
    return total, items


def new_access_records(connection: psycopg.Connection) -> tuple[list[dict], int]:
    """(the confirmed `filed_elsewhere` records across the fleet, the number awaiting their DNS check)."""
    _, records = views.violations(connection, views.FleetFilters(NEW_ACCESS_FILTERS), MAX_NEW_ACCESS)
    unchecked, _ = views.violations(connection, views.FleetFilters(AWAITING_DNS_FILTERS), 0)
    return records, unchecked


async def new_access(config: Config, records: list[dict], unchecked: int) -> dict[str, Any]:
    """The 新增接入 list from `new_access_records`, with the customer map and the registry of this
    machine, as `fleet violations` has them (views.annotate); with no registry here, no recheck."""
    await views.annotate(config, records)
    if not config.registry_path.is_file():
        return await new_access_of(config, records, unchecked, None)
    async with open_registry(config.registry_path, create=False) as registry:
        return await new_access_of(config, records, unchecked, registry)


def _iso(moment) -> str | None:
    return None if moment is None else iso(moment.timestamp())
