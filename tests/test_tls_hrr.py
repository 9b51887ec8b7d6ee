"""TLS 1.3 HelloRetryRequest through the gate, against real nginx with two vhosts on one port.

nginx on OpenSSL 3.0 serves the vhost of the *second* ClientHello after a HelloRetryRequest, so a
client could show a filed name to the gate and get an unfiled site. The first test shows that on
nginx directly (so the tests below can tell when it happens); the rest show the gate stopping it
and still passing real clients, including ones that get a retry request for a real reason.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from gatekit import closed_by_peer, free_port, gate_config, listener, start_gate, wait_for_port
from tls13_client import client_hello, retry_handshake

from icpgate.gate.tls.watch import HRR_RANDOM, HandshakeWatch, RetryViolation, ServerViolation

FILED = "example-filed.cn"
FILED_WWW = "www.example-filed.cn"
UNFILED = "unfiled-example.com"


@dataclass
class Vhosts:
    port: int
    ca: Path
    error_log: Path

    def server_names(self) -> list[str]:
        """Every SNI nginx's servername callback saw, in order (nginx is built --with-debug)."""
        return re.findall(r'SSL server name: "([^"]*)"', self.error_log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def vhosts(tmp_path_factory: pytest.TempPathFactory):
    """nginx with two TLS vhosts on one port, each with its own certificate from one trustme CA.

    X25519 is its only group, so a client that offers a P-256 key share first gets a real
    HelloRetryRequest."""
    tmp = tmp_path_factory.mktemp("vhosts")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp / "ca.pem")
    servers = []
    port = free_port()
    for index, names in enumerate([(FILED, FILED_WWW), (UNFILED,)]):
        issued = ca.issue_cert(*names)
        issued.cert_chain_pems[0].write_to_path(tmp / ("%d.crt" % index))
        issued.private_key_pem.write_to_path(tmp / ("%d.key" % index))
        servers.append(
            " server { listen 127.0.0.1:%d ssl%s; server_name %s; ssl_certificate %s; ssl_certificate_key %s;\n"
            '  location / { return 200 "vhost %s\\n"; } }\n'
            % (port, " default_server" if index == 0 else "", " ".join(names), tmp / ("%d.crt" % index),
               tmp / ("%d.key" % index), names[0])
        )  # fmt: skip
    conf = tmp / "nginx.conf"
    conf.write_text(
        "daemon off; master_process off; pid %s/nginx.pid; error_log %s/error.log debug;\n"
        "events {}\nhttp { access_log off; client_body_temp_path %s;\n"
        " ssl_protocols TLSv1.2 TLSv1.3; ssl_ecdh_curve X25519;\n%s}\n" % (tmp, tmp, tmp, "".join(servers))
    )
    nginx = subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf), "-p", str(tmp)], stderr=subprocess.PIPE)
    try:
        wait_for_port(port, process=nginx)
        yield Vhosts(port, tmp / "ca.pem", tmp / "error.log")
    finally:
        nginx.terminate()
        nginx.wait(10)


@pytest.fixture(scope="module")
def hrr_gate(tmp_path_factory: pytest.TempPathFactory, vhosts: Vhosts):
    port = free_port()
    tmp = tmp_path_factory.mktemp("hrr-gate")
    running = start_gate(gate_config(tmp, {"tls": listener(port, "tls", vhosts.port)}), {"tls": port})
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log(), running.log()


def names_in(der: bytes | None) -> list[str]:
    assert der is not None
    certificate = x509.load_der_x509_certificate(der)
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )


