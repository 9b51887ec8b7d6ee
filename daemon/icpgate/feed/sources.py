"""Where bodies come from: a publisher over HTTP(S), or files (`file:` URLs) for sites without one.

A source answers two questions, `snapshot()` and `changes(since, wait)`, with a `Fetched`: a body
(with its signature), or word that nothing changed, that the history is gone (take a snapshot),
or that the source is behind us (a rollback).
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import aiohttp

from ..config.settings import FeedConfig
from .protocol import FORMATS, FORMATS_HEADER, FeedError, SyncResult
from .signing import SIGNATURE_HEADER

SERIAL_HEADER = "Icpgate-Serial"  # the publisher's serial, on every answer
CHECKSUM_HEADER = "Icpgate-Checksum"  # its registry's checksum at that serial (unsigned: for monitoring)
POLL_HEADER = "Icpgate-Poll-Interval"  # the least wait between polls the publisher asks for


class Answer(Enum):
    BODY = "body"
    UNCHANGED = "unchanged"
    GONE = "gone"  # the changes since our serial are no longer known: take a snapshot
    BEHIND = "behind"  # the source's serial is below ours


@dataclass(frozen=True, slots=True)
class Fetched:
    answer: Answer
    body: bytes = b""
    signature: str | None = None
    serial: int | None = None  # the source's serial, when it said
    poll_interval: float = 0.0  # the source's hint
    etag: str = ""
    checksum: str | None = None  # the source's checksum at `serial`, when it said (not signed)


class HttpSource:
    """A publisher: `<base>/snapshot` and `<base>/changes?since=N&wait=S`."""

    def __init__(self, url: str, config: FeedConfig, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.config = config
        self.session = session

    async def snapshot(self, etag: str = "") -> Fetched:
        headers = {"If-None-Match": etag} if etag else {}
        return await self._get(self.url + "/snapshot", {}, headers, 0.0)

    async def changes(self, since: int, wait: float) -> Fetched:
        return await self._get(self.url + "/changes", {"since": str(since), "wait": "%g" % wait}, {}, wait)

    async def _get(self, url: str, params: dict, headers: dict, wait: float) -> Fetched:
        config = self.config
        headers = {FORMATS_HEADER: ", ".join(FORMATS)} | headers  # the publisher answers in one of them
        timeout = aiohttp.ClientTimeout(total=config.total_timeout + wait, connect=config.connect_timeout,
                                        sock_read=config.read_timeout + wait)  # fmt: skip
        try:
            async with self.session.get(url, params=params, headers=headers, timeout=timeout,
                                        auto_decompress=False) as response:  # fmt: skip
                hint = _float(response.headers.get(POLL_HEADER))
                serial = _int(response.headers.get(SERIAL_HEADER))
                checksum = response.headers.get(CHECKSUM_HEADER)
                if response.status == 200:
                    body = await self._read(response)
                    return Fetched(Answer.BODY, body, response.headers.get(SIGNATURE_HEADER), serial, hint,
                                   response.headers.get("ETag", ""), checksum)  # fmt: skip
                if response.status in (204, 304):
                    return Fetched(Answer.UNCHANGED, serial=serial, poll_interval=hint, checksum=checksum)
                if response.status == 410:
                    return Fetched(Answer.GONE, serial=serial, poll_interval=hint)
                if response.status == 409:
                    return Fetched(Answer.BEHIND, serial=serial, poll_interval=hint)
                if response.status == 406:
                    raise FeedError(SyncResult.ERROR, "%s speaks feed formats %s, this edge reads %s: upgrade the"
                                    " older of the two (docs/upgrading.md)" % (url, response.headers.get(
                                        FORMATS_HEADER, "?"), ", ".join(FORMATS)))  # fmt: skip
                raise FeedError(SyncResult.ERROR, "%s answered %d %s" % (url, response.status, response.reason))
        except TimeoutError:
            raise FeedError(SyncResult.ERROR, "%s: timed out" % url) from None
        except aiohttp.ClientError as error:
            raise FeedError(SyncResult.ERROR, "%s: %s" % (url, error or type(error).__name__)) from None

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.config.max_body
        if (response.content_length or 0) > limit:
            raise FeedError(SyncResult.ERROR, "the body is %d bytes, more than feed.max_body %d"
                            % (response.content_length, limit))  # fmt: skip
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise FeedError(SyncResult.ERROR, "the body exceeds feed.max_body %d" % limit)
            chunks.append(chunk)
        return b"".join(chunks)


class FileSource:
    """A snapshot file, or a folder of snapshot and change files as the publisher serves them
    (any names ending in `.ndjson.gz`, each with its `.sig` when signed). Files are told apart by
    their header; new files are noticed by polling the folder."""

    POLL = 1.0

    def __init__(self, url: str, config: FeedConfig) -> None:
        self.url = url
        self.path = Path(url.removeprefix("file:").removeprefix("//"))
        self.config = config
        self._headers: dict[tuple[Path, int, int], dict] = {}

    async def snapshot(self, etag: str = "") -> Fetched:
        snapshots = [(header["serial"], path) for path, header in self._files() if header.get("kind") == "snapshot"]
        if not snapshots:
            raise FeedError(SyncResult.ERROR, "%s: no snapshot file" % self.path)
        return self._fetched(max(snapshots)[1])

    async def changes(self, since: int, wait: float) -> Fetched:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            files = self._files()
            for path, header in files:
                if header.get("kind") == "changes" and header.get("since") == since:
                    return self._fetched(path)
            newest = max((header.get("serial", 0) for _path, header in files), default=0)
            if newest > since:
                return Fetched(Answer.GONE, serial=newest)
            if loop.time() >= deadline:
                return Fetched(Answer.BEHIND if files and newest < since else Answer.UNCHANGED, serial=newest)
            await asyncio.sleep(min(self.POLL, max(0.0, deadline - loop.time())))

    def _files(self) -> list[tuple[Path, dict]]:
        if self.path.is_dir():
            paths = sorted(self.path.glob("*.ndjson.gz"))
        elif self.path.is_file():
            paths = [self.path]
        else:
            raise FeedError(SyncResult.ERROR, "%s: no such file or folder" % self.path)
        return [(path, self._header(path)) for path in paths]

    def _header(self, path: Path) -> dict:
        """The header line of a file, remembered while the file stays the same; {} if unreadable."""
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._headers:
            self._headers[key] = _first_line(path)
        return self._headers[key]

    def _fetched(self, path: Path) -> Fetched:
        if path.stat().st_size > self.config.max_body:
            raise FeedError(SyncResult.ERROR, "%s is larger than feed.max_body" % path)
        signature_file = path.with_name(path.name + ".sig")
        signature = signature_file.read_text().strip() if signature_file.is_file() else None
        return Fetched(Answer.BODY, path.read_bytes(), signature)


class DownloadFolder:
    """A spool folder into which the operator's enterprise-side system drops the national filing
    system's download files, decrypted and unzipped (docs/filings-format.md). `icpgate import FOLDER`
    takes them in name order (the enterprise system numbers them as it downloads), and moves each
    one it imported into `imported/`, so the next run starts where this one stopped. A file still
    being written (changed within the last `settle` seconds) waits for the next run."""

    PATTERNS = ("*.xml", "*.xml.gz", "*.XML")
    DONE = "imported"

    def __init__(self, path: Path, settle: float = 2.0) -> None:
        self.path = path
        self.settle = settle

    def pending(self, now: float) -> list[Path]:
        files = {path for pattern in self.PATTERNS for path in self.path.glob(pattern) if path.is_file()}
        return sorted((path for path in files if now - path.stat().st_mtime >= self.settle), key=_natural)

    def done(self, path: Path) -> Path:
        target = self.path / self.DONE
        target.mkdir(exist_ok=True)
        return path.rename(target / path.name)


def _natural(path: Path) -> list:
    """`download-9.xml` before `download-10.xml`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _first_line(path: Path) -> dict:
    inflater = zlib.decompressobj(wbits=31)
    with path.open("rb") as stream:
        try:
            text = inflater.decompress(stream.read(65536), 65536).split(b"\n", 1)[0]
            header = json.loads(text)
        except (zlib.error, ValueError, RecursionError):
            return {}
    return header if isinstance(header, dict) and header.get("format") in FORMATS else {}


def _float(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
