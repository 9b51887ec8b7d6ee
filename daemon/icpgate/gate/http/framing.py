"""Strict HTTP/1.1 chunked framing, tracked by length: where does a chunked message end?

The request inspector and the response tracker both need the exact byte at which a chunked body
ends, without copying or re-scanning it: the chunk data is skipped by its declared size, and only
the short size lines and the trailer section are looked at. Cost is linear in the bytes received,
whatever they contain (a chunk full of line feeds costs what any other chunk costs), and whatever
their shape: stepping chunk by chunk in Python costs about a microsecond a chunk, so a body of
1-byte chunks (`1\r\na\r\n`, six bytes each) would cost 40 times what its bytes are worth. Runs of
chunks of 1 to 255 bytes and runs of trailer fields are therefore each stepped over by one regular
expression (in C, no Python per chunk); only chunks of 256 bytes or more, whose data is skipped by
length, are stepped one by one, and those cost a microsecond per 256 bytes at most.

Stricter than RFC 9112 allows, on purpose: chunk extensions, bare LF line ends and whitespace in
size lines are refused. Backends disagree on those (that is how requests are smuggled), real
clients do not send them, and refusing is always safe for a gate.
"""

from __future__ import annotations

import re

MAX_SIZE_LINE = 18  # 16 hex digits and CRLF
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")
# One trailer field: a token name, a colon, a value of visible characters, spaces and tabs.
_FIELD = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t \x21-\x7e\x80-\xff]*\r\n"
_TRAILER_FIELD = re.compile(_FIELD)
_TRAILER_FIELDS = re.compile(rb"(?:%s)*+" % _FIELD)  # a run of them, in one call


def _small_chunks() -> re.Pattern[bytes]:
    """A run of whole chunks of 1 to 255 bytes (size line, data, CRLF), each size spelled as the
    size line allows: upper or lower case, leading zeros up to 16 digits in all.

    A regular expression cannot read a length, so each size is its own branch, grouped by first
    digit: a chunk costs a few dozen one-byte tests at most. Possessive repeats keep no
    backtracking state, and a branch whose data is not all there fails on its length at once: the
    match is linear in the bytes it covers.
    """

    def digit(value: int) -> str:
        char = "%x" % value
        return "[%s%s]" % (char, char.upper()) if char.isalpha() else char

    def sized(spelling: str, size: int) -> str:
        return "%s\\r\\n.{%d}" % (spelling, size)

    one = "|".join(sized(digit(size), size) for size in range(1, 16))
    two = "|".join(
        "%s(?:%s)" % (digit(high), "|".join(sized(digit(low), high * 16 + low) for low in range(16)))
        for high in range(1, 16)
    )
    pattern = "(?:0{0,15}+(?:%s)\\r\\n|0{0,14}+(?:%s)\\r\\n)*+" % (one, two)
    return re.compile(pattern.encode("ascii"), re.DOTALL)


_SMALL_CHUNKS = _small_chunks()

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class FramingError(ValueError):
    """The bytes are not a chunked body this gate accepts."""


class ChunkedBody:
    """Follow one chunked body across reads. `advance` says how far the body reaches in a buffer."""

    __slots__ = ("_carry", "_remaining", "_state", "_trailer_size", "max_trailer_size")

    def __init__(self, max_trailer_size: int) -> None:
        self.max_trailer_size = max_trailer_size
        self._state = _SIZE
        self._remaining = 0
        self._trailer_size = 0
        self._carry = bytearray()  # the start of a line split across reads (short: bounded)

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def advance(self, data: bytes | bytearray, start: int = 0) -> int:
        """Consume body bytes from `data[start:]`; return the offset just past the last one.

        That is the end of the body (then `done` is true), or the end of `data`: a line split
        across reads is kept here and completed by the next call. Raises FramingError.
        """
        pos, end = start, len(data)
        while pos < end and self._state != _DONE:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            if not self._carry:  # at the start of a line: step over whole runs first, in one call each
                if state == _SIZE:
                    pos = _SMALL_CHUNKS.match(data, pos, end).end()
                elif state == _TRAILER:
                    budget = self.max_trailer_size - self._trailer_size
                    run_end = _TRAILER_FIELDS.match(data, pos, min(end, pos + budget)).end()
                    self._trailer_size += run_end - pos
                    pos = run_end
                if pos == end:
                    break
            limit = self._line_limit() - len(self._carry)
            newline = data.find(b"\n", pos, min(end, pos + limit))
            if newline < 0:
                if end - pos >= limit:
                    raise FramingError(self._overlong())
                self._carry += data[pos:end]
                return end
            line_end = newline + 1
            if self._carry:
                self._carry += data[pos:line_end]
                line = bytes(self._carry)
                self._carry.clear()
            else:
                line = data[pos:line_end]
            pos = line_end
            self._read_line(line)
        return pos

    def _line_limit(self) -> int:
        if self._state == _SIZE:
            return MAX_SIZE_LINE
        if self._state == _DATA_END:
            return 2
        return self.max_trailer_size - self._trailer_size

    def _overlong(self) -> str:
        if self._state == _SIZE:
            return "malformed chunk size line"
        if self._state == _DATA_END:
            return "chunk data longer than its size"
        return "trailer section larger than %d bytes" % self.max_trailer_size

    def _read_line(self, line: bytes | bytearray) -> None:
        state = self._state
        if state == _SIZE:
            match = _SIZE_LINE.fullmatch(line)
            if match is None:
                raise FramingError("malformed chunk size line (extensions, spaces and bare LF are refused)")
            size = int(match.group(1), 16)
            self._state, self._remaining = (_DATA, size) if size else (_TRAILER, 0)
        elif state == _DATA_END:
            if line != b"\r\n":
                raise FramingError("chunk data longer than its size")
            self._state = _SIZE
        elif line == b"\r\n":
            self._state = _DONE
        elif _TRAILER_FIELD.fullmatch(line) is None:
            raise FramingError("malformed trailer field")
        else:
            self._trailer_size += len(line)
