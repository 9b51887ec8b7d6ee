"""The feed inside the daemon: an edge gate following a real publisher, one worker or several;
kill -9 in the middle of an apply; the index swap under load; what a stale feed does."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from feedkit import bulk_records, make_key, start_publisher
from gatekit import free_port, gate_config, listener, start_gate
from test_gate_process import http_get, status_of, wait_until

from conftest import run_icpgate, sample_records
from icpgate.process.worker import Worker
from icpgate.registry.store import open_registry


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_key(tmp_path_factory.mktemp("keys") / "feed.pem")


def edge_gate_config(tmp: Path, port: int, backend: int, feed: dict, gate: dict | None = None) -> Path:
    """A gate config with a [feed] table and no registry yet: the feed fills it."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = gate_config(tmp, {"http": listener(port, "http", backend)}, gate=gate)
    for suffix in ("", "-wal", "-shm"):
        (tmp / ("registry.db" + suffix)).unlink(missing_ok=True)
    shutil.rmtree(tmp / "registry.db.index")  # a new edge: an index left behind is another registry's
    with config.open("a", encoding="utf-8") as out:
        out.write("[feed]\n" + "".join("%s = %s\n" % (key, json.dumps(value)) for key, value in feed.items()))
    return config


def filing(domain: str, number: int) -> dict:
    subject = "京ICP备2098%04d号" % number
    return sample_records()[0] | {"licence": subject + "-1", "subject_licence": subject, "domains": [domain]}


@pytest.mark.parametrize("workers", [1, 2])
def test_an_edge_gate_follows_the_publisher(tmp_path: Path, origin, keys, workers: int) -> None:
    publisher = start_publisher(tmp_path / "publisher", keys[0])
    port = free_port()
    config = edge_gate_config(tmp_path / "edge", port, origin.http, {
        "urls": [publisher.url], "public_keys": [str(keys[1])], "token_file": str(publisher.edge_token),
        "start_delay": 0, "wait": 10,
    }, gate={"workers": workers})  # fmt: skip
    gate = start_gate(config, {"http": port})
    try:
        wait_until(lambda: status_of(http_get(port, "example-filed.cn")) == 200, timeout=15)  # first snapshot
        assert status_of(http_get(port, "approved-now.example-feed.cn")) == 403
        publisher.import_records([filing("approved-now.example-feed.cn", 1)])
        wait_until(lambda: status_of(http_get(port, "approved-now.example-feed.cn")) == 200, timeout=5)
        publisher.import_records(sample_records(), "--replace")  # the filing is gone again
        wait_until(lambda: status_of(http_get(port, "approved-now.example-feed.cn")) == 403, timeout=5)
        status = json.loads(run_icpgate("feed", "status", "--json", "-c", str(config)).stdout)
        assert status["serial"] == publisher.status()["serial"] and status["checksum"] == publisher.status()["checksum"]
    finally:
        assert gate.stop() == 0
        publisher.stop()
    assert "Traceback" not in gate.log(), gate.log()


def test_kill_9_during_an_apply_leaves_a_registry_that_matches_a_serial(tmp_path: Path, origin, keys) -> None:
    publisher = start_publisher(tmp_path / "publisher", keys[0], records=bulk_records(0, 150))
    port = free_port()
    config = edge_gate_config(tmp_path / "edge", port, origin.http, {
        "urls": [publisher.url], "public_keys": [str(keys[1])], "token_file": str(publisher.edge_token),
        "start_delay": 0, "wait": 10,
        "guard_min_filings": 10**9,  # six thousand at a time onto 150: the guards would refuse
    })  # fmt: skip
    edge_db = tmp_path / "edge" / "registry.db"
    gate = None
    try:
        gate = start_gate(config, {"http": port})
        wait_until(lambda: status_of(http_get(port, "bulk-1.example-feed.cn")) == 200, timeout=15)
        start = 1000
        for delay in (0.0, 0.3, 0.6, 1.0):  # bounded: four kills landing at different points of an apply
            publisher.import_records(bulk_records(start, 6000), "--force")  # past the publisher's guard too
            start += 6000
            time.sleep(delay)
            os.kill(gate.process.pid, signal.SIGKILL)
            gate.process.wait(10)
            serial, recorded, recomputed = _edge_state(edge_db)
            assert recorded == recomputed, "the registry's contents do not match its checksum"
            with sqlite3.connect(tmp_path / "publisher" / "registry.db") as db:
                published = dict(db.execute("SELECT serial, checksum FROM serials"))
            assert published[serial] == recorded, "serial %d does not hold the publisher's contents" % serial
            gate = start_gate(config, {"http": port})
            newest = "bulk-%d.example-feed.cn" % (start - 1)
            wait_until(
                lambda newest=newest: status_of(http_get(port, newest)) == 200, timeout=20
            )  # enforcement resumes
        assert gate.stop() == 0
    finally:
        if gate:
            gate.stop()
        publisher.stop()


