"""How many long-polling edges one publisher holds, and how fast a change reaches all of them.

    python bench/publisher_fanout.py --edges 1000 2000 4000

For each count: that many clients long-poll `changes?since=<serial>&wait=120` at once (one
connection each, as edge gates do), one filing is imported, and the time until every client
has its change set is measured. Clients and publisher share this machine, so the figures are a
floor for one publisher core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from benchkit import BENCH, ICPGATE, REPO, free_port
from gen_filings import record

OUT = BENCH / "out" / "fanout"


async def fan_out(url: str, edges: int, config: Path, number: int) -> tuple[float, float, int]:
    """(seconds until all got the change, median per-edge delay, failures)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(url + "/") as answer:
            serial = (await answer.json())["serial"]
        done: list[float] = []
        failures = 0

        async def poll() -> None:
            nonlocal failures
            try:
                async with session.get(url + "/changes", params={"since": serial, "wait": "120"},
                                       timeout=aiohttp.ClientTimeout(total=180)) as answer:  # fmt: skip
                    await answer.read()
                    if answer.status != 200:
                        failures += 1
                    done.append(time.perf_counter())
            except (aiohttp.ClientError, TimeoutError):
                failures += 1

        tasks = [asyncio.create_task(poll()) for _ in range(edges)]
        await asyncio.sleep(3 + edges / 1000)  # every poll is connected and waiting
        path = OUT / "one.ndjson"
        path.write_text(json.dumps(record(10_000_000 + number), ensure_ascii=False) + "\n", encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(*ICPGATE, "import", str(path), "-c", str(config),
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        await proc.wait()
        committed = time.perf_counter()
        await asyncio.gather(*tasks)
        delays = [moment - committed for moment in done]
        return (max(delays) if delays else float("nan")), (statistics.median(delays) if delays else float("nan")), \
            failures  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edges", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--filings", type=int, default=10_000)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    subprocess.run(["rm", "-rf", str(OUT)], check=True)
    OUT.mkdir(parents=True)
    config = OUT / "config.toml"
    config.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "%s"\n[policy]\npack = "%s"\n'
                      % (OUT / "registry.db", REPO / "policies" / "default.toml"))  # fmt: skip
    source = OUT / "filings.ndjson"
    subprocess.run([sys.executable, BENCH / "gen_filings.py", str(args.filings), str(source)], check=True)
    subprocess.run([*ICPGATE, "import", str(source), "-c", str(config)], check=True, capture_output=True)
    port = free_port()
    serve = [*ICPGATE, "feed", "serve", "--no-auth", "--listen", "127.0.0.1:%d" % port, "-c", str(config)]
    publisher = subprocess.Popen(serve, stderr=(OUT / "publisher.log").open("w"))
    url = "http://127.0.0.1:%d/feed/v1" % port
    time.sleep(3)
    try:
        for number, edges in enumerate(args.edges):
            total, median, failures = asyncio.run(fan_out(url, edges, config, number))
            rss = int(Path("/proc/%d/status" % publisher.pid).read_text().split("VmHWM:")[1].split()[0]) / 1024
            print("%5d long-polling edges: all served %.2f s after the commit (median %.2f s), %d failed; "
                  "publisher peak RSS %.0f MB" % (edges, total, median, failures, rss))  # fmt: skip
    finally:
        publisher.terminate()
        publisher.wait(30)


if __name__ == "__main__":
    main()
