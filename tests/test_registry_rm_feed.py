"""Issue 20's first story with the feed: an edge daemon (two workers, the feed client in the service
process) follows a real publisher; while it runs, its registry is deleted with `rm registry.db*`
(or another registry's file is copied into place), and the feed client makes a new registry and
takes a snapshot into it (or refuses to sync into the other one). The gate keeps serving its last
good index throughout and says so (/readyz 200 with a `warnings` entry, the status page's banner,
icpgate_registry_not_adopted), until the recovery procedure of docs/feed-protocol.md, run command
by command, adopts the snapshot's registry."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from adminkit import TOKEN, ObservedGate, by_worker, metric
from feedkit import Publisher, make_key, start_publisher
from gatekit import free_port, gate_config, listener, start_gate, wait_for_port
from test_gate_process import http_get, status_of, wait_until

from conftest import REPO, run_icpgate, sample_records, write_ndjson
from icpgate.inline.watch import probe
from icpgate.registry.store import open_registry

FILED = "www.example-filed.cn"  # filed in the samples the publisher starts with
UNFILED = "example-unfiled.cn"
NEW = "approved-after-the-rm.example-feed.cn"  # filed at the publisher once the edge's registry is gone
OTHER = "only-in-the-restored-registry.cn"  # filed only in the unrelated registry copied into place


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_key(tmp_path_factory.mktemp("keys") / "feed.pem")


def filing(domain: str, number: int) -> dict:
    subject = "京ICP备2097%04d号" % number
    return sample_records()[0] | {"licence": subject + "-1", "subject_licence": subject, "domains": [domain]}


def start_edge(tmp: Path, backend: int, publisher: Publisher, public_key: Path, **feed: object) -> ObservedGate:
    """A two-worker edge with its admin API, whose registry comes from the publisher alone."""
    tmp.mkdir()
    http, admin = free_port(), free_port()
    (tmp / "admin.token").write_text(TOKEN + "\n")
    feed = {"urls": [publisher.url], "public_keys": [str(public_key)], "token_file": str(publisher.edge_token),
            "start_delay": 0, "wait": 1} | feed  # fmt: skip
    tables = {"admin": {"enabled": True, "port": admin, "token_file": str(tmp / "admin.token")},
              "dns": {"enabled": False}, "feed": feed}  # fmt: skip
    config = gate_config(tmp, {"http": listener(http, "http", backend)}, gate={"workers": 2}, tables=tables)
    for path in tmp.glob("registry.db*"):  # gate_config imported the samples: a new edge has nothing yet
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    observed = ObservedGate(start_gate(config, {"http": http}), http, 0, admin, config)
    try:
        wait_for_port(admin)
        wait_until(lambda: observed.get("/readyz")[0] == 200 and status_of(http_get(http, FILED)) == 200, timeout=20)
    except Exception:
        observed.gate.stop()
        raise
    return observed


class Traffic(threading.Thread):
    """A filed and an unfiled site requested in turn, and /readyz, until stopped (at most `limit`
    rounds): every answer but 200, 403 and 200 respectively is kept."""

    def __init__(self, observed: ObservedGate, limit: int = 5000) -> None:
        super().__init__(daemon=True)
        self.observed, self.port, self.limit = observed, observed.http, limit
        self.rounds = 0
        self.wrong: list[tuple] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.rounds < self.limit:
            for host, expected in ((FILED, 200), (UNFILED, 403)):
                status = status_of(http_get(self.port, host))
                if status != expected:
                    self.wrong.append((host, status))
            status, _, body = self.observed.get("/readyz")
            if status != 200:  # with the checks that failed, to say why
                failed = [name for name, check in json.loads(body)["checks"].items() if not check["ok"]]
                self.wrong.append(("/readyz", status, failed))
            self.rounds += 1
            time.sleep(0.01)

    def stop(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join(30)


def admin_at_once(observed: ObservedGate, rounds: int = 16) -> set[int]:
    """The statuses of /readyz, /metrics and the status page asked from eight threads at once, as
    a scrape, the bypass watcher's probe and a browser meet on one admin connection to the registry."""
    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(lambda path: observed.get(path)[0], ["/readyz", "/metrics", "/"] * rounds))


