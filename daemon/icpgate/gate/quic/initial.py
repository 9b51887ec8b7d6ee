"""Find the SNI in the ClientHello a QUIC client sends in its Initial packets (QUIC v1 and v2).

A QUIC client's first flight is readable by anyone: Initial packets are encrypted with keys derived
from the client's own Destination Connection ID and a salt published in RFC 9001 (v1) and RFC 9369
(v2). `InitialReassembler` is fed the client's datagrams as they arrive, in any order; it removes
header protection, decrypts each Initial, collects its CRYPTO frames and, once the CRYPTO stream
from offset 0 holds the whole ClientHello, hands it to the TLS extractor in `client_hello` (the same
parser the TCP gate uses, so both read a hello alike).

Fail closed: a byte it cannot account for (a truncated packet, a failed authentication tag, a frame
an Initial may not carry, CRYPTO data that disagrees with itself, more data or datagrams than the
caps allow) is an ERROR, never a guess. Cost is linear in the bytes fed: each packet is decrypted
once, each CRYPTO byte is copied once and compared at most once per overlapping retransmission.

What it decides on must be what the server reads, whichever of the packets the server drops (loss,
a full buffer, a size limit of its own, a packet number it decodes otherwise): so every CRYPTO byte
must have one value across all the packets fed, and then any subset of them a server keeps holds
those values or none. A server cannot read other bytes from a packet than the gate did: both open it
with the same key and header, and AES-GCM authenticates a ciphertext under one nonce (one packet
number) at most. The flow table keeps each connection ID to one flow (cids.py), so that the packets
fed here are all that reach that connection.

Crypto uses aioquic's C `HeaderProtection` and `AEAD` (one call each per packet, no Python byte
shuffling) and the standard library's HMAC for the key schedule. aioquic's AEAD refuses ciphertexts
over 1500 bytes (PACKET_LENGTH_MAX in its _crypto.c), which a client on a large-MTU path may send:
those packets are opened with the `cryptography` package's AES-GCM instead. See docs/quic.md.
"""

from __future__ import annotations

import hmac
import re
from enum import Enum
from hashlib import sha256
from typing import NamedTuple

from aioquic._crypto import AEAD, CryptoError, HeaderProtection
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..tls.client_hello import CLIENT_HELLO, Hello, HelloState, parse_body
from ..tls.watch import sni_key

VERSION_1 = 0x00000001
VERSION_2 = 0x6B3343CF
MAX_CID = 20
MIN_FIRST_DCID = 8  # RFC 9000 §7.2: a client's first Destination Connection ID is at least 8 bytes
MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 §14.1: servers drop smaller datagrams that carry an Initial
SAMPLE = 16
TAG = 16
AIOQUIC_MAX_CIPHERTEXT = 1500  # PACKET_LENGTH_MAX in aioquic's _crypto.c: its AEAD refuses more
MAX_DATAGRAMS = 32  # a 16 KiB hello needs ~15 full datagrams; real clients send 1-3
MAX_PACKETS = 64
MAX_CRYPTO_PIECES = 64  # disjoint CRYPTO ranges held at once: Chrome cuts its hello into ~10 pieces; this
# bounds the work per frame, so a flood of tiny out-of-order frames costs time linear in its bytes

# Long-header packet types (first byte bits 4-5), which RFC 9369 §3.2 renumbers for v2.
INITIAL, ZERO_RTT, HANDSHAKE_PACKET, RETRY = "initial", "0-rtt", "handshake", "retry"
VERSION_NEGOTIATION = "version_negotiation"  # version 0: a server's list of the versions it speaks
PACKET_TYPES = {
    VERSION_1: (INITIAL, ZERO_RTT, HANDSHAKE_PACKET, RETRY),
    VERSION_2: (RETRY, INITIAL, ZERO_RTT, HANDSHAKE_PACKET),
}

FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_ACK_ECN = 0x03
FRAME_CRYPTO = 0x06
FRAME_CONNECTION_CLOSE = 0x1C
_NOT_PADDING = re.compile(rb"[^\x00]")  # the end of a run of PADDING frames, found in C, not byte by byte


def _expand_label_info(label: bytes, length: int) -> bytes:
    """The HKDF-Expand-Label info (RFC 8446 §7.1) with an empty context, plus HKDF's counter byte 1."""
    full = b"tls13 " + label
    return length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00\x01"


