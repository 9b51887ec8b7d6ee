"""The fleet's client library stays out of the gate's workers: psycopg (and libpq) is loaded by
the service process alone, after the fork, so a worker carries nothing of it."""

from __future__ import annotations

from pathlib import Path

from gatekit import free_port, gate_config, listener, start_gate
from test_gate_process import wait_until


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split()]


def _maps_psycopg(pid: int) -> bool:
    return "psycopg" in Path("/proc/%d/maps" % pid).read_text()


def test_only_the_service_process_loads_psycopg(tmp_path: Path) -> None:
    port = free_port()
    # A fleet edge whose central store is not there: the shipper runs, fails and retries.
    tables = {"fleet": {"dsn": "postgresql://icpgate_edge_x@127.0.0.1:%d/icpgate" % free_port(), "edge_id": "x",
                        "connect_timeout": 1.0}}  # fmt: skip
    config = gate_config(tmp_path, {"http": listener(port, "http")}, gate={"workers": 2}, tables=tables)
    gate = start_gate(config, {"http": port})
    try:
        wait_until(lambda: "fleet: central store" in gate.log(), timeout=20, step=0.2)  # psycopg was used
        children = _children(gate.process.pid)
        assert len(children) == 3  # two workers and the service process
        loaded = [pid for pid in children if _maps_psycopg(pid)]
        assert len(loaded) == 1, "psycopg is mapped in %d of the daemon's child processes" % len(loaded)
        assert not _maps_psycopg(gate.process.pid)  # nor in the supervisor the workers fork from
    finally:
        gate.stop()
