"""The shared filings index: one LMDB environment beside the registry, mapped by every worker.

Why LMDB: a B+tree in one memory-mapped file, so every worker on a host reads the same page-cache
pages (no per-worker copy), opens it in milliseconds, and sees a writer's commit at its next read
transaction; a write is one transaction, so a reader never sees half of it and `kill -9` in the
middle of one leaves the previous commit intact (docs/performance.md has the measurements).

Files: `<registry>.index/`, a folder holding
- generations, `<registry id>-<token>/`: each an LMDB environment (`data.mdb` and its `lock.mdb`),
  built whole by one writer, then patched in place. LMDB pairs a data file with the lock file of
  the same folder, and the lock file holds the last transaction id and the reader table of that
  data file alone: so a generation is never renamed, truncated or rebuilt in place, and a file
  is never created under a name another process may have open. A rebuild writes a new generation;
- `current`, a symlink naming the generation the gate serves. Moving it is atomic (a rename), so
  an opener resolves it once and opens one whole generation, old or new;
- `lock`, the writers' lock (flock): one writer at a time reads the registry, patches or builds,
  moves `current` and removes the generations nobody is pointed at any more (a process that still
  maps one keeps reading it: unlinked files stay whole until closed).

Layout of a generation (named databases):
- `domains`: filed domain (A-label, ASCII) -> licence, status, limit_access and an access key;
- `access`:  access key (12 bytes of BLAKE2b of the access text) -> the filing's access records as
  text, `provider TAB status TAB ips`, one a line: most filings share a few of these, stored once;
- `licences`: licence -> its domains, space-separated: what a patch removes when a filing changes;
- `meta`: format version, the id of the registry it was built from, the registry serial and
  checksum it reflects, filings count, and `depth`: no filed domain has more labels, so a lookup
  skips the labels above it (each skipped label is one B-tree search saved; it only grows between
  rebuilds, which keeps it safe).

Identity: the index `current` names is the last good state the gate enforces. A writer brings it
forward only from the registry it was built from (the same registry id) and only forwards: a
registry at the path that is another one (deleted and re-created, restored from another machine)
or behind it (restored from an older backup) leaves it as it is, `kept`, until the operator adopts
that registry (`icpgate registry adopt`, or SIGHUP). Readers (`SharedIndex`) never write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
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

FORMAT = b"icpgate-index/2"  # 2: a folder of generations; the registry id in meta
MAP_SIZE = 1 << 38  # address space only: the file grows as it fills (256 GiB is ~2 billion domains)
MAX_READERS = 2048  # one slot per open read transaction; workers use one at a time
CURRENT = "current"  # the symlink to the generation served
WRITER_LOCK = "lock"
_STATUS_CODES = {FilingStatus.APPROVED.value: b"a", FilingStatus.PENDING.value: b"p",
                 FilingStatus.DEREGISTERED.value: b"d"}  # fmt: skip
_STATUSES = {ord(code): FilingStatus(status) for status, code in _STATUS_CODES.items()}
_KEY = 12  # bytes of access key
_TAIL = 2 + _KEY  # status, limit_access, access key after the licence
_CACHE = 65536  # decoded records and access tuples kept per worker
_WRITE_BATCH = 50_000
_OPEN_ATTEMPTS = 3  # `current` moved between resolving it and opening its generation: resolve again


class IndexError_(RuntimeError):
    """The index cannot be used; it is rebuilt from the registry."""


def index_path(registry_path: Path) -> Path:
    """Where a registry's index lives: the folder beside it, same name plus `.index`."""
    return registry_path.with_name(registry_path.name + ".index")


def current_generation(folder: Path) -> Path | None:
    """The generation `current` names, resolved once (None: there is none)."""
    try:
        name = os.readlink(folder / CURRENT)
    except OSError:  # missing, or not a symlink
        return None
    return folder / name if name and "/" not in name else None


# LMDB allows one open environment per file in a process: readers and writers here share it.
# Generation folders have unique names and are never reused, so the folder is the key.
_OPEN: dict[Path, tuple[lmdb.Environment, int]] = {}  # -> (environment, users)
_OPEN_LOCK = threading.Lock()  # syncs run in threads beside the event loop's readers


