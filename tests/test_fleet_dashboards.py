"""The fleet's Grafana dashboard (dashboards/fleet.json) against the real central store: every query,
with Grafana's macros and template variables expanded as Grafana expands them, runs as the
read-only role the dashboard uses, over records real edges shipped, and gives the columns its
panel needs. And the "new violation" signal: a backlog shipped after an outage of the centre is
history, a fresh sighting is new, in the dashboard and in `fleet serve`'s metrics alike."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import test_fleet
from test_fleet import PASSWORD, Fleet, _fleet, _ship, icpgate, migrated
from test_gate_process import wait_until

from conftest import REPO
from icpgate.fleet import views
from icpgate.fleet.serve import edge_exposition
from icpgate.fleet.shipper import Edge
from icpgate.violations.store import open_violations

centre = test_fleet.centre  # the fixtures: PostgreSQL with the roles and the schema, real edges
fleet = test_fleet.fleet
DASHBOARD = json.loads((REPO / "dashboards" / "fleet.json").read_text())
FORMATS = {"time_series", "table"}
# The columns each panel's query gives, in order; a time series' first is Grafana's `time`, `metric` names its series.
COLUMNS = {
    "Blocks per hour by site": "time metric blocks",
    "Blocks per hour by edge": "time metric blocks",
    "Blocks per hour by reason": "time metric blocks",
    "New violations by edge (first seen at the edge)": "time metric records",
    "New in the last 15 minutes": "site edge domain host ip reason dns first_seen blocks",
    "Top domains": "domain blocks edges sites reasons last_hour",
    "Top customers": "customer contract blocks addresses domains",
    "Confirmed and not handled": "id domain host ip port reason blocks edges last_seen handling",
    "Not confirmed yet": "id domain host ip port reason blocks edges last_seen dns",
    "Edges by last seen": "edge site mode bypass serial serials_behind feed_lag backlog oldest_unshipped version"
    " last_seen silence",
    "Delay from an edge's write to the centre, p50 / p99": "time metric p99 p50",
}
EDGES_ROW = next(panel["gridPos"]["y"] for panel in DASHBOARD["panels"] if panel["title"] == "Edges")
# A name dnsmasq refuses: its DNS check fails, so the record stays unconfirmed.
UNRESOLVED = "lost.example-nowhere.cn"


# --- Grafana's expansion -------------------------------------------------------------------------
def _seconds(interval: str) -> int:
    """Grafana's interval text (30s, 5m, 1h, 1d) in seconds."""
    number, unit = re.fullmatch(r"(\d+)([smhd])", interval).groups()
    return int(number) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def _literal(value: str) -> str:
    return "'%s'" % value.replace("'", "''")


def expand(sql: str, variables: dict[str, list[str]], start: datetime, end: datetime, interval: str) -> str:
    """What Grafana sends the PostgreSQL data source: template variables first (a multi-value one as
    quoted literals joined by commas, "All" being every value), $__interval, then the macros."""
    for name, values in variables.items():
        sql = re.sub(r"\$\{?%s\b\}?" % name, lambda _, values=values: ",".join(map(_literal, values)), sql)
    sql = sql.replace("$__interval_ms", str(_seconds(interval) * 1000)).replace("$__interval", interval)
    moment = {"from": start.astimezone(UTC).isoformat().replace("+00:00", "Z"),
              "to": end.astimezone(UTC).isoformat().replace("+00:00", "Z")}  # fmt: skip
    sql = sql.replace("$__timeFrom()", _literal(moment["from"])).replace("$__timeTo()", _literal(moment["to"]))
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", r"\1 BETWEEN '%s' AND '%s'" % (moment["from"], moment["to"]), sql)

    def group(match: re.Match, alias: bool) -> str:
        column, width = (part.strip().strip("'\"") for part in match.group(1).split(",")[:2])
        seconds = _seconds(width)
        return "floor(extract(epoch from %s)/%d)*%d%s" % (column, seconds, seconds, ' AS "time"' if alias else "")

    sql = re.sub(r"\$__timeGroupAlias\(([^)]+)\)", lambda m: group(m, True), sql)
    sql = re.sub(r"\$__timeGroup\(([^)]+)\)", lambda m: group(m, False), sql)
    assert "$" not in sql, sql  # every variable and macro known
    return sql


