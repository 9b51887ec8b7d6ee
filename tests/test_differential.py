"""Differential tests: the gate in front of real nginx and real Apache httpd.

A request the gate decides on one name but a backend routes to another is a bypass, so every
generated request is sent through the gate to a real server whose virtual hosts name themselves
(tests/backends.py), and the answers are held to one invariant: whatever the gate lets through is
served by the virtual host of the name the gate must decide on, and no unfiled virtual host is
ever served. Refusing is always allowed (the gate fails closed); plain filed requests must be served.

The generator is seeded and bounded: the same few hundred byte strings every run, each printed
(repr) in the assertion message that fails on it.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import pytest
import trustme
from backends import Backend, start_apache, start_nginx
from cryptography import x509
from gatekit import Gate, free_port, gate_config, handshake_records, listener, send_in_pieces, start_gate
from tls13_client import retry_handshake

from conftest import check_json
from icpgate.names.hostname import HostKind, normalize_host

SEED = 20261122
FILED = ("example-filed.cn", "www.example-filed.cn", "example-shop.cn", "example-blog.net")
UNFILED = ("unfiled-example.com", "www.unfiled-example.com", "example-unfiled.cn")
VHOSTS = FILED + UNFILED
SMUGGLED = b"GET / HTTP/1.1\r\nHost: unfiled-example.com\r\n\r\n"
FAKE_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
H2_SETTINGS = b"AAMAAABkAAQAAP__"
INSPECT_TIMEOUT = 5.0  # long, so a blocked pipelined request that waits for it shows
PROMPT = 2.0  # a block must arrive well before the inspect timeout
READ_DEADLINE = 3.0
MAX_FAILURES = 25
SERVED = re.compile(rb"served host=[^\n]*? server=([a-z0-9.-]+)")
# A static file for the response-boundary attack: any slice of it that starts at an even offset
# has "101" at bytes 9-11. Larger than what loopback socket buffers hold (4 MiB send buffers on
# both hops), so part of it is still at nginx when the client sends the next request.
BIG_FILE_SIZE = 24 << 20


# --- the model: which virtual host a request may reach ---------------------------------------------
def route(raw: bytes) -> str | None:
    """The virtual host a request for this Host/authority may be served by, or None when the gate
    must refuse it. Non-ASCII bytes are refused (Unicode names travel as A-labels)."""
    if any(byte >= 0x80 for byte in raw):
        return None
    host = normalize_host(raw.decode("ascii"))
    if host.kind is HostKind.INVALID:
        return None
    if host.kind is not HostKind.NAME:
        return "default"  # IP literals are allowed by the default pack and match no vhost
    return host.value if host.value in FILED else None


def same_name(a: bytes, b: bytes) -> bool:
    if any(byte >= 0x80 for byte in a + b):
        return False
    first, second = normalize_host(a.decode("ascii")), normalize_host(b.decode("ascii"))
    return first.kind is not HostKind.INVALID and first.value == second.value


@dataclass
class Request:
    raw: bytes
    expect: str | None  # the vhost that may serve it; None: it must never reach a backend


@dataclass
class Variant:
    name: str
    requests: list[Request]
    must_serve: bool = False  # a plain filed request: refusing it is a failure too

    @property
    def wire(self) -> bytes:
        return b"".join(r.raw for r in self.requests)

    @property
    def methods(self) -> list[bytes]:
        return [r.raw.split(b" ", 1)[0] for r in self.requests]

    @property
    def expects_block(self) -> bool:
        return any(r.expect is None for r in self.requests)


def request(
    host: bytes | None,
    *,
    method: bytes = b"GET",
    target: bytes = b"/",
    version: bytes = b"HTTP/1.1",
    headers: list[bytes] | None = None,
    body: bytes = b"",
    host_line: bytes | None = None,
) -> bytes:
    lines = [b"%s %s %s" % (method, target, version)]
    if host_line is not None:
        lines.append(host_line)
    elif host is not None:
        lines.append(b"Host: " + host)
    lines += headers or []
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def plain(host: bytes, path: bytes = b"/") -> Request:
    return Request(request(host, target=path), route(host))


# --- the generator ---------------------------------------------------------------------------------
def spelling(rng: random.Random, name: str) -> bytes:
    """The same name as a client may write it: case, a trailing dot, a port."""
    text = name
    roll = rng.random()
    if roll < 0.2:
        text = text.upper()
    elif roll < 0.35:
        text = "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    if rng.random() < 0.15:
        text += "."
    if rng.random() < 0.2:
        text += rng.choice([":80", ":443", ":8080"])
    return text.encode()


def any_name(rng: random.Random) -> str:
    return rng.choice(FILED if rng.random() < 0.6 else UNFILED)


def follower(rng: random.Random) -> list[Request]:
    """Maybe one more pipelined request, filed or not: it shows where the backend thinks the
    previous request ended."""
    roll = rng.random()
    if roll < 0.35:
        return []
    return [plain(spelling(rng, any_name(rng)), b"/next")]


SCHEMES = [b"http", b"HTTP", b"Http", b"https", b"HTTPS", b"hTTpS", b"ftp", b"FTP", b"ws", b"wss", b"WS", b"x", b"h2c"]


def gen_absolute_form(rng: random.Random) -> Variant:
    """Bypass 1: the request-line authority against the Host header, any scheme."""
    scheme = rng.choice(SCHEMES)
    authority_name = any_name(rng)
    authority = spelling(rng, authority_name)
    if rng.random() < 0.1:  # userinfo: the name after the @ is the host
        authority = spelling(rng, any_name(rng)) + b"@" + authority
    roll = rng.random()
    if roll < 0.3:
        host: bytes | None = authority
    elif roll < 0.5:
        host = spelling(rng, authority_name)
    elif roll < 0.9:
        host = spelling(rng, any_name(rng))
    else:
        host = None
    path = rng.choice([b"/", b"/a?b=c", b""])
    target = scheme + b"://" + authority + path
    if scheme.lower() in (b"http", b"https"):
        agree = host is None or same_name(host, authority)
        expect = route(authority) if agree else None
    else:
        expect = None
    return Variant(
        "absolute %r host %r" % (target, host), [Request(request(host, target=target), expect), *follower(rng)]
    )


def gen_target_forms(rng: random.Random) -> Variant:
    """Request targets that are neither origin-form nor absolute-form: `*` (OPTIONS only),
    authority-form (CONNECT only), scheme-less names, and paths that look like authorities."""
    host = spelling(rng, any_name(rng))
    other = spelling(rng, any_name(rng))
    method, target, allowed = rng.choice(
        [
            (b"OPTIONS", b"*", True),
            (b"GET", b"*", False),
            (b"GET", other + b":80", False),
            (b"GET", other + b"/", False),
            (b"GET", b"//" + other + b"/", True),
            (b"GET", b"/http://" + other + b"/", True),
            (b"GET", b"http:/" + other + b"/", False),
            (b"GET", b"http:" + other + b"/", False),
            (b"GET", b"http:///" + other + b"/", False),
            (b"GET", b"http://" + b"/" + other, False),
            (b"CONNECT", b"/", False),
            (b"OPTIONS", b"http://" + other, None),
        ]
    )
    expect = route(host) if allowed else None
    if allowed is None:  # absolute-form: the authority is decided and Host must agree
        expect = route(other) if same_name(host, other) else None
    return Variant("target %r %r" % (method, target), [Request(request(host, method=method, target=target), expect)])


def gen_host_forms(rng: random.Random) -> Variant:
    """Header case and whitespace, duplicates, HTTP/1.0 without Host, IP literals, hosts with
    delimiters in them, bare line feeds in the head."""
    name = any_name(rng)
    kind = rng.randrange(9)
    if kind == 0:
        header = rng.choice([b"host", b"HOST", b"hOsT", b"Host"])
        ows = rng.choice([b"", b" ", b"  ", b"\t", b" \t"])
        trail = rng.choice([b"", b" ", b"\t"])
        value = spelling(rng, name)
        first = Request(request(None, host_line=header + b":" + ows + value + trail), route(value))
    elif kind == 1:
        other = spelling(rng, any_name(rng))
        first = Request(request(None, host_line=b"Host: %s\r\nHost: %s" % (spelling(rng, name), other)), None)
    elif kind == 2:
        first = Request(request(None, version=b"HTTP/1.0"), None)
    elif kind == 3:
        value = spelling(rng, name)
        headers = [b"Connection: keep-alive"] if rng.random() < 0.5 else []
        first = Request(request(value, version=b"HTTP/1.0", headers=headers), route(value))
    elif kind == 4:
        first = Request(request(None, host_line=b"Host : " + spelling(rng, name)), None)
    elif kind == 5:
        value = rng.choice([b"127.0.0.1", b"127.0.0.1:80", b"[::1]", b"[::1]:8080"])
        first = Request(request(value), route(value))
    elif kind == 6:
        value = rng.choice(ODD_HOSTS)
        first = Request(request(value), route(value))
    elif kind == 7:
        return bare_line_feeds(rng)
    else:
        value = spelling(rng, name)
        line = rng.choice(
            [b"GET  / HTTP/1.1", b"GET / HTTP/1.1 ", b"GET /\tHTTP/1.1", b"GET / HTTP/1.10", b"GET / HTTP/2.0"]
        )
        first = Request(line + b"\r\nHost: " + value + b"\r\n\r\n", route(value))
    return Variant("host form", [first, *follower(rng)])


# Hosts with delimiters a backend may cut the name at, or read past.
ODD_HOSTS = [
    b"",
    b" ",
    b"a..b",
    b"example-filed.cn example-shop.cn",
    b"example-filed.cn@unfiled-example.com",
    b"unfiled-example.com@example-filed.cn",
    b"unfiled-example.com#.example-filed.cn",
    b"example-filed.cn/unfiled-example.com",
    b"unfiled-example.com/.example-filed.cn",
    b"example-filed.cn:80:80",
    b"example-filed.cn,unfiled-example.com",
    b"example-filed.cn\\unfiled-example.com",
    b"unfiled-example.com%2eexample-filed.cn",
    b"example-filed.cn\x00unfiled-example.com",
    b"example-filed.cn:",
    b"example-filed.cn:http",
    b"[example-filed.cn]",
]


def bare_line_feeds(rng: random.Random) -> Variant:
    """A line feed without its carriage return ends a line for nginx; a head read as one request
    by the gate must not be two requests (or two Hosts) at the backend."""
    filed, unfiled = spelling(rng, rng.choice(FILED)), spelling(rng, rng.choice(UNFILED))
    kind = rng.randrange(5)
    if kind == 0:
        first = Request(b"GET / HTTP/1.1\nHost: " + filed + b"\r\n\r\n", route(filed))
        return Variant("host form bare LF", [first, *follower(rng)])
    if kind == 1:
        raw = b"GET / HTTP/1.1\r\nHost: " + filed + b"\r\nX: y\nHost: " + unfiled + b"\r\n\r\n"
        return Variant("host form bare LF", [Request(raw, None)])
    if kind == 2:
        raw = b"GET / HTTP/1.1\r\nX: y\nHost: " + unfiled + b"\r\n\r\n"
        return Variant("host form bare LF", [Request(raw, None)])
    if kind == 3:
        head = b"GET / HTTP/1.1\r\nHost: " + filed + b"\r\n\n"
        return Variant("host form bare LF", [Request(head, route(filed)), plain(unfiled)])
    head = b"GET / HTTP/1.1\nHost: " + filed + b"\n\n"
    return Variant("host form bare LF", [Request(head, route(filed)), plain(unfiled)])


def non_ascii(rng: random.Random, name: str) -> bytes:
    """A filed name with a byte >= 0x80 in it that UTS-46 maps away (read as latin-1: the ordinal
    indicators ª and º become "a" and "o", a soft hyphen disappears) or that is UTF-8 for an
    invisible or look-alike character; a backend reads it as another name."""
    raw = name.encode()
    roll = rng.random()
    if roll < 0.3 and b"a" in raw:
        position = rng.choice([i for i, c in enumerate(raw) if c == ord("a")])
        return raw[:position] + b"\xaa" + raw[position + 1 :]
    if roll < 0.45 and b"o" in raw:
        position = rng.choice([i for i, c in enumerate(raw) if c == ord("o")])
        return raw[:position] + b"\xba" + raw[position + 1 :]
    insert = rng.choice([b"\xad", b"\xad", b"\xc2\xad", b"\xe2\x80\x8b", b"\xef\xbc\x8e"])
    position = rng.randrange(1, len(raw))
    return raw[:position] + insert + raw[position:]


def gen_non_ascii(rng: random.Random) -> Variant:
    """Bypass 8: bytes >= 0x80 in Host or in an absolute-form authority, around filed names."""
    name = rng.choice(FILED)
    raw = non_ascii(rng, name)
    scheme = rng.choice([b"http", b"https", b"HTTP"])
    kind = rng.randrange(4)
    if kind == 0:
        first = request(raw)
    elif kind == 1:
        first = request(raw, target=scheme + b"://" + raw + b"/")
    elif kind == 2:
        first = request(name.encode(), target=scheme + b"://" + raw + b"/")
    else:
        first = request(raw, target=scheme + b"://" + name.encode() + b"/")
    return Variant("nonascii %r" % raw, [Request(first, None), *follower(rng)])


UPGRADE_TOKENS = [b"websocket", b"WebSocket", b"h2c", b"H2C", b"TLS/1.0", b"HTTP/2.0", b"foo", b"websocket/13"]


def gen_upgrade(rng: random.Random) -> Variant:
    """Bypass 4: h2c (or anything but websocket) hidden in Upgrade token lists or repeated headers."""
    name = rng.choice(FILED) if rng.random() < 0.85 else rng.choice(UNFILED)
    host = spelling(rng, name)
    upgrade_headers = []
    tokens = []
    for _ in range(rng.choice([1, 1, 2])):
        chosen = [rng.choice(UPGRADE_TOKENS) for _ in range(rng.choice([1, 1, 2, 3]))]
        tokens += chosen
        upgrade_headers.append(b"Upgrade: " + rng.choice([b", ", b",", b" , ", b" ,"]).join(chosen))
    connection = rng.choice([b"Upgrade", b"upgrade", b"Upgrade, HTTP2-Settings", b"keep-alive, Upgrade", None])
    headers = list(upgrade_headers)
    if connection is not None:
        headers.append(b"Connection: " + connection)
    if rng.random() < 0.6:
        headers.append(b"HTTP2-Settings: " + H2_SETTINGS)
    if rng.random() < 0.4:
        headers += [b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13"]
    rng.shuffle(headers)
    allowed = all(t.lower() == b"websocket" for t in tokens)
    first = Request(request(host, headers=headers), route(host) if allowed else None)
    return Variant("upgrade %r" % tokens, [first, *follower(rng)])


def gen_switch_with_body(rng: random.Random) -> Variant:
    """Bypass 2: Upgrade and CONNECT requests carrying a body. A gate that holds the body until
    the switch is answered and then reads it as requests disagrees with a backend that skips it
    as a body: a filed POST head inside the body makes the gate swallow the unfiled request
    behind it as that POST's body, while the backend reads it as a request."""
    host = spelling(rng, rng.choice(FILED))
    nested = b"POST /inner HTTP/1.1\r\nHost: example-filed.cn\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
    content = rng.choice([SMUGGLED, FAKE_101 + SMUGGLED, b"hello", SMUGGLED * 2, nested, nested])
    framing = rng.choice(["length", "chunked", "zero"])
    if framing == "length":
        headers, body = [b"Content-Length: %d" % len(content)], content
    elif framing == "chunked":
        headers, body = [b"Transfer-Encoding: chunked"], b"%x\r\n%s\r\n0\r\n\r\n" % (len(content), content)
    else:
        headers, body = [b"Content-Length: 0"], b""
    if rng.random() < 0.7:
        method, target = rng.choice([b"GET", b"POST"]), b"/"
        headers += [b"Upgrade: websocket", b"Connection: Upgrade"]
        expect = route(host) if framing == "zero" else None
    else:
        method, target = b"CONNECT", host if b":" in host else host + b":443"
        expect = None  # the default pack refuses CONNECT
    first = Request(request(host, method=method, target=target, headers=headers, body=body), expect)
    # The body is not a request of ours; if a backend reads it as one, it is an extra answer.
    rest = [Request(SMUGGLED, None)] if content == nested and framing != "zero" else follower(rng)
    return Variant("switch with body %s %r" % (framing, method), [first, *rest])


