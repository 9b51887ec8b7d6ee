"""Handling at the fleet's centre: an operator acknowledges, resolves or reopens a record for the
whole fleet; the audit trail names the role and the person; real edges show it in their own views
(CLI, admin API, status page) without shipping it back; the roles keep who is recorded honest."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest
import test_fleet
from gatekit import free_port
from test_fleet import PASSWORD, Fleet, _fleet, _log_with, _ship, icpgate, migrated
from test_gate_process import wait_until

from icpgate.fleet import handling

SHOP = "shop.example-rogue.cn"
centre, fleet = test_fleet.centre, test_fleet.fleet  # the fixtures: PostgreSQL with its roles, and real edges


def operator(server) -> str:
    return "--dsn=%s" % server.dsn("icpgate_noc", PASSWORD % "x")


def fleet_records(config: Path, server) -> dict[str, dict]:
    result = icpgate(config, "fleet", "violations", "--json", "--limit", "0", operator(server))
    assert result.returncode == 0, result.stderr
    return {item["host"]: item for item in json.loads(result.stdout)["items"]}


def local_records(config: Path) -> dict[str, dict]:
    result = icpgate(config, "violations", "--json", "--limit", "0")
    return {item["host"]: item for item in json.loads(result.stdout)["items"]}


def change_seqs(fleet: Fleet, name: str) -> dict[str, int]:
    with sqlite3.connect(fleet.tmp / name / "registry.violations.db") as db:
        return dict(db.execute("SELECT host, change_seq FROM violations"))


def test_handling_at_the_centre_reaches_the_edges_views_with_its_audit_trail(fleet: Fleet, centre) -> None:
    # Two edges in front of the same destinations (a redundant pair), one after the other on its ports.
    fleet.ports["b"] = fleet.ports.setdefault("a", {"http": free_port(), "admin": free_port()})

    def settled(name: str) -> bool:  # shipped, DNS answered, and that shipped too
        try:
            return fleet.in_step(name) and all(state for *_, state in fleet.central(fleet.local(name)[0]).values())
        except sqlite3.OperationalError:  # the log is being made
            return False

    fleet.start("a")
    fleet.block("a", SHOP, 3)
    fleet.block("a", "scan.example-stranger.cn", 1)
    wait_until(lambda: settled("a"), timeout=30, step=0.2)
    fleet.gates["a"].gate.stop()
    fleet.start("b")
    fleet.block("b", SHOP, 2)
    wait_until(lambda: settled("b"), timeout=30, step=0.2)
    config = fleet.gates["b"].config
    record = fleet_records(config, centre)[SHOP]
    assert record["count"] == 5 and {edge["edge_id"] for edge in record["edges"]} == {"edge-a", "edge-b"}
    assert record["handling"] == {"state": "open", "note": None, "at": None, "by": None}
    seqs_before = {name: change_seqs(fleet, name) for name in ("a", "b")}
    deltas_before = centre.execute("SELECT count(*) FROM fleet.violation_deltas")

    done = icpgate(config, "fleet", "violations", "ack", str(record["id"]), "--note", "已致电客户", "--by", "张三",
                   operator(centre))  # fmt: skip
    assert done.returncode == 0 and "1 record(s) acknowledged" in done.stdout, done.stderr

    # Each edge that saw it shows it in its own views, with who set it: b now, a when it is back.
    expected = {"state": "acknowledged", "note": "已致电客户", "by": "张三 (icpgate_noc)"}
    for name in ("b", "a"):
        if name == "a":
            fleet.gates["b"].gate.stop()
            fleet.start("a")
        gate = fleet.gates[name]
        wait_until(lambda gate=gate: _handling(local_records(gate.config)[SHOP]) == expected, timeout=15, step=0.2)
        assert _handling(gate.json("/api/v1/violations?domain=%s" % SHOP)["items"][0]) == expected
        status, _, page = gate.get("/")
        assert status == 200 and "已受理 · acknowledged：已致电客户" in page.decode()
    config = fleet.gates["a"].config
    # Only that record: the other stays open.
    assert local_records(config)["scan.example-stranger.cn"]["handling"]["state"] == "open"
    # Taken back, not shipped back: no record's change moved, the history got nothing.
    time.sleep(1)  # several shipping rounds
    assert {name: change_seqs(fleet, name) for name in ("a", "b")} == seqs_before
    assert centre.execute("SELECT count(*) FROM fleet.violation_deltas") == deltas_before
    assert fleet.in_step("a") and fleet.in_step("b")
    # The fleet's view says the same, and the audit trail keeps who, when and why.
    assert _handling(fleet_records(config, centre)[SHOP]) == expected
    trail = json.loads(icpgate(config, "fleet", "violations", "history", str(record["id"]), "--json",
                               operator(centre)).stdout)["items"]  # fmt: skip
    assert [(t["state"], t["note"], t["role"], t["by"], t["host"]) for t in trail] == [
        ("acknowledged", "已致电客户", "icpgate_noc", "张三", SHOP)]  # fmt: skip
    assert trail[0]["at"].endswith("Z")

    # Resolved at the centre, then seen again: reopened at the edge and at the centre.
    icpgate(config, "fleet", "violations", "resolve", str(record["id"]), "--note", "站点已下线", operator(centre))
    wait_until(lambda: local_records(config)[SHOP]["handling"]["state"] == "resolved", timeout=15, step=0.2)
    time.sleep(1.1)  # the next sighting falls in a later second than the resolution
    fleet.block("a", SHOP, 1)
    wait_until(lambda: local_records(config)[SHOP]["handling"]["state"] == "reopened", timeout=15, step=0.2)
    wait_until(lambda: fleet_records(config, centre)[SHOP]["handling"]["state"] == "reopened", timeout=15, step=0.2)
    assert fleet_records(config, centre)[SHOP]["count"] == 6

    # An edge's own later handling stands: the centre's older one is not taken back over it.
    local_id = local_records(config)[SHOP]["id"]
    assert icpgate(config, "violations", "ack", str(local_id), "--note", "本地处理").returncode == 0
    wait_until(lambda: fleet_records(config, centre)[SHOP]["handling"]["note"] == "本地处理", timeout=15, step=0.2)
    time.sleep(1)
    assert _handling(local_records(config)[SHOP]) == {"state": "acknowledged", "note": "本地处理", "by": None}
    history = json.loads(icpgate(config, "fleet", "violations", "history", str(record["id"]), "--json",
                                 operator(centre)).stdout)["items"]  # fmt: skip
    assert [t["state"] for t in history] == ["acknowledged", "resolved"]  # the edge's own is not the centre's

    # An unknown id changes nothing.
    missing = icpgate(config, "fleet", "violations", "reopen", str(record["id"]), "987654", operator(centre))
    assert missing.returncode == 4 and "no record with id 987654" in missing.stderr
    assert len(json.loads(icpgate(config, "fleet", "violations", "history", str(record["id"]), "--json",
                                  operator(centre)).stdout)["items"]) == 2  # fmt: skip


def _handling(record: dict) -> dict:
    return {key: record["handling"][key] for key in ("state", "note", "by")}


def test_who_may_handle_and_what_an_edge_sees_of_it(centre, tmp_path: Path) -> None:
    migrated(centre)
    a_log, c_log = tmp_path / "a.db", tmp_path / "c.db"
    edge_a = asyncio.run(_log_with(a_log, ["mine.example-a.cn"]))
    edge_c = asyncio.run(_log_with(c_log, ["other.example-c.cn"]))
    asyncio.run(_ship(_fleet(centre.dsn("icpgate_edge_a", PASSWORD % "a")), a_log, edge_a))
    asyncio.run(_ship(_fleet(centre.dsn("icpgate_edge_c", PASSWORD % "c")), c_log, edge_c))
    ids = dict(centre.execute("SELECT host, id FROM fleet.records WHERE host LIKE '%%.example-_.cn'"))
    noc = centre.dsn("icpgate_noc", PASSWORD % "x")
    with psycopg.connect(noc) as connection:
        assert handling.handle(connection, [ids["mine.example-a.cn"], ids["other.example-c.cn"]], "acknowledged",
                               "both", None) == []  # fmt: skip

    # A reader reads, and handles nothing: the command says which role it needs.
    config = centre.root / "owner.toml"
    refused = icpgate(config, "fleet", "violations", "ack", str(ids["mine.example-a.cn"]),
                      "--dsn=%s" % centre.dsn("icpgate_read", PASSWORD % "x"))  # fmt: skip
    assert refused.returncode == 10 and "icpgate_operator" in refused.stderr
    # An operator cannot write another role's name into the trail, nor change or delete the trail.
    with psycopg.connect(noc, autocommit=True) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("INSERT INTO fleet.handling_log (record_id, state, note, role) VALUES (%s,"
                               " 'resolved', 'x', 'icpgate_owner')", (ids["mine.example-a.cn"],))  # fmt: skip
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("UPDATE fleet.handling SET role = 'icpgate_read'")
        for statement in ("UPDATE fleet.handling_log SET note = 'x'", "DELETE FROM fleet.handling_log",
                          "DELETE FROM fleet.handling"):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)
    # An edge reads the handling of its own keys only, and sets none.
    with psycopg.connect(centre.dsn("icpgate_edge_a", PASSWORD % "a"), autocommit=True) as connection:
        seen = connection.execute("SELECT host FROM fleet.handling WHERE host LIKE '%%.example-_.cn'").fetchall()
        assert seen == [("mine.example-a.cn",)]
        for statement in ("UPDATE fleet.handling SET note = 'x'", "SELECT * FROM fleet.handling_log",
                          "SELECT * FROM fleet.records"):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)