def _acquire(generation: Path, *, create: bool = False) -> lmdb.Environment:
    """This process's environment for a generation, opened on first use (raises IndexError_)."""
    with _OPEN_LOCK:
        held = _OPEN.get(generation)
        if held is not None:
            _OPEN[generation] = (held[0], held[1] + 1)
            return held[0]
        env = _open_env(generation, create=create)
        _OPEN[generation] = (env, 1)
        return env


def _release(generation: Path) -> None:
    with _OPEN_LOCK:
        env, users = _OPEN[generation]
        if users > 1:
            _OPEN[generation] = (env, users - 1)
        else:
            del _OPEN[generation]
            _DBS.pop(generation, None)
            env.close()


def _open_env(generation: Path, *, create: bool) -> lmdb.Environment:
    """Open a generation, refusing one LMDB or we cannot use (raises IndexError_). Only its
    builder creates one: an opener never makes a data file beside a lock file others hold."""
    data = generation / "data.mdb"
    if not create and not data.is_file():
        raise IndexError_("%s has no index in it" % generation)
    try:
        env = lmdb.open(str(generation), subdir=True, create=create, map_size=MAP_SIZE, max_dbs=4,
                        max_readers=MAX_READERS, lock=True, readahead=False, meminit=False)  # fmt: skip
    except lmdb.Error as error:
        raise IndexError_("%s: %s" % (generation, error)) from None
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = data.stat().st_size
        if size < needed:  # a truncated file would fault on the missing pages
            raise IndexError_("%s is truncated: %d bytes, %d needed" % (data, size, needed))
    except OSError as error:
        env.close()
        raise IndexError_("%s: %s" % (data, error)) from None
    except BaseException:
        env.close()
        raise
    return env


@dataclass(frozen=True, slots=True)
class IndexMeta:
    serial: int
    checksum: str
    filings: int
    registry: str  # the id of the registry it was built from
    replaces: str = ""  # the registry id whose index this one replaced by an adoption


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


_DBS: dict[Path, _Dbs] = {}  # per open environment, under _OPEN_LOCK


def _dbs_of(env: lmdb.Environment, generation: Path, *, create: bool = False) -> _Dbs:
    with _OPEN_LOCK:
        dbs = _DBS.get(generation)
        if dbs is None:
            dbs = _DBS[generation] = _Dbs(env, create=create)
        return dbs


def _read_meta(txn: lmdb.Transaction, dbs: _Dbs) -> IndexMeta | None:
    """The meta record, or None for a file of another format or a build that never finished."""
    if txn.get(b"format", db=dbs.meta) != FORMAT:
        return None
    serial = txn.get(b"serial", db=dbs.meta)
    if serial is None:
        return None
    checksum = txn.get(b"checksum", db=dbs.meta, default=b"").decode()
    filings = int(txn.get(b"filings", db=dbs.meta, default=b"0"))
    registry = txn.get(b"registry", db=dbs.meta, default=b"").decode()
    return IndexMeta(int(serial), checksum, filings, registry, txn.get(b"replaces", db=dbs.meta, default=b"").decode())


def _open_current(folder: Path) -> tuple[Path, lmdb.Environment, _Dbs]:
    """The generation `current` names, its environment and databases (raises IndexError_). A
    generation removed between resolving `current` and opening it means `current` moved: resolve again."""
    for _ in range(_OPEN_ATTEMPTS):
        generation = current_generation(folder)
        if generation is None:
            raise IndexError_("%s has no current index" % folder)
        try:
            env = _acquire(generation)
        except IndexError_:
            if current_generation(folder) == generation:
                raise
            continue
        try:
            return generation, env, _dbs_of(env, generation)
        except BaseException:
            _release(generation)
            raise
    raise IndexError_("%s: the current index kept changing while it was opened" % folder)