def wait_for_log(gate, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = gate.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError("%r not in the gate log:\n%s" % (text, gate.log()))


def test_nginx_serves_the_second_hellos_vhost_directly(vhosts: Vhosts) -> None:
    """Without the gate: the client gets vhost B's certificate after changing SNI in the retry."""
    result = retry_handshake("127.0.0.1", vhosts.port, FILED, UNFILED)
    assert (result.outcome, result.retried) == ("certificate", True), result
    assert names_in(result.certificate_der) == [UNFILED]
    assert vhosts.server_names()[-2:] == [FILED, UNFILED]


def test_changed_name_after_retry_is_reset_and_never_reaches_nginx(hrr_gate, vhosts: Vhosts) -> None:
    seen_before = len(vhosts.server_names())
    result = retry_handshake("127.0.0.1", hrr_gate.ports["tls"], FILED, UNFILED)
    # The retry request itself came through from nginx; the second hello did not go back.
    assert (result.outcome, result.retried, result.certificate_der) == ("reset", True, None), result
    time.sleep(0.3)  # nginx logs the closed connection; nothing more may appear for it
    assert vhosts.server_names()[seen_before:] == [FILED]
    log = wait_for_log(hrr_gate, "rule=tls.hello_retry")
    assert "host=%s reason=invalid rule=tls.hello_retry" % UNFILED in log


@pytest.mark.parametrize("second", [None, "example-filed.cn.evil.net"])
def test_dropped_or_other_name_after_retry_is_reset(hrr_gate, vhosts: Vhosts, second: str | None) -> None:
    seen_before = len(vhosts.server_names())
    result = retry_handshake("127.0.0.1", hrr_gate.ports["tls"], FILED, second)
    assert (result.outcome, result.retried) == ("reset", True), result
    time.sleep(0.3)
    assert vhosts.server_names()[seen_before:] == [FILED]


@pytest.mark.parametrize("second", [FILED, "EXAMPLE-Filed.CN."])
def test_same_name_after_retry_passes(hrr_gate, vhosts: Vhosts, second: str) -> None:
    """The same name, however spelled, gets the filed vhost's certificate from nginx."""
    result = retry_handshake("127.0.0.1", hrr_gate.ports["tls"], FILED, second)
    assert (result.outcome, result.retried) == ("certificate", True), result
    assert names_in(result.certificate_der) == [FILED, FILED_WWW]


def test_python_ssl_client_through_the_gate(hrr_gate, vhosts: Vhosts) -> None:
    context = ssl.create_default_context(cafile=str(vhosts.ca))
    for name in (FILED, FILED_WWW):
        with (
            socket.create_connection(("127.0.0.1", hrr_gate.ports["tls"]), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % name.encode())
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"vhost example-filed.cn\n"), answer


@pytest.mark.parametrize("tls13", [True, False])
def test_curl_with_a_real_retry_request_passes(hrr_gate, vhosts: Vhosts, tls13: bool) -> None:
    """curl offers a P-256 share first; nginx only takes X25519 and asks again (TLS 1.3), or just picks it (1.2)."""
    seen_before = len(vhosts.server_names())
    version = ["--tlsv1.3"] if tls13 else ["--tlsv1.2", "--tls-max", "1.2"]
    result = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "10", "--cacert", str(vhosts.ca), "--curves", "P-256:X25519", *version,
         "--resolve", "%s:%d:127.0.0.1" % (FILED, hrr_gate.ports["tls"]),
         "https://%s:%d/" % (FILED, hrr_gate.ports["tls"])],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"vhost example-filed.cn\n"
    # nginx's servername callback runs once per ClientHello: twice means a retry request was answered.
    assert vhosts.server_names()[seen_before:] == [FILED, FILED] if tls13 else [FILED]


def test_unfiled_first_hello_is_still_reset_before_nginx(hrr_gate, vhosts: Vhosts) -> None:
    seen_before = len(vhosts.server_names())
    result = retry_handshake("127.0.0.1", hrr_gate.ports["tls"], UNFILED, FILED)
    assert (result.outcome, result.retried) == ("reset", False), result
    assert vhosts.server_names()[seen_before:] == []


def test_backend_that_never_answers_fails_closed(gate, origin) -> None:
    """The record origin never speaks: the watch for the server's first message times out."""
    from gatekit import python_hello, send_in_pieces

    sock = send_in_pieces(gate.ports["tls_record"], python_hello(FILED), [])
    started = time.monotonic()
    assert closed_by_peer(sock) == "reset"
    assert 1.5 < time.monotonic() - started < 8  # the test config's 2 s inspection timeout


# --- the watch on its own: bytes in, what may be forwarded out ---------------------------------------
def record(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 3, 3]) + len(payload).to_bytes(2, "big") + payload