def body_request(rng: random.Random, host: bytes) -> Request:
    content = rng.choice([SMUGGLED, FAKE_101, b"HTTP/1.1 101\r\n\r\n" * 3, b"x" * rng.randrange(1, 300), b"\n" * 50])
    if rng.random() < 0.5:
        raw = request(host, method=b"POST", headers=[b"Content-Length: %d" % len(content)], body=content)
    else:
        raw = request(host, method=b"POST", headers=[b"Transfer-Encoding: chunked"], body=chunked(rng, content))
    return Request(raw, route(host))


def gen_pipeline(rng: random.Random) -> Variant:
    """Bypass 5: several requests in one write, filed then unfiled, bodies that look like
    responses, chunked answers, HEAD and Expect: 100-continue; an allowed Upgrade in the middle
    that the backend answers without switching."""
    requests: list[Request] = []
    for _ in range(rng.randrange(2, 6)):
        host = spelling(rng, any_name(rng))
        kind = rng.randrange(7)
        if kind == 6:  # nginx answers with a chunked body that mentions 101
            requests.append(plain(host, b"/chunked/HTTP/1.1%%20101/%d" % len(requests)))
        elif kind == 0:
            requests.append(plain(host, b"/p%d" % len(requests)))
        elif kind == 4:  # an answer with Content-Length and no body
            requests.append(Request(request(host, method=b"HEAD"), route(host)))
        elif kind == 5:  # nginx and Apache answer at once; a 100 Continue would come first
            headers = [b"Expect: 100-continue", b"Content-Length: 5"]
            requests.append(Request(request(host, method=b"POST", headers=headers, body=b"hello"), route(host)))
        elif kind == 1:
            requests.append(body_request(rng, host))
        elif kind == 2:
            headers = [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13"]
            requests.append(Request(request(host, headers=headers), route(host)))
        else:
            requests.append(plain(host, b"/101?HTTP/1.1%20101"))
    return Variant("pipeline", requests)


def chunked(rng: random.Random, content: bytes) -> bytes:
    """A well-formed chunked body: odd size spellings, trailers and, in some, chunk extensions."""
    out, offset = b"", 0
    extensions = [b"", b";a=b", b";x", b' ; name="v;x"', b";a=b;c=d"] if rng.random() < 0.3 else [b""]
    while offset < len(content):
        size = min(len(content) - offset, rng.randrange(1, 64))
        spelled = rng.choice([b"%x", b"%X", b"0%x", b"000%x"]) % size
        extension = rng.choice(extensions)
        out += spelled + extension + b"\r\n" + content[offset : offset + size] + b"\r\n"
        offset += size
    trailer = rng.choice([b"", b"X-Trailer: 1\r\n"])
    return out + rng.choice([b"0", b"000"]) + b"\r\n" + trailer + b"\r\n"


def gen_chunked(rng: random.Random) -> Variant:
    """Chunked bodies: extensions, newlines, sizes, and spellings backends disagree on (bare LF,
    spaces in the size line), each followed by a request that shows where the body ended."""
    host = spelling(rng, rng.choice(FILED))
    content = rng.choice([b"\n" * rng.randrange(1, 200), b"a\r\nb\n" * 10, SMUGGLED, b"0\r\n\r\n" + SMUGGLED])
    if rng.random() < 0.6:
        body = chunked(rng, content)
    else:
        size = b"%x" % len(content)
        body = rng.choice(
            [
                size + b"\n" + content + b"\n0\n\n",
                size + b" \r\n" + content + b"\r\n0\r\n\r\n",
                size + b"\r\n" + content + b"\r\n0\r\n",
                b"0x" + size + b"\r\n" + content + b"\r\n0\r\n\r\n",
                size + b";\r\n" + content + b"\r\n0\r\n\r\n",
                b"-" + size + b"\r\n" + content + b"\r\n0\r\n\r\n",
            ]
        )
    first = Request(request(host, method=b"POST", headers=[b"Transfer-Encoding: chunked"], body=body), route(host))
    return Variant("chunked", [first, plain(spelling(rng, any_name(rng)), b"/after")])


CONTENT_LENGTHS = [
    b"5",
    b"05",
    b" 5",
    b"5 ",
    b"5,5",
    b"5, 5",
    b"+5",
    b"0x5",
    b"5\t",
    b"-5",
    b"5.0",
    b"5\r\nContent-Length: 5",
]
TRANSFER_CODINGS = [
    b"chunked",
    b"Chunked",
    b"CHUNKED",
    b"chunked ",
    b"\tchunked",
    b"chunked, chunked",
    b"identity, chunked",
    b"gzip, chunked",
    b"chunked, identity",
    b"xchunked",
    b"chunked;q=1",
    b"chunked\r\nTransfer-Encoding: chunked",
    b"chunked\r\nContent-Length: 5",
]


def gen_framing(rng: random.Random) -> Variant:
    """Content-Length and Transfer-Encoding spellings a gate and a backend may read differently:
    an unfiled request right behind the body shows where each thought the body ended."""
    host = spelling(rng, rng.choice(FILED))
    roll = rng.random()
    if roll < 0.45:
        headers, body = [b"Content-Length: " + rng.choice(CONTENT_LENGTHS)], b"hello"
    elif roll < 0.9:
        headers, body = [b"Transfer-Encoding: " + rng.choice(TRANSFER_CODINGS)], b"5\r\nhello\r\n0\r\n\r\n"
    else:
        name = rng.choice([b"Transfer_Encoding", b"Content_Length", b"Content-Length ", b"Transfer-Encoding "])
        headers, body = [name + b": " + (b"5" if b"Length" in name else b"chunked")], b"hello"
    smuggled = request(spelling(rng, rng.choice(UNFILED)), target=b"/smuggled")
    first = Request(request(host, method=b"POST", headers=headers, body=body), route(host))
    return Variant("framing %r" % headers, [first, Request(smuggled, None)])


def gen_plain(rng: random.Random) -> Variant:
    """Positive control: plain filed requests, alone or pipelined, must be served."""
    requests = [plain(spelling(rng, rng.choice(FILED)), b"/c%d" % i) for i in range(rng.randrange(1, 4))]
    return Variant("plain", requests, must_serve=True)


GENERATORS: list[tuple[Callable[[random.Random], Variant], int]] = [
    (gen_plain, 20),
    (gen_absolute_form, 60),
    (gen_target_forms, 24),
    (gen_host_forms, 40),
    (gen_non_ascii, 30),
    (gen_upgrade, 60),
    (gen_switch_with_body, 30),
    (gen_pipeline, 40),
    (gen_chunked, 40),
    (gen_framing, 40),
]


def variants(seed: int) -> list[Variant]:
    rng = random.Random(seed)
    return [generate(rng) for generate, count in GENERATORS for _ in range(count)]


# --- reading what came back ------------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    raw: bytes  # after a 101 the rest is the switched connection, left in Exchange.data
    head: bool = False  # the answer to a HEAD request: no body, the vhost named in a header

    @property
    def served_by(self) -> str | None:
        """The vhost that served it, from the body (a backend's own 400 page names no vhost); for
        HEAD, from X-Served-By of a served answer (nginx 200, Apache's ErrorDocument 404)."""
        if self.head:
            value = self.headers.get(b"x-served-by") if self.status in (200, 404) else None
            return value.decode("latin-1").lower() if value else None
        found = SERVED.search(self.raw)
        return found.group(1).decode() if found else None

    @property
    def gate(self) -> str:
        return self.headers.get(b"x-icp-gate", b"").decode("latin-1")


@dataclass
class Exchange:
    data: bytes
    elapsed: float
    ended: str  # "closed", "reset" or "timeout"
    responses: list[Response] = field(default_factory=list)
    leftover: bytes = b""


def split_responses(data: bytes, methods: list[bytes]) -> tuple[list[Response], bytes]:
    """HTTP/1.1 responses by their framing (`methods`: of the requests in order, for HEAD);
    interim 1xx answers are skipped; after a 101 the rest is tunnel data."""
    responses: list[Response] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\r\n\r\n", offset)
        match = re.match(rb"HTTP/1\.[01] (\d{3})", data[offset : offset + 12])
        if end < 0 or match is None:
            break
        head = data[offset:end]
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), value.strip())
        status, body_start = int(match.group(1)), end + 4
        head = len(responses) < len(methods) and methods[len(responses)] == b"HEAD"
        if status == 101:
            responses.append(Response(status, headers, data[offset:body_start]))
            return responses, b""
        if 100 <= status < 200:
            offset = body_start
            continue
        if head or status in (204, 304):
            body_end = body_start
        elif b"content-length" in headers:
            body_end = body_start + int(headers[b"content-length"])
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body_end = _chunked_end(data, body_start)
        else:
            body_end = len(data)
        responses.append(Response(status, headers, data[offset:body_end], head))
        offset = body_end
    return responses, data[offset:]


