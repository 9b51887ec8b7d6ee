"""The fleet end to end: real edges (`icpgate run`) shipping into a real PostgreSQL, through outages,
`kill -9` and pgbouncer; the roles that keep each edge to its own rows; `fleet status` and the
fleet's ISMS report against each edge's own."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from adminkit import TOKEN, ObservedGate, metric
from dnskit import start_dnsmasq
from gatekit import free_port, gate_config, listener, start_gate, wait_for_port
from pgkit import start_pgbouncer, start_postgres
from test_gate_process import http_get, status_of, wait_until

from icpgate.config.settings import FleetConfig
from icpgate.fleet import central
from icpgate.fleet.schema import MIGRATIONS, roles_sql
from icpgate.fleet.shipper import Edge, register, ship_batch
from icpgate.violations.store import open_violations

PASSWORD = "s3cret-%s"
EDGES = ("a", "b", "c")
# What dnsmasq answers: on the address the gate saw them on (confirmed), or elsewhere (not hosted).
HOSTS = {"shop.example-rogue.cn": "127.0.0.1", "blog.example-rogue.cn": "127.0.0.1",
         "scan.example-stranger.cn": "198.51.100.7"}  # fmt: skip
EXTRA_FILING = {"licence": "粤ICP备20249999号-1", "subject_licence": "粤ICP备20249999号", "subject_name": "后来者",
                "subject_type": "enterprise", "site_name": "后来", "status": "approved", "limit_access": False,
                "domains": ["example-later.cn"], "access": [{"provider": "IDC-EXAMPLE", "status": "active",
                "ips": ["203.0.113.0/24"]}], "updated_at": "2026-11-20T08:00:00Z"}  # fmt: skip


@pytest.fixture(scope="module")
def centre():
    """PostgreSQL with the roles of `fleet migrate --print-roles` and the schema migrated by its owner."""
    server = start_postgres()
    try:
        script = roles_sql(["a", "b", "c"]).replace("'CHANGE-ME'", "'%s'" % (PASSWORD % "x"))
        server.execute("\n".join(line for line in script.splitlines() if not line.startswith("CREATE DATABASE")))
        for edge in EDGES:
            server.execute("ALTER ROLE icpgate_edge_%s PASSWORD '%s'" % (edge, PASSWORD % edge))
        server.execute("ALTER DATABASE icpgate OWNER TO icpgate_owner")
        yield server
    finally:
        server.close()


def owner_dsn(server) -> str:
    return server.dsn("icpgate_owner", PASSWORD % "x")


def icpgate(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icpgate", *args, "-c", str(config)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def migrated(server) -> None:
    config = server.root / "owner.toml"
    if not config.exists():
        config.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "%s"\n' % (server.root / "r.db"))
        result = icpgate(config, "fleet", "migrate", "--dsn", owner_dsn(server))
        assert result.returncode == 0 and "version %d" % len(MIGRATIONS) in result.stdout, result.stderr


# --- the roles ----------------------------------------------------------------------------------
def _fleet(dsn: str, **extra) -> FleetConfig:
    values = {"dsn": dsn, "password_file": None, "edge_id": "x", "site": "s", "ship_interval": 1.0,
              "heartbeat_interval": 1.0, "batch_size": 3, "max_backlog": 10, "transaction_pooling": False,
              "connect_timeout": 5.0, "retention_days": 180, "silent_after": 60.0}  # fmt: skip
    return FleetConfig(**values | extra)


async def _log_with(path: Path, hosts: list[str]) -> Edge:
    async with open_violations(path) as store:
        now = time.time()
        await store.write({(host, "192.0.2.1", 80, "http", "unfiled"): [now, now, 2, 0, None] for host in hosts})
        return Edge((await store.shipping_state())["edge_uuid"], path.stem, "s")


async def _ship(fleet: FleetConfig, path: Path, edge: Edge) -> int:
    async with open_violations(path) as store, await central.connect(fleet) as connection:
        await register(connection, edge)
        total = 0
        while shipped := await ship_batch(connection, store, edge, fleet.batch_size):
            total += shipped
        return total


def test_an_edge_role_reaches_only_its_own_rows_and_revoking_stops_only_it(centre, tmp_path: Path) -> None:
    migrated(centre)
    a_log, b_log = tmp_path / "a.db", tmp_path / "b.db"
    edge_a = asyncio.run(_log_with(a_log, ["one.example-a.cn", "two.example-a.cn"]))
    edge_b = asyncio.run(_log_with(b_log, ["one.example-b.cn"]))
    a = _fleet(centre.dsn("icpgate_edge_a", PASSWORD % "a"))
    b = _fleet(centre.dsn("icpgate_edge_b", PASSWORD % "b"))
    assert asyncio.run(_ship(a, a_log, edge_a)) == 2
    assert asyncio.run(_ship(b, b_log, edge_b)) == 1

    with psycopg.connect(b.dsn, autocommit=True) as connection:
        # Reads: B's rows only, in every table.
        for table in ("edges", "ship_marks", "violations", "violation_deltas"):
            uuids = {str(u) for (u,) in connection.execute("SELECT edge_uuid FROM fleet.%s" % table).fetchall()}
            assert uuids == {edge_b.uuid}, table
        # Updates of A's rows touch nothing; deletes are refused outright.
        assert connection.execute("UPDATE fleet.violations SET count = 0 WHERE edge_uuid = %s",
                                  (edge_a.uuid,)).rowcount == 0  # fmt: skip
        assert connection.execute("UPDATE fleet.ship_marks SET shipped_seq = 0").rowcount == 1  # its own only
        for table in ("edges", "ship_marks", "violations", "violation_deltas"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute("DELETE FROM fleet.%s" % table)
        # Writing under A's identity: refused by row-level security.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("INSERT INTO fleet.violations (edge_uuid, host, ip, port, proto, reason, domain,"
                               " first_seen, last_seen, count, passed, handling_state, local_id, local_count,"
                               " local_passed, change_seq, changed_at) VALUES (%s, 'x.cn', '192.0.2.1', 80, 'http',"
                               " 'unfiled', 'x.cn', now(), now(), 1, 0, 'open', 1, 1, 0, 1, now())",
                               (edge_a.uuid,))  # fmt: skip
        assert connection.execute("UPDATE fleet.edges SET site = 'moved' WHERE edge_uuid = %s",
                                  (edge_a.uuid,)).rowcount == 0  # fmt: skip
    with pytest.raises(central.CentralError, match="refuses"):
        asyncio.run(_ship(b, a_log, edge_a))  # B's role showing A's UUID
    assert centre.execute("SELECT count, edge_uuid::text FROM fleet.violations WHERE host = 'one.example-a.cn'") == [
        (2, edge_a.uuid)]  # fmt: skip

    # Revoking B's membership stops B; A ships on.
    centre.execute("REVOKE icpgate_edge FROM icpgate_edge_b")
    try:
        asyncio.run(_log_with(a_log, ["three.example-a.cn"]))
        asyncio.run(_log_with(b_log, ["two.example-b.cn"]))
        with pytest.raises(central.CentralError, match="permission denied"):
            asyncio.run(_ship(b, b_log, edge_b))
        assert asyncio.run(_ship(a, a_log, edge_a)) == 1
    finally:
        centre.execute("GRANT icpgate_edge TO icpgate_edge_b")


def test_shipping_through_pgbouncer_in_transaction_pooling(centre, tmp_path: Path) -> None:
    """Many small batches, each a transaction that may land on another server session: without
    prepare_threshold=None the fifth run of a statement would be prepared on one session and
    executed on another."""
    migrated(centre)
    bouncer = start_pgbouncer(centre, {"icpgate_edge_c": PASSWORD % "c"})
    try:
        path = tmp_path / "c.db"
        edge = asyncio.run(_log_with(path, ["h%d.example-c.cn" % n for n in range(40)]))
        fleet = _fleet(centre.dsn("icpgate_edge_c", PASSWORD % "c", port=bouncer.port), transaction_pooling=True,
                       batch_size=2)  # fmt: skip

        async def twice() -> list[int]:  # two clients, so that server sessions change hands
            return await asyncio.gather(_ship(fleet, path, edge), _ship(fleet, path, edge))

        assert sum(asyncio.run(twice())) == 40  # each change shipped once, whichever client took it
        rows = centre.execute("SELECT sum(count), count(*) FROM fleet.violation_deltas WHERE edge_uuid = %s",
                              (edge.uuid,))  # fmt: skip
        assert rows == [(80, 40)]
    finally:
        bouncer.stop()


def test_unshipped_records_outlive_retention_up_to_the_bound(tmp_path: Path) -> None:
    async def run() -> tuple[int, int, dict]:
        async with open_violations(tmp_path / "v.db") as store:
            old = time.time() - 86400
            await store.write({("h%d.example.cn" % n, "192.0.2.1", 80, "http", "unfiled"): [old, old, 1, 0, None]
                               for n in range(10)})  # fmt: skip
            await store.mark_shipped(3)  # the centre has the first three
            removed = await store.prune(time.time() - 3600, hold_unshipped=True)
            dropped = await store.drop_held(time.time() - 3600, 4)
            left = [row["change_seq"] for row in await store.changed_after(0, 100)]
            return removed, dropped, await store.shipping_state() | {"left": left}

    removed, dropped, state = asyncio.run(run())
    assert removed == 3  # shipped and expired: gone
    assert dropped == 3 and state["dropped"] == 3  # 7 held, bound 4: the 3 oldest changes dropped, counted
    assert state["left"] == [7, 8, 9, 10] and state["backlog"] == 4


# --- real edges ---------------------------------------------------------------------------------
class Fleet:
    """Edges as `icpgate run` processes, each with its own folder, registry and violation log."""

    def __init__(self, tmp: Path, server, dns_port: int) -> None:
        self.tmp, self.server, self.dns_port = tmp, server, dns_port
        self.ports: dict[str, dict[str, int]] = {}
        self.gates: dict[str, ObservedGate] = {}

    def config(self, name: str, **gate: object) -> Path:
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        (folder / "password").write_text(PASSWORD % name + "\n")
        (folder / "admin.token").write_text(TOKEN + "\n")
        ports = self.ports.setdefault(name, {"http": free_port(), "admin": free_port()})
        tables = {
            "admin": {"enabled": True, "port": ports["admin"], "token_file": str(folder / "admin.token")},
            "violations": {"flush_interval": 0.2},
            "dns": {"enabled": True, "resolvers": ["127.0.0.1:%d" % self.dns_port], "hosted_ranges": ["192.0.2.0/24"]},
            "fleet": {"dsn": "postgresql://icpgate_edge_%s@127.0.0.1:%d/icpgate" % (name, self.server.port),
                      "password_file": str(folder / "password"), "edge_id": "edge-" + name,
                      "site": "site-1" if name != "b" else "site-2", "ship_interval": 0.2,
                      "heartbeat_interval": 0.3, "batch_size": 3},
        }  # fmt: skip
        return gate_config(folder, {"http": listener(ports["http"], "http")}, gate=gate or None, tables=tables)

    def start(self, name: str, **gate: object) -> ObservedGate:
        config = self.config(name, **gate)
        ports = self.ports[name]
        process = start_gate(config, {"http": ports["http"]})
        wait_for_port(ports["admin"])
        self.gates[name] = ObservedGate(process, ports["http"], 0, ports["admin"], config)
        return self.gates[name]

    def block(self, name: str, host: str, times: int) -> None:
        for _ in range(times):
            assert status_of(http_get(self.ports[name]["http"], host)) in (403, 502)

    def local(self, name: str) -> tuple[str, dict[tuple, tuple]]:
        with sqlite3.connect(self.tmp / name / "registry.violations.db") as db:
            (uuid,) = db.execute("SELECT edge_uuid FROM changes").fetchone()
            rows = db.execute("SELECT host, ip, port, proto, reason, count, passed, dns_state FROM violations")
            return uuid, {tuple(row[:5]): tuple(row[5:]) for row in rows}

    def central(self, uuid: str) -> dict[tuple, tuple]:
        rows = self.server.execute("SELECT host, ip, port, proto, reason, count, passed, dns_state FROM"
                                   " fleet.violations WHERE edge_uuid = %s", (uuid,))  # fmt: skip
        return {tuple(row[:5]): tuple(row[5:]) for row in rows}

    def history(self, uuid: str) -> dict[tuple, tuple]:
        rows = self.server.execute("SELECT host, ip, port, proto, reason, sum(count)::int, sum(passed)::int FROM"
                                   " fleet.violation_deltas WHERE edge_uuid = %s GROUP BY 1, 2, 3, 4, 5",
                                   (uuid,))  # fmt: skip
        return {tuple(row[:5]): tuple(row[5:]) for row in rows}

    def in_step(self, name: str) -> bool:
        """The centre holds exactly the edge's records; the history adds up to the same counts."""
        uuid, local = self.local(name)
        central_rows = self.central(uuid)
        return bool(local) and central_rows == local and self.history(uuid) == {
            key: value[:2] for key, value in local.items()}  # fmt: skip

    def stop_all(self) -> None:
        for gate in self.gates.values():
            gate.gate.stop()


