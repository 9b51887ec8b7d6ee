"""The feed end to end: a real publisher (`icpgate feed serve`) and the real client
(`icpgate feed sync`) on loopback, with faults injected at the HTTP layer by a proxy. Whatever
goes wrong, the edge keeps its last good registry and says why."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
from pathlib import Path

import pytest
from feedkit import (
    FaultProxy,
    body_lines,
    bulk_records,
    edge_config,
    feed_status,
    feed_sync,
    make_body,
    sign_with,
    start_publisher,
)

from conftest import run_icpgate, sample_records
from icpgate.registry.store import open_registry

NEW_LICENCE = "京ICP备20990001号-1"


def new_filing(domain: str = "fresh-approval.example-feed.cn", licence: str = NEW_LICENCE) -> dict:
    return sample_records()[0] | {"licence": licence, "subject_licence": licence.rsplit("-", 1)[0],
                                  "domains": [domain]}  # fmt: skip


@pytest.fixture
def proxy(publisher) -> FaultProxy:
    return FaultProxy(publisher.url)


@pytest.fixture
def edge(tmp_path: Path, publisher, proxy: FaultProxy, keys: dict[str, Path]) -> Path:
    """An edge synced through the proxy (no fault yet) to the publisher's first serial."""
    config = edge_config(tmp_path / "edge", [proxy.url], [keys["public"]], publisher.edge_token, read_timeout=1)
    code, outcome = feed_sync(config)
    assert (code, outcome["result"]) == (0, "applied"), outcome
    return config


def registry_state(config: Path) -> tuple[int, str, int]:
    async def read() -> tuple[int, str, int]:
        async with open_registry(config.parent / "registry.db", create=False) as registry:
            recorded, recomputed = await registry.verify_checksum()
            assert recorded == recomputed
            state = await registry.state()
            return state.serial, state.checksum, state.filings

    return asyncio.run(read())


def resign(private: Path, lines_edit) -> callable:
    """A fault that edits a body's lines and signs the result with `private`."""

    def fault(_path: str, status: int, headers: dict, body: bytes):
        if status != 200:
            return status, headers, body
        lines = body_lines(body)
        lines_edit(lines)
        edited = make_body(lines)
        return status, headers | {"Icpgate-Signature": sign_with(private, edited)}, edited

    return fault


# --- the happy path -------------------------------------------------------------------------------


def test_edge_takes_the_snapshot_then_changes_and_matches_the_publisher(publisher, edge: Path) -> None:
    serial, checksum, filings = registry_state(edge)
    status = publisher.status()
    assert (serial, checksum, filings) == (status["serial"], status["checksum"], status["filings"])
    report = publisher.import_records([new_filing()])
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"], outcome["serial"]) == (0, "applied", report["serial"])
    assert outcome["changes"]["added"] == 1 and outcome["changes"]["listed"]["added"] == [NEW_LICENCE]
    assert registry_state(edge)[1] == publisher.status()["checksum"]
    check = run_icpgate("check", "fresh-approval.example-feed.cn", "--json", "-c", str(edge))
    assert json.loads(check.stdout)["action"] == "allow"
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"]) == (0, "unchanged")


def test_removals_and_updates_travel_as_changes(publisher, edge: Path) -> None:
    records = sample_records()
    records[0]["status"] = "deregistered"
    report = publisher.import_records(records[:-3], "--replace")  # drop three, change one
    assert (report["removed"], report["updated"]) == (3, 1)
    _code, outcome = feed_sync(edge)
    assert outcome["changes"] | {"listed": None} == {"added": 0, "changed": 1, "removed": 3, "unchanged": 0,
                                                     "listed": None}  # fmt: skip
    assert registry_state(edge)[1] == publisher.status()["checksum"]


def test_long_poll_returns_when_an_import_lands(publisher) -> None:
    serial = publisher.status()["serial"]

    async def poll() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await asyncio.to_thread(publisher.get, "/changes?since=%d&wait=20" % serial)
        return answer.status, loop.time() - started

    async def main() -> tuple[int, float]:
        waiting = asyncio.create_task(poll())
        await asyncio.sleep(1.0)
        assert not waiting.done()  # it is really waiting
        await asyncio.to_thread(publisher.import_records, [new_filing()])
        return await waiting

    status, elapsed = asyncio.run(main())
    assert status == 200 and elapsed < 10  # woken by the import, long before the 20 s wait ends


