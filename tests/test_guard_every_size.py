"""The mass-change guard at every registry size (docs/cli.md): an import with `--replace`, a feed
change set or a snapshot that would remove every filing, or more than the guard's share, is refused
without `--force` however small the registry, on a running gate and a real publisher."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from feedkit import bulk_records, feed_status, feed_sync, make_key, start_publisher
from gatekit import free_port, gate_config, listener, start_gate
from test_feed_daemon import edge_gate_config
from test_gate_process import all_get, http_get, status_of, wait_until

from conftest import REPO, SAMPLES, run_icpgate, sample_records, write_ndjson


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_key(tmp_path_factory.mktemp("keys") / "feed.pem")


def serial_and_count(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        (serial,) = conn.execute("SELECT serial FROM state").fetchone()
        (count,) = conn.execute("SELECT COUNT(*) FROM filings").fetchone()
    return serial, count


def replace_with(config: Path, records: list[dict], *extra: str) -> tuple[int, dict]:
    path = write_ndjson(config.parent / "replacement.ndjson", records)
    result = run_icpgate("import", str(path), "--replace", "--json", "-c", str(config), *extra)
    return result.returncode, json.loads(result.stdout)


def test_an_empty_file_given_to_replace_on_a_running_gate_is_refused_and_nothing_changes(tmp_path: Path,
                                                                                           origin) -> None:  # fmt: skip
    """The story: 43 filings (under guard_min_filings), `import EMPTY --replace`. Before, it applied
    "43 removed" with exit 0 and the gate blocked every filed site."""
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", origin.http)})
    before = serial_and_count(tmp_path / "registry.db")
    assert before == (1, len(sample_records())) and before[1] < 100  # a registry the guard used to exempt
    gate = start_gate(config, {"http": port})
    try:
        assert all_get(port, "example-filed.cn", 200)
        empty = tmp_path / "empty.ndjson"
        empty.write_bytes(b"")
        result = run_icpgate("import", str(empty), "--replace", "-c", str(config))
        assert result.returncode == 4, result.stdout + result.stderr
        assert ("refused %s: the mass-change guard: it would remove every filing (43 of 43) and leave the registry"
                " empty (0 new, 0 updated, 0 unchanged, 43 removed; feed.guard_share); nothing was imported"
                % empty) in result.stderr  # fmt: skip
        assert "--dry-run" in result.stderr and "--force" in result.stderr
        assert serial_and_count(tmp_path / "registry.db") == before
        time.sleep(1.0)  # five reload intervals: a change would have reached the workers
        assert all_get(port, "example-filed.cn", 200)

        dry = run_icpgate("import", str(empty), "--replace", "--dry-run", "-c", str(config))
        assert dry.returncode == 4 and "the mass-change guard refuses this import: it would remove every filing" \
            in dry.stdout, dry.stdout + dry.stderr  # fmt: skip
        forced = run_icpgate("import", str(empty), "--replace", "--force", "-c", str(config))
        assert forced.returncode == 0, forced.stderr
        assert "warning: --force: the mass-change guard was overridden (it would remove every filing" in forced.stderr
        wait_until(lambda: status_of(http_get(port, "example-filed.cn")) == 403, timeout=10)  # what it prevented
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def test_a_small_registry_loses_one_filing_at_a_time_and_never_all_of_them(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "registry.db"\n[policy]\npack = "%s"\n'
                      % (REPO / "policies" / "default.toml"), encoding="utf-8")  # fmt: skip
    db = tmp_path / "registry.db"
    five = bulk_records(0, 5)
    code, report = replace_with(config, five)  # a first import into an empty registry is never guarded
    assert (code, report["inserted"]) == (0, 5), report

    code, report = replace_with(config, five[:2])  # 3 of 5: 60%
    assert (code, report["committed"], report["refused"]) == (4, False, "guard"), report
    assert report["refusal"] == "it would remove 3 of 5 filings (60%), more than the guard's 30%"
    assert (report["removed"], report["filings_before"]) == (3, 5) and serial_and_count(db) == (1, 5)

    code, report = replace_with(config, five[:4])  # one withdrawn filing: 20%
    assert (code, report["removed"]) == (0, 1), report
    code, report = replace_with(config, five[:2])  # 2 of 4: 50%
    assert (code, report["refused"]) == (4, "guard"), report
    code, report = replace_with(config, five[:3])  # 1 of 4: 25%
    assert (code, report["removed"]) == (0, 1), report
    code, report = replace_with(config, five[:2])  # one filing may always go, though 1 of 3 is 33% ...
    assert (code, report["removed"]) == (0, 1), report
    code, report = replace_with(config, five[:1])  # ... and 1 of 2 is 50%
    assert (code, report["removed"], serial_and_count(db)) == (0, 1, (5, 1)), report

    code, report = replace_with(config, bulk_records(100, 1))  # the last one, swapped for another
    assert (code, report["refused"]) == (4, "guard"), report
    assert report["refusal"] == "it would remove every filing (1 of 1) and add 1 new in their place"
    code, report = replace_with(config, [])
    assert report["refusal"] == "it would remove every filing (1 of 1) and leave the registry empty"
    code, report = replace_with(config, [{"licence": "not a filing"}], "--skip-invalid")  # every record skipped
    assert (code, report["skipped"], report["refused"], serial_and_count(db)) == (4, 1, "guard", (5, 1)), report

    code, report = replace_with(config, bulk_records(100, 1), "--force")
    assert (code, report["forced"], serial_and_count(db)) == (0, "it would remove every filing (1 of 1) and add 1"
                                                               " new in their place", (6, 1)), report  # fmt: skip
    code, report = replace_with(config, bulk_records(100, 60))  # additions to a small registry fill it
    assert (code, report["inserted"]) == (0, 59), report


def test_a_feed_change_set_that_would_empty_a_running_edge_is_refused(tmp_path: Path, origin, keys) -> None:
    """The publisher's operator forces an empty registry through; every edge refuses it, keeps
    serving its filed sites and shows the pending refusal, until its own operator forces it."""
    publisher = start_publisher(tmp_path / "publisher", keys[0])
    port = free_port()
    config = edge_gate_config(tmp_path / "edge", port, origin.http, {
        "urls": [publisher.url], "public_keys": [str(keys[1])], "token_file": str(publisher.edge_token),
        "start_delay": 0, "wait": 1, "backoff_max": 1.0,
    })  # fmt: skip
    gate = start_gate(config, {"http": port})
    try:
        wait_until(lambda: status_of(http_get(port, "example-filed.cn")) == 200, timeout=20)  # the first snapshot
        synced = feed_status(config)["serial"]
        publisher.import_records([], "--replace", "--force")
        wait_until(lambda: feed_status(config)["sync"].get("last_result") == "refused_guard", timeout=20)
        status = feed_status(config)
        assert (status["serial"], status["filings"]) == (synced, len(sample_records()))
        assert status["sync"]["pending"] == {
            "added": 0, "changed": 0, "removed": 43,
            "message": "it would remove every filing (43 of 43) and leave the registry empty",
        }  # fmt: skip
        assert all_get(port, "example-filed.cn", 200)

        code, outcome = feed_sync(config)  # by hand: the same answer, exit 4
        assert (code, outcome["result"]) == (4, "refused_guard"), outcome
        code, outcome = feed_sync(config, "--force")
        assert (code, outcome["result"], outcome["serial"]) == (0, "applied", publisher.status()["serial"]), outcome
        wait_until(lambda: status_of(http_get(port, "example-filed.cn")) == 403, timeout=10)
    finally:
        assert gate.stop() == 0
        publisher.stop()
    assert "Traceback" not in gate.log(), gate.log()


def test_a_snapshot_that_would_empty_an_edge_is_refused(tmp_path: Path, keys) -> None:
    """An edge holding filings takes its first snapshot from a publisher that holds none."""
    publisher = start_publisher(tmp_path / "publisher", keys[0], records=bulk_records(0, 2))
    try:
        publisher.import_records([], "--replace", "--force")
        publisher.wait_for_snapshot()
        config = edge_gate_config(tmp_path / "edge", free_port(), 9, {
            "urls": [publisher.url], "public_keys": [str(keys[1])], "token_file": str(publisher.edge_token),
            "start_delay": 0, "wait": 0,
        })  # fmt: skip
        assert run_icpgate("import", str(SAMPLES), "-c", str(config)).returncode == 0
        before = serial_and_count(tmp_path / "edge" / "registry.db")
        code, outcome = feed_sync(config)
        assert (code, outcome["result"]) == (4, "refused_guard"), outcome
        assert outcome["message"] == "it would remove every filing (43 of 43) and leave the registry empty"
        assert serial_and_count(tmp_path / "edge" / "registry.db") == before
    finally:
        publisher.stop()
