"""Candidates for the shared index, measured on this machine: LMDB vs sorted 64-bit hashes in a mapped file.

    python bench/index_candidates.py [KEYS] [DIR]

Both are files mapped read-only into every worker, so their pages are shared through the page
cache. Prints build time, file bytes per key and a 6-label lookup (5 misses, then a hit).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import mmap
import os
import statistics
import tempfile
import time
from array import array
from pathlib import Path

import lmdb

RECORD = "京ICP备0000000001号-1\ta0\nIDC-EXAMPLE\tactive\t203.0.113.0/24 2001:db8::/48".encode()
CALLS = 100_000


def names(count: int) -> list[bytes]:
    return sorted(b"bench-site-%d.cn" % n for n in range(count))


def timed(lookup, labels: list[bytes]) -> float:
    """Median µs for looking up every label of a 6-label name, over 5 rounds."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(CALLS):
            for label in labels:
                if lookup(label) is not None:
                    break
        rounds.append((time.perf_counter() - started) / CALLS * 1e6)
    return statistics.median(rounds)


def lmdb_candidate(keys: list[bytes], folder: Path, labels: list[bytes]) -> None:
    path = folder / "cand.lmdb"
    started = time.perf_counter()
    env = lmdb.open(str(path), subdir=False, map_size=1 << 36, max_dbs=2, writemap=True)
    db = env.open_db(b"domains")
    with env.begin(write=True) as txn:
        cursor = txn.cursor(db)
        cursor.putmulti(((key, RECORD) for key in keys), append=True)
    env.sync(True)
    build = time.perf_counter() - started
    size = (env.info()["last_pgno"] + 1) * env.stat()["psize"]  # the file is sparse up to map_size
    print("lmdb domain->record: build %.1f s, %.0f bytes/key" % (build, size / len(keys)))

    def per_lookup_txn(label: bytes) -> bytes | None:
        with env.begin(db=db) as txn:
            return txn.get(label)

    print("  txn per label:                  %.2f µs" % timed(per_lookup_txn, labels))
    begin = env.begin

    def one_txn(all_labels: list[bytes]) -> bytes | None:
        with begin(db=db, buffers=True) as txn:
            get = txn.get
            for label in all_labels:
                value = get(label)
                if value is not None:
                    return bytes(value)
        return None

    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(CALLS):
            one_txn(labels)
        rounds.append((time.perf_counter() - started) / CALLS * 1e6)
    print("  one txn (buffers) per name:     %.2f µs" % statistics.median(rounds))
    held = env.begin(db=db)

    def held_txn(all_labels: list[bytes]) -> bytes | None:
        get = held.get
        for label in all_labels:
            value = get(label)
            if value is not None:
                return value
        return None

    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(CALLS):
            env.info()  # what noticing a new commit costs when the read txn is held
            held_txn(labels)
        rounds.append((time.perf_counter() - started) / CALLS * 1e6)
    print("  held txn + env.info() per name: %.2f µs" % statistics.median(rounds))
    held.abort()
    env.close()


def hash_candidate(keys: list[bytes], folder: Path, labels: list[bytes]) -> None:
    path = folder / "cand.hashes"
    started = time.perf_counter()
    hashes = array("Q", sorted(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()) for key in keys))
    with path.open("wb") as out:
        hashes.tofile(out)
    build = time.perf_counter() - started
    print("sorted 64-bit hashes (+ records elsewhere): build %.1f s, %.0f bytes/key for the hashes"
          % (build, path.stat().st_size / len(keys)))  # fmt: skip
    with path.open("rb") as source:
        mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped).cast("Q")
    size = len(view)

    def lookup(label: bytes) -> int | None:
        key = int.from_bytes(hashlib.blake2b(label, digest_size=8).digest())
        at = bisect.bisect_left(view, key)
        return at if at < size and view[at] == key else None

    print("  hash + bisect per label:        %.2f µs (no record decoded, no delta)" % timed(lookup, labels))
    view.release()
    mapped.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("keys", type=int, nargs="?", default=1_000_000)
    parser.add_argument("dir", type=Path, nargs="?")
    args = parser.parse_args()
    keys = names(args.keys)
    labels = [b"a.b.c.d.bench-site-12.cn", b"b.c.d.bench-site-12.cn", b"c.d.bench-site-12.cn",
              b"d.bench-site-12.cn", b"bench-site-12.cn"]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print("%d keys" % len(keys))
        lmdb_candidate(keys, Path(folder), labels)
        hash_candidate(keys, Path(folder), labels)
    os.sync()


if __name__ == "__main__":
    main()