class SharedIndex:
    """`FilingIndex` over the shared file: one read transaction per lookup, so each lookup sees
    the latest commit as a whole. Decoded records are cached per process by their stored bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path  # the index folder; `folder`: the generation this reader maps
        self.folder, self._env, self._dbs = _open_current(path)
        try:
            with self._env.begin() as txn:
                if _read_meta(txn, self._dbs) is None:
                    raise IndexError_("%s is not an %s index" % (self.folder, FORMAT.decode()))
        except BaseException:
            _release(self.folder)
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
        """True when `current` no longer names the generation this process maps (a rebuild, an
        adoption, or the folder deleted)."""
        return current_generation(self.path) != self.folder

    def succeeds(self, other: SharedIndex) -> bool:
        """True when this index may take over from `other` without the operator: built from the
        same registry, or by an adoption of it, or `other` cannot be read any more."""
        try:
            served = other.meta().registry
        except (IndexError_, lmdb.Error):
            return True
        mine = self.meta()
        return served in (mine.registry, mine.replaces)

    def close(self) -> None:
        """Let go of the generation; lookups on a closed index fail closed (unfiled)."""
        if self._env is not None:
            self._env = None
            _release(self.folder)


# --- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    serial: int  # the serial of the index served afterwards
    how: str  # "current", "patched", "rebuilt", or "kept": the index served was left as it is
    changed: int  # filings written or removed
    seconds: float
    kept: str = ""  # why it was kept: the registry at the path is not one it may follow


@dataclass(frozen=True, slots=True)
class RegistryIdentity:
    """What an index is checked against: the registry's id, serial and checksum."""

    path: Path
    registry: str
    serial: int
    checksum: str


def kept_because(meta: IndexMeta, registry: RegistryIdentity) -> str:
    """Why the index served must not follow this registry without the operator, or "": it is
    another registry, or this registry went back in time."""
    if meta.registry != registry.registry:
        return "the registry at %s (id %s, serial %d) is not the one the gate serves (id %s, serial %d)" % (
            registry.path, registry.registry or "none", registry.serial, meta.registry, meta.serial)  # fmt: skip
    if registry.serial < meta.serial:
        return "the registry at %s is at serial %d, behind the %d the gate serves" % (
            registry.path, registry.serial, meta.serial)  # fmt: skip
    if registry.serial == meta.serial and registry.checksum != meta.checksum:
        return "the registry at %s has the serial the gate serves, %d, but other contents" % (
            registry.path, registry.serial)  # fmt: skip
    return ""


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


def _registry_state(db: sqlite3.Connection) -> tuple[int, int, str, int, str]:
    """Serial, floor, checksum, filings and registry id (`filings` since schema 4, the id since 5)."""
    try:
        return db.execute("SELECT serial, floor, checksum, filings, registry_id FROM state").fetchone()
    except sqlite3.OperationalError:  # a registry not yet opened by this version
        serial, floor, checksum = db.execute("SELECT serial, floor, checksum FROM state").fetchone()
        return serial, floor, checksum, db.execute("SELECT COUNT(*) FROM filings").fetchone()[0], ""


def _connect(registry_path: Path) -> sqlite3.Connection | None:
    """The registry for reading, or None when there is none: never creates one."""
    try:
        db = sqlite3.connect(registry_path.absolute().as_uri() + "?mode=rw", uri=True, isolation_level=None)
        db.execute("BEGIN")  # one registry snapshot for the whole sync
        _registry_state(db)
    except sqlite3.Error:
        with contextlib.suppress(UnboundLocalError):
            db.close()
        return None
    return db


def sync_index(registry_path: Path, *, rebuild: bool = False, adopt: bool = False,
               progress: bool | None = None) -> SyncOutcome:  # fmt: skip
    """Bring the index served to the registry's serial and return what was done.

    Under the writers' lock, and reading the registry only once it holds it, so concurrent callers
    (workers catching up, the feed client, an import) serialise and the later ones find the index
    current. A registry that is another one than the index's, or behind it, is not followed
    (`kept`) unless `adopt`: then the index is rebuilt from it. Blocking: call it in a thread."""
    for _ in range(_OPEN_ATTEMPTS):
        try:
            return _sync(registry_path, rebuild, adopt, progress)
        except FileNotFoundError as error:  # the folder was deleted under the writer: take it from the top
            missing = error
    raise IndexError_("%s kept disappearing while it was written: %s" % (index_path(registry_path), missing))


