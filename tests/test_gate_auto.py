"""`auto` listeners through the real gate: one port for TLS, HTTP, other protocols and server-first ones.

The gate runs as `icpgate run` with `server_first_wait = 0.2`; the backends are the test origin
(tests/origin.py: HTTP, TLS, and a recorder that keeps every connection's bytes) and a banner
server in this process that speaks first, as SMTP or SSH servers do.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from adminkit import admin_request, metric, parse_metrics
from gatekit import (
    Gate,
    closed_by_peer,
    free_port,
    gate_config,
    listener,
    python_hello,
    send_in_pieces,
    start_gate,
    wait_for_port,
)
from test_gate_http import curl, exchange, split_response
from test_gate_tls import curl_https, wait_for_record

from icpgate.gate.sniff import Protocol, Sniffer

SERVER_FIRST_WAIT = 0.2
BANNER = b"220 banner.example ESMTP\r\n"


class BannerServer:
    """Speaks first (a banner), then echoes every line; keeps what each connection sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytearray] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            received = bytearray()
            self.received.append(received)
            self.accepted.set()
            threading.Thread(target=self._echo, args=(conn, received), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket, received: bytearray) -> None:
        with conn:
            conn.sendall(BANNER)
            try:
                while data := conn.recv(65536):
                    received += data
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def banner() -> Iterator[BannerServer]:
    server = BannerServer()
    yield server
    server.close()


def _start(tmp, origin, banner: BannerServer, other_protocols: str) -> Gate:
    ports = {name: free_port() for name in ("http", "auto_http", "auto_tls", "auto_record", "auto_banner", "admin")}
    listeners = {
        "http": listener(ports["http"], "http", origin.http),
        "auto_http": listener(ports["auto_http"], "auto", origin.http),
        "auto_tls": listener(ports["auto_tls"], "auto", origin.tls),
        "auto_record": listener(ports["auto_record"], "auto", origin.record_port),
        "auto_banner": listener(ports["auto_banner"], "auto", banner.port),
    }
    admin = {"enabled": True, "address": "127.0.0.1", "port": ports["admin"]}
    config = gate_config(tmp, listeners, gate={"server_first_wait": SERVER_FIRST_WAIT}, tables={"admin": admin})
    # gate_config writes the [policy] table itself
    config.write_text(config.read_text().replace("[policy]\n", '[policy]\nother_protocols = "%s"\n' % other_protocols))
    admin = ports.pop("admin")
    gate = start_gate(config, ports)
    gate.ports["admin"] = admin
    wait_for_port(admin)
    return gate


@pytest.fixture(scope="module")
def auto_gate(tmp_path_factory, origin, banner) -> Iterator[Gate]:
    gate = _start(tmp_path_factory.mktemp("auto"), origin, banner, "pass")
    yield gate
    assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


@pytest.fixture(scope="module")
def strict_gate(tmp_path_factory, origin, banner) -> Iterator[Gate]:
    """`policy.other_protocols = "block"`."""
    gate = _start(tmp_path_factory.mktemp("auto-block"), origin, banner, "block")
    yield gate
    assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def answer_summary(raw: bytes) -> tuple[bytes, bytes]:
    """The status line and the gate's header, without the request id: what must match between listeners."""
    head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    gate_header = next((line.split(b"; id=")[0] for line in head if line.lower().startswith(b"x-icp-gate:")), b"")
    return head[0], gate_header


