"""Monitor mode for a rollout (docs/policy.md, "Monitor mode and pilots"), through real gates.

`gate.enforcement = "monitor"` and the pack's `enforce.monitor_ranges` (a pilot): a block the policy
makes about a host is decided, counted, logged and recorded as when enforcing, then let through to
the real backend; malformed traffic is still refused. Every surface says which mode applied: the
block log, /metrics, /readyz, the status page and `icpgate check`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adminkit import admin_request, metric, parse_metrics
from gatekit import Gate, free_port, gate_config, listener, send_in_pieces
from test_gate_auto import BANNER, SERVER_FIRST_WAIT, SSH_BANNER, BannerServer
from test_gate_process import edit_pack, http_get, status_of, wait_until
from test_gate_tls import wait_for_record

from conftest import copy_policies
from icpgate.config.settings import load_config
from icpgate.policy.decide import Action, Mode, Policy, Reason
from icpgate.policy.pack import load_pack
from icpgate.registry.index_store import open_index

UNFILED = "example-unfiled.cn"  # no filing in the samples; on the test certificate


def icpgate(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icpgate", *args, "-c", str(config)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def start(config: Path, sockets: list[tuple[str, int]], admin: int) -> Gate:
    """`icpgate run` with listeners on other loopback addresses than 127.0.0.1; ready when /readyz says so."""
    log_path = config.with_suffix(".log")
    process = subprocess.Popen([sys.executable, "-m", "icpgate", "run", "-c", str(config)],
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    gate = Gate(config, {}, process, log_path)
    deadline = time.monotonic() + 30
    while True:
        try:
            if admin_request(admin, "/readyz")[0] == 200 and all(_listening(*s) for s in sockets):
                return gate
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            gate.stop()
            raise RuntimeError("gate did not get ready:\n" + gate.log())
        time.sleep(0.1)


def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def observed_tables(admin: int) -> dict[str, dict]:
    return {
        "admin": {"enabled": True, "port": admin},
        "violations": {"flush_interval": 0.2, "sample_client": True},
        "log": {"format": "json"},
        "dns": {"enabled": False},
    }


def tls_get(port: int, host: str, ca: Path, address: str = "127.0.0.1") -> bytes:
    """A real TLS client (verifying against the test CA) and one HTTP request; raises when refused."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((address, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def http_request(port: int, raw: bytes, address: str = "127.0.0.1") -> bytes:
    with socket.create_connection((address, port), timeout=10) as sock:
        sock.sendall(raw)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def log_lines(gate: Gate) -> list[dict]:
    return [json.loads(line) for line in gate.log().splitlines() if line.startswith("{")]


def violations(admin: int) -> dict[tuple[str, str, str], dict]:
    """The violation log through the admin API, by (host, protocol, reason)."""
    status, _, body = admin_request(admin, "/api/v1/violations?limit=1000")
    assert status == 200, body
    return {(item["host"], item["proto"], item["reason"]): item for item in json.loads(body)["items"]}


