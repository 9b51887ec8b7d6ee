"""After an allowed ClientHello: keep a second ClientHello from carrying another name.

A TLS 1.3 server that needs another key share answers the first ClientHello with a
HelloRetryRequest (a ServerHello whose random is a fixed value), and the client sends a second
ClientHello. Servers do not all check that it names the same host: OpenSSL 3.0 (and nginx on it)
serves the second hello's vhost. So until the server's first handshake message shows whether it
is a retry request, the client's handshake records are held and only records that cannot carry a
hello (change_cipher_spec, alert, application data such as early data) go through, whole. A
regular ServerHello (or anything else the server sends, such as an alert) ends the watch: the held
bytes are released and the connection is relayed untouched. After a retry request the client's
next handshake message must be a ClientHello for the same name, read by the same reassembler
as the first; then the server's next message is watched the same way, and a second retry request
is a protocol violation.

The watch is pure: it takes bytes and says what may be forwarded; the connection does the I/O.
Client faults raise `RetryViolation` (blocked and logged like any TLS block), server faults
`ServerViolation` (the connection is reset).
"""

from __future__ import annotations

from enum import Enum

from ...names.hostname import HostKind, normalize_host
from .client_hello import HANDSHAKE, MAX_HELLO_RECORDS, MAX_RECORD, RECORD_HEADER, HelloReassembler, HelloState

# SHA-256 of "HelloRetryRequest" (RFC 8446 4.1.3): the random of a ServerHello that is a retry request.
HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
SERVER_HELLO = 0x02
CHANGE_CIPHER_SPEC = 0x14
ALERT = 0x15
APPLICATION_DATA = 0x17
# Records that cannot hold a ClientHello: relayed while watching.
SAFE_RECORDS = frozenset({CHANGE_CIPHER_SPEC, ALERT, APPLICATION_DATA})
CONTENT_TYPES = SAFE_RECORDS | {HANDSHAKE}
MAX_CIPHERTEXT = MAX_RECORD + 256  # TLS 1.3 record limit with AEAD expansion (RFC 8446 5.2)
# The type, length, version and random of a ServerHello: all the watch reads of it.
HELLO_PREFIX = 4 + 2 + 32


class Reply(Enum):
    SERVER_HELLO = "server_hello"
    RETRY = "hello_retry_request"
    OTHER = "other"  # an alert, or a handshake message that is not a ServerHello


