"""Which protocol a client speaks, from its first bytes: the classifier of `auto` listeners.

The rule is the gate's usual one, seen from the backend's side: whatever a TLS server would take
for a ClientHello goes to the TLS path, whatever an HTTP server would take for a request line goes
to the HTTP path, and only bytes that neither would read as such may be relayed unread (or
blocked) as another protocol. So the tests are loose where a loose test is the safe one:

- TLS: a handshake record (22) with major version 3 and any minor, since OpenSSL reads the first
  record of any 3.x version (the TLS path then refuses versions outside 3.0-3.3), and an
  SSLv2-compatible ClientHello (high bit set with a length OpenSSL reads, message type 1), which
  the TLS path refuses.
- HTTP: leading CR, LF, SP or HTAB (llhttp and nginx skip empty lines before a request; the HTTP
  path allows two runs of them), or a token followed by SP or HTAB whose first line either names
  a protocol version (`HTTP/`, any case: a request line of HTTP/1.x, and the HTTP/2 preface
  `PRI * HTTP/2.0`), or has a target that nginx or Apache would route (`/…`, `*`, `http(s)://…`,
  and any `scheme://…` in a two-word line), or is a two-word GET (HTTP/0.9: Apache serves `GET ?`
  from its default server), or is CONNECT, or a PROXY protocol v1 header (a
  backend that reads one reads a request after it). A line without a version is an
  HTTP/0.9 request, which nginx serves from its default server: the HTTP path refuses it.
  Anything else on that first line is not a request either serves: `EHLO mail.example`, `USER
  anonymous`, `a1 LOGIN …`, `DESCRIBE rtsp://… RTSP/1.0`, and the SSH banner
  `SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3` (a token, a space, a comment) are other protocols.
- Other: everything else, decided as soon as a byte rules both out.

Bytes that are still a prefix of either (`\\x16`, `GET`, a first line without its LF) wait for
more; the caller bounds the wait. Scanning resumes where it stopped, so a client writing one byte
at a time costs time linear in the bytes, never a rescan.
"""

from __future__ import annotations

import re
from enum import StrEnum

HANDSHAKE = 0x16
SSL2_CLIENT_HELLO = 0x01
# An SSLv2 record's first byte: the high bit, then the top of a length OpenSSL would read (its
# record buffer holds about 18 KiB; 0xe0 means 24 KiB). Telnet's IAC (0xff) is not among them.
SSL2_FIRST_BYTES = (0x80, 0xE0)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")
_LEADING_SPACE = frozenset(b"\r\n \t")
_VERSION = re.compile(rb"HTTP/", re.IGNORECASE)
# CONNECT names its authority; PROXY is a PROXY protocol v1 header, which nginx (`listen …
# proxy_protocol`) and Apache (RemoteIPProxyProtocol) read and then read a request after it.
_ALWAYS = frozenset({b"CONNECT", b"PROXY"})


class Protocol(StrEnum):
    TLS = "tls"
    HTTP = "http"
    OTHER = "other"


class Sniffer:
    """Buffers a client's first bytes until they name a protocol. `feed` returns it, or None."""

    __slots__ = ("_line_scanned", "_token_end", "buffer", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size  # an undecided prefix longer than this goes to the HTTP path, which refuses it
        self.buffer = bytearray()
        self._token_end = 0  # how far the leading token has been scanned
        self._line_scanned = -1  # once the token and its SP are seen: how far the LF has been looked for

    @property
    def started(self) -> bool:
        return bool(self.buffer)

    def feed(self, data: bytes) -> Protocol | None:
        self.buffer += data
        return self._classify(final=False)

    def at_end(self) -> Protocol:
        """The client ended its side: a prefix that is not yet a request line or a handshake
        record is judged as it stands (an incomplete line as if complete, so an absolute URL is
        still read by the HTTP path); a lone token or a partial record header is another protocol."""
        return self._classify(final=True) or Protocol.OTHER

    def _classify(self, *, final: bool) -> Protocol | None:
        buffer = self.buffer
        if not buffer:
            return None
        first = buffer[0]
        if first == HANDSHAKE:
            if len(buffer) < 2:
                return None
            return Protocol.TLS if buffer[1] == 3 else Protocol.OTHER
        if SSL2_FIRST_BYTES[0] <= first < SSL2_FIRST_BYTES[1]:  # SSLv2 record: two length bytes, the message type
            if len(buffer) < 3:
                return None
            return Protocol.TLS if buffer[2] == SSL2_CLIENT_HELLO else Protocol.OTHER
        if first in _LEADING_SPACE:
            return Protocol.HTTP
        if self._line_scanned < 0:
            self._token_end = _TOKEN.match(buffer, self._token_end).end()
            if self._token_end == len(buffer):  # all token so far
                return self._too_long() if not final else Protocol.OTHER
            if buffer[self._token_end] not in b" \t":
                return Protocol.OTHER
            self._line_scanned = self._token_end
        end = buffer.find(b"\n", self._line_scanned)
        if end < 0:
            self._line_scanned = len(buffer)
            if not final:
                return self._too_long()
            end = len(buffer)
        return Protocol.HTTP if _is_request_line(bytes(buffer[:end])) else Protocol.OTHER

    def _too_long(self) -> Protocol | None:
        return Protocol.HTTP if len(self.buffer) > self.max_size else None


def _is_request_line(line: bytes) -> bool:
    """A first line that starts with a token and a space: would nginx or Apache read a request in it?"""
    words = line.split()
    if len(words) < 2:
        return False
    if _VERSION.search(line) or words[0].upper() in _ALWAYS:
        return True
    target = words[1]
    if target.startswith((b"/", b"*")):
        return True
    if len(words) == 2:  # HTTP/0.9: nginx routes an absolute URL of any scheme on its authority, and
        return words[0] == b"GET" or b"://" in target  # Apache (Allow0.9) serves GET of any target, even `?`
    # A third word that is no HTTP version: nginx and Apache (Strict, its default) refuse the line,
    # unless they read the target; RTSP (`DESCRIBE rtsp://… RTSP/1.0`) and SIP are other protocols.
    return target.lower().startswith((b"http://", b"https://"))
