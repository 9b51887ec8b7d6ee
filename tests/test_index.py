"""The shared index file: same answers as the in-memory index, updates seen in place by another
process, damaged or stale files detected and repaired, and `kill -9` in the middle of an update."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
from gatekit import free_port, gate_config, listener, start_gate

from conftest import SAMPLES, run, run_icpgate, sample_records, write_ndjson
from icpgate.config.settings import load_config
from icpgate.names.hostname import normalize_host
from icpgate.registry.index_store import (
    IndexError_,
    SharedIndex,
    current_generation,
    index_path,
    open_index,
    read_meta,
    sync_index,
)
from icpgate.registry.store import open_registry


def registry_of(config: Path) -> Path:
    return load_config(config).registry_path


def dict_index(registry: Path):
    async def load():
        async with open_registry(registry, create=False) as opened:
            return await opened.load_index()

    return run(load())


def probe_names(registry: Path) -> list[str]:
    """Every filed domain, a child and a grandchild of each, their parents, and names filed nowhere."""
    with sqlite3.connect(registry) as db:
        filed = [name for (name,) in db.execute("SELECT name FROM domains")]
    names = set(filed)
    for name in filed:
        names |= {"www." + name, "a.b.c.d." + name, name.split(".", 1)[-1]}
    names |= {"example-unfiled.cn", "cn", "evilexample-filed.cn", "example-filed.cn.evil.net"}
    names.add(normalize_host("www.示例备案.cn").value)  # an IDN: looked up as its A-label
    return sorted(names)


def assert_same_answers(shared: SharedIndex, registry: Path) -> None:
    reference = dict_index(registry)
    for name in probe_names(registry):
        assert shared.lookup(name) == reference.lookup(name), name
    assert len(shared) == len(reference)


def test_lookups_match_the_in_memory_index(sample_registry: Path) -> None:
    registry = registry_of(sample_registry)
    assert (current_generation(index_path(registry)) / "data.mdb").is_file()  # the import built it
    shared = open_index(registry)
    try:
        assert_same_answers(shared, registry)
        match = shared.lookup("a.b.www.example-filed.cn")
        assert match is not None and match.domain == "example-filed.cn"
        assert shared.lookup(normalize_host("www.示例备案.cn").value).domain.startswith("xn--")
        assert shared.lookup("示例备案.cn") is None  # a U-label is never a key: callers normalise first
    finally:
        shared.close()


READER = """
import sys
from pathlib import Path
from icpgate.registry.index_store import SharedIndex
index = SharedIndex(Path(sys.argv[1]))
for line in sys.stdin:
    match = index.lookup(line.strip())
    print(match.filing.licence + " " + match.filing.status.value if match else "-", flush=True)