_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))
_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) for a key of at most 64 bytes, spelled out over hashlib: a third
    cheaper than `hmac.digest` for these short inputs, which OpenSSL sets a MAC context up for."""
    block = key.ljust(64, b"\x00")
    inner = sha256(block.translate(_INNER_PAD) + message).digest()
    return sha256(block.translate(_OUTER_PAD) + inner).digest()


def _expand_label(secret: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand-Label for outputs up to one SHA-256 block: a single HMAC."""
    return _hmac_sha256(secret, info)[:length]


class _Schedule(NamedTuple):
    salt: bytes
    key: bytes
    iv: bytes
    hp: bytes


_CLIENT_IN = _expand_label_info(b"client in", 32)
SCHEDULES = {
    VERSION_1: _Schedule(
        bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
        _expand_label_info(b"quic key", 16),
        _expand_label_info(b"quic iv", 12),
        _expand_label_info(b"quic hp", 16),
    ),
    VERSION_2: _Schedule(
        bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
        _expand_label_info(b"quicv2 key", 16),
        _expand_label_info(b"quicv2 iv", 12),
        _expand_label_info(b"quicv2 hp", 16),
    ),
}


# HKDF-Extract's HMAC keyed with each version's salt, its key schedule done once: each flow copies it
_EXTRACT = {version: hmac.new(schedule.salt, digestmod="sha256") for version, schedule in SCHEDULES.items()}


