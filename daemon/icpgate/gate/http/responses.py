"""Follow the backend's HTTP/1.x responses, so the gate always knows which answer it is reading.

Every request the gate forwards is announced with `expect`; the tracker reads the status line and
framing headers of each response, skips its body by length (or by chunked framing), and pairs it
with its request. That is what makes two decisions safe: whether an Upgrade or CONNECT was really
accepted (a `101` inside an earlier response's body is body, not an answer), and when every
forwarded request has been answered, so a blocked pipelined request gets its block page right then.

Response bytes are never held or copied: the tracker only reads them. A response it cannot frame
is a protocol error and the connection is closed (fail closed). A read that is exactly one whole
plain response to a plain request is recognised by the compiled engine when it is built.
"""

from __future__ import annotations

import re
from collections import deque

from .engine import compiled
from .framing import ChunkedBody, FramingError

NO_SWITCH, UPGRADE, CONNECT = 0, 1, 2
HEAD_END = b"\r\n\r\n"

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: [\t \x21-\x7e\x80-\xff]*)?\r\n")
_FRAMING_FIELD = re.compile(rb"\n(content-length|transfer-encoding):[ \t]*([^\r]*)", re.IGNORECASE)

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _TUNNEL = range(5)
_PLAIN_REQUEST = (False, NO_SWITCH)  # not HEAD, no Upgrade or CONNECT: the answer frames itself
_whole_plain_response = compiled.whole_plain_response if compiled is not None else None


