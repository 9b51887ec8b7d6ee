"""What the gate pays for site inspection's sign (gate/relayed_table.py), in one process's CPU time.

    python bench/relayed_cost.py [HOSTS]

The gate records a filed name it relays when it first decides it (Runtime.decide's cache miss),
and the worker empties its decision cache at each violation flush so that a name in use is
recorded again. So a request that hits the cache pays nothing new; a miss pays one table update;
and each flush costs one fresh decision per name in use. This measures the three: the cache hit,
the miss with and without the recording, and a flush's re-decisions for HOSTS names.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "daemon"))

from icpgate.config.settings import load_config  # noqa: E402
from icpgate.gate import connection  # noqa: E402
from icpgate.gate.connection import Runtime  # noqa: E402
from icpgate.policy.decide import Policy  # noqa: E402
from icpgate.process.worker import build_runtime_parts  # noqa: E402
from icpgate.registry.index import IndexBuilder  # noqa: E402

DESTINATION = ("203.0.113.7", 443)
ROUNDS = 7


def runtime_for(hosts: list[str]) -> Runtime:
    config = load_config(REPO / "config.example.toml")
    policy, pages, tls_pages = build_runtime_parts(config)
    builder = IndexBuilder()
    for number, host in enumerate(hosts):
        builder.add(number, host, "京ICP备%08d号-1" % number, "approved", 0, "IDC-EXAMPLE\tactive\t")
    policy = Policy(policy.pack, config.provider.id, builder.build(), "enforce")
    return Runtime(policy, pages, config.gate, tls_pages)


def cpu_ns(work, calls: int) -> float:
    """Median CPU nanoseconds per call over ROUNDS runs of `work`."""
    samples = []
    for _ in range(ROUNDS):
        started = time.process_time_ns()
        work()
        samples.append((time.process_time_ns() - started) / calls)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hosts", nargs="?", type=int, default=1000, help="filed names in use (default %(default)s)")
    hosts = ["site-%d.example-bench.cn" % number for number in range(parser.parse_args().hosts)]
    runtime = runtime_for(hosts)
    decide = runtime.decide

    def hits() -> None:
        for _ in range(100):
            for host in hosts:
                decide(host, DESTINATION, "tls", None)

    def misses() -> None:
        for host in hosts:
            runtime.forget_decisions()
            decide(host, DESTINATION, "tls", None)

    def flush() -> None:
        runtime.relayed.take()
        runtime.forget_decisions()
        for host in hosts:
            decide(host, DESTINATION, "tls", None)

    hits()  # warm
    hit = cpu_ns(hits, 100 * len(hosts))
    recorded = cpu_ns(misses, len(hosts))
    saved, connection.RELAYED_REASONS = connection.RELAYED_REASONS, frozenset()
    try:
        unrecorded = cpu_ns(misses, len(hosts))
    finally:
        connection.RELAYED_REASONS = saved
    per_flush = cpu_ns(flush, 1)
    assert len(runtime.relayed) == len(hosts)
    print("decision, cache hit:              %7.0f ns (code unchanged by the recording)" % hit)
    print("decision, cache miss, recorded:   %7.0f ns" % recorded)
    print("decision, cache miss, unrecorded: %7.0f ns (the recording costs %+.0f ns a miss)"
          % (unrecorded, recorded - unrecorded))  # fmt: skip
    print("one flush's re-decisions:         %7.2f ms CPU for %d names in use (%.3f%% of a core at a 5 s flush)"
          % (per_flush / 1e6, len(hosts), per_flush / 5e9 * 100))  # fmt: skip


if __name__ == "__main__":
    main()
