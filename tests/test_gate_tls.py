"""TLS through the real gate: curl, openssl s_client, Python ssl, HTTP/2, segmented and odd hellos."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import subprocess
import time

import pytest
from gatekit import build_hello, closed_by_peer, python_hello, send_in_pieces, server_name_extension


def curl_https(port: int, host: str, ca, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(ca),
            "--resolve",
            "%s:%d:127.0.0.1" % (host, port),
            *args,
            "https://%s:%d/tls-path" % (host, port),
        ],
        capture_output=True,
        timeout=20,
    )


def test_curl_filed_passes_untouched(gate, certs) -> None:
    result = curl_https(gate.ports["tls"], "www.example-filed.cn", certs["ca"])
    assert result.returncode == 0, result.stderr
    assert b'"host": "www.example-filed.cn:%d"' % gate.ports["tls"] in result.stdout


@pytest.mark.parametrize("host", ["example-unfiled.cn", "www.example-pending.cn", "example-filed.cn.evil.net"])
def test_curl_blocked_gets_a_reset(gate, certs, host: str) -> None:
    result = curl_https(gate.ports["tls"], host, certs["ca"])
    assert result.returncode == 35, result  # SSL connect error: the handshake was cut
    assert b"reset by peer" in result.stderr


def test_openssl_s_client(gate) -> None:
    def s_client(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % gate.ports["tls"], "-servername", name, "-brief"],
            input="",
            capture_output=True,
            text=True,
            timeout=20,
        )

    filed = s_client("example-filed.cn")
    assert "CONNECTION ESTABLISHED" in filed.stderr, filed.stderr
    blocked = s_client("example-unfiled.cn")
    assert "CONNECTION ESTABLISHED" not in blocked.stderr
    assert "errno=104" in blocked.stderr or "reset" in blocked.stderr.lower(), blocked.stderr


def test_python_ssl_and_no_sni(gate, certs) -> None:
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    raw = socket.create_connection(("127.0.0.1", gate.ports["tls"]), timeout=10)
    with context.wrap_socket(raw, server_hostname="example-filed.cn") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 200")
    context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", gate.ports["tls"]), timeout=10)
    with raw, pytest.raises((ConnectionResetError, ssl.SSLError)):
        context.wrap_socket(raw, server_hostname=None)  # no SNI: no_host, blocked


def test_http2_through_pass_through(gate, certs, tmp_path) -> None:
    """curl --http2 to an nginx origin: ALPN and HTTP/2 frames pass the gate untouched."""
    from gatekit import free_port, gate_config, listener, start_gate, wait_for_port

    origin_port, gate_port = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        "daemon off; master_process off; pid %s/nginx.pid; error_log %s/error.log;\n"
        "events {}\nhttp { access_log off; client_body_temp_path %s;\n"
        " server { listen 127.0.0.1:%d ssl http2; ssl_certificate %s; ssl_certificate_key %s;\n"
        '  location / { return 200 "h2 origin\\n"; } } }\n'
        % (tmp_path, tmp_path, tmp_path, origin_port, certs["cert"], certs["key"])
    )
    nginx = subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
    try:
        wait_for_port(origin_port)
        listeners = {"tls": listener(gate_port, "tls", origin_port)}
        own_gate = start_gate(gate_config(tmp_path, listeners), {"tls": gate_port})
        try:
            result = curl_https(gate_port, "example-filed.cn", certs["ca"], "--http2", "-w", "%{http_version}")
            assert result.stdout == b"h2 origin\n2", result
            h2load = subprocess.run(
                [
                    "h2load",
                    "-n",
                    "200",
                    "-c",
                    "4",
                    "-m",
                    "8",
                    "--connect-to=127.0.0.1:%d" % gate_port,
                    "https://example-filed.cn:%d/" % gate_port,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "200 succeeded, 0 failed" in h2load.stdout, h2load.stdout
            assert "Application protocol: h2" in h2load.stdout
        finally:
            own_gate.stop()
    finally:
        nginx.terminate()
        nginx.wait(10)


def test_hello_in_one_byte_segments_with_pauses_is_replayed_byte_exact(gate, origin) -> None:
    hello = python_hello("www.example-filed.cn") + b"\x17\x03\x03\x00\x05early"
    before = len(origin.recorded())
    sock = send_in_pieces(gate.ports["tls_record"], hello, [1] * len(hello), pause=0.001)
    wait_for_record(origin, before, len(hello))
    sock.close()
    assert origin.recorded()[before] == hello


@pytest.mark.parametrize(
    "records",
    [
        [1, 1, 1, 1],  # handshake header spread over records
        [4, 300, 2],
        [1000],  # a post-quantum hello over two records
    ],
)
def test_post_quantum_hello_split_across_records_and_segments(gate, origin, records: list[int]) -> None:
    padding = (0x0015, b"\x00" * 560)  # real PQ hellos carry an X25519 share, many suites and padding
    hello = build_hello([server_name_extension("example-filed.cn"), padding], key_share_size=1216, record_sizes=records)
    assert 1900 < len(hello) < 2100
    before = len(origin.recorded())
    # Segments cut inside record headers, and a 2 KB hello in two segments.
    sock = send_in_pieces(gate.ports["tls_record"], hello, [3, 2, 700], pause=0.05)
    wait_for_record(origin, before, len(hello))
    sock.close()
    assert origin.recorded()[before] == hello


@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        (build_hello([server_name_extension("example-filed.cn", "example-unfiled.cn")]), "reset"),
        (build_hello([server_name_extension("example-filed.cn"), server_name_extension("example-filed.cn")]), "reset"),
        (build_hello([(0x1A1A, b""), server_name_extension("example-filed.cn"), (0x2A2A, b"\x00")]), "passed"),
        (build_hello([server_name_extension("public.example-filed.cn"), (0xFE0D, b"\x00" * 200)]), "passed"),
        (
            build_hello([server_name_extension("example-unfiled.cn")], key_share_size=20000, record_sizes=[16000]),
            "reset",
        ),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "reset"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "reset"),
    ],
    ids=["two-host-names", "duplicate-sni", "grease", "ech-outer-sni", "oversize", "not-tls", "server-hello"],
)
def test_odd_hellos(gate, origin, hello: bytes, expected: str) -> None:
    before = len(origin.recorded())
    sock = send_in_pieces(gate.ports["tls_record"], hello, [])
    if expected == "passed":
        wait_for_record(origin, before, len(hello))
        sock.close()
        assert origin.recorded()[before] == hello
    else:
        assert closed_by_peer(sock) == "reset"
        assert len(origin.recorded()) == before


def test_stalled_hello_fails_closed(gate, origin) -> None:
    hello = python_hello("example-filed.cn")
    before = len(origin.recorded())
    sock = send_in_pieces(gate.ports["tls_record"], hello[:100], [])
    started = time.monotonic()
    assert closed_by_peer(sock) == "reset"
    assert 1.5 < time.monotonic() - started < 8  # the test config's 2 s inspection timeout
    assert len(origin.recorded()) == before


def test_large_transfer_both_ways_is_byte_exact(gate, certs) -> None:
    """32 MB sent and echoed at once; one asyncio client (an SSL object must not be driven from
    two threads at once, which made an earlier threaded version of this test flaky)."""
    payload = os.urandom(32 * 1024 * 1024)
    context = ssl.create_default_context(cafile=str(certs["ca"]))

    async def transfer() -> str:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gate.ports["tls_echo"], ssl=context, server_hostname="example-filed.cn"
        )

        async def send() -> None:
            for offset in range(0, len(payload), 1 << 20):
                writer.write(payload[offset : offset + (1 << 20)])
                await writer.drain()

        sending = asyncio.create_task(send())
        echoed, received = hashlib.sha256(), 0
        while received < len(payload):
            chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
            assert chunk, "echo ended early"
            echoed.update(chunk)
            received += len(chunk)
        await sending
        writer.close()
        return echoed.hexdigest()

    assert asyncio.run(transfer()) == hashlib.sha256(payload).hexdigest()


def test_proxy_protocol_v1_towards_the_backend(gate, origin) -> None:
    hello = python_hello("example-filed.cn")
    before = len(origin.recorded())
    sock = send_in_pieces(gate.ports["proxy_v1"], hello, [])
    local_port = sock.getsockname()[1]
    header = b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (local_port, gate.ports["proxy_v1"])
    wait_for_record(origin, before, len(header) + len(hello))
    sock.close()
    assert origin.recorded()[before] == header + hello


def test_client_reset_mid_relay_leaves_the_gate_healthy(gate, certs) -> None:
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    for _ in range(20):
        raw = socket.create_connection(("127.0.0.1", gate.ports["tls_echo"]), timeout=10)
        tls = context.wrap_socket(raw, server_hostname="example-filed.cn")
        tls.sendall(os.urandom(256 * 1024))
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        tls.close()  # linger 0: the gate sees a reset mid-relay
    result = curl_https(gate.ports["tls"], "example-filed.cn", certs["ca"])
    assert result.returncode == 0


def wait_for_record(origin, index: int, size: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = origin.recorded()
        if len(records) > index and len(records[index]) >= size:
            return
        time.sleep(0.02)
    raise TimeoutError("the origin did not receive %d bytes" % size)
