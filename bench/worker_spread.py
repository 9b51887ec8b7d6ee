"""How evenly a two-worker gate spreads long-lived connections over its workers.

`python bench/worker_spread.py [--connections 200] [--rounds 5]`: a gate with `gate.workers = 2`
in front of an nginx origin that keeps connections alive; each round h2load opens `--connections`
keep-alive connections at once and sends `--requests` requests on each, while `ss` counts, every
0.2 s, the established connections each worker process holds. Prints, per round, the median share
of the busiest worker (50 % is an even spread; issue goal: at most 60 %).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchkit import BENCH, ICPGATE, REPO, free_port, stop, wait_port, write_config

FILED = "bench-site-12.cn"  # approved in gen_filings.py's data


def start_origin(work: Path, port: int) -> subprocess.Popen:
    conf = work / "origin.conf"
    conf.write_text(
        "daemon off; worker_processes 1; pid %s/nginx.pid; error_log %s/error.log error;\n"
        "events { worker_connections 4096; }\n"
        "http { access_log off; client_body_temp_path %s; keepalive_requests 1000000;\n"
        ' server { listen 127.0.0.1:%d; location / { default_type text/plain; return 200 "ok\\n"; } } }\n'
        % (work, work, work, port)
    )
    return subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf)])


def held_by_process(port: int) -> dict[int, int]:
    """Established connections on the gate's port, by the pid of the process holding each."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", "( sport = :%d )" % port],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def one_round(port: int, connections: int, per_connection: int) -> float:
    """The median share of the busiest worker while h2load holds `connections` connections."""
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            counts = held_by_process(port)
            if sum(counts.values()) >= connections * 0.95 and len(counts) <= 2:
                samples.append(max(counts.values()) / sum(counts.values()) if len(counts) == 2 else 1.0)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # -n, not -D: h2load's duration mode hangs at its end (bench/run.py says so too)
        command = ["h2load", "--h1", "-c", str(connections), "-n", str(connections * per_connection),
                   "--connect-to=127.0.0.1:%d" % port, "http://%s/" % FILED]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not re.search(r"\b%d succeeded" % (connections * per_connection), result.stdout):
            sys.exit("h2load failed:\n" + result.stdout + result.stderr)
    finally:
        done.set()
        sampler.join()
    if not samples:
        sys.exit("no sample saw the %d connections on two workers" % connections)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="per connection, each round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data = work / "filings.ndjson"
        subprocess.run([sys.executable, str(BENCH / "gen_filings.py"), "1000", str(data)], check=True)
        origin_port, gate_port = free_port(), free_port()
        config = write_config(work, '[gate]\nworkers = 2\n[[listeners]]\naddress = "127.0.0.1"\nport = %d\n'
                              'kind = "http"\nbackend = "127.0.0.1:%d"\n' % (gate_port, origin_port))  # fmt: skip
        subprocess.run([*ICPGATE, "import", str(data), "-c", str(config)], check=True, capture_output=True)
        origin = start_origin(work, origin_port)
        gate = subprocess.Popen([*ICPGATE, "run", "-c", str(config), "--log-level", "warning"], cwd=REPO)
        try:
            wait_port(origin_port)
            wait_port(gate_port)
            shares = [one_round(gate_port, args.connections, args.requests) for _ in range(args.rounds)]
        finally:
            stop(gate)
            stop(origin)
    print("busiest worker's share of %d connections, per round: %s" % (args.connections,
          " ".join("%.0f%%" % (100 * share) for share in shares)))  # fmt: skip
    print("median: %.0f%%" % (100 * statistics.median(shares)))


if __name__ == "__main__":
    main()
