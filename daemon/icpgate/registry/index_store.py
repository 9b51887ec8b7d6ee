"""The shared filings index: one LMDB file beside the registry, mapped by every worker.

Why LMDB: a B+tree in one memory-mapped file, so every worker on a host reads the same page-cache
pages (no per-worker copy), opens it in milliseconds, and sees a writer's commit at its next read
transaction; a write is one transaction, so a reader never sees half of it and `kill -9` in the
middle of one leaves the previous commit intact (docs/performance.md has the measurements).

Layout (named databases):
- `domains`: filed domain (A-label, ASCII) -> licence, status, limit_access and an access key;
- `access`:  access key (12 bytes of BLAKE2b of the access text) -> the filing's access records as
  text, `provider TAB status TAB ips`, one a line: most filings share a few of these, stored once;
- `licences`: licence -> its domains, space-separated: what a patch removes when a filing changes;
- `meta`: format version, the registry serial and checksum the index reflects, filings count, and
  `depth`: no filed domain has more labels, so a lookup skips the labels above it (each skipped
  label is one B-tree search saved; it only grows between rebuilds, which keeps it safe).

Readers (`SharedIndex`) never write. Writers (`sync_index`) hold LMDB's one-writer lock and bring the
index to the registry's serial: a patch from the change log when it reaches back far enough, else a
rebuild; an unusable file (garbage, truncated, another format) is removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from .filings import FilingStatus
from .index import IndexedAccess, IndexedFiling, IPNetwork, Match, access_record

log = logging.getLogger("icpgate.index")

FORMAT = b"icpgate-index/1"
MAP_SIZE = 1 << 38  # address space only: the file grows as it fills (256 GiB is ~2 billion domains)
MAX_READERS = 2048  # one slot per open read transaction; workers use one at a time
_STATUS_CODES = {FilingStatus.APPROVED.value: b"a", FilingStatus.PENDING.value: b"p",
                 FilingStatus.DEREGISTERED.value: b"d"}  # fmt: skip
_STATUSES = {ord(code): FilingStatus(status) for status, code in _STATUS_CODES.items()}
_KEY = 12  # bytes of access key
_TAIL = 2 + _KEY  # status, limit_access, access key after the licence
_CACHE = 65536  # decoded records and access tuples kept per worker
_WRITE_BATCH = 50_000


class IndexError_(RuntimeError):
    """The index file cannot be used; it is rebuilt from the registry."""


def index_path(registry_path: Path) -> Path:
    """Where a registry's index lives: beside it, same name plus `.index` (and `.index-lock`)."""
    return registry_path.with_name(registry_path.name + ".index")


# LMDB allows one open environment per file in a process: readers and writers here share it.
_Key = tuple[str, int]  # path, inode: a file rebuilt under the same name is another environment
_OPEN: dict[_Key, tuple[lmdb.Environment, int]] = {}  # -> (environment, users)
_OPEN_LOCK = threading.Lock()  # syncs run in threads beside the event loop's readers


def _acquire(path: Path) -> tuple[lmdb.Environment, _Key]:
    """This process's environment for the file at `path`, opened on first use (raises IndexError_)."""
    with _OPEN_LOCK:
        return _acquire_locked(path)


def _acquire_locked(path: Path) -> tuple[lmdb.Environment, _Key]:
    with contextlib.suppress(FileNotFoundError):
        key = (str(path), os.stat(path).st_ino)
        held = _OPEN.get(key)
        if held is not None:
            _OPEN[key] = (held[0], held[1] + 1)
            return held[0], key
    env = _open_env(path)
    key = (str(path), os.stat(path).st_ino)
    _OPEN[key] = (env, 1)
    return env, key


def _release(key: _Key) -> None:
    with _OPEN_LOCK:
        env, users = _OPEN[key]
        if users > 1:
            _OPEN[key] = (env, users - 1)
        else:
            del _OPEN[key]
            _DBS.pop(key, None)
            env.close()


