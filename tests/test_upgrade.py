"""Releases side by side: the previous release (0.1.0, commit 78e0bab) from its own virtual
environment, against this code. An edge and a publisher of different releases keep filings
flowing both ways; an edge and a publisher with no feed format in common say so; an upgrade takes
a backup first and a rollback puts it back for the old release (docs/upgrading.md); the running
version is on /readyz and the status page."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
import urllib.error
from pathlib import Path

import pytest
from adminkit import start_observed_gate
from feedkit import (
    FaultProxy,
    Publisher,
    bulk_records,
    config_text,
    edge_config,
    feed_sync,
    make_key,
    start_publisher,
    write_tokens,
)
from gatekit import free_port, wait_for_port

from conftest import REPO, SAMPLES, check_json, run_icpgate, write_ndjson
from icpgate import __version__

PREVIOUS = "78e0bab"  # 0.1.0 (docs/changelog.md)
NEW_HOST = "bulk-1.example-feed.cn"  # filed by the record imported after the first sync


class OldRelease:
    """0.1.0 in a virtual environment of its own: its code first on the path, the dependencies from
    this environment's site-packages (pip cannot build a wheel offline here: setuptools 65 needs the
    `wheel` package for that), and no PYTHONPATH that could bring this code in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "venv" / "bin" / "python"
        self.pack = root / "src" / "policies" / "default.toml"
        self.env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    def command(self, *args: str) -> list[str]:
        return [str(self.python), "-m", "icpgate", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=120, env=self.env)


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> OldRelease:
    root = tmp_path_factory.mktemp("release-0.1.0")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS, "daemon", "policies", "pyproject.toml"],
                             capture_output=True, check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root / "src", filter="data")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    (site / "0-icpgate-release.pth").write_text(str(root / "src" / "daemon") + "\n")
    dependencies = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout  # fmt: skip
    (site / "1-dependencies.pth").write_text(dependencies)
    release = OldRelease(root)
    version = release.run("--version")
    assert version.stdout.strip() == "icpgate 0.1.0", version.stdout + version.stderr
    located = subprocess.run([str(release.python), "-c", "import icpgate; print(icpgate.__file__)"],
                             capture_output=True, text=True, env=release.env, check=True).stdout  # fmt: skip
    assert located.startswith(str(root / "src")), located
    return release


def old_config(path: Path, release: OldRelease) -> Path:
    """A config written by the test kit, with the old release's own policy pack."""
    path.write_text(path.read_text().replace(str(REPO / "policies" / "default.toml"), str(release.pack)))
    return path


def start_old_publisher(tmp: Path, release: OldRelease, key: Path) -> Publisher:
    tmp.mkdir(parents=True)
    write_tokens(tmp, "edge")
    config = old_config(config_text(tmp, registry=tmp / "registry.db", publish={
        "signing_key": str(key), "tokens_file": str(tmp / "tokens")}), release)  # fmt: skip
    assert release.run("import", str(SAMPLES), "-c", str(config)).returncode == 0
    log = tmp / "publisher.log"
    port = free_port()  # 0.1.0 takes no port 0
    process = subprocess.Popen(release.command("feed", "serve", "--listen", "127.0.0.1:%d" % port, "-c", str(config)),
                               stdout=log.open("w"), stderr=subprocess.STDOUT, env=release.env)  # fmt: skip
    wait_for_port(port, process=process, log=log)
    publisher = Publisher(config, port, process, log, tmp / "edge.token")
    publisher.wait_for_snapshot()
    return publisher


def wait_for_serial(publisher: Publisher, serial: int) -> None:
    deadline = time.monotonic() + 30
    while publisher.status()["serial"] != serial:
        assert time.monotonic() < deadline, publisher.log.read_text()
        time.sleep(0.05)


def test_a_new_edge_follows_the_previous_release_s_publisher(tmp_path: Path, old_release: OldRelease) -> None:
    private, public = make_key(tmp_path / "feed.key")
    publisher = start_old_publisher(tmp_path / "publisher", old_release, private)
    try:
        edge = edge_config(tmp_path / "edge", [publisher.url], [public], publisher.edge_token)
        code, outcome = feed_sync(edge)  # a snapshot
        assert code == 0 and outcome["result"] == "applied" and outcome["serial"] == 1, outcome
        assert check_json(edge, "www.example-filed.cn")["action"] == "allow"
        assert check_json(edge, NEW_HOST)["action"] == "block"

        batch = write_ndjson(tmp_path / "batch.ndjson", bulk_records(1, 1))
        assert old_release.run("import", str(batch), "-c", str(publisher.config)).returncode == 0
        wait_for_serial(publisher, 2)
        code, outcome = feed_sync(edge)  # the changes since serial 1
        assert code == 0 and outcome["result"] == "applied" and outcome["serial"] == 2, outcome
        assert outcome["changes"]["added"] == 1, outcome
        assert check_json(edge, NEW_HOST)["action"] == "allow"
        status = run_icpgate("feed", "status", "--json", "-c", str(edge))
        assert json.loads(status.stdout)["checksum"] == publisher.status()["checksum"]
    finally:
        publisher.stop()