def test_publisher_answers_ahead_gone_etag_and_bad_requests(publisher) -> None:
    status = publisher.status()
    for query, expected in (("since=%d" % (status["serial"] + 5), 409), ("since=x", 400), ("", 400),
                            ("since=%d" % status["serial"], 204)):  # fmt: skip
        try:
            with publisher.get("/changes?" + query) as answer:
                assert answer.status == expected
        except urllib.error.HTTPError as error:
            assert error.code == expected, query
    with publisher.get("/snapshot") as answer:
        etag = answer.headers["ETag"]
        assert answer.headers["Icpgate-Signature"].startswith("ed25519 ")
        # Behind tokens, a shared cache must not keep a snapshot and hand it to others.
        assert (
            answer.headers["Cache-Control"].startswith("private")
            and answer.headers["Vary"] == "Authorization, Icpgate-Feed-Formats"
        )
    with pytest.raises(urllib.error.HTTPError) as error:
        publisher.get("/snapshot", {"If-None-Match": etag})
    assert error.value.code == 304  # HTTP caching still works for an authorised edge


def test_pruned_history_sends_the_client_to_a_snapshot(tmp_path: Path, keys: dict[str, Path]) -> None:
    folder = tmp_path / "publisher"
    publisher = start_publisher(folder, keys["private"], history=0.5)
    edge = edge_config(tmp_path / "edge", [publisher.url], [keys["public"]], publisher.edge_token)
    assert feed_sync(edge)[1]["result"] == "applied"
    publisher.import_records(sample_records()[:-1], "--replace")  # a removal: a tombstone
    publisher.stop()
    time.sleep(2.0)  # past the half-second history (serial times are kept to the second)
    publisher = start_publisher(folder, keys["private"], port=publisher.port, history=0.5)  # prunes at start
    try:
        assert publisher.status()["floor"] > 1
        code, outcome = feed_sync(edge)
        assert (code, outcome["result"]) == (0, "applied"), outcome
        assert registry_state(edge)[1] == publisher.status()["checksum"]
    finally:
        publisher.stop()


# --- faults: the last good registry stays, the failure is visible ---------------------------------


def _fault_cases(keys: dict[str, Path]) -> dict[str, tuple[object, str, str]]:
    """name -> (fault, expected result, a phrase of the message)."""

    def header(field: str, value: object):
        return lambda lines: lines[0].__setitem__(field, value)

    return {
        "http 500": (lambda *_: (500, {}, b"oops"), "error", "500"),
        "stalled body": (lambda *_: "stall", "error", "timed out"),
        "cut mid-body": (lambda *_: "cut", "error", ""),
        "truncated gzip": (
            lambda _p, s, h, b: (s, h | {"Icpgate-Signature": sign_with(keys["private"], b[:-9])}, b[:-9]),
            "refused_malformed",
            "gzip",
        ),
        "bad signature": (
            lambda _p, s, h, b: (s, h | {"Icpgate-Signature": h["Icpgate-Signature"][:-6] + "AAAAA="}, b),
            "refused_signature",
            "bad signature",
        ),
        "no signature": (
            lambda _p, s, h, b: (s, {k: v for k, v in h.items() if k != "Icpgate-Signature"}, b),
            "refused_signature",
            "not signed",
        ),
        "wrong key": (resign(keys["other_private"], lambda lines: None), "refused_signature", "not among"),
        "checksum mismatch": (resign(keys["private"], header("sha256", "0" * 64)), "refused_checksum", "checksum"),
        "rollback serial": (resign(keys["private"], header("serial", 1)), "refused_rollback", "behind"),
        "public suffix": (
            resign(keys["private"], lambda lines: lines.append(new_filing("com.cn", "京ICP备20990002号-1"))),
            "refused_malformed",
            "public suffix",
        ),
        "duplicate licence": (
            resign(keys["private"], lambda lines: lines.append(lines[1])),
            "refused_malformed",
            "duplicate licence",
        ),
        "unknown operation": (
            resign(keys["private"], lambda lines: lines.append({"rename": NEW_LICENCE})),
            "refused_malformed",
            "required field is missing",
        ),
        "record count": (lambda _p, s, h, b: _miscounted(keys, s, h, b), "refused_malformed", "truncated"),
        "not gzip": (
            lambda _p, s, h, b: (s, h | {"Icpgate-Signature": sign_with(keys["private"], b"{}")}, b"{}"),
            "refused_malformed",
            "gzip",
        ),
    }


