"""The feed's bodies (docs/feed-protocol.md): gzip NDJSON, a header line, then records.

A snapshot is every filing; a change set is the filings changed after a serial (upserts, as
filing records) and `{"remove": licence}` lines, oldest change first. Both headers carry the
serial the body brings the registry to and the registry checksum at that serial.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import BinaryIO

from ..registry.filings import Filing
from ..registry.interchange import TOO_DEEP, ParsedFiling, RecordError, parse_filing, shown
from ..registry.licence import LicenceError, parse_licence

FORMAT = "icpgate-feed/2"  # 2: the checksum is a sum of digests (docs/feed-protocol.md)
# Formats and releases (docs/feed-protocol.md): what this release reads and writes, newest first; what
# a publisher sends an edge that names none (every release since 0.1.0 reads it); and the headers
# an edge names its formats in, and a publisher the format of its answer (or, refusing, its own).
FORMATS = (FORMAT,)
BASELINE = "icpgate-feed/2"
FORMATS_HEADER = "Icpgate-Feed-Formats"
FORMAT_HEADER = "Icpgate-Feed-Format"
MAX_INFLATION = 20  # an inflated body may be this many times `feed.max_body`: refuse gzip bombs
_INFLATE_STEP = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SyncResult(StrEnum):
    """The outcome of one sync; also the `result` label of the sync metrics."""

    APPLIED = "applied"
    UNCHANGED = "unchanged"
    ERROR = "error"  # the publisher could not be reached or answered badly: try again later
    REFUSED_MALFORMED = "refused_malformed"
    REFUSED_SIGNATURE = "refused_signature"
    REFUSED_ROLLBACK = "refused_rollback"
    REFUSED_GUARD = "refused_guard"
    REFUSED_CHECKSUM = "refused_checksum"


class FeedError(Exception):
    """A sync that failed, with the result it counts as and what to tell the operator."""

    def __init__(self, result: SyncResult, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.message = message


@dataclass(frozen=True, slots=True)
class Header:
    kind: str  # "snapshot" or "changes"
    serial: int  # the registry's serial once the body is applied
    since: int | None  # changes: the serial they start from
    generated_at: str
    records: int  # the lines that follow the header
    sha256: str  # the registry checksum at `serial`

    def to_json(self) -> str:
        header = {"format": FORMAT, "kind": self.kind, "serial": self.serial, "generated_at": self.generated_at,
                  "records": self.records, "sha256": self.sha256}  # fmt: skip
        if self.since is not None:
            header["since"] = self.since
        return json.dumps(header)


def choose(accepted: str | None) -> str | None:
    """The format to answer an edge with: the newest that both know, the baseline for an edge that
    names none (0.1.0), None when there is none in common."""
    if accepted is None:
        return BASELINE
    theirs = {item.strip() for item in accepted.split(",")}
    return next((name for name in FORMATS if name in theirs), None)


# --- writing (the publisher) --------------------------------------------------------------------


async def write_snapshot(header: Header, filings: AsyncIterable[Filing], out: BinaryIO) -> None:
    """Stream a snapshot into `out` (an open binary file), compressing as it goes."""
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as stream:
        stream.write(header.to_json().encode() + b"\n")
        lines: list[bytes] = []
        async for filing in filings:
            lines.append(filing.canonical_bytes())
            if len(lines) >= 4096:
                stream.write(b"\n".join(lines) + b"\n")
                lines = []
        if lines:
            stream.write(b"\n".join(lines) + b"\n")


def encode_changes(header: Header, changes: Iterable[tuple[str, Filing | None]]) -> bytes:
    lines = [header.to_json()]
    for licence, filing in changes:
        lines.append(filing.canonical_json() if filing else json.dumps({"remove": licence}, ensure_ascii=False))
    return gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6, mtime=0)


# --- reading (the client) -----------------------------------------------------------------------


@dataclass
class Body:
    """A decoded body: its header, then its records as the registry's import takes them."""

    header: Header
    records: Iterator[ParsedFiling | RecordError]  # a snapshot streams; read it once
    removals: list[str]


