"""Backup and restore (docs/deployment.md, "Backup and restore"): a backup taken while a real edge
serves traffic and follows a feed that imports keep moving is one consistent commit of each file,
with a manifest that a restore checks; a restore on the running edge puts back exactly what the
manifest says, and the gate keeps enforcing its last good index, and warns, until the operator
adopts the restored registry. A damaged backup is refused and changes nothing."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

from adminkit import ObservedGate, metric, start_observed_gate
from feedkit import bulk_records, config_text, make_key, start_publisher
from test_gate_process import http_get, status_of, wait_until

from conftest import REPO, SAMPLES, run_icpgate

NEW_HOST = "bulk-900.example-feed.cn"  # filed after the backup
CHECKSUM_MODULUS = 1 << 256
ICPGATE_PROGRAM = Path(sys.executable).with_name("icpgate")  # the venv's console script


def backup(dest: Path, config: Path, *extra: str) -> dict:
    result = run_icpgate("backup", str(dest), "-c", str(config), "--json", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def registry_facts(path: Path) -> dict:
    """Serial, id, recorded checksum, the checksum summed here from the digests, and the filings."""
    with closing(sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)) as db:
        serial, checksum, registry_id = db.execute("SELECT serial, checksum, registry_id FROM state").fetchone()
        total = sum(int.from_bytes(digest) for (digest,) in db.execute("SELECT digest FROM filings"))
        filings = db.execute("SELECT COUNT(*) FROM filings").fetchone()[0]
    return {"serial": serial, "checksum": checksum, "id": registry_id, "summed": "%064x" % (total % CHECKSUM_MODULUS),
            "filings": filings}  # fmt: skip


def rows(path: Path, table: str) -> int:
    with closing(sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)) as db:
        return db.execute("SELECT COUNT(*) FROM %s" % table).fetchone()[0]


class Load:
    """Traffic to the edge (filed and unfiled names: violations to record) and imports into the
    publisher (feed changes for the edge), each in a thread, bounded, until stopped."""

    def __init__(self, edge: ObservedGate, publisher) -> None:
        self.stop = threading.Event()
        self.requests = self.imports = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._traffic, args=(edge,)),
                        threading.Thread(target=self._imports, args=(publisher,))]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def _traffic(self, edge: ObservedGate) -> None:
        while not self.stop.is_set() and self.requests < 5000:
            host = "www.example-filed.cn" if self.requests % 2 else "rogue-%d.example-unfiled.cn" % self.requests
            if status_of(http_get(edge.http, host)) not in (200, 403):
                self.errors.append(host)
            self.requests += 1

    def _imports(self, publisher) -> None:
        while not self.stop.is_set() and self.imports < 40:
            publisher.import_records(bulk_records(100 + 20 * self.imports, 20))
            self.imports += 1

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        assert not self.errors, self.errors[:5]


def test_a_backup_under_load_restores_equal_and_is_enforced_only_once_adopted(tmp_path: Path, origin) -> None:
    private, public = make_key(tmp_path / "feed.key")
    publisher = start_publisher(tmp_path / "publisher", private)
    feed = {"urls": [publisher.url], "public_keys": [str(public)], "token_file": str(publisher.edge_token),
            "start_delay": 0, "wait": 5, "min_interval": 0.05, "guard_min_filings": 1_000_000}  # fmt: skip
    (tmp_path / "edge").mkdir()
    try:
        edge = start_observed_gate(tmp_path / "edge", origin.http, origin.tls, workers=2, tables={"feed": feed})
    except BaseException:
        publisher.stop()
        raise
    registry = tmp_path / "edge" / "registry.db"
    violations = registry.with_suffix(".violations.db")
    try:
        load = Load(edge, publisher)
        try:
            wait_until(lambda: load.imports >= 2 and rows(violations, "violations") > 0, timeout=60)
            taken = []
            for _ in range(3):  # backups of the edge, and one of the publisher, while everything runs
                taken.append(backup(tmp_path / "backups", edge.config))
                time.sleep(0.3)
            central = backup(tmp_path / "central", publisher.config)
        finally:
            load.finish()
        assert load.requests > 100 and load.imports >= 3, (load.requests, load.imports)

        # Each backup is one commit: its registry is a serial the publisher made, with that serial's checksum.
        with closing(sqlite3.connect(tmp_path / "publisher" / "registry.db")) as db:
            published = dict(db.execute("SELECT serial, checksum FROM serials"))
        for manifest in [*taken, central]:
            copy = registry_facts(Path(manifest["folder"]) / "registry.db")
            assert copy["summed"] == copy["checksum"] == manifest["registry"]["checksum"], manifest
            assert (
                copy["serial"] == manifest["registry"]["serial"] and copy["filings"] == manifest["registry"]["filings"]
            )
            assert published[copy["serial"]] == copy["checksum"], (copy, published)
        assert len({manifest["registry"]["serial"] for manifest in taken}) >= 1
        chosen = taken[0]
        assert chosen["files"]["violations"]["counts"]["violations"] > 0, chosen
        assert set(chosen["files"]) == {"registry", "violations"}  # no inspection history on this edge

        # The edge moves on past the backup: a filing the backup does not have is enforced.
        publisher.import_records(bulk_records(900, 1))
        wait_until(lambda: status_of(http_get(edge.http, NEW_HOST)) == 200, timeout=30)
        enforced = registry_facts(registry)
        publisher.stop()  # nothing moves the restored registry on until the publisher is back
        time.sleep(1.0)  # the last violations are flushed (violations.flush_interval = 0.2)

        result = run_icpgate("restore", chosen["folder"], "-c", str(edge.config), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        restored = json.loads(result.stdout)
        assert restored["adopt"] and restored["enforced"]["serial"] == enforced["serial"], restored
        text = run_icpgate("restore", chosen["folder"], "--check", "-c", str(edge.config))
        assert text.returncode == 0 and "matches its manifest" in text.stdout

        live = registry_facts(registry)
        assert live["serial"] == chosen["registry"]["serial"] < enforced["serial"]
        assert live["checksum"] == live["summed"] == chosen["registry"]["checksum"]
        assert live["filings"] == chosen["registry"]["filings"]
        assert live["id"] == restored["registry_id"] not in (chosen["registry"]["id"], enforced["id"], "")
        assert rows(violations, "violations") == chosen["files"]["violations"]["counts"]["violations"]
        assert Path(restored["saved"], "manifest.json").is_file()  # what it replaced, kept

        # No silent rollback: the gate keeps its last good index and says so until adopted.
        time.sleep(1.0)  # five registry.reload_intervals: the workers have looked
        assert {status_of(http_get(edge.http, NEW_HOST)) for _ in range(6)} == {200}
        ready = edge.json("/readyz")
        assert ready["ready"] and [w["check"] for w in ready["warnings"]] == ["registry"], ready
        assert "icpgate registry adopt" in ready["warnings"][0]["message"]
        assert metric(edge.metrics(), "icpgate_registry_not_adopted") == 1

        adopted = run_icpgate("registry", "adopt", "-c", str(edge.config), "--json")
        assert adopted.returncode == 0, adopted.stderr
        assert json.loads(adopted.stdout)["registry"] == restored["registry_id"]
        wait_until(lambda: {status_of(http_get(edge.http, NEW_HOST)) for _ in range(6)} == {403}, timeout=15)
        assert edge.json("/readyz")["warnings"] == []
        assert metric(edge.metrics(), "icpgate_registry_not_adopted") == 0

        # The adopted registry follows the feed again from the restored serial.
        publisher = start_publisher(tmp_path / "publisher", private, port=publisher.port)
        wait_until(lambda: status_of(http_get(edge.http, NEW_HOST)) == 200, timeout=30)
        assert registry_facts(registry)["checksum"] == publisher.status()["checksum"]
    finally:
        publisher.stop()
        assert edge.gate.stop() == 0
    assert "Traceback" not in edge.gate.log(), edge.gate.log()


def small_edge(tmp: Path) -> Path:
    """A stopped edge: the samples in its registry, a customer map in its violation log."""
    config = config_text(tmp, registry=tmp / "state" / "registry.db")
    assert run_icpgate("import", str(SAMPLES), "-c", str(config)).returncode == 0
    customers = tmp / "customers.csv"
    customers.write_text("network,name,contract\n203.0.113.0/28,示例客户甲,HT-1\n198.51.100.0/24,示例客户乙,HT-2\n")
    assert run_icpgate("customers", "import", str(customers), "-c", str(config)).returncode == 0
    return config


def reseal(folder: Path, name: str) -> None:
    """Make the manifest's digest and size of `name` match the file again: a damage that the file
    digest alone no longer shows."""
    from icpgate.backup.database import sha256_of

    manifest = json.loads((folder / "manifest.json").read_text())
    kind = {"registry.db": "registry", "violations.db": "violations"}[name]
    manifest["files"][kind]["sha256"] = sha256_of(folder / name)
    manifest["files"][kind]["bytes"] = (folder / name).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


def edit(path: Path, statement: str) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute(statement)
        db.commit()


def test_a_damaged_backup_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    config = small_edge(tmp_path)
    good = Path(backup(tmp_path / "backups", config)["folder"])
    assert run_icpgate("import", str(SAMPLES), "-c", str(config), "--replace").returncode == 0
    before = registry_facts(tmp_path / "state" / "registry.db")

    def flip_a_byte(folder: Path) -> None:
        data = bytearray((folder / "registry.db").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "registry.db").write_bytes(bytes(data))

    def edit_a_filing(folder: Path) -> None:  # a record changed, its digest and the file digest made to match
        edit(folder / "registry.db", "UPDATE filings SET site_name = '改过的网站' WHERE id = 3")
        reseal(folder, "registry.db")

    def drop_a_customer(folder: Path) -> None:
        edit(folder / "violations.db", "DELETE FROM customers WHERE rowid = 1")
        reseal(folder, "violations.db")

    def claim_another_serial(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["registry"]["serial"] += 1
        (folder / "manifest.json").write_text(json.dumps(manifest))

    def lose_a_file(folder: Path) -> None:
        (folder / "violations.db").unlink()

    damages = {
        flip_a_byte: "registry.db: its SHA-256 is not the manifest's",
        edit_a_filing: "1 filing(s) whose record does not give its stored digest",
        drop_a_customer: "violations.db: rows per table",
        claim_another_serial: "registry.db: serial 1, the manifest says 2",
        lose_a_file: "violations.db is missing",
    }
    for damage, problem in damages.items():
        folder = tmp_path / damage.__name__
        shutil.copytree(good, folder)
        damage(folder)
        for command in (("restore", str(folder)), ("restore", str(folder), "--check")):
            result = run_icpgate(*command, "-c", str(config))
            assert result.returncode == 4, (damage.__name__, result.stdout, result.stderr)
            assert problem in result.stderr, (damage.__name__, result.stderr)
        assert registry_facts(tmp_path / "state" / "registry.db") == before, damage.__name__
        assert not (tmp_path / "state" / "pre-restore").exists()


def test_a_damaged_live_registry_is_not_backed_up(tmp_path: Path) -> None:
    """A registry changed behind icpgate: a backup of it would be refused at restore, so none is made."""
    config = small_edge(tmp_path)
    edit(tmp_path / "state" / "registry.db", "UPDATE filings SET subject_name = '别人' WHERE id = 5")
    result = run_icpgate("backup", str(tmp_path / "backups"), "-c", str(config))
    assert result.returncode == 4 and "is damaged: not backed up" in result.stderr, result.stderr
    assert list((tmp_path / "backups").iterdir()) == []


def test_keep_removes_all_but_the_newest_backups(tmp_path: Path) -> None:
    config = small_edge(tmp_path)
    folders = [backup(tmp_path / "backups", config, "--keep", "2")["folder"] for _ in range(3)]
    assert sorted(str(path) for path in (tmp_path / "backups").iterdir()) == sorted(folders[1:])


def test_a_restore_on_a_stopped_edge_without_an_index_needs_no_adoption(tmp_path: Path) -> None:
    """A new machine: nothing but the backup. The gate builds its index from the restored registry."""
    config = small_edge(tmp_path)
    made = backup(tmp_path / "backups", config)
    shutil.rmtree(tmp_path / "state")
    result = run_icpgate("restore", made["folder"], "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "it builds one from the restored registry when it starts" in result.stdout
    assert "pre-restore" not in result.stdout  # nothing was there to save
    facts = registry_facts(tmp_path / "state" / "registry.db")
    assert (facts["serial"], facts["checksum"]) == (made["registry"]["serial"], made["registry"]["checksum"])
    assert rows(tmp_path / "state" / "registry.violations.db", "customers") == 2


def test_the_backup_timer_and_its_service_verify(tmp_path: Path) -> None:
    """systemd/icpgate-backup.service and .timer, as docs/deployment.md installs them."""
    systemd = REPO / "systemd"
    names = ("icpgate-backup.service", "icpgate-backup.timer")
    assert "cp systemd/icpgate-backup.service systemd/icpgate-backup.timer" in (
        REPO / "docs" / "deployment.md").read_text(encoding="utf-8")  # fmt: skip
    for name in names:
        # systemd-analyze checks that ExecStart's program exists: the test's icpgate stands in for /usr/local/bin's.
        unit = (systemd / name).read_text()
        (tmp_path / name).write_text(unit.replace("/usr/local/bin/icpgate", str(ICPGATE_PROGRAM)))
    assert "backup /var/lib/icpgate-backups --keep 14" in (systemd / "icpgate-backup.service").read_text()
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / name) for name in names)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_restore_over_a_damaged_registry_keeps_it_aside(tmp_path: Path) -> None:
    """The disk lost part of the registry: it is renamed aside, with its WAL files, never overwritten."""
    config = small_edge(tmp_path)
    made = backup(tmp_path / "backups", config)
    live = tmp_path / "state" / "registry.db"
    live.write_bytes(b"not a database, or no longer" * 1000)
    result = run_icpgate("restore", made["folder"], "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    restored = json.loads(result.stdout)
    assert [Path(path).name.split(".damaged-")[0] for path in restored["moved_aside"]] == ["registry.db"]
    assert Path(restored["moved_aside"][0]).read_bytes().startswith(b"not a database")
    facts = registry_facts(live)
    assert (facts["serial"], facts["checksum"]) == (made["registry"]["serial"], made["registry"]["checksum"])
    saved = json.loads(Path(restored["saved"], "manifest.json").read_text())
    assert set(saved["files"]) == {"violations"} and saved["problems"], saved  # the damaged one was left out
