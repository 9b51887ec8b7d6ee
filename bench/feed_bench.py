"""Feed figures: snapshot build and load, a 10,000-filing change set, approval-to-unblock latency.

    python bench/feed_bench.py --filings 1000000 --rounds 20

A publisher (`icpgate feed serve`) and an edge gate (one worker, feed long-poll) run on this
machine; every figure comes from the real commands. Peak memory is the child's max RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

from benchkit import BENCH, ICPGATE, free_port, wait_snapshot, write_config
from gen_filings import record

OUT = BENCH / "out" / "feed"


def timed(*args: str) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds and peak RSS (MB) of one icpgate command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run([*ICPGATE, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        sys.exit("icpgate %s failed:\n%s%s" % (" ".join(args), result.stdout, result.stderr))
    return elapsed, max(peak, before) / 1024, result


def http_status(port: int, host: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        return int(sock.recv(64).split(b" ", 2)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--filings", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    subprocess.run(["rm", "-rf", str(OUT)], check=True)
    source = BENCH / "out" / ("filings-%d.ndjson" % args.filings)
    if not source.exists():
        subprocess.run([sys.executable, BENCH / "gen_filings.py", str(args.filings), str(source)], check=True)
    figures: dict[str, str] = {}

    publisher_config = write_config(OUT / "publisher", "")
    seconds, peak, _ = timed("import", str(source), "-c", str(publisher_config))
    figures["import %d filings at the publisher (with digests and checksum)" % args.filings] = "%.1f s, %.0f MB" % (
        seconds, peak)  # fmt: skip

    port = free_port()
    started = time.perf_counter()
    serve = [*ICPGATE, "feed", "serve", "--no-auth", "--listen", "127.0.0.1:%d" % port, "-c", str(publisher_config)]
    publisher = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d/feed/v1" % port
    try:
        wait_snapshot(url + "/")
        snapshot = next((OUT / "publisher" / "registry.db.feed").glob("snapshot-*"))
        figures["publisher start + snapshot build"] = "%.1f s, %.0f MB gzip" % (
            time.perf_counter() - started, snapshot.stat().st_size / 1e6)  # fmt: skip

        edge_body = '[feed]\nurls = ["%s"]\nallow_unsigned = true\nstart_delay = 0\nwait = 30\n' % url
        gate_port, origin_port = free_port(), free_port()
        edge_config = write_config(OUT / "edge", edge_body + '[[listeners]]\naddress = "127.0.0.1"\nport = %d\n'
                                   'kind = "http"\nbackend = "127.0.0.1:%d"\n' % (gate_port, origin_port))  # fmt: skip
        seconds, peak, _ = timed("feed", "sync", "-c", str(edge_config))
        figures["edge: full snapshot load (feed sync)"] = "%.1f s, %.0f MB peak RSS" % (seconds, peak)

        batch = OUT / "changes-10000.ndjson"
        with batch.open("w", encoding="utf-8") as out:
            for n in range(args.filings, args.filings + 10_000):
                out.write(json.dumps(record(n), ensure_ascii=False) + "\n")
        timed("import", str(batch), "--force", "-c", str(publisher_config))
        time.sleep(1.0)  # --force: in small benchmark runs, 10,000 is past the 30% guard
        seconds, peak, result = timed("feed", "sync", "--json", "--force", "-c", str(edge_config))
        assert json.loads(result.stdout)["result"] == "applied", result.stdout
        figures["edge: apply a 10,000-filing change set (feed sync)"] = "%.1f s, %.0f MB peak RSS" % (seconds, peak)

        origin = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(origin_port)],
                                  cwd=OUT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        gate = subprocess.Popen([*ICPGATE, "run", "-c", str(edge_config)], stdout=subprocess.DEVNULL,
                                stderr=(OUT / "edge.log").open("w"))  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    http_status(gate_port, "example.invalid")
                    break
                except OSError:
                    time.sleep(0.2)
            latencies, imports = [], []
            for number in range(args.rounds):
                n = args.filings + 100_000 + number
                filing = record(n) | {"status": "approved"}
                filing["access"][0]["status"] = "active"
                path = OUT / "one.ndjson"
                path.write_text(json.dumps(filing, ensure_ascii=False) + "\n", encoding="utf-8")
                host = filing["domains"][0]
                assert http_status(gate_port, host) == 403
                started = time.perf_counter()
                subprocess.run([*ICPGATE, "import", str(path), "-c", str(publisher_config)], check=True,
                               capture_output=True)  # fmt: skip
                committed = time.perf_counter()
                while http_status(gate_port, host) != 200:
                    if time.perf_counter() - committed > 30:
                        sys.exit("not unblocked within 30 s:\n" + (OUT / "edge.log").read_text())
                    time.sleep(0.005)
                latencies.append(time.perf_counter() - committed)
                imports.append(committed - started)
                time.sleep(0.3)
        finally:
            gate.terminate()
            gate.wait(30)
            origin.terminate()
    finally:
        publisher.terminate()
        publisher.wait(30)
    latencies.sort()
    figures["approval to unblock, from the import's commit (median / p99 / max of %d)" % args.rounds] = (
        "%.2f / %.2f / %.2f s" % (statistics.median(latencies), latencies[min(len(latencies) - 1,
                                  int(0.99 * len(latencies)))], latencies[-1]))  # fmt: skip
    figures["the `icpgate import` of one filing at the publisher (median)"] = "%.2f s" % statistics.median(imports)
    figures["machine"] = "%d CPUs, Python %s" % (os.cpu_count(), sys.version.split()[0])
    for name, value in figures.items():
        print("%-75s %s" % (name, value))


if __name__ == "__main__":
    main()