def trickle(port: int, data: bytes) -> socket.socket | str:
    """Send one byte at a time; 'reset' when the gate resets the connection before the last one."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for offset in range(len(data)):
            sock.sendall(data[offset : offset + 1])
            time.sleep(0.001)
    except (ConnectionResetError, BrokenPipeError):
        sock.close()
        return "reset"
    return sock


def new_records(origin, before: int, settle: float = 0.3) -> list[bytes]:
    time.sleep(settle)
    return origin.recorded()[before:]


# --- HTTP and TLS on an auto port behave as on their own listeners ---------------------------------
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /a HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: www.example-pending.cn\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET http://example-filed.cn/ HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: example-filed.cn\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n",
        b"FOO / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n",
        b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n",
        b"GET /\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        # A PROXY protocol header: a backend that reads one (nginx `proxy_protocol`) reads the request after it.
        b"PROXY TCP4 192.0.2.1 198.51.100.1 40000 80\r\nGET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    ],
)
def test_http_on_an_auto_port_is_answered_as_on_an_http_port(auto_gate, request_bytes: bytes) -> None:
    on_http = exchange(auto_gate.ports["http"], request_bytes)
    on_auto = exchange(auto_gate.ports["auto_http"], request_bytes)
    assert on_http, request_bytes
    assert answer_summary(on_auto) == answer_summary(on_http), (on_auto[:300], on_http[:300])


def test_curl_http_filed_and_unfiled(auto_gate) -> None:
    status, headers, body = split_response(curl(auto_gate.ports["auto_http"], "www.example-filed.cn", path="/x?y=1"))
    assert status == 200 and "x-icp-gate" not in headers and '"path": "/x?y=1"' in body
    status, headers, body = split_response(curl(auto_gate.ports["auto_http"], "example-unfiled.cn"))
    assert status == 403 and headers["x-icp-gate"].startswith("blocked; reason=unfiled; id=")
    assert "example-unfiled.cn" in body


def test_keep_alive_requests_are_each_checked(auto_gate) -> None:
    sock = socket.create_connection(("127.0.0.1", auto_gate.ports["auto_http"]), timeout=10)
    sock.sendall(b"GET /one HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /two HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n")
    assert "reason=unfiled" in closed_by_peer(sock)


def test_tls_filed_passes_and_unfiled_is_reset(auto_gate, certs) -> None:
    port = auto_gate.ports["auto_tls"]
    result = curl_https(port, "www.example-filed.cn", certs["ca"])
    assert result.returncode == 0, result.stderr
    assert b'"host": "www.example-filed.cn:%d"' % port in result.stdout
    blocked = curl_https(port, "example-unfiled.cn", certs["ca"])
    assert blocked.returncode == 35 and b"reset by peer" in blocked.stderr, blocked


def test_openssl_s_client_and_python_ssl(auto_gate, certs) -> None:
    port = auto_gate.ports["auto_tls"]

    def s_client(name: str) -> str:
        return subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-servername", name, "-brief"],
                              input="", capture_output=True, text=True, timeout=20).stderr  # fmt: skip

    assert "CONNECTION ESTABLISHED" in s_client("example-filed.cn")
    assert "CONNECTION ESTABLISHED" not in s_client("example-unfiled.cn")
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="example-filed.cn") as tls:  # fmt: skip
        tls.sendall(b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        (python_hello("example-filed.cn"), "passed"),
        (python_hello("example-unfiled.cn"), "reset"),
        (python_hello(None), "reset"),  # no SNI: the no_host rule, as on a tls listener
        (b"\x16\x03\x05\x00\x05\x01\x00\x00\x01\x00", "reset"),  # a record version OpenSSL reads, the gate refuses
        (b"\x80\x2e\x01\x03\x01" + bytes(46), "reset"),  # SSLv2-compatible hello
    ],
)
def test_hellos_one_byte_at_a_time(auto_gate, origin, hello: bytes, expected: str) -> None:
    before = len(origin.recorded())
    sock = trickle(auto_gate.ports["auto_record"], hello)
    if expected == "passed":
        wait_for_record(origin, before, len(hello))
        sock.close()
        assert origin.recorded()[before] == hello
    else:
        assert sock == "reset" or closed_by_peer(sock) == "reset"
        assert all(record == b"" for record in new_records(origin, before))


def test_http_one_byte_at_a_time(auto_gate, origin) -> None:
    filed = b"GET /bytes HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n"
    before = len(origin.recorded())
    sock = trickle(auto_gate.ports["auto_record"], filed)
    wait_for_record(origin, before, len(filed))
    sock.close()
    assert origin.recorded()[before] == filed
    unfiled = b"GET /bytes HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n"
    sock = trickle(auto_gate.ports["auto_record"], unfiled)
    assert "reason=unfiled" in closed_by_peer(sock)


# --- other protocols ------------------------------------------------------------------------------
SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


@pytest.mark.parametrize(
    "first",
    [
        SSH_BANNER,
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
        b"\xff\xfd\x01\xff\xfb\x03",  # telnet negotiation
        b"DESCRIBE rtsp://cam.example/live RTSP/1.0\r\nCSeq: 1\r\n\r\n",
    ],
)
def test_other_protocols_pass_untouched(auto_gate, origin, first: bytes) -> None:
    before = len(origin.recorded())
    payload = first + bytes(range(256)) * 4
    sock = send_in_pieces(auto_gate.ports["auto_record"], payload, [len(first)], pause=0.05)
    wait_for_record(origin, before, len(payload))
    sock.close()
    assert origin.recorded()[before] == payload


@pytest.mark.parametrize("first", [SSH_BANNER, b"\x00\x01binary"])
def test_other_protocols_are_closed_when_blocked(strict_gate, origin, first: bytes) -> None:
    before = len(origin.recorded())
    sock = send_in_pieces(strict_gate.ports["auto_record"], first, [])
    assert closed_by_peer(sock) == "closed"
    assert new_records(origin, before) == []


def test_blocking_other_protocols_still_serves_http_and_tls(strict_gate, certs) -> None:
    assert split_response(curl(strict_gate.ports["auto_http"], "example-filed.cn"))[0] == 200
    assert curl_https(strict_gate.ports["auto_tls"], "www.example-filed.cn", certs["ca"]).returncode == 0


# --- server first -------------------------------------------------------------------------------
def test_a_server_first_protocol_works_with_a_silent_client(auto_gate, banner) -> None:
    sock = socket.create_connection(("127.0.0.1", auto_gate.ports["auto_banner"]), timeout=10)
    started = time.monotonic()
    assert sock.recv(1024) == BANNER
    waited = time.monotonic() - started
    assert SERVER_FIRST_WAIT * 0.9 <= waited < SERVER_FIRST_WAIT + 2, waited
    for line in (b"EHLO client.example\r\n", b"MAIL FROM:<a@client.example>\r\n"):
        sock.sendall(line)
        assert sock.recv(1024) == line
    sock.sendall(b"QUIT\r\n")
    assert sock.recv(1024) == b"QUIT\r\n"
    sock.shutdown(socket.SHUT_WR)
    assert closed_by_peer(sock) == "closed"
    assert bytes(banner.received[-1]) == b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\nQUIT\r\n"


def test_server_first_is_off_when_other_protocols_are_blocked(strict_gate, banner) -> None:
    connections = len(banner.received)
    sock = socket.create_connection(("127.0.0.1", strict_gate.ports["auto_banner"]), timeout=SERVER_FIRST_WAIT * 5)
    with pytest.raises(TimeoutError):
        sock.recv(1024)
    sock.close()
    assert len(banner.received) == connections


def _wait_past_the_timer(port: int, origin) -> tuple[socket.socket, int]:
    """Connect silently until the gate has connected to the (silent, recording) backend."""
    before = len(origin.recorded())
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    deadline = time.monotonic() + 10
    while len(origin.recorded()) == before:
        assert time.monotonic() < deadline, "the gate never connected upstream for a silent client"
        time.sleep(0.02)
    return sock, before


def test_waiting_past_the_timer_then_unfiled_http_is_blocked(auto_gate, origin) -> None:
    sock, before = _wait_past_the_timer(auto_gate.ports["auto_record"], origin)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n")
    answer = closed_by_peer(sock)
    assert answer.startswith("HTTP/1.1 403 ") and "reason=unfiled" in answer
    assert new_records(origin, before) == [b""]  # connected, and never a byte of the request


def test_waiting_past_the_timer_then_an_unfiled_hello_is_reset(auto_gate, origin) -> None:
    sock, before = _wait_past_the_timer(auto_gate.ports["auto_record"], origin)
    sock.sendall(python_hello("example-unfiled.cn"))
    assert closed_by_peer(sock) == "reset"
    assert new_records(origin, before) == [b""]


def test_waiting_past_the_timer_then_filed_http_passes(auto_gate, origin) -> None:
    sock, before = _wait_past_the_timer(auto_gate.ports["auto_record"], origin)
    request = b"GET /late HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n"
    sock.sendall(request)
    wait_for_record(origin, before, len(request))
    sock.close()
    assert origin.recorded()[before] == request


def test_waiting_past_the_timer_on_a_real_http_server(auto_gate) -> None:
    """The origin's HTTP server says nothing first; the request that comes late is decided as usual."""
    port = auto_gate.ports["auto_http"]
    for host, status in (("example-filed.cn", b"200"), ("example-unfiled.cn", b"403")):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        time.sleep(SERVER_FIRST_WAIT * 3)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        assert closed_by_peer(sock).startswith("HTTP/1.1 %s " % status.decode())


