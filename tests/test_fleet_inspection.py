"""Site inspection in the fleet's central store (docs/fleet.md, "Site inspection"): a real edge
(`icpgate run` with `[inspect]` and `[fleet]`) inspects against a real dnsmasq and ships its results
into a real PostgreSQL; the centre's report (`fleet inspect`, `fleet serve`'s API and page) equals
the edge's own; a retried ship doubles nothing; the roles keep each edge to its own rows; a second
inspecting edge is flagged."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import test_fleet
from adminkit import TOKEN, admin_request, start_observed_gate
from dnskit import Dnsmasq, SilentResolver
from gatekit import free_port, wait_for_port
from test_fleet import PASSWORD, _fleet, migrated
from test_gate_process import http_get, status_of, wait_until
from test_inspection import CDN_SUFFIX, CLASSES, domains_of, inspect, inspect_json, licence, start_dns
from test_inspection import write_config as write_inspection_config

from conftest import REPO, run_icpgate
from icpgate.config.settings import InspectConfig
from icpgate.fleet import central
from icpgate.fleet.inspection_shipper import InspectionShipping, ship_inspection
from icpgate.fleet.schema import MIGRATIONS, VERSION_TABLE
from icpgate.fleet.shipper import Edge, register
from icpgate.inspection.store import open_inspection

centre = test_fleet.centre  # the fixture: PostgreSQL with the roles and the schema
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
ALL_STATES = ("--state", "live", "--state", "grace", "--state", "unknown", "--state", "hollow")
INSPECT_TABLES = ("inspection_filings", "inspection_domains", "inspection_seen", "inspection_passes")


@pytest.fixture
def silent():
    server = SilentResolver()
    yield server
    server.close()


@pytest.fixture
def dns(tmp_path: Path, silent: SilentResolver):
    folder = tmp_path / "dns"
    folder.mkdir()
    server = start_dns(folder, silent)
    yield server
    server.stop()


def reader_dsn(server) -> str:
    return server.dsn("icpgate_read", PASSWORD % "x")


def fleet_cli(config: Path, server, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    result = run_icpgate("fleet", "inspect", "-c", str(config), "--dsn", reader_dsn(server), *args)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def centre_folder(tmp: Path, registry: Path) -> Path:
    """The operations centre's machine: its own copy of the registry and customer map, a token for
    `fleet serve`, and the reader's DSN."""
    folder = tmp / "centre"
    folder.mkdir()
    with sqlite3.connect(registry) as source, sqlite3.connect(folder / "registry.db") as copy:
        source.backup(copy)
    (folder / "admin.token").write_text(TOKEN + "\n")
    config = folder / "centre.toml"
    config.write_text('[provider]\nid = "IDC-EXAMPLE"\nname = "示例机房"\n[registry]\npath = "%s"\n'
                      '[policy]\npack = "%s"\n[admin]\ntoken_file = "%s"\n'
                      % (folder / "registry.db", REPO / "policies" / "default.toml",
                         folder / "admin.token"))  # fmt: skip
    return config


