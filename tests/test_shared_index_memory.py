"""Every worker maps the one index file: its pages are shared, and a worker's own memory stays small.

200,000 filings (what the suite can afford to import), a real two-worker daemon, requests spread
over the registry so each worker touches index pages, then /proc/PID/smaps of each worker.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from gatekit import free_port, gate_config, listener, start_gate
from test_gate_process import wait_until
from test_gate_workers import started

from conftest import REPO
from icpgate.registry.index_store import current_generation

sys.path.insert(0, str(REPO / "bench"))
from gen_filings import record

FILINGS = 200_000
USS_BUDGET_KB = 50 * 1024  # the goal per additional worker at 10M filings; here at 200k


def index_mapping(pid: int, index: Path) -> dict[str, int]:
    """The kB figures of the worker's mapping of the index file, from /proc/PID/smaps."""
    figures: dict[str, int] = {}
    inside = False
    for line in Path("/proc/%d/smaps" % pid).read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.rstrip().endswith(str(index))
        elif inside and line.endswith(" kB"):
            name, value = line.split(":", 1)
            figures[name] = figures.get(name, 0) + int(value.split()[0])
    return figures


def uss_kb(pid: int) -> int:
    rollup = Path("/proc/%d/smaps_rollup" % pid).read_text()
    values = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}
    return values["Private_Clean"] + values["Private_Dirty"]


def status(port: int, host: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        return int(sock.recv(64).split()[1])


def test_workers_share_one_index_and_stay_small(tmp_path: Path, origin) -> None:
    filings = tmp_path / "filings.ndjson"
    with filings.open("w", encoding="utf-8") as out:
        for n in range(FILINGS):
            out.write(json.dumps(record(n), ensure_ascii=False) + "\n")
    http = free_port()
    config = gate_config(tmp_path, {"http": listener(http, "http", origin.http)}, gate={"workers": 2})
    imported = subprocess.run([sys.executable, "-m", "icpgate", "import", str(filings), "-c", str(config)],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    index = current_generation(tmp_path / "registry.db.index") / "data.mdb"
    assert index.is_file()
    gate = start_gate(config, {"http": http})
    try:
        wait_until(lambda: "2 workers ready" in gate.log(), timeout=60)
        answers = {status(http, record((n * 7919) % FILINGS)["domains"][0]) for n in range(2000)}
        assert answers <= {200, 403} and 200 in answers
        workers = [pid for name, pid in started(gate.log()).items() if name.startswith("worker")]
        assert len(workers) == 2
        for pid in workers:
            mapping = index_mapping(pid, index)
            assert mapping.get("Rss", 0) > 0, "worker %d has not mapped %s" % (pid, index)
            # The index is read from the page cache: no page of it is private to a worker.
            assert mapping.get("Private_Dirty", 0) == 0 and mapping.get("Anonymous", 0) == 0, mapping
            assert mapping.get("Shared_Clean", 0) > 0, mapping  # pages the other worker maps as well
            assert uss_kb(pid) < USS_BUDGET_KB, "worker %d: USS %d kB" % (pid, uss_kb(pid))
        assert index.stat().st_size > 10 * 1024 * 1024  # the index is real: 200k filings' worth
    finally:
        assert gate.stop() == 0
