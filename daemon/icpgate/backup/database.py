"""One SQLite file of a backup: copied online, then described and checked from the copy alone.

The copy is made with SQLite's online backup API in one step: it reads inside one read transaction,
so it is one commit of the source, whatever the importers, the feed client and the workers write
meanwhile (under WAL a reader neither waits for them nor holds them up). The copy is switched from
WAL to a rollback journal, so it is one self-contained file whose digest never changes.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..registry.store import recompute

_BUSY_TIMEOUT = 60.0  # seconds a restore waits for a writer's transaction (a feed snapshot) to end


@dataclass
class Described:
    """What a database file holds, as a manifest records it, and what is wrong with it."""

    schema: int  # PRAGMA user_version: the registry's migrations applied (0 for the other files)
    counts: dict[str, int]  # rows per table
    state: dict[str, object] | None = None  # the registry's id, serial, checksum and filings
    problems: list[str] = field(default_factory=list)


def copy_online(source: Path, target: Path) -> None:
    """A consistent copy of the live database at `source` into the new file `target`."""
    src = sqlite3.connect(source.absolute().as_uri() + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")
        finally:
            dst.close()
    finally:
        src.close()


def copy_into(source: Path, target: Path) -> None:
    """Write the backup file `source` into the database at `target`, created if missing. A live
    target is written in one transaction: its readers see the old contents or the new, and its
    connections (the daemon's) stay valid; a file moved into place would leave them on the old one."""
    src = sqlite3.connect(source.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target, timeout=_BUSY_TIMEOUT)
        try:
            if dst.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                dst.execute("PRAGMA journal_mode = WAL")  # as the daemon keeps its files
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def usable(path: Path) -> bool:
    """True when `path` is a SQLite database that passes a quick check (a live file, read only)."""
    try:
        db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT)
    except sqlite3.Error:
        return False
    try:
        return db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.Error:
        return False
    finally:
        db.close()


def describe(path: Path, registry: bool) -> Described:
    """Counts, schema and (for a registry) state of a backup file nothing writes to, with the checks
    a restore relies on: SQLite's quick check, and for a registry the filings counted and the
    checksum recomputed from the per-filing digests (docs/feed-protocol.md)."""
    try:
        db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as error:
        return Described(0, {}, problems=["%s cannot be opened: %s" % (path.name, error)])
    try:
        return _describe(db, path.name, registry)
    except sqlite3.Error as error:
        return Described(0, {}, problems=["%s cannot be read: %s" % (path.name, error)])
    finally:
        db.close()


def _describe(db: sqlite3.Connection, name: str, registry: bool) -> Described:
    check = db.execute("PRAGMA quick_check").fetchone()[0]
    tables = [row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]  # fmt: skip
    counts = {table: db.execute('SELECT COUNT(*) FROM "%s"' % table).fetchone()[0] for table in tables}
    described = Described(db.execute("PRAGMA user_version").fetchone()[0], counts)
    if check != "ok":
        described.problems.append("%s fails SQLite's quick check: %s" % (name, check))
    if registry:
        _check_registry(db, name, described)
    return described


def _check_registry(db: sqlite3.Connection, name: str, described: Described) -> None:
    if "state" not in described.counts or "filings" not in described.counts:
        described.problems.append("%s is not an icpgate registry (no state or filings table)" % name)
        return
    columns = {row[1] for row in db.execute("PRAGMA table_info(state)")}
    registry_id = "registry_id" if "registry_id" in columns else "''"  # schema 5 gave registries an id
    filings = "filings" if "filings" in columns else "-1"
    serial, checksum, recorded, identity = db.execute(
        "SELECT serial, checksum, %s, %s FROM state" % (filings, registry_id)).fetchone()  # fmt: skip
    described.state = {"id": identity, "serial": serial, "checksum": checksum, "filings": described.counts["filings"]}
    if recorded not in (-1, described.counts["filings"]):
        described.problems.append("%s records %d filings but holds %d" % (name, recorded, described.counts["filings"]))
    if described.schema >= 3:  # since migration 3 the checksum is the sum of the digests
        recomputed, differing = recompute(db)
        if differing:
            described.problems.append("%s: %d filing(s) whose record does not give its stored digest, first %s"
                                      % (name, len(differing), differing[0]))  # fmt: skip
        if recomputed != checksum:
            described.problems.append("%s: the checksum recomputed from its filings, %s, is not the recorded %s"
                                      % (name, recomputed, checksum))  # fmt: skip
