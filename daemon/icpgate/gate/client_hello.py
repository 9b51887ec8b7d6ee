"""Find the SNI in a TLS ClientHello, reassembled across TCP segments and TLS records.

The hot-path extractor: it only walks lengths, never copies the hello more than once, and refuses
anything it cannot account for byte by byte (fail closed). mitmproxy's ClientHello parser is its
oracle in the property tests; it is too slow and too lenient to run here.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

RECORD_HEADER = 5
HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
MAX_RECORD = 1 << 14
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


def parse_client_hello(data: bytes, max_size: int) -> Hello:
    """Parse what has arrived so far: NEED_MORE, COMPLETE with the SNI (or None), or ERROR."""
    handshake = bytearray()
    offset = 0
    needed = None  # handshake message length once its header is in
    while needed is None or len(handshake) < needed:
        if len(data) - offset < RECORD_HEADER:
            return _need_more_or_error(data, offset, max_size)
        if data[offset] != HANDSHAKE:
            return _error("not a TLS handshake record (first byte 0x%02x)" % data[offset])
        if data[offset + 1] != 3 or data[offset + 2] > 3:
            # Record versions are 3.0-3.3; TLS 1.3 keeps 3.1/3.3 on the record layer.
            return _error("unknown TLS record version %d.%d" % (data[offset + 1], data[offset + 2]))
        length = (data[offset + 3] << 8) | data[offset + 4]
        if length == 0 or length > MAX_RECORD:
            return _error("TLS record length %d out of range" % length)
        end = offset + RECORD_HEADER + length
        if end > max_size:
            return _error("ClientHello larger than %d bytes" % max_size)
        if end > len(data):
            return NEED_MORE
        handshake += data[offset + RECORD_HEADER : end]
        offset = end
        if needed is None and len(handshake) >= 4:
            if handshake[0] != CLIENT_HELLO:
                return _error("first handshake message is not a ClientHello (type %d)" % handshake[0])
            needed = 4 + ((handshake[1] << 16) | (handshake[2] << 8) | handshake[3])
            if needed > max_size:
                return _error("ClientHello larger than %d bytes" % max_size)
    if len(handshake) != needed:
        # The record that ends the hello carries more handshake data: not what a client sends first.
        return _error("handshake data after the ClientHello in the same record")
    return _parse_body(memoryview(handshake)[4:needed])


def _need_more_or_error(data: bytes, offset: int, max_size: int) -> Hello:
    """A partial record header: check what bytes there are, so garbage fails at once."""
    rest = data[offset:]
    if rest and rest[0] != HANDSHAKE:
        return _error("not a TLS handshake record (first byte 0x%02x)" % rest[0])
    if (len(rest) > 1 and rest[1] != 3) or (len(rest) > 2 and rest[2] > 3):
        return _error("unknown TLS record version %d.%d" % (rest[1], rest[2] if len(rest) > 2 else 0))
    if offset + RECORD_HEADER > max_size:
        return _error("ClientHello larger than %d bytes" % max_size)
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


def _parse_body(body: memoryview) -> Hello:
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
        extensions = _Reader(reader.vector(2))
        if reader.remaining:
            return _error("bytes after the extensions")
        return _parse_extensions(extensions)
    except ValueError:
        return _error("truncated ClientHello")


def _parse_extensions(extensions: _Reader) -> Hello:
    seen: set[int] = set()
    sni = None
    ech = False
    while extensions.remaining:
        kind = extensions.u16()
        data = extensions.vector(2)
        if kind in seen:
            return _error("duplicate extension %d" % kind)
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            sni = _server_name(data)
            if isinstance(sni, Hello):
                return sni
        elif kind == EXT_ECH:
            ech = True
    return Hello(HelloState.COMPLETE, sni, ech=ech)


def _server_name(data: memoryview) -> str | Hello:
    """RFC 6066: a list holding exactly one host_name."""
    reader = _Reader(data)
    names = _Reader(reader.vector(2))
    if reader.remaining:
        return _error("bytes after the server_name list")
    host = None
    while names.remaining:
        name_type = names.u8()
        name = names.vector(2)
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
    if host is None:
        return _error("empty server_name list")
    return host