def test_the_previous_release_s_edge_follows_a_new_publisher(tmp_path: Path, old_release: OldRelease) -> None:
    private, public = make_key(tmp_path / "feed.key")
    publisher = start_publisher(tmp_path / "publisher", private)
    try:
        assert publisher.status()["formats"] == ["icpgate-feed/2"]
        edge = old_config(edge_config(tmp_path / "edge", [publisher.url], [public], publisher.edge_token),
                          old_release)  # fmt: skip

        def old_sync() -> dict:
            result = old_release.run("feed", "sync", "--json", "-c", str(edge))
            assert result.returncode == 0, result.stdout + result.stderr
            return json.loads(result.stdout)

        def old_check(host: str) -> str:
            return json.loads(old_release.run("check", host, "--json", "-c", str(edge)).stdout)["action"]

        assert old_sync()["serial"] == 1
        assert old_check("www.example-filed.cn") == "allow" and old_check(NEW_HOST) == "block"
        publisher.import_records(bulk_records(1, 1))
        wait_for_serial(publisher, 2)
        outcome = old_sync()
        assert outcome["result"] == "applied" and outcome["serial"] == 2 and outcome["changes"]["added"] == 1
        assert old_check(NEW_HOST) == "allow"
    finally:
        publisher.stop()


def test_a_publisher_answers_an_edge_it_shares_no_format_with_406_naming_its_own(tmp_path: Path) -> None:
    private, _public = make_key(tmp_path / "feed.key")
    publisher = start_publisher(tmp_path / "publisher", private)
    try:
        with publisher.get("/changes?since=0", {"Icpgate-Feed-Formats": "icpgate-feed/3, icpgate-feed/2"}) as answer:
            assert answer.headers["Icpgate-Feed-Format"] == "icpgate-feed/2"  # the newest both know
        with publisher.get("/snapshot") as answer:  # an edge that names none (0.1.0): the baseline
            assert answer.headers["Icpgate-Feed-Format"] == "icpgate-feed/2"
        for path in ("/snapshot", "/changes?since=0"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                publisher.get(path, {"Icpgate-Feed-Formats": "icpgate-feed/3"})
            assert refused.value.code == 406 and refused.value.headers["Icpgate-Feed-Formats"] == "icpgate-feed/2"
    finally:
        publisher.stop()


def test_an_edge_told_406_names_both_releases_formats(tmp_path: Path) -> None:
    """A publisher of a later release that no longer writes any format this edge reads (a part that
    does not exist yet: its answer is made by the proxy)."""
    private, public = make_key(tmp_path / "feed.key")
    publisher = start_publisher(tmp_path / "publisher", private)
    proxy = FaultProxy(publisher.url)
    proxy.fault = lambda _path, _status, _headers, _body: (406, {"Icpgate-Feed-Formats": "icpgate-feed/3"}, b"")
    try:
        edge = edge_config(tmp_path / "edge", [proxy.url], [public], publisher.edge_token)
        code, outcome = feed_sync(edge)
        assert code == 7 and outcome["result"] == "error", outcome
        assert "speaks feed formats icpgate-feed/3, this edge reads icpgate-feed/2" in outcome["message"], outcome
        assert "docs/upgrading.md" in outcome["message"]
    finally:
        publisher.stop()


def test_upgrade_from_the_previous_release_and_roll_back(tmp_path: Path, old_release: OldRelease) -> None:
    """docs/upgrading.md: back up with the new release before it opens anything (a backup does not
    migrate), upgrade (the registry moves to schema 5, which 0.1.0 refuses), then roll back by
    restoring that backup as it was and removing the index folder."""
    config = old_config(config_text(tmp_path, registry=tmp_path / "state" / "registry.db"), old_release)
    assert old_release.run("import", str(SAMPLES), "-c", str(config)).returncode == 0
    registry = tmp_path / "state" / "registry.db"

    def schema() -> int:
        with sqlite3.connect(registry) as db:
            return db.execute("PRAGMA user_version").fetchone()[0]

    backup = run_icpgate("backup", str(tmp_path / "backups"), "-c", str(config), "--json")
    assert backup.returncode == 0, backup.stderr
    manifest = json.loads(backup.stdout)
    assert manifest["files"]["registry"]["schema"] == 4 and schema() == 4  # nothing migrated

    batch = write_ndjson(tmp_path / "batch.ndjson", bulk_records(1, 1))
    assert run_icpgate("import", str(batch), "-c", str(config)).returncode == 0  # the upgrade's first write
    assert schema() == 5
    refused = old_release.run("check", "www.example-filed.cn", "-c", str(config))
    assert refused.returncode == 5 and "schema version 5" in refused.stderr, refused.stderr

    restored = run_icpgate("restore", manifest["folder"], "--no-migrate", "-c", str(config))
    assert restored.returncode == 0, restored.stderr
    shutil.rmtree(tmp_path / "state" / "registry.db.index")
    assert schema() == 4
    for host, action in (("www.example-filed.cn", "allow"), (NEW_HOST, "block")):
        result = old_release.run("check", host, "--json", "-c", str(config))
        assert json.loads(result.stdout)["action"] == action, result.stderr
    assert old_release.run("import", str(batch), "-c", str(config)).returncode == 0  # the old release writes again


def test_the_version_is_on_readyz_and_the_status_page(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls)
    try:
        assert observed.json("/readyz")["version"] == __version__
        assert "icpgate %s" % __version__ in observed.get("/")[2].decode()
    finally:
        assert observed.gate.stop() == 0
    assert run_icpgate("--version").stdout.strip() == "icpgate %s" % __version__ != "icpgate 0.1.0"
