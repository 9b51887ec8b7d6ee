"""Foundation figures: index build time and memory, and `decide` latency, on a real registry.

    python bench/registry_bench.py CONFIG     (after `icpgate import bench/out/filings-1m.ndjson -c CONFIG`)

Prints the median of repeated timings; memory is the process's resident set (VmRSS) before and
after the index is built.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from pathlib import Path

from icpgate.config.settings import load_config
from icpgate.policy.decide import Policy
from icpgate.policy.pack import load_pack
from icpgate.registry.store import open_registry

ROUNDS = 7
CALLS = 200_000


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def load(config_path: Path):
    config = load_config(config_path)
    async with open_registry(config.registry_path, create=False) as registry:
        gc.collect()
        before = rss_bytes()
        started = time.perf_counter()
        index = await registry.load_index()
        seconds = time.perf_counter() - started
        gc.collect()
        return config, index, seconds, rss_bytes() - before


def time_decide(policy: Policy, host: str) -> float:
    """Median seconds per decision over ROUNDS rounds of CALLS calls."""
    decide = policy.decide
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            decide(host, "203.0.113.10", 443, "tls")
        rounds.append((time.perf_counter() - started) / CALLS)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    args = parser.parse_args()
    config, index, seconds, grown = asyncio.run(load(args.config))
    policy = Policy(load_pack(config.policy_pack).policy, config.provider.id, index)
    print("filings in index:        %d (%d domains)" % (len(index), index.domain_count))
    print("index build from SQLite: %.1f s" % seconds)
    print(
        "index resident memory:   %.0f MB (%.0f bytes per domain)" % (grown / 1e6, grown / max(index.domain_count, 1))
    )
    for label, host in (
        ("6-label filed name", "a.b.c.d.bench-site-12.cn"),
        ("6-label unfiled name", "a.b.c.d.no-such-site.cn"),
        ("2-label filed name", "bench-site-12.cn"),
        ("IDN name", "www.中文示例.cn"),
    ):
        print("decide, %-21s median %.2f µs" % (label + ":", time_decide(policy, host) * 1e6))


if __name__ == "__main__":
    main()
