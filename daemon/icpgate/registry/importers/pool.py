"""NDJSON parsed in a pool of processes: at national scale (a million filings and more) parsing and
digesting is most of an import's CPU, and each line is a record of its own.

The importer reads the lines and hands them out in chunks; each worker parses and digests a
chunk (`read_ndjson`, then the stage rows) and hands back rows and errors; the importer takes them
back chunk by chunk in the file's order, so errors keep their line numbers and order, and the one
SQLite writer stages them as it does the records it parses itself.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from ..interchange import ParsedFiling, RecordError, read_ndjson
from ..staging import StagedFiling, staged

CHUNK = 2000  # lines per task: large enough that handing it over costs little beside parsing it
MIN_SIZE = 16 << 20  # bytes: below this (about 40,000 filings) starting the workers costs more than they save


def read_ndjson_in_pool(lines: Iterator[str], jobs: int, chunk: int = CHUNK) -> Iterator[StagedFiling | RecordError]:
    """What `read_ndjson(lines)` yields, staged, parsed by `jobs` processes. An error reading the
    lines themselves (RecordError: undecodable text) is raised after every record before it."""
    # forkserver, not fork: the importer has threads (the SQLite connection's) that a fork would copy mid-work
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("forkserver")) as pool:
        pending: deque[Future] = deque()
        texts: list[str] = []
        first = 1

        def hand_out() -> None:
            nonlocal texts, first
            pending.append(pool.submit(_parse, first, texts))
            first += len(texts)
            texts = []

        try:
            for text in lines:
                texts.append(text)
                if len(texts) == chunk:
                    hand_out()
                    if len(pending) > 2 * jobs:  # bounded: the file is not read far ahead of the writer
                        yield from pending.popleft().result()
        except RecordError:  # the lines read before it are records of the file all the same
            if texts:
                hand_out()
            while pending:
                yield from pending.popleft().result()
            raise
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        if texts:
            hand_out()
        while pending:
            yield from pending.popleft().result()


def _parse(first: int, texts: list[str]) -> list[StagedFiling | RecordError]:
    """One chunk, in a worker: lines `first`, `first + 1`, ... parsed and staged."""
    return [staged(item) if isinstance(item, ParsedFiling) else item for item in read_ndjson(texts, first)]