def server_hello(random: bytes, extensions: bytes = b"\x00\x2b\x00\x02\x03\x04") -> bytes:
    body = b"\x03\x03" + random + b"\x00" + b"\x13\x01\x00" + len(extensions).to_bytes(2, "big") + extensions
    return record(0x16, b"\x02" + len(body).to_bytes(3, "big") + body)


RETRY = server_hello(HRR_RANDOM, b"\x00\x2b\x00\x02\x03\x04\x00\x2c\x00\x06\x00\x04cook")
SERVER_HELLO_ = server_hello(bytes(range(32)))
CCS = record(0x14, b"\x01")
EARLY = record(0x17, b"early data")


def hello(sni: str | None) -> bytes:
    return record(0x16, client_hello(sni, None))


def watch_for(first: str | None = FILED) -> HandshakeWatch:
    return HandshakeWatch(first, 16384)


def test_watch_relays_early_data_holds_handshake_until_a_server_hello() -> None:
    watch = watch_for()
    assert watch.from_client(CCS + EARLY[:4]) == CCS  # whole records only
    assert watch.from_client(EARLY[4:]) == EARLY
    held = hello(UNFILED) + EARLY
    assert watch.from_client(held) == b""  # may be a second hello: waits
    assert watch.from_server(SERVER_HELLO_[:20]) == (False, b"")
    assert watch.from_server(SERVER_HELLO_[20:] + CCS + EARLY) == (True, held)  # not a retry: released


@pytest.mark.parametrize("answer", [record(0x15, b"\x02\x28"), record(0x16, b"\x0b\x00\x00\x00")])
def test_watch_ends_on_anything_but_a_retry(answer: bytes) -> None:
    watch = watch_for()
    assert watch.from_client(hello(UNFILED)) == b""
    assert watch.from_server(answer) == (True, hello(UNFILED))


@pytest.mark.parametrize("second", [FILED, "Example-Filed.CN."])
def test_same_name_after_retry_goes_on_and_the_next_server_hello_ends_the_watch(second: str) -> None:
    watch = watch_for()
    assert watch.from_server(RETRY + CCS) == (False, b"")
    assert watch.awaiting_client
    assert watch.from_client(CCS) == CCS
    second_hello = hello(second)
    assert watch.from_client(second_hello[:7]) == b""
    assert watch.from_client(second_hello[7:] + hello(UNFILED)) == second_hello  # a third waits
    assert not watch.awaiting_client
    assert watch.from_server(SERVER_HELLO_) == (True, hello(UNFILED))


def test_no_name_twice_is_the_same_name() -> None:
    watch = watch_for(None)
    watch.from_server(RETRY)
    assert watch.from_client(hello(None)) == hello(None)


@pytest.mark.parametrize(
    ("first", "second", "detail"),
    [
        (FILED, UNFILED, "names 'unfiled-example.com', the first named 'example-filed.cn'"),
        (FILED, None, "names no name, the first named 'example-filed.cn'"),
        (None, FILED, "names 'example-filed.cn', the first named no name"),
    ],
)
def test_another_name_after_retry_is_a_violation(first: str | None, second: str | None, detail: str) -> None:
    watch = watch_for(first)
    watch.from_server(RETRY)
    with pytest.raises(RetryViolation, match=re.escape(detail)) as raised:
        watch.from_client(hello(second))
    assert raised.value.host == (second or "")


def test_a_second_hello_sent_before_the_retry_is_checked_when_it_comes() -> None:
    watch = watch_for()
    assert watch.from_client(CCS + hello(UNFILED)) == CCS
    with pytest.raises(RetryViolation, match=re.escape("names 'unfiled-example.com'")):
        watch.from_server(RETRY)


@pytest.mark.parametrize(
    ("client", "error"),
    [
        (record(0x16, b"\x0b\x00\x00\x00"), "not a ClientHello"),
        (b"GET / HTTP/1.1\r\n", "non-TLS record"),
        (b"\x17\x07\x00\x00\x01x", "record version 7.0"),
        (b"", "more than"),  # built in the test: a hello over a small cap
    ],
    ids=["not-a-hello", "garbage", "bad-version", "oversize"],
)
def test_garbage_or_oversize_after_retry_is_a_violation(client: bytes, error: str) -> None:
    watch = HandshakeWatch(FILED, 600 if error == "more than" else 16384)
    watch.from_server(RETRY)
    if error == "more than":
        client = record(0x16, client_hello(FILED, None, cookie=b"x" * 700))
        error = "larger than 600"
    with pytest.raises(RetryViolation, match=error):
        watch.from_client(client)