"""


def test_an_update_is_seen_in_place_by_another_process(sample_registry: Path, tmp_path: Path) -> None:
    registry = registry_of(sample_registry)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(index_path(registry))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=os.environ)  # fmt: skip

    def ask(name: str) -> str:
        reader.stdin.write(name + "\n")
        reader.stdin.flush()
        return reader.stdout.readline().strip()

    try:
        assert ask("www.example-newly-filed.cn") == "-"
        assert ask("example-filed.cn") == "京ICP备20240001号-1 approved"
        records = [r for r in sample_records() if r["licence"] != "京ICP备20240001号-1"]  # removed
        added = dict(records[0], licence="京ICP备29990001号-1", subject_licence="京ICP备29990001号",
                     domains=["example-newly-filed.cn"])  # fmt: skip
        changed = next(r for r in records if "example-pending.cn" in r["domains"])
        changed["status"] = "approved"
        path = write_ndjson(tmp_path / "next.ndjson", [*records, added])
        result = run_icpgate("import", str(path), "--replace", "-c", str(sample_registry))
        assert result.returncode == 0, result.stderr
        # the reader never reopened anything: its next lookups see the commit
        assert ask("www.example-newly-filed.cn") == "京ICP备29990001号-1 approved"
        assert ask("example-filed.cn") == "-"
        assert ask("example-pending.cn").endswith(" approved")
    finally:
        reader.stdin.close()
        reader.wait(10)


def test_a_commit_in_a_process_that_holds_the_index_patches_it_in_place(sample_registry: Path) -> None:
    """A one-process daemon looks up and commits (feed client) through the same file."""
    registry = registry_of(sample_registry)
    shared = open_index(registry)
    generation = current_generation(index_path(registry))
    added = bulk_records(3)

    async def commit() -> None:
        from icpgate.registry.interchange import parse_filing

        async with open_registry(registry, create=False) as opened:
            report = await opened.import_filings([parse_filing(r, n) for n, r in enumerate(added, 1)], source="t",
                                                 fmt="ndjson")  # fmt: skip
            assert report.committed
            assert (await opened.sync_index()).how == "current"  # apply brought it forward already

    try:
        assert shared.lookup("bulk-1.example-bulk.cn") is None
        run(commit())
        assert shared.lookup("www.bulk-1.example-bulk.cn").filing.licence == added[1]["licence"]
        assert current_generation(index_path(registry)) == generation and not shared.replaced()
        assert_same_answers(shared, registry)
    finally:
        shared.close()


def test_a_deeper_filed_domain_added_later_is_found(sample_registry: Path, tmp_path: Path) -> None:
    """Lookups skip labels above the deepest filed domain; a deeper one filed later raises that depth."""
    registry = registry_of(sample_registry)
    shared = open_index(registry)
    try:
        deep = "www.a.b.c.deep-filed.cn"
        assert shared.lookup("x." + deep) is None
        record = dict(bulk_records(1)[0], domains=["a.b.c.deep-filed.cn"])
        run_icpgate("import", str(write_ndjson(tmp_path / "deep.ndjson", [record])), "-c", str(sample_registry),
                    check=True)  # fmt: skip
        assert shared.lookup("x." + deep).domain == "a.b.c.deep-filed.cn"
        assert_same_answers(shared, registry)
    finally:
        shared.close()


def corrupt_truncated(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)


def corrupt_garbage(path: Path) -> None:
    with path.open("r+b") as file:
        file.write(os.urandom(16384))


def corrupt_empty(path: Path) -> None:
    path.write_bytes(b"")


def corrupt_other_format(path: Path) -> None:
    env = lmdb.open(str(path.parent), max_dbs=4)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", b"icpgate-index/0", db=meta)
    env.close()


@pytest.mark.parametrize("damage", [corrupt_truncated, corrupt_garbage, corrupt_empty, corrupt_other_format])
def test_a_damaged_index_is_detected_and_rebuilt(sample_registry: Path, damage, caplog) -> None:
    registry = registry_of(sample_registry)
    damage(current_generation(index_path(registry)) / "data.mdb")
    outcome = sync_index(registry)
    assert outcome.how == "rebuilt"
    shared = SharedIndex(index_path(registry))
    try:
        assert_same_answers(shared, registry)
    finally:
        shared.close()


def test_an_index_at_an_older_serial_is_patched_forward(sample_registry: Path, tmp_path: Path) -> None:
    registry = registry_of(sample_registry)
    old = shutil.copytree(current_generation(index_path(registry)), tmp_path / "old")  # at the sample's serial
    records = sample_records()
    moved = next(r for r in records if r["licence"] == "京ICP备20240001号-1")
    taker = next(r for r in records if r is not moved and r["domains"])
    taker["domains"] = [*taker["domains"], "example-filed.cn"]  # a domain moves to another filing
    moved["domains"] = ["example-filed-renamed.cn"]
    gone = records.pop()  # and a filing goes
    result = run_icpgate("import", str(write_ndjson(tmp_path / "n.ndjson", records)), "--replace", "-c",
                         str(sample_registry))  # fmt: skip
    assert result.returncode == 0, result.stderr
    shutil.copytree(old, index_path(registry) / "old")  # as if the writer had died before its index commit
    os.symlink("old", index_path(registry) / "moving")
    os.replace(index_path(registry) / "moving", index_path(registry) / "current")
    with sqlite3.connect(registry) as db:
        (serial,) = db.execute("SELECT serial FROM state").fetchone()
    assert read_meta(registry).serial == serial - 1
    outcome = sync_index(registry)
    assert (outcome.how, outcome.serial) == ("patched", serial)
    shared = SharedIndex(index_path(registry))
    try:
        assert shared.lookup("example-filed.cn").filing.licence == taker["licence"]
        assert shared.lookup("example-filed-renamed.cn").filing.licence == moved["licence"]
        assert all(shared.lookup(name) is None for name in gone["domains"])
        assert_same_answers(shared, registry)
    finally:
        shared.close()


def bulk_records(count: int, start: int = 0) -> list[dict]:
    """Filings shaped like the sample's filed one (approved, active access at IDC-EXAMPLE)."""
    template = next(r for r in sample_records() if r["licence"] == "京ICP备20240001号-1")
    return [dict(template, licence="京ICP备3%08d号-1" % n, subject_licence="京ICP备3%08d号" % n,
                 domains=["bulk-%d.example-bulk.cn" % n]) for n in range(start, start + count)]  # fmt: skip


