"""Violations end to end: blocked requests through the real gate show up, with the right counts and
DNS confirmation from a real dnsmasq, in the log, the admin API, the CLI, the exports, the status
page, the metrics and the JSON block log."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adminkit import TOKEN, metric, start_observed_gate
from dnskit import start_dnsmasq
from gatekit import closed_by_peer, python_hello, send_in_pieces
from test_gate_process import http_get, status_of, wait_until

# Unfiled names and what dnsmasq answers for them; 192.0.2.0/24 stands for our hosted range.
HOSTS = {
    "shop.example-rogue.cn": "192.0.2.10",  # a customer's unfiled site: confirmed
    "seen.example-onus.cn": "127.0.0.1",  # resolves onto the address it was seen on: confirmed
    "scan.example-stranger.cn": "198.51.100.7",  # points elsewhere: a spoofed Host, not hosted here
    "target.example-chain.cn": "192.0.2.20",
}
CNAMES = {"alias.example-chain.cn": "mid.example-chain.cn", "mid.example-chain.cn": "target.example-chain.cn"}
NXDOMAIN = ("nx.example-gone.cn",)
HTTP_BLOCKS = {"shop.example-rogue.cn": 3, "scan.example-stranger.cn": 2, "nx.example-gone.cn": 1,
               "alias.example-chain.cn": 1, "example-pending.cn": 1}  # fmt: skip
EXPECTED_DNS = {"shop.example-rogue.cn": "confirmed", "seen.example-onus.cn": "confirmed",
                "alias.example-chain.cn": "confirmed", "scan.example-stranger.cn": "not_hosted",
                "nx.example-gone.cn": "error", "example-pending.cn": "error"}  # fmt: skip


def icpgate(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icpgate", *args, "-c", str(config)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.fixture
def dnsmasq(tmp_path: Path):
    server = start_dnsmasq(tmp_path, hosts=HOSTS, cnames=CNAMES, nxdomain=NXDOMAIN)
    yield server
    server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_blocks_show_up_everywhere_with_dns_confirmation(tmp_path: Path, origin, dnsmasq, workers: int) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, workers=workers, tables={"dns": {
        "enabled": True, "resolvers": ["127.0.0.1:%d" % dnsmasq.port], "hosted_ranges": ["192.0.2.0/24"],
        "timeout": 2}})  # fmt: skip
    try:
        request_ids = {}
        for host, count in HTTP_BLOCKS.items():
            for _ in range(count):
                answer = http_get(observed.http, host)
                assert status_of(answer) == 403, answer[:200]
                request_ids[host] = answer.split(b"X-ICP-Gate: ", 1)[1].split(b"\r\n")[0].split(b"id=")[1].decode()
        for _ in range(2):
            assert status_of(http_get(observed.http, "bad_host!")) == 400
            assert status_of(http_get(observed.http, "example-filed.cn")) == 200
        closed_by_peer(send_in_pieces(observed.tls, python_hello("seen.example-onus.cn"), []))

        def settled() -> dict | None:
            listing = observed.json("/api/v1/violations")
            named = [item for item in listing["items"] if item["domain"]]
            done = len(named) == len(EXPECTED_DNS) and all(item["dns"]["state"] != "unchecked" for item in named)
            return listing if done else None

        wait_until(lambda: settled() is not None, timeout=30, step=0.2)
        listing = settled()
        by_host = {item["host"]: item for item in listing["items"]}

        # The log: one record per host and destination, with the counts the gate saw.
        assert {host: by_host[host]["count"] for host in HTTP_BLOCKS} == HTTP_BLOCKS
        assert by_host["seen.example-onus.cn"]["count"] == 1 and by_host["seen.example-onus.cn"]["proto"] == "tls"
        assert by_host["example-pending.cn"]["reason"] == "pending"
        assert by_host["shop.example-rogue.cn"]["domain"] == "example-rogue.cn"
        assert all(item["blocked"] and item["client"] == "127.0.0.1" for item in listing["items"])
        junk = by_host["(junk)"]
        assert junk["count"] == 2 and junk["reason"] == "invalid" and junk["domain"] is None
        assert "example-filed.cn" not in by_host
        # DNS confirmation, with the addresses and the CNAME chain followed.
        assert {host: by_host[host]["dns"]["state"] for host in EXPECTED_DNS} == EXPECTED_DNS
        assert by_host["shop.example-rogue.cn"]["dns"]["addresses"] == ["192.0.2.10"]
        assert by_host["scan.example-stranger.cn"]["dns"]["addresses"] == ["198.51.100.7"]
        chain = by_host["alias.example-chain.cn"]["dns"]
        assert chain["addresses"] == ["192.0.2.20"]
        assert "mid.example-chain.cn -> target.example-chain.cn" in chain["detail"]
        assert "NXDOMAIN" in by_host["nx.example-gone.cn"]["dns"]["detail"]
        assert by_host["shop.example-rogue.cn"]["dns"]["checked_at"]
        # Confirmed first, everywhere.
        states = [item["dns"]["state"] for item in listing["items"]]
        assert states[:3] == ["confirmed"] * 3 and "confirmed" not in states[3:]
        assert listing["items"][0]["host"] == "shop.example-rogue.cn"  # the busiest confirmed one

        # The API's filters and pagination.
        confirmed = observed.json("/api/v1/violations?confirmed=true")
        assert {item["host"] for item in confirmed["items"]} == {h for h, s in EXPECTED_DNS.items() if s == "confirmed"}
        page = observed.json("/api/v1/violations?limit=2&offset=2")
        assert [item["id"] for item in page["items"]] == [item["id"] for item in listing["items"][2:4]]
        assert page["next_offset"] == 4 and page["total"] == listing["total"]
        assert observed.json("/api/v1/violations?reason=pending")["total"] == 1
        assert observed.get("/api/v1/violations?since=yesterday")[0] == 400

        # The CLI, the CSV and the ISMS export.
        cli = json.loads(icpgate(observed.config, "violations", "--json").stdout)
        assert [(i["host"], i["count"], i["dns"]["state"]) for i in cli["items"]] == [
            (i["host"], i["count"], i["dns"]["state"]) for i in listing["items"]]  # fmt: skip
        text = icpgate(observed.config, "violations", "--confirmed").stdout
        assert "shop.example-rogue.cn" in text and "scan.example-stranger.cn" not in text
        rows = list(csv.DictReader(io.StringIO(icpgate(observed.config, "violations", "--csv").stdout)))
        assert {row["host"]: int(row["count"]) for row in rows if row["domain"]} == {
            host: by_host[host]["count"] for host in EXPECTED_DNS}  # fmt: skip
        isms = list(csv.reader(io.StringIO(icpgate(observed.config, "violations", "--isms").stdout.lstrip("\ufeff"))))
        assert isms[0] == ["域名", "顶级域名", "IP", "端口", "协议", "违规类型", "首次发现时间", "最后发现时间",
                           "访问次数", "是否阻断", "当前状态", "客户名称", "合同编号", "处理状态",
                           "处理备注"]  # fmt: skip
        report = {row[0]: row for row in isms[1:]}
        # DNS-confirmed sites only: scanners, spoofed Hosts and NXDOMAIN are no unfiled sites of ours.
        assert set(report) == {host for host, state in EXPECTED_DNS.items() if state == "confirmed"}
        everything = icpgate(observed.config, "violations", "--isms", "--include-unconfirmed").stdout
        marked = {row[0]: row[-1] for row in list(csv.reader(io.StringIO(everything.lstrip("\ufeff"))))[1:]}
        assert set(marked) == set(EXPECTED_DNS)  # junk has no domain and is left out
        assert marked["scan.example-stranger.cn"] == "未解析到本机房" and marked["nx.example-gone.cn"] == "解析失败"
        shop = report["shop.example-rogue.cn"]
        assert shop[1:6] == ["example-rogue.cn", "127.0.0.1", str(observed.http), "HTTP", "1"]
        assert shop[8:10] == ["3", "是"] and shop[10].startswith("已阻断")

        # Metrics: the same counts, and the DNS results.
        metrics = observed.metrics()
        unfiled_http = sum(count for host, count in HTTP_BLOCKS.items() if host != "example-pending.cn")
        assert metric(metrics, "icpgate_decisions_total", kind="http", action="block", reason="unfiled") == unfiled_http
        assert metric(metrics, "icpgate_decisions_total", kind="http", action="allow", reason="filed") == 2
        assert metric(metrics, "icpgate_decisions_total", kind="tls", action="block", reason="unfiled") == 1
        assert metric(metrics, "icpgate_dns_checks_total", result="confirmed") == 3
        assert metric(metrics, "icpgate_dns_checks_total", result="not_hosted") == 1
        assert metric(metrics, "icpgate_violation_records", dns="confirmed") == 3
        assert metric(metrics, "icpgate_violation_records_flushed_total") >= len(by_host)
        decided = sum(HTTP_BLOCKS.values()) + 2 + 2 + 1  # the blocks, the junk Hosts, the filed ones, the SNI
        assert metric(metrics, "icpgate_decision_seconds_count") == decided
        assert metric(metrics, "icpgate_enforcement_mode", mode="enforce") == 1
        assert metric(metrics, "icpgate_relayed_bytes_total", direction="to_client") > 0

        # The status page, readable without Grafana.
        status, headers, page_html = observed.get("/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        top = page_html.decode().split("Top confirmed violations", 1)[1]
        assert "shop.example-rogue.cn" in top and "scan.example-stranger.cn" not in top

        # The block log: the request id on the block page finds the request.
        lines = [json.loads(line) for line in observed.gate.log().splitlines() if line.startswith("{")]
        blocked = {line["request_id"]: line for line in lines if line.get("event") == "blocked"}
        line = blocked[request_ids["scan.example-stranger.cn"]]
        assert line["host"] == "scan.example-stranger.cn" and line["reason"] == "unfiled"
        assert line["client"].startswith("127.0.0.1:") and line["destination"] == "127.0.0.1:%d" % observed.http
    finally:
        assert observed.gate.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_admin_answers_decisions_filings_feed_and_guards_sync(tmp_path: Path, origin, workers: int) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, workers=workers)
    try:
        for host in ("example-filed.cn", "example-pending.cn", "www.example-unknown.cn", "bad_host!"):
            api = observed.json("/api/v1/decision?host=%s&ip=203.0.113.5&port=80" % host)
            cli = icpgate(observed.config, "check", host, "--ip", "203.0.113.5", "--port", "80", "--json")
            assert api == json.loads(cli.stdout)
        quic = observed.json("/api/v1/decision?host=www.example-unknown.cn&ip=203.0.113.5&port=443&proto=quic")
        cli = icpgate(observed.config, "check", "www.example-unknown.cn", "--ip", "203.0.113.5", "--port", "443",
                      "--proto", "quic", "--json")  # fmt: skip
        assert quic == json.loads(cli.stdout) and quic["destination"]["proto"] == "quic" and quic["reason"] == "unfiled"
        assert observed.get("/api/v1/decision?host=a.cn&proto=udp")[0] == 400
        assert observed.get("/api/v1/decision")[0] == 400
        assert observed.get("/api/v1/decision?host=a.cn&ip=300.1.1.1")[0] == 400
        assert observed.get("/api/v1/decision?host=a.cn&port=70000")[0] == 400

        filing = observed.json("/api/v1/filings/www.example-filed.cn")
        assert filing["matched"] == "example-filed.cn" and filing["filing"]["licence"] == "京ICP备20240001号-1"
        assert observed.get("/api/v1/filings/example-nothing.cn")[0] == 404
        assert observed.get("/api/v1/filings/bad_host!")[0] == 400

        feed = observed.json("/api/v1/feed")
        assert feed["freshness"]["state"] == "local" and feed["filings"] > 40

        ready = observed.json("/readyz")
        bound = 2 * workers  # two listeners in each worker
        assert ready["ready"] and ready["checks"]["listeners"] == {"ok": True, "bound": bound, "expected": bound}
        assert observed.json("/healthz") == {"status": "ok"}

        assert observed.get("/api/v1/feed/sync", method="POST")[0] == 401
        wrong = observed.get("/api/v1/feed/sync", {"Authorization": "Bearer nope"}, "POST")
        assert wrong[0] == 401 and wrong[1]["WWW-Authenticate"] == "Bearer"
        right = observed.get("/api/v1/feed/sync", {"Authorization": "Bearer " + TOKEN}, "POST")
        assert right[0] == 409 and b"no feed" in right[2]
        assert observed.get("/api/v1/feed/sync")[0] == 405  # state changes are POST only
    finally:
        assert observed.gate.stop() == 0


def test_several_workers_add_up_in_one_metrics_view(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, workers=2)
    try:
        for number in range(40):
            assert status_of(http_get(observed.http, "n%d.example-unfiled-many.cn" % number)) == 403
        for _ in range(10):
            assert status_of(http_get(observed.http, "example-filed.cn")) == 200

        def counted() -> dict:
            metrics = observed.metrics()
            return metrics if metric(metrics, "icpgate_decisions_total", kind="http") == 50 else None

        wait_until(lambda: counted() is not None, timeout=10, step=0.2)
        metrics = counted()
        assert metric(metrics, "icpgate_decisions_total", action="block", reason="unfiled") == 40
        assert metric(metrics, "icpgate_connections_total", kind="http") == 50 + 1  # and start_gate's port probe
        assert metric(metrics, "icpgate_listeners_bound") == 4  # 2 workers x 2 listeners
        assert metric(metrics, "icpgate_registry_filings") > 40
        ready = observed.json("/readyz")
        assert ready["checks"]["listeners"] == {"ok": True, "bound": 4, "expected": 4}
        wait_until(lambda: observed.json("/api/v1/violations?domain=example-unfiled-many.cn")["total"] == 40)
    finally:
        assert observed.gate.stop() == 0


def test_records_expire_after_the_retention_and_take_the_client_with_them(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, tables={"violations": {"retention": 2}})
    try:
        http_get(observed.http, "brief.example-unfiled.cn")
        wait_until(lambda: observed.json("/api/v1/violations")["total"] == 1)
        assert observed.json("/api/v1/violations")["items"][0]["client"] == "127.0.0.1"
        wait_until(lambda: observed.json("/api/v1/violations")["total"] == 0, timeout=10)
        with sqlite3.connect(tmp_path / "registry.violations.db") as db:
            assert db.execute("SELECT count(*) FROM violations WHERE client IS NOT NULL").fetchone() == (0,)
    finally:
        assert observed.gate.stop() == 0


def test_a_locked_log_drops_counted_records_and_the_gate_does_not_wait(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls)
    try:
        http_get(observed.http, "first.example-unfiled.cn")
        wait_until(lambda: observed.json("/api/v1/violations")["total"] == 1)
        locker = sqlite3.connect(tmp_path / "registry.violations.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another writer holds the log longer than the busy timeout
        try:
            started = time.monotonic()
            for number in range(20):
                assert status_of(http_get(observed.http, "locked%d.example-unfiled.cn" % number)) == 403
                assert status_of(http_get(observed.http, "example-filed.cn")) == 200
            assert time.monotonic() - started < 5  # served while the writer waits on the lock
            wait_until(lambda: metric(observed.metrics(), "icpgate_violation_blocks_dropped_total",
                                      why="write_failed") == 20, timeout=20, step=0.5)  # fmt: skip
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        http_get(observed.http, "after.example-unfiled.cn")
        wait_until(lambda: observed.json("/api/v1/violations?domain=example-unfiled.cn")["total"] == 2)
        assert "cannot write 20 records" in observed.gate.log()
    finally:
        assert observed.gate.stop() == 0
