"""Reports upward and work through the list: the ISMS report (DNS-confirmed by default), the
registry's decision now, the customer map and acknowledgements, through the real CLI on real
SQLite files, and through the admin API of a running gate."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import urllib.request
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from adminkit import TOKEN, admin_request, start_observed_gate
from test_gate_process import http_get, wait_until

from conftest import run_icpgate, write_ndjson
from icpgate.config.settings import load_config
from icpgate.violations.store import open_violations

NOW = time.time()
RECORDS = {  # host: (destination ip, count, dns state, addresses)
    "shop.example-rogue.cn": ("203.0.113.7", 5, "confirmed", ["203.0.113.7"]),
    "www.example-approved-since.cn": ("203.0.113.20", 2, "confirmed", ["203.0.113.20"]),
    "scan.example-stranger.cn": ("203.0.113.7", 3, "not_hosted", ["198.51.100.7"]),
    "nx.example-gone.cn": ("203.0.113.8", 1, "error", []),
}
APPROVED_SINCE = {
    "licence": "京ICP备20279999号-1", "subject_licence": "京ICP备20279999号", "subject_name": "新批准有限公司",
    "subject_type": "enterprise", "site_name": "刚批准", "status": "approved", "domains": ["example-approved-since.cn"],
    "access": [{"provider": "IDC-EXAMPLE", "status": "active", "ips": []}], "updated_at": "2026-11-22T08:00:00Z",
}  # fmt: skip


def violations_db(config: Path) -> Path:
    return config.parent / "registry.violations.db"


def add_records(path: Path, records: dict, seen: float = NOW) -> None:
    async def write() -> None:
        async with open_violations(path) as store:
            await store.write({(host, ip, 80, "http", "unfiled"): [seen - 3600, seen, count, 0, None]
                               for host, (ip, count, _, _) in records.items()})  # fmt: skip
            for host, (ip, _, state, addresses) in records.items():
                await store.set_dns(host, ip, state, addresses, "NXDOMAIN" if state == "error" else "", seen)

    asyncio.run(write())


def cli(config: Path, *args: str) -> str:
    result = run_icpgate(*args, "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def isms(config: Path, *extra: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(cli(config, "violations", "--isms", *extra).lstrip("\ufeff"))))


def test_isms_report_holds_confirmed_sites_and_the_decision_now(sample_registry: Path) -> None:
    add_records(violations_db(sample_registry), RECORDS)
    rows = isms(sample_registry)
    assert rows[0][-4:] == ["客户名称", "合同编号", "处理状态", "处理备注"] and "DNS核实" not in rows[0]
    assert {row[0] for row in rows[1:]} == {"shop.example-rogue.cn", "www.example-approved-since.cn"}
    everything = isms(sample_registry, "--include-unconfirmed")
    assert everything[0][-1] == "DNS核实"
    marks = {row[0]: row[-1] for row in everything[1:]}
    assert marks == {"shop.example-rogue.cn": "已确认", "www.example-approved-since.cn": "已确认",
                     "scan.example-stranger.cn": "未解析到本机房", "nx.example-gone.cn": "解析失败"}  # fmt: skip
    beijing = datetime.fromtimestamp(NOW, timezone(timedelta(hours=8))).strftime("%Y-%m-%d %H:%M:%S")
    shop = next(row for row in rows if row[0] == "shop.example-rogue.cn")
    assert shop[7] == beijing and shop[10] == "已阻断（unfiled）"
    # Approved since it was blocked: the report says so, and so does the table.
    assert run_icpgate("import", str(write_ndjson(sample_registry.parent / "new.ndjson", [APPROVED_SINCE])),
                       "-c", str(sample_registry)).returncode == 0  # fmt: skip
    after = {row[0]: row[10] for row in isms(sample_registry)[1:]}
    assert after == {
        "shop.example-rogue.cn": "已阻断（unfiled）",
        "www.example-approved-since.cn": "已备案放行（filed）",
    }
    table = cli(sample_registry, "violations")
    assert "LAST SEEN (UTC+08:00)" in table and beijing in table
    line = next(line for line in table.splitlines() if "www.example-approved-since.cn" in line)
    assert "allowed (filed)" in line
    assert "blocked (unfiled)" in next(line for line in table.splitlines() if "shop.example-rogue.cn" in line)
    utc = datetime.fromtimestamp(NOW, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert json.loads(cli(sample_registry, "violations", "--json"))["items"][0]["last_seen"] == utc  # machines: UTC
    shown = cli(sample_registry, "violations", "--set", 'display.timezone = "UTC"')
    assert "LAST SEEN (UTC)" in shown and datetime.fromtimestamp(NOW, UTC).strftime("%Y-%m-%d %H:%M:%S") in shown


def test_customer_map_and_handling_through_the_cli(sample_registry: Path, tmp_path: Path) -> None:
    add_records(violations_db(sample_registry), RECORDS)
    sheet = tmp_path / "客户.csv"
    sheet.write_bytes("IP段,客户名称,合同编号\n203.0.113.0/28，203.0.113.16-203.0.113.31,示例客户甲,HT-001\n"
                      "203.0.113.0/24,示例客户乙,HT-002\n".encode("gbk"))  # fmt: skip
    assert "imported 3 ranges of 2 customers" in cli(sample_registry, "customers", "import", str(sheet))
    items = {item["host"]: item for item in json.loads(cli(sample_registry, "violations", "--json"))["items"]}
    assert items["shop.example-rogue.cn"]["customer"] == {"name": "示例客户甲", "contract": "HT-001",
                                                         "network": "203.0.113.0/28"}  # fmt: skip
    assert items["www.example-approved-since.cn"]["customer"]["network"] == "203.0.113.16/28"
    # A TOML map replaces it; the most specific range wins.
    toml = tmp_path / "customers.toml"
    toml.write_text('[[customer]]\nname = "Example Hosting"\ncontract = "C-9"\nranges = ["203.0.113.0/24"]\n\n'
                    '[[customer]]\nname = "Example Shop"\ncontract = "C-7"\nranges = ["203.0.113.7"]\n')  # fmt: skip
    cli(sample_registry, "customers", "import", str(toml))
    rows = list(csv.DictReader(io.StringIO(cli(sample_registry, "violations", "--csv"))))
    by_host = {row["host"]: row for row in rows}
    assert (by_host["shop.example-rogue.cn"]["customer"], by_host["shop.example-rogue.cn"]["contract"]) == (
        "Example Shop", "C-7")  # fmt: skip
    assert by_host["nx.example-gone.cn"]["customer"] == "Example Hosting"
    # A bad map is refused with file, line and field, and the last good one stays.
    bad = tmp_path / "bad.csv"
    bad.write_text("network,name,contract\n203.0.113.0/24,A,1\n203.0.113.7/24,B,2\n")
    result = run_icpgate("customers", "import", str(bad), "-c", str(sample_registry))
    assert result.returncode == 4 and "%s:3: network: '203.0.113.7/24'" % bad in result.stderr
    assert "Example Shop" in cli(sample_registry, "customers", "list")

    ids = {item["host"]: item["id"] for item in items.values()}
    shop, scan = ids["shop.example-rogue.cn"], ids["scan.example-stranger.cn"]
    assert "1 record(s) acknowledged" in cli(sample_registry, "violations", "ack", str(shop), "--note", "已致电客户")
    cli(sample_registry, "violations", "resolve", str(scan), "--note", "spoofed Host, nothing hosted")
    states = {i["host"]: i["handling"] for i in json.loads(cli(sample_registry, "violations", "--json"))["items"]}
    assert states["shop.example-rogue.cn"]["state"] == "acknowledged"
    assert states["shop.example-rogue.cn"]["note"] == "已致电客户"
    assert states["scan.example-stranger.cn"]["state"] == "resolved"
    assert states["nx.example-gone.cn"] == {"state": "open", "note": None, "at": None, "by": None}
    open_ones = json.loads(cli(sample_registry, "violations", "--json", "--state", "open"))["items"]
    assert {item["host"] for item in open_ones} == {"www.example-approved-since.cn", "nx.example-gone.cn"}
    report = {row[0]: row for row in isms(sample_registry)[1:]}
    assert report["shop.example-rogue.cn"][13:15] == ["已受理", "已致电客户"]
    assert report["shop.example-rogue.cn"][11:13] == ["Example Shop", "C-7"]
    # Seen again after it was resolved: open again.
    add_records(violations_db(sample_registry), {"scan.example-stranger.cn": RECORDS["scan.example-stranger.cn"]},
                seen=time.time() + 5)  # fmt: skip
    again = json.loads(cli(sample_registry, "violations", "--json", "--state", "open"))["items"]
    assert "reopened" in {item["handling"]["state"] for item in again}
    cli(sample_registry, "violations", "reopen", str(shop))
    missing = run_icpgate("violations", "resolve", str(shop), "987654", "-c", str(sample_registry))
    assert missing.returncode == 4 and "no record with id 987654" in missing.stderr
    assert json.loads(cli(sample_registry, "violations", "--json", "--state", "acknowledged"))["total"] == 0


def confirm(path: Path, host: str, ip: str) -> None:
    async def write() -> None:
        async with open_violations(path) as store:
            await store.set_dns(host, ip, "confirmed", [ip], "", time.time())

    asyncio.run(write())


def post_json(port: int, path: str, body: object, token: str | None = TOKEN) -> tuple[int, dict]:
    """POST `body` as JSON (bytes: as they are)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data, headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_admin_api_and_status_page_show_customers_and_take_acknowledgements(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls)
    try:
        for host in ("one.example-unfiled.cn", "two.example-unfiled.cn"):
            http_get(observed.http, host)
        wait_until(lambda: observed.json("/api/v1/violations")["total"] >= 2, timeout=15, step=0.1)
        sheet = tmp_path / "customers.csv"
        sheet.write_text("network,name,contract\n127.0.0.0/8,Loopback Customer,LB-1\n")
        cli(observed.config, "customers", "import", str(sheet))  # while the gate runs: no restart
        items = observed.json("/api/v1/violations")["items"]
        assert all(item["customer"]["name"] == "Loopback Customer" for item in items)
        assert all(item["current"] == {"action": "block", "reason": "unfiled"} for item in items)
        first = items[0]["id"]
        path = "/api/v1/violations/%d/handling" % first
        assert post_json(observed.admin, path, {"state": "acknowledged"}, token=None)[0] == 401
        assert post_json(observed.admin, path, {"state": "maybe"})[0] == 400
        too_deep = post_json(observed.admin, path, b"[" * 100_000 + b"]" * 100_000)  # json.loads: RecursionError
        assert too_deep == (400, {"error": "the body is not valid JSON"}), too_deep
        assert post_json(observed.admin, path, {"state": "resolved", "extra": 1})[0] == 400
        assert post_json(observed.admin, "/api/v1/violations/987654/handling", {"state": "resolved"})[0] == 404
        status, record = post_json(observed.admin, path, {"state": "acknowledged", "note": "客户已通知，整改中"})
        assert status == 200 and record["handling"]["state"] == "acknowledged"
        assert record["handling"]["note"] == "客户已通知，整改中" and record["handling"]["at"].endswith("Z")
        listed = observed.json("/api/v1/violations?state=acknowledged")
        assert [item["id"] for item in listed["items"]] == [first]
        # The status page: bilingual, Beijing time, the decision now, customer and handling. It lists
        # confirmed records; DNS is off in this gate, so one is confirmed through the store's API.
        confirm(load_config(observed.config).violations.path, items[0]["host"], items[0]["ip"])
        code, _, page = admin_request(observed.admin, "/")
        html = page.decode()
        assert code == 200 and 'lang="zh-CN"' in html
        last_seen = datetime.fromisoformat(items[0]["last_seen"].replace("Z", "+00:00"))
        expected = ("备案数据与执行 · Feed and enforcement", "时区 · Time zone", "UTC+08:00",
                    "Loopback Customer（LB-1）", "已受理 · acknowledged：客户已通知，整改中", "当前状态 · Now",
                    "已阻断（unfiled） · blocked (unfiled)",
                    last_seen.astimezone(timezone(timedelta(hours=8))).strftime("%Y-%m-%d %H:%M:%S"))  # fmt: skip
        for text in expected:
            assert text in html, text
        assert items[1]["host"] not in html.split("Top confirmed violations", 1)[1]
    finally:
        assert observed.gate.stop() == 0
    assert "Traceback" not in observed.gate.log()