def answers(observed: ObservedGate, host: str, count: int = 12) -> set[int]:
    """The statuses `count` connections get: with two workers, both answer some of them."""
    return {status_of(http_get(observed.http, host)) for _ in range(count)}


def feed_serial_at_path(config: Path) -> int | None:
    """`icpgate feed status` on the registry at the path (None while there is none)."""
    result = run_icpgate("feed", "status", "--json", "-c", str(config))
    return json.loads(result.stdout)["serial"] if result.returncode == 0 else None


def feed_sync_of(config: Path) -> dict:
    """The sync status of the registry at the path (`icpgate feed status`), {} while there is none."""
    result = run_icpgate("feed", "status", "--json", "-c", str(config))
    return json.loads(result.stdout)["sync"] if result.returncode == 0 else {}


def index_serials(observed: ObservedGate) -> dict[str, float]:
    return by_worker(observed.metrics(), "icpgate_index_serial")


def assert_kept_and_warned(observed: ObservedGate, served: int, registry: int) -> None:
    """The index at serial `served` is enforced, the registry at the path (at `registry`) is not."""
    assert answers(observed, FILED) == {200}
    assert answers(observed, UNFILED) == {403}
    status, _, body = observed.get("/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"], ready  # inline, a 503 would route the hosted ranges around the gate
    assert [w["check"] for w in ready["warnings"]] == ["registry"], ready
    assert "icpgate registry adopt" in ready["warnings"][0]["message"]
    assert admin_at_once(observed) == {200}
    assert probe("http://127.0.0.1:%d/readyz" % observed.admin, 5) is None  # what `icpgate bypass watch` asks
    page = observed.get("/")[2].decode()
    assert "Needs attention" in page and "is not the one the gate serves" in page
    metrics = observed.metrics()
    assert metric(metrics, "icpgate_registry_not_adopted") == 1
    assert metric(metrics, "icpgate_feed_serial") == registry  # docs/metrics.md: the registry's serial
    assert index_serials(observed) == {"0": served, "1": served}  # each worker's index


def assert_adopted(observed: ObservedGate, serial: int) -> None:
    wait_until(lambda: answers(observed, NEW, 4) == {200}, timeout=15)
    assert answers(observed, NEW) == {200} and answers(observed, FILED) == {200}
    assert answers(observed, UNFILED) == {403}
    status, _, body = observed.get("/readyz")
    assert status == 200 and json.loads(body)["warnings"] == [], body
    assert "Needs attention" not in observed.get("/")[2].decode()
    metrics = observed.metrics()
    assert metric(metrics, "icpgate_registry_not_adopted") == 0
    assert metric(metrics, "icpgate_feed_serial") == serial
    wait_until(lambda: index_serials(observed) == {"0": serial, "1": serial}, timeout=5)  # copied every second


# docs/feed-protocol.md, "Recovery: a new registry on a running edge", as an operator types it.
RECOVERY = [
    "cd /var/lib/icpgate && mkdir -p old",
    "mv registry.db-wal registry.db-shm registry.db old/",
    "icpgate feed status -c /etc/icpgate/config.toml",
    "icpgate check example-filed.cn -c /etc/icpgate/config.toml",
    "icpgate registry adopt -c /etc/icpgate/config.toml",
    "curl -s http://127.0.0.1:9180/readyz",
]


