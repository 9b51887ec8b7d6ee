"""Site inspection (docs/inspection.md) against a real dnsmasq with crafted records, on a real
registry through the real `icpgate inspect`, and in a real daemon that relays and blocks real
traffic: every class, the grace period, resuming, the rate limit, and the reports in the CLI, the
admin API, the status page and the metrics."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from adminkit import metric, start_observed_gate
from dnskit import Dnsmasq, SilentResolver, start_dnsmasq
from test_gate_process import http_get, status_of, wait_until

from conftest import REPO, run_icpgate, write_ndjson

OURS = "IDC-EXAMPLE"
OUTSIDE = "198.51.100.%d"
# name: (address, or ("cname", target)); names not listed under .cn and .net answer NXDOMAIN
RECORDS: dict[str, str | tuple[str, str]] = {
    "example-hosted.cn": "127.0.0.10",
    "example-www.cn": OUTSIDE % 5,
    "www.example-www.cn": "127.0.0.11",  # the bare name resolves elsewhere, its www. here: hosted
    "example-chain-in.cn": ("cname", "lb.idc-front.net"),
    "lb.idc-front.net": "127.0.0.12",
    "example-chain-out.cn": ("cname", "edge.other-host.net"),
    "edge.other-host.net": OUTSIDE % 20,
    "example-cdn.cn": ("cname", "example-cdn.cn.w.cdn-suffix.net"),
    "example-cdn.cn.w.cdn-suffix.net": OUTSIDE % 30,
    "example-fronted.cn": OUTSIDE % 40,
    "www.example-fronted.cn": OUTSIDE % 40,
    "example-moved.cn": OUTSIDE % 50,
    "www.example-moved.cn": OUTSIDE % 50,
    "example-multi-a.cn": OUTSIDE % 51,
    "example-multi-b.cn": "127.0.0.13",
    "example-v6.cn": "2001:db8::7",
    "shop.example-elsewhere-here.cn": "127.0.0.1",
    "shop.example-stranger.cn": OUTSIDE % 60,
    "example-theirs.cn": "127.0.0.14",
}
SLOW = "example-slow.cn"  # forwarded by dnsmasq to a server that never answers
CDN_SUFFIX = "w.cdn-suffix.net"


def filing(number: int, domains: list[str], access: list[tuple[str, str]], status: str = "approved") -> dict:
    return {
        "licence": "京ICP备2025%04d号-1" % number, "subject_licence": "京ICP备2025%04d号" % number,
        "subject_name": "巡查测试%d" % number, "subject_type": "enterprise", "site_name": "站点%d" % number,
        "status": status, "domains": domains, "updated_at": "2026-11-01T08:00:00Z",
        "access": [{"provider": provider, "status": state, "ips": []} for provider, state in access],
    }  # fmt: skip


FILINGS = [
    filing(1, ["example-hosted.cn"], [(OURS, "first_review")]),
    filing(2, ["example-www.cn"], [(OURS, "active")]),
    filing(3, ["example-chain-in.cn"], [(OURS, "active")]),
    filing(4, ["example-chain-out.cn"], [(OURS, "active")]),
    filing(5, ["example-cdn.cn"], [(OURS, "active")]),
    filing(6, ["example-fronted.cn"], [(OURS, "active")]),
    filing(7, ["example-moved.cn"], [(OURS, "active")]),
    filing(8, ["example-gone.cn"], [(OURS, "active")]),
    filing(9, ["example-multi-a.cn", "example-multi-b.cn"], [(OURS, "active")]),
    filing(10, ["example-v6.cn"], [(OURS, "active"), ("IDC-OTHER", "active")]),
    filing(11, [SLOW], [(OURS, "active")]),
    # not inspected: another provider's, our access cancelled, deregistered
    filing(20, ["example-theirs.cn"], [("IDC-OTHER", "active")]),
    filing(21, ["example-cancelled.cn"], [(OURS, "cancelled")]),
    filing(22, ["example-dereg.cn"], [(OURS, "active")], status="deregistered"),
    # filed elsewhere: the gate blocks them here
    filing(30, ["example-elsewhere-here.cn"], [("IDC-OTHER", "active")]),
    filing(31, ["example-stranger.cn"], [("IDC-OTHER", "active")]),
]
CLASSES = {
    "example-hosted.cn": "hosted", "example-www.cn": "hosted", "example-chain-in.cn": "hosted",
    "example-chain-out.cn": "elsewhere", "example-cdn.cn": "indirect", "example-fronted.cn": "elsewhere",
    "example-moved.cn": "elsewhere", "example-gone.cn": "unresolved", "example-multi-a.cn": "elsewhere",
    "example-multi-b.cn": "hosted", "example-v6.cn": "elsewhere", SLOW: "error",
}  # fmt: skip
NOT_OURS = ("example-theirs.cn", "example-cancelled.cn", "example-dereg.cn", "example-elsewhere-here.cn")


def licence(number: int) -> str:
    return "京ICP备2025%04d号-1" % number


def start_dns(tmp: Path, silent: SilentResolver, records: dict = RECORDS) -> Dnsmasq:
    hosts = {name: value for name, value in records.items() if isinstance(value, str)}
    cnames = {name: value[1] for name, value in records.items() if isinstance(value, tuple)}
    return start_dnsmasq(tmp, hosts=hosts, cnames=cnames, extra=(
        "--local=/cn/", "--local=/net/", "--server=/%s/127.0.0.1#%d" % (SLOW, silent.port)))  # fmt: skip


@pytest.fixture
def silent():
    server = SilentResolver()
    yield server
    server.close()


@pytest.fixture
def dns(tmp_path: Path, silent: SilentResolver):
    folder = tmp_path / "dns"
    folder.mkdir()
    server = start_dns(folder, silent)
    yield server
    server.stop()


def write_config(tmp: Path, dns: Dnsmasq, filings: list[dict] = FILINGS, **inspect: object) -> Path:
    settings = {"resolvers": ["127.0.0.1:%d" % dns.port], "cdn_suffixes": [CDN_SUFFIX], "rate": 1000,
                "timeout": 1.5, "retries": 1} | inspect  # fmt: skip
    lines = ["[provider]", 'id = "%s"' % OURS, "[registry]", 'path = "%s"' % (tmp / "registry.db"),
             "[dns]", 'hosted_ranges = ["127.0.0.0/24"]', "[admin]", "enabled = false", "[inspect]"]  # fmt: skip
    lines += ["%s = %s" % (key, json.dumps(value)) for key, value in settings.items()]
    config = tmp / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    imported = run_icpgate("import", str(write_ndjson(tmp / "filings.ndjson", filings)), "-c", str(config))
    assert imported.returncode == 0, imported.stderr
    return config


def inspect(config: Path, *args: str, code: int = 0) -> str:
    result = run_icpgate("inspect", "-c", str(config), *args)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def inspect_json(config: Path, *args: str) -> dict:
    return json.loads(inspect(config, "--json", *args))


def domains_of(document: dict) -> dict[str, dict]:
    return {domain["domain"]: domain for item in document["filings"]["items"] for domain in item["domains"]}


def states_of(document: dict) -> dict[str, str]:
    return {item["licence"]: item["state"] for item in document["filings"]["items"]}


def query_log(dns: Dnsmasq) -> list[tuple[str, str]]:
    """(time to the second, name) of every query dnsmasq received."""
    found = re.findall(r"^(\w+ +\d+ [\d:]+) dnsmasq\[\d+\]: query\[\w+\] (\S+) from", dns.log_path.read_text(), re.M)
    return found


def test_every_class_and_state_is_assigned_as_specified(tmp_path: Path, dns: Dnsmasq) -> None:
    config = write_config(tmp_path, dns, grace_period=0)
    document = inspect_json(config, *("--state=%s" % state for state in ("live", "grace", "unknown", "hollow")))
    domains = domains_of(document)
    assert {name: domain["class"] for name, domain in domains.items()} == CLASSES
    assert "www.example-www.cn" in domains["example-www.cn"]["detail"]
    assert domains["example-chain-out.cn"]["addresses"] == [OUTSIDE % 20]
    assert CDN_SUFFIX in domains["example-cdn.cn"]["detail"]
    assert domains["example-gone.cn"]["detail"].endswith("NXDOMAIN")
    assert "timeout" in domains[SLOW]["detail"] and "2 tries" in domains[SLOW]["detail"]
    states = states_of(document)
    assert states == {
        licence(1): "live", licence(2): "live", licence(3): "live", licence(4): "hollow", licence(5): "live",
        licence(6): "hollow", licence(7): "hollow", licence(8): "hollow", licence(9): "live", licence(10): "hollow",
        licence(11): "unknown",
    }  # fmt: skip
    summary = document["summary"]
    assert summary["filings"] == {"live": 5, "grace": 0, "unknown": 1, "hollow": 5}
    assert summary["domains"] == dict(Counter(CLASSES.values())) | {"indirect": 1}
    assert summary["hollow_share"] == pytest.approx(5 / 11)
    # Only the filings with our access were asked about, `www.` only for bare registrable names, and
    # the slow name once per type and try (retries = 1); what dnsmasq received is what the pass counted.
    asked = Counter(name for _, name in query_log(dns))
    assert not [name for name in asked if any(name.endswith(other) for other in NOT_OURS)]
    assert asked[SLOW] == 4 and asked["www." + SLOW] == 4 and asked["www.example-multi-b.cn"] == 2
    assert "www.lb.idc-front.net" not in asked
    assert summary["last_pass"]["queries"] == sum(asked.values())
    # The default listing leaves the live filings out; the CSV holds the same rows, with a BOM.
    default = inspect_json(config, "--report")
    assert set(states_of(default).values()) == {"hollow", "unknown"}
    text = inspect(config, "--report", "--csv")
    assert text.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    assert {(row[0], row[5], row[7], row[9]) for row in rows[1:]} == {
        (item["licence"], item["state"], domain["domain"], domain["class"])
        for item in default["filings"]["items"] for domain in item["domains"]}  # fmt: skip
    table = inspect(config, "--report")
    assert licence(7) in table and "never on DNS alone" in table


def test_the_grace_period_holds_back_a_fresh_move_and_history_is_kept(tmp_path: Path, silent) -> None:
    records = dict(RECORDS) | {"example-moved.cn": "127.0.0.30", "www.example-moved.cn": "127.0.0.30"}
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    first = start_dns(tmp_path / "before", silent, records)
    try:
        config = write_config(tmp_path, first, grace_period=3600)
        before = inspect_json(config, "--state=live", "--state=grace")
        assert states_of(before)[licence(7)] == "live"
    finally:
        first.stop()
    moved = start_dns(tmp_path / "after", silent)  # the site has left: it resolves elsewhere now
    try:
        write_config(tmp_path, moved, grace_period=3600)
        hosted_at = domains_of(before)["example-moved.cn"]["checked_at"]
        after = inspect_json(config)
        assert states_of(after)[licence(7)] == "grace"  # a move of seconds ago: not yet hollow
        assert next(item for item in after["filings"]["items"] if item["licence"] == licence(7))["since"] == hosted_at
        domain = domains_of(after)["example-moved.cn"]
        assert domain["class"] == "elsewhere" and domain["last_live"] == hosted_at
        time.sleep(1.1)
        later = inspect_json(config, "--set", "inspect.grace_period=1")  # past the grace period, still elsewhere
        item = next(item for item in later["filings"]["items"] if item["licence"] == licence(7))
        assert item["state"] == "hollow" and item["since"] == hosted_at  # "hollow since" the last hosted sight
        assert domains_of(later)["example-moved.cn"]["class_since"] == domain["checked_at"]
        # never hosted: hollow since it was first inspected, past the grace period too
        gone = next(item for item in later["filings"]["items"] if item["licence"] == licence(8))
        assert gone["state"] == "hollow" and gone["since"] == domains_of(before)["example-gone.cn"]["checked_at"]
    finally:
        moved.stop()


def test_a_pass_resumes_where_it_stopped_and_forgets_filings_no_longer_ours(tmp_path: Path, dns: Dnsmasq) -> None:
    bulk = [filing(100 + number, ["bulk-%03d.cn" % number], [(OURS, "active")]) for number in range(120)]
    config = write_config(tmp_path, dns, bulk, max_run_time=0.01)
    sessions = []
    for _ in range(3):  # each a process of its own: a stopped daemon is no different
        sessions.append(inspect_json(config, "--state=hollow", "--state=grace")["summary"]["last_pass"])
    assert [(run["id"], run["state"], run["filings"]) for run in sessions] == [
        (1, "paused", 50), (1, "paused", 100), (1, "done", 120)]  # fmt: skip
    asked = Counter(name for _, name in query_log(dns))
    assert len(asked) == 240 and set(asked.values()) == {2}  # every name once: A and AAAA, never again
    # Our access to half of them is cancelled; the next complete pass forgets them.
    write_config(tmp_path, dns, [filing(100 + n, ["bulk-%03d.cn" % n], [(OURS, "cancelled" if n % 2 else "active")])
                                 for n in range(120)], max_run_time=3600)  # fmt: skip
    document = inspect_json(config, "--state=grace")
    assert document["summary"]["last_pass"] == document["summary"]["last_pass"] | {"id": 2, "state": "done",
                                                                                   "filings": 60}  # fmt: skip
    assert document["summary"]["filings_total"] == 60 and document["filings"]["total"] == 60


def test_queries_keep_to_the_rate(tmp_path: Path, dns: Dnsmasq) -> None:
    bulk = [filing(200 + number, ["rate-%03d.cn" % number], [(OURS, "active")]) for number in range(30)]
    config = write_config(tmp_path, dns, bulk, rate=20, concurrency=16)
    dry = json.loads(inspect(config, "--dry-run", "--json"))
    assert dry == dry | {"filings": 30, "names": 60, "queries": 120, "seconds": 6.0}
    started = time.monotonic()
    document = inspect_json(config)
    elapsed = time.monotonic() - started
    log = query_log(dns)
    assert len(log) == document["summary"]["last_pass"]["queries"] == 120
    assert elapsed >= (120 - 20) / 20 * 0.95  # a second's burst, then 20 a second
    per_second = Counter(moment for moment, _ in log)
    assert max(per_second.values()) <= 2 * 20  # a burst and a second's worth, at most, within a clock second
    assert "6 s" in inspect(config, "--dry-run")


def test_inspect_refuses_without_hosted_ranges_and_while_another_runs(tmp_path: Path, dns: Dnsmasq) -> None:
    config = write_config(tmp_path, dns)
    result = run_icpgate("inspect", "-c", str(config), "--set", "dns.hosted_ranges=[]")
    assert result.returncode == 3 and "dns.hosted_ranges" in result.stderr
    refused = run_icpgate("config", "check", "-c", str(config), "--set", "dns.hosted_ranges=[]", "--set",
                          "inspect.enabled=true")  # fmt: skip
    assert refused.returncode == 3 and "inspect.enabled" in refused.stderr and "config.toml" in refused.stderr
    bad = run_icpgate("inspect", "-c", str(config), "--set", 'inspect.cdn_suffixes=["not a suffix"]')
    assert bad.returncode == 3 and "inspect.cdn_suffixes" in bad.stderr
    import fcntl

    with open(str(tmp_path / "registry.inspection.db") + ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = run_icpgate("inspect", "-c", str(config))
    assert busy.returncode == 9 and "another inspection" in busy.stderr


def test_the_daemon_inspects_on_schedule_and_every_report_agrees(tmp_path: Path, dns: Dnsmasq, origin) -> None:
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    write_config(gate_dir, dns)  # the registry, with our filings only
    (gate_dir / "config.toml").unlink()
    resolver = ["127.0.0.1:%d" % dns.port]
    tables = {
        "dns": {"enabled": True, "resolvers": resolver, "hosted_ranges": ["127.0.0.0/24"], "min_ttl": 1},
        "inspect": {"enabled": False, "resolvers": resolver, "cdn_suffixes": [CDN_SUFFIX], "timeout": 1.5,
                    "retries": 1, "grace_period": 0, "interval": 3600},
    }  # fmt: skip
    observed = start_observed_gate(gate_dir, origin.http, origin.tls, tables=tables)
    try:
        config = observed.config
        customers = gate_dir / "customers.csv"
        customers.write_text("network,name,contract\n127.0.0.0/24,客户甲,HT-001\n", encoding="utf-8")
        assert run_icpgate("customers", "import", str(customers), "-c", str(config)).returncode == 0
        # Real traffic: a filed site fronted elsewhere, relayed here; two sites filed with another provider.
        for _ in range(3):
            assert status_of(http_get(observed.http, "example-fronted.cn")) == 200
        assert status_of(http_get(observed.http, "shop.example-elsewhere-here.cn")) == 403
        assert status_of(http_get(observed.http, "shop.example-stranger.cn")) == 403
        wait_until(lambda: observed.json("/api/v1/violations?dns=unchecked")["total"] == 0
                   and observed.json("/api/v1/violations")["total"] == 2, timeout=20)  # fmt: skip
        assert observed.json("/api/v1/inspection")["summary"]["last_pass"] is None
        # Turn inspection on: a reload restarts the services with it, and the first pass runs at once.
        text = config.read_text().replace("[inspect]\nenabled = false", "[inspect]\nenabled = true")
        config.write_text(text)
        observed.gate.signal(1)  # SIGHUP
        wait_until(lambda: (observed.json("/api/v1/inspection")["summary"]["last_pass"] or {}).get("state") == "done",
                   timeout=30, step=0.2)  # fmt: skip
        api = observed.json("/api/v1/inspection?state=live&state=grace&state=unknown&state=hollow")
        classes = {name: domain["class"] for name, domain in domains_of(api).items()}
        assert classes == CLASSES | {"example-fronted.cn": "indirect"}  # the gate's sign: relayed on our address
        assert "relayed" in domains_of(api)["example-fronted.cn"]["detail"]
        # 新增接入: the blocked host DNS confirms here, under its customer; the stranger's is not here.
        (group,) = api["new_access"]["customers"]
        assert group["customer"] == {"name": "客户甲", "contract": "HT-001"}
        assert [(host["host"], host["licence"]) for host in group["hosts"]] == [
            ("shop.example-elsewhere-here.cn", licence(30))]  # fmt: skip
        # The CLI, the API, the metrics and the status page say the same.
        cli = inspect_json(config, "--report")
        assert cli["summary"] == api["summary"]
        assert cli["filings"]["items"] == observed.json("/api/v1/inspection")["filings"]["items"]
        assert inspect_json(config, "--new-access") == api["new_access"]
        new_access_csv = inspect(config, "--new-access", "--csv")
        assert new_access_csv.startswith("\ufeff") and "shop.example-elsewhere-here.cn" in new_access_csv
        metrics = observed.metrics()
        for state, count in api["summary"]["filings"].items():
            assert metric(metrics, "icpgate_inspection_filings", state=state) == count
        for klass, count in api["summary"]["domains"].items():
            assert metric(metrics, "icpgate_inspection_domains", **{"class": klass}) == count
        assert metric(metrics, "icpgate_inspection_hollow_share") == pytest.approx(api["summary"]["hollow_share"])
        assert metric(metrics, "icpgate_inspection_hollow_alert_share") == 0.2
        assert metric(metrics, "icpgate_inspection_last_complete_timestamp_seconds") > time.time() - 60
        _, _, page = observed.get("/")
        html = page.decode()
        assert "%.1f%%" % (100 * api["summary"]["hollow_share"]) in html
        for item in observed.json("/api/v1/inspection?state=hollow&limit=20")["filings"]["items"]:
            assert item["licence"] in html
        assert "shop.example-elsewhere-here.cn" in html and "客户甲" in html
        asked = len(query_log(dns))
    finally:
        observed.gate.stop()
    # A restart keeps the history and does not inspect again before the interval has passed.
    tables["inspect"]["enabled"] = True
    again = start_observed_gate(gate_dir, origin.http, origin.tls, tables=tables)
    try:
        assert again.json("/api/v1/inspection")["summary"] == api["summary"]
        time.sleep(1.0)
        assert len(query_log(dns)) == asked
    finally:
        again.gate.stop()


def test_the_example_config_documents_every_inspect_key() -> None:
    from icpgate.config.settings import CONFIG_SPEC

    text = (REPO / "config.example.toml").read_text()
    section = text.split("\n[inspect]\n", 1)[1].split("\n[", 1)[0]
    assert {line.split(" =")[0].lstrip("# ") for line in section.splitlines()
            if " = " in line and not line.startswith("# ")} == set(CONFIG_SPEC["inspect"])  # fmt: skip


def test_the_gate_records_a_relayed_name_per_decision_not_per_request_within_its_bound() -> None:
    from icpgate.config.settings import load_config
    from icpgate.gate.connection import Runtime
    from icpgate.policy.decide import Policy
    from icpgate.process.worker import build_runtime_parts
    from icpgate.registry.index import IndexBuilder

    config = load_config(REPO / "config.example.toml")
    parts, pages, tls_pages = build_runtime_parts(config)
    builder = IndexBuilder()
    for number, name in enumerate(("example-a.cn", "example-b.cn", "example-c.cn")):
        builder.add(number, name, licence(number), "approved", 0, "%s\tactive\t" % OURS)
    runtime = Runtime(Policy(parts.pack, OURS, builder.build(), "enforce"), pages, config.gate, tls_pages)
    runtime.relayed.max_keys = 2
    destination = ("192.0.2.1", 443)
    for _ in range(50):
        runtime.decide("www.example-a.cn", destination, "tls", None)
        runtime.decide("unfiled-site.cn", destination, "tls", None)  # blocked: not a relay
    ((key, (first, last)),) = runtime.relayed.records.items()
    assert key == ("www.example-a.cn", "192.0.2.1") and first == last  # once, at the decision
    runtime.forget_decisions()  # as the worker does at each flush
    runtime.decide("www.example-a.cn", destination, "tls", None)
    assert runtime.relayed.records[key][1] > first
    runtime.decide("example-b.cn", destination, "http", None)
    runtime.decide("example-c.cn", destination, "http", None)  # past max_keys: dropped and counted
    assert len(runtime.relayed) == 2 and runtime.relayed.dropped == 1
    assert set(runtime.relayed.take()) == {key, ("example-b.cn", "192.0.2.1")} and len(runtime.relayed) == 0
