"""Track HTTP/1.x requests on one client->server byte stream, so each is checked before it is sent.

httptools (llhttp) parses each header section. It has no way to pause, so the inspector feeds it
exact slices: the header section up to its blank line, then the body up to the end the framing
gives (Content-Length, or strict chunked framing followed by length in `http_framing`). Every
callback therefore fires at a known byte position, the bytes of a pipelined request are never
released before its head has been decided, and llhttp and the framing must agree on where each
message ends. Body bytes are passed on by length, never looked at one by one: inspection cost is
linear in the bytes received.

The rule: a request is relayed only when it has been read as a conforming backend reads it, and
every backend routes it to the host decided on. What the gate cannot account for (another scheme
in the target, an absolute-form target without a Host naming it, HTTP/0.9, a body on an Upgrade,
a token it does not know, bytes outside ASCII in a name) is refused.

The plainest heads (one whole bodiless request per read, nearly every request of a keep-alive
connection) are read by the compiled engine (`_engine.pyx`) when it is built; this module is the
reference it is held equal to, and the fallback (`ICPGATE_HTTP_ENGINE=python` asks for it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import httptools

from .engine import compiled
from .framing import ChunkedBody, FramingError
from .responses import CONNECT, NO_SWITCH, UPGRADE

HEAD_END = b"\r\n\r\n"
MAX_BLANK_RUNS = 2  # runs of empty lines (up to four lines each) tolerated before a request line
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:/[!#$%&'*+.^_`|~0-9A-Za-z-]+)?")
_HTTP_AUTHORITY = re.compile(rb"http://([^/?#]*)", re.IGNORECASE)  # a plain listener's own scheme
_HTTPS = re.compile(rb"https://", re.IGNORECASE)
_NAME_BYTES = re.compile(rb"[\x21-\x7e]+")  # what a Host or authority may contain: visible ASCII

_read_plain_head = compiled.read_plain_head if compiled is not None else None


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
    # Every token of every Upgrade header, lower-case: the backend may pick any of them.
    upgrade: tuple[bytes, ...] = ()
    error: str = ""  # set when the head is well-formed HTTP but must be refused (400)

    @property
    def switch(self) -> int:
        """Whether the backend's answer may turn the connection into a tunnel (and how)."""
        if self.method == "CONNECT":
            return CONNECT
        return UPGRADE if self.upgrade else NO_SWITCH

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
    mid_message: bool = False  # inside a body: the backend holds a request it will never see the end of


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
        "_blank_runs",
        "_buffer",
        "_chunked",
        "_complete",
        "_head_done",
        "_headers",
        "_parser",
        "_plain_only",
        "_remaining",
        "_repeated",
        "_scanned",
        "_state",
        "_upgrades",
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
        self._chunked: ChunkedBody | None = None
        # True while httptools' parser has read nothing: the compiled engine, which reads with a
        # fresh llhttp parser each time, may answer only while that parser is in the same state.
        self._plain_only = True
        self._begin_request()

    def _begin_request(self) -> None:
        self._url = bytearray()
        self._headers: dict[bytes, bytes] = {}  # first value of each header
        self._repeated: set[bytes] = set()  # names seen more than once
        self._upgrades: list[bytes] = []  # every Upgrade header's value
        self._head_done = False
        self._complete = False
        self._blank_runs = 0

    @property
    def in_head(self) -> bool:
        """True while a request head is being read (the header timeout runs then)."""
        return self._state is _State.HEAD and bool(self._buffer)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"upgrade":
            self._upgrades.append(value)
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
            # llhttp stops at an Upgrade or CONNECT head; a new parser reads what follows a refusal.
            self._parser = httptools.HttpRequestParser(self)
            self._begin_request()

    def feed(self, data: bytes) -> Iterator[Event]:
        if not self._buffer and self._state is _State.HEAD:
            # The common case, one complete head per read: no buffering, no copies.
            if _read_plain_head is not None and self._plain_only:
                plain = _read_plain_head(data, self.max_header_size)
                if plain is not None:
                    yield Head(RequestHead(*plain), data)
                    return
            if self._is_one_whole_head(data):
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
            and data.endswith(HEAD_END)
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
        mid_message = self._state is _State.LENGTH or self._state is _State.CHUNKED
        self._state = _State.FAILED
        self._buffer.clear()
        return Invalid(message, mid_message)

    def _parse(self, chunk: bytes | bytearray) -> str:
        """Feed one slice; return a parser error message, or ''."""
        self._plain_only = False
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade or CONNECT head: the request's `switch` says what follows it
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
            # Blank lines before a request: llhttp skips them, and so do we (they are not forwarded),
            # but only a few: a flood of them would cost a parse each.
            self._blank_runs += 1
            if self._blank_runs > MAX_BLANK_RUNS:
                return self._fail("too many empty lines before a request")

    def _finish_head(self, raw: bytes) -> Event:
        request = self._request_head()
        headers = request.headers
        has_body = b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
        if has_body and request.switch != NO_SWITCH and not request.error:
            # A backend that answers without reading the body reads it as the next request,
            # and one that switches reads it as tunnel data: either way not what we checked.
            request.error = "a body on an Upgrade or CONNECT request"
        if request.error:
            self._state = _State.FAILED  # refused: nothing after it is read
            self._buffer.clear()
        elif request.switch != NO_SWITCH:
            self._state = _State.AWAIT_SWITCH
        elif self._complete:
            self._state = _State.HEAD
            self._begin_request()
        elif b"transfer-encoding" in headers:
            self._state = _State.CHUNKED
            self._chunked = ChunkedBody(self.max_header_size)
        else:
            self._state = _State.LENGTH
            self._remaining = int(headers.get(b"content-length", b"0"))
        return Head(request, raw)

    def _request_head(self) -> RequestHead:
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        headers = self._headers
        target = bytes(self._url)
        request = RequestHead(method, target, parser.get_http_version(), None, headers)
        request.error = _framing_error(self._repeated, headers, request.version)
        if self._upgrades:
            request.upgrade, error = _upgrade_tokens(self._upgrades)
            request.error = request.error or error
        if request.version == "0.9":
            # llhttp reads header lines after a request line without a version; nginx and Apache
            # read none (the request is the line alone) and route it to their default server.
            request.error = "HTTP/0.9 request (a backend reads no Host in it)"
            return request
        host_header = headers.get(b"host")
        if host_header is not None and not _NAME_BYTES.fullmatch(host_header):
            # Raw bytes outside ASCII would be mapped by UTS-46 (\xaa becomes "a", a soft hyphen
            # vanishes) into a name the backend never saw. Unicode names travel as A-labels.
            request.error = request.error or ("Host with bytes outside visible ASCII" if host_header else "empty Host")
            return request
        authority, error = _authority(target, method)
        request.error = request.error or error
        if b"host" in self._repeated:
            request.error = request.error or "more than one Host header"
        elif authority is not None:
            if host_header is None:
                if method != "CONNECT":
                    # nginx routes on the target's authority; Apache only when the scheme is the
                    # one it thinks its own (`ServerName https://…` behind a TLS proxy makes that
                    # https), else on its default virtual host. Only a Host naming the same
                    # authority leaves one routing host whichever a backend reads.
                    request.error = request.error or "absolute-form target without Host"
            elif host_header.decode("ascii").lower() != authority.lower():
                # RFC 9112 says the target wins; a backend that reads Host instead would be
                # steered past the check, so a mismatch is refused.
                request.error = request.error or "Host header differs from the request target's authority"
            request.host = authority
        elif host_header is not None:
            request.host = host_header.decode("ascii")
        elif request.version != "1.0":
            request.error = request.error or "HTTP/1.1 request without Host"
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
        """Everything of the body that has arrived, as one event: sizes and data are skipped by length."""
        try:
            end = self._chunked.advance(self._buffer)
        except FramingError as error:
            return self._fail("malformed chunked body: %s" % error)
        chunk = bytes(self._buffer[:end])
        del self._buffer[:end]
        error = self._parse(chunk)  # llhttp reads the same bytes and must agree on the end
        if error:
            return self._fail(error)
        if self._chunked.done:
            self._chunked = None
            return self._end_message(chunk)
        if self._complete:
            return self._fail("message did not end where its framing says")
        return Body(chunk)

    def _end_message(self, chunk: bytes) -> Event:
        if not self._complete:
            return self._fail("message did not end where its framing says")
        self._state = _State.HEAD
        self._begin_request()
        return Body(chunk)