@pytest.fixture
def fleet(tmp_path: Path, centre):
    migrated(centre)
    dns = start_dnsmasq(tmp_path, hosts=HOSTS)
    edges = Fleet(tmp_path, centre, dns.port)
    yield edges
    edges.stop_all()
    dns.stop()


def test_edges_ship_through_outages_and_kill_9_and_the_centre_sees_the_fleet(fleet: Fleet, centre) -> None:
    later = fleet.tmp / "later.ndjson"
    later.write_text(json.dumps(EXTRA_FILING, ensure_ascii=False) + "\n")
    for name in ("a", "b"):  # a and b get one more filing than c will have: c is behind
        fleet.config(name)
        assert icpgate(fleet.tmp / name / "gate.toml", "import", str(later)).returncode == 0
        fleet.start(name)

    # Violations made by real traffic appear centrally, with counts, edges and DNS states.
    fleet.block("a", "shop.example-rogue.cn", 3)
    fleet.block("a", "scan.example-stranger.cn", 2)
    fleet.block("b", "shop.example-rogue.cn", 4)
    started = time.monotonic()
    wait_until(lambda: fleet.in_step("a") and fleet.in_step("b"), timeout=20, step=0.2)
    wait_until(lambda: all(state for _, _, state in fleet.central(fleet.local("a")[0]).values()), timeout=20, step=0.2)
    wait_until(lambda: fleet.in_step("a"), timeout=10, step=0.2)
    assert time.monotonic() - started < 20
    uuid_a = fleet.local("a")[0]
    shop = ("shop.example-rogue.cn", "127.0.0.1", fleet.ports["a"]["http"], "http", "unfiled")
    assert fleet.central(uuid_a)[shop] == (3, 0, "confirmed")
    scan = ("scan.example-stranger.cn", "127.0.0.1", fleet.ports["a"]["http"], "http", "unfiled")
    assert fleet.central(uuid_a)[scan] == (2, 0, "not_hosted")
    sites = dict(centre.execute("SELECT edge_id, site FROM fleet.edges"))
    assert sites["edge-a"] == "site-1" and sites["edge-b"] == "site-2"

    def heartbeat() -> tuple:
        return centre.execute("SELECT mode, workers_ready, blocks, registry_serial, backlog FROM fleet.edges"
                              " WHERE edge_id = 'edge-a'")[0]  # fmt: skip

    wait_until(lambda: heartbeat()[2] >= 5, timeout=10, step=0.2)  # a heartbeat after the blocks
    beat = heartbeat()
    assert beat[0] == "enforce" and beat[1] == 1 and beat[2] >= 5 and beat[3] > 0
    metrics = fleet.gates["a"].metrics()
    assert metric(metrics, "icpgate_fleet_last_ship_timestamp_seconds") > time.time() - 30
    assert metric(metrics, "icpgate_fleet_shipped_records_total") >= 2

    # The centre away while traffic goes on: the backlog waits, shows, and arrives once.
    centre.stop()
    fleet.block("a", "shop.example-rogue.cn", 2)
    fleet.block("a", "blog.example-rogue.cn", 1)
    fleet.block("b", "blog.example-rogue.cn", 2)
    wait_until(lambda: metric(fleet.gates["a"].metrics(), "icpgate_fleet_backlog_records") >= 2, timeout=10, step=0.2)
    assert metric(fleet.gates["a"].metrics(), "icpgate_fleet_ship_failures_total") >= 1
    time.sleep(1)
    centre.start()
    wait_until(lambda: fleet.in_step("a") and fleet.in_step("b"), timeout=40, step=0.3)
    assert fleet.central(uuid_a)[shop][0] == 5

    # kill -9 of an edge in the middle of a backlog's batches, then a restart: nothing lost, nothing doubled.
    centre.stop()
    for number in range(60):
        fleet.block("a", "h%d.example-rogue.cn" % number, 1)
    time.sleep(0.6)  # flushed to the log
    centre.start()

    def marks() -> int:
        return centre.execute("SELECT shipped_seq FROM fleet.ship_marks m JOIN fleet.edges e USING (edge_uuid)"
                              " WHERE e.edge_id = 'edge-a'")[0][0]  # fmt: skip

    before = marks()
    wait_until(lambda: marks() > before, timeout=30, step=0.02)
    fleet.gates["a"].gate.process.send_signal(signal.SIGKILL)
    fleet.gates["a"].gate.process.wait(10)
    assert fleet.local("a")[0] == uuid_a and not fleet.in_step("a")  # stopped short of the end
    fleet.start("a")
    wait_until(lambda: fleet.in_step("a"), timeout=40, step=0.3)

    # fleet status: a stopped edge is silent, one switched to monitor mode is not enforcing, one
    # whose registry has not had the last filing is behind.
    fleet.gates["a"].gate.stop()
    fleet.gates["b"].gate.stop()
    fleet.start("b", enforcement="monitor")
    fleet.ports["c"] = fleet.ports["a"]  # in a's place: the same destinations, seen by two edges
    fleet.start("c")
    fleet.block("c", "shop.example-rogue.cn", 2)
    reader = "--dsn=%s" % centre.dsn("icpgate_read", PASSWORD % "x")

    def flags() -> dict[str, list[str]]:
        status = json.loads(icpgate(fleet.gates["b"].config, "fleet", "status", "--json", reader,
                                    "--silent-after", "2").stdout)  # fmt: skip
        return {edge["edge_id"]: edge["flags"] for edge in status["edges"] if edge["edge_id"].startswith("edge-")}

    wait_until(lambda: flags() == {"edge-a": ["silent"], "edge-b": ["not_enforcing"], "edge-c": ["behind"]},
               timeout=20, step=0.3)  # fmt: skip
    table = icpgate(fleet.gates["b"].config, "fleet", "status", reader, "--silent-after", "2").stdout
    assert "SILENT" in table and "NOT ENFORCING" in table and "BEHIND" in table

    # The fleet's ISMS report is the union of the edges' own, deduplicated.
    wait_until(lambda: fleet.in_step("c") and all(state for *_, state in fleet.central(fleet.local("c")[0]).values()),
               timeout=20, step=0.3)  # fmt: skip
    union: dict[tuple, int] = {}
    for name in EDGES:
        for row in _isms(icpgate(fleet.gates[name].config, "violations", "--isms", "--limit", "0").stdout):
            union[tuple(row[:5])] = union.get(tuple(row[:5]), 0) + int(row[8])
    report = icpgate(fleet.gates["c"].config, "fleet", "violations", "--isms", "--limit", "0", reader).stdout
    whole = {tuple(row[:5]): int(row[8]) for row in _isms(report)}
    assert whole == union and len(whole) >= 3
    # Filters: by edge and site; an unknown one is refused.
    by_edge = json.loads(icpgate(fleet.gates["c"].config, "fleet", "violations", "--json", "--edge", "edge-c",
                                 reader).stdout)  # fmt: skip
    assert {item["host"] for item in by_edge["items"]} == {"shop.example-rogue.cn"}
    assert by_edge["items"][0]["edges"] == [{"edge_id": "edge-c", "site": "site-1", "count": 2, "dns": "confirmed",
                                             "handling": "open"}]  # fmt: skip
    refused = icpgate(fleet.gates["c"].config, "fleet", "violations", "--site", "site-9", reader)
    assert refused.returncode == 2 and "site-9" in refused.stderr and "site-1, site-2" in refused.stderr


def _isms(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))[1:]
