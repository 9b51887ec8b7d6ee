"""100,000 distinct junk Host headers: the violation table stays within its cap, the overflow is
counted, memory stays flat and deciding does not get slower; filed traffic keeps passing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from adminkit import metric, start_observed_gate
from test_gate_process import http_get, status_of, wait_until

FLOOD = 100_000
MAX_KEYS = 1000
CONCURRENCY = 64


def rss_kb(pid: int) -> int:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def flood(port: int, hosts: list[bytes]) -> int:
    """Send one request per host, each on its own connection (a block closes it); count the 4xx."""
    queue = iter(hosts)
    refused = 0

    async def client() -> None:
        nonlocal refused
        for host in queue:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            status = await reader.readline()
            refused += status[9:10] == b"4"
            writer.close()

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return refused


def test_a_flood_of_junk_hosts_keeps_memory_and_decisions_flat(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, tables={
        "violations": {"max_keys": MAX_KEYS, "flush_interval": 1.0}})  # fmt: skip
    try:
        warm = [b"warm%d.example-junk.cn" % number for number in range(5000)]
        assert asyncio.run(flood(observed.http, warm)) == len(warm)
        wait_until(lambda: metric(observed.metrics(), "icpgate_decisions_total") >= len(warm), step=0.2)
        before = observed.metrics()
        rss_before = rss_kb(observed.gate.process.pid)

        # Half well-formed unfiled names, half malformed ones: every one distinct.
        junk = [b"j%d.example-flood%d.cn" % (n, n % 97) if n % 2 else b"bad_%d!" % n for n in range(FLOOD)]
        assert asyncio.run(flood(observed.http, junk)) == FLOOD
        assert status_of(http_get(observed.http, "example-filed.cn")) == 200

        wait_until(lambda: metric(observed.metrics(), "icpgate_decisions_total") >= len(warm) + FLOOD + 1, step=0.2)
        after = observed.metrics()
        rss_after = rss_kb(observed.gate.process.pid)

        # Within the cap: the table never held more than max_keys plus one overflow record.
        assert metric(after, "icpgate_violation_keys") <= MAX_KEYS + 1
        assert metric(after, "icpgate_violation_overflow_total") > 0
        assert metric(after, "icpgate_violation_blocks_dropped_total") == 0

        # Junk folds into one record per destination; nothing in the log has a malformed host.
        def junk_records() -> list[tuple[str, int]]:
            listing = observed.json("/api/v1/violations?reason=invalid")
            return [(item["host"], item["count"]) for item in listing["items"]]

        wait_until(lambda: junk_records() == [("(junk)", FLOOD // 2)], timeout=10, step=0.2)  # the last flush
        # Memory flat: the flood adds at most a few MB (the decision cache and table are bounded).
        assert rss_after - rss_before < 30_000, (rss_before, rss_after)

        # Deciding stayed as fast during the flood as for the warm-up traffic.
        def mean_decision(metrics) -> float:
            return metric(metrics, "icpgate_decision_seconds_sum") / metric(metrics, "icpgate_decision_seconds_count")

        flood_sum = metric(after, "icpgate_decision_seconds_sum") - metric(before, "icpgate_decision_seconds_sum")
        flood_count = metric(after, "icpgate_decision_seconds_count") - metric(before, "icpgate_decision_seconds_count")
        assert flood_sum / flood_count < max(3 * mean_decision(before), 50e-6)
    finally:
        assert observed.gate.stop() == 0