def _open_env(path: Path) -> lmdb.Environment:
    """Open the environment, refusing a file LMDB or we cannot use (raises IndexError_)."""
    try:
        env = lmdb.open(str(path), subdir=False, map_size=MAP_SIZE, max_dbs=4, max_readers=MAX_READERS,
                        lock=True, readahead=False, meminit=False)  # fmt: skip
    except lmdb.Error as error:
        raise IndexError_("%s: %s" % (path, error)) from None
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        if path.stat().st_size < needed:  # a truncated file would fault on the missing pages
            raise IndexError_("%s is truncated: %d bytes, %d needed" % (path, path.stat().st_size, needed))
    except BaseException:
        env.close()
        raise
    return env


@dataclass(frozen=True, slots=True)
class IndexMeta:
    serial: int
    checksum: str
    filings: int


class _Dbs:
    """The named databases of one open environment, opened once per environment.

    In a write transaction we begin ourselves (beginning one waits for the writer lock with the
    GIL released): `open_db` without one starts its own while holding the GIL, which deadlocks
    against a writer thread of this process. A handle opened in a read transaction dies with it."""

    def __init__(self, env: lmdb.Environment, *, create: bool) -> None:
        try:
            with env.begin(write=True) as txn:
                self.meta = env.open_db(b"meta", txn=txn, create=create)
                self.domains = env.open_db(b"domains", txn=txn, create=create)
                self.access = env.open_db(b"access", txn=txn, create=create)
                self.licences = env.open_db(b"licences", txn=txn, create=create)
        except lmdb.Error as error:  # NotFoundError: an empty or foreign file
            raise IndexError_("%s has no icpgate index in it (%s)" % (env.path(), error)) from None


_DBS: dict[_Key, _Dbs] = {}  # per open environment, under _OPEN_LOCK


def _dbs_of(env: lmdb.Environment, key: _Key, *, create: bool) -> _Dbs:
    with _OPEN_LOCK:
        dbs = _DBS.get(key)
        if dbs is None:
            dbs = _DBS[key] = _Dbs(env, create=create)
        return dbs


def _read_meta(txn: lmdb.Transaction, dbs: _Dbs) -> IndexMeta | None:
    """The meta record, or None for a file of another format or a build that never finished."""
    if txn.get(b"format", db=dbs.meta) != FORMAT:
        return None
    serial = txn.get(b"serial", db=dbs.meta)
    if serial is None:
        return None
    return IndexMeta(int(serial), txn.get(b"checksum", db=dbs.meta, default=b"").decode(),
                     int(txn.get(b"filings", db=dbs.meta, default=b"0")))  # fmt: skip


