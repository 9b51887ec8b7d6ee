"""A backup's manifest (`manifest.json`): what each file is, its digest and counts, and the
registry's identity, serial and checksum; and the check a restore makes against it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..registry.store import MIGRATIONS
from .database import describe, sha256_of

FORMAT = "icpgate-backup/1"
MANIFEST = "manifest.json"
# The files a backup holds, by kind; the registry's is the one a backup cannot be without.
FILES = {"registry": "registry.db", "violations": "violations.db", "inspection": "inspection.db"}


@dataclass(frozen=True, slots=True)
class Manifest:
    folder: Path
    document: dict[str, Any]

    @property
    def registry(self) -> dict[str, Any]:
        return self.document["registry"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.document["files"]


class BackupError(RuntimeError):
    """A backup that cannot be made, or cannot be trusted; `problems` says each thing wrong."""

    def __init__(self, message: str, problems: list[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


def write_manifest(folder: Path, document: dict[str, Any]) -> Manifest:
    (folder / MANIFEST).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Manifest(folder, document)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError("%s is not an icpgate backup: it has no %s" % (folder, MANIFEST)) from None
    except (OSError, ValueError, RecursionError) as error:  # unreadable, not UTF-8, not JSON, too deep
        raise BackupError("%s cannot be read: %s" % (path, error)) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BackupError("%s is not an %s manifest" % (path, FORMAT))
    files = document.get("files")
    if not isinstance(files, dict) or "registry" not in files or not isinstance(document.get("registry"), dict):
        raise BackupError("%s lists no registry" % path)
    unknown = set(files) - set(FILES)
    if unknown:
        raise BackupError("%s lists files this icpgate does not know: %s" % (path, ", ".join(sorted(unknown))))
    return Manifest(folder, document)


def verify(folder: Path) -> Manifest:
    """The manifest of the backup in `folder`, once every file in it is what the manifest says:
    the same bytes (SHA-256), SQLite's quick check, the same rows per table, and for the registry
    the same id, serial and filings and a checksum that the filings add up to. Raises BackupError
    listing every difference; a backup of a registry newer than this icpgate is refused too."""
    manifest = read_manifest(folder)
    problems: list[str] = []
    for kind, entry in manifest.files.items():
        problems += _check_file(folder / FILES[kind], kind, entry, manifest.registry)
    if problems:
        raise BackupError("%s is damaged or was changed since it was made" % folder, problems)
    schema = manifest.files["registry"].get("schema", 0)
    if schema > len(MIGRATIONS):
        raise BackupError("%s holds a registry of schema %d, made by icpgate %s; this icpgate knows up to schema %d:"
                          " restore it with that release or a newer one" % (folder, schema,
                          manifest.document.get("version", "?"), len(MIGRATIONS)))  # fmt: skip
    return manifest


def _check_file(path: Path, kind: str, entry: dict[str, Any], registry: dict[str, Any]) -> list[str]:
    if not path.is_file():
        return ["%s is missing" % path.name]
    problems = []
    if sha256_of(path) != entry.get("sha256"):
        problems.append("%s: its SHA-256 is not the manifest's %s" % (path.name, entry.get("sha256")))
    described = describe(path, registry=kind == "registry")
    problems += described.problems
    if described.counts != entry.get("counts"):
        problems.append("%s: rows per table %s, the manifest says %s" % (path.name, described.counts,
                                                                         entry.get("counts")))  # fmt: skip
    if described.schema != entry.get("schema"):
        problems.append("%s: schema %d, the manifest says %s" % (path.name, described.schema, entry.get("schema")))
    if kind == "registry" and described.state is not None:
        for key in ("id", "serial", "checksum", "filings"):
            if described.state[key] != registry.get(key):
                name = "registry id" if key == "id" else key
                problems.append("%s: %s %r, the manifest says %r" % (path.name, name, described.state[key],
                                                                     registry.get(key)))  # fmt: skip
    return problems