def test_monitor_mode_passes_unfiled_sites_records_them_and_says_so_everywhere(tmp_path: Path, origin, certs) -> None:
    http, tls, admin = free_port(), free_port(), free_port()
    listeners = {"http": listener(http, "http", origin.http), "tls": listener(tls, "tls", origin.tls)}
    config = gate_config(tmp_path, listeners, gate={"enforcement": "monitor"}, tables=observed_tables(admin))
    gate = start(config, [("127.0.0.1", http), ("127.0.0.1", tls)], admin)
    try:
        # Unfiled HTTP and TLS reach the real backend; so do a missing Host and an IP literal Host.
        answer = http_get(http, UNFILED)
        assert status_of(answer) == 200 and UNFILED.encode() in answer, answer[:300]
        answer = tls_get(tls, UNFILED, certs["ca"])
        assert status_of(answer) == 200 and UNFILED.encode() in answer, answer[:300]
        assert status_of(http_request(http, b"GET / HTTP/1.0\r\n\r\n")) == 200  # no_host
        assert status_of(http_get(http, "example-filed.cn")) == 200
        # Malformed traffic is refused in monitor mode too: the gate cannot follow what it cannot parse.
        assert status_of(http_get(http, "bad_host!")) == 400
        smuggle = (
            b"GET / HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" % UNFILED.encode()
        )
        assert status_of(http_request(http, smuggle)) == 400

        # The violation log: the passes are violations, not blocked; the junk is blocked.
        expected = {(UNFILED, "http", "unfiled"), (UNFILED, "tls", "unfiled"), ("(junk)", "http", "no_host"),
                    ("(junk)", "http", "invalid")}  # fmt: skip
        wait_until(lambda: set(violations(admin)) == expected, timeout=10, step=0.2)
        records = violations(admin)
        for key in expected - {("(junk)", "http", "invalid")}:
            assert (records[key]["blocked"], records[key]["passed"], records[key]["count"]) == (False, 1, 1), key
        invalid = records[("(junk)", "http", "invalid")]
        assert invalid["blocked"] and invalid["passed"] == 0 and invalid["count"] == 2
        table = icpgate(config, "violations", "--reason", "unfiled").stdout
        assert table.count("1 (1 passed)  %s" % UNFILED) == 2, table

        # The log line for each decision says what the gate did and in which mode.
        lines = log_lines(gate)
        passed = [line for line in lines if line.get("event") == "passed"]
        assert {(line["proto"], line["host"], line["mode"]) for line in passed if line["host"]} == {
            ("http", UNFILED, "monitor"), ("tls", UNFILED, "monitor")}  # fmt: skip
        assert all(line["rule"] == "registry.no_filing" for line in passed if line["host"] == UNFILED)
        assert any("passed (monitor mode) http" in line["message"] for line in passed)
        refused = [line for line in lines if line.get("event") == "blocked"]
        assert refused and all(line["reason"] == "invalid" and line["mode"] == "enforce" for line in refused)
        assert any("gate.enforcement = monitor" in line["message"] for line in lines)

        # Metrics: decisions as the gate acted (allow), the monitored passes by mode and reason, the mode.
        def scraped() -> dict:
            return parse_metrics(admin_request(admin, "/metrics")[2].decode())

        wait_until(lambda: metric(scraped(), "icpgate_relaxed_decisions_total", mode="monitor") >= 3, timeout=10)
        metrics = scraped()
        assert metric(metrics, "icpgate_relaxed_decisions_total", mode="monitor", reason="unfiled") == 2
        assert metric(metrics, "icpgate_relaxed_decisions_total", mode="monitor", reason="no_host") == 1
        assert metric(metrics, "icpgate_decisions_total", action="allow", reason="unfiled") == 2
        assert metric(metrics, "icpgate_decisions_total", action="block", reason="unfiled") == 0
        assert metric(metrics, "icpgate_decisions_total", action="block", reason="invalid") >= 2
        assert metric(metrics, "icpgate_enforcement_mode", mode="monitor") == 1
        assert metric(metrics, "icpgate_enforcement_mode", mode="enforce") == 0

        # /readyz: ready, and in monitor mode; the status page says so.
        status, _, body = admin_request(admin, "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["ready"] and ready["mode"] == "monitor"
        assert ready["checks"]["enforcement"] == {"ok": True, "mode": "monitor", "rule": "gate.enforcement",
                                                  "monitor_ranges": []}  # fmt: skip
        page = admin_request(admin, "/")[2].decode()
        assert '<span class="mode monitor">monitor</span>' in page and "gate.enforcement" in page

        # icpgate check and the admin API's decision: what the policy decided, and what the gate does.
        result = icpgate(config, "check", UNFILED, "--json")
        facts = json.loads(result.stdout)
        assert result.returncode == 0, result.stderr
        assert (facts["action"], facts["policy_action"], facts["reason"], facts["mode"], facts["mode_rule"],
                facts["passed"]) == ("allow", "block", "unfiled", "monitor", "gate.enforcement", True)  # fmt: skip
        api = json.loads(admin_request(admin, "/api/v1/decision?host=%s" % UNFILED)[2])
        assert api == facts
        text = icpgate(config, "check", UNFILED)
        assert text.returncode == 0 and "would BLOCK (unfiled) — monitor mode: passed" in text.stdout, text.stdout
        assert "monitor (gate.enforcement)" in text.stdout
        bad = icpgate(config, "check", "bad_host!")
        assert bad.returncode == 1 and "BLOCK (invalid) — refused in monitor mode too" in bad.stdout, bad.stdout
        filed = json.loads(icpgate(config, "check", "example-filed.cn", "--json").stdout)
        assert (filed["action"], filed["policy_action"], filed["passed"]) == ("allow", "allow", False)

        # The rollout's last step: gate.enforcement = "enforce" and a reload; the same site is blocked.
        config.write_text(config.read_text().replace('enforcement = "monitor"', 'enforcement = "enforce"'))
        gate.signal(signal.SIGHUP)
        wait_until(lambda: status_of(http_get(http, UNFILED)) == 403, timeout=20, step=0.2)
        wait_until(lambda: json.loads(admin_request(admin, "/readyz")[2]).get("mode") == "enforce", timeout=20)
        assert json.loads(icpgate(config, "check", UNFILED, "--json").stdout)["action"] == "block"
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def test_a_pilot_range_is_monitored_and_the_rest_enforced(tmp_path: Path, origin, certs) -> None:
    """Two hosted addresses, 127.0.0.2 in the pilot and 127.0.0.3 not: one gate, one pack."""
    policies = copy_policies(tmp_path)
    pack = edit_pack(policies, "monitor_ranges = []", 'monitor_ranges = ["127.0.0.2/32"]')
    ports = {name: free_port() for name in ("pilot_http", "pilot_tls", "other_http", "other_tls", "admin")}
    listeners = {
        "pilot_http": listener(ports["pilot_http"], "http", origin.http, address="127.0.0.2"),
        "pilot_tls": listener(ports["pilot_tls"], "tls", origin.tls, address="127.0.0.2"),
        "other_http": listener(ports["other_http"], "http", origin.http, address="127.0.0.3"),
        "other_tls": listener(ports["other_tls"], "tls", origin.tls, address="127.0.0.3"),
    }
    config = gate_config(tmp_path, listeners, pack=pack, tables=observed_tables(ports["admin"]))
    sockets = [(table["address"], table["port"]) for table in listeners.values()]
    gate = start(config, sockets, ports["admin"])
    try:
        pilot, other = "127.0.0.2", "127.0.0.3"
        answer = http_request(ports["pilot_http"], b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                              % UNFILED.encode(), pilot)  # fmt: skip
        assert status_of(answer) == 200 and UNFILED.encode() in answer
        assert status_of(tls_get(ports["pilot_tls"], UNFILED, certs["ca"], pilot)) == 200
        answer = http_request(ports["other_http"], b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                              % UNFILED.encode(), other)  # fmt: skip
        assert status_of(answer) == 403 and b"unfiled" in answer
        try:
            tls_get(ports["other_tls"], UNFILED, certs["ca"], other)
            raise AssertionError("an unfiled TLS site outside the pilot was let through")
        except (ssl.SSLError, ConnectionResetError):
            pass  # reset: the default tls_action
        assert status_of(http_request(ports["pilot_http"], b"GET / HTTP/1.1\r\nHost: bad_host!\r\n\r\n", pilot)) == 400

        def unfiled_records() -> list[dict]:
            body = admin_request(ports["admin"], "/api/v1/violations?domain=%s" % UNFILED)[2]
            return json.loads(body)["items"]

        wait_until(lambda: len(unfiled_records()) == 4, timeout=10, step=0.2)
        records = unfiled_records()
        by_ip = {}
        for item in records:
            by_ip.setdefault(item["ip"], []).append((item["proto"], item["blocked"], item["passed"]))
        assert sorted(by_ip[pilot]) == [("http", False, 1), ("tls", False, 1)]
        assert sorted(by_ip[other]) == [("http", True, 0), ("tls", True, 0)]
        passed = [line for line in log_lines(gate) if line.get("event") == "passed"]
        assert {(line["destination"].split(":")[0], line["mode"]) for line in passed} == {(pilot, "monitor")}

        # The daemon as a whole enforces; the pilot shows on /readyz, the status page, and per destination in check.
        metrics = parse_metrics(admin_request(ports["admin"], "/metrics")[2].decode())
        assert metric(metrics, "icpgate_enforcement_mode", mode="enforce") == 1
        ready = json.loads(admin_request(ports["admin"], "/readyz")[2])
        assert ready["mode"] == "enforce" and ready["checks"]["enforcement"]["monitor_ranges"] == ["127.0.0.2/32"]
        assert "127.0.0.2/32" in admin_request(ports["admin"], "/")[2].decode()
        inside = json.loads(icpgate(config, "check", UNFILED, "--ip", pilot, "--json").stdout)
        outside = icpgate(config, "check", UNFILED, "--ip", other, "--json")
        assert (inside["action"], inside["mode"], inside["mode_rule"]) == ("allow", "monitor", "enforce.monitor_ranges")
        refused = json.loads(outside.stdout)
        assert outside.returncode == 1 and (refused["action"], refused["mode"], refused["passed"]) == (
            "block", "enforce", False)  # fmt: skip
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def test_monitor_mode_on_an_auto_port_lets_other_protocols_and_server_first_through(tmp_path: Path, origin) -> None:
    """`policy.other_protocols = "block"` is a host rule like no_host: monitor mode passes it too,
    and so a server-first protocol gets its banner, recorded as a passed violation."""
    banner = BannerServer()
    ports = {name: free_port() for name in ("record", "banner", "admin")}
    listeners = {"record": listener(ports["record"], "auto", origin.record_port),
                 "banner": listener(ports["banner"], "auto", banner.port)}  # fmt: skip
    config = gate_config(tmp_path, listeners, gate={"enforcement": "monitor", "server_first_wait": SERVER_FIRST_WAIT},
                         tables=observed_tables(ports["admin"]))  # fmt: skip
    config.write_text(config.read_text().replace("[policy]\n", '[policy]\nother_protocols = "block"\n'))
    gate = start(config, [("127.0.0.1", ports["record"]), ("127.0.0.1", ports["banner"])], ports["admin"])
    try:
        before = len(origin.recorded())
        payload = SSH_BANNER + bytes(range(256))
        sock = send_in_pieces(ports["record"], payload, [len(SSH_BANNER)], pause=0.05)
        wait_for_record(origin, before, len(payload))
        sock.close()
        assert origin.recorded()[before] == payload

        with socket.create_connection(("127.0.0.1", ports["banner"]), timeout=10) as sock:
            assert sock.recv(1024) == BANNER
            sock.sendall(b"EHLO client.example\r\n")
            assert sock.recv(1024) == b"EHLO client.example\r\n"

        def records() -> list[tuple]:
            items = json.loads(admin_request(ports["admin"], "/api/v1/violations")[2])["items"]
            return sorted(
                (item["port"], item["proto"], item["reason"], item["blocked"], item["passed"]) for item in items
            )

        expected = sorted((ports[name], "other", "no_host", False, 1) for name in ("record", "banner"))
        wait_until(lambda: records() == expected, timeout=10, step=0.2)
        passed = [line for line in log_lines(gate) if line.get("event") == "passed"]
        assert [(line["proto"], line["rule"], line["mode"]) for line in passed] == [
            ("other", "policy.other_protocols", "monitor")] * 2  # fmt: skip
    finally:
        assert gate.stop() == 0
        banner.close()
    assert "Traceback" not in gate.log(), gate.log()


# --- how the modes combine: Policy.mode_for and Policy.applied on the sample registry -----------------
PILOT = "198.51.100.0/24"


@pytest.fixture
def pilot_policy(sample_registry: Path, request: pytest.FixtureRequest):
    """Policy(enforcement) over the shared index, the default pack with a pilot range and IP literals blocked."""
    config = load_config(sample_registry)
    index = open_index(config.registry_path)
    request.addfinalizer(index.close)
    pack = load_pack(config.policy_pack).policy
    pack = dataclasses.replace(pack, monitor_ranges=(ipaddress.ip_network(PILOT),), ip_literal=Action.BLOCK)
    return lambda enforcement="enforce": Policy(pack, config.provider.id, index, enforcement)


@pytest.mark.parametrize(
    ("enforcement", "dst", "stale", "mode"),
    [
        ("enforce", "203.0.113.5", "enforce", (Mode.ENFORCE, "")),
        ("enforce", "198.51.100.9", "enforce", (Mode.MONITOR, "enforce.monitor_ranges")),
        ("enforce", "::ffff:198.51.100.9", "enforce", (Mode.MONITOR, "enforce.monitor_ranges")),
        ("enforce", "not-an-address", "enforce", (Mode.ENFORCE, "")),  # in no pilot: fail closed
        ("enforce", None, "enforce", (Mode.ENFORCE, "")),
        ("enforce", "203.0.113.5", "open", (Mode.OPEN, "feed.stale_mode")),
        ("enforce", "198.51.100.9", "open", (Mode.MONITOR, "enforce.monitor_ranges")),  # monitor first
        ("monitor", "203.0.113.5", "open", (Mode.MONITOR, "gate.enforcement")),
        ("monitor", None, "enforce", (Mode.MONITOR, "gate.enforcement")),
    ],
)
def test_the_mode_in_force_for_a_destination(pilot_policy, enforcement, dst, stale, mode) -> None:
    assert pilot_policy(enforcement).mode_for(dst, stale) == mode


@pytest.mark.parametrize(
    ("host", "dst", "stale", "expected"),
    [
        # monitor (a pilot range) passes filing reasons and the host rules, keeping reason and rule
        ("www.example-unfiled.cn", "198.51.100.9", "enforce", (Action.ALLOW, Reason.UNFILED, Mode.MONITOR)),
        ("example-pending.cn", "198.51.100.9", "enforce", (Action.ALLOW, Reason.PENDING, Mode.MONITOR)),
        (None, "198.51.100.9", "enforce", (Action.ALLOW, Reason.NO_HOST, Mode.MONITOR)),
        ("192.0.2.1", "198.51.100.9", "enforce", (Action.ALLOW, Reason.IP_LITERAL, Mode.MONITOR)),
        ("bad_host!", "198.51.100.9", "enforce", (Action.BLOCK, Reason.INVALID, Mode.ENFORCE)),
        # outside the pilot: enforced
        ("www.example-unfiled.cn", "203.0.113.5", "enforce", (Action.BLOCK, Reason.UNFILED, Mode.ENFORCE)),
        # an expired feed passes only what rests on registry data
        ("www.example-unfiled.cn", "203.0.113.5", "monitor", (Action.ALLOW, Reason.UNFILED, Mode.MONITOR)),
        ("www.example-unfiled.cn", "203.0.113.5", "open", (Action.ALLOW, Reason.UNFILED, Mode.OPEN)),
        (None, "203.0.113.5", "open", (Action.BLOCK, Reason.NO_HOST, Mode.ENFORCE)),
        ("192.0.2.1", "203.0.113.5", "monitor", (Action.BLOCK, Reason.IP_LITERAL, Mode.ENFORCE)),
        ("bad_host!", "203.0.113.5", "open", (Action.BLOCK, Reason.INVALID, Mode.ENFORCE)),
        # allowed stays allowed, in every mode
        ("example-filed.cn", "198.51.100.9", "open", (Action.ALLOW, Reason.FILED, Mode.ENFORCE)),
    ],
)
def test_what_each_mode_lets_through(pilot_policy, host, dst, stale, expected) -> None:
    policy = pilot_policy()
    decided = policy.decide(host, dst, 80, "http")
    applied = policy.applied(decided, dst, stale)
    assert (applied.action, applied.reason, applied.mode) == expected
    assert (applied.rule, applied.host) == (decided.rule, decided.host)  # the policy's decision is kept
    assert applied.passed == (decided.action is Action.BLOCK and applied.action is Action.ALLOW)