def _sync(registry_path: Path, rebuild: bool, adopt: bool, progress: bool | None) -> SyncOutcome:
    folder = index_path(registry_path)
    started = time.perf_counter()
    with _writer_lock(folder):
        db = _connect(registry_path)
        generation, env, dbs, meta = _current_of(folder)
        try:
            if db is None:
                return SyncOutcome(meta.serial if meta else 0, "kept", 0, time.perf_counter() - started,
                                   "there is no registry at %s" % registry_path)  # fmt: skip
            serial, floor, checksum, filings, registry = _registry_state(db)
            if meta is not None and not adopt:
                kept = kept_because(meta, RegistryIdentity(registry_path, registry, serial, checksum))
                if kept:
                    return SyncOutcome(meta.serial, "kept", 0, time.perf_counter() - started, kept)
            if meta is not None and meta.registry == registry and not rebuild:
                if meta.serial == serial and meta.checksum == checksum:
                    return SyncOutcome(serial, "current", 0, time.perf_counter() - started)
                if floor <= meta.serial < serial and not _most_changed(db, meta.serial, filings):
                    env.reader_check()  # free the slots of readers that died, so their old pages are reused
                    with env.begin(write=True) as txn:
                        changed = _patch(txn, dbs, db, meta.serial)
                        _put_meta(txn, dbs, serial, checksum, filings, registry)
                    return _done(folder, serial, "patched", changed, started)
            replaces = ""
            if meta is not None and meta.registry != registry:
                log.warning("index %s: adopting registry %s (serial %d) in place of %s (serial %d)", folder,
                            registry or "none", serial, meta.registry, meta.serial)  # fmt: skip
                replaces = meta.registry
            elif meta is not None and not rebuild:
                log.info("index %s at serial %d, registry at %d (change log from %d): rebuilding", folder,
                         meta.serial, serial, floor)  # fmt: skip
            changed = _build(folder, db, (serial, checksum, filings, registry, replaces), _show_progress(progress))
            return _done(folder, serial, "rebuilt", changed, started)
        finally:
            if generation is not None and env is not None:
                _release(generation)
            if db is not None:
                db.close()


def _done(folder: Path, serial: int, how: str, changed: int, started: float) -> SyncOutcome:
    seconds = time.perf_counter() - started
    if how == "rebuilt" or changed > 1000:
        log.info("index %s %s to serial %d: %d filings in %.1f s", folder, how, serial, changed, seconds)
    return SyncOutcome(serial, how, changed, seconds)


def _current_of(folder: Path) -> tuple[Path | None, lmdb.Environment | None, _Dbs | None, IndexMeta | None]:
    """The writer's view of the generation served: None for each part it cannot use (it is rebuilt)."""
    generation = current_generation(folder)
    if generation is None:
        return None, None, None, None
    try:
        env = _acquire(generation)
    except IndexError_ as error:
        log.warning("index %s cannot be used (%s): rebuilding it", generation, error)
        return None, None, None, None
    try:
        dbs = _dbs_of(env, generation)
        with env.begin() as txn:
            meta = _read_meta(txn, dbs)
    except (IndexError_, lmdb.Error) as error:
        log.warning("index %s cannot be used (%s): rebuilding it", generation, error)
        _release(generation)
        return None, None, None, None
    if meta is None:
        log.warning("index %s is not an %s index: rebuilding it", generation, FORMAT.decode())
    return generation, env, dbs, meta


def _put_meta(txn: lmdb.Transaction, dbs: _Dbs, serial: int, checksum: str, filings: int, registry: str,
              replaces: str | None = None) -> None:  # fmt: skip
    txn.put(b"format", FORMAT, db=dbs.meta)
    txn.put(b"registry", registry.encode(), db=dbs.meta)
    if replaces is not None:
        txn.put(b"replaces", replaces.encode(), db=dbs.meta)
    txn.put(b"serial", b"%d" % serial, db=dbs.meta)
    txn.put(b"checksum", checksum.encode(), db=dbs.meta)
    txn.put(b"filings", b"%d" % filings, db=dbs.meta)


