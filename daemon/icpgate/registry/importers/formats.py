"""What `icpgate import` reads: NDJSON, a spreadsheet's CSV, or a download file of the national
filing system (miit-xml), each possibly gzip-compressed; the format and the text encoding are
detected from the content when not given."""

from __future__ import annotations

import codecs
import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import BinaryIO

from ...config.display_time import BEIJING
from ..interchange import ParsedFiling, RecordError, read_ndjson
from ..staging import StagedFiling
from .miit_lookup import stored_filings
from .miit_xml import Cancellations, MiitOptions, has_cancellations, read_download, scan_cancellations
from .pool import MIN_SIZE, read_ndjson_in_pool
from .spreadsheet import read_spreadsheet

FORMATS = ("ndjson", "csv", "miit-xml")
_SNIFF = 65536
MAX_JOBS = 4  # parsing processes by default: beyond this the one SQLite writer is the bottleneck


def path_text(path: Path) -> str:
    """The file's name as UTF-8 text, a byte that is not UTF-8 as its `\\xff` escape: the name as
    given holds such bytes as lone surrogates, which neither SQLite (the imports' log) nor a strict
    stdout can write."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(slots=True)
class ImportOptions:
    encoding: str | None = None  # for CSV; None: UTF-8 when it decodes as such, else GB18030 (GBK)
    default_timezone: tzinfo = BEIJING
    isp_ids: dict[str, str] = field(default_factory=dict)
    cancellations: Cancellations = field(default_factory=Cancellations)
    notes: list[str] = field(default_factory=list)  # file-level remarks for the operator
    jobs: int | None = None  # processes that parse NDJSON; None: one per CPU but one (at most 4) for a large file


def open_input(path: Path) -> BinaryIO:
    """The file's bytes, inflated when it is gzip (by its magic number, whatever its name)."""
    stream = path.open("rb")
    if stream.read(2) == b"\x1f\x8b":
        stream.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    stream.seek(0)
    return stream


def detect_format(path: Path) -> str:
    """By content first (an XML document, a JSON object), then by suffix (`.csv`, `.xml`)."""
    with open_input(path) as stream:
        head = stream.read(_SNIFF)
    text = head.lstrip(codecs.BOM_UTF8).lstrip()
    if text.startswith((b"<?xml", b"<DownloadData")):
        return "miit-xml"
    if text.startswith(b"{"):
        return "ndjson"
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if ".xml" in suffixes:
        return "miit-xml"
    if ".csv" in suffixes or ".txt" in suffixes:
        return "csv"
    return "ndjson" if ".ndjson" in suffixes or ".jsonl" in suffixes else "csv"


def detect_encoding(head: bytes) -> str:
    """UTF-8 (with or without Excel's byte-order mark) when the text decodes as such, else GB18030,
    the superset of the GBK that Chinese Excel and WPS write."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "gb18030"
    return "utf-8"


async def prepare(path: Path, fmt: str, options: ImportOptions, registry) -> None:
    """Before a download file is read: its cancellations, and the stored filings they name."""
    if fmt != "miit-xml":
        return
    with open_input(path) as stream:
        if not has_cancellations(stream):
            return
    with open_input(path) as stream:
        try:
            options.cancellations.items = scan_cancellations(stream)
        except RecordError:
            return  # the reading pass reports it with its line
    options.cancellations.stored = await stored_filings(registry, options.cancellations.items)


def read_any(path: Path, fmt: str, options: ImportOptions) -> Iterator[ParsedFiling | StagedFiling | RecordError]:
    """Each record of the file, parsed, or the error that refuses it (with the file's name)."""
    if fmt == "csv" and options.encoding is None:
        with open_input(path) as stream:
            options.encoding = detect_encoding(stream.read(_SNIFF))
    jobs = options.jobs
    if jobs is None:
        # one CPU is the importer's own: it reads the lines and writes what the workers hand back
        jobs = min(MAX_JOBS, (os.cpu_count() or 1) - 1) if path.stat().st_size >= MIN_SIZE else 1
    source = path_text(path)
    with open_input(path) as stream:
        try:
            for item in _records(stream, fmt, options, jobs):
                if isinstance(item, RecordError):
                    item.source = source
                yield item
        except RecordError as error:  # unreadable text or XML ends the file: nothing after is trustworthy
            error.source = source
            yield error
        except (OSError, EOFError) as error:  # a truncated or corrupt gzip stream
            yield RecordError(0, "", "cannot read: %s" % error, source)


def _records(stream: BinaryIO, fmt: str, options: ImportOptions,
             jobs: int) -> Iterator[ParsedFiling | StagedFiling | RecordError]:  # fmt: skip
    if fmt == "miit-xml":
        miit = MiitOptions(options.default_timezone, options.isp_ids, options.cancellations, notes=options.notes)
        yield from read_download(stream, miit)
    elif fmt == "csv":
        yield from read_spreadsheet(_lines(stream, options.encoding or "utf-8"), options.default_timezone,
                                    options.notes)  # fmt: skip
    elif jobs > 1:
        yield from read_ndjson_in_pool(_lines(stream, options.encoding or "utf-8"), jobs)
    else:
        yield from read_ndjson(_lines(stream, options.encoding or "utf-8"))


def _lines(stream: BinaryIO, encoding: str) -> Iterator[str]:
    """Decoded lines; an undecodable one ends the file with its line number (and column, when the
    file was cut inside a character)."""
    decode = codecs.getdecoder(encoding)
    for line, raw in enumerate(stream, start=1):
        try:
            text = decode(raw)[0]
        except UnicodeDecodeError as error:
            raise _undecodable(raw, encoding, error, line) from None
        yield text.removeprefix("\ufeff") if line == 1 else text


def _undecodable(raw: bytes, encoding: str, error: UnicodeDecodeError, line: int) -> RecordError:
    """A last line (no newline) that decodes but for an incomplete character at its end was cut
    there: say so, rather than suggest another encoding."""
    what = "UTF-8" if encoding.startswith("utf") else encoding.upper()
    if not raw.endswith(b"\n"):
        try:
            codecs.getincrementaldecoder(encoding)().decode(raw, final=False)
        except UnicodeDecodeError:
            pass
        else:
            column = len(raw[: error.start].decode(encoding, errors="replace")) + 1
            return RecordError(line, "", "truncated: the file ends at column %d, inside a multi-byte %s character"
                               " (byte %d of the line)" % (column, what, error.start + 1))  # fmt: skip
    return RecordError(line, "", "not %s (byte %d); give --encoding if it is another one" % (what, error.start + 1))