def _chunked_end(data: bytes, offset: int) -> int:
    while True:
        line_end = data.find(b"\r\n", offset)
        if line_end < 0:
            return len(data)
        size = int(data[offset:line_end].split(b";")[0] or b"0", 16)
        offset = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n\r\n", offset - 2)
            return len(data) if trailer_end < 0 else trailer_end + 4
        offset += size + 2


def exchange(variant: Variant, port: int, *, half_close: bool, deadline: float = READ_DEADLINE) -> Exchange:
    """Send the variant's bytes in one write and read until the gate ends the connection."""
    wire = variant.wire
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data, ended = b"", "closed"
    try:
        sock.sendall(wire)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        while True:
            sock.settimeout(max(0.01, deadline - (time.monotonic() - started)))
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        ended = "timeout"
    except (ConnectionResetError, BrokenPipeError):
        ended = "reset"
    finally:
        sock.close()
    result = Exchange(data, time.monotonic() - started, ended)
    result.responses, result.leftover = split_responses(data, variant.methods)
    return result


def served_names(data: bytes) -> set[str]:
    """Every vhost named anywhere in the answer, tunnels included (h2 DATA frames carry the body)."""
    return {m.decode() for m in SERVED.findall(data)}


def violations(variant: Variant, result: Exchange, filed: set[str]) -> list[str]:
    """What breaks the invariant in one exchange; empty when the gate behaved."""
    problems = []
    unfiled = sorted(n for n in served_names(result.data) if n != "default" and n not in filed)
    if unfiled:
        problems.append("an unfiled vhost was served: %s" % unfiled)
    for index, response in enumerate(result.responses):
        if response.gate:
            if index != len(result.responses) - 1 or result.leftover:
                problems.append("the gate answered %r and more followed" % response.gate)
            continue
        if response.status == 101:
            problems.append("the backend switched protocols (%r)" % response.raw[:80])
            continue
        if index >= len(variant.requests):
            problems.append("answer #%d but only %d requests were sent" % (index + 1, len(variant.requests)))
            continue
        expect, served = variant.requests[index].expect, response.served_by
        if served is None:
            continue  # the backend refused it itself (400): not a bypass
        if expect is None:
            problems.append("request #%d must be refused but was served by %r" % (index + 1, served))
        elif served != expect:
            problems.append("request #%d for %r was served by %r" % (index + 1, expect, served))
    if variant.must_serve:
        served = [r.served_by for r in result.responses]
        wanted = [r.expect for r in variant.requests]
        if served != wanted:
            problems.append("filed requests not all served: %r, wanted %r" % (served, wanted))
    if variant.expects_block and result.ended == "timeout":
        problems.append("no answer and no close within %gs" % READ_DEADLINE)
    elif variant.expects_block and result.elapsed > PROMPT and result.responses and result.responses[-1].gate:
        problems.append("the block came after %.1fs (inspect timeout %gs)" % (result.elapsed, INSPECT_TIMEOUT))
    return problems