def test_the_centre_reports_what_the_inspecting_edge_reports(centre, tmp_path: Path, dns: Dnsmasq, origin) -> None:
    migrated(centre)
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    write_inspection_config(gate_dir, dns)  # the registry, with our filings and others'
    (gate_dir / "config.toml").unlink()
    (gate_dir / "password").write_text(PASSWORD % "a" + "\n")
    resolver = ["127.0.0.1:%d" % dns.port]
    tables = {
        "dns": {"enabled": True, "resolvers": resolver, "hosted_ranges": ["127.0.0.0/24"], "min_ttl": 1},
        "inspect": {"enabled": True, "resolvers": resolver, "cdn_suffixes": [CDN_SUFFIX], "timeout": 1.5,
                    "retries": 1, "grace_period": 0, "interval": 3600},
        "fleet": {"dsn": "postgresql://icpgate_edge_a@127.0.0.1:%d/icpgate" % centre.port,
                  "password_file": str(gate_dir / "password"), "edge_id": "edge-a", "site": "site-1",
                  "ship_interval": 0.2, "heartbeat_interval": 0.3},
    }  # fmt: skip
    observed = start_observed_gate(gate_dir, origin.http, origin.tls, tables=tables)
    try:
        config = observed.config
        customers = gate_dir / "customers.csv"
        customers.write_text("network,name,contract\n127.0.0.0/24,客户甲,HT-001\n", encoding="utf-8")
        assert run_icpgate("customers", "import", str(customers), "-c", str(config)).returncode == 0
        # Real traffic: a site filed with another provider, blocked here, whose DNS confirms it is here.
        assert status_of(http_get(observed.http, "shop.example-elsewhere-here.cn")) == 403
        wait_until(lambda: observed.json("/api/v1/violations?dns=confirmed")["total"] == 1, timeout=20)
        wait_until(lambda: (observed.json("/api/v1/inspection")["summary"]["last_pass"] or {}).get("state") == "done",
                   timeout=30, step=0.2)  # fmt: skip
        # The centre takes the pass in the service's next rounds.
        wait_until(lambda: centre.execute("SELECT state FROM fleet.inspection_passes") == [("done",)]
                   and centre.execute("SELECT count(*) FROM fleet.violations WHERE dns_state = 'confirmed'")
                   == [(1,)], timeout=20, step=0.2)  # fmt: skip

        # `fleet inspect` (the reader's role) says what `inspect --report` says on the edge.
        edge = inspect_json(config, "--report", *ALL_STATES)
        fleet = json.loads(fleet_cli(config, centre, "--json", *ALL_STATES).stdout)
        about = fleet.pop("inspection")
        assert fleet == edge
        assert {name: domain["class"] for name, domain in domains_of(fleet).items()} == CLASSES
        assert about["edge"] == "edge-a" and about["site"] == "site-1" and about["warnings"] == []
        assert inspect(config, "--report", "--csv") == fleet_cli(config, centre, "--csv").stdout
        table = fleet_cli(config, centre).stdout
        assert table.startswith("inspected by edge edge-a (site site-1)\n")
        assert table.split("\n", 1)[1] == inspect(config, "--report")

        # `fleet serve`: the API and the page, on the centre's machine.
        centre_config = centre_folder(tmp_path, gate_dir / "registry.db")
        assert run_icpgate("customers", "import", str(customers), "-c", str(centre_config)).returncode == 0
        port = free_port()
        serve = subprocess.Popen([sys.executable, "-m", "icpgate", "fleet", "serve", "-c", str(centre_config), "--dsn",
                                  reader_dsn(centre), "--listen", "127.0.0.1:%d" % port],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            wait_for_port(port, process=serve)
            auth = {"Authorization": "Bearer " + TOKEN}
            assert admin_request(port, "/api/v1/inspection")[0] == 401
            query = "/api/v1/inspection?state=live&state=grace&state=unknown&state=hollow"
            status, _, body = admin_request(port, query, auth)
            if status != 200:
                serve.terminate()
                raise AssertionError(serve.communicate(timeout=20)[0])
            api = json.loads(body)
            local = observed.json(query)
            assert status == 200 and api["summary"] == local["summary"] and api["filings"] == local["filings"]
            assert api["enabled"] is True and api["inspection"]["edge"] == "edge-a"
            # 新增接入 from the violations the edge shipped: the same hosts, customer and licence.
            for document in (api, local):
                for group in document["new_access"]["customers"]:
                    for host in group["hosts"]:
                        host.pop("violation_ids")
            assert api["new_access"] == local["new_access"]
            (group,) = api["new_access"]["customers"]
            assert group["customer"] == {"name": "客户甲", "contract": "HT-001"}
            assert [(host["host"], host["licence"]) for host in group["hosts"]] == [
                ("shop.example-elsewhere-here.cn", licence(30))]  # fmt: skip
            cli_new = json.loads(fleet_cli(centre_config, centre, "--new-access", "--json").stdout)
            for group in cli_new["customers"]:
                for host in group["hosts"]:
                    host.pop("violation_ids")
            assert cli_new == api["new_access"]
            assert admin_request(port, "/api/v1/inspection?state=nope", auth)[0] == 400
            status, _, page = admin_request(port, "/", auth)
            html = page.decode()
            assert status == 200 and "网站巡查 · Site inspection" in html and "site-1/edge-a" in html
            hollow = [item["licence"] for item in api["filings"]["items"] if item["state"] == "hollow"]
            assert hollow and all(item in html for item in hollow)
            assert "%.1f%%" % (100 * api["summary"]["hollow_share"]) in html
            assert "shop.example-elsewhere-here.cn" in html
            # The fleet's OpenAPI document holds for the new call, with data behind it.
            result = subprocess.run(
                [str(SCHEMATHESIS), "run", "http://127.0.0.1:%d/openapi.json" % port, "--checks", "all",
                 "--include-path", "/api/v1/inspection", "--max-examples", "25", "--generation-database", "none",
                 "-H", "Authorization: Bearer " + TOKEN, "--seed", "20261207"],
                capture_output=True, text=True, timeout=300, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
        finally:
            serve.terminate()
            output = serve.communicate(timeout=20)[0]
        assert serve.returncode == 0 and "Traceback" not in output, output
    finally:
        observed.gate.stop()


# --- shipping, step by step ------------------------------------------------------------------------
SETTINGS = InspectConfig(enabled=True, path=Path("unused"), interval=3600.0, resolvers=(), rate=1000.0,
                         concurrency=8, timeout=1.5, retries=1, max_run_time=3600.0, grace_period=0.0,
                         relayed_within=3600.0, cdn_suffixes=(CDN_SUFFIX,), hollow_alert_share=0.2)  # fmt: skip


def inspected_edge(tmp: Path, dns: Dnsmasq, name: str) -> Path:
    """An edge's folder whose `icpgate inspect` ran a pass against dnsmasq; returns its config."""
    folder = tmp / name
    folder.mkdir()
    config = write_inspection_config(folder, dns, grace_period=0)
    inspect(config)
    return config


async def _registered(fleet, edge: Edge) -> None:
    async with await central.connect(fleet) as connection:
        await register(connection, edge)


def ship(fleet, history: Path, edge: Edge, limit: int) -> list[int]:
    """Batches of `limit` filings until the centre has everything; how many each one shipped."""

    async def run() -> list[int]:
        async with open_inspection(history) as store, await central.connect(fleet) as connection:
            counts = []
            while True:
                counts.append(await ship_inspection(connection, store, edge, SETTINGS, limit))
                if counts[-1] < limit:
                    return counts

    return asyncio.run(run())


def central_rows(server, edge: Edge) -> dict[str, int]:
    return {table: server.execute("SELECT count(*) FROM fleet.%s WHERE edge_uuid = %%s" % table, (edge.uuid,))[0][0]
            for table in INSPECT_TABLES}  # fmt: skip


def local_rows(history: Path) -> dict[str, int]:
    with sqlite3.connect(history) as db:
        return {"inspection_" + table: db.execute("SELECT count(*) FROM %s" % table).fetchone()[0]
                for table in ("filings", "domains", "seen")}  # fmt: skip


def test_a_retried_ship_doubles_nothing_and_a_pass_shows_only_when_its_rows_are_in(centre, tmp_path: Path,
                                                                                   dns: Dnsmasq) -> None:  # fmt: skip
    migrated(centre)
    config = inspected_edge(tmp_path, dns, "c")
    history = tmp_path / "c" / "registry.inspection.db"
    edge = Edge("6b1c3f0e-55f1-4c3a-9f7e-0c1d2e3f4a5c", "edge-c", "site-1")
    fleet = _fleet(centre.dsn("icpgate_edge_c", PASSWORD % "c"))
    asyncio.run(_registered(fleet, edge))

    # Batches of 4 of the 11 filings: while some are missing, the centre shows no pass at all.
    async def first_batch() -> int:
        async with open_inspection(history) as store, await central.connect(fleet) as connection:
            return await ship_inspection(connection, store, edge, SETTINGS, 4)

    assert asyncio.run(first_batch()) == 4
    assert centre.execute("SELECT pass, mark_licence FROM fleet.inspection_passes WHERE edge_uuid = %s",
                          (edge.uuid,)) == [(None, licence(4))]  # fmt: skip
    assert ship(fleet, history, edge, 4) == [4, 3]
    assert central_rows(centre, edge) == local_rows(history) | {"inspection_passes": 1}

    # Nothing new: nothing shipped. The mark lost (a commit whose answer never came back, from the
    # shipper's side): every row is sent again, and nothing is doubled.
    assert ship(fleet, history, edge, 4) == [0]
    centre.execute("UPDATE fleet.inspection_passes SET mark_pass = 0, mark_licence = '' WHERE edge_uuid = %s",
                   (edge.uuid,))  # fmt: skip
    assert ship(fleet, history, edge, 100) == [11]
    assert central_rows(centre, edge) == local_rows(history) | {"inspection_passes": 1}

    # A second pass ships only what it wrote, and the report follows it.
    inspect(config)
    assert ship(fleet, history, edge, 100) == [11]
    assert central_rows(centre, edge) == local_rows(history) | {"inspection_passes": 1}
    report = json.loads(fleet_cli(config, centre, "--json", *ALL_STATES).stdout)
    report.pop("inspection")
    assert report == inspect_json(config, "--report", *ALL_STATES)
    assert report["summary"]["last_pass"]["id"] == 2

    # `fleet maintain` removes what the edge forgot; the report stays the same.
    centre.execute("UPDATE fleet.inspection_filings SET pass = 1 WHERE edge_uuid = %s AND licence = %s",
                   (edge.uuid, licence(1)))  # an older pass's row the edge no longer has  # fmt: skip
    with psycopg.connect(test_fleet.owner_dsn(centre)) as connection:
        assert central.forget_inspection(connection) == 1
    assert centre.execute("SELECT count(*) FROM fleet.inspection_filings WHERE edge_uuid = %s", (edge.uuid,)) == [(10,)]


def test_an_edge_writes_and_reads_only_its_own_inspection_rows(centre, tmp_path: Path, dns: Dnsmasq) -> None:
    migrated(centre)
    config_a = inspected_edge(tmp_path, dns, "a")
    edge_a = Edge("0a0a0a0a-1111-4222-8333-444455556666", "edge-a2", "site-1")
    edge_b = Edge("0b0b0b0b-1111-4222-8333-444455556666", "edge-b2", "site-2")
    a = _fleet(centre.dsn("icpgate_edge_a", PASSWORD % "a"))
    b = _fleet(centre.dsn("icpgate_edge_b", PASSWORD % "b"))
    for fleet, edge in ((a, edge_a), (b, edge_b)):
        asyncio.run(_registered(fleet, edge))
    assert ship(a, tmp_path / "a" / "registry.inspection.db", edge_a, 100) == [11]

    with psycopg.connect(b.dsn, autocommit=True) as connection:
        for table in INSPECT_TABLES:  # reads: none of A's
            (seen,) = connection.execute("SELECT count(*) FROM fleet.%s WHERE edge_uuid = %%s" % table,
                                         (edge_a.uuid,)).fetchone()  # fmt: skip
            assert seen == 0, table
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute("DELETE FROM fleet.%s" % table)
        assert connection.execute("UPDATE fleet.inspection_domains SET class = 'hosted' WHERE edge_uuid = %s",
                                  (edge_a.uuid,)).rowcount == 0  # fmt: skip
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # rows under A's name: refused
            connection.execute("INSERT INTO fleet.inspection_filings (edge_uuid, licence, site_name, subject_name,"
                               " access, first_inspected, pass) VALUES (%s, 'x', 'x', 'x', 'active', now(), 99)",
                               (edge_a.uuid,))  # fmt: skip
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # its own name, another role's column
            connection.execute("INSERT INTO fleet.inspection_passes (edge_uuid, role) VALUES (%s, 'icpgate_edge_a')",
                               (edge_b.uuid,))  # fmt: skip
    # The reader reads every edge's; A's rows are as A shipped them.
    with psycopg.connect(reader_dsn(centre), autocommit=True) as connection:
        (rows,) = connection.execute("SELECT count(*) FROM fleet.inspection_domains WHERE edge_uuid = %s",
                                     (edge_a.uuid,)).fetchone()  # fmt: skip
        assert rows == 12
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("UPDATE fleet.inspection_passes SET pass = 0")

    # A second edge inspecting too: flagged; the report is the newest pass's.
    inspected_edge(tmp_path, dns, "b")
    assert ship(b, tmp_path / "b" / "registry.inspection.db", edge_b, 100) == [11]
    result = fleet_cli(config_a, centre, "--json")
    about = json.loads(result.stdout)["inspection"]
    assert about["edge"] == "edge-b2" and [edge["edge_id"] for edge in about["edges"]][:2] == ["edge-b2", "edge-a2"]
    assert "one inspection per fleet" in about["warnings"][0] and "edge-a2" in about["warnings"][0]
    assert "one inspection per fleet" in result.stderr


def test_a_centre_before_version_5_is_named_not_a_traceback(centre, tmp_path: Path) -> None:
    """An edge or a centre host upgraded before `fleet migrate` ran: the edge ships nothing of its
    inspection (and says why), and the centre's report says what to run instead of failing."""
    centre.execute("CREATE DATABASE icpgate_v4 OWNER icpgate_owner", dbname="postgres")
    with psycopg.connect(centre.dsn("icpgate_owner", PASSWORD % "x", dbname="icpgate_v4")) as connection:
        connection.execute("CREATE SCHEMA fleet")
        connection.execute(VERSION_TABLE)
        for statements in MIGRATIONS[:4]:
            for statement in statements:
                connection.execute(statement)
    fleet = _fleet(centre.dsn("icpgate_edge_c", PASSWORD % "c", dbname="icpgate_v4"))
    edge = Edge("7c7c7c7c-1111-4222-8333-444455556666", "edge-old", "site-1")
    asyncio.run(_registered(fleet, edge))

    async def step() -> None:
        async with open_inspection(tmp_path / "h.db") as store, await central.connect(fleet) as connection:
            await InspectionShipping(store, SETTINGS)(connection, edge)

    asyncio.run(step())  # nothing to ship into, no error
    config = tmp_path / "c.toml"
    config.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "%s"\n' % (tmp_path / "r.db"))
    result = run_icpgate("fleet", "inspect", "-c", str(config), "--dsn",
                         centre.dsn("icpgate_read", PASSWORD % "x", dbname="icpgate_v4"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "run `icpgate fleet migrate`" in result.stderr and "Traceback" not in result.stderr
    assert "no inspection has run yet" in result.stdout