def test_kill_9_during_a_large_index_update_leaves_a_consistent_index(tmp_path: Path, origin) -> None:
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", origin.http)})
    registry = registry_of(config)
    bulk = write_ndjson(tmp_path / "bulk.ndjson", bulk_records(50_000))
    with sqlite3.connect(registry) as db:
        (before,) = db.execute("SELECT serial FROM state").fetchone()
    killed_mid_update = False
    for _attempt in range(5):  # the window is short: retry until the kill lands inside it
        importer = subprocess.Popen([sys.executable, "-m", "icpgate", "import", str(bulk), "-c", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        with sqlite3.connect(registry) as db:
            while importer.poll() is None and time.monotonic() < deadline:
                (serial,) = db.execute("SELECT serial FROM state").fetchone()
                if serial != before:  # the registry committed: the index update is under way
                    importer.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        importer.wait(30)
        meta = read_meta(registry)
        if importer.returncode == -signal.SIGKILL and (meta is None or meta.serial == before):
            killed_mid_update = True
            break
        run_icpgate("import", str(SAMPLES), "--replace", "-c", str(config), check=True)  # back to the start
        with sqlite3.connect(registry) as db:
            (before,) = db.execute("SELECT serial FROM state").fetchone()
    assert killed_mid_update, "the import was never killed between its registry and its index commits"
    # The index is whole and behind: the gate brings it forward when it opens it, and enforces.
    gate = start_gate(config, {"http": port})
    try:
        from test_gate_process import http_get, status_of

        assert status_of(http_get(port, "bulk-49999.example-bulk.cn")) == 200
        assert status_of(http_get(port, "www.bulk-7.example-bulk.cn")) == 200
        assert status_of(http_get(port, "example-unfiled.cn")) == 403
        assert status_of(http_get(port, "bulk-50000.example-bulk.cn")) == 403
    finally:
        assert gate.stop() == 0
    shared = SharedIndex(index_path(registry))
    try:
        with sqlite3.connect(registry) as db:
            assert shared.serial == db.execute("SELECT serial FROM state").fetchone()[0]
        assert shared.domain_count == dict_index(registry).domain_count > 50_000
    finally:
        shared.close()


def test_a_gate_follows_commits_without_reloading(tmp_path: Path, origin) -> None:
    """A running gate answers from the shared file: a name filed by another process passes at
    once, its removal blocks at once, and the decision cache does not hide either."""
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", origin.http)})
    gate = start_gate(config, {"http": port})
    try:
        from test_gate_process import http_get, status_of

        assert status_of(http_get(port, "bulk-3.example-bulk.cn")) == 403
        added = write_ndjson(tmp_path / "add.ndjson", bulk_records(5))
        run_icpgate("import", str(added), "-c", str(config), check=True)
        assert status_of(http_get(port, "bulk-3.example-bulk.cn")) == 200  # no wait: seen at the next lookup
        run_icpgate("import", str(SAMPLES), "--replace", "-c", str(config), check=True)
        assert status_of(http_get(port, "bulk-3.example-bulk.cn")) == 403
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def test_concurrent_syncs_in_one_process_do_not_deadlock(sample_registry: Path) -> None:
    """The one-process daemon: the feed client's sync and the worker's catch-up run in threads at
    once while the loop looks up. (LMDB's open_db inside another thread's write transaction
    deadlocked on the GIL: the handles are opened once per environment.)"""
    import asyncio
    import threading

    from icpgate.registry.interchange import parse_filing

    registry = registry_of(sample_registry)
    shared = open_index(registry)
    records = bulk_records(20)

    async def commits() -> None:
        async with open_registry(registry, create=False) as one, open_registry(registry, create=False) as two:
            for number, record in enumerate(records):
                await asyncio.gather(
                    one.import_filings([parse_filing(record, 1)], source="t", fmt="ndjson"),
                    two.sync_index(),
                    asyncio.to_thread(sync_index, registry),
                )
                assert shared.lookup(record["domains"][0]) is not None, number

    done = threading.Event()
    thread = threading.Thread(target=lambda: (run(commits()), done.set()), daemon=True)
    thread.start()
    thread.join(60)
    try:
        assert done.is_set(), "the syncs did not finish within 60 s"
        assert_same_answers(shared, registry)
    finally:
        shared.close()


def test_an_index_path_that_cannot_be_a_folder_is_refused(sample_registry: Path, tmp_path: Path) -> None:
    """A dangling symlink where the index folder goes: the writer neither loops forever nor crashes;
    it says which path it could not use."""
    registry = registry_of(sample_registry)
    folder = index_path(registry)
    shutil.rmtree(folder)
    folder.symlink_to(tmp_path / "nowhere" / "index")
    with pytest.raises(IndexError_, match="kept disappearing") as raised:
        sync_index(registry)
    assert str(folder) in str(raised.value)