def initial_keys(version: int, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    """The client's Initial (key, iv, hp) for this version and first Destination Connection ID."""
    schedule = SCHEDULES[version]
    extract = _EXTRACT[version].copy()
    extract.update(dcid)
    initial_secret = extract.digest()
    client_secret = _expand_label(initial_secret, _CLIENT_IN, 32)
    return (
        _expand_label(client_secret, schedule.key, 16),
        _expand_label(client_secret, schedule.iv, 12),
        _expand_label(client_secret, schedule.hp, 16),
    )


class QuicState(Enum):
    NEED_MORE = "need_more"
    COMPLETE = "complete"
    ERROR = "error"
    UNKNOWN_VERSION = "unknown_version"


class QuicHello(NamedTuple):
    state: QuicState
    sni: str | None = None
    version: int = 0
    ech: bool = False  # an outer ClientHello of ECH: `sni` is the public_name, not the real site
    error: str = ""


NEED_MORE = QuicHello(QuicState.NEED_MORE)


class QuicError(Exception):
    """Something in the client's datagrams that no honest first flight holds."""


def peek_version(datagram: bytes) -> int | None:
    """The version of a long-header packet starting the datagram, or None (short header or too short)."""
    if len(datagram) < 5 or not datagram[0] & 0x80:
        return None
    return int.from_bytes(datagram[1:5], "big")


def is_initial(datagram: bytes) -> bool:
    """Whether the datagram starts with a v1 or v2 Initial packet: what opens a QUIC flow."""
    version = peek_version(datagram)
    types = PACKET_TYPES.get(version) if version is not None else None
    return types is not None and types[(datagram[0] >> 4) & 3] == INITIAL


def long_headers(datagram: bytes, version: int) -> list[tuple[str, bytes, bytes]]:
    """(type, Destination Connection ID, Source Connection ID) of the long-header packets a datagram
    starts with, read in the clear as a flow table may (RFC 8999 invariants plus the version's Length
    fields); reading stops at a short-header packet or trailing padding. Retry and Version Negotiation
    run to the end of the datagram. QuicError when the lengths do not add up."""
    types = PACKET_TYPES.get(version)
    found = []
    pos = 0
    end = len(datagram)
    while pos < end and datagram[pos] & 0x80:
        if pos + 7 > end:
            raise QuicError("truncated long header")
        packet_version = int.from_bytes(datagram[pos + 1 : pos + 5], "big")
        cursor = pos + 6 + datagram[pos + 5]
        if cursor >= end:
            raise QuicError("truncated long header")
        dcid = datagram[pos + 6 : cursor]
        scid_end = cursor + 1 + datagram[cursor]
        if scid_end > end:
            raise QuicError("truncated long header")
        scid = datagram[cursor + 1 : scid_end]
        if packet_version == 0:
            found.append((VERSION_NEGOTIATION, dcid, scid))
            break
        if packet_version != version or types is None:
            raise QuicError("version 0x%08x in a flow of version 0x%08x" % (packet_version, version))
        kind = types[(datagram[pos] >> 4) & 3]
        found.append((kind, dcid, scid))
        if kind == RETRY:
            break
        cursor = scid_end
        if kind == INITIAL:
            token_len, cursor = _varint(datagram, cursor, end)
            cursor += token_len
        length, cursor = _varint(datagram, cursor, end)
        pos = cursor + length
        if pos > end:
            raise QuicError("packet Length %d runs past the datagram" % length)
    return found


def decode_packet_number(truncated: int, bits: int, expected: int) -> int:
    """A packet number from its `bits` low bits, as a receiver decodes it: the value nearest to
    `expected`, one past the largest it has received (RFC 9000 §17.1, Appendix A.3)."""
    window = 1 << bits
    half = window >> 1
    candidate = (expected & ~(window - 1)) | truncated
    if candidate <= expected - half and candidate < (1 << 62) - window:
        return candidate + window
    if candidate > expected + half and candidate >= window:
        return candidate - window
    return candidate


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A QUIC variable-length integer (RFC 9000 §16) at `pos`: its value and the position after it."""
    if pos >= end:
        raise QuicError("truncated variable-length integer")
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > end:
        raise QuicError("truncated variable-length integer")
    value = first & 0x3F
    for index in range(pos + 1, pos + size):
        value = (value << 8) | data[index]
    return value, pos + size


class InitialReassembler:
    """One QUIC flow's ClientHello, from the client's datagrams fed in any order.

    The keys come from the Destination Connection ID of the first Initial fed; every packet after it
    must carry the same version and Destination Connection ID. After COMPLETE, ERROR or
    UNKNOWN_VERSION the result is final and further feeds return it unchanged.
    """

    __slots__ = (
        "_aead",
        "_crypto",
        "_datagrams",
        "_dcid",
        "_gcm",
        "_hp",
        "_hp_key",
        "_iv",
        "_key",
        "_largest",
        "_max_crypto",
        "_max_datagrams",
        "_max_packets",
        "_min_dcid",
        "_needed",
        "_packets",
        "_ranges",
        "_second",
        "_second_read",
        "_spoilt",
        "_types",
        "cids",
        "left_initial",
        "result",
        "version",
    )

    def __init__(
        self,
        max_crypto: int = 16384,
        max_datagrams: int = MAX_DATAGRAMS,
        max_packets: int = MAX_PACKETS,
        min_dcid: int = MIN_FIRST_DCID,
    ) -> None:
        self.result = NEED_MORE
        self.version = 0
        self._max_crypto = max_crypto
        self._max_datagrams = max_datagrams
        self._max_packets = max_packets
        self._min_dcid = min_dcid  # 0 after a Retry: the client then uses the server's ID, of any length
        self._datagrams = 0
        self._packets = 0
        self._dcid = b""
        self._types: tuple[str, ...] = ()
        self._aead: AEAD | None = None
        self._hp: HeaderProtection | None = None
        self._key = b""  # AEAD key and iv, header protection key: the ciphers are made from them when needed
        self._iv = b""
        self._hp_key = b""
        self._largest = -1  # the largest packet number read, which the next ones are decoded against
        self._gcm: AESGCM | None = None  # made for the first packet too large for `_aead`
        self._crypto = bytearray()  # CRYPTO stream bytes, valid where `_ranges` says
        self._ranges: list[list[int]] = []  # sorted, disjoint, non-adjacent [start, end) received
        self._needed = 0  # the ClientHello's length with its handshake header, once known
        self._second = 0  # once relayed: where a second ClientHello (after a HelloRetryRequest) ends, once known
        self._second_read = False
        self._spoilt = ""  # once relayed: why no later datagram may pass (a second hello for another name)
        self.cids: set[bytes] | frozenset[bytes] = frozenset()  # other Destination Connection IDs, once relayed
        self.left_initial = False

    @property
    def dcid(self) -> bytes:
        """The Destination Connection ID the keys come from ('' before the first Initial)."""
        return self._dcid

    def feed(self, datagram: bytes) -> QuicHello:
        if self.result is NEED_MORE:
            try:
                self.result = self._datagram(datagram)
            except QuicError as error:
                self.result = QuicHello(QuicState.ERROR, version=self.version, error=str(error))
        return self.result

    def verify(self, datagram: bytes) -> str:
        """After COMPLETE, for a flow the gate relays: '' when every Initial in this later client
        datagram repeats the hello that was decided on (or carries a second one, after a
        HelloRetryRequest, for the same host: `_check_second`), else why not.

        A retransmitted Initial could otherwise carry another ClientHello under the same connection
        ID, which a server that lost the first one would read. Packets after the Initials (0-RTT,
        Handshake, a 1-RTT short header that ends the datagram) pass unread; `cids` lists the other
        Destination Connection IDs the client may use (the server's). `left_initial` turns true once
        the client sends a Handshake or 1-RTT packet: it has dropped its Initial keys (RFC 9001 §4.9.1)."""
        if self.result.state is not QuicState.COMPLETE:
            return "no decided ClientHello"
        if self._spoilt:
            return self._spoilt
        self._packets = 0  # the caps bound the first flight; a relayed flow's datagrams are checked one by one
        try:
            self._walk(datagram, relaying=True)
            self._check_second()
        except QuicError as error:
            return str(error)
        finally:
            self._drop_ciphers()
        return ""

    def _drop_ciphers(self) -> None:
        """Free the cipher contexts (some 6 KB with aioquic's buffers) of a decided flow: its client
        sends a few more Initials at most, and making them again for each costs microseconds."""
        self._aead = self._hp = self._gcm = None

    def _check_second(self) -> None:
        """A server that answers with a HelloRetryRequest gets a second ClientHello in the CRYPTO
        stream after the first. Some servers serve the name in the second (gate.md, TLS), so it must
        name the same host as the decided one, as over TCP; otherwise nothing more of the flow passes."""
        end = self._second
        if not end or self._second_read or self._ranges[0][1] < end:
            return
        self._second_read = True
        second = self._parse_hello(self._needed, end)
        if second.state is not HelloState.COMPLETE:
            self._spoilt = "second ClientHello after HelloRetryRequest: " + second.error
        elif sni_key(second.sni) != sni_key(self.result.sni):
            self._spoilt = "second ClientHello after HelloRetryRequest names %r, the first named %r" % (
                second.sni, self.result.sni)  # fmt: skip
        if self._spoilt:
            raise QuicError(self._spoilt)

    def _datagram(self, datagram: bytes) -> QuicHello:
        self._datagrams += 1
        if self._datagrams > self._max_datagrams:
            raise QuicError("no complete ClientHello in %d datagrams" % self._max_datagrams)
        if not self.version:
            version = peek_version(datagram)
            if version is None:
                raise QuicError("first datagram does not start with a long-header packet")
            if version not in SCHEDULES:
                if version == 0:
                    raise QuicError("Version Negotiation packet from a client")
                return QuicHello(QuicState.UNKNOWN_VERSION, version=version)
            self.version = version
            self._types = PACKET_TYPES[version]
        self._walk(datagram, relaying=False)
        return self._decide()

    def _walk(self, datagram: bytes, relaying: bool) -> None:
        """Read every packet of a datagram. In the first flight a short header is an error; in a
        relayed flow it is the client's 1-RTT packet, which runs to the end of the datagram."""
        if not datagram:
            raise QuicError("empty datagram")
        pos = 0
        end = len(datagram)
        initial = False
        while pos < end:
            first = datagram[pos]
            if not first:
                if not pos:
                    raise QuicError("datagram without a QUIC packet")
                if datagram.count(0, pos) != end - pos:
                    raise QuicError("bytes after the padding at the end of a datagram")
                break
            if relaying and not first & 0x80:
                self.left_initial = True
                break
            pos, kind = self._packet(datagram, pos, end)
            initial |= kind == INITIAL
            if kind == HANDSHAKE_PACKET and relaying:
                self.left_initial = True
        if initial and end < MIN_INITIAL_DATAGRAM:
            raise QuicError("datagram carrying an Initial is %d bytes, under %d" % (end, MIN_INITIAL_DATAGRAM))

    def _packet(self, data: bytes, pos: int, end: int) -> tuple[int, str]:
        """Read the packet at `pos`: the position after it, and its type."""
        self._packets += 1
        if self._packets > self._max_packets:
            raise QuicError("no complete ClientHello in %d packets" % self._max_packets)
        first = data[pos]
        if not first & 0x80:
            raise QuicError("short-header packet in a client's first flight")
        if pos + 7 > end:
            raise QuicError("truncated long header")
        version = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if version != self.version:
            raise QuicError("version 0x%08x in a flow of version 0x%08x" % (version, self.version))
        dcid_len = data[pos + 5]
        if dcid_len > MAX_CID:
            raise QuicError("Destination Connection ID of %d bytes" % dcid_len)
        cursor = pos + 6 + dcid_len
        if cursor >= end:
            raise QuicError("truncated long header")
        dcid = data[pos + 6 : cursor]
        scid_len = data[cursor]
        if scid_len > MAX_CID:
            raise QuicError("Source Connection ID of %d bytes" % scid_len)
        cursor += 1 + scid_len
        kind = self._types[(first >> 4) & 3]
        if kind == RETRY:
            raise QuicError("Retry packet from a client")
        if kind == INITIAL:
            token_len, cursor = _varint(data, cursor, end)
            cursor += token_len
        length, cursor = _varint(data, cursor, end)
        packet_end = cursor + length
        if packet_end > end:
            raise QuicError("packet Length %d runs past the datagram" % length)
        if not self._dcid:
            if len(dcid) < self._min_dcid:
                raise QuicError("first Destination Connection ID is %d bytes, under %d" % (len(dcid), self._min_dcid))
            self._set_keys(bytes(dcid))
        elif dcid != self._dcid and dcid not in self.cids:
            raise QuicError("packet with a Destination Connection ID other than the flow's")
        if kind == INITIAL:
            self._initial(data, pos, cursor, packet_end)
        return packet_end, kind

    def _set_keys(self, dcid: bytes) -> None:
        self._dcid = dcid
        self._key, self._iv, self._hp_key = initial_keys(self.version, dcid)

    def _initial(self, data: bytes, start: int, pn_offset: int, end: int) -> None:
        """Remove header protection (RFC 9001 §5.4), decrypt, and read the frames of one Initial."""
        if pn_offset + 4 + SAMPLE > end:
            raise QuicError("Initial packet too short to sample for header protection")
        if self._hp is None:
            self._hp = HeaderProtection(b"aes-128-ecb", self._hp_key)
        packet = data[start:end] if start or end != len(data) else data
        # the header with its first byte and packet number unmasked, and that (truncated) number
        header, truncated = self._hp.remove(packet, pn_offset - start)
        if len(header) + TAG > end - start:
            raise QuicError("Initial packet shorter than its packet number and tag")
        packet_number = decode_packet_number(truncated, 8 * ((header[0] & 3) + 1), self._largest + 1)
        payload = self._decrypt(packet, header, packet_number)
        self._largest = max(self._largest, packet_number)
        if header[0] & 0x0C:
            raise QuicError("reserved header bits set in an Initial packet")
        if not payload:
            raise QuicError("Initial packet without frames")
        self._frames(payload)

    def _decrypt(self, packet: bytes, header: bytes, packet_number: int) -> bytes:
        """The packet's payload, opened with aioquic's AEAD, or with `cryptography`'s when it is
        longer than aioquic's accepts."""
        try:
            if len(packet) - len(header) <= AIOQUIC_MAX_CIPHERTEXT:
                if self._aead is None:
                    self._aead = AEAD(b"aes-128-gcm", self._key, self._iv)
                return self._aead.decrypt(packet[len(header) :], header, packet_number)
            if self._gcm is None:
                self._gcm = AESGCM(self._key)
            nonce = (int.from_bytes(self._iv, "big") ^ packet_number).to_bytes(12, "big")
            return self._gcm.decrypt(nonce, memoryview(packet)[len(header) :], header)
        except (CryptoError, InvalidTag):
            raise QuicError("Initial packet fails authentication (keys from another connection ID?)") from None

    def _frames(self, payload: bytes) -> None:
        """The frames an Initial may carry (RFC 9000 §12.4); any other is a protocol violation."""
        pos = 0
        end = len(payload)
        while pos < end:
            frame = payload[pos]
            pos += 1
            if frame == FRAME_PADDING:
                found = _NOT_PADDING.search(payload, pos)
                pos = found.start() if found else end
            elif frame == FRAME_PING:
                continue
            elif frame == FRAME_CRYPTO:
                offset, pos = _varint(payload, pos, end)
                length, pos = _varint(payload, pos, end)
                if pos + length > end:
                    raise QuicError("CRYPTO frame runs past its packet")
                self._add_crypto(offset, payload[pos : pos + length])
                pos += length
            elif frame in (FRAME_ACK, FRAME_ACK_ECN):
                pos = self._skip_ack(payload, pos, end, frame == FRAME_ACK_ECN)
            elif frame == FRAME_CONNECTION_CLOSE:
                for _ in range(2):  # error code, frame type
                    _, pos = _varint(payload, pos, end)
                reason_len, pos = _varint(payload, pos, end)
                pos += reason_len
                if pos > end:
                    raise QuicError("CONNECTION_CLOSE reason runs past its packet")
            else:
                raise QuicError("frame type 0x%02x in an Initial packet" % frame)

    @staticmethod
    def _skip_ack(payload: bytes, pos: int, end: int, ecn: bool) -> int:
        """Skip an ACK frame: it says nothing about the hello, but its length must add up."""
        for _ in range(2):  # largest acknowledged, ack delay
            _, pos = _varint(payload, pos, end)
        ranges, pos = _varint(payload, pos, end)
        _, pos = _varint(payload, pos, end)  # first ACK range
        if ranges > (end - pos) // 2:
            raise QuicError("ACK frame with more ranges than bytes")
        for _ in range(2 * ranges + (3 if ecn else 0)):  # gap and length per range; ECN counts
            _, pos = _varint(payload, pos, end)
        return pos

    def _add_crypto(self, offset: int, data: bytes) -> None:
        """Place CRYPTO data in the stream; bytes received twice must be the same bytes."""
        stop = offset + len(data)
        relaying = self.result is not NEED_MORE  # after the decision: room for a second hello after the first
        limit = (self._second or self._needed + self._max_crypto) if relaying else (self._needed or self._max_crypto)
        if stop > limit:
            if self._needed:
                raise QuicError("CRYPTO data beyond the ClientHello's %d bytes" % limit)
            raise QuicError("CRYPTO data beyond %d bytes" % self._max_crypto)
        if not data:
            return
        crypto = self._crypto
        if stop > len(crypto):
            crypto.extend(bytes(stop - len(crypto)))
        merged = [offset, stop]
        kept: list[list[int]] = []
        for span in self._ranges:
            if span[1] < offset or span[0] > stop:
                kept.append(span)
                continue
            low, high = max(span[0], offset), min(span[1], stop)
            if low < high and crypto[low:high] != data[low - offset : high - offset]:
                raise QuicError("CRYPTO data at offset %d differs from what was received before" % low)
            merged = [min(merged[0], span[0]), max(merged[1], span[1])]
        crypto[offset:stop] = data
        kept.append(merged)
        if len(kept) > MAX_CRYPTO_PIECES:
            raise QuicError("CRYPTO data in more than %d disjoint pieces" % MAX_CRYPTO_PIECES)
        kept.sort()
        self._ranges = kept
        if not self._needed and kept[0][0] == 0 and kept[0][1] >= 4:
            self._read_handshake_header()
        elif relaying and not self._second and kept[0][1] >= self._needed + 4:
            self._read_second_header()

    def _read_handshake_header(self) -> None:
        crypto = self._crypto
        if crypto[0] != CLIENT_HELLO:
            raise QuicError("first handshake message is not a ClientHello (type %d)" % crypto[0])
        self._needed = 4 + int.from_bytes(crypto[1:4], "big")
        if self._needed > self._max_crypto:
            raise QuicError("ClientHello of %d bytes, over %d" % (self._needed, self._max_crypto))
        if self._ranges[-1][1] > self._needed:
            raise QuicError("CRYPTO data beyond the ClientHello's %d bytes" % self._needed)

    def _read_second_header(self) -> None:
        crypto, start = self._crypto, self._needed
        if crypto[start] != CLIENT_HELLO:
            self._spoilt = "handshake message of type %d after the ClientHello" % crypto[start]
            raise QuicError(self._spoilt)
        self._second = start + 4 + int.from_bytes(crypto[start + 1 : start + 4], "big")
        if self._second - start > self._max_crypto or self._ranges[-1][1] > self._second:
            self._spoilt = "second ClientHello over %d bytes, or data after it" % self._max_crypto
            raise QuicError(self._spoilt)

    def _parse_hello(self, start: int, end: int) -> Hello:
        """The ClientHello in CRYPTO bytes [start, end), read by the TLS extractor. Its body is
        copied out, so that no view of the growing `_crypto` outlives the call."""
        return parse_body(memoryview(self._crypto[start + 4 : end]))

    def _decide(self) -> QuicHello:
        """After a whole datagram was accounted for: the hello's SNI once all of it is in."""
        ranges = self._ranges
        if not self._needed or ranges[0][0] != 0 or ranges[0][1] < self._needed:
            return NEED_MORE
        parsed = self._parse_hello(0, self._needed)
        if parsed.state is not HelloState.COMPLETE:
            return QuicHello(QuicState.ERROR, version=self.version, error="ClientHello: " + parsed.error)
        self._drop_ciphers()
        return QuicHello(QuicState.COMPLETE, parsed.sni, self.version, parsed.ech)