def _miscounted(keys: dict[str, Path], status: int, headers: dict, body: bytes):
    lines = body_lines(body)
    lines[0]["records"] += 1  # one record announced that never comes
    edited = make_body(lines, fix_count=False)
    return status, headers | {"Icpgate-Signature": sign_with(keys["private"], edited)}, edited


FAULTS = ("http 500", "stalled body", "cut mid-body", "truncated gzip", "bad signature", "no signature", "wrong key",
          "checksum mismatch", "rollback serial", "public suffix", "duplicate licence", "unknown operation",
          "record count", "not gzip")  # fmt: skip


@pytest.mark.parametrize("name", FAULTS)
def test_a_fault_keeps_the_last_good_registry_and_says_why(
    name: str, publisher, proxy: FaultProxy, edge: Path, keys: dict[str, Path]
) -> None:
    before = registry_state(edge)
    publisher.import_records([new_filing()])
    fault, expected, phrase = _fault_cases(keys)[name]
    proxy.fault = fault
    if name == "checksum mismatch":  # a change set that does not add up: the client falls back to a snapshot
        proxy.paths = ("/feed/v1/changes", "/feed/v1/snapshot")
    code, outcome = feed_sync(edge)
    assert outcome["result"] == expected, outcome
    assert phrase.lower() in outcome["message"].lower(), outcome
    assert code == (7 if expected == "error" else 4)
    assert registry_state(edge) == before  # the last good registry stays in force
    status = feed_status(edge)
    assert status["sync"]["last_result"] == expected and status["sync"]["failures"] == 1
    assert status["sync"]["last_error"] == outcome["message"]
    assert status["freshness"]["enforcement"] == "enforce"
    proxy.fault = None
    code, outcome = feed_sync(edge)  # the fault gone, the next sync catches up
    assert (code, outcome["result"]) == (0, "applied"), outcome
    assert registry_state(edge)[1] == publisher.status()["checksum"]


def test_a_checksum_mismatch_in_changes_is_healed_by_a_snapshot(publisher, proxy: FaultProxy, edge: Path,
                                                                keys: dict[str, Path]) -> None:  # fmt: skip
    publisher.import_records([new_filing()])
    proxy.fault = resign(keys["private"], lambda lines: lines[0].__setitem__("sha256", "0" * 64))
    proxy.paths = ("/feed/v1/changes",)
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"], outcome["checksum_mismatch"]) == (0, "applied", True)
    assert registry_state(edge)[1] == publisher.status()["checksum"]
    assert feed_status(edge)["sync"]["checksum_mismatches"] == 1


def test_unknown_fields_are_kept_not_refused(publisher, edge: Path) -> None:
    publisher.import_records([new_filing() | {"future_field": {"x": 1}}])
    assert feed_sync(edge)[1]["result"] == "applied"

    async def read() -> dict:
        async with open_registry(edge.parent / "registry.db", create=False) as registry:
            return (await registry.get_filing(NEW_LICENCE)).extra

    assert asyncio.run(read()) == {"future_field": {"x": 1}}


def test_a_restored_publisher_behind_the_edge_is_a_refused_rollback(tmp_path: Path, keys: dict[str, Path]) -> None:
    folder = tmp_path / "publisher"
    publisher = start_publisher(folder, keys["private"])
    edge = edge_config(tmp_path / "edge", [publisher.url], [keys["public"]], publisher.edge_token)
    assert feed_sync(edge)[1]["result"] == "applied"
    publisher.stop()
    shutil.copy(folder / "registry.db", tmp_path / "backup.db")  # the publisher's backup at serial 1
    publisher = start_publisher(folder, keys["private"], port=publisher.port)
    publisher.import_records([new_filing()])
    assert feed_sync(edge)[1]["serial"] == 2
    publisher.stop()
    for suffix in ("", "-wal", "-shm"):
        (folder / ("registry.db" + suffix)).unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.db", folder / "registry.db")
    publisher = start_publisher(folder, keys["private"], port=publisher.port)
    try:
        before = registry_state(edge)
        code, outcome = feed_sync(edge)
        assert (code, outcome["result"]) == (4, "refused_rollback"), outcome
        assert registry_state(edge) == before
    finally:
        publisher.stop()


