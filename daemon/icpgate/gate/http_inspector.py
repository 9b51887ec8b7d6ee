"""Track HTTP/1.x requests on one client->server byte stream, so each is checked before it is sent.

httptools (llhttp) does the parsing. It has no way to pause, so the inspector feeds it exact
slices: the header section up to its blank line, then the body by Content-Length or, for chunked
bodies, line by line (a chunked message can only end at a line feed). Every callback therefore
fires at a known byte position, and the bytes of a pipelined request are never released before
its head has been decided.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import httptools

HEAD_END = b"\r\n\r\n"


class BodyKind(Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"


@dataclass(slots=True)
class RequestHead:
    method: str
    target: bytes
    version: str
    host: str | None  # the authority of an absolute-form target, else the Host header
    headers: dict[bytes, bytes] = field(default_factory=dict)  # lower-case names; first value
    upgrade: bytes = b""  # lower-case Upgrade header, when the request asks to switch protocols
    error: str = ""  # set when the head is well-formed HTTP but must be refused (400)

    @property
    def path(self) -> str:
        return self.target.decode("latin-1")

    def accepts_json(self) -> bool:
        accept = self.headers.get(b"accept", b"").lower()
        return b"application/json" in accept and b"text/html" not in accept


class Event:
    """What the inspector found; the connection acts on each in order."""

    __slots__ = ()


@dataclass(slots=True)
class Head(Event):
    request: RequestHead
    raw: bytes  # the exact bytes of the request line and header section


@dataclass(slots=True)
class Body(Event):
    raw: bytes


@dataclass(slots=True)
class Tunnel(Event):
    raw: bytes  # bytes after an accepted Upgrade or CONNECT: relayed as they are


@dataclass(slots=True)
class Invalid(Event):
    message: str


class _State(Enum):
    HEAD = 1
    LENGTH = 2
    CHUNKED = 3
    AWAIT_SWITCH = 4  # an Upgrade or CONNECT was forwarded; hold bytes until the backend answers
    TUNNEL = 5
    FAILED = 6


class HttpInspector:
    """One per client connection. `feed` yields events; stop iterating to stop processing."""

    __slots__ = (
        "_buffer",
        "_complete",
        "_head_done",
        "_headers",
        "_parser",
        "_remaining",
        "_repeated",
        "_scanned",
        "_state",
        "_upgrade_offset",
        "_url",
        "max_header_size",
    )  # fmt: skip

    def __init__(self, max_header_size: int) -> None:
        self.max_header_size = max_header_size
        self._parser = httptools.HttpRequestParser(self)
        self._buffer = bytearray()
        self._scanned = 0
        self._state = _State.HEAD
        self._remaining = 0
        self._begin_request()

    def _begin_request(self) -> None:
        self._url = bytearray()
        self._headers: dict[bytes, bytes] = {}  # first value of each header
        self._repeated: set[bytes] = set()  # names seen more than once
        self._head_done = False
        self._complete = False
        self._upgrade_offset: int | None = None

    @property
    def in_head(self) -> bool:
        """True while a request head is being read (the header timeout runs then)."""
        return self._state is _State.HEAD and bool(self._buffer)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in self._headers:
            self._repeated.add(name)
        else:
            self._headers[name] = value.strip(b" \t")  # OWS is not part of the value

    def on_headers_complete(self) -> None:
        self._head_done = True

    def on_message_complete(self) -> None:
        self._complete = True

    @property
    def awaiting_switch(self) -> bool:
        return self._state is _State.AWAIT_SWITCH

    def switch_answered(self, accepted: bool) -> None:
        """The backend answered an Upgrade/CONNECT: tunnel on 101 (2xx for CONNECT), else keep checking."""
        if self._state is _State.AWAIT_SWITCH:
            self._state = _State.TUNNEL if accepted else _State.HEAD
            self._begin_request()

    def feed(self, data: bytes) -> Iterator[Event]:
        if not self._buffer and self._state is _State.HEAD and self._is_one_whole_head(data):
            # The common case, one complete bodiless head per read: no buffering, no copies.
            yield self._head(data)
            return
        self._buffer += data
        while self._buffer and self._state is not _State.FAILED:
            if self._state is _State.AWAIT_SWITCH:
                if len(self._buffer) > self.max_header_size:
                    yield self._fail("more than %d bytes sent before the upgrade was answered" % self.max_header_size)
                return
            if self._state is _State.HEAD:
                event = self._read_head()
                if event is None:
                    return
                yield event
            elif self._state is _State.LENGTH:
                yield self._read_length_body()
            elif self._state is _State.CHUNKED:
                yield self._read_chunked_body()
            else:
                raw = bytes(self._buffer)
                self._buffer.clear()
                yield Tunnel(raw)

    def _is_one_whole_head(self, data: bytes) -> bool:
        return (
            len(data) <= self.max_header_size
            and data.find(HEAD_END) == len(data) - len(HEAD_END)
            and not data.startswith(b"PRI * HTTP/2")
            and not data.startswith(b"\r\n")
        )

    def _head(self, raw: bytes) -> Event:
        """Parse one complete header section that ends exactly at the end of `raw`."""
        error = self._parse(raw)
        if error:
            return self._fail(error)
        if not self._head_done:
            return self._fail("malformed HTTP: incomplete request head")
        return self._finish_head(raw)

    def _fail(self, message: str) -> Invalid:
        self._state = _State.FAILED
        self._buffer.clear()
        return Invalid(message)

    def _parse(self, chunk: bytes | bytearray) -> str:
        """Feed one slice; return a parser error message, or ''."""
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_offset = int(upgrade.args[0])
        except httptools.HttpParserError as error:
            return "malformed HTTP: %s" % (error.args[0] if error.args else type(error).__name__)
        return ""

    def _read_head(self) -> Event | None:
        while True:
            end = self._buffer.find(HEAD_END, max(0, self._scanned - 3))
            if end < 0:
                self._scanned = len(self._buffer)
                if len(self._buffer) > self.max_header_size:
                    return self._fail("header section larger than %d bytes" % self.max_header_size)
                if self._buffer.startswith(b"PRI * HTTP/2"):
                    return self._fail("h2c prior knowledge")
                return None
            end += len(HEAD_END)
            if end > self.max_header_size:
                return self._fail("header section larger than %d bytes" % self.max_header_size)
            raw = bytes(self._buffer[:end])
            if raw.startswith(b"PRI * HTTP/2"):
                return self._fail("h2c prior knowledge")
            error = self._parse(raw)
            del self._buffer[:end]
            self._scanned = 0
            if error:
                return self._fail(error)
            if self._head_done:
                return self._finish_head(raw)
            # Blank lines before a request: llhttp skips them, and so do we (they are not forwarded).

    def _finish_head(self, raw: bytes) -> Event:
        request = self._request_head()
        if self._upgrade_offset is not None or request.method == "CONNECT":
            self._state = _State.AWAIT_SWITCH
        elif self._complete:
            self._state = _State.HEAD
        elif b"transfer-encoding" in request.headers:
            self._state = _State.CHUNKED
        else:
            self._state = _State.LENGTH
            self._remaining = int(request.headers.get(b"content-length", b"0"))
        if self._state is _State.HEAD:
            self._begin_request()
        return Head(request, raw)

    def _request_head(self) -> RequestHead:
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        headers = self._headers
        target = bytes(self._url)
        request = RequestHead(method, target, parser.get_http_version(), None, headers)
        request.error = _framing_error(self._repeated, headers, request.version)
        host_header = headers.get(b"host")
        authority = _authority(target, method)
        if b"host" in self._repeated:
            request.error = request.error or "more than one Host header"
        elif authority is not None:
            if authority == "":
                request.error = request.error or "malformed request target"
            elif host_header is not None and host_header.decode("latin-1").lower() != authority.lower():
                # RFC 9112 says the target wins; a backend that reads Host instead would be
                # steered past the check, so a mismatch is refused.
                request.error = request.error or "Host header differs from the absolute-form target"
            request.host = authority or None
        elif host_header is not None:
            request.host = host_header.decode("latin-1")
        elif request.version != "1.0":
            request.error = request.error or "HTTP/1.1 request without Host"
        if self._upgrade_offset is not None or parser.should_upgrade():
            request.upgrade = headers.get(b"upgrade", b"").lower()
        return request

    def _read_length_body(self) -> Event:
        take = min(self._remaining, len(self._buffer))
        chunk = bytes(self._buffer[:take])
        del self._buffer[:take]
        self._remaining -= take
        error = self._parse(chunk)
        if error:
            return self._fail(error)
        if self._remaining == 0:
            return self._end_message(chunk)
        return Body(chunk)

    def _read_chunked_body(self) -> Event:
        newline = self._buffer.find(b"\n")
        take = len(self._buffer) if newline < 0 else newline + 1
        chunk = bytes(self._buffer[:take])
        del self._buffer[:take]
        error = self._parse(chunk)
        if error:
            return self._fail(error)
        if self._complete:
            return self._end_message(chunk)
        return Body(chunk)

    def _end_message(self, chunk: bytes) -> Event:
        if not self._complete:
            return self._fail("message did not end where its framing says")
        self._state = _State.HEAD
        self._begin_request()
        return Body(chunk)


def _framing_error(repeated: set[bytes], headers: dict[bytes, bytes], version: str) -> str:
    """Ambiguous framing is how requests are smuggled past a gate: refuse it (DESIGN §4)."""
    has_length = b"content-length" in headers
    has_encoding = b"transfer-encoding" in headers
    if has_length and has_encoding:
        return "Content-Length together with Transfer-Encoding"
    if b"content-length" in repeated:
        return "more than one Content-Length"
    if has_length and not headers[b"content-length"].isdigit():
        return "malformed Content-Length"
    if has_encoding:
        if b"transfer-encoding" in repeated or headers[b"transfer-encoding"].lower() != b"chunked":
            return "Transfer-Encoding other than a single chunked"
        if version == "1.0":
            return "Transfer-Encoding in an HTTP/1.0 request"
    return ""


def _authority(target: bytes, method: str) -> str | None:
    """The authority of an absolute-form or authority-form (CONNECT) target; None for origin-form."""
    if method == "CONNECT":
        return target.decode("latin-1")
    lowered = target[:8].lower()
    if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
        return None
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return ""
    if not url.host or url.userinfo:
        return ""
    host = url.host.decode("latin-1")
    if ":" in host:
        host = "[%s]" % host
    return host if url.port is None else "%s:%d" % (host, url.port)