def variable_values(connection: psycopg.Connection, chosen: dict[str, list[str]] | None = None) -> dict[str, list]:
    """Each variable's values from its own query, in order (a later one may use an earlier one),
    with the earlier ones set as `chosen` says, else All."""
    values: dict[str, list[str]] = {}
    now = datetime.now(UTC)
    for variable in DASHBOARD["templating"]["list"]:
        query = expand(variable["query"], values, now - timedelta(days=7), now, "1h")
        found = [str(value) for (value,) in connection.execute(query).fetchall()]
        assert found, variable["name"]
        values[variable["name"]] = (chosen or {}).get(variable["name"], found)
    return values


def run_panels(connection: psycopg.Connection, variables: dict[str, list[str]]) -> dict[str, tuple[list, list]]:
    """Every panel's query, expanded as Grafana does for the last 7 days: (columns, rows) by title."""
    now = datetime.now(UTC)
    results = {}
    for panel in DASHBOARD["panels"]:
        if panel["type"] == "row":
            continue
        (target,) = panel["targets"]
        sql = expand(target["rawSql"], variables, now - timedelta(days=7), now + timedelta(minutes=1),
                     panel.get("interval", "1m"))  # fmt: skip
        cursor = connection.execute(sql)
        results[panel["title"]] = ([column.name for column in cursor.description], cursor.fetchall())
    return results


