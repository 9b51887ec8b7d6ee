"""The fleet's shipping, measured against a real PostgreSQL (docs/fleet.md):

    python bench/fleet_bench.py [--rows 1000000] [--seconds 30] [--rounds 5] [--requests 20000]

1. Catch-up: a backlog of `--rows` records, written into one edge's SQLite log through the violation
   store's own write path (as the workers write it) while the centre is away, then shipped by the
   shipper's own loop (Shipper.ship_all) in fleet.batch_size transactions: the time to drain it,
   and so the rows per second one edge ships.
2. Delay: three real edges (`icpgate run`, the default ship and flush intervals unless given) under
   blocked keep-alive load from h2load, each also seeing new unfiled hosts at `--new-rate` a second;
   the delay from a record's first sighting at its edge (first_seen, the edge's clock) to its row at
   the centre (shipped_at, the centre's: one machine, one clock), p50 and p99.
3. The gate's CPU per keep-alive request to a filed site with shipping on against off: two gates
   alike but for [fleet], measured in turn in every round (the order alternating), each with the same
   trickle of new blocked hosts so that the shipper has work; the worker's own CPU time from
   /proc/PID/stat over the requests it served. Medians of `--rounds`, with the spread (min to max).

The machine may be shared: the load average is printed with the figures. PostgreSQL and pgbouncer
come from tests/pgkit.py, as in the suite (run as root: the server runs as `postgres`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "daemon"))

import psycopg  # noqa: E402
from benchkit import h2load_rate, stop  # noqa: E402
from gatekit import free_port, gate_config, listener, start_gate, wait_for_port  # noqa: E402
from pgkit import start_postgres  # noqa: E402

from icpgate.config.settings import load_config  # noqa: E402
from icpgate.fleet import central  # noqa: E402
from icpgate.fleet.schema import roles_sql  # noqa: E402
from icpgate.fleet.shipper import Edge, Shipper, register  # noqa: E402
from icpgate.violations.store import open_violations  # noqa: E402

PASSWORD = "bench-%s"
EDGES = ("e1", "e2", "e3", "cpu")
FILED, BLOCKED = "www.example-filed.cn", "example-unfiled.cn"
TICK = os.sysconf("SC_CLK_TCK")


# --- the centre -----------------------------------------------------------------------------------
def start_centre():
    server = start_postgres()
    script = roles_sql(list(EDGES)).replace("'CHANGE-ME'", "'%s'" % (PASSWORD % "x"))
    server.execute("\n".join(line for line in script.splitlines() if not line.startswith("CREATE DATABASE")))
    for edge in EDGES:
        server.execute("ALTER ROLE icpgate_edge_%s PASSWORD '%s'" % (edge, PASSWORD % edge))
    server.execute("ALTER DATABASE icpgate OWNER TO icpgate_owner")
    with psycopg.connect(server.dsn("icpgate_owner", PASSWORD % "x")) as connection:
        central.migrate(connection)
    return server


def fleet_table(server, edge: str, folder: Path, **extra: object) -> dict[str, object]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "password").write_text(PASSWORD % edge + "\n")
    return {"dsn": "postgresql://icpgate_edge_%s@127.0.0.1:%d/icpgate" % (edge, server.port),
            "password_file": str(folder / "password"), "edge_id": edge, "site": "bench"} | extra  # fmt: skip


# --- 1. catch-up ----------------------------------------------------------------------------------
async def write_backlog(path: Path, rows: int, chunk: int = 10_000) -> float:
    """`rows` records through ViolationStore.write, `chunk` a transaction, an hour old; seconds taken."""
    seen = time.time() - 3600
    started = time.monotonic()
    async with open_violations(path) as store:
        for first in range(0, rows, chunk):
            await store.write({("h%d.example-backlog%d.cn" % (n, n % 997), "192.0.2.%d" % (n % 250 + 1), 80, "http",
                                "unfiled"): [seen, seen + 1, 1, 0, None]
                               for n in range(first, min(rows, first + chunk))})  # fmt: skip
    return time.monotonic() - started


async def ship_backlog(config_path: Path) -> tuple[float, int]:
    config = load_config(config_path)
    async with open_violations(config.violations.path) as store:
        shipper = Shipper(config, store, health=None)
        shipper.edge = Edge((await store.shipping_state())["edge_uuid"], config.fleet.edge_id, config.fleet.site)
        async with await central.connect(config.fleet) as connection:
            await register(connection, shipper.edge)
            started = time.monotonic()
            shipped = await shipper.ship_all(connection)
            return time.monotonic() - started, shipped


def catch_up(server, work: Path, rows: int) -> dict[str, float]:
    folder = work / "backlog"
    config = gate_config(folder, {"http": listener(free_port(), "http")},
                         tables={"fleet": fleet_table(server, "e1", folder)})  # fmt: skip
    path = load_config(config).violations.path
    written = asyncio.run(write_backlog(path, rows))
    seconds, shipped = asyncio.run(ship_backlog(config))
    (count,) = server.execute("SELECT count(*) FROM fleet.violations")[0]
    assert shipped == rows == count, (shipped, rows, count)
    return {"rows": rows, "write_seconds": round(written, 1), "catch_up_seconds": round(seconds, 1),
            "rows_per_second": round(rows / seconds)}  # fmt: skip


# --- 2. delay under load --------------------------------------------------------------------------
def blocked_request(port: int, host: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        while sock.recv(65536):
            pass


def trickle(port: int, prefix: str, rate: float, stop_event: threading.Event, sent: list[int]) -> None:
    """New unfiled hosts at `rate` a second until `stop_event`: each a first sighting."""
    number = 0
    start = time.monotonic()
    while not stop_event.is_set():
        blocked_request(port, "n%d.%s.cn" % (number, prefix))
        number += 1
        pause = start + number / rate - time.monotonic()
        if pause > 0:
            stop_event.wait(pause)
    sent.append(number)


def h2load_background(port: int, host: str, stop_event: threading.Event) -> None:
    """Blocked keep-alive requests, batch after batch, until `stop_event` (h2load's -n bounds each)."""
    while not stop_event.is_set():
        subprocess.run(["h2load", "--h1", "-n", "20000", "-c", "4", "-H", "Host: %s" % host,
                        "http://127.0.0.1:%d/" % port], capture_output=True, timeout=300)  # fmt: skip


def delay(server, work: Path, seconds: float, rate: float, ship_interval: float | None,
          flush_interval: float | None) -> dict[str, object]:  # fmt: skip
    gates, threads, sent = [], [], []
    halt = threading.Event()
    extra = {} if ship_interval is None else {"ship_interval": ship_interval}
    violations = {} if flush_interval is None else {"flush_interval": flush_interval}
    try:
        for edge in ("e1", "e2", "e3"):
            folder = work / ("delay-" + edge)
            port = free_port()
            config = gate_config(folder, {"http": listener(port, "http")}, gate={"workers": 1}, tables={
                "fleet": fleet_table(server, edge, folder, **extra), "violations": violations})  # fmt: skip
            gates.append(start_gate(config, {"http": port}))
            threads.append(threading.Thread(target=h2load_background, args=(port, BLOCKED, halt)))
            threads.append(threading.Thread(target=trickle, args=(port, "delay-" + edge, rate, halt, sent)))
        started = time.time()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        halt.set()
        for thread in threads:
            thread.join()
        expected = sum(sent)

        def arrived() -> int:
            return server.execute("SELECT count(*) FROM fleet.violations WHERE host LIKE 'n%%.delay-%%'")[0][0]

        deadline = time.monotonic() + 120
        while arrived() < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        delays = [value for (value,) in server.execute(
            "SELECT extract(epoch FROM shipped_at - first_seen)::float8 FROM fleet.violations WHERE host LIKE"
            " 'n%%.delay-%%' AND first_seen >= to_timestamp(%s) ORDER BY 1", (started,))]  # fmt: skip
    finally:
        halt.set()
        for gate in gates:
            gate.stop()
    quantiles = statistics.quantiles(delays, n=100)
    return {"edges": 3, "seconds": seconds, "new_hosts": expected, "arrived": len(delays),
            "p50_seconds": round(statistics.median(delays), 2), "p99_seconds": round(quantiles[98], 2),
            "max_seconds": round(delays[-1], 2), "ship_interval": ship_interval or "default (5 s)",
            "flush_interval": flush_interval or "default (5 s)"}  # fmt: skip


# --- 3. CPU per request, shipping on and off ------------------------------------------------------
def start_backend(work: Path) -> tuple[subprocess.Popen, int]:
    """nginx answering 200 on keep-alive connections: the filed site behind both gates."""
    folder = work / "nginx"
    folder.mkdir()
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(
        "daemon off;\nworker_processes 1;\npid %s/nginx.pid;\nerror_log %s/error.log;\nevents {}\n"
        "http {\n access_log off;\n keepalive_requests 1000000;\n client_body_temp_path %s;\n"
        " server { listen 127.0.0.1:%d; location / { return 200 'ok\\n'; } }\n}\n"
        % (folder, folder, folder, port))  # fmt: skip
    process = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(folder)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_port(port, process=process)
    return process, port


def cpu_ticks(pid: int) -> int:
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path("/proc/%d/task" % pid).iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def load_round(port: int, requests: int, prefix: str, rate: float) -> int:
    """h2load's keep-alive requests to the filed site, with the trickle of new blocked hosts beside
    them; the requests the gate served."""
    halt, sent = threading.Event(), []
    side = threading.Thread(target=trickle, args=(port, prefix, rate, halt, sent))
    side.start()
    try:
        h2load_rate(["h2load", "--h1", "-n", str(requests), "-c", "10", "-H", "Host: %s" % FILED],
                    "http://127.0.0.1:%d/" % port, requests)  # fmt: skip
    finally:
        halt.set()
        side.join()
    return requests + sent[0]


def find_worker(gate, port: int) -> int:
    """The process that serves: of the daemon's, the one whose CPU time grows most under a short load."""
    deadline = time.monotonic() + 30
    while len(descendants(gate.process.pid)) < 2 and time.monotonic() < deadline:  # a worker, the service
        time.sleep(0.2)
    before = {pid: cpu_ticks(pid) for pid in [gate.process.pid, *descendants(gate.process.pid)]}
    h2load_rate(["h2load", "--h1", "-n", "20000", "-c", "10", "-H", "Host: %s" % FILED], "http://127.0.0.1:%d/" % port,
                20000)  # fmt: skip
    return max(before, key=lambda pid: cpu_ticks(pid) - before[pid])


def cpu_per_request(server, work: Path, rounds: int, requests: int, rate: float) -> dict[str, object]:
    backend, backend_port = start_backend(work)
    gates = {}
    try:
        for name, fleet in (("on", True), ("off", False)):
            folder = work / ("cpu-" + name)
            folder.mkdir()
            port = free_port()
            tables: dict[str, dict] = {"violations": {"flush_interval": 1.0}}
            if fleet:
                tables["fleet"] = fleet_table(server, "cpu", folder, ship_interval=1.0, heartbeat_interval=1.0)
            config = gate_config(folder, {"http": listener(port, "http", backend_port)}, gate={"workers": 1},
                                 tables=tables)  # fmt: skip
            gate = start_gate(config, {"http": port})
            gates[name] = (gate, port, 0)  # stopped in the end, whatever happens next
            gates[name] = (gate, port, find_worker(gate, port))
        samples: dict[str, list[float]] = {"on": [], "off": []}
        for number in range(rounds):
            for name in ("on", "off") if number % 2 == 0 else ("off", "on"):
                gate, port, worker = gates[name]
                before = cpu_ticks(worker)
                served = load_round(port, requests, "cpu-%s-%d" % (name, number), rate)
                samples[name].append((cpu_ticks(worker) - before) / TICK / served * 1e6)
        shipped = server.execute("SELECT count(*) FROM fleet.violations v JOIN fleet.edges e USING (edge_uuid)"
                                 " WHERE e.edge_id = 'cpu'")[0][0]  # fmt: skip
    finally:
        for gate, _, _ in gates.values():
            gate.stop()
        stop(backend)
    result: dict[str, object] = {"rounds": rounds, "requests_per_round": requests, "new_hosts_per_second": rate,
                                 "records_shipped_by_the_on_gate": shipped}  # fmt: skip
    for name, values in samples.items():
        result["shipping_%s_us_per_request" % name] = {"median": round(statistics.median(values), 2),
                                                       "min": round(min(values), 2), "max": round(max(values), 2),
                                                       "rounds": [round(value, 2) for value in values]}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="the backlog to catch up on")
    parser.add_argument("--seconds", type=float, default=30, help="the delay run's length")
    parser.add_argument("--new-rate", type=float, default=20, help="new unfiled hosts per second per edge")
    parser.add_argument("--ship-interval", type=float, help="fleet.ship_interval of the delay run's edges")
    parser.add_argument("--flush-interval", type=float, help="violations.flush_interval of the delay run's edges")
    parser.add_argument("--rounds", type=int, default=5, help="CPU rounds (each measures on and off)")
    parser.add_argument("--requests", type=int, default=20000, help="keep-alive requests per CPU measurement")
    parser.add_argument("--only", choices=("catch-up", "delay", "cpu"), action="append", help="run only these parts")
    args = parser.parse_args()
    for tool in ("h2load", "nginx"):
        if shutil.which(tool) is None:
            sys.exit("%s is not installed: run tests/system-deps.sh" % tool)
    parts = args.only or ["catch-up", "delay", "cpu"]
    work = Path(tempfile.mkdtemp(prefix="icpgate-fleet-bench-"))
    server = start_centre()
    results: dict[str, object] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    try:
        if "catch-up" in parts:
            results["catch_up"] = catch_up(server, work, args.rows)
            print(json.dumps({"catch_up": results["catch_up"]}), flush=True)
        if "delay" in parts:
            results["delay"] = delay(server, work, args.seconds, args.new_rate, args.ship_interval,
                                     args.flush_interval)  # fmt: skip
            print(json.dumps({"delay": results["delay"]}), flush=True)
        if "cpu" in parts:
            results["cpu"] = cpu_per_request(server, work, args.rounds, args.requests, args.new_rate)
            print(json.dumps({"cpu": results["cpu"]}), flush=True)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