def decode(data: bytes, max_inflated: int, expect: str) -> Body:
    """Check the header now; the records of a snapshot are checked as they are read."""
    lines = _inflate_lines(data, max_inflated)
    first = next(lines, None)
    if first is None:
        raise FeedError(SyncResult.REFUSED_MALFORMED, "the body is empty")
    header = _header(first, expect)
    records = _records(lines, header)
    if header.kind == "snapshot":
        return Body(header, records, [])
    upserts: list[ParsedFiling | RecordError] = []
    removals: list[str] = []
    for item in records:
        if isinstance(item, _Removal):
            removals.append(item.licence)
        else:
            upserts.append(item)
    return Body(header, iter(upserts), removals)


@dataclass(frozen=True, slots=True)
class _Removal:
    licence: str


def _records(lines: Iterator[bytes], header: Header) -> Iterator[ParsedFiling | RecordError | _Removal]:
    count = 0
    line = 1
    for line, raw in enumerate(lines, start=2):
        if not raw.strip():
            continue
        count += 1
        try:
            record = json.loads(raw)
        except RecursionError:  # what json.loads refuses beside syntax, as `icpgate import` does
            yield RecordError(line, "", TOO_DEEP)
            continue
        except ValueError as error:  # syntax, undecodable bytes, an integer of more than 4300 digits
            yield RecordError(line, "", "not valid JSON: %s" % getattr(error, "msg", error))
            continue
        if isinstance(record, dict) and "remove" in record and header.kind == "changes":
            yield _removal(record, line)
            continue
        try:
            yield parse_filing(record, line)
        except RecordError as error:
            yield error
    if count != header.records:
        yield RecordError(line, "records", "the header announces %d records, the body has %d: truncated?"
                          % (header.records, count))  # fmt: skip


def _removal(record: dict, line: int) -> _Removal | RecordError:
    if set(record) != {"remove"} or not isinstance(record["remove"], str):
        return RecordError(line, "remove", 'a removal is {"remove": "<website licence>"} and nothing else')
    try:
        return _Removal(parse_licence(record["remove"]).normalized)
    except LicenceError as error:
        return RecordError(line, "remove", str(error))


def _header(raw: bytes, expect: str) -> Header:
    def refuse(field: str, message: str) -> FeedError:
        return FeedError(SyncResult.REFUSED_MALFORMED, "line 1: %s: %s" % (field, message))

    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # syntax, undecodable bytes, too deep, too long an integer
        raise refuse("header", "not a JSON object") from None
    if not isinstance(header, dict):
        raise refuse("header", "not a JSON object")
    if header.get("format") not in FORMATS:
        raise refuse(
            "format", "%s is not one this release reads (%s)" % (shown(header.get("format")), ", ".join(FORMATS))
        )
    if header.get("kind") != expect:
        raise refuse("kind", "expected %r, got %s" % (expect, shown(header.get("kind"))))
    for field in ("serial", "records") + (("since",) if expect == "changes" else ()):
        value = header.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise refuse(field, "must be a whole number, got %s" % shown(value))
    if not isinstance(header.get("sha256"), str) or not _HEX64.fullmatch(header["sha256"]):
        raise refuse("sha256", "must be 64 lowercase hex digits")
    if not isinstance(header.get("generated_at"), str):
        raise refuse("generated_at", "must be an RFC 3339 timestamp")
    return Header(expect, header["serial"], header.get("since"), header["generated_at"], header["records"],
                  header["sha256"])  # fmt: skip


def _inflate_lines(data: bytes, limit: int) -> Iterator[bytes]:
    """The lines of a gzip body, inflated step by step and never past `limit` bytes."""
    inflater = zlib.decompressobj(wbits=31)
    position = total = 0
    pending = b""
    while not inflater.eof:
        if inflater.unconsumed_tail:
            chunk = inflater.unconsumed_tail
        elif position < len(data):
            chunk = data[position : position + _INFLATE_STEP]
            position += len(chunk)
        else:
            raise FeedError(SyncResult.REFUSED_MALFORMED, "the gzip stream ends early: truncated body")
        try:
            out = inflater.decompress(chunk, _INFLATE_STEP)
        except zlib.error as error:
            raise FeedError(SyncResult.REFUSED_MALFORMED, "not a valid gzip body: %s" % error) from None
        total += len(out)
        if total > limit:
            raise FeedError(SyncResult.REFUSED_MALFORMED, "the body inflates past %d bytes" % limit)
        pending += out
        *lines, pending = pending.split(b"\n")
        yield from lines
    if inflater.unused_data or position < len(data):
        raise FeedError(SyncResult.REFUSED_MALFORMED, "bytes after the end of the gzip stream")
    if pending:
        yield pending