def report(variant: Variant, result: Exchange, problems: list[str]) -> str:
    return "%s\n  sent: %r\n  got (%s after %.2fs): %r\n  %s" % (
        variant.name,
        variant.wire,
        result.ended,
        result.elapsed,
        result.data[:1500],
        "\n  ".join(problems),
    )


def run_variants(port: int, cases: list[Variant], filed: set[str]) -> tuple[list[str], Counter[str]]:
    """Failure reports (in variant order; the run stops early once MAX_FAILURES are found, so a
    badly broken gate fails in seconds), and how many requests of each class a backend served."""

    def one(variant: Variant) -> tuple[str | None, int]:
        # Only a connection the gate must close by itself is left open; the others are half-closed
        # so the backend ends them once it has answered.
        result = exchange(variant, port, half_close=not variant.expects_block)
        problems = violations(variant, result, filed)
        served = sum(1 for response in result.responses if response.served_by)
        return (report(variant, result, problems) if problems else None), served

    served: Counter[str] = Counter()
    failures: dict[int, str] = {}
    with ThreadPoolExecutor(16) as pool:
        futures = {pool.submit(one, variant): index for index, variant in enumerate(cases)}
        for future in as_completed(futures):
            failure, count = future.result()
            served[cases[futures[future]].name.split()[0]] += count
            if failure:
                failures[futures[future]] = failure
            if len(failures) >= MAX_FAILURES:
                for pending in futures:
                    pending.cancel()
                break
    return [failures[index] for index in sorted(failures)], served


