"""Write N synthetic filings in the interchange format (NDJSON), for benchmarks.

Domains are `site<N>.example-bench.cn`-style registrable names under a spread of suffixes; every
filing has an access record at IDC-EXAMPLE so the index is realistic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUFFIXES = ("cn", "com.cn", "net", "com", "org.cn", "net.cn")
STATUSES = ("approved",) * 8 + ("pending", "deregistered")
PROVINCES = "京津冀晋蒙辽吉黑沪苏浙皖闽赣鲁豫鄂湘粤桂琼渝蜀黔滇藏陕陇青宁新"


def domain(n: int) -> str:
    return "bench-site-%d.%s" % (n, SUFFIXES[n % len(SUFFIXES)])


def record(n: int) -> dict:
    subject = "%sICP备%010d号" % (PROVINCES[n % len(PROVINCES)], n)
    access_status = ("active", "active", "active", "first_review", "cancelled")[n % 5]
    return {
        "licence": subject + "-1",
        "subject_licence": subject,
        "subject_name": "基准测试公司%d" % n,
        "subject_type": "enterprise",
        "site_name": "基准站点%d" % n,
        "status": STATUSES[n % len(STATUSES)],
        "limit_access": n % 997 == 0,
        "domains": [domain(n)],
        "access": [{"provider": "IDC-EXAMPLE", "status": access_status, "ips": ["203.0.113.0/24", "2001:db8::/48"]}],
        "updated_at": "2026-11-20T08:00:00Z",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    with args.output.open("w", encoding="utf-8") as out:
        for n in range(args.count):
            out.write(json.dumps(record(n), ensure_ascii=False, separators=(",", ":")) + "\n")
    print("wrote %d filings to %s" % (args.count, args.output), file=sys.stderr)


if __name__ == "__main__":
    main()