def test_holding_is_bounded() -> None:
    watch = HandshakeWatch(FILED, 600)
    watch.from_client(hello(FILED))
    with pytest.raises(RetryViolation, match="held before the server's answer"):
        for _ in range(100):
            watch.from_client(EARLY * 40)


@pytest.mark.parametrize(
    ("server", "error"),
    [
        (RETRY + CCS + RETRY, "second HelloRetryRequest"),
        (b"HTTP/1.1 400 Bad Request\r\n", "non-TLS record"),
        (record(0x16, b"\x02\x00\x00\x10" + bytes(16)), "ServerHello of 16 bytes"),
        (CCS * 70, "records without a ServerHello"),
    ],
)
def test_server_faults(server: bytes, error: str) -> None:
    watch = watch_for()
    with pytest.raises(ServerViolation, match=error):
        watch.from_server(server)


def test_second_retry_after_a_good_second_hello() -> None:
    watch = watch_for()
    watch.from_server(RETRY)
    watch.from_client(hello(FILED))
    with pytest.raises(ServerViolation, match="second HelloRetryRequest"):
        for byte in range(len(RETRY)):  # and byte by byte: classification does not depend on the cuts
            watch.from_server(RETRY[byte : byte + 1])


def test_server_answer_before_the_second_hello_is_a_fault() -> None:
    watch = watch_for()
    watch.from_server(RETRY)
    with pytest.raises(ServerViolation, match="before the second ClientHello"):
        watch.from_server(SERVER_HELLO_)


def test_server_records_split_anywhere_classify_the_same() -> None:
    flight = RETRY + CCS
    for cut in range(1, len(flight)):
        watch = watch_for()
        assert watch.from_server(flight[:cut]) == (False, b"")
        assert watch.from_server(flight[cut:]) == (False, b"")
        assert watch.awaiting_client, cut
    for cut in range(1, len(SERVER_HELLO_)):  # whole, it takes the short way; cut, the long one
        watch = watch_for()
        if cut < 5 + 4 + 2 + 32:  # record header, message header, version, random
            assert watch.from_server(SERVER_HELLO_[:cut]) == (False, b"")
            assert watch.from_server(SERVER_HELLO_[cut:]) == (True, b""), cut
        else:
            assert watch.from_server(SERVER_HELLO_[:cut]) == (True, b""), cut
    # ServerHello and Certificate in one record (TLS 1.2 style): the first message decides.
    packed = SERVER_HELLO_[5:] + b"\x0b\x00\x00\x00"
    assert watch_for().from_server(record(0x16, packed)) == (True, b"")


# --- through the gate, bytes driven by hand ---------------------------------------------------------
def test_second_hello_sent_ahead_of_the_retry_is_held_and_refused(hrr_gate, vhosts: Vhosts) -> None:
    """Both hellos in one write: the second waits at the gate until nginx's retry request, then is read."""
    seen_before = len(vhosts.server_names())
    sock = socket.create_connection(("127.0.0.1", hrr_gate.ports["tls"]), timeout=10)
    sock.sendall(hello(FILED) + CCS + record(0x16, client_hello(UNFILED, bytes(32))))
    assert closed_by_peer(sock) == "reset"
    time.sleep(0.3)
    assert vhosts.server_names()[seen_before:] == [FILED]


@pytest.fixture
def double_retry_backend():
    """A backend no real TLS stack imitates: it answers every read with two retry requests."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    if conn.recv(65536):
                        conn.sendall(RETRY + CCS + RETRY)
                    conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()


def test_a_backend_asking_twice_gets_the_client_reset(tmp_path: Path, double_retry_backend: int) -> None:
    port = free_port()
    gate = start_gate(gate_config(tmp_path, {"tls": listener(port, "tls", double_retry_backend)}), {"tls": port})
    try:
        result = retry_handshake("127.0.0.1", port, FILED, FILED)
        assert result.outcome == "reset", result  # not "second_retry": the second one never reached the client
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log()