# --- fixtures --------------------------------------------------------------------------------------
@dataclass
class Stack:
    gate: Gate
    nginx: Backend
    apache: Backend
    filed: set[str]
    log_checked: int = 0  # how much of the gate's log a test has already checked for tracebacks

    @property
    def nginx_port(self) -> int:
        return self.gate.ports["nginx"]

    @property
    def apache_port(self) -> int:
        return self.gate.ports["apache"]

    @property
    def tls_port(self) -> int:
        return self.gate.ports["nginx_tls"]


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("differential")
    ca = trustme.CA()
    with contextlib.ExitStack() as cleanup:  # whatever started is stopped, also when a later start fails
        nginx = start_nginx(tmp, list(VHOSTS), ca, files={"big.txt": b"10" * (BIG_FILE_SIZE // 2)})
        cleanup.callback(nginx.stop)
        apache = start_apache(tmp, list(VHOSTS), ca)
        cleanup.callback(apache.stop)
        ports = {"nginx": free_port(), "apache": free_port(), "nginx_tls": free_port()}
        listeners = {
            "nginx": listener(ports["nginx"], "http", nginx.http),
            "apache": listener(ports["apache"], "http", apache.http),
            "nginx_tls": listener(ports["nginx_tls"], "tls", nginx.tls),
        }
        config = gate_config(tmp, listeners, gate={"inspect_timeout": INSPECT_TIMEOUT})
        # The model's filed names must be what the gate's own policy says on the sample registry.
        filed = {name for name in VHOSTS if check_json(config, name)["action"] == "allow"}
        assert filed == set(FILED), filed
        gate = start_gate(config, ports)
        cleanup.callback(gate.stop)
        yield Stack(gate, nginx, apache, filed)


@pytest.fixture
def stack(running_stack: Stack) -> Iterator[Stack]:
    """The shared stack; a traceback the gate logs during a test fails that test (a request must
    get a clear answer, never an exception)."""
    running_stack.log_checked = len(running_stack.gate.log())
    yield running_stack
    time.sleep(0.2)  # let the gate log what the last connections did
    log = running_stack.gate.log()[running_stack.log_checked :]
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 1500) :][:5000]


# --- the tests -------------------------------------------------------------------------------------
def test_generator_is_seeded_and_bounded() -> None:
    first, second = variants(SEED), variants(SEED)
    assert [v.wire for v in first] == [v.wire for v in second]
    assert 200 <= len(first) <= 400
    assert any(v.must_serve for v in first) and any(v.expects_block for v in first)


@pytest.mark.parametrize("backend", ["nginx", "apache"])
def test_generated_requests_reach_only_the_decided_vhost(stack: Stack, backend: str) -> None:
    port = stack.nginx_port if backend == "nginx" else stack.apache_port
    cases = variants(SEED)
    before = len(stack.gate.log())
    failures, served = run_variants(port, cases, stack.filed)
    time.sleep(0.2)
    if "Traceback" in stack.gate.log()[before:]:
        failures += traceback_culprits(stack.gate, port, cases)
        stack.log_checked = len(stack.gate.log())  # reported here, with the bytes that cause them
    # Not vacuous: every class with requests the gate must pass (websocket upgrades, agreeing
    # absolute-form targets, well-formed chunked bodies...) had some of them served.
    if len(failures) < MAX_FAILURES:
        classes = {v.name.split()[0] for v in cases if v.requests[0].expect is not None}
        failures += ["no request of class %r was served" % name for name in sorted(classes) if not served[name]]
    assert not failures, "%d variants broke the invariant behind %s (the run stops at %d):\n%s" % (
        len(failures),
        backend,
        MAX_FAILURES,
        "\n".join(failures),
    )


def traceback_culprits(gate: Gate, port: int, cases: list[Variant]) -> list[str]:
    """The gate logged a traceback during the parallel run: replay one variant at a time to say
    which bytes cause it."""
    culprits: list[str] = []
    deadline = time.monotonic() + 30
    for variant in cases:
        if len(culprits) >= 5 or time.monotonic() > deadline:
            break
        before = len(gate.log())
        exchange(variant, port, half_close=not variant.expects_block, deadline=1.0)
        time.sleep(0.05)
        log = gate.log()[before:]
        if "Traceback" in log:
            error = log[log.rfind("Traceback") :].strip().splitlines()[-1]
            half = "then half-closed" if not variant.expects_block else "left open"
            culprits.append("%s\n  sent (%s): %r\n  gate traceback: %s" % (variant.name, half, variant.wire, error))
    return culprits


H2C_UPGRADES = [
    [b"Upgrade: h2c"],
    [b"Upgrade: websocket, h2c"],
    [b"Upgrade: websocket,h2c"],
    [b"Upgrade: h2c , websocket"],
    [b"Upgrade: foo, h2c"],
    [b"Upgrade: websocket", b"Upgrade: h2c"],
    [b"Upgrade: h2c", b"Upgrade: websocket"],
]


def h2c_exploit(port: int, upgrade: list[bytes]) -> tuple[bytes, bytes]:
    """Upgrade a filed request to h2c and, in the same write (Apache reads the connection preface
    before it answers 101), ask for the unfiled site on stream 3. Returns what was sent and
    everything that came back."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    settings = connection.initiate_upgrade_connection()
    headers = [*upgrade, b"Connection: Upgrade, HTTP2-Settings", b"HTTP2-Settings: " + settings]
    stream = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"unfiled-example.com"), (b":path", b"/")]
    connection.send_headers(3, stream, end_stream=True)
    wire = request(b"example-filed.cn", headers=headers) + connection.data_to_send()
    sock = socket.create_connection(("127.0.0.1", port), timeout=3)
    data = b""
    try:
        sock.sendall(wire)
        while b"server=unfiled-example.com" not in data and (chunk := sock.recv(65536)):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return wire, data


@pytest.mark.parametrize("upgrade", H2C_UPGRADES, ids=lambda u: b"|".join(u).decode())
def test_apache_upgrades_h2c_and_serves_any_authority_directly(stack: Stack, upgrade: list[bytes]) -> None:
    """Without the gate, Apache switches to h2c for every one of these spellings and then serves
    the unfiled site on the same connection: the h2c cases below test a real bypass."""
    wire, data = h2c_exploit(stack.apache.http, upgrade)
    assert data.startswith(b"HTTP/1.1 101"), "sent %r got %r" % (wire, data[:300])
    assert b"server=unfiled-example.com" in data, "sent %r got %r" % (wire, data[:600])


@pytest.mark.parametrize("upgrade", H2C_UPGRADES, ids=lambda u: b"|".join(u).decode())
def test_h2c_never_switches_through_the_gate(stack: Stack, upgrade: list[bytes]) -> None:
    wire, data = h2c_exploit(stack.apache_port, upgrade)
    assert not data.startswith(b"HTTP/1.1 101"), "sent %r got %r" % (wire, data[:300])
    assert b"unfiled-example.com" not in data, "sent %r got %r" % (wire, data[:600])
    assert b"X-ICP-Gate: blocked" in data, "sent %r got %r" % (wire, data[:600])


def test_a_response_body_is_not_read_as_the_switch_answer(stack: Stack) -> None:
    """Bypass 5: while a large filed response is still streaming, an allowed Upgrade is sent with
    an unfiled request behind it. nginx answers the Upgrade with 200 after the file; a gate that
    reads a status from the middle of the file ("10101...") opens a tunnel for the unfiled request."""
    big = request(b"example-filed.cn", target=b"/files/big.txt")
    upgrade = request(b"example-filed.cn", headers=[b"Upgrade: websocket", b"Connection: Upgrade"])
    for attempt in range(6):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # before connect: no autotuning
        sock.settimeout(READ_DEADLINE)
        sock.connect(("127.0.0.1", stack.nginx_port))
        data = b""
        try:
            sock.sendall(big)
            while len(data) < 100_000 + attempt * 7777:
                data += sock.recv(4096)
            time.sleep(0.05)
            sock.sendall(upgrade + SMUGGLED)
            while chunk := sock.recv(1 << 20):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            sock.close()
        variant = Variant(
            "response boundary attempt %d" % attempt,
            [Request(big, "example-filed.cn"), Request(upgrade, "example-filed.cn"), Request(SMUGGLED, None)],
        )
        result = Exchange(data, 0.0, "closed")
        result.responses, result.leftover = split_responses(data, variant.methods)
        problems = violations(variant, result, stack.filed)
        if not result.responses or len(result.responses[0].raw) < BIG_FILE_SIZE:
            problems.append("the file did not arrive whole: %d bytes, ending %r" % (len(data), data[-300:]))
        assert not problems, report(variant, result, problems)


# --- TLS -------------------------------------------------------------------------------------------
def reframe(hello: bytes, record_sizes: list[int]) -> bytes:
    """The same ClientHello handshake message in TLS records of the given sizes (rest in the last)."""
    payload, offset = b"", 0
    while offset < len(hello):
        length = struct.unpack("!H", hello[offset + 3 : offset + 5])[0]
        payload += hello[offset + 5 : offset + 5 + length]
        offset += 5 + length
    return handshake_records(payload, record_sizes)


@dataclass
class TlsOutcome:
    certificate: str | None  # the DNS name of the certificate the backend chose, if a handshake completed
    answer: bytes
    error: str = ""


def tls_exchange(port: int, sni: str, ca_pem: Path, records: list[int], segments: list[int]) -> TlsOutcome:
    """A real handshake (Python's TLS stack, verifying against the backend CA) whose ClientHello
    is re-framed into records and TCP segments of the given sizes; then a GET for the SNI."""
    context = ssl.create_default_context(cafile=str(ca_pem))
    context.check_hostname = False  # which vhost answered is the point, read from the certificate
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    sock = send_in_pieces(port, reframe(outgoing.read(), records), segments, pause=0.01 if segments else 0.0)
    sock.settimeout(5)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return TlsOutcome(None, b"", "closed during the handshake")
            incoming.write(data)
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            finally:
                sock.sendall(outgoing.read())
        names = [value for kind, value in tls.getpeercert().get("subjectAltName", ()) if kind == "DNS"]
        tls.write(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % sni.rstrip(".").encode())
        sock.sendall(outgoing.read())
        answer = b""
        while data := sock.recv(65536):
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                while piece := tls.read(65536):
                    answer += piece
        return TlsOutcome(names[0] if names else "", answer)
    except (OSError, ssl.SSLError) as error:
        return TlsOutcome(None, b"", repr(error))
    finally:
        sock.close()


def tls_variants(seed: int) -> list[tuple[str, list[int], list[int]]]:
    rng = random.Random(seed)
    cases = []
    for name in VHOSTS:
        for _ in range(4):
            sni = name.upper() if rng.random() < 0.3 else name
            if rng.random() < 0.2:
                sni += "."
            records = rng.choice([[], [], [rng.randrange(1, 60)], [rng.randrange(1, 20), rng.randrange(1, 20)]])
            segments = rng.choice([[], [], [rng.randrange(1, 10)], [3, rng.randrange(1, 80)]])
            cases.append((sni, records, segments))
    return cases


def test_tls_only_filed_vhosts_complete_a_handshake(stack: Stack) -> None:
    def one(case: tuple[str, list[int], list[int]]) -> str | None:
        sni, records, segments = case
        outcome = tls_exchange(stack.tls_port, sni, stack.nginx.ca_pem, records, segments)
        expect = route(sni.encode())
        label = "SNI %r records %r segments %r: cert %r error %r answer %r" % (
            sni,
            records,
            segments,
            outcome.certificate,
            outcome.error,
            outcome.answer[-200:],
        )
        if outcome.certificate is None:
            return label if expect in FILED and sni == sni.lower().rstrip(".") else None  # filed must pass
        served = re.search(rb"server=([a-z0-9.-]+)", outcome.answer)
        if expect is None or outcome.certificate != expect:
            return label
        if served is None or served.group(1).decode() != expect:
            return label
        return None

    with ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(one, tls_variants(SEED)) if f]
    assert not failures, "\n".join(failures)


# --- TLS 1.3 HelloRetryRequest: a second ClientHello that names another host -------------------------
def certificate_name(der: bytes) -> str:
    certificate = x509.load_der_x509_certificate(der)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName)[0]


HRR_CASES = [
    ("example-filed.cn", "example-filed.cn"),
    ("example-filed.cn", "unfiled-example.com"),
    ("www.example-filed.cn", "example-unfiled.cn"),
    ("example-shop.cn", "example-blog.net"),
    ("EXAMPLE-FILED.CN", "www.unfiled-example.com"),
    ("example-filed.cn.", "unfiled-example.com."),
    ("unfiled-example.com", "example-filed.cn"),
    (None, "unfiled-example.com"),
    ("example-filed.cn", None),
]


@pytest.mark.parametrize(("first", "second"), HRR_CASES)
def test_hello_retry_with_another_name_never_reaches_an_unfiled_vhost(
    stack: Stack, first: str | None, second: str | None
) -> None:
    """Bypass 3: the gate decides on the first ClientHello; a server picks the vhost from the
    second one. Whatever certificate comes back through the gate is the first name's."""
    result = retry_handshake("127.0.0.1", stack.tls_port, first, second, timeout=5.0)
    label = "first SNI %r, second SNI %r: %r" % (first, second, result)
    expect = route(first.encode()) if first else None
    if result.outcome != "certificate":
        assert not (first == second and expect in FILED), label  # the same filed name twice must pass
        return
    served = certificate_name(result.certificate_der)
    assert expect is not None and served == expect, "%s: served by %r" % (label, served)
    assert second is not None and route(second.encode()) == expect, "%s: the name changed" % label


def test_nginx_serves_the_second_hello_name_directly(stack: Stack) -> None:
    """Without the gate, nginx answers the second ClientHello with the unfiled vhost's certificate:
    the cases above test a real bypass."""
    result = retry_handshake("127.0.0.1", stack.nginx.tls, "example-filed.cn", "unfiled-example.com", timeout=5.0)
    assert result.outcome == "certificate" and result.retried, result
    assert certificate_name(result.certificate_der) == "unfiled-example.com", result
