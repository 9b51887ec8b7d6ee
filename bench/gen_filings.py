"""Write N synthetic filings in the interchange format (NDJSON), for benchmarks.

Domains are `site<N>.example-bench.cn`-style registrable names under a spread of suffixes; every
filing has an access record at IDC-EXAMPLE so the index is realistic.

`--download` writes the filings a download file of the national filing system carries (approved,
access active, the province system's ids kept) and `--xml` writes those same filings as such a
file (`DownloadData`, GBK, every element 企业下载数据格式.xsd requires, fictional data): importing
the two gives the same registry, so their import times compare (bench/import_bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta
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


ISPID = 10001  # maps onto IDC-EXAMPLE with import.isp_ids = {"10001" = "IDC-EXAMPLE"}
RANGE = (3405803776, 3405804031)  # 203.0.113.0 .. 203.0.113.255


def modified(n: int) -> tuple[str, str]:
    """A last-modified time that differs between filings, as in a real download: Beijing time as the
    file writes it, and UTC as it is stored."""
    moment = datetime(2026, 11, 20, 16, 0, 0) + timedelta(seconds=n % 2_000_000)
    return moment.strftime("%Y-%m-%d %H:%M:%S"), (moment - timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%SZ")


def download_record(n: int) -> dict:
    """What importing `download_xml(n)` stores: `record(n)`, approved with one active IPv4 access."""
    return record(n) | {
        "status": "approved",
        "limit_access": False,
        "access": [{"provider": "IDC-EXAMPLE", "status": "active", "ips": ["203.0.113.0/24"]}],
        "updated_at": modified(n)[1],
        "miit_ztid": str(n + 1),
        "miit_wzid": str(n + 1),
        "miit_jrids": {str(n + 1): "IDC-EXAMPLE"},
    }


def download_xml(n: int) -> str:
    """One `Baxx` (a subject with one website) of a download file, with the elements the schema requires."""
    record = download_record(n)
    return (
        "<Baxx><Zt_xx><Ztid>%(id)d</Ztid><Dwmc>%(subject)s</Dwmc><Dwxz>4</Dwxz><Txdz><Shengid>110000</Shengid></Txdz>"
        "<Zj><Zjlx>1</Zjlx><Zjhm>BENCH%(id)010d</Zjhm><Zjzs>示例住所</Zjzs></Zj><Fzr><Fzr_dzyj>noc@example.cn</Fzr_dzyj>"
        "</Fzr><Baxh>%(subject_licence)s</Baxh><Bbyhlx>1</Bbyhlx><Scbbsj>2026-11-01 09:00:00</Scbbsj>"
        "<Zjxgsj>%(modified)s</Zjxgsj></Zt_xx><Wz_xx><Wzid>%(id)d</Wzid><Wzmc>%(site)s</Wzmc><Yylb><Yylb_id>1"
        "</Yylb_id></Yylb><Ym_xx><Ymid>%(id)d</Ymid><Ym>%(domain)s</Ym></Ym_xx><Jr_xx><Jrid>%(id)d</Jrid>"
        "<Ispid>%(isp)d</Ispid><Wzfb><Fbdd>1</Fbdd></Wzfb><Wzjrfs><Jrfs>1</Jrfs></Wzjrfs><Ip_xx><Ipid>%(id)d</Ipid>"
        "<Qsip>%(first)d</Qsip><Zzip>%(last)d</Zzip></Ip_xx></Jr_xx><Wz_Fzr><Fzr_xm>示例</Fzr_xm></Wz_Fzr>"
        "<Zjxgsj>%(modified)s</Zjxgsj><Baxh>%(licence)s</Baxh></Wz_xx></Baxx>\n"
        % {"id": n + 1, "subject": record["subject_name"], "subject_licence": record["subject_licence"],
           "site": record["site_name"], "domain": record["domains"][0], "isp": ISPID, "first": RANGE[0],
           "last": RANGE[1], "licence": record["licence"], "modified": modified(n)[0]}
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int)
    parser.add_argument("output", type=Path)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--download", action="store_true", help="NDJSON of the filings --xml writes")
    kind.add_argument("--xml", action="store_true", help="a download file of the national filing system (GBK)")
    args = parser.parse_args()
    if args.xml:
        with args.output.open("w", encoding="gbk") as out:
            out.write('<?xml version="1.0" encoding="GBK"?>\n<DownloadData>\n<ICP>\n<BASJ>\n')
            for n in range(args.count):
                out.write(download_xml(n))
            out.write("</BASJ>\n</ICP>\n</DownloadData>\n")
    else:
        make = download_record if args.download else record
        with args.output.open("w", encoding="utf-8") as out:
            for n in range(args.count):
                out.write(json.dumps(make(n), ensure_ascii=False, separators=(",", ":")) + "\n")
    print("wrote %d filings to %s" % (args.count, args.output), file=sys.stderr)


if __name__ == "__main__":
    main()
