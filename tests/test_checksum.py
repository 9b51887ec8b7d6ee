"""The incremental registry checksum: always equal to a full recompute, and old registries migrate."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from conftest import SAMPLES, run, sample_records
from icpgate.registry.filings import Filing
from icpgate.registry.interchange import parse_filing
from icpgate.registry.store import MIGRATIONS, Update, open_registry


def parsed(records: list[dict]):
    return [parse_filing(record, line) for line, record in enumerate(records, 1)]


def full_sum(records: list[dict]) -> str:
    """The definition in docs/feed-protocol.md, computed here independently of the registry."""
    total = sum(int.from_bytes(item.filing.digest(), "big") for item in parsed(records))
    return "%064x" % (total % (1 << 256))


def test_incremental_equals_full_after_imports_feed_updates_and_removals(tmp_path: Path) -> None:
    records = sample_records()

    async def scenario() -> list[tuple[str, str, str]]:
        seen = []
        async with open_registry(tmp_path / "registry.db") as registry:
            empty = await registry.state()
            assert empty.checksum == "0" * 64

            async def check(expected: list[dict]) -> None:
                assert (await registry.state()).filings == len(expected)  # kept by each change, not counted
                recorded, recomputed = await registry.verify_checksum()
                seen.append((recorded, recomputed, full_sum(expected)))

            await registry.import_filings(parsed(records), source="s", fmt="ndjson")
            await check(records)
            changed = [dict(r) for r in records]
            changed[0]["site_name"] = "改了"
            changed[1]["status"] = "pending"
            await registry.import_filings(parsed(changed[:5]), source="s", fmt="ndjson")  # two updated, three same
            await check(changed)
            kept = changed[:-3]
            await registry.import_filings(parsed(kept), source="s", fmt="ndjson", replace=True)  # three removed
            await check(kept)
            state = await registry.state()
            after = kept[3:]  # a feed change set: removals, with the checksum the publisher computed
            report = await registry.apply(Update([], "feed", "feed", removals=[r["licence"] for r in kept[:3]],
                                                 serial=state.serial + 5, checksum=full_sum(after)))  # fmt: skip
            assert report.committed and report.refused is None
            await check(after)
            wrong = await registry.apply(Update([], "feed", "feed", removals=[after[0]["licence"]],
                                                serial=state.serial + 6, checksum="1" * 64))  # fmt: skip
            assert wrong.refused == "checksum"  # refused, rolled back: nothing changed
            await check(after)
            await registry.import_filings([], source="s", fmt="ndjson", replace=True)  # everything removed
            await check([])
        return seen

    for recorded, recomputed, independent in run(scenario()):
        assert recorded == recomputed == independent


def old_checksum(digests: list[bytes]) -> str:
    """What the schema-2 code recorded: SHA-256 over the digests in licence order."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


def test_a_registry_made_by_the_old_code_is_migrated(tmp_path: Path) -> None:
    """A schema-2 registry (the previous release) with filings and the old checksum gets the sum."""
    path = tmp_path / "old.db"
    records = sample_records()
    db = sqlite3.connect(path, isolation_level=None)
    for number in range(2):
        db.executescript(MIGRATIONS[number])
    filings: list[Filing] = [item.filing for item in parsed(records)]
    for filing in sorted(filings, key=lambda f: f.licence):
        cursor = db.execute(
            "INSERT INTO filings (licence, subject_licence, subject_name, subject_type, site_name, status,"
            " limit_access, updated_at, extra, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '{}', ?)",
            (filing.licence, filing.subject_licence, filing.subject_name, filing.subject_type.value,
             filing.site_name, filing.status.value, int(filing.limit_access), filing.updated_at, filing.digest()),
        )  # fmt: skip
        db.executemany("INSERT INTO domains VALUES (?, ?)", [(name, cursor.lastrowid) for name in filing.domains])
        access = [(cursor.lastrowid, a.provider, a.status.value, " ".join(a.ips)) for a in filing.access]
        db.executemany("INSERT INTO access (filing_id, provider, status, ips) VALUES (?, ?, ?, ?)", access)
    old = old_checksum([f.digest() for f in sorted(filings, key=lambda f: f.licence)])
    db.execute("INSERT INTO changes SELECT licence, 1, 0 FROM filings")
    db.execute("UPDATE state SET serial = 1, checksum = ?", (old,))
    db.execute("INSERT INTO serials VALUES (1, '2026-11-01T00:00:00Z', ?, ?, 0, 'old')", (old, len(filings)))
    db.execute("PRAGMA user_version = 2")
    db.close()

    async def reopen() -> tuple[str, str, int]:
        async with open_registry(path, create=False) as registry:
            state = await registry.state()
            assert state.filings == len(records)  # counted once by the migration
            recorded, recomputed = await registry.verify_checksum()
            assert recorded == recomputed
            report = await registry.import_filings(parsed(records[:1]), source="s", fmt="ndjson", replace=True)
            assert report.committed
            return state.checksum, (await registry.verify_checksum())[0], state.serial

    checksum, after_change, serial = run(reopen())
    assert checksum != old and checksum == full_sum(records)
    assert serial == 1  # the migration does not invent a serial
    assert after_change == full_sum(records[:1])
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_the_cli_import_keeps_it_incremental(tmp_path: Path, config_path: Path) -> None:
    from conftest import run_icpgate

    run_icpgate("import", str(SAMPLES), "-c", str(config_path), check=True)

    async def verify() -> tuple[str, str]:
        async with open_registry(tmp_path / "registry.db", create=False) as registry:
            return await registry.verify_checksum()

    recorded, recomputed = run(verify())
    assert recorded == recomputed == full_sum(sample_records())
