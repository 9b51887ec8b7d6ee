"""Inline mode end to end: TPROXY, a transparent upstream, every port, on real namespaces.

A client namespace reaches a customer's server (real nginx, and a server-first banner service)
only through the gate namespace, which routes between them with the shipped nftables ruleset
(systemd/icpgate-inline.nft) and policy routing loaded, and runs `icpgate run` on the shipped
config.inline.example.toml, overriding only paths. IPv4 and IPv6 share one topology per module.
nginx logs `$remote_addr`; an nftables counter in the server namespace counts the connections
that reach it, so "the server never saw it" is measured, not assumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import netnskit
import pytest
from netnskit import CLIENT4, CLIENT6, SERVER4, SERVER6, Topology

from conftest import REPO, SAMPLES, run_icpgate

INLINE_CONFIG = REPO / "config.inline.example.toml"
FILED, UNFILED = "example-filed.cn", "example-unfiled.cn"
HTTP_PORTS, TLS_PORTS = [80, 8081], [443, 8443]
BANNER_PORT = 2222
SERVER_FIRST_WAIT = 1.0  # the example's gate.server_first_wait
FAMILIES = {4: (CLIENT4, SERVER4), 6: (CLIENT6, SERVER6)}
HOSTED_RANGES = (netnskit.HOSTED4, netnskit.HOSTED6)
# Counts the TCP connections that reach the server namespace (SYNs), whoever sent them.
SERVER_COUNTER = """
table inet seen {
    counter syns { }
    chain input {
        type filter hook input priority filter; policy accept;
        tcp flags syn / syn,ack counter name syns
    }
}
"""


@dataclass
class Inline:
    """The module's namespaces, servers and gate (started and stopped by the tests as they need)."""

    net: Topology
    tmp: Path
    nginx: netnskit.Nginx
    gate: subprocess.Popen | None = None
    gate_logs: list[Path] = field(default_factory=list)

    def overrides(self, *extra: str) -> list[str]:
        """Paths only (and what a test sets on purpose): the rest is the shipped example."""
        sets = ['registry.path="%s"' % (self.tmp / "registry.db"), 'admin.metrics_dir="%s"' % (self.tmp / "metrics"),
                *extra]  # fmt: skip
        return [arg for value in sets for arg in ("--set", value)]

    def start_gate(self, *extra: str) -> subprocess.Popen:
        """`icpgate run` on the inline example in the gate namespace; returns once it is ready."""
        assert self.gate is None or self.gate.poll() is not None, "a gate is already running"
        log_path = self.tmp / ("gate-%d.log" % len(self.gate_logs))
        self.gate_logs.append(log_path)
        with log_path.open("w") as log:
            self.gate = self.net.popen(self.net.gate, [sys.executable, "-m", "icpgate", "run", "-c", str(INLINE_CONFIG),
                                       *self.overrides(*extra)], stdout=log, stderr=log,
                                       start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 30
        # /readyz only once the supervisor has said so: before, a worker's metrics file may still be empty
        while "workers ready" not in log_path.read_text() or admin_get(self.net, "/readyz")[0] != 200:
            if self.gate.poll() is not None or time.monotonic() > deadline:
                self.stop_gate()
                raise RuntimeError("the gate did not become ready:\n" + log_path.read_text(errors="replace"))
            time.sleep(0.1)
        return self.gate

    def stop_gate(self) -> int | None:
        if self.gate is None:
            return None
        code = self.net.stop(self.gate, timeout=30)
        self.gate = None
        return code

    def kill_gate(self) -> None:
        """SIGKILL the daemon and its workers (one process group): a crash, nothing drains."""
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(self.gate.pid, signal.SIGKILL)
        self.gate.wait(10)
        self.gate = None

    def gate_log(self) -> str:
        return self.gate_logs[-1].read_text(errors="replace") if self.gate_logs else ""

    def syns(self) -> int:
        """TCP connections the server namespace has received so far."""
        listing = json.loads(
            self.net.run(self.net.server, "nft", "-j", "list", "counter", "inet", "seen", "syns").stdout
        )
        return next(item["counter"]["packets"] for item in listing["nftables"] if "counter" in item)


def admin_get(net: Topology, path: str) -> tuple[int, str]:
    """GET the admin API on 127.0.0.1:9180 inside the gate namespace: (status, body); (0, "") if down."""
    with net.socket(net.gate) as sock:
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", 9180))
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n" % path.encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            return 0, ""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace")


