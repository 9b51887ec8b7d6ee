"""`icpgate backup DEST`: a dated folder in DEST with a consistent copy of each state file and a
manifest, made while the gate, the feed, imports and inspections run; and the retention that
keeps the newest N (docs/deployment.md, "Backup and restore")."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from .. import __version__
from ..config.settings import Config
from ..registry.store import require_registry
from .database import copy_online, describe, sha256_of, usable
from .manifest import FILES, FORMAT, MANIFEST, BackupError, Manifest, write_manifest

PREFIX = "icpgate-backup-"
_PARTIAL = ".partial-"
_ABANDONED = 3600.0  # seconds after which a partial folder is a run that died, not one under way


def live_paths(config: Config) -> dict[str, Path]:
    """Where the running edge keeps each file a backup holds."""
    return {"registry": config.registry_path, "violations": config.violations.path, "inspection": config.inspect.path}


def take(config: Config, dest: Path, *, kinds: Iterable[str] = tuple(FILES), strict: bool = True) -> Manifest:
    """Back up the files of `kinds` that exist (the registry must) into a new folder in `dest`.

    Each copy is checked as a restore would check it; with `strict` a damaged live file fails the
    backup (a backup that restore would refuse is no backup), without it the problems go into the
    manifest and missing or unusable files are left out, the registry too: the copy restore takes
    of what it replaces, which is kept to be looked at (restore refuses it without a registry)."""
    if strict:
        require_registry(config.registry_path)
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / (_PARTIAL + secrets.token_hex(4))
    partial.mkdir()
    try:
        manifest = _fill(config, partial, kinds, strict)
        created = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        registry = manifest.document["registry"]
        final = _free_name(dest, "%s%s-%s" % (PREFIX, created, "serial-%d" % registry["serial"] if registry
                                              else "no-registry"))  # fmt: skip
        _sync_folder(partial)
        partial.rename(final)
        _sync_folder(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Manifest(final, manifest.document)


def _fill(config: Config, folder: Path, kinds: Iterable[str], strict: bool) -> Manifest:
    files, problems, registry = {}, [], None
    for kind, live in live_paths(config).items():
        if kind not in kinds or (kind != "registry" and not live.is_file()):
            continue
        if not strict and not usable(live):
            problems.append("%s is not a usable SQLite database: left out" % live)
            continue
        target = folder / FILES[kind]
        try:
            copy_online(live, target)
        except Exception as error:  # sqlite3.Error, OSError: the file cannot be read
            raise BackupError("cannot copy %s: %s" % (live, error)) from None
        described = describe(target, registry=kind == "registry")
        if described.problems and strict:
            raise BackupError("%s is damaged: not backed up" % live, described.problems)
        problems += described.problems
        files[kind] = {"source": str(live), "sha256": sha256_of(target), "bytes": target.stat().st_size,
                       "schema": described.schema, "counts": described.counts}  # fmt: skip
        if kind == "registry":
            registry = described.state
    if registry is None and strict:
        raise BackupError("%s is not an icpgate registry" % config.registry_path, problems)
    document = {"format": FORMAT, "version": __version__, "created_at": _now(), "host": socket.gethostname(),
                "registry": registry, "files": files}  # fmt: skip
    if problems:
        document["problems"] = problems
    return write_manifest(folder, document)


def prune(dest: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` backups in `dest` (only folders this command made, with
    a manifest), and partial folders of runs that died; return what was removed."""
    backups = sorted(path for path in dest.glob(PREFIX + "*") if (path / MANIFEST).is_file())
    removed = backups[: max(0, len(backups) - keep)]
    now = time.time()
    removed += [path for path in dest.glob(_PARTIAL + "*") if now - path.stat().st_mtime > _ABANDONED]
    for path in removed:
        shutil.rmtree(path)
    return removed


def _free_name(dest: Path, name: str) -> Path:
    """`name`, or `name-2`, `name-3`... when a backup of the same second and serial is there."""
    path, number = dest / name, 1
    while path.exists():
        number += 1
        path = dest / ("%s-%d" % (name, number))
    return path


def _sync_folder(folder: Path) -> None:
    """The files and the folder's entries on disk before the backup is called done."""
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as stream:
                os.fsync(stream.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