# --- the dashboard --------------------------------------------------------------------------------
def test_the_dashboard_is_well_formed() -> None:
    assert [item["pluginId"] for item in DASHBOARD["__inputs"]] == ["grafana-postgresql-datasource"]
    assert [variable["name"] for variable in DASHBOARD["templating"]["list"]] == ["site", "edge", "reason"]
    panels = [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]
    assert {panel["title"] for panel in panels} == set(COLUMNS)
    assert len({panel["id"] for panel in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_ICPGATE_FLEET}"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        (target,) = panel["targets"]
        assert target["format"] in FORMATS and target["rawQuery"]
        assert (target["format"] == "time_series") == (panel["type"] == "timeseries"), panel["title"]
        if panel["gridPos"]["y"] < EDGES_ROW:  # the edges' own panels show every edge, whatever its records
            assert "($reason)" in target["rawSql"], panel["title"]
        assert "($site)" in target["rawSql"] and "($edge)" in target["rawSql"], panel["title"]


def test_every_query_runs_as_the_reader_on_what_real_edges_shipped(fleet: Fleet, centre, tmp_path: Path) -> None:
    for name in ("a", "b"):
        fleet.start(name)
    fleet.block("a", "shop.example-rogue.cn", 3)  # confirmed, open
    fleet.block("a", UNRESOLVED, 2)  # its check fails: not confirmed
    fleet.block("b", "blog.example-rogue.cn", 2)
    fleet.block("b", "scan.example-stranger.cn", 1)  # not hosted here
    wait_until(lambda: fleet.in_step("a") and fleet.in_step("b"), timeout=20, step=0.2)
    wait_until(lambda: all(state for *_, state in fleet.central(fleet.local("a")[0]).values()) and all(
        state for *_, state in fleet.central(fleet.local("b")[0]).values()), timeout=20, step=0.2)  # fmt: skip
    # The centre's customer map, by an operator, for the top customers.
    customers = tmp_path / "customers.csv"
    customers.write_text("地址段,客户名称,合同编号\n127.0.0.0/8,示例客户,HT-1\n127.0.0.1/32,精确客户,HT-2\n")
    noc = "--dsn=%s" % centre.dsn("icpgate_noc", PASSWORD % "x")
    result = icpgate(fleet.gates["a"].config, "fleet", "customers", "import", str(customers), noc)
    assert result.returncode == 0 and "2 ranges of 2 customers" in result.stdout, result.stderr
    reader = "--dsn=%s" % centre.dsn("icpgate_read", PASSWORD % "x")
    refused = icpgate(fleet.gates["a"].config, "fleet", "customers", "import", str(customers), reader)
    assert refused.returncode != 0 and "icpgate_operator" in refused.stderr

    with psycopg.connect(centre.dsn("icpgate_read", PASSWORD % "x"), autocommit=True) as connection:
        everything = variable_values(connection)
        assert {"site-1", "site-2"} <= set(everything["site"]) and {"edge-a", "edge-b"} <= set(everything["edge"])
        results = run_panels(connection, everything)
        for title, (columns, rows) in results.items():
            assert columns == COLUMNS[title].split(), title
            assert rows, title
            if columns[0] == "time":  # Grafana's time series: epoch seconds, then numbers
                assert all(isinstance(row[0], int | float | Decimal) for row in rows), title
                assert all(isinstance(value, int | float | Decimal) for row in rows for value in row[2:]), title
        by_site: dict[str, int] = {}
        for _, site, blocks in results["Blocks per hour by site"][1]:
            by_site[site] = by_site.get(site, 0) + blocks
        assert by_site["site-1"] == 5 and by_site["site-2"] == 3
        top = {row[0]: row[2] for row in results["Top customers"][1]}
        assert top["精确客户"] == 8 and "示例客户" not in top  # the most specific range wins
        unhandled = {row[2] for row in results["Confirmed and not handled"][1]}
        assert unhandled == {"shop.example-rogue.cn", "blog.example-rogue.cn"}
        assert {row[2] for row in results["Not confirmed yet"][1]} == {UNRESOLVED}
        assert {row[0] for row in results["Edges by last seen"][1]} >= {"edge-a", "edge-b"}

        # One site, one edge, one reason: only theirs.
        one = variable_values(connection, {"site": ["site-2"]})
        assert one["edge"] == ["edge-b"]
        results = run_panels(connection, one | {"reason": ["unfiled"]})
        assert {row[1] for row in results["Blocks per hour by edge"][1]} == {"edge-b"}
        assert {row[0] for row in results["Top domains"][1]} == {"example-rogue.cn", "example-stranger.cn"}
        assert {row[0] for row in results["Edges by last seen"][1]} == {"edge-b"}
        assert {row[1] for row in results["New in the last 15 minutes"][1]} == {"edge-b"}


# --- "new violation": by the edge's first sighting -------------------------------------------------
async def _sightings(path: Path, hosts: list[str], seen: float) -> Edge:
    """Records written through the violation store's own path, as the gate's workers write them."""
    async with open_violations(path) as store:
        await store.write({(host, "192.0.2.1", 80, "http", "unfiled"): [seen, seen + 60, 2, 0, None] for host in hosts})
        return Edge((await store.shipping_state())["edge_uuid"], "edge-new", "site-new")


def test_a_backlog_shipped_after_an_outage_is_not_new_and_a_fresh_sighting_is(centre, tmp_path: Path) -> None:
    migrated(centre)
    path = tmp_path / "c.db"
    config = _fleet(centre.dsn("icpgate_edge_c", PASSWORD % "c"), edge_id="edge-new", site="site-new")
    reader = centre.dsn("icpgate_read", PASSWORD % "x")

    def new_here() -> dict[str, int]:
        with psycopg.connect(reader, autocommit=True) as connection:
            return {dns: records for edge, _, dns, records in views.new_violations(connection) if edge == "edge-new"}

    # The centre is away for two hours; the edge sees two unfiled sites in that time.
    centre.stop()
    try:
        outage = time.time() - 2 * 3600
        edge = asyncio.run(_sightings(path, ["old1.example-backlog.cn", "old2.example-backlog.cn"], outage))
    finally:
        centre.start()
    assert asyncio.run(_ship(config, path, edge)) == 2  # the backlog arrives now...
    assert new_here() == {"confirmed": 0, "not_hosted": 0, "error": 0, "unchecked": 0}  # ...as history
    hours = centre.execute("SELECT DISTINCT bucket FROM fleet.violation_deltas WHERE edge_uuid = %s", (edge.uuid,))
    assert [bucket for (bucket,) in hours] == [datetime.fromtimestamp(outage + 60, UTC).replace(
        minute=0, second=0, microsecond=0)]  # fmt: skip  # in the hour it happened, not this one

    # A site seen again now that was first seen in the outage: still not new.
    asyncio.run(_sightings(path, ["old1.example-backlog.cn"], time.time() - 60))
    assert asyncio.run(_ship(config, path, edge)) == 1
    assert new_here()["unchecked"] == 0
    # A fresh sighting is new, at once.
    asyncio.run(_sightings(path, ["fresh.example-backlog.cn"], time.time() - 30))
    assert asyncio.run(_ship(config, path, edge)) == 1
    assert new_here() == {"confirmed": 0, "not_hosted": 0, "error": 0, "unchecked": 1}

    # What `fleet serve` exports for the alert, and what the dashboard lists: the fresh one only.
    with psycopg.connect(reader, autocommit=True) as connection:
        exposition = edge_exposition([], views.new_violations(connection)).decode()
        listed = run_panels(connection, variable_values(connection))["New in the last 15 minutes"][1]
    assert ('icpgate_fleet_new_violation_records{dns="unchecked",edge="edge-new",site="site-new"} 1.0'
            in exposition)  # fmt: skip
    assert [row[3] for row in listed if row[1] == "edge-new"] == ["fresh.example-backlog.cn"]
