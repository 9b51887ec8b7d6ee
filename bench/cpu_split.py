"""Where a keep-alive request's CPU goes, icpgate against nginx: user and kernel time, and syscalls.

    python bench/cpu_split.py [--requests 300000] [--strace 20000]

The same setup as bench/run.py (one worker each on CPU 0, origin and h2load on CPU 1, 100,000
filings). For each server, twice, in turn: h2load sends `--requests` keep-alive requests over 50
connections and the user and system time of the server's processes (/proc/PID/stat) is divided by
them. Long runs, because the kernel splits time between user and system mode by sampling at each
tick. With `--strace N`, `strace -c` then counts the system calls of N more requests per server.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402


def load(port: int, requests: int) -> None:
    """`requests` keep-alive requests over 50 connections, as bench/run.py sends them; all answered."""
    bench._h2load("http://%s/" % bench.FILED, port, requests, ("-c", "50"), None)


def split(process: subprocess.Popen, port: int, requests: int) -> tuple[float, float]:
    """User and system µs per request of the server's processes over one run of `requests`."""
    pids = bench._tree(process.pid)
    before = bench.cpu_seconds_split(pids)
    load(port, requests)
    after = bench.cpu_seconds_split(pids)
    spent = [(after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in after if p in before]
    return tuple(sum(part[i] for part in spent) / requests * 1e6 for i in (0, 1))  # type: ignore[return-value]


def syscalls(process: subprocess.Popen, port: int, requests: int) -> str:
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        pids = [arg for pid in bench._tree(process.pid) for arg in ("-p", str(pid))]
        tracer = subprocess.Popen(["strace", "-f", "-c", "-o", out.name, *pids], stderr=subprocess.DEVNULL)
        time.sleep(1)
        load(port, requests)
        tracer.send_signal(2)
        tracer.wait(30)
        return out.read()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--strace", type=int, default=0)
    args = parser.parse_args()
    work = bench.OUT / "cpu-split"
    shutil.rmtree(work, ignore_errors=True)
    setup = bench.prepare(100_000, work)
    origin = bench.start_origin(setup)
    servers = []
    try:
        nginx, _ = bench.start_nginx_gate(setup)
        servers.append(nginx)
        icpgate, _ = bench.start_icpgate(setup)
        servers.append(icpgate)
        time.sleep(2)
        targets = {"nginx": (nginx, bench.PORTS["nginx_http"]), "icpgate": (icpgate, bench.PORTS["icpgate_http"])}
        for _ in range(2):
            for name, (process, port) in targets.items():
                user, system = split(process, port, args.requests)
                print("%-8s user %5.1f µs/req  system %5.1f µs/req" % (name, user, system), flush=True)
        if args.strace:
            for name, (process, port) in targets.items():
                print("%s, %d requests:\n%s" % (name, args.strace, syscalls(process, port, args.strace)), flush=True)
    finally:
        for process in [*servers, origin]:
            bench.stop(process)


if __name__ == "__main__":
    main()