def recover(observed: ObservedGate, publisher_serial: int) -> None:
    """Run the documented procedure, each command as written there with this edge's folder,
    config and admin port, in a shell."""
    procedure = (REPO / "docs" / "feed-protocol.md").read_text().split("## Recovery")[1].split("\n## ")[0]
    commands = re.findall(r"^([^#\s].*?)(?:\s+#.*)?$", procedure.split("```sh\n")[1].split("```")[0], re.MULTILINE)
    assert commands == RECOVERY, commands  # the test follows the docs: a changed procedure changes it too
    edge, config = observed.config.parent, str(observed.config)
    path = os.environ | {"PATH": "%s:%s" % (Path(sys.executable).parent, os.environ["PATH"])}  # this `icpgate`

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        command = command.replace("/etc/icpgate/config.toml", config).replace("/var/lib/icpgate", str(edge))
        command = command.replace("127.0.0.1:9180", "127.0.0.1:%d" % observed.admin)
        return subprocess.run(["bash", "-c", command], cwd=edge, capture_output=True, text=True, timeout=60, env=path)

    assert sh(RECOVERY[0]).returncode == 0
    moved = sh(RECOVERY[1])
    assert moved.returncode == 0 and (edge / "old" / "registry.db").is_file(), moved.stderr
    # "wait until the serial is the publisher's": the feed client made a registry and took a snapshot
    at = re.compile(r"^serial\s+%d\b" % publisher_serial, re.MULTILINE)
    wait_until(lambda: at.search(sh(RECOVERY[2]).stdout), timeout=20, step=0.2)
    checked = sh(RECOVERY[3])
    assert checked.returncode == 0 and "approved" in checked.stdout.lower(), checked.stdout + checked.stderr
    adopted = sh(RECOVERY[4])
    assert adopted.returncode == 0, adopted.stdout + adopted.stderr
    wait_until(lambda: json.loads(sh(RECOVERY[5]).stdout)["warnings"] == [], timeout=10, step=0.2)


def test_rm_registry_under_a_feed_edge_keeps_serving_until_the_documented_recovery(
    tmp_path: Path, origin, keys
) -> None:  # fmt: skip
    publisher = start_publisher(tmp_path / "publisher", keys[0])
    try:
        observed = start_edge(tmp_path / "edge", origin.http, publisher, keys[1])
    except Exception:
        publisher.stop()
        raise
    traffic = Traffic(observed)
    try:
        served = publisher.status()["serial"]
        wait_until(lambda: index_serials(observed) == {"0": served, "1": served}, timeout=10)
        traffic.start()
        removed = subprocess.run("rm registry.db*", shell=True, cwd=observed.config.parent, capture_output=True,
                                 text=True)  # fmt: skip
        assert "registry.db.index" in removed.stderr and "Is a directory" in removed.stderr  # the folder stays
        assert not (observed.config.parent / "registry.db").exists()
        publisher.import_records([filing(NEW, 1)])  # the feed moves on meanwhile: its snapshot holds NEW
        wait_until(lambda: feed_serial_at_path(observed.config) == served + 1, timeout=20, step=0.2)
        time.sleep(1.0)  # five registry.reload_intervals: the workers have looked at the new registry
        assert_kept_and_warned(observed, served, served + 1)
        assert answers(observed, NEW) == {403}  # the new registry is not enforced before it is adopted
        assert "is another file now: syncing into it" in observed.gate.log()

        recover(observed, served + 1)
        assert_adopted(observed, served + 1)
        traffic.stop()
        assert traffic.rounds > 20 and traffic.wrong == [], (traffic.rounds, traffic.wrong[:10])
    finally:
        traffic.stop()
        assert observed.gate.stop() == 0
        publisher.stop()
    assert "Traceback" not in observed.gate.log(), observed.gate.log()


