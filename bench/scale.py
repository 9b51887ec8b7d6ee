"""Scale figures at 1M or 10M filings (docs/performance.md, "Scale: 1M and 10M filings").

    python bench/scale.py --filings 10000000 [--phases import,index,decide,startup,memory,approval]

Every figure comes from the real commands on real files in bench/out/scale-N/:
- import:   `icpgate import` of the NDJSON into an empty registry (the shared index included);
- index:    the shared index rebuilt from the registry (`sync_index(rebuild=True)`);
- decide:   `Policy.decide` on a 6-label filed name over the shared index, median, no decision cache;
- startup:  `icpgate run` (1 worker) from exec until its listener accepts, the index already built;
- memory:   a 2-worker daemon after 20,000 requests: each worker's USS and the sum of PSS over the
            supervisor and workers, from /proc/PID/smaps_rollup;
- approval: a publisher (`icpgate feed serve`) on the registry and an edge gate whose registry is a
            copy of it (as a snapshot load leaves it); one filing imported at the publisher until the
            edge answers 200 for it, 20 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchkit import BENCH, ICPGATE, free_port, stop, wait_snapshot, write_config
from gen_filings import record

PHASES = ("import", "index", "decide", "startup", "memory", "approval")


def listener_table(port: int, backend: int) -> str:
    return '[[listeners]]\naddress = "127.0.0.1"\nport = %d\nkind = "http"\nbackend = "127.0.0.1:%d"\n' % (
        port,
        backend,
    )


def run_timed(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit("%s failed:\n%s%s" % (" ".join(map(str, command)), result.stdout, result.stderr[-4000:]))
    return time.perf_counter() - started


def http_status(port: int, host: str) -> int:
    """The gate's status code for a request to `host`; 0 when it did not answer within 10 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        try:
            return int(sock.recv(64).split(b" ", 2)[1])
        except TimeoutError:
            return 0


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("the gate exited with %s" % process.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    sys.exit("the gate did not listen within %d s" % timeout)


def smaps(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup."""
    values = {}
    for line in Path("/proc/%d/smaps_rollup" % pid).read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        values[name] = int(value.split()[0])
    return values


def children(pid: int) -> list[int]:
    found = []
    for task in Path("/proc/%d/task" % pid).iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


DECIDE = """
import statistics, sys, time
from pathlib import Path
from icpgate.config.settings import load_config
from icpgate.registry.index_store import open_index
from icpgate.policy.decide import Policy
from icpgate.policy.pack import load_pack
config = load_config(Path(sys.argv[1]))
index = open_index(config.registry_path)
policy = Policy(load_pack(config.policy_pack).policy, config.provider.id, index)
host = sys.argv[2]
assert policy.decide(host, "203.0.113.10", 443, "tls").reason.value == "filed", policy.decide(host, None, 443, "tls")

def median_us(policy):
    rounds = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(100000):
            policy.decide(host, "203.0.113.10", 443, "tls")
        rounds.append((time.perf_counter() - started) / 100000)
    return statistics.median(rounds) * 1e6

figures = ["%.2f" % median_us(policy)]
if sys.argv[3] == "dict":  # the in-memory index of before, in the same run, for comparison
    import asyncio
    from icpgate.registry.store import open_registry

    async def load():
        async with open_registry(config.registry_path, create=False) as registry:
            return await registry.load_index()

    policy.index = asyncio.run(load())
    figures.append("%.2f" % median_us(policy))
print(" ".join(figures))
"""

INDEX = """
import sys
from pathlib import Path
from icpgate.registry.index_store import index_path, sync_index
for stale in index_path(Path(sys.argv[1])).parent.glob("registry.db.index*"):
    stale.unlink()  # a build from nothing (a rebuild in place keeps the old pages until it commits)
outcome = sync_index(Path(sys.argv[1]), progress=False)
print(outcome.how, outcome.changed, "%.1f" % outcome.seconds)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--filings", type=int, default=1_000_000)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    phases = args.phases.split(",")
    out = BENCH / "out" / ("scale-%d" % args.filings)
    source = BENCH / "out" / ("filings-%d.ndjson" % args.filings)
    if not source.exists():
        subprocess.run([sys.executable, BENCH / "gen_filings.py", str(args.filings), str(source)], check=True)
    edge = write_config(out / "edge")
    registry = out / "edge" / "registry.db"
    figures: dict[str, str] = {}

    def report(name: str, value: str) -> None:
        figures[name] = value
        print("%-72s %s" % (name, value), flush=True)

    if "import" in phases:
        for stale in (out / "edge").glob("registry.db*"):
            stale.unlink()
        seconds = run_timed([*ICPGATE, "import", str(source), "-c", str(edge)])
        report("icpgate import %d filings (NDJSON, empty registry, index included)" % args.filings, "%.1f s" % seconds)
    if "index" in phases:
        result = subprocess.run(
            [sys.executable, "-c", INDEX, str(registry)], capture_output=True, text=True, check=True
        )
        _how, count, seconds = result.stdout.split()
        report("index build from the registry (%s filings)" % count, "%s s, file %.0f MB (%.0f bytes/filing)" % (
            seconds, registry.with_name("registry.db.index").stat().st_size / 1e6,
            registry.with_name("registry.db.index").stat().st_size / int(count)))  # fmt: skip
    if "decide" in phases:
        host = "a.b.c.d.%s" % record(12)["domains"][0]
        compare = "dict" if args.filings <= 1_000_000 else "-"
        result = subprocess.run(
            [sys.executable, "-c", DECIDE, str(edge), host, compare], capture_output=True, text=True
        )
        if result.returncode:
            sys.exit(result.stderr)
        medians = result.stdout.split()
        report("decide, 6-label filed name, shared index, no cache (median)", "%s µs" % medians[0])
        if len(medians) > 1:
            report("decide, the same, in-memory dict index in the same run (median)", "%s µs" % medians[1])
    origin_port = free_port()
    origin = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(origin_port)], cwd=out,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        if "startup" in phases:
            port = free_port()
            gate_config = write_config(out / "edge", listener_table(port, origin_port))
            started = time.perf_counter()
            gate = subprocess.Popen([*ICPGATE, "run", "-c", str(gate_config)], stdout=subprocess.DEVNULL,
                                    stderr=(out / "startup.log").open("w"))  # fmt: skip
            try:
                wait_listening(port, gate)
                report("start-up until listening (1 worker, index built)", "%.2f s" % (time.perf_counter() - started))
            finally:
                stop(gate, 60)
        if "memory" in phases:
            memory(out, origin_port, args.filings, report)
        if "approval" in phases:
            approval(out, origin_port, args.filings, args.rounds, report)
    finally:
        stop(origin, 60)
    report("machine", "%d CPUs, Python %s, %s" % (os.cpu_count(), sys.version.split()[0],
                                                  datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")))  # fmt: skip
    (out / "figures.json").write_text(json.dumps(figures, ensure_ascii=False, indent=1) + "\n")


def memory(out: Path, origin_port: int, filings: int, report) -> None:
    port = free_port()
    gate_config = write_config(out / "edge", "[gate]\nworkers = 2\n" + listener_table(port, origin_port))
    gate = subprocess.Popen([*ICPGATE, "run", "-c", str(gate_config)], stdout=subprocess.DEVNULL,
                            stderr=(out / "memory.log").open("w"))  # fmt: skip
    try:
        wait_listening(port, gate)
        time.sleep(2)
        for n in range(20_000):  # filed and unfiled names spread over the registry: index pages touched
            http_status(port, record((n * 7919) % filings)["domains"][0] if n % 2 else "nope-%d.example.cn" % n)
        workers = children(gate.pid)
        rollups = {pid: smaps(pid) for pid in [gate.pid, *workers]}
        for number, pid in enumerate(workers, 1):
            uss = rollups[pid]["Private_Clean"] + rollups[pid]["Private_Dirty"]
            report("worker %d: USS / RSS / PSS" % number, "%.0f / %.0f / %.0f MB" % (
                uss / 1024, rollups[pid]["Rss"] / 1024, rollups[pid]["Pss"] / 1024))  # fmt: skip
        report("2-worker daemon: sum of PSS (supervisor + workers)",
               "%.0f MB" % (sum(r["Pss"] for r in rollups.values()) / 1024))  # fmt: skip
    finally:
        stop(gate, 60)


def approval(out: Path, origin_port: int, filings: int, rounds: int, report) -> None:
    """A publisher on a copy of the registry, an edge gate on another copy, both at one serial."""
    publisher = write_config(out / "publisher")
    for stale in (out / "publisher").glob("registry.db*"):  # the registry, its index and snapshots
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    with (
        sqlite3.connect(out / "edge" / "registry.db") as source,
        sqlite3.connect(out / "publisher" / "registry.db") as copy,
    ):
        source.backup(copy)  # the WAL included
    feed_port, port = free_port(), free_port()
    url = "http://127.0.0.1:%d/feed/v1" % feed_port
    # Unsigned and without tokens, as the feed benchmarks measure: `feed serve` refuses to start
    # without publish.tokens_file (exit 3) unless told --no-auth, and `run` a feed without public keys.
    edge = write_config(out / "edge", '[feed]\nurls = ["%s"]\nallow_unsigned = true\nstart_delay = 0\nwait = 30\n' % url
                  + listener_table(port, origin_port))  # fmt: skip
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = json.dumps({"last_success": now, "last_attempt": now, "result": "applied"})
    with sqlite3.connect(out / "edge" / "registry.db") as db:
        db.execute("INSERT OR REPLACE INTO sync_status VALUES (1, ?)", (status,))
    serve_command = [*ICPGATE, "feed", "serve", "--no-auth", "--listen", "127.0.0.1:%d" % feed_port, "-c",
                     str(publisher)]  # fmt: skip
    serve = subprocess.Popen(serve_command, stdout=subprocess.DEVNULL, stderr=(out / "publisher.log").open("w"))
    gate = subprocess.Popen([*ICPGATE, "run", "-c", str(edge)], stdout=subprocess.DEVNULL,
                            stderr=(out / "approval-edge.log").open("w"))  # fmt: skip
    try:
        wait_listening(feed_port, serve)
        wait_listening(port, gate)
        wait_snapshot(url + "/", timeout=1800)  # its first snapshot build would compete with the rounds for the CPUs
        latencies = []
        with sqlite3.connect(out / "edge" / "registry.db") as db:
            (serial,) = db.execute("SELECT serial FROM state").fetchone()
        for number in range(rounds):
            filing = record(filings + 100_000 + 1000 * serial + number) | {"status": "approved"}  # never filed before
            filing["access"][0]["status"] = "active"
            path = out / "one.ndjson"
            path.write_text(json.dumps(filing, ensure_ascii=False) + "\n", encoding="utf-8")
            host = filing["domains"][0]
            assert http_status(port, host) == 403
            subprocess.run([*ICPGATE, "import", str(path), "-c", str(publisher)], check=True, capture_output=True)
            started = time.perf_counter()  # the publisher's commit: the import has returned
            while http_status(port, host) != 200 and time.perf_counter() - started < 120:
                time.sleep(0.005)
            latencies.append(time.perf_counter() - started)
            print("  round %d: %.3f s" % (number + 1, latencies[-1]), flush=True)
            time.sleep(0.3)
    finally:
        stop(gate, 60)
        stop(serve, 60)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    report("approval to unblock: publisher's commit until the edge answers 200 (median / p99 of %d)" % rounds,
           "%.3f / %.3f s" % (statistics.median(latencies), p99))  # fmt: skip


if __name__ == "__main__":
    main()
