"""`icpgate restore SRC`: put a checked backup back on a stopped or running edge, never as a
silent rollback.

The backup is verified against its manifest first (digests, rows, the registry's checksum
recomputed); a damaged one changes nothing. What it replaces is backed up first, beside the
registry. The registry is staged, brought to this release's schema and given a registry id of its
own: a restored registry is a fork of the one backed up, and the gate must never take it for the
registry its index was built from, nor patch that index across the fork. So a running gate keeps
enforcing its last good index and warns (/readyz `warnings`, icpgate_registry_not_adopted) until
the operator adopts the restored registry (`icpgate registry adopt`, or a reload). Each file is
written into the live database in one transaction, so the daemon's open connections see it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..config.settings import Config
from ..registry.index_store import IndexMeta, read_meta
from ..registry.store import open_registry
from .database import copy_into, copy_online, describe, usable
from .manifest import FILES, BackupError, Manifest, verify
from .take import live_paths, take

SAVED = "pre-restore"  # beside the registry: what each restore replaced


@dataclass
class Restored:
    manifest: Manifest
    registry_id: str  # the restored registry's own id ("" when left at a schema without ids)
    kinds: list[str]  # the files put back
    saved: Path | None = None  # the backup of what was replaced
    moved_aside: list[Path] = field(default_factory=list)  # damaged files, kept under another name
    index: IndexMeta | None = None  # the index the gate enforces now


def restore(config: Config, source: Path, *, registry_only: bool = False, migrate: bool = True) -> Restored:
    """Restore the backup in `source`; see the module docstring. `migrate=False` puts the files
    back as they are, for the release that made them (a rollback, with the daemon stopped)."""
    manifest = verify(source)
    targets = {kind: path for kind, path in live_paths(config).items()
               if kind in manifest.files and (kind == "registry" or not registry_only)}  # fmt: skip
    folder = config.registry_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / (".restore-%s.db" % secrets.token_hex(4))
    try:
        copy_online(source / FILES["registry"], staged)
        registry_id = asyncio.run(_fork(staged)) if migrate else manifest.registry["id"]
        _check_staged(staged, manifest, migrate)
        restored = Restored(manifest, registry_id, list(targets))
        present = [kind for kind, path in targets.items() if path.is_file()]
        if present:
            restored.saved = take(config, folder / SAVED, kinds=present, strict=False).folder
        for kind, live in targets.items():
            if live.exists() and not usable(live):
                restored.moved_aside.append(_move_aside(live))
            copy_into(staged if kind == "registry" else source / FILES[kind], live)
    finally:
        for path in (staged, *_companions(staged)):
            path.unlink(missing_ok=True)
    restored.index = read_meta(config.registry_path)
    return restored


async def _fork(staged: Path) -> str:
    """Migrate the staged registry to this release's schema and give it an id of its own."""
    async with open_registry(staged, create=False) as registry:
        registry_id = secrets.token_hex(16)
        await registry.db.execute("UPDATE state SET registry_id = ?", (registry_id,))
        await registry.db.execute("PRAGMA journal_mode = DELETE")  # one file again, for the checks
    return registry_id


def _check_staged(staged: Path, manifest: Manifest, migrated: bool) -> None:
    """The staged registry still holds what the backup did (a migration changes no filing)."""
    described = describe(staged, registry=True)
    problems = list(described.problems)
    for key in ("serial", "checksum", "filings") + (() if migrated else ("id",)):
        if described.state is None or described.state[key] != manifest.registry[key]:
            problems.append("the staged registry's %s is not the backup's" % key)
    if problems:
        raise BackupError("the registry in %s could not be staged" % manifest.folder, problems)


def _move_aside(live: Path) -> Path:
    """A damaged live file and its WAL files, renamed (the WAL files first: SQLite pairs a database
    with the -wal and -shm of the same name) so the restored file starts clean and nothing is lost."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = live.with_name("%s.damaged-%s" % (live.name, stamp))
    for companion in _companions(live):
        if companion.exists():
            os.replace(companion, companion.with_name(aside.name + companion.name[len(live.name) :]))
    os.replace(live, aside)
    return aside


def _companions(path: Path) -> tuple[Path, ...]:
    return tuple(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))