def test_an_unrelated_registry_copied_into_place_under_a_feed_edge_is_not_enforced_until_recovery(
    tmp_path: Path, origin, keys
) -> None:  # fmt: skip
    """A careless restore: the live files moved aside and an unrelated registry's file copied to the
    path. It was never synced: were its feed status read as the enforced index's, the feed would look
    expired, /readyz would fail and feed.stale_mode = "open" would let the unfiled site through. The
    feed's long-poll of 5 s: the workers find the file before the feed client does."""
    publisher = start_publisher(tmp_path / "publisher", keys[0])
    try:
        observed = start_edge(tmp_path / "edge", origin.http, publisher, keys[1], stale_mode="open", wait=5)
    except Exception:
        publisher.stop()
        raise
    traffic = Traffic(observed)
    try:
        elsewhere = tmp_path / "elsewhere"  # the unrelated registry: one import of its own
        elsewhere.mkdir()
        config = elsewhere / "config.toml"
        config.write_text(observed.config.read_text().replace(str(observed.config.parent), str(elsewhere)))
        other = write_ndjson(elsewhere / "other.ndjson", [filing(OTHER, 2)])
        assert run_icpgate("import", str(other), "-c", str(config)).returncode == 0
        served = publisher.status()["serial"]
        wait_until(lambda: index_serials(observed) == {"0": served, "1": served}, timeout=10)
        traffic.start()
        # The live files out of the way as the docs say (a file copied over the live registry.db is
        # paired by SQLite with the live -wal and -shm: it reads as the old registry, see the docs),
        # then the wrong registry copied in, by hand, while the feed runs.
        edge = observed.config.parent
        moved = subprocess.run("mkdir -p aside && mv registry.db-wal registry.db-shm registry.db aside/"
                               " && cp %s registry.db" % (elsewhere / "registry.db"), shell=True, cwd=edge)  # fmt: skip
        assert moved.returncode == 0
        publisher.import_records([filing(NEW, 1)])
        # The feed client syncs into the registry at the path and refuses: it is not the publisher's history.
        wait_until(lambda: feed_sync_of(observed.config).get("publisher_serial") == served + 1, timeout=20, step=0.2)
        assert feed_sync_of(observed.config)["last_result"].startswith("refused"), feed_sync_of(observed.config)
        time.sleep(1.0)
        assert_kept_and_warned(observed, served, 1)  # the copied registry's serial: its one import
        assert answers(observed, NEW) == {403} and answers(observed, OTHER) == {403}
        traffic.stop()
        assert traffic.wrong == [], traffic.wrong[:10]

        # A daemon restarted meanwhile (systemd after a crash) has no last state of its own to go by.
        assert observed.gate.stop() == 0
        assert "Traceback" not in observed.gate.log(), observed.gate.log()
        observed = ObservedGate(start_gate(observed.config, {"http": observed.http}), observed.http, 0, observed.admin,
                                observed.config)  # fmt: skip
        wait_for_port(observed.admin)
        wait_until(lambda: observed.get("/readyz")[0] == 200, timeout=20)
        traffic = Traffic(observed)
        traffic.start()
        assert_kept_and_warned(observed, served, 1)
        assert answers(observed, NEW) == {403} and answers(observed, OTHER) == {403}

        recover(observed, served + 1)
        assert_adopted(observed, served + 1)
        assert answers(observed, OTHER) == {403}  # the snapshot's registry, not the one copied in
        traffic.stop()
        assert traffic.rounds > 20 and traffic.wrong == [], (traffic.rounds, traffic.wrong[:10])
    finally:
        traffic.stop()
        assert observed.gate.stop() == 0
        publisher.stop()
    assert "Traceback" not in observed.gate.log(), observed.gate.log()


