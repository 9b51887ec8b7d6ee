"""Plaintext HTTP through the real gate: curl and raw sockets against a real origin."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
from gatekit import closed_by_peer, send_in_pieces


def curl(port: int, host: str, *args: str, path: str = "/") -> str:
    """curl's whole answer (status line, headers, body), CRLFs kept."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "10",
            "-H",
            "Host: %s" % host,
            *args,
            "http://127.0.0.1:%d%s" % (port, path),
        ],
        capture_output=True,
        timeout=20,
    )
    return result.stdout.decode()


def split_response(raw: str) -> tuple[int, dict[str, str], str]:
    head, _, body = raw.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the gate or origin closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(data)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    return received


def test_filed_site_is_relayed_untouched(gate) -> None:
    result = curl(gate.ports["http"], "www.example-filed.cn", path="/some/path?q=1")
    status, headers, body = split_response(result)
    assert status == 200
    assert "x-icp-gate" not in headers
    assert json.loads(body) == {
        "host": "www.example-filed.cn",
        "method": "GET",
        "path": "/some/path?q=1",
        "body_sha256": json.loads(body)["body_sha256"],
        "body_length": 0,
        "version": "1.1",
    }


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("example-unfiled.cn", "unfiled"),
        ("www.example-pending.cn", "pending"),
        ("example-elsewhere.cn", "filed_elsewhere"),
        ("example-cancelled.cn", "access_cancelled"),
        ("example-deregistered.cn", "deregistered"),
        ("example-limited.cn", "limited"),
        ("example-filed.cn.evil.net", "unfiled"),
        ("evilexample-filed.cn", "unfiled"),
    ],
)
def test_blocked_sites_get_the_block_page(gate, host: str, reason: str) -> None:
    status, headers, body = split_response(curl(gate.ports["http"], host))
    assert status == 403
    assert headers["cache-control"] == "no-store"
    assert headers["connection"] == "close"
    assert headers["content-type"] == "text/html; charset=utf-8"
    gate_header = headers["x-icp-gate"]
    assert gate_header.startswith("blocked; reason=%s; id=" % reason)
    request_id = gate_header.rsplit("id=", 1)[1]
    assert request_id in body
    assert host.lower() in body
    assert "noc@idc.example" in body


def test_json_answer_for_api_clients(gate) -> None:
    result = curl(gate.ports["http"], "www.example-pending.cn", "-H", "Accept: application/json")
    status, headers, body = split_response(result)
    facts = json.loads(body)
    assert status == 403 and headers["content-type"] == "application/json; charset=utf-8"
    assert facts["domain"] == "www.example-pending.cn"
    assert facts["reason"] == "pending"
    assert facts["licence"] == "京ICP备20240030号-1"
    assert facts["request_id"] == headers["x-icp-gate"].rsplit("id=", 1)[1]
    assert facts["action_required"]["en"] and facts["why"]["zh"]


def test_head_gets_headers_only(gate) -> None:
    raw = exchange(gate.ports["http"], b"HEAD / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ")
    assert int(split_response(raw.decode())[1]["content-length"]) > 1000
    assert body == b""


def test_ip_literal_passes_and_no_host_is_blocked(gate) -> None:
    assert split_response(curl(gate.ports["http"], "203.0.113.5"))[0] == 200
    raw = exchange(gate.ports["http"], b"GET / HTTP/1.0\r\n\r\n")
    assert b"reason=no_host" in raw and raw.startswith(b"HTTP/1.1 403")


def test_keep_alive_host_switching_is_checked_per_request(gate) -> None:
    sock = socket.create_connection(("127.0.0.1", gate.ports["http"]), timeout=10)
    sock.sendall(b"GET /one HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200") and b'"path": "/one"' in first
    sock.sendall(b"GET /two HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n")
    assert "reason=unfiled" in closed_by_peer(sock)


def test_pipelined_requests_stop_at_the_first_blocked_one(gate, origin) -> None:
    port = gate.ports["http_record"]
    before = len(origin.recorded())
    pipeline = (
        b"GET /a HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: example-filed.cn\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /c HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n"
        b"GET /d HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n"
    )
    sock = send_in_pieces(port, pipeline, [])
    # The recording origin never answers, so the gate waits for it to finish, then blocks.
    answer = closed_by_peer(sock, timeout=15)
    assert "reason=unfiled" in answer
    recorded = origin.recorded()[before:]
    assert recorded == [pipeline[: pipeline.index(b"GET /c")]]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: example-filed.cn\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: example-filed.cn\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: example-filed.cn\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: example-filed.cn\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nHost: example-unfiled.cn\r\n\r\n",
        b"GET http://example-filed.cn/ HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n folded: header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : example-filed.cn\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET / HTTP/1.1\r\nHost: exa mple.cn\r\n\r\n",
        # Other schemes in absolute-form: nginx routes on their authority too.
        b"GET ftp://example-unfiled.cn/ HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n",
        b"GET x://example-unfiled.cn/ HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n",
        # Bodies on Upgrade and CONNECT: read as the next request by a backend that does not switch.
        b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 44\r\n\r\nGET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n",
        # h2c and unknown protocols anywhere in the Upgrade token lists.
        b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Upgrade: h2c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: Upgrade\r\nUpgrade: TLS/1.0\r\n\r\n",
        # Raw bytes outside ASCII: UTS-46 would map them onto a filed name the backend never saw.
        b"GET / HTTP/1.1\r\nHost: www.ex\xaample-filed.cn\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: www.example-fi\xadled.cn\r\n\r\n",
        # Chunk extensions and bare LF in chunked framing: backends disagree on them.
        b"POST / HTTP/1.1\r\nHost: example-filed.cn\r\nTransfer-Encoding: chunked\r\n\r\n5;x\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: example-filed.cn\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    ],
)
def test_smuggling_and_malformed_requests_get_400(gate, request_bytes: bytes) -> None:
    raw = exchange(gate.ports["http"], request_bytes)
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert b"reason=invalid" in raw


