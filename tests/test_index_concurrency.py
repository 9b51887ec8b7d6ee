"""Concurrent writers and readers of the shared index: importers, a gate whose workers rebuild it,
and index files deleted under them, for a hundred rounds. Checked by exit codes (no segfault, no
traceback) and by the gate's answers (filed served, unfiled blocked) in every round."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gatekit import free_port, gate_config, listener, start_gate
from test_gate_process import http_get, status_of

from conftest import sample_records
from icpgate.config.settings import load_config

ROUNDS = 100
IMPORTERS = 2

# One importer: `rounds` imports through the real CLI entry point, each adding one filing (so each
# commits, raises the serial and writes the index), in one process so that a round costs
# milliseconds, not an interpreter start. It stops at the first import that does not exit 0.
IMPORTER = """
import json, sys
from pathlib import Path
from icpgate.cli.main import main
config, folder, tag, rounds, template = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
for n in range(rounds):
    subject = "京ICP备%s%06d号" % (tag, n)
    record = dict(json.loads(template), licence=subject + "-1", subject_licence=subject,
                  domains=["stress-%s-%d.example-stress.cn" % (tag, n)])
    path = folder / ("%s-%d.ndjson" % (tag, n))
    path.write_text(json.dumps(record, ensure_ascii=False) + "\\n", encoding="utf-8")
    code = main(["import", str(path), "-c", config])
    if code != 0:
        sys.exit("round %d: exit %d" % (n, code))
"""


def delete_index(registry: Path, everything: bool) -> None:
    """What an operator's `rm -rf registry.db.index*` does (`everything`: every index file and folder,
    whatever the layout), or `rm registry.db.index` (the index file, or its data files, alone)."""
    if not everything:
        folder = registry.with_name(registry.name + ".index")
        for path in (folder, *folder.glob("*/data.mdb")):
            if path.is_file():
                path.unlink(missing_ok=True)
        return
    for path in registry.parent.glob(registry.name + ".index*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def test_importers_and_rebuilding_workers_with_deleted_index_files_never_crash(tmp_path: Path, origin) -> None:
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", origin.http)}, gate={"workers": 2})
    registry = load_config(config).registry_path
    gate = start_gate(config, {"http": port})
    folder = tmp_path / "imports"
    folder.mkdir()
    filed = next(r for r in sample_records() if r["licence"] == "京ICP备20240001号-1")
    command = [sys.executable, "-c", IMPORTER, str(config), str(folder)]
    arguments = [str(ROUNDS), json.dumps(filed, ensure_ascii=False)]
    importers = [
        subprocess.Popen(
            [*command, "3%d" % n, *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for n in range(IMPORTERS)
    ]
    answers = []
    try:
        started = time.monotonic()
        for round_ in range(ROUNDS):
            delete_index(registry, everything=round_ % 3 == 0)
            time.sleep(0.05 if round_ % 2 else 0.15)  # sometimes mid-rebuild, sometimes after it
            answers.append((round_, status_of(http_get(port, "www.example-filed.cn")),
                            status_of(http_get(port, "example-unfiled.cn"))))  # fmt: skip
        errors = [importer.communicate(timeout=120)[1] for importer in importers]
        elapsed = time.monotonic() - started
    finally:
        for importer in importers:
            if importer.poll() is None:
                importer.send_signal(signal.SIGKILL)
                importer.wait(10)
        stopped = gate.stop()
    log = gate.log()
    assert [importer.returncode for importer in importers] == [0] * IMPORTERS, errors  # 139 / -11 was the crash
    assert not any("Traceback" in text for text in errors), errors
    assert "killed by signal" not in log and "Traceback" not in log, log
    assert stopped == 0, log
    assert [a for a in answers if a[1:] != (200, 403)] == [], "filed must pass and unfiled be blocked in every round"
    assert elapsed < 120, "the stress run took %.0f s" % elapsed
