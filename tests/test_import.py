"""Imports through the real SQLite file: one transaction, errors by line and field, nothing half-done."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from feedkit import bulk_records

from conftest import REPO, SAMPLE_CSV, SAMPLES, run_icpgate, sample_records, write_ndjson
from icpgate.registry.store import MIGRATIONS


def registry_path(config: Path) -> Path:
    return config.parent / "registry.db"


def digest(db: Path) -> str:
    """A digest of the registry's contents (not its bytes: WAL files differ)."""
    with sqlite3.connect(db) as conn:
        rows = [conn.execute("SELECT * FROM %s ORDER BY 1, 2" % t).fetchall() for t in ("filings", "domains", "access")]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, default=bytes.hex).encode()).hexdigest()


def import_json(config: Path, path: Path, *extra: str) -> tuple[int, dict]:
    result = run_icpgate("import", str(path), "-c", str(config), "--json", *extra)
    return result.returncode, json.loads(result.stdout)


def test_sample_import_stores_every_filing(sample_registry: Path) -> None:
    with sqlite3.connect(registry_path(sample_registry)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM filings").fetchone()[0] == len(sample_records())
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("SELECT COUNT(*) FROM imports").fetchone()[0] == 1


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [
        (lambda r: r.pop("subject_name"), "subject_name", "required field is missing"),
        (lambda r: r.update(status="approved-ish"), "status", "not one of"),
        (lambda r: r.update(domains=["com.cn"]), "domains[0]", "public suffix"),
        (lambda r: r.update(domains=["example..cn"]), "domains[0]", "empty label"),
        (lambda r: r.update(domains=["203.0.113.9"]), "domains[0]", "IP address"),
        (lambda r: r.update(licence="京ICP备2024000099号"), "licence", "website filing number"),
        (lambda r: r.update(subject_licence="沪ICP备20240001号"), "subject_licence", "is not the subject"),
        (lambda r: r["access"][0].update(status="maybe"), "access[0].status", "not one of"),
        (lambda r: r["access"][0].update(ips=["203.0.113.7/24"]), "access[0].ips[0]", "host bits"),
        (lambda r: r.update(updated_at="yesterday"), "updated_at", "RFC 3339"),
        (lambda r: r.update(limit_access="no"), "limit_access", "true or false"),
    ],
)
def test_a_bad_record_names_line_and_field_and_imports_nothing(
    sample_registry: Path, tmp_path: Path, mutate, field: str, message: str
) -> None:
    before = digest(registry_path(sample_registry))
    records = sample_records()
    for record in records:
        record["updated_at"] = "2026-11-21T00:00:00Z"  # every other record would be an update
    mutate(records[6])
    code, report = import_json(sample_registry, write_ndjson(tmp_path / "bad.ndjson", records))
    assert code == 4
    assert not report["committed"]
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(7, field)]
    assert message in report["errors"][0]["message"]
    assert digest(registry_path(sample_registry)) == before


def test_error_message_on_stderr_names_file_line_and_field(config_path: Path, tmp_path: Path) -> None:
    records = sample_records()[:3]
    del records[2]["domains"]
    path = write_ndjson(tmp_path / "f.ndjson", records)
    result = run_icpgate("import", str(path), "-c", str(config_path))
    assert result.returncode == 4
    assert "%s:3: domains: required field is missing" % path in result.stderr
    assert "nothing was imported" in result.stderr