def test_a_registry_the_feed_client_makes_at_the_path_is_never_seen_without_its_sync_status(tmp_path: Path) -> None:
    """The admin API reads the registry at the path as soon as a file is there; one that the feed
    client made but had not yet given the sync status it carries reads as never synced, the feed
    check "expired", and /readyz 503 (seen once in a full run, on the daemon restarted above). A
    reader polls the path from another thread while the registry is made there."""
    path = tmp_path / "registry.db"
    carried = {"last_success": "2026-12-07T06:00:00Z", "registry": "the-enforced-one"}
    seen: list[object] = []
    made = threading.Event()

    def poll() -> None:
        while True:
            done = made.is_set()  # one look after the registry is made, then no more
            if path.exists():
                with sqlite3.connect(path, timeout=5) as db:
                    try:
                        row = db.execute("SELECT status FROM sync_status").fetchone()
                    except sqlite3.OperationalError as error:  # a file whose schema is not made yet
                        row = (str(error),)
                seen.append(json.loads(row[0]) if row and row[0].startswith("{") else row)
            if done:
                return
            time.sleep(0.0005)

    async def remake() -> None:
        async with open_registry(path) as registry:
            old = (await registry.state()).registry_id
            for file in tmp_path.glob("registry.db*"):
                file.unlink()
            reader = threading.Thread(target=poll)
            reader.start()
            try:
                assert await registry.follow(create=True, sync_status=carried)
            finally:
                made.set()
                reader.join(10)
            assert await registry.sync_status() == carried
            assert (await registry.state()).registry_id not in ("", old)  # a registry of its own

    asyncio.run(remake())
    assert seen and all(status == carried for status in seen), seen[:5]
    assert sorted(file.name for file in tmp_path.iterdir() if file.name.startswith(".")) == []  # nothing staged left


def test_an_index_not_adopted_ages_from_its_own_last_sync_in_the_workers_as_in_readyz(
    tmp_path: Path, origin, keys
) -> None:  # fmt: skip
    """While the registry at the path is not adopted the feed syncs into it, not into the index the
    gate enforces: that index ages from its own last sync. Past max_staleness (6 s here) the workers
    take feed.stale_mode ("monitor": the unfiled site is relayed) just as /readyz says "expired";
    the old workers kept enforcing while /readyz failed. Adopting makes both fresh again."""
    publisher = start_publisher(tmp_path / "publisher", keys[0])
    try:
        observed = start_edge(tmp_path / "edge", origin.http, publisher, keys[1], stale_after=1, max_staleness=6,
                              stale_mode="monitor")  # fmt: skip
    except Exception:
        publisher.stop()
        raise
    try:
        served = publisher.status()["serial"]
        wait_until(lambda: index_serials(observed) == {"0": served, "1": served}, timeout=10)
        # Before its first sync the edge was "never synced", expired: monitoring. Now it enforces.
        wait_until(lambda: answers(observed, UNFILED, 4) == {403}, timeout=10)
        removed_at = time.monotonic()  # the index enforced last synced at most ~2 s before (feed.wait = 1)
        subprocess.run("rm -f registry.db registry.db-wal registry.db-shm", shell=True, cwd=observed.config.parent,
                       check=True)  # fmt: skip
        while answers(observed, UNFILED, 4) == {403}:  # until both workers are in monitor mode: relayed
            assert time.monotonic() - removed_at < 20, "still enforcing 20 s after the last sync it had"
            time.sleep(0.1)
        wait_until(lambda: answers(observed, UNFILED, 4) == {200}, timeout=5)
        assert time.monotonic() - removed_at > 3  # aged to max_staleness (6 s), not switched at the rm
        assert feed_serial_at_path(observed.config) == served  # the feed synced meanwhile, into the new file
        status, _, body = observed.get("/readyz")
        assert status == 503 and json.loads(body)["checks"]["feed"]["state"] == "expired", body
        assert answers(observed, FILED) == {200}

        adopted = run_icpgate("registry", "adopt", "-c", str(observed.config))
        assert adopted.returncode == 0, adopted.stdout + adopted.stderr
        wait_until(lambda: answers(observed, UNFILED, 4) == {403}, timeout=15)
        wait_until(lambda: observed.get("/readyz")[0] == 200, timeout=10)
    finally:
        assert observed.gate.stop() == 0
        publisher.stop()
    assert "Traceback" not in observed.gate.log(), observed.gate.log()