def _edge_state(path: Path) -> tuple[int, str, str]:
    async def read() -> tuple[int, str, str]:
        async with open_registry(path, create=False) as registry:
            recorded, recomputed = await registry.verify_checksum()
            return (await registry.state()).serial, recorded, recomputed

    return asyncio.run(read())


@pytest.mark.parametrize(("mode", "unfiled_status"), [("enforce", 403), ("monitor", 200), ("open", 200)])
def test_a_feed_past_max_staleness_follows_stale_mode(tmp_path: Path, origin, mode: str, unfiled_status: int) -> None:
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", origin.http)})
    with config.open("a", encoding="utf-8") as out:  # a feed that never answers: the registry only ages
        out.write('[feed]\nurls = ["http://127.0.0.1:9/feed/v1"]\nallow_unsigned = true\nstart_delay = 0\n'
                  'connect_timeout = 0.5\nstale_after = 0.5\nmax_staleness = 1\nstale_mode = "%s"\n'
                  % mode)  # fmt: skip
    gate = start_gate(config, {"http": port})
    try:
        wait_until(lambda: status_of(http_get(port, "unfiled.example-nothing.cn")) == unfiled_status, timeout=10)
        assert status_of(http_get(port, "example-filed.cn")) == 200
        assert status_of(http_get(port, "bad_host!")) == 400  # malformed traffic is refused in every mode
        status = json.loads(run_icpgate("feed", "status", "--json", "-c", str(config)).stdout)
        assert status["freshness"] | {"age": None} == {"state": "expired", "age": None, "enforcement": mode}
        assert status["sync"]["last_result"] == "error"
        if mode != "enforce":
            assert "enforcement: enforce -> %s" % mode in gate.log()
    finally:
        assert gate.stop() == 0


def test_index_updates_under_load_show_each_filing_old_or_new(tmp_path: Path, origin, keys) -> None:
    """Two filings change together in every serial while decisions run. The shared index is
    updated in place and each lookup is one read transaction: every decision sees a committed
    state of its filing (never an error or a state nobody published), and both states are seen.
    Two lookups may straddle a commit, so a pair of decisions may mix serials; what one lookup sees
    is never torn (tests/test_index.py)."""
    pair = [filing("pair-a.example-feed.cn", 1), filing("pair-b.example-feed.cn", 2)]
    publisher = start_publisher(tmp_path / "publisher", keys[0], records=[*bulk_records(0, 200), *pair])
    port = free_port()
    config = edge_gate_config(tmp_path / "edge", port, origin.http, {
        "urls": [publisher.url], "public_keys": [str(keys[1])], "token_file": str(publisher.edge_token),
        "start_delay": 0, "wait": 10,
    })  # fmt: skip
    assert run_icpgate("feed", "sync", "-c", str(config)).returncode == 0

    async def main() -> set[tuple[str, str]]:
        worker = Worker(config, (), lambda: None, service=_feed_service())
        running = asyncio.create_task(worker.run())
        seen: set[tuple[str, str]] = set()
        while worker.runtime is None:
            await asyncio.sleep(0.01)
        flipper = asyncio.create_task(asyncio.to_thread(_flip, publisher, pair, 6))
        while not flipper.done():
            runtime = worker.runtime
            for _ in range(200):
                a = runtime.decide("pair-a.example-feed.cn", ("127.0.0.1", port), "http", None)
                b = runtime.decide("pair-b.example-feed.cn", ("127.0.0.1", port), "http", None)
                seen.add((a.reason, b.reason))
            await asyncio.sleep(0)
        await flipper
        final = ""
        for _ in range(200):  # the last flip reaches the index within seconds
            final = worker.runtime.decide("pair-a.example-feed.cn", ("127.0.0.1", port), "http", None).reason
            if final == "filed":
                break
            await asyncio.sleep(0.05)
        worker._stopping.set()
        await running
        seen.add(("final", final))
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        publisher.stop()
    pairs = {pair for pair in seen if pair[0] != "final"}
    for side in (0, 1):
        assert {pair[side] for pair in pairs} == {"filed", "deregistered"}, pairs  # both states, nothing else
    assert ("filed", "filed") in pairs and ("deregistered", "deregistered") in pairs, pairs
    assert ("final", "filed") in seen, seen  # six flips: back where it started


def _feed_service():
    from icpgate.feed.client import run_feed

    return run_feed


def _flip(publisher, pair: list[dict], times: int) -> None:
    for number in range(times):
        status = "deregistered" if number % 2 == 0 else "approved"
        publisher.import_records([record | {"status": status} for record in pair])
        time.sleep(0.5)
