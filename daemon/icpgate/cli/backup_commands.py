"""`icpgate backup` and `icpgate restore` (docs/deployment.md, "Backup and restore")."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..backup.manifest import BackupError, Manifest, verify
from ..backup.restore import Restored, restore
from ..backup.take import prune, take
from ..config.settings import load_config
from .exits import Exit


def add_parsers(commands, common: argparse.ArgumentParser) -> None:
    backup = commands.add_parser("backup", parents=[common], help="copy the registry, the violation log and the"
                                 " inspection history into a new dated folder in DEST, online")  # fmt: skip
    backup.add_argument("dest", type=Path, metavar="DEST", help="the folder that holds the backups")
    backup.add_argument("--keep", type=_at_least_one, metavar="N", help="then remove all but the newest N backups")
    backup.add_argument("--json", action="store_true", help="print the manifest as JSON")
    backup.set_defaults(handler=command_backup)
    restore_ = commands.add_parser("restore", parents=[common], help="put a backup back; the gate enforces it only"
                                   " once adopted (icpgate registry adopt)")  # fmt: skip
    restore_.add_argument("source", type=Path, metavar="SRC", help="one backup folder (with its manifest.json)")
    restore_.add_argument("--check", action="store_true", help="only verify the backup against its manifest")
    restore_.add_argument("--registry-only", action="store_true",
                          help="keep the violation log and the inspection history as they are")  # fmt: skip
    restore_.add_argument("--no-migrate", action="store_true", help="put the files back at the schema the backup has,"
                          " for the release that made it (a rollback; stop the daemon first)")  # fmt: skip
    restore_.add_argument("--json", action="store_true", help="print what was restored as JSON")
    restore_.set_defaults(handler=command_restore)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def command_backup(args: argparse.Namespace) -> Exit:
    config = load_config(args.config, args.overrides)
    started = time.monotonic()
    try:
        manifest = take(config, args.dest)
    except BackupError as error:
        return _refused("backup", error)
    removed = prune(args.dest, args.keep) if args.keep else []
    if args.json:
        print(json.dumps(manifest.document | {"folder": str(manifest.folder), "removed": [str(p) for p in removed]},
                         indent=2, ensure_ascii=False))  # fmt: skip
        return Exit.OK
    print("backup %s in %.1f s" % (manifest.folder, time.monotonic() - started))
    print(_describe(manifest))
    if removed:
        names = ", ".join(path.name for path in removed)
        print("removed %d older backup(s), keeping the newest %d: %s" % (len(removed), args.keep, names))
    return Exit.OK


def command_restore(args: argparse.Namespace) -> Exit:
    config = load_config(args.config, args.overrides)
    try:
        if args.check:
            manifest = verify(args.source)
        else:
            restored = restore(config, args.source, registry_only=args.registry_only, migrate=not args.no_migrate)
    except BackupError as error:
        return _refused("restore", error)
    if args.check:
        print(json.dumps(manifest.document, indent=2, ensure_ascii=False) if args.json
              else "%s matches its manifest\n%s" % (args.source, _describe(manifest)))  # fmt: skip
        return Exit.OK
    if args.json:
        print(json.dumps(_as_json(restored), indent=2, ensure_ascii=False))
    else:
        print(_restored_text(restored, str(args.config)))
    return Exit.OK


def _refused(command: str, error: BackupError) -> Exit:
    print("%s: %s" % (command, error), file=sys.stderr)
    for problem in error.problems:
        print("  - %s" % problem, file=sys.stderr)
    if command == "restore":
        print("restore: nothing was changed", file=sys.stderr)
    return Exit.DATA


def _describe(manifest: Manifest) -> str:
    registry, files = manifest.registry, manifest.files
    lines = ["  made %s by icpgate %s on %s" % (manifest.document["created_at"], manifest.document["version"],
                                                manifest.document["host"]),
             "  registry %s at serial %d: %d filings, checksum %s" % (registry["id"] or "(no id: schema 4)",
                                                                      registry["serial"], registry["filings"],
                                                                      registry["checksum"])]  # fmt: skip
    for kind, entry in files.items():
        rows = ", ".join("%s %d" % item for item in entry["counts"].items() if item[0] in _SHOWN.get(kind, ()))
        lines.append("  %-10s %s, %d bytes, sha256 %s%s" % (kind, entry["source"], entry["bytes"], entry["sha256"][:16],
                                                            " (%s)" % rows if rows else ""))  # fmt: skip
    return "\n".join(lines)


_SHOWN = {"registry": ("filings", "domains"), "violations": ("violations", "handling", "customers"),
          "inspection": ("filings", "passes")}  # fmt: skip


def _restored_text(restored: Restored, config: str) -> str:
    manifest, index = restored.manifest, restored.index
    registry = manifest.registry
    lines = ["restored %s (%s)" % (manifest.folder, ", ".join(restored.kinds)), _describe(manifest)]
    if restored.registry_id != registry["id"]:
        lines.append("the restored registry has an id of its own, %s: it is a copy of registry %s at serial %d, and"
                     " the gate never takes it for the registry it enforced" % (restored.registry_id,
                                                                                registry["id"] or "(none)",
                                                                                registry["serial"]))  # fmt: skip
    if restored.saved:
        lines.append("what it replaced is saved in %s (icpgate restore %s puts it back)" % (restored.saved,
                                                                                           restored.saved))  # fmt: skip
    lines += ["damaged file moved aside: %s" % path for path in restored.moved_aside]
    if index is None:
        lines.append("the gate has no index yet: it builds one from the restored registry when it starts")
    else:
        lines.append(
            "NOT ENFORCED YET: a running gate keeps enforcing registry %s at serial %d, its last good index, and warns"
            " (/readyz warnings, icpgate_registry_not_adopted) until you adopt the restored registry; a gate started"
            " now does the same. Check it (icpgate check HOST -c %s), then adopt it:\n  icpgate registry adopt -c %s"
            "   (or: systemctl reload icpgate)" % (index.registry, index.serial, config, config)
        )
    return "\n".join(lines)


def _as_json(restored: Restored) -> dict:
    index = restored.index
    return {
        "backup": str(restored.manifest.folder), "manifest": restored.manifest.document, "restored": restored.kinds,
        "registry_id": restored.registry_id, "saved": str(restored.saved) if restored.saved else None,
        "moved_aside": [str(path) for path in restored.moved_aside],
        "enforced": {"registry": index.registry, "serial": index.serial} if index else None,
        "adopt": index is not None,
    }  # fmt: skip