class ResponseTracker:
    """One per plain-HTTP connection. Not thread-safe; cheap per response."""

    __slots__ = ("_buffer", "_chunked", "_expected", "_remaining", "_state", "max_head_size", "switched")

    def __init__(self, max_head_size: int) -> None:
        self.max_head_size = max_head_size
        self._expected: deque[tuple[bool, int]] = deque()  # (is HEAD request, switch kind) per request
        self._buffer = bytearray()  # a response head split across reads
        self._state = _HEAD
        self._remaining = 0
        self._chunked: ChunkedBody | None = None
        # Set when the answer to an Upgrade/CONNECT request has been read: True when the
        # connection switched protocols (a tunnel from then on), False when the backend refused.
        self.switched: bool | None = None

    def expect(self, head_request: bool, switch: int) -> None:
        """A request was forwarded: its response comes after those of the earlier ones."""
        self._expected.append((head_request, switch))

    @property
    def idle(self) -> bool:
        """Every forwarded request has been answered in full."""
        return not self._expected and self._state == _HEAD and not self._buffer

    @property
    def tunnel(self) -> bool:
        return self._state == _TUNNEL

    def feed(self, data: bytes, stop_when_idle: bool = False) -> int:
        """Read one chunk of response bytes; return how many of them to pass to the client.

        That is all of them, except when `stop_when_idle` is set and the last expected response
        ends inside the chunk: then the length up to its end (what follows was never asked for).
        Raises FramingError for a response that cannot be framed.
        """
        pos, end = 0, len(data)
        if self._state == _HEAD and not self._buffer:
            if (_whole_plain_response is not None and self._expected and self._expected[0] == _PLAIN_REQUEST
                    and _whole_plain_response(data, self.max_head_size)):  # fmt: skip
                self._expected.popleft()  # the whole answer to the oldest request, and nothing else
                return end
            # The common case first: a chunk that starts with a whole response head.
            head_end = data.find(HEAD_END) + 4
            if 4 <= head_end <= self.max_head_size:
                self._begin_body(data[:head_end])
                if self._state == _LENGTH and self._remaining == end - head_end:
                    self._state, self._remaining = _HEAD, 0  # and it holds exactly its body
                    return end
                if self._state == _TUNNEL:
                    return end
                pos = head_end
                if stop_when_idle and self.idle:
                    return pos
        while pos < end:
            state = self._state
            if state == _LENGTH:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HEAD
            elif state == _HEAD:
                pos = self._read_head(data, pos)
                if pos < 0:
                    return end  # the head continues in the next chunk
                if self._state == _TUNNEL:
                    return end
            elif state == _CHUNKED:
                pos = self._chunked.advance(data, pos)
                if self._chunked.done:
                    self._chunked = None
                    self._state = _HEAD
            else:  # _UNTIL_CLOSE or _TUNNEL: everything else is body
                return end
            if stop_when_idle and self.idle:
                return pos
        return end

    def _read_head(self, data: bytes, pos: int) -> int:
        """Parse a response head starting at `pos`; return the offset after it, or -1 if incomplete."""
        if self._buffer:
            prior = len(self._buffer)
            self._buffer += data[pos:]
            found = self._buffer.find(HEAD_END, max(0, prior - 3))
            if found < 0:
                self._check_head_size(len(self._buffer))
                return -1
            head_end = found + len(HEAD_END)
            self._check_head_size(head_end)
            head = bytes(self._buffer[:head_end])
            self._buffer.clear()
            self._begin_body(head)
            return pos + head_end - prior
        found = data.find(HEAD_END, pos)
        if found < 0:
            self._check_head_size(len(data) - pos)
            self._buffer += data[pos:]
            return -1
        head_end = found + len(HEAD_END)
        self._check_head_size(head_end - pos)
        self._begin_body(data[pos:head_end])
        return head_end

    def _check_head_size(self, size: int) -> None:
        if size > self.max_head_size:
            raise FramingError("response header section larger than %d bytes" % self.max_head_size)

    def _begin_body(self, head: bytes) -> None:
        status_line = _STATUS_LINE.match(head)
        if status_line is None:
            raise FramingError("malformed response status line")
        if head.count(b"\n") != head.count(b"\r\n"):
            # Where a bare LF ends a line is where readers disagree. (A folded line is harmless
            # here: the framing fields are found only at the start of a line.)
            raise FramingError("bare LF in the response header section")
        status = int(status_line.group(1))
        expected = self._expected[0] if self._expected else None  # None: an answer nobody asked for
        if status < 200:
            if status != 101:
                return  # interim (100 Continue, 103 Early Hints): the final answer follows
            if expected is None or expected[1] != UPGRADE:
                raise FramingError("101 Switching Protocols for a request that asked for no upgrade")
            self._expected.popleft()
            self._state = _TUNNEL
            self.switched = True
            return
        if expected is not None:
            self._expected.popleft()
            if expected[1] != NO_SWITCH:
                if expected[1] == CONNECT and status < 300:
                    self._state = _TUNNEL
                    self.switched = True
                    return
                self.switched = False
        if (expected is not None and expected[0]) or status == 204 or status == 304:
            return  # no body, whatever the headers say
        self._frame_body(head)

    def _frame_body(self, head: bytes) -> None:
        lower = head.lower()
        length_at = lower.find(b"\ncontent-length:")
        if (
            length_at >= 0
            and b"\ntransfer-encoding:" not in lower
            and lower.find(b"\ncontent-length:", length_at + 16) < 0
        ):
            # The common case: one Content-Length, no Transfer-Encoding.
            value = head[length_at + 16 : head.index(b"\r", length_at + 16)].strip(b" \t")
            if not value.isdigit() or len(value) > 18:
                raise FramingError("malformed response Content-Length")
            self._remaining = int(value)
            if self._remaining:
                self._state = _LENGTH
            return
        lengths: set[bytes] = set()
        encodings: list[bytes] = []
        for name, value in _FRAMING_FIELD.findall(head):
            value = value.rstrip(b" \t")
            if len(name) == 14:  # content-length
                lengths.add(value)
            else:
                encodings.append(value)
        if encodings:
            if lengths:
                raise FramingError("response with both Content-Length and Transfer-Encoding")
            codings = [c.strip(b" \t").lower() for c in b",".join(encodings).split(b",")]
            if codings[-1] == b"chunked":
                self._chunked = ChunkedBody(self.max_head_size)
                self._state = _CHUNKED
            else:
                self._state = _UNTIL_CLOSE  # RFC 9112 6.3: the body ends when the connection does
        elif lengths:
            if len(lengths) > 1:
                raise FramingError("response with differing Content-Length values")
            length = lengths.pop()
            if not length.isdigit() or len(length) > 18:
                raise FramingError("malformed response Content-Length")
            self._remaining = int(length)
            if self._remaining:
                self._state = _LENGTH
        else:
            self._state = _UNTIL_CLOSE