def test_skip_invalid_imports_the_good_ones(config_path: Path, tmp_path: Path) -> None:
    records = sample_records()[:5]
    records[1]["status"] = "bogus"
    path = write_ndjson(tmp_path / "f.ndjson", records)
    code, report = import_json(config_path, path, "--skip-invalid")
    assert code == 0 and report["committed"]
    assert (report["records"], report["skipped"]) == (4, 1)
    with sqlite3.connect(registry_path(config_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM filings").fetchone()[0] == 4


def test_duplicates_inside_a_file_are_refused(config_path: Path, tmp_path: Path) -> None:
    records = sample_records()[:4]
    records[3] = dict(records[0])
    records[2]["domains"] = ["example-blog.net", "example-filed.cn"]
    code, report = import_json(config_path, write_ndjson(tmp_path / "d.ndjson", records))
    assert code == 4
    found = {(e["line"], e["field"]) for e in report["errors"]}
    assert (4, "licence") in found  # the repeated licence
    assert (3, "domains") in found  # example-filed.cn claimed by line 1 and line 3


def test_a_domain_filed_under_another_stored_filing_is_refused(sample_registry: Path, tmp_path: Path) -> None:
    record = sample_records()[1]
    record["domains"] = ["example-shop.com.cn", "example-filed.cn"]
    code, report = import_json(sample_registry, write_ndjson(tmp_path / "c.ndjson", [record]))
    assert code == 4
    assert "already filed under 京ICP备20240001号-1" in report["errors"][0]["message"]


def test_reimport_updates_and_replaces_domains_and_access(sample_registry: Path, tmp_path: Path) -> None:
    record = sample_records()[0]
    record["status"] = "deregistered"
    record["domains"] = ["example-filed.cn", "example-filed.com"]
    record["access"] = []
    code, report = import_json(sample_registry, write_ndjson(tmp_path / "u.ndjson", [record]))
    assert code == 0 and (report["inserted"], report["updated"]) == (0, 1)
    with sqlite3.connect(registry_path(sample_registry)) as conn:
        (filing_id, status) = conn.execute(
            "SELECT id, status FROM filings WHERE licence = ?", (record["licence"],)
        ).fetchone()
        assert status == "deregistered"
        assert {n for (n,) in conn.execute("SELECT name FROM domains WHERE filing_id = ?", (filing_id,))} == {
            "example-filed.cn",
            "example-filed.com",
        }
        assert conn.execute("SELECT COUNT(*) FROM access WHERE filing_id = ?", (filing_id,)).fetchone()[0] == 0


def test_unknown_fields_are_kept(sample_registry: Path) -> None:
    with sqlite3.connect(registry_path(sample_registry)) as conn:
        (extra,) = conn.execute("SELECT extra FROM filings WHERE licence = '鲁ICP备20240013号-1'").fetchone()
    assert json.loads(extra) == {"record_source": "msp-export", "remark": "unknown fields are kept"}


def test_csv_with_one_access_record_per_row(config_path: Path) -> None:
    code, report = import_json(config_path, SAMPLE_CSV)
    assert code == 0 and report["records"] == 5
    with sqlite3.connect(registry_path(config_path)) as conn:
        rows = conn.execute(
            "SELECT a.provider, a.status, a.ips FROM access a JOIN filings f ON f.id = a.filing_id"
            " WHERE f.licence = '沪ICP备20240021号-1' ORDER BY a.rowid"
        ).fetchall()
    assert rows == [
        ("IDC-OTHER", "active", "198.51.100.0/24"),
        ("IDC-EXAMPLE", "first_review", "203.0.113.0/24 2001:db8::/48"),
    ]


def test_csv_rows_of_one_licence_must_agree(config_path: Path, tmp_path: Path) -> None:
    lines = SAMPLE_CSV.read_text(encoding="utf-8").splitlines()
    lines[5] = lines[5].replace("示例迁移中", "另一个名字")
    path = tmp_path / "c.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, report = import_json(config_path, path)
    assert code == 4
    assert (report["errors"][0]["line"], report["errors"][0]["field"]) == (6, "site_name")


def test_not_utf8_and_not_json_name_their_line(config_path: Path, tmp_path: Path) -> None:
    good = SAMPLES.read_bytes().splitlines(keepends=True)
    path = tmp_path / "b.ndjson"
    path.write_bytes(good[0] + b"{not json\n" + good[2] + b"\xff\xfe broken\n")
    code, report = import_json(config_path, path)
    assert code == 4
    assert [(e["line"], e["message"].split(" ")[0]) for e in report["errors"]] == [(2, "not"), (4, "not")]
    assert "UTF-8" in report["errors"][1]["message"]
    assert not registry_path(config_path).exists() or digest(registry_path(config_path)) == digest_of_empty(tmp_path)


def digest_of_empty(tmp_path: Path) -> str:
    import asyncio

    from icpgate.registry.store import open_registry

    empty = tmp_path / "empty.db"

    async def create() -> None:
        async with open_registry(empty):
            pass

    asyncio.run(create())
    return digest(empty)


def test_skip_invalid_drops_every_conflict_beyond_the_reported_ones(config_path: Path, tmp_path: Path) -> None:
    """More conflicts than the report lists (1,000): all of them are skipped, none reach the merge."""
    template = sample_records()[0]
    records = []
    for number in range(1, 1202):
        subject = "京ICP备2099%04d号" % number
        records.append(
            template | {"licence": subject + "-1", "subject_licence": subject, "domains": ["same.example.cn"]}
        )
    code, report = import_json(config_path, write_ndjson(tmp_path / "many.ndjson", records), "--skip-invalid")
    assert code == 0 and report["committed"]
    assert (report["records"], report["skipped"], report["error_count"]) == (1, 1200, 1200)
    assert len(report["errors"]) == 1000
    assert report["errors"][0]["message"] == "domain same.example.cn is also in the record at line 1"


# --- the mass-change guard: a local import is held to what the feed is held to ---------------------


@pytest.fixture(scope="module")
def big_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A registry of 3000 filings, made once; each test works on its own copy: (config, original db)."""
    folder = tmp_path_factory.mktemp("big")
    config = folder / "config.toml"
    config.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "registry.db"\n[policy]\npack = "%s"\n'
                      % (REPO / "policies" / "default.toml"), encoding="utf-8")  # fmt: skip
    code, report = import_json(config, write_ndjson(folder / "big.ndjson", bulk_records(0, 3000)))
    assert (code, report["inserted"]) == (0, 3000)
    return config, folder / "registry.db"


@pytest.fixture
def big(big_registry: tuple[Path, Path], tmp_path: Path) -> Path:
    config, original = big_registry
    shutil.copy(config, tmp_path / "config.toml")
    with sqlite3.connect(original) as source, sqlite3.connect(tmp_path / "registry.db") as copy:
        source.backup(copy)
    return tmp_path / "config.toml"


def one_line_file(tmp_path: Path) -> Path:
    return write_ndjson(tmp_path / "one.ndjson", bulk_records(0, 1))


def serial_and_count(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT serial FROM state").fetchone()[0], conn.execute("SELECT COUNT(*) FROM filings"
                                                                                     ).fetchone()[0]  # fmt: skip


def test_replace_with_a_one_line_file_is_refused_by_the_guard(big: Path, tmp_path: Path) -> None:
    before = digest(registry_path(big))
    result = run_icpgate("import", str(one_line_file(tmp_path)), "--replace", "-c", str(big))
    assert result.returncode == 4, result.stderr
    assert "refused %s: the mass-change guard: it would remove 2999 of 3000 filings (100%%)" % one_line_file(
        tmp_path) in result.stderr  # fmt: skip
    assert "nothing was imported" in result.stderr and "--dry-run" in result.stderr and "--force" in result.stderr
    assert digest(registry_path(big)) == before and serial_and_count(registry_path(big)) == (1, 3000)


def test_a_mass_addition_is_refused_too_and_a_small_one_passes(big: Path, tmp_path: Path) -> None:
    code, report = import_json(big, write_ndjson(tmp_path / "many.ndjson", bulk_records(3000, 1000)))  # 33%
    assert (code, report["committed"], report["refused"]) == (4, False, "guard"), report
    assert "add 1000 of 3000" in report["refusal"]
    code, report = import_json(big, write_ndjson(tmp_path / "some.ndjson", bulk_records(3000, 800)))  # 27%
    assert (code, report["committed"], report["inserted"]) == (0, True, 800), report
    assert serial_and_count(registry_path(big)) == (2, 3800)


def test_dry_run_reports_and_changes_nothing(big: Path, tmp_path: Path) -> None:
    before = digest(registry_path(big))
    result = run_icpgate("import", str(one_line_file(tmp_path)), "--replace", "--dry-run", "-c", str(big))
    assert result.returncode == 4, result.stderr  # what the import itself would answer
    assert "dry run: %s would import 1 filings into a registry of 3000 (0 new, 0 updated, 1 unchanged, 2999" \
           " removed); nothing was changed" % one_line_file(tmp_path) in result.stdout  # fmt: skip
    assert "  removed  京ICP备20770001号-1" in result.stdout and "… and 2979 more" in result.stdout
    assert "the mass-change guard refuses this import: it would remove 2999" in result.stdout
    small = write_ndjson(tmp_path / "small.ndjson", bulk_records(2990, 20))  # 10 known, 10 new
    code, report = import_json(big, small, "--dry-run")
    assert (code, report["dry_run"], report["committed"]) == (0, True, False), report
    assert (report["inserted"], report["unchanged"], report["removed"]) == (10, 10, 0)
    assert digest(registry_path(big)) == before and serial_and_count(registry_path(big)) == (1, 3000)


def test_force_applies_past_the_guard_and_is_recorded(big: Path, tmp_path: Path) -> None:
    result = run_icpgate("import", str(one_line_file(tmp_path)), "--replace", "--force", "-c", str(big))
    assert result.returncode == 0, result.stderr
    assert "removed 2999" not in result.stdout and "2999 removed" in result.stdout
    assert "warning: --force: the mass-change guard was overridden (it would remove 2999 of 3000" in result.stderr
    assert serial_and_count(registry_path(big)) == (2, 1)
    with sqlite3.connect(registry_path(big)) as conn:
        (source,) = conn.execute("SELECT source FROM serials WHERE serial = 2").fetchone()
        (logged,) = conn.execute("SELECT source FROM imports ORDER BY id DESC LIMIT 1").fetchone()
    assert source == logged and "(guard overridden: it would remove 2999 of 3000 filings" in source