def test_a_second_source_is_used_when_the_first_fails(publisher, tmp_path: Path, keys: dict[str, Path]) -> None:
    dead = "http://127.0.0.1:9/feed/v1"  # discard port: nothing listens
    edge = edge_config(tmp_path / "edge", [dead, publisher.url], [keys["public"]], publisher.edge_token)
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"], outcome["source"]) == (0, "applied", publisher.url)
    assert outcome["failures"] and outcome["failures"][0].startswith(dead)


# --- guards ---------------------------------------------------------------------------------------


@pytest.fixture
def big_publisher(tmp_path: Path, keys: dict[str, Path]):
    publisher = start_publisher(tmp_path / "publisher", keys["private"], records=bulk_records(0, 150))
    yield publisher
    publisher.stop()


@pytest.mark.parametrize("change", ["mass removal", "mass addition"])
def test_guards_refuse_mass_changes_until_forced(change: str, big_publisher, tmp_path: Path,
                                                 keys: dict[str, Path]) -> None:  # fmt: skip
    edge = edge_config(tmp_path / "edge", [big_publisher.url], [keys["public"]], big_publisher.edge_token)
    assert feed_sync(edge)[1]["result"] == "applied"  # a first snapshot is not guarded: nothing to lose
    before = registry_state(edge)
    if change == "mass removal":
        big_publisher.import_records(bulk_records(0, 100), "--replace", "--force")  # 50 of 150 go: 33%
        counts = {"added": 0, "changed": 0, "removed": 50}
    else:
        big_publisher.import_records(bulk_records(150, 60), "--force")  # 60 more: 40%
        counts = {"added": 60, "changed": 0, "removed": 0}
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"]) == (4, "refused_guard"), outcome
    assert registry_state(edge) == before
    pending = feed_status(edge)["sync"]["pending"]
    assert {key: pending[key] for key in counts} == counts
    diff = run_icpgate("feed", "diff", "--json", "-c", str(edge))
    assert diff.returncode == 0, diff.stderr
    shown = json.loads(diff.stdout)["changes"]
    assert {key: shown[key] for key in counts} == counts
    assert registry_state(edge) == before  # diff changes nothing
    code, outcome = feed_sync(edge, "--force")
    assert (code, outcome["result"]) == (0, "applied")
    assert registry_state(edge)[1] == big_publisher.status()["checksum"]


def test_small_changes_pass_the_guard(big_publisher, tmp_path: Path, keys: dict[str, Path]) -> None:
    edge = edge_config(tmp_path / "edge", [big_publisher.url], [keys["public"]], big_publisher.edge_token)
    feed_sync(edge)
    big_publisher.import_records(bulk_records(150, 40))  # 27%
    assert feed_sync(edge)[1]["result"] == "applied"


# --- local sources --------------------------------------------------------------------------------


def test_file_source_folder_of_snapshot_and_changes(publisher, tmp_path: Path, keys: dict[str, Path]) -> None:
    """A site without a network path: files copied from the publisher, signatures beside them."""
    drop = tmp_path / "drop"
    drop.mkdir()

    def fetch(path: str, name: str) -> None:
        with publisher.get(path) as answer:
            (drop / name).write_bytes(answer.read())
            (drop / (name + ".sig")).write_text(answer.headers["Icpgate-Signature"])

    fetch("/snapshot", "snapshot.ndjson.gz")
    edge = edge_config(tmp_path / "edge", ["file:" + str(drop)], [keys["public"]])
    assert feed_sync(edge)[1]["result"] == "applied"
    assert feed_sync(edge)[1]["result"] == "unchanged"
    serial = publisher.status()["serial"]
    publisher.import_records([new_filing()])
    fetch("/changes?since=%d&wait=10" % serial, "changes-%d.ndjson.gz" % serial)
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"]) == (0, "applied")
    assert registry_state(edge)[1] == publisher.status()["checksum"]
    (drop / ("changes-%d.ndjson.gz.sig" % serial)).write_text("ed25519 0000000000000000 AAAA")
    (drop / "snapshot.ndjson.gz").unlink()
    assert feed_sync(edge)[1]["result"] == "unchanged"  # already applied; a forged copy changes nothing