@pytest.fixture(scope="module")
def inline(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("inline")
    imported = run_icpgate("import", str(SAMPLES), "-c", str(INLINE_CONFIG), "--set",
                           'registry.path="%s"' % (tmp / "registry.db"))  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    with netnskit.topology() as net:
        net.load_ruleset({})  # the shipped defines are this topology's: hosted 203.0.113.0/24, 2001:db8:2::/64
        net.run(net.server, "nft", "-f", "-", input=SERVER_COUNTER)
        nginx = netnskit.start_nginx(net, tmp / "nginx", [FILED, UNFILED], HTTP_PORTS, TLS_PORTS)
        netnskit.start_banner(net, BANNER_PORT)
        state = Inline(net, tmp, nginx)
        try:
            yield state
        finally:
            state.stop_gate()
            assert "Traceback" not in "".join(p.read_text(errors="replace") for p in state.gate_logs)


@pytest.fixture
def gate(inline: Inline) -> Inline:
    """The enforcing gate of the example config, running (restarted if a test stopped it)."""
    if inline.gate is None or inline.gate.poll() is not None:
        inline.start_gate()
    return inline


# --- clients in the client namespace ----------------------------------------------------------------
def url_host(address: str) -> str:
    return "[%s]" % address if ":" in address else address


def curl_http(inline: Inline, server: str, port: int, host: str) -> tuple[str, str]:
    """curl http://SERVER:PORT/ with Host: the status line code and body (code "000" when it failed)."""
    result = inline.net.run(inline.net.client, "curl", "-sS", "-g", "--max-time", "10", "-H", "Host: " + host,
                            "-o", "-", "-w", "\n%{http_code}", "http://%s:%d/" % (url_host(server), port),
                            check=False)  # fmt: skip
    body, _, code = result.stdout.rpartition("\n")
    return code, body + result.stderr


def curl_https(inline: Inline, server: str, port: int, name: str) -> subprocess.CompletedProcess[str]:
    return inline.net.run(inline.net.client, "curl", "-sS", "-g", "--max-time", "10", "--cacert",
                          str(inline.nginx.ca_pem), "--resolve", "%s:%d:%s" % (name, port, url_host(server)),
                          "https://%s:%d/" % (name, port), check=False)  # fmt: skip


def s_client(inline: Inline, server: str, port: int, name: str) -> subprocess.CompletedProcess[str]:
    return inline.net.run(inline.net.client, "openssl", "s_client", "-connect", "%s:%d" % (url_host(server), port),
                          "-servername", name, "-brief", check=False, input="", timeout=20)  # fmt: skip


def served_by(body: str, name: str, port: int, client: str) -> bool:
    return "served host=%s server=%s port=%d remote=%s" % (name, name, port, client) in body


def log_lines_since(inline: Inline, count: int) -> list[str]:
    return inline.nginx.log_lines()[count:]


# --- the tests -----------------------------------------------------------------------------------------
def test_the_inline_example_passes_config_check() -> None:
    result = run_icpgate("config", "check", "-c", str(INLINE_CONFIG))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize("family", [4, 6])
def test_filed_sites_pass_and_the_server_sees_the_client(gate: Inline, family: int) -> None:
    client, server = FAMILIES[family]
    before = len(gate.nginx.log_lines())
    for port in HTTP_PORTS:
        code, body = curl_http(gate, server, port, FILED)
        assert code == "200" and served_by(body, FILED, port, client), (port, body, gate.gate_log()[-3000:])
    for port in TLS_PORTS:
        result = curl_https(gate, server, port, FILED)
        assert served_by(result.stdout, FILED, port, client), (port, result.stderr, gate.gate_log()[-3000:])
    logged = log_lines_since(gate, before)
    assert len(logged) == len(HTTP_PORTS) + len(TLS_PORTS)
    assert all(line.split()[0] == client and line.split()[2] == FILED for line in logged), logged


@pytest.mark.parametrize("family", [4, 6])
def test_unfiled_sites_are_blocked_on_every_port(gate: Inline, family: int) -> None:
    _, server = FAMILIES[family]
    before, syns = len(gate.nginx.log_lines()), gate.syns()
    for port in [*HTTP_PORTS, BANNER_PORT]:
        code, body = curl_http(gate, server, port, UNFILED)
        assert code == "403" and UNFILED in body and "served host=" not in body, (port, body)
    for port in TLS_PORTS:
        result = curl_https(gate, server, port, UNFILED)
        assert result.returncode != 0 and "served host=" not in result.stdout, (port, result.stderr)
        handshake = s_client(gate, server, port, UNFILED)
        assert handshake.returncode != 0 and "CONNECTION ESTABLISHED" not in handshake.stdout, handshake
    assert log_lines_since(gate, before) == []
    assert gate.syns() == syns  # not a single connection reached the server
    assert "reason=unfiled" in gate.gate_log()


@pytest.mark.parametrize("family", [4, 6])
def test_a_server_first_service_works_through_the_gate(gate: Inline, family: int) -> None:
    client, server = FAMILIES[family]
    with gate.net.socket(gate.net.client, socket.AF_INET6 if family == 6 else socket.AF_INET) as sock:
        sock.settimeout(SERVER_FIRST_WAIT + 5)
        sock.connect((server, BANNER_PORT))
        started = time.monotonic()
        assert sock.recv(1024) == netnskit.BANNER
        assert time.monotonic() - started >= SERVER_FIRST_WAIT * 0.8  # connected upstream only after the wait
        sock.sendall(b"hello\r\n")
        echo = b""
        while not echo.endswith(b"\r\n"):
            echo += sock.recv(1024) or b"\r\n"
    assert echo == b"echo from %s: hello\r\n" % client.encode()  # and it saw the client's own address


@pytest.mark.parametrize("family", [4, 6])
def test_waiting_past_server_first_wait_does_not_open_the_gate(gate: Inline, family: int) -> None:
    """The timer connects upstream, but the client's bytes are still classified before any is relayed."""
    _, server = FAMILIES[family]
    kind = socket.AF_INET6 if family == 6 else socket.AF_INET
    before = len(gate.nginx.log_lines())
    with gate.net.socket(gate.net.client, kind) as sock:
        sock.settimeout(10)
        sock.connect((server, HTTP_PORTS[1]))
        time.sleep(SERVER_FIRST_WAIT + 0.5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % UNFILED.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403") and b"served host=" not in answer, answer[:300]
    # a ClientHello for an unfiled name after the wait: reset, never relayed
    context = ssl.create_default_context(cafile=str(gate.nginx.ca_pem))
    with gate.net.socket(gate.net.client, kind) as raw:
        raw.settimeout(10)
        raw.connect((server, TLS_PORTS[1]))
        time.sleep(SERVER_FIRST_WAIT + 0.5)
        with pytest.raises((ConnectionResetError, ssl.SSLError)):
            context.wrap_socket(raw, server_hostname=UNFILED)
    assert log_lines_since(gate, before) == []


def test_monitor_mode_passes_an_unfiled_site_and_records_it(inline: Inline) -> None:
    inline.stop_gate()
    inline.start_gate('gate.enforcement="monitor"')
    try:
        code, body = curl_http(inline, SERVER4, 80, UNFILED)
        assert code == "200" and served_by(body, UNFILED, 80, CLIENT4), body
        result = curl_https(inline, SERVER6, 443, UNFILED)
        assert served_by(result.stdout, UNFILED, 443, CLIENT6), result.stderr
    finally:
        assert inline.stop_gate() == 0  # the violation table is written out as the gate stops
    log = inline.gate_log()
    assert "host=%s reason=unfiled" % UNFILED in log and "mode=monitor" in log, log[-3000:]
    listed = run_icpgate("violations", "--json", "-c", str(INLINE_CONFIG), *inline.overrides())
    assert listed.returncode == 0, listed.stderr
    records = [r for r in json.loads(listed.stdout)["items"] if r["host"] == UNFILED]
    passed = {(r["ip"], r["port"], r["proto"]) for r in records if r["passed"] >= 1}
    assert {(SERVER4, 80, "http"), (SERVER6, 443, "tls")} <= passed, records


@pytest.mark.parametrize("family", [4, 6])
def test_the_gates_own_address_in_the_hosted_range_is_not_steered(gate: Inline, family: int) -> None:
    """The gate as the range's gateway holds an address inside it: a service of the gate itself
    there (its SSH, say) is reached directly, not taken for a customer's and sent to a listener."""
    client = FAMILIES[family][0]
    own = netnskit.GATE_SERVER_SIDE6 if family == 6 else netnskit.GATE_SERVER_SIDE4
    port = BANNER_PORT + 1
    service = gate.net.popen(gate.net.gate, [sys.executable, netnskit.__file__, "banner", str(port)])
    try:
        gate.net.wait_for_port(gate.net.gate, own, port, process=service)
        with gate.net.socket(gate.net.client, socket.AF_INET6 if family == 6 else socket.AF_INET) as sock:
            sock.settimeout(SERVER_FIRST_WAIT + 5)
            sock.connect((own, port))
            started = time.monotonic()
            assert sock.recv(1024) == netnskit.BANNER
            assert time.monotonic() - started < SERVER_FIRST_WAIT / 2  # at once: no auto listener in between
            sock.sendall(b"hello\r\n")
            assert sock.recv(1024) == b"echo from %s: hello\r\n" % client.encode()
    finally:
        service.terminate()
        service.wait(10)


def test_with_the_gate_killed_new_connections_fail(gate: Inline) -> None:
    code, _ = curl_http(gate, SERVER4, 80, FILED)
    assert code == "200"
    gate.kill_gate()
    syns, before = gate.syns(), len(gate.nginx.log_lines())
    for server in (SERVER4, SERVER6):
        for port in [*HTTP_PORTS, BANNER_PORT]:
            code, body = curl_http(gate, server, port, FILED)
            assert code == "000", (server, port, body)
        assert curl_https(gate, server, TLS_PORTS[0], FILED).returncode != 0
    assert gate.syns() == syns and log_lines_since(gate, before) == []


def bypass_state(inline: Inline) -> str:
    result = run_in_gate(inline, "bypass", "status", "--json", *HOSTED_RANGES)
    return json.loads(result.stdout)["state"]


def run_in_gate(inline: Inline, *args: str) -> subprocess.CompletedProcess[str]:
    """An `icpgate` command in the gate namespace, on the inline example."""
    return inline.net.run(inline.net.gate, sys.executable, "-m", "icpgate", *args, "-c", str(INLINE_CONFIG),
                          *inline.overrides(), check=False)  # fmt: skip


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.1)


def test_with_the_gate_killed_the_bypass_routes_around_it_when_configured(gate: Inline) -> None:
    """`icpgate bypass watch` (the operator's choice instead of failing closed): while /readyz fails,
    the hosted ranges are routed straight to the servers, unchecked; once the gate is back, steered again."""
    with (gate.tmp / "bypass.log").open("w") as log:
        watcher = gate.net.popen(gate.net.gate, [sys.executable, "-m", "icpgate", "bypass", "watch", *HOSTED_RANGES,
                                 "-c", str(INLINE_CONFIG), *gate.overrides(), "--interval", "0.2", "--fail-after", "2",
                                 "--recover-after", "2", "--timeout", "1"], stdout=log, stderr=log)  # fmt: skip
    try:
        time.sleep(1)
        assert bypass_state(gate) == "off"
        gate.kill_gate()
        wait_for(lambda: bypass_state(gate) == "on", 10, "the bypass to turn on")
        for client, server in FAMILIES.values():
            code, body = curl_http(gate, server, 80, UNFILED)  # unchecked: the server answers itself
            assert code == "200" and served_by(body, UNFILED, 80, client), body
        gate.start_gate()
        wait_for(lambda: bypass_state(gate) == "off", 10, "the bypass to turn off")
        for _, server in FAMILIES.values():
            assert curl_http(gate, server, 80, UNFILED)[0] == "403"
    finally:
        gate.net.stop(watcher)
        run_in_gate(gate, "bypass", "off", *HOSTED_RANGES)
    assert "Traceback" not in (gate.tmp / "bypass.log").read_text()


# --- a transparent upstream that cannot be made: clear errors, no traceback (loopback, no namespace) ---------
def test_a_client_source_that_cannot_be_used_fails_closed_and_says_why(tmp_path: Path) -> None:
    """Without CAP_NET_ADMIN and CAP_NET_RAW, IP_TRANSPARENT is refused (EPERM); a backend of the
    other family cannot be reached from the client's address. Either fails the connection (502),
    and is logged once however often it happens."""
    from gatekit import free_port, gate_config, listener, wait_for_port

    ports = {"v4_backend": free_port(), "v6_backend": free_port()}
    listeners = {"v4_backend": listener(ports["v4_backend"], "http", free_port()),
                 "v6_backend": listener(ports["v6_backend"], "http") | {"backend": "[::1]:9"}}  # fmt: skip
    config = gate_config(tmp_path, listeners, upstream='[upstream]\nsource = "client"')
    log_path = tmp_path / "gate.log"
    without = ["setpriv", "--inh-caps=-net_admin,-net_raw", "--bounding-set=-net_admin,-net_raw"]
    with log_path.open("w") as log:
        process = subprocess.Popen([*without, sys.executable, "-m", "icpgate", "run", "-c", str(config)],
                                   stdout=log, stderr=log)  # fmt: skip
    try:
        for port in ports.values():
            wait_for_port(port, process=None)
        for _ in range(3):
            for port in ports.values():
                result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                                         "-H", "Host: " + FILED, "http://127.0.0.1:%d/" % port],
                                        capture_output=True, text=True, timeout=30)  # fmt: skip
                assert result.stdout == "502", result
    finally:
        process.terminate()
        process.wait(30)
    log = log_path.read_text()
    assert log.count("IP_TRANSPARENT needs CAP_NET_ADMIN (or CAP_NET_RAW)") == 1, log
    assert log.count("backend ::1 cannot be reached from an IPv4 client's address") == 1, log
    assert "Traceback" not in log