class SharedIndex:
    """`FilingIndex` over the shared file: one read transaction per lookup, so each lookup sees
    the latest commit as a whole. Decoded records are cached per process by their stored bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._env, self._key = _acquire(path)
        try:
            self._dbs = _dbs_of(self._env, self._key, create=False)
            with self._env.begin() as txn:
                if _read_meta(txn, self._dbs) is None:
                    raise IndexError_("%s is not an %s index" % (path, FORMAT.decode()))
        except BaseException:
            _release(self._key)
            raise
        self._begin = self._env.begin
        self._domains = self._dbs.domains
        self._records: dict[bytes, IndexedFiling] = {}
        self._accesses: dict[bytes, tuple[IndexedAccess, ...]] = {}
        self._networks: dict[str, IPNetwork] = {}
        self._depth, self._depth_at = 127, -1  # meta `depth`, and the commit it was read at
        self.errors = 0  # lookups that failed (a damaged file): the worker rebuilds when it sees any

    def lookup(self, name: str) -> Match | None:
        if not name.isascii():
            return None  # filed names are A-labels: a name that is not ASCII is filed nowhere
        try:
            return self._lookup(name)
        except lmdb.Error as error:  # fail closed: the name counts as unfiled until the index is rebuilt
            self.errors += 1
            if self.errors == 1:
                log.error("index %s cannot be read (%s): names count as unfiled until it is rebuilt", self.path,
                          error)  # fmt: skip
            return None

    def _lookup(self, name: str) -> Match | None:
        txn = self._begin(db=self._domains)
        try:
            if txn.id() != self._depth_at:
                self._depth = int(txn.get(b"depth", db=self._dbs.meta, default=b"127"))
                self._depth_at = txn.id()
            for _ in range(name.count(".") + 1 - self._depth):  # more labels than any filed domain
                name = name[name.find(".") + 1 :]
            get = txn.get
            while True:
                value = get(name.encode())
                if value is not None:
                    filing = self._records.get(value)
                    if filing is None:
                        filing = self._decode(txn, value)
                    return Match(name, filing)
                dot = name.find(".")
                if dot < 0:
                    return None
                name = name[dot + 1 :]
        finally:
            txn.abort()

    def _decode(self, txn: lmdb.Transaction, value: bytes) -> IndexedFiling:
        access_key = value[-_KEY:]
        access = self._accesses.get(access_key)
        if access is None:
            text = txn.get(access_key, db=self._dbs.access, default=b"").decode()
            access = tuple(self._record(line) for line in text.split("\n") if line)
            if len(self._accesses) >= _CACHE:
                self._accesses.clear()
            self._accesses[access_key] = access
        filing = IndexedFiling(value[:-_TAIL].decode(), _STATUSES[value[-_TAIL]], value[-_TAIL + 1] == 0x31, access)
        if len(self._records) >= _CACHE:
            self._records.clear()
        self._records[value] = filing
        return filing

    def _record(self, line: str) -> IndexedAccess:
        return access_record(line, self._networks, _CACHE)

    def generation(self) -> int:
        """LMDB's id of the latest commit: changes whenever a writer commits, so a cache keyed on
        it never outlives the data it was computed from."""
        try:
            txn = self._begin()
        except lmdb.Error:  # closed: swapped out by a reopen; decisions go through the new index
            return -1
        try:
            return txn.id()
        finally:
            txn.abort()

    def meta(self) -> IndexMeta:
        with self._begin() as txn:
            meta = _read_meta(txn, self._dbs)
        if meta is None:
            raise IndexError_("%s lost its meta record" % self.path)
        return meta

    @property
    def serial(self) -> int:
        return self.meta().serial

    def __len__(self) -> int:
        return self.meta().filings

    @property
    def domain_count(self) -> int:
        with self._begin() as txn:
            return txn.stat(self._domains)["entries"]

    def replaced(self) -> bool:
        """True when the file at `path` is no longer the one this process maps (it was rebuilt)."""
        try:
            return os.stat(self.path).st_ino != self._key[1]
        except FileNotFoundError:
            return True

    def close(self) -> None:
        """Let go of the file; lookups on a closed index fail closed (unfiled)."""
        if self._env is not None:
            self._env = None
            _release(self._key)


# --- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    serial: int
    how: str  # "current", "patched" or "rebuilt"
    changed: int  # filings written or removed
    seconds: float


def access_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=_KEY).digest()


def encode(licence: str, status: str, limit_access: int, key: bytes) -> bytes:
    return licence.encode() + _STATUS_CODES[status] + (b"1" if limit_access else b"0") + key


# One row per filing: licence, status, limit_access, access text, domains (space-separated).
_FILINGS = (
    "SELECT f.licence, f.status, f.limit_access,"
    " (SELECT group_concat(a.provider || char(9) || a.status || char(9) || a.ips, char(10))"
    "  FROM access a WHERE a.filing_id = f.id),"
    " (SELECT group_concat(d.name, ' ') FROM domains d WHERE d.filing_id = f.id)"
    " FROM filings f"
)


def _registry_state(db: sqlite3.Connection) -> tuple[int, int, str, int]:
    """Serial, floor, checksum and filings (kept in `state` since schema 4; counted before)."""
    try:
        return db.execute("SELECT serial, floor, checksum, filings FROM state").fetchone()
    except sqlite3.OperationalError:  # a registry not yet opened by this version: no `filings` column
        serial, floor, checksum = db.execute("SELECT serial, floor, checksum FROM state").fetchone()
        return serial, floor, checksum, db.execute("SELECT COUNT(*) FROM filings").fetchone()[0]


def sync_index(registry_path: Path, *, rebuild: bool = False, progress: bool | None = None) -> SyncOutcome:
    """Bring the index file to the registry's serial and return what was done.

    Runs under LMDB's writer lock, and reads the registry only once it holds it, so concurrent
    callers (workers catching up, the feed client, an import) serialise and the later ones find
    the index current. Blocking: call it in a thread from the event loop."""
    path = index_path(registry_path)
    started = time.perf_counter()
    try:
        env, key = _acquire(path)
    except IndexError_ as error:
        log.warning("index %s cannot be used (%s): rebuilding it", path, error)
        _remove(path)
        env, key = _acquire(path)
    try:
        dbs = _dbs_of(env, key, create=True)
        env.reader_check()  # free the slots of readers that died, so their old pages are reused
        db = sqlite3.connect(registry_path, isolation_level=None)
        try:
            with env.begin(write=True) as txn:
                db.execute("BEGIN")  # one registry snapshot for the whole sync
                serial, floor, checksum, filings = _registry_state(db)
                meta = _read_meta(txn, dbs)
                if meta is not None and meta.serial == serial and meta.checksum == checksum and not rebuild:
                    txn.abort()
                    return SyncOutcome(serial, "current", 0, time.perf_counter() - started)
                if (
                    meta is None
                    or rebuild
                    or not floor <= meta.serial < serial
                    or _most_changed(db, meta.serial, filings)
                ):
                    how = "rebuilt"
                    if meta is not None and not rebuild:
                        log.info("index %s at serial %d, registry at %d (change log from %d): rebuilding",
                                 path, meta.serial, serial, floor)  # fmt: skip
                    changed = _rebuild(txn, dbs, db, filings, _show_progress(progress))
                else:
                    how = "patched"
                    changed = _patch(txn, dbs, db, meta.serial)
                txn.put(b"format", FORMAT, db=dbs.meta)
                txn.put(b"serial", b"%d" % serial, db=dbs.meta)
                txn.put(b"checksum", checksum.encode(), db=dbs.meta)
                txn.put(b"filings", b"%d" % filings, db=dbs.meta)
            db.execute("COMMIT")
        finally:
            db.close()
        seconds = time.perf_counter() - started
        if how == "rebuilt" or changed > 1000:
            log.info("index %s %s to serial %d: %d filings in %.1f s", path, how, serial, changed, seconds)
        return SyncOutcome(serial, how, changed, seconds)
    finally:
        _release(key)


def _most_changed(db: sqlite3.Connection, since: int, stored: int) -> bool:
    """True when more filings changed after `since` than a third of the registry: writing all in
    key order is then cheaper than patching them one by one."""
    (changed,) = db.execute("SELECT COUNT(*) FROM changes WHERE serial > ?", (since,)).fetchone()
    return changed > 10_000 and changed * 3 > stored


def _remove(path: Path) -> None:
    for stale in (path, path.with_name(path.name + "-lock")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _rebuild(txn: lmdb.Transaction, dbs: _Dbs, db: sqlite3.Connection, filings: int, progress: bool) -> int:
    """Empty the index and write every filing, each database in key order (appends, no page splits):
    licences in licence order, then domains in name order, streamed so memory stays flat."""
    for named in (dbs.domains, dbs.access, dbs.licences):
        txn.drop(named, delete=False)
    bar = _bar(2 * filings, progress)
    licences = txn.cursor(dbs.licences)
    count = 0
    domains_of = "SELECT f.licence, (SELECT group_concat(d.name, ' ') FROM domains d WHERE d.filing_id = f.id)"
    for licence, names in db.execute(domains_of + " FROM filings f ORDER BY f.licence"):
        licences.put(licence.encode(), (names or "").encode(), append=True)
        count += 1
        if count % _WRITE_BATCH == 0:
            bar(_WRITE_BATCH)
    keys: dict[str, bytes] = {}
    depth = 1
    domains = txn.cursor(dbs.domains)
    rows = db.execute(
        "SELECT d.name, f.licence, f.status, f.limit_access,"
        " (SELECT group_concat(a.provider || char(9) || a.status || char(9) || a.ips, char(10))"
        "  FROM access a WHERE a.filing_id = f.id)"
        " FROM domains d JOIN filings f ON f.id = d.filing_id ORDER BY d.name"
    )
    for done, (name, licence, status, limit_access, access) in enumerate(rows, 1):
        key = keys.get(access or "")
        if key is None:
            if len(keys) >= _CACHE:
                keys.clear()
            key = keys[access or ""] = _put_access(txn, dbs, access or "")
        domains.put(name.encode(), encode(licence, status, limit_access, key), append=True)
        depth = max(depth, name.count(".") + 1)
        if done % _WRITE_BATCH == 0:
            bar(_WRITE_BATCH)
    bar(0, done=True)
    txn.put(b"depth", b"%d" % depth, db=dbs.meta)
    return count


def _bar(total: int, shown: bool):
    """A progress callback: tqdm on a terminal, nothing elsewhere (the outcome is logged)."""
    if not shown:
        return lambda step, done=False: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="filings", desc="index", file=sys.stderr)

    def advance(step: int, done: bool = False) -> None:
        bar.update(step)
        if done:
            bar.close()

    return advance


def _put_access(txn: lmdb.Transaction, dbs: _Dbs, text: str) -> bytes:
    key = access_key(text)
    txn.put(key, text.encode(), db=dbs.access, overwrite=False)
    return key


def _patch(txn: lmdb.Transaction, dbs: _Dbs, db: sqlite3.Connection, since: int) -> int:
    """Rewrite the filings changed after `since`: drop their old domains, write their new ones."""
    rows = db.execute(
        _FILINGS.replace("FROM filings f", "FROM changes c LEFT JOIN filings f USING (licence)").replace(
            "SELECT f.licence", "SELECT c.licence"
        )
        + " WHERE c.serial > ?",
        (since,),
    )
    count = 0
    for licence, status, limit_access, access, names in rows:
        _drop_filing(txn, dbs, licence)
        if status is not None:  # None: the filing was removed
            put_filing(txn, dbs, licence, status, limit_access, access or "", (names or "").split())
        count += 1
    return count


def _drop_filing(txn: lmdb.Transaction, dbs: _Dbs, licence: str) -> None:
    """Remove a filing's domains, except those another filing has taken over meanwhile."""
    own = licence.encode()
    names = txn.pop(own, db=dbs.licences)
    for name in (names or b"").split():
        value = txn.get(name, db=dbs.domains)
        if value is not None and value[:-_TAIL] == own:
            txn.delete(name, db=dbs.domains)


