"""A registry removed or replaced under a running gate is never adopted silently: the gate keeps
enforcing its last good index, says so (/readyz warnings with status 200, the status page, a metric),
and switches only when the operator says so (`icpgate registry adopt`, or SIGHUP); a worker killed
and restarted does not count as that."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from adminkit import ObservedGate, metric, start_observed_gate
from test_gate_process import http_get, status_of, wait_until
from test_gate_workers import alive, started

from conftest import run_icpgate, sample_records, write_ndjson
from icpgate.config.settings import load_config
from icpgate.inline.watch import probe

FILED = "www.example-filed.cn"  # filed in the samples the gate starts with
UNFILED = "example-unfiled.cn"
OTHER = "only-in-the-other-registry.cn"  # filed only in the registry that appears at the path


def other_records(tmp: Path) -> Path:
    """An unrelated registry's content: one filing, for OTHER."""
    record = next(r for r in sample_records() if r["licence"] == "京ICP备20240001号-1")
    record = dict(record, licence="京ICP备29990077号-1", subject_licence="京ICP备29990077号", domains=[OTHER])
    return write_ndjson(tmp / "other.ndjson", [record])


def answers(observed: ObservedGate, host: str, count: int = 12) -> set[int]:
    """The statuses `count` connections get: with two workers, both answer some of them."""
    return {status_of(http_get(observed.http, host)) for _ in range(count)}


def rm_registry_star(registry: Path) -> None:
    """`rm registry.db*`, as the feed docs used to say: every file whose name starts so (not folders)."""
    for path in registry.parent.glob(registry.name + "*"):
        if not path.is_dir():
            path.unlink()


def readyz(observed: ObservedGate) -> tuple[int, dict]:
    status, _, body = observed.get("/readyz")
    return status, json.loads(body)


def assert_warns_and_keeps_enforcing(observed: ObservedGate) -> None:
    assert answers(observed, FILED) == {200}
    assert answers(observed, OTHER) == {403}
    assert answers(observed, UNFILED) == {403}
    status, body = readyz(observed)
    assert status == 200 and body["ready"], body  # readiness unaffected: inline, the bypass stays off
    assert [w["check"] for w in body["warnings"]] == ["registry"], body
    assert "icpgate registry adopt" in body["warnings"][0]["message"]
    assert probe("http://127.0.0.1:%d/readyz" % observed.admin, 5) is None  # what `icpgate bypass watch` asks
    page = observed.get("/")[2].decode()
    assert "Needs attention" in page and "is not the one the gate serves" in page
    assert metric(observed.metrics(), "icpgate_registry_not_adopted") == 1


def assert_adopted(observed: ObservedGate) -> None:
    wait_until(lambda: answers(observed, OTHER, 4) == {200}, timeout=15)
    assert answers(observed, OTHER) == {200}
    assert answers(observed, FILED) == {403}  # the samples are not in the adopted registry
    status, body = readyz(observed)
    assert status == 200 and body["warnings"] == [], body
    assert "Needs attention" not in observed.get("/")[2].decode()
    assert metric(observed.metrics(), "icpgate_registry_not_adopted") == 0


def test_a_registry_deleted_under_the_gate_and_imported_anew_is_adopted_only_on_sighup(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, workers=2)
    registry = load_config(observed.config).registry_path
    try:
        assert answers(observed, FILED) == {200}
        rm_registry_star(registry)
        imported = run_icpgate("import", str(other_records(tmp_path)), "-c", str(observed.config))
        assert imported.returncode == 0, imported.stderr
        time.sleep(1.0)  # five registry.reload_intervals: the workers have looked
        assert_warns_and_keeps_enforcing(observed)
        assert "the running gate does not enforce this import" in imported.stderr
        assert "keeping the index at serial" in observed.gate.log()

        # A worker killed and restarted by the supervisor is not an operator's word.
        victim = started(observed.gate.log())["worker 0"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: started(observed.gate.log())["worker 0"] != victim and not alive(victim), timeout=20)
        wait_until(lambda: observed.gate.log().count("worker 0 ready") >= 2, timeout=20)
        assert_warns_and_keeps_enforcing(observed)

        observed.gate.signal(signal.SIGHUP)  # the operator's word: adopt the registry at the path
        assert_adopted(observed)
    finally:
        assert observed.gate.stop() == 0
    assert "Traceback" not in observed.gate.log(), observed.gate.log()


def test_another_registry_moved_into_place_is_adopted_by_the_command(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, workers=2)
    registry = load_config(observed.config).registry_path
    elsewhere = tmp_path / "restore"
    elsewhere.mkdir()
    config = elsewhere / "config.toml"
    config.write_text(observed.config.read_text().replace(str(registry), str(elsewhere / "registry.db")))
    assert run_icpgate("import", str(other_records(tmp_path)), "-c", str(config)).returncode == 0
    try:
        assert answers(observed, FILED) == {200}
        os.replace(elsewhere / "registry.db", registry)  # a careless restore: another registry's file
        time.sleep(1.0)
        assert_warns_and_keeps_enforcing(observed)
        result = run_icpgate("registry", "adopt", "-c", str(observed.config), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["how"] == "rebuilt" and report["previous"]["registry"] != report["registry"]
        assert_adopted(observed)  # no reload: the workers follow an adoption by themselves
    finally:
        assert observed.gate.stop() == 0
    assert "Traceback" not in observed.gate.log(), observed.gate.log()


def test_a_restart_of_the_daemon_keeps_the_index_it_enforced(tmp_path: Path, origin) -> None:
    """A daemon restarted (by systemd after a crash, say) cannot tell a deliberate restart from a
    crash: neither adopts. It starts with the index `current` names, and warns."""
    observed = start_observed_gate(tmp_path, origin.http, origin.tls)
    registry = load_config(observed.config).registry_path
    rm_registry_star(registry)
    assert run_icpgate("import", str(other_records(tmp_path)), "-c", str(observed.config)).returncode == 0
    assert observed.gate.stop() == 0
    observed = start_observed_gate(tmp_path, origin.http, origin.tls)
    try:
        assert_warns_and_keeps_enforcing(observed)
    finally:
        assert observed.gate.stop() == 0