# --- fail closed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [b"GET", b"GET / HTTP/1.1", b"\x16", b"\x80\x2e"])
def test_a_stalled_prefix_fails_closed(auto_gate, origin, prefix: bytes) -> None:
    before = len(origin.recorded())
    sock = send_in_pieces(auto_gate.ports["auto_record"], prefix, [])
    started = time.monotonic()
    assert closed_by_peer(sock) in ("closed", "reset")
    assert 1.5 < time.monotonic() - started < 8  # the test config's 2 s inspection timeout
    assert all(record == b"" for record in new_records(origin, before))


def test_a_prefix_ended_by_eof_is_never_a_request(auto_gate, origin) -> None:
    """`GET http://…` and EOF without a line end: the HTTP path reads it and relays nothing."""
    before = len(origin.recorded())
    sock = send_in_pieces(auto_gate.ports["auto_record"], b"GET http://example-unfiled.cn/ HTTP/1.0", [])
    sock.shutdown(socket.SHUT_WR)
    assert closed_by_peer(sock) in ("closed", "reset")
    assert all(record == b"" for record in new_records(origin, before))


def test_metrics_count_what_was_detected(auto_gate) -> None:
    exchange(auto_gate.ports["auto_http"], b"GET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n")
    exchange(auto_gate.ports["auto_tls"], python_hello("example-unfiled.cn"))
    send_in_pieces(auto_gate.ports["auto_record"], SSH_BANNER, []).close()
    assert closed_by_peer(send_in_pieces(auto_gate.ports["auto_record"], b"GET", [])) == "closed"
    deadline = time.monotonic() + 10
    while True:
        metrics = parse_metrics(admin_request(auto_gate.ports["admin"], "/metrics")[2].decode())
        detected = {protocol: metric(metrics, "icpgate_detected_protocols_total", kind="auto", protocol=protocol)
                    for protocol in ("http", "tls", "other", "unknown")}  # fmt: skip
        if all(detected.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(detected.values()), detected
    assert metric(metrics, "icpgate_decisions_total", kind="http", action="block", reason="unfiled") >= 1
    assert metric(metrics, "icpgate_decisions_total", kind="tls", action="block", reason="unfiled") >= 1
    assert metric(metrics, "icpgate_decisions_total", kind="other", action="allow", reason="no_host") >= 1
    assert metric(metrics, "icpgate_decisions_total", kind="auto", action="block", reason="invalid") >= 1
    assert metric(metrics, "icpgate_timeouts_total", kind="auto", phase="inspect") >= 1
    assert metric(metrics, "icpgate_connections_total", kind="auto") >= sum(detected.values())
    # Handed-over connections are counted once and leave the open-connection count when they end.
    while metric(metrics, "icpgate_active_connections") and time.monotonic() < deadline + 10:
        time.sleep(0.2)
        metrics = parse_metrics(admin_request(auto_gate.ports["admin"], "/metrics")[2].decode())
    assert any(name == "icpgate_active_connections" for name, _ in metrics)
    assert metric(metrics, "icpgate_active_connections") == 0


# --- what passes as another protocol is no request to a real server -------------------------------
def _first_lines() -> list[bytes]:
    """Request-line shapes and near misses: methods, separators, targets, versions, line ends."""
    methods = [b"GET", b"get", b"HEAD", b"FOO", b"G.T", b"EHLO", b"USER", b"a001", b"DESCRIBE",
               b"SSH-2.0-OpenSSH_9.2p1"]  # fmt: skip
    targets = [b"/", b"/x", b"*", b"http://example-unfiled.cn/", b"HTTP://example-unfiled.cn/", b"x",
               b"rtsp://example-unfiled.cn/", b"h://example-unfiled.cn/", b"example-unfiled.cn",
               b"example-unfiled.cn:80", b"Debian-2+deb12u3", b"?x", b"%2Fx",
               b"sip:bob@example-unfiled.cn"]  # fmt: skip
    versions = [b"", b"HTTP/1.1", b"HTTP/1.0", b"http/1.1", b"HTXP/1.1", b"HTTP1.1", b"1.1", b"RTSP/1.0", b"SIP/2.0"]
    return [
        method + separator + target + (separator + version if version else b"") + end
        for method in methods
        for separator in (b" ", b"\t")
        for target in targets
        for version in versions
        for end in (b"\r\n", b"\n")
    ]


def _served(port: int, data: bytes) -> bytes:
    """The server's answer, or b'' when it closes or says nothing within a few seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


@pytest.fixture(scope="module")
def real_servers(tmp_path_factory) -> Iterator[list]:
    """nginx and Apache, each with a virtual host for an unfiled name beside its default server."""
    import trustme
    from backends import start_apache, start_nginx

    tmp, ca = tmp_path_factory.mktemp("servers"), trustme.CA()
    servers = [start_nginx(tmp, ["example-unfiled.cn"], ca), start_apache(tmp, ["example-unfiled.cn"], ca)]
    yield servers
    for server in servers:
        server.stop()


def _classify(line: bytes) -> Protocol:
    sniffer = Sniffer(32768)
    return sniffer.feed(line) or sniffer.at_end()


def test_what_passes_as_another_protocol_is_no_request_to_nginx_or_apache(real_servers) -> None:
    """Every first line the classifier calls another protocol (and so relays unread), sent with a
    Host header and a valid request behind it, to real nginx and Apache: neither serves anything
    from any virtual host. The lines it sends to the HTTP path need no check here: that path
    decides them as an http listener does."""
    import random

    lines = _first_lines()
    others = [line for line in lines if _classify(line) is Protocol.OTHER]
    assert 0 < len(others) < len(lines)  # both kinds occur: the check below is not vacuous
    sample = random.Random(12).sample(others, min(len(others), 300))
    sample += [b"EHLO mail.example\r\n", b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", b"USER anonymous\r\n"]
    # Behind each line, a well-formed request: a server that went on reading after its refusal would serve it.
    behind = b"GET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n"
    for line in sample:
        for server in real_servers:
            answer = _served(server.http, line + b"Host: example-unfiled.cn\r\n\r\n" + behind)
            assert b"served" not in answer, (server.kind, line, answer[:200])
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), (server.kind, line, answer[:200])


def test_what_passes_as_another_protocol_is_no_handshake_to_nginx_or_apache(real_servers) -> None:
    """A real ClientHello for the unfiled name in a record the classifier does not call TLS (another
    content type, a major version other than 3): neither server answers it with a ServerHello."""
    hello = python_hello("example-unfiled.cn")
    variants = [bytes([kind]) + hello[1:] for kind in (0x14, 0x15, 0x17, 0x18)]
    variants += [hello[:1] + bytes([major]) + hello[2:] for major in (0x00, 0x02, 0x04, 0xFF)]
    for data in variants:
        assert _classify(data) is Protocol.OTHER, data[:3]
        for server in real_servers:
            answer = _served(server.tls, data)
            assert not answer.startswith(b"\x16\x03"), (server.kind, data[:3], answer[:20])
    for server in real_servers:  # the harness: the hello itself is answered
        assert _served_hello(server.tls, hello).startswith(b"\x16\x03")


def _served_hello(port: int, hello: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(hello)
        return sock.recv(5)


def test_no_first_line_reaches_an_unfiled_site_through_an_auto_port(tmp_path, real_servers) -> None:
    """The same shapes through the gate, to nginx and Apache behind auto listeners: whichever path
    takes a line, no server ever serves the unfiled host (or its default server) for it."""
    import random

    ports = {server.kind: free_port() for server in real_servers}
    listeners = {server.kind: listener(ports[server.kind], "auto", server.http) for server in real_servers}
    gate = start_gate(gate_config(tmp_path, listeners, gate={"server_first_wait": SERVER_FIRST_WAIT}), ports)
    statuses = set()
    try:
        for line in random.Random(13).sample(_first_lines(), 300):
            for server in real_servers:
                answer = _served(ports[server.kind], line + b"Host: example-unfiled.cn\r\n\r\n")
                assert b"served" not in answer, (server.kind, line, answer[:200])
                status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b""
                assert status in (b"400", b"403", b""), (server.kind, line, answer[:200])
                statuses.add(status)
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()
    assert {b"400", b"403"} <= statuses  # the gate blocked some, and refused or passed others


def test_a_client_that_speaks_while_the_server_first_connect_runs(tmp_path) -> None:
    """The request waits for the connect the silence started, then is decided as usual. The
    backend's accept queue is kept full, so the kernel drops the gate's SYN until the test makes
    room (its retry comes a second later): the client speaks in between."""
    backend = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = free_port()
    timeouts = {"server_first_wait": SERVER_FIRST_WAIT, "inspect_timeout": 15, "connect_timeout": 15}
    config = gate_config(tmp_path, {"auto": listener(port, "auto", backend.getsockname()[1])}, gate=timeouts)
    gate = start_gate(config, {"auto": port})
    try:
        for host, expected in (("example-filed.cn", b"HTTP/1.1 200 OK"), ("example-unfiled.cn", b"HTTP/1.1 403 ")):
            filler = socket.create_connection(backend.getsockname(), timeout=5)  # the accept queue is full now
            client = socket.create_connection(("127.0.0.1", port), timeout=20)
            time.sleep(SERVER_FIRST_WAIT + 0.3)  # the gate has started connecting; its SYN was dropped
            request = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()
            client.sendall(request)
            sent = time.monotonic()
            time.sleep(0.3)
            backend.accept()[0].close()  # the filler, whose place the gate's retried SYN takes
            filler.close()
            backend.settimeout(10)
            upstream, _ = backend.accept()
            upstream.settimeout(10)
            assert time.monotonic() - sent > 0.5  # the connect was still under way when the client spoke
            if expected.endswith(b"200 OK"):
                assert upstream.recv(65536) == request
                upstream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                assert client.recv(65536) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                client.close()
            else:
                assert closed_by_peer(client).startswith(expected.decode())
                assert upstream.recv(65536) == b""  # closed without a byte of the request
            upstream.close()
    finally:
        backend.close()
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def test_max_connections_counts_each_auto_connection_once(tmp_path, origin) -> None:
    """A handed-over connection stays counted, once: with max_connections = 2 held by two classified
    (relayed) connections, a third client is refused, and admitted once they have gone. A slot held
    by a client that has said nothing is no such slot: a newcomer takes it."""
    port = free_port()
    config = gate_config(tmp_path, {"auto": listener(port, "auto", origin.http)}, gate={"max_connections": 2})
    gate = start_gate(config, {"auto": port})
    request = b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n"

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        time.sleep(0.2)  # accepted and counted
        return sock

    def served(sock: socket.socket) -> bool:
        sock.sendall(request)
        return sock.recv(65536).startswith(b"HTTP/1.1 200")

    try:
        first, second = connect(), connect()
        assert served(first) and served(second)
        assert closed_by_peer(connect(), timeout=5) == "closed"
        first.close()
        time.sleep(0.3)
        silent = connect()  # undecided, in the slot the first left
        newcomer = connect()  # the silent one gives way
        assert closed_by_peer(silent, timeout=5) in ("closed", "reset")
        assert served(newcomer)
        assert closed_by_peer(connect(), timeout=5) == "closed"  # the second and the newcomer hold both slots
        second.close()
        newcomer.close()
        time.sleep(0.3)
        third = connect()
        assert served(third)
        third.close()
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


# --- silent clients: a budget of their own, and slots that give way -------------------------------
SILENT_BUDGET = 2.0  # gate.server_first_timeout in these tests
FILED_REQUEST = b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n"


def ended_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the gate ends the connection (FIN or reset) within `seconds`, whatever it sent first."""
    deadline = time.monotonic() + seconds
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def _silent_gate(tmp_path, origin, banner: BannerServer, kind: str) -> Gate:
    """One worker, two listeners of `kind` (to the HTTP origin and the banner server), 24 slots of
    which 8 for undecided connections, and a 2 s budget for silent clients."""
    ports = {"web": free_port(), "banner": free_port(), "admin": free_port()}
    listeners = {"web": listener(ports["web"], kind, origin.http),
                 "banner": listener(ports["banner"], kind, banner.port)}  # fmt: skip
    settings = {"max_connections": 24, "max_undecided": 8, "server_first_wait": SERVER_FIRST_WAIT,
                "server_first_timeout": SILENT_BUDGET}  # fmt: skip
    admin = {"enabled": True, "address": "127.0.0.1", "port": ports["admin"]}
    return start_gate(gate_config(tmp_path, listeners, gate=settings, tables={"admin": admin}), ports)


def _metrics(gate: Gate, *wanted: tuple[str, dict]) -> dict:
    """The gate's metrics, once every `wanted` (name, labels) has a sample above 0 (they are
    copied once a second), or after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        metrics = parse_metrics(admin_request(gate.ports["admin"], "/metrics")[2].decode())
        if all(metric(metrics, name, **labels) for name, labels in wanted) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def test_silent_clients_cannot_lock_a_worker_out(tmp_path, origin, banner) -> None:
    """The attack: as many silent clients as the worker has slots, on a server-first port (each
    gets the banner and never answers). A filed HTTP client and a real server-first exchange still
    get through (the oldest silent ones give way), the exchange outlives the silent budget, and
    every silent client is gone within that budget."""
    gate = _silent_gate(tmp_path, origin, banner, "auto")
    try:
        opened = []
        for _ in range(24):
            opened.append((time.monotonic(), socket.create_connection(("127.0.0.1", gate.ports["banner"]), timeout=5)))
        time.sleep(SERVER_FIRST_WAIT * 3)  # their upstreams are connected, the banner is on its way

        assert exchange(gate.ports["web"], FILED_REQUEST).startswith(b"HTTP/1.1 200")

        client = socket.create_connection(("127.0.0.1", gate.ports["banner"]), timeout=5)
        assert client.recv(len(BANNER)) == BANNER
        client.sendall(b"EHLO client.example\r\n")
        assert client.recv(65536) == b"EHLO client.example\r\n"

        silent = [ended_within(sock, at + SILENT_BUDGET + 3 - time.monotonic()) for at, sock in opened]
        assert all(silent), "%d of 24 silent clients still open" % silent.count(False)

        client.sendall(b"QUIT\r\n")  # the exchange is past the budget: it spoke, so it is no silent client
        assert client.recv(65536) == b"QUIT\r\n"
        client.close()

        metrics = _metrics(gate, ("icpgate_timeouts_total", {"kind": "auto", "phase": "silent"}))
        assert metric(metrics, "icpgate_evicted_connections_total", kind="auto") >= 16
        assert metric(metrics, "icpgate_timeouts_total", kind="auto", phase="silent") >= 1
        assert metric(metrics, "icpgate_refused_connections_total", why="full") == 0
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def test_slow_clients_on_an_http_listener_give_way_to_a_new_one(tmp_path, origin, banner) -> None:
    """The same on an `http` listener: clients that send a byte and stall hold no slot a newcomer needs."""
    gate = _silent_gate(tmp_path, origin, banner, "http")
    try:
        stalled = [send_in_pieces(gate.ports["web"], b"G", []) for _ in range(24)]
        time.sleep(0.3)
        assert exchange(gate.ports["web"], FILED_REQUEST).startswith(b"HTTP/1.1 200")
        for sock in stalled:
            sock.close()
        metrics = _metrics(gate, ("icpgate_evicted_connections_total", {"kind": "http"}))
        assert metric(metrics, "icpgate_evicted_connections_total", kind="http") >= 16
        assert metric(metrics, "icpgate_refused_connections_total", why="full") == 0
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()