class RetryViolation(Exception):
    """The client's side after a retry request is not a ClientHello for the first hello's name."""

    def __init__(self, detail: str, host: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.host = host


class ServerViolation(Exception):
    """The server's first flight is not TLS, or asks for a retry twice."""


def sni_key(sni: str | None) -> str | None:
    """The name a hello asks for, as the policy would see it; None when there is no SNI."""
    if sni is None:
        return None
    host = normalize_host(sni)
    return sni if host.kind is HostKind.INVALID else host.value


def _check_header(data: bytes | bytearray, offset: int, who: str) -> tuple[int, int]:
    """The content type and length of the record header at `offset`, or ValueError for garbage."""
    kind = data[offset]
    if kind not in CONTENT_TYPES:
        raise ValueError("%s sent a non-TLS record (type 0x%02x)" % (who, kind))
    if data[offset + 1] != 3 or data[offset + 2] > 4:
        raise ValueError("%s sent an unknown TLS record version %d.%d" % (who, data[offset + 1], data[offset + 2]))
    length = (data[offset + 3] << 8) | data[offset + 4]
    if length == 0 or length > MAX_CIPHERTEXT:
        raise ValueError("%s sent a TLS record length %d out of range" % (who, length))
    return kind, length


class ServerFlight:
    """Reads the server's records just far enough to classify each handshake message it starts.

    Only record headers and the first 38 bytes of a message are looked at; the rest is skipped by
    count, so the cost per chunk is the number of records in it, not its size.
    """

    __slots__ = ("_header", "_kind", "_left", "_message", "_records", "_skip", "retried")

    def __init__(self) -> None:
        self._header = bytearray()  # a record header split across chunks
        self._kind = 0  # the current record's content type
        self._left = 0  # bytes of the current record not yet read
        self._message = bytearray()  # the start of the current handshake message
        self._skip = 0  # bytes of a classified handshake message still to pass over
        self._records = 0
        self.retried = False

    def feed(self, data: bytes) -> list[Reply]:
        """The messages classified in this chunk, in order; ServerViolation for garbage or a second retry."""
        if (
            not self._records
            and len(data) >= RECORD_HEADER + HELLO_PREFIX
            and data[0] == HANDSHAKE
            and data[5] == SERVER_HELLO
            and data[1] == 3
            and data[2] <= 4
            and HELLO_PREFIX <= (data[3] << 8 | data[4]) <= MAX_CIPHERTEXT
            and (data[6] << 16 | data[7] << 8 | data[8]) >= HELLO_PREFIX - 4
            and data[11:43] != HRR_RANDOM
        ):
            return [Reply.SERVER_HELLO]  # the usual answer, whole in the first read: the pass path
        replies: list[Reply] = []
        position, size = 0, len(data)
        while position < size:
            if not self._left:
                take = min(RECORD_HEADER - len(self._header), size - position)
                self._header += data[position : position + take]
                position += take
                if len(self._header) < RECORD_HEADER:
                    break
                try:
                    self._kind, self._left = _check_header(self._header, 0, "the server")
                except ValueError as error:
                    raise ServerViolation(str(error)) from None
                self._header.clear()
                self._records += 1
                if self._records > MAX_HELLO_RECORDS:
                    raise ServerViolation("the server sent %d records without a ServerHello" % self._records)
                if self._kind == ALERT or self._kind == APPLICATION_DATA:
                    replies.append(Reply.OTHER)  # an alert, or a stack we cannot read: not a retry
                    return replies
                continue
            take = min(self._left, size - position)
            if self._kind == HANDSHAKE and self._handshake(data, position, position + take, replies):
                return replies
            position += take
            self._left -= take
        return replies

    def _handshake(self, data: bytes, start: int, end: int, replies: list[Reply]) -> bool:
        """The handshake bytes of one record: classify the messages they start; True once one is final."""
        while start < end:
            if self._skip:
                passed = min(self._skip, end - start)
                self._skip -= passed
                start += passed
                continue
            take = min(HELLO_PREFIX - len(self._message), end - start)
            self._message += data[start : start + take]
            start += take
            message = self._message
            if len(message) < 4:
                continue
            if message[0] != SERVER_HELLO:
                replies.append(Reply.OTHER)
                return True
            length = (message[1] << 16) | (message[2] << 8) | message[3]
            if length < HELLO_PREFIX - 4:
                raise ServerViolation("the server sent a ServerHello of %d bytes" % length)
            if len(message) < HELLO_PREFIX:
                continue
            self._skip = length - (HELLO_PREFIX - 4)
            self._message = bytearray()
            if message[6:HELLO_PREFIX] != HRR_RANDOM:
                replies.append(Reply.SERVER_HELLO)
                return True
            if self.retried:
                raise ServerViolation("the server sent a second HelloRetryRequest")
            self.retried = True
            replies.append(Reply.RETRY)
        return False


class _Mode(Enum):
    SAFE_ONLY = "safe_only"  # relay records that cannot be a hello; hold from the first one that can
    EXPECT_HELLO = "expect_hello"  # after a retry request: the next handshake message is a ClientHello


class HandshakeWatch:
    """Both directions of one connection from its first allowed ClientHello to the server's answer."""

    __slots__ = ("_buffer", "_first", "_hello", "_holding", "_max_size", "_mode", "_server")

    def __init__(self, first_sni: str | None, max_size: int) -> None:
        self._first = first_sni  # normalised only if a second hello comes
        self._max_size = max_size
        self._mode = _Mode.SAFE_ONLY
        self._buffer = bytearray()  # client bytes not forwarded: a partial record, or all that is held
        self._holding = False  # a record that may be a hello has begun: everything from it waits
        self._hello: HelloReassembler | None = None  # the second ClientHello, once it has begun
        self._server = ServerFlight()

    @property
    def awaiting_client(self) -> bool:
        """A retry request was sent and the second ClientHello is not complete yet."""
        return self._mode is _Mode.EXPECT_HELLO

    @property
    def holding(self) -> bool:
        """Client bytes are waiting (held, or a partial record)."""
        return bool(self._buffer) or self._hello is not None

    def from_client(self, data: bytes) -> bytes:
        """Client bytes: returns what may go to the server now."""
        if self._hello is not None:
            return self._second_hello(data)
        self._buffer += data
        if self._holding:
            if len(self._buffer) > self._max_size + MAX_CIPHERTEXT:
                raise RetryViolation("more than %d bytes held before the server's answer" % len(self._buffer))
            return b""
        return self._walk()

    def from_server(self, data: bytes) -> tuple[bool, bytes]:
        """Server bytes: (the watch is over, client bytes that may go to the server now)."""
        forward = b""
        for reply in self._server.feed(data):
            if reply is Reply.RETRY:
                self._mode = _Mode.EXPECT_HELLO
                self._holding = False
                forward += self._walk()
            elif self._mode is _Mode.EXPECT_HELLO:
                raise ServerViolation("the server answered a HelloRetryRequest before the second ClientHello")
            else:
                forward += bytes(self._buffer)
                self._buffer.clear()
                return True, forward
        return False, forward

    def _walk(self) -> bytes:
        """Pass the whole records at the front of the buffer that cannot be a hello; stop at one that can."""
        buffer = self._buffer
        position = 0
        try:
            while len(buffer) - position >= RECORD_HEADER:
                kind, length = _check_header(buffer, position, "the client")
                if kind == HANDSHAKE:
                    break
                if len(buffer) - position < RECORD_HEADER + length:
                    break
                position += RECORD_HEADER + length
            else:
                if position < len(buffer) and buffer[position] not in CONTENT_TYPES:
                    raise ValueError("the client sent a non-TLS record (type 0x%02x)" % buffer[position])
        except ValueError as error:
            raise RetryViolation(str(error)) from None
        forward = bytes(buffer[:position])
        del buffer[:position]
        if buffer and buffer[0] == HANDSHAKE:
            if self._mode is _Mode.EXPECT_HELLO:
                rest = bytes(buffer)
                buffer.clear()
                self._hello = HelloReassembler(self._max_size)
                return forward + self._second_hello(rest)
            self._holding = True
        return forward

    def _second_hello(self, data: bytes) -> bytes:
        reader = self._hello
        hello = reader.feed(data)
        if hello.state is HelloState.NEED_MORE:
            return b""
        if hello.state is HelloState.ERROR:
            raise RetryViolation("second ClientHello after HelloRetryRequest: " + hello.error)
        first, second = sni_key(self._first), sni_key(hello.sni)
        if second != first:
            raise RetryViolation(
                "second ClientHello after HelloRetryRequest names %s, the first named %s"
                % (_shown(second), _shown(first)),
                second or "",
            )
        # Same name: the hello goes on; what follows it waits for the server's next message.
        self._hello = None
        self._mode = _Mode.SAFE_ONLY
        self._buffer = bytearray(reader.data[reader.end :])
        return bytes(reader.data[: reader.end]) + self._walk()


def _shown(name: str | None) -> str:
    return "no name" if name is None else repr(name)