def _framing_error(repeated: set[bytes], headers: dict[bytes, bytes], version: str) -> str:
    """Ambiguous framing is how requests are smuggled past a gate: refuse it."""
    has_length = b"content-length" in headers
    has_encoding = b"transfer-encoding" in headers
    if has_length and has_encoding:
        return "Content-Length together with Transfer-Encoding"
    if b"content-length" in repeated:
        return "more than one Content-Length"
    if has_length and not (headers[b"content-length"].isdigit() and len(headers[b"content-length"]) <= 18):
        return "malformed Content-Length"
    if has_encoding:
        if b"transfer-encoding" in repeated or headers[b"transfer-encoding"].lower() != b"chunked":
            return "Transfer-Encoding other than a single chunked"
        if version == "1.0":
            return "Transfer-Encoding in an HTTP/1.0 request"
    return ""


def _upgrade_tokens(values: list[bytes]) -> tuple[tuple[bytes, ...], str]:
    """Every protocol named by every Upgrade header (each is a comma-separated list), lower-case."""
    tokens = []
    for element in b",".join(values).split(b","):
        element = element.strip(b" \t")
        if not element:
            continue  # empty list elements are allowed and mean nothing
        if not _TOKEN.fullmatch(element):
            return (), "malformed Upgrade token"
        tokens.append(element.lower())
    if not tokens:
        return (), "empty Upgrade header"
    return tuple(tokens), ""


def _authority(target: bytes, method: str) -> tuple[str | None, str]:
    """The authority the backend routes on, from the request target's form, and an error.

    origin-form (`/path`) has none, nor does `*` (OPTIONS only); authority-form is CONNECT's;
    absolute-form must be http, the scheme of the listener. nginx routes absolute-form targets of
    any scheme on their authority (`x://host/`), Apache only those of its own scheme, so any other
    form is refused rather than guessed.
    """
    if method == "CONNECT":
        if not _NAME_BYTES.fullmatch(target) or target.startswith(b"/"):
            return None, "malformed CONNECT target"
        return target.decode("ascii"), ""
    if target.startswith(b"/"):
        return None, ""
    if target == b"*":
        return None, "" if method == "OPTIONS" else "asterisk target outside OPTIONS"
    absolute = _HTTP_AUTHORITY.match(target)
    if absolute is None:
        if _HTTPS.match(target):
            # RFC 9110 7.4: an origin must reject an https request that did not come over TLS.
            # Apache reads such a target's host only on its TLS ports: here it routes on Host.
            return None, "https request target on plain HTTP"
        return None, "request target is neither a path nor an http URL"
    if not _NAME_BYTES.fullmatch(absolute.group(1)):
        return None, "request target authority empty or with bytes outside visible ASCII"
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return None, "malformed request target"
    if not url.host or url.userinfo:
        return None, "malformed request target authority"
    host = url.host.decode("ascii")
    if ":" in host:
        host = "[%s]" % host
    return (host if url.port is None else "%s:%d" % (host, url.port)), ""
