"""Site inspection figures: unthrottled throughput against a local dnsmasq, queries per filing,
and what a full pass over 100,000 filings with our access takes at the default rate.

    python bench/inspect_bench.py --filings 5000

The filings mix what a registry holds: a bare registrable domain (so its `www.` is asked too),
a subdomain, a two-domain filing and a CNAME chain, resolving here, elsewhere or nowhere. The
real `icpgate inspect` runs them with the rate limit out of the way; dnsmasq's query log counts
what it received.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import ICPGATE, REPO

sys.path.insert(0, str(REPO / "tests"))
from dnskit import start_dnsmasq

FULL_PASS = 100_000
DEFAULT_RATE = 20.0  # inspect.rate


def filings(count: int) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """(records, host records, CNAMEs): four shapes in turn."""
    records, hosts, cnames = [], {}, {}
    for number in range(count):
        shape = number % 4
        if shape == 0:
            domains = ["bare-%d.cn" % number]
            hosts["www.bare-%d.cn" % number] = "192.0.2.%d" % (number % 250 + 1)
        elif shape == 1:
            domains = ["site-%d.example-bench.com.cn" % number]
            hosts[domains[0]] = "198.51.100.%d" % (number % 250 + 1)
        elif shape == 2:
            domains = ["pair-%d.cn" % number, "pair-%d.com" % number]  # the .com answers NXDOMAIN
            hosts[domains[0]] = "192.0.2.7"
        else:
            domains = ["chain-%d.cn" % number]
            cnames[domains[0]] = "edge-%d.cdn-bench.net" % number
            hosts["edge-%d.cdn-bench.net" % number] = "198.51.100.9"
        records.append({
            "licence": "京ICP备%08d号-1" % number, "subject_licence": "京ICP备%08d号" % number,
            "subject_name": "基准%d" % number, "subject_type": "enterprise", "site_name": "站点%d" % number,
            "status": "approved", "domains": domains, "updated_at": "2026-11-01T08:00:00Z",
            "access": [{"provider": "IDC-BENCH", "status": "active", "ips": []}],
        })  # fmt: skip
    return records, hosts, cnames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filings", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        records, hosts, cnames = filings(args.filings)
        dns = start_dnsmasq(tmp, hosts=hosts, cnames=cnames, extra=("--local=/cn/", "--local=/com/", "--local=/net/",
                                                                     "--cache-size=0"))  # fmt: skip
        try:
            config = tmp / "config.toml"
            config.write_text("\n".join([
                "[provider]", 'id = "IDC-BENCH"', "[registry]", 'path = "%s"' % (tmp / "registry.db"),
                "[dns]", 'hosted_ranges = ["192.0.2.0/24"]', "[admin]", "enabled = false", "[inspect]",
                'resolvers = ["127.0.0.1:%d"]' % dns.port, "rate = 1000000", "concurrency = %d" % args.concurrency,
                "timeout = 5", "retries = 0", 'cdn_suffixes = ["cdn-bench.net"]',
            ]) + "\n")  # fmt: skip
            source = tmp / "filings.ndjson"
            source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            subprocess.run([*ICPGATE, "import", str(source), "-c", str(config)], check=True, capture_output=True)
            started = time.perf_counter()
            result = subprocess.run([*ICPGATE, "inspect", "--json", "--limit", "1", "-c", str(config)],
                                    check=True, capture_output=True, text=True)  # fmt: skip
            seconds = time.perf_counter() - started
            summary = json.loads(result.stdout)["summary"]
            received = sum(1 for line in dns.log_path.read_text().splitlines() if "query[" in line)
        finally:
            dns.stop()
    queries = summary["last_pass"]["queries"]
    per_filing = queries / args.filings
    print("%d filings, %d domains: %d DNS queries (dnsmasq received %d), %.2f per filing"
          % (args.filings, summary["last_pass"]["domains"], queries, received, per_filing))  # fmt: skip
    print("unthrottled, concurrency %d: %.1f s (process start included): %.0f filings/s, %.0f queries/s"
          % (args.concurrency, seconds, args.filings / seconds, queries / seconds))  # fmt: skip
    print("classes: %s" % ", ".join("%s %d" % item for item in summary["domains"].items()))
    full = FULL_PASS * per_filing / DEFAULT_RATE
    print("a full pass over %d filings at the default inspect.rate = %g/s: %.0f queries, %.1f h"
          % (FULL_PASS, DEFAULT_RATE, FULL_PASS * per_filing, full / 3600))  # fmt: skip


if __name__ == "__main__":
    main()