def _build(folder: Path, db: sqlite3.Connection, state: tuple[int, str, int, str, str], progress: bool) -> int:
    """Write a new generation from the registry, point `current` at it, remove the others.
    `replaces` in the state: the registry id an adoption replaces, so the workers follow it."""
    serial, checksum, filings, registry, replaces = state
    name = "%s-%s" % (registry[:16] or "none", secrets.token_hex(6))
    generation = folder / name
    generation.mkdir()
    env = _acquire(generation, create=True)
    try:
        dbs = _dbs_of(env, generation, create=True)
        with env.begin(write=True) as txn:
            changed = _rebuild(txn, dbs, db, filings, progress)
            _put_meta(txn, dbs, serial, checksum, filings, registry, replaces)
    finally:
        _release(generation)
    _point_current(folder, name)
    _collect(folder, name)
    return changed


def _point_current(folder: Path, name: str) -> None:
    """Move `current` to `name` in one rename, and make the move durable."""
    temporary = folder / (".current-%s" % secrets.token_hex(6))
    os.symlink(name, temporary)
    os.replace(temporary, folder / CURRENT)
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _collect(folder: Path, keep: str) -> None:
    """Remove every generation but `keep` (and what a writer killed mid-build left). A generation is
    renamed away before it is emptied: an opener then finds it whole or not at all."""
    for entry in list(folder.iterdir()):
        if entry.name in (keep, CURRENT, WRITER_LOCK):
            continue
        if not entry.is_dir() or entry.is_symlink():
            entry.unlink(missing_ok=True)
            continue
        trash = entry
        if not entry.name.startswith(".removed-"):
            trash = folder / (".removed-%s" % secrets.token_hex(6))
            try:
                entry.rename(trash)
            except FileNotFoundError:
                continue
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[None]:
    """Hold the writers' lock of `folder`, creating the folder if needed. The lock file might be
    deleted and re-created by someone: a lock taken on a file no longer at that name is retried.
    Not `Path.mkdir(exist_ok=True)`: it raises when the folder goes between its mkdir and its check."""
    _move_out_of_old_layout(folder)
    for _ in range(_OPEN_ATTEMPTS):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        try:
            descriptor = os.open(folder / WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder went between mkdir and open, or is a dangling symlink
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                held = os.stat(folder / WRITER_LOCK).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                held = False
            if held:
                yield
                return
        finally:
            os.close(descriptor)  # releases the lock
    raise FileNotFoundError(errno.ENOENT, "cannot create the index's lock file", str(folder / WRITER_LOCK))


def _move_out_of_old_layout(folder: Path) -> None:
    """Before version 2 the index was one file, `<registry>.index`, with `<registry>.index-lock`:
    remove them (the folder's generation is built from the registry)."""
    if folder.is_file():
        folder.unlink(missing_ok=True)
        folder.with_name(folder.name + "-lock").unlink(missing_ok=True)


def _most_changed(db: sqlite3.Connection, since: int, stored: int) -> bool:
    """True when more filings changed after `since` than a third of the registry: writing all in
    key order is then cheaper than patching them one by one."""
    (changed,) = db.execute("SELECT COUNT(*) FROM changes WHERE serial > ?", (since,)).fetchone()
    return changed > 10_000 and changed * 3 > stored


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _rebuild(txn: lmdb.Transaction, dbs: _Dbs, db: sqlite3.Connection, filings: int, progress: bool) -> int:
    """Write every filing into a new generation, each database in key order (appends, no page
    splits): licences in licence order, then domains in name order, streamed so memory stays flat."""
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
    """The meta record of the index served, without opening it for lookups; None when it cannot be read."""
    try:
        generation, env, dbs = _open_current(index_path(registry_path))
    except IndexError_:
        return None
    try:
        with env.begin() as txn:
            return _read_meta(txn, dbs)
    except lmdb.Error:
        return None
    finally:
        _release(generation)


def open_index(registry_path: Path) -> SharedIndex:
    """The index for lookups, built or brought forward first if it is missing, unusable or behind
    (never to another registry, or backwards: that is the operator's to decide)."""
    outcome = sync_index(registry_path)
    if outcome.how == "kept":
        log.warning("index %s kept at serial %d: %s. `icpgate registry adopt` or a reload (SIGHUP) switches"
                    " to it", index_path(registry_path), outcome.serial, outcome.kept)  # fmt: skip
    return SharedIndex(index_path(registry_path))


def iter_domains(index: SharedIndex) -> Iterator[str]:
    """Every filed domain in the index, in key order (for tests and checks)."""
    with index._begin(db=index._domains) as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            yield key.decode("ascii")