def test_a_request_smuggled_after_a_chunked_body_is_checked(gate) -> None:
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: example-filed.cn\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n"
    )
    raw = exchange(gate.ports["http"], smuggle)
    first, _, rest = raw.partition(b"HTTP/1.1 403 ")
    assert first.startswith(b"HTTP/1.1 200") and b"reason=unfiled" in rest


def test_absolute_form_target_wins(gate) -> None:
    raw = exchange(gate.ports["http"], b"GET http://example-unfiled.cn/ HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n")
    assert b"reason=unfiled" in raw
    raw = exchange(
        gate.ports["http"],
        b"GET http://Example-Filed.cn:80/x HTTP/1.1\r\nHost: example-filed.cn:80\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200")


def test_oversize_headers_are_refused(gate) -> None:
    raw = exchange(gate.ports["http"], b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nX: " + b"a" * 40000 + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400") and b"reason=invalid" in raw


def test_slowloris_header_is_blocked_after_the_timeout(gate) -> None:
    sock = socket.create_connection(("127.0.0.1", gate.ports["http"]), timeout=10)
    started = time.monotonic()
    sock.sendall(b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n")
    for _ in range(3):
        time.sleep(0.5)
        sock.sendall(b"X-Slow: 1\r\n")
    answer = closed_by_peer(sock)
    assert answer.startswith("HTTP/1.1 400") and "reason=invalid" in answer
    assert 1.5 <= time.monotonic() - started < 8


def test_h2c_is_refused(gate) -> None:
    preface = exchange(gate.ports["http"], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert preface.startswith(b"HTTP/1.1 400")
    upgrade = exchange(
        gate.ports["http"],
        b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: Upgrade, HTTP2-Settings"
        b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    assert upgrade.startswith(b"HTTP/1.1 400") and b"reason=invalid" in upgrade
    connect = exchange(
        gate.ports["http"], b"CONNECT example-filed.cn:443 HTTP/1.1\r\nHost: example-filed.cn:443\r\n\r\n"
    )
    assert connect.startswith(b"HTTP/1.1 400")


def test_websocket_is_relayed_after_the_check(gate) -> None:
    import asyncio

    import aiohttp

    async def talk(host: str) -> str:
        async with aiohttp.ClientSession() as session:
            url = "http://127.0.0.1:%d/ws" % gate.ports["http"]
            async with session.ws_connect(url, headers={"Host": host}) as ws:
                await ws.send_str("ping")
                reply = await ws.receive_str(timeout=5)
                await ws.send_bytes(b"\x00" * 100000)
                assert (await ws.receive_bytes(timeout=5)) == b"\x00" * 100000
                return reply

    assert asyncio.run(talk("example-filed.cn")) == "echo: ping"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        asyncio.run(talk("example-unfiled.cn"))
    assert refused.value.status == 403


def test_large_upload_is_relayed_byte_exact(gate) -> None:
    import hashlib
    import os

    body = os.urandom(20 * 1024 * 1024)
    for framing in ([], ["-H", "Transfer-Encoding: chunked"]):  # Content-Length, then chunked
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "60", "-H", "Host: example-filed.cn", *framing, "--data-binary", "@-",
             "http://127.0.0.1:%d/upload" % gate.ports["http"]],
            input=body, capture_output=True, timeout=90,
        )  # fmt: skip
        facts = json.loads(result.stdout)
        assert (facts["body_length"], facts["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def test_proxy_protocol_v2_towards_the_backend(gate, origin) -> None:
    before = len(origin.recorded())
    sock = send_in_pieces(gate.ports["proxy_v2"], b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n", [])
    wait_until(lambda: len(origin.recorded()) > before and origin.recorded()[before].endswith(b"\r\n\r\n"))
    sock.close()
    record = origin.recorded()[before]
    assert record.startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c")
    assert record[16:20] == socket.inet_aton("127.0.0.1")
    assert record.endswith(b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def test_bytes_after_the_backend_closed_end_the_connection_cleanly(gate) -> None:
    sock = socket.create_connection(("127.0.0.1", gate.ports["http"]), timeout=10)
    sock.sendall(b"GET /a HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n")
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n")
        assert sock.recv(65536) == b""
    except OSError:
        pass  # reset: the gate closed both ends once the backend was done
    sock.close()
    time.sleep(0.3)
    assert "Traceback" not in gate.log()


def test_a_head_begun_behind_an_allowed_one_has_its_own_deadline(gate) -> None:
    sock = socket.create_connection(("127.0.0.1", gate.ports["http_record"]), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n")
    time.sleep(0.3)
    started = time.monotonic()
    sock.sendall(b"\r\nGET /second HTTP/1.1\r\nHost: example-filed.cn\r\nX: ")
    answer = closed_by_peer(sock)
    assert "reason=invalid" in answer and time.monotonic() - started < 8


def test_a_flood_of_empty_lines_before_a_request_is_refused(gate) -> None:
    raw = exchange(gate.ports["http"], b"\r\n" * 1000 + b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400") and b"reason=invalid" in raw


def test_a_request_refused_behind_a_closing_one_comes_after_its_answer(gate) -> None:
    raw = exchange(
        gate.ports["http"],
        b"GET /a HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200") and b'"path": "/a"' in raw and b'"path": "/b"' not in raw
