"""Find the SNI in a TLS ClientHello, reassembled across TCP segments and TLS records.

The hot-path extractor: it only walks lengths, never copies the hello more than once, and refuses
anything it cannot account for byte by byte (fail closed). mitmproxy's ClientHello parser is its
oracle in the property tests; it is too slow and too lenient to run here.

`HelloReassembler` is fed the client's bytes as they arrive and consumes each TLS record once,
when it is complete, so a hello costs time linear in its size however it is cut into segments
and records. A hello may span at most `MAX_HELLO_RECORDS` records: real stacks use one to three
(a hello over 16 KiB needs two), record-fragmenting anti-censorship clients use tens; a hello in
hundreds of tiny records is only ever an attempt to make the gate work.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

RECORD_HEADER = 5
HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
MAX_RECORD = 1 << 14
MAX_HELLO_RECORDS = 64
EXT_SERVER_NAME = 0x0000
EXT_ECH = 0xFE0D
HOST_NAME = 0x00


class HelloState(Enum):
    NEED_MORE = "need_more"
    COMPLETE = "complete"
    ERROR = "error"


class Hello(NamedTuple):
    state: HelloState
    sni: str | None = None
    error: str = ""
    ech: bool = False  # an outer ClientHello of ECH: `sni` is the public_name, not the real site


NEED_MORE = Hello(HelloState.NEED_MORE)


def _error(message: str) -> Hello:
    return Hello(HelloState.ERROR, error=message)


class HelloReassembler:
    """One connection's ClientHello, fed as it arrives: each record is read once, when complete.

    `data` keeps every byte fed (the gate replays them byte-exact); once the result is COMPLETE,
    `end` is where the hello's last record ends in it: what follows is the client's next record.
    After COMPLETE or ERROR the result is final and further feeds only keep the bytes.
    """

    __slots__ = ("_handshake", "_max_records", "_max_size", "_needed", "_records", "data", "end", "result")

    def __init__(self, max_size: int, max_records: int = MAX_HELLO_RECORDS) -> None:
        self.data = bytearray()
        self.end = 0  # the first byte not yet consumed; once COMPLETE, the end of the hello
        self.result = NEED_MORE
        self._max_size = max_size
        self._max_records = max_records
        self._handshake = bytearray()
        self._needed = 0  # the handshake message's length with its header, once that is in
        self._records = 0

    def feed(self, data: bytes) -> Hello:
        self.data += data
        if self.result is NEED_MORE:
            self.result = self._consume()
        return self.result

    def _consume(self) -> Hello:
        data = self.data
        handshake = self._handshake
        while True:
            offset = self.end
            if len(data) - offset < RECORD_HEADER:
                return self._partial_header(offset)
            if data[offset] != HANDSHAKE:
                return _error("not a TLS handshake record (first byte 0x%02x)" % data[offset])
            if data[offset + 1] != 3 or data[offset + 2] > 3:
                # Record versions are 3.0-3.3; TLS 1.3 keeps 3.1/3.3 on the record layer.
                return _error("unknown TLS record version %d.%d" % (data[offset + 1], data[offset + 2]))
            length = (data[offset + 3] << 8) | data[offset + 4]
            if length == 0 or length > MAX_RECORD:
                return _error("TLS record length %d out of range" % length)
            end = offset + RECORD_HEADER + length
            if end > self._max_size:
                return _error("ClientHello larger than %d bytes" % self._max_size)
            if end > len(data):
                return NEED_MORE
            handshake += data[offset + RECORD_HEADER : end]
            self.end = end
            self._records += 1
            if not self._needed and len(handshake) >= 4:
                if handshake[0] != CLIENT_HELLO:
                    return _error("first handshake message is not a ClientHello (type %d)" % handshake[0])
                self._needed = 4 + ((handshake[1] << 16) | (handshake[2] << 8) | handshake[3])
                if self._needed > self._max_size:
                    return _error("ClientHello larger than %d bytes" % self._max_size)
            if self._needed and len(handshake) >= self._needed:
                break
            if self._records >= self._max_records:
                return _error("ClientHello spans more than %d TLS records" % self._max_records)
        if len(handshake) != self._needed:
            # The record that ends the hello carries more handshake data: not what a client sends first.
            return _error("handshake data after the ClientHello in the same record")
        self._handshake = bytearray()  # the body is parsed below; nothing needs it afterwards
        return parse_body(memoryview(handshake)[4:])

    def _partial_header(self, offset: int) -> Hello:
        """A partial record header: check what bytes there are, so garbage fails at once."""
        data = self.data
        present = len(data) - offset
        if present and data[offset] != HANDSHAKE:
            return _error("not a TLS handshake record (first byte 0x%02x)" % data[offset])
        if (present > 1 and data[offset + 1] != 3) or (present > 2 and data[offset + 2] > 3):
            minor = data[offset + 2] if present > 2 else 0
            return _error("unknown TLS record version %d.%d" % (data[offset + 1], minor))
        if offset + RECORD_HEADER > self._max_size:
            return _error("ClientHello larger than %d bytes" % self._max_size)
        return NEED_MORE


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> memoryview:
        end = self.pos + count
        if end > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        chunk = self.take(2)
        return (chunk[0] << 8) | chunk[1]

    def vector(self, length_bytes: int) -> memoryview:
        return self.take(self.u8() if length_bytes == 1 else self.u16())

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


def parse_body(body: memoryview) -> Hello:
    """A whole ClientHello's body (after its 4-byte handshake header), however it was carried: in
    TLS records here, in QUIC CRYPTO frames (gate/quic/initial.py)."""
    reader = _Reader(body)
    try:
        version = reader.u16()
        if version >> 8 != 3:
            return _error("unknown ClientHello version 0x%04x" % version)
        reader.take(32)  # random
        if len(reader.vector(1)) > 32:
            return _error("session id longer than 32 bytes")
        suites = reader.vector(2)
        if not suites or len(suites) % 2:
            return _error("malformed cipher suite list")
        if not reader.vector(1):
            return _error("no compression methods")
        if reader.remaining == 0:
            return Hello(HelloState.COMPLETE)  # no extensions at all: no SNI
        extensions = reader.vector(2)
        if reader.remaining:
            return _error("bytes after the extensions")
        return _parse_extensions(extensions)
    except ValueError:
        return _error("truncated ClientHello")


def _parse_extensions(data: memoryview) -> Hello:
    """Walked with plain indexes rather than a `_Reader`: a hello carries 10-20 extensions, and
    this loop was most of the cost of a parse. ValueError when one runs past the list."""
    seen: set[int] = set()
    sni = None
    ech = False
    pos = 0
    end = len(data)
    while pos < end:
        start = pos + 4
        if start > end:
            raise ValueError("truncated")
        kind = (data[pos] << 8) | data[pos + 1]
        pos = start + ((data[pos + 2] << 8) | data[pos + 3])
        if pos > end:
            raise ValueError("truncated")
        if kind in seen:
            return _error("duplicate extension %d" % kind)
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            sni = _server_name(data[start:pos])
            if isinstance(sni, Hello):
                return sni
        elif kind == EXT_ECH:
            ech = True
    return Hello(HelloState.COMPLETE, sni, ech=ech)


def _server_name(data: memoryview) -> str | Hello:
    """RFC 6066: a list holding exactly one host_name. Walked with plain indexes, as the extensions
    are; ValueError when a length runs past the data."""
    if len(data) < 2:
        raise ValueError("truncated")
    end = 2 + ((data[0] << 8) | data[1])
    if end > len(data):
        raise ValueError("truncated")
    if end < len(data):
        return _error("bytes after the server_name list")
    host = None
    pos = 2
    while pos < end:
        if pos + 3 > end:
            raise ValueError("truncated")
        name_type = data[pos]
        start = pos + 3
        pos = start + ((data[pos + 1] << 8) | data[pos + 2])
        if pos > end:
            raise ValueError("truncated")
        name = data[start:pos]
        if name_type != HOST_NAME:
            return _error("unknown server name type %d" % name_type)
        if host is not None:
            return _error("more than one host_name in server_name")
        if not name:
            return _error("empty host_name")
        try:
            host = bytes(name).decode("ascii")
        except UnicodeDecodeError:
            return _error("host_name is not ASCII")
        if ":" in host:
            # A DNS name holds no colon. Backends differ on a port or an IPv6 literal here (nginx
            # cuts at the first colon, Apache keeps it): refuse rather than guess.
            return _error("host_name with a colon (a port or an IPv6 literal)")
    if host is None:
        return _error("empty server_name list")
    return host
