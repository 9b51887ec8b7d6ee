"""The `auto` listeners' classifier: which first bytes are TLS, HTTP or another protocol.

Every case is fed whole, one byte at a time, and (for the undecided ones) ended by EOF, so the
answer cannot depend on how the client cut its writes.
"""

from __future__ import annotations

import time

import pytest
from gatekit import python_hello

from icpgate.gate.sniff import Protocol, Sniffer

TLS, HTTP, OTHER = Protocol.TLS, Protocol.HTTP, Protocol.OTHER


def whole(data: bytes, max_size: int = 32768) -> Protocol | None:
    return Sniffer(max_size).feed(data)


def bytewise(data: bytes, max_size: int = 32768) -> Protocol | None:
    """Feed one byte at a time; the answer must come at the first byte that settles it, and stay."""
    sniffer = Sniffer(max_size)
    for index in range(len(data)):
        answer = sniffer.feed(data[index : index + 1])
        if answer is not None:
            return answer
    return None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (python_hello("example-filed.cn"), TLS),
        (b"\x16\x03\x01\x02\x00", TLS),
        (b"\x16\x03\x00", TLS),
        (b"\x16\x03\x04", TLS),
        # OpenSSL reads the first record of any 3.x version: the TLS path judges (and refuses) these.
        (b"\x16\x03\x05\x00\x10", TLS),
        (b"\x16\x03\xff", TLS),
        # SSLv2-compatible ClientHello: no SNI possible, the TLS path refuses it.
        (b"\x80\x2e\x01\x03\x01", TLS),
        (b"\x16\x02\x00", OTHER),
        (b"\x16\x00", OTHER),
        (b"\x17\x03\x03\x00\x10", OTHER),
        (b"\x80\x2e\x02\x03\x01", OTHER),
        (b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n", HTTP),
        (b"POST /form HTTP/1.0\r\n", HTTP),
        (b"get / http/1.1\r\n", HTTP),  # lower case: the HTTP path refuses it, as an http listener does
        (b"FOO /x HTTP/1.1\r\n", HTTP),  # an unknown method: refused there too
        (b"GET http://example-unfiled.cn/\r\n", HTTP),  # HTTP/0.9 with an absolute URL
        (b"GET /\r\n", HTTP),  # HTTP/0.9: nginx serves its default server
        (b"GET /\n", HTTP),
        (b"GET\t/ HTTP/1.1\r\n", HTTP),
        (b"OPTIONS * HTTP/1.1\r\n", HTTP),
        (b"CONNECT example-unfiled.cn:443\r\n", HTTP),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HTTP),
        (b"\r\nGET / HTTP/1.1\r\n", HTTP),  # leading empty lines: the HTTP path allows two runs
        (b"\n", HTTP),
        (b" GET / HTTP/1.1\r\n", HTTP),
        (b"SSH-2.0-OpenSSH_9.6\r\n", OTHER),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", OTHER),
        (b"EHLO mail.example.cn\r\n", OTHER),
        (b"USER anonymous\r\n", OTHER),
        (b"a001 LOGIN user secret\r\n", OTHER),
        (b"get key\r\n", OTHER),  # memcached
        (b"DESCRIBE rtsp://cam.example/live RTSP/1.0\r\n", OTHER),
        (b"INVITE sip:bob@example.cn SIP/2.0\r\n", OTHER),
        (b"GET rtsp://example-unfiled.cn/\r\n", HTTP),  # two words: HTTP/0.9, nginx routes any scheme
        (b"GET HTTP://example-unfiled.cn/ FOO/1.1\r\n", HTTP),
        (b"GET /x FOO/1.1\r\n", HTTP),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", OTHER),  # PostgreSQL SSLRequest
        (b"\xff\xfd\x03", OTHER),  # telnet IAC: high bit, not an SSLv2 hello
        (b"\xff\xfd\x01", OTHER),  # IAC DO ECHO: message type 1, but a length no SSLv2 record has
        (b"\xdf\xff\x01", TLS),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 40000 80\r\nGET / HTTP/1.1\r\n", HTTP),
        (b"PROXY UNKNOWN\r\n", HTTP),
        (b"hello", None),  # a token without its space: still a possible method
        (b"GET", None),
        (b"GET / HTTP/1.1", None),  # the first line without its LF
        (b"\x16", None),
        (b"\x80\x2e", None),
    ],
)
def test_first_bytes(data: bytes, expected: Protocol | None) -> None:
    assert whole(data) is expected
    assert bytewise(data) is expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hello", OTHER),  # a lone token and EOF: no request
        (b"\x16", OTHER),
        (b"\x16\x03", TLS),
        (b"GET / HTTP/1.1", HTTP),  # judged as it stands: the HTTP path reads it, then closes
        (b"GET http://example-unfiled.cn/", HTTP),
        (b"EHLO mail", OTHER),
        (b"GET", OTHER),
    ],
)
def test_eof_judges_the_prefix_as_it_stands(data: bytes, expected: Protocol) -> None:
    sniffer = Sniffer(32768)
    sniffer.feed(data)
    assert sniffer.at_end() is expected


def test_an_undecided_prefix_over_the_cap_goes_to_the_http_path() -> None:
    """A token, or a first line, longer than the header cap: the HTTP path refuses it as oversized."""
    assert whole(b"A" * 101, max_size=100) is HTTP
    assert whole(b"GET /" + b"a" * 100, max_size=100) is HTTP
    assert whole(b"A" * 100, max_size=100) is None


def _bytewise_cpu(data: bytes) -> float:
    started = time.process_time()
    assert bytewise(data, max_size=len(data)) is None
    return time.process_time() - started


@pytest.mark.parametrize("prefix", [b"A", b"GET /"], ids=["token", "first-line"])
def test_bytewise_scanning_is_linear(prefix: bytes) -> None:
    """A client writing one byte at a time: four times the bytes cost about four times the CPU
    (a rescan per byte would cost sixteen times). A CPU-time comparison within one run."""
    small = prefix + b"a" * (16384 - len(prefix))
    large = prefix + b"a" * (65536 - len(prefix))
    ratio = min(_bytewise_cpu(large) for _ in range(3)) / max(min(_bytewise_cpu(small) for _ in range(3)), 1e-6)
    assert ratio < 8, ratio