def put_filing(txn: lmdb.Transaction, dbs: _Dbs, licence: str, status: str, limit_access: int, access: str,
               names: Iterable[str]) -> None:  # fmt: skip
    names = list(names)
    value = encode(licence, status, limit_access, _put_access(txn, dbs, access))
    depth = max((name.count(".") + 1 for name in names), default=1)
    if depth > int(txn.get(b"depth", db=dbs.meta, default=b"1")):
        txn.put(b"depth", b"%d" % depth, db=dbs.meta)
    for name in names:
        txn.put(name.encode(), value, db=dbs.domains)
    txn.put(licence.encode(), " ".join(names).encode(), db=dbs.licences)


def read_meta(registry_path: Path) -> IndexMeta | None:
    """The index's meta record without opening it for lookups; None when it cannot be read."""
    path = index_path(registry_path)
    if not path.exists():
        return None
    try:
        env, key = _acquire(path)
    except IndexError_:
        return None
    try:
        dbs = _dbs_of(env, key, create=False)
        with env.begin() as txn:
            return _read_meta(txn, dbs)
    except IndexError_:
        return None
    finally:
        _release(key)


def open_index(registry_path: Path) -> SharedIndex:
    """The index for lookups, built or brought forward first if it is missing, unusable or behind."""
    sync_index(registry_path)
    return SharedIndex(index_path(registry_path))


def iter_domains(index: SharedIndex) -> Iterator[str]:
    """Every filed domain in the index, in key order (for tests and checks)."""
    with index._begin(db=index._domains) as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            yield key.decode("ascii")
