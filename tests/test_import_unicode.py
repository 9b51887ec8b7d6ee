"""Lone surrogates (a JSON `\\ud800` escape without its pair): json.loads and a few text codecs
(UTF-7) make them, UTF-8 cannot hold them, so neither can a filing's digest nor SQLite. A record
carrying one is refused like any other malformed field, with its line and field, through the real
CLI (NDJSON, the parsing pool, CSV) and the real feed client; never a traceback."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from feedkit import Fault, FaultProxy, edge_config, feed_status, feed_sync, re_signed
from test_feed import new_filing, registry_state
from test_import import digest, registry_path

from conftest import SAMPLE_CSV, import_json, run_icpgate, sample_records

BAD_LINE = 7  # the record the tests spoil, as a line of the file


def write_escaped(path: Path, records: list[dict]) -> Path:
    """NDJSON with non-ASCII text as `\\u` escapes: the only way a lone surrogate gets into a UTF-8 file."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="ascii")
    return path


def spoiled(mutate) -> list[dict]:
    """The samples, all of them updates of the stored ones, with the record on BAD_LINE spoiled."""
    records = sample_records()
    for record in records:
        record["updated_at"] = "2026-11-21T00:00:00Z"
    mutate(records[BAD_LINE - 1])
    return records


# (how the record on BAD_LINE is spoiled, the field refused, a phrase of the message)
SPOILS = [
    (lambda r: r.update(subject_name="\ud800"), "subject_name", "(a lone surrogate \\ud800 at character 1)"),
    (lambda r: r.update(site_name="示例\udfff站"), "site_name", "(a lone surrogate \\udfff at character 3)"),
    (lambda r: r["access"][0].update(provider="IDC-\udc80"), "access[0].provider", "surrogate \\udc80"),
    (lambda r: r.update(updated_at="2026-11-21\ud80000:00:00Z"), "updated_at", "at character 11"),
    (lambda r: r.update(note="\ud800"), "note", "must be valid Unicode text (a lone surrogate \\ud800"),
    (lambda r: r.update(future={"tags": ["ok", "\udc00"]}), "future.tags[1]", "must be valid Unicode text"),
    (lambda r: r.update(future={"n": 2**64, "s": "\ud800"}), "future.s", "must be valid Unicode text"),
    (lambda r: r.update({"x\ud800": 1}), "x\\ud800", "field name must be valid Unicode text"),
    (lambda r: r.update(future=[{"\udbff": 1}]), "future[0].\\udbff", "field name must be valid Unicode text"),
    (lambda r: r.update(domains=["bad\ud800.example.cn"]), "domains[0]", "not a valid internationalised name"),
]


@pytest.mark.parametrize(("mutate", "field", "message"), SPOILS, ids=[field for _, field, _ in SPOILS])
def test_a_lone_surrogate_is_refused_with_line_and_field_and_imports_nothing(
    sample_registry: Path, tmp_path: Path, mutate, field: str, message: str
) -> None:
    before = digest(registry_path(sample_registry))
    code, report = import_json(sample_registry, write_escaped(tmp_path / "bad.ndjson", spoiled(mutate)))
    assert code == 4
    assert not report["committed"]
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(BAD_LINE, field)]
    assert message in report["errors"][0]["message"]
    assert digest(registry_path(sample_registry)) == before


def test_the_message_on_stderr_names_file_line_and_field(sample_registry: Path, tmp_path: Path) -> None:
    path = write_escaped(tmp_path / "bad.ndjson", spoiled(lambda r: r.update(subject_name="示例\ud800")))
    result = run_icpgate("import", str(path), "-c", str(sample_registry))
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    assert ("%s:%d: subject_name: must be valid Unicode text (a lone surrogate \\ud800 at character 3)"
            % (path, BAD_LINE)) in result.stderr  # fmt: skip


def test_every_wrong_field_of_the_record_is_reported(sample_registry: Path, tmp_path: Path) -> None:
    records = spoiled(lambda r: r.update(status="bogus", note="\ud800"))
    code, report = import_json(sample_registry, write_escaped(tmp_path / "bad.ndjson", records))
    assert code == 4
    assert {e["field"] for e in report["errors"]} == {"status", "note"}


def test_the_parsing_pool_refuses_it_too(sample_registry: Path, tmp_path: Path) -> None:
    before = digest(registry_path(sample_registry))
    path = write_escaped(tmp_path / "bad.ndjson", spoiled(lambda r: r.update(site_name="\ud800")))
    code, report = import_json(sample_registry, path, "--jobs", "2")
    assert (code, report["committed"]) == (4, False)
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(BAD_LINE, "site_name")]
    assert digest(registry_path(sample_registry)) == before


def test_skip_invalid_drops_the_record_and_imports_the_rest(config_path: Path, tmp_path: Path) -> None:
    path = write_escaped(tmp_path / "bad.ndjson", spoiled(lambda r: r.update(subject_name="\ud800")))
    code, report = import_json(config_path, path, "--skip-invalid")
    assert code == 0 and report["committed"]
    assert (report["records"], report["skipped"]) == (len(sample_records()) - 1, 1)
    with sqlite3.connect(registry_path(config_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM filings").fetchone()[0] == len(sample_records()) - 1


def test_a_surrogate_pair_is_a_character_and_imports(config_path: Path, tmp_path: Path) -> None:
    path = write_escaped(tmp_path / "emoji.ndjson", spoiled(lambda r: r.update(site_name="站\ud83d\ude00")))
    code, report = import_json(config_path, path)
    assert code == 0, report
    with sqlite3.connect(registry_path(config_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM filings WHERE site_name = ?", ("站😀",)).fetchone()[0] == 1


# --- spreadsheets: a text encoding that decodes to lone surrogates ------------------------------


def utf7_sheet(path: Path, edit) -> Path:
    """The sample sheet, edited as lists of cells, in UTF-7 (whose `+2AA-` decodes to a lone surrogate)."""
    rows = [line.split(",") for line in SAMPLE_CSV.read_text(encoding="utf-8").splitlines()]
    edit(rows)
    path.write_bytes("".join(",".join(row) + "\n" for row in rows).encode("utf-7"))
    return path


def test_a_sheet_cell_with_a_lone_surrogate_is_refused(sample_registry: Path, tmp_path: Path) -> None:
    before = digest(registry_path(sample_registry))
    path = utf7_sheet(tmp_path / "bad.csv", lambda rows: rows[2].__setitem__(4, "站\ud800"))
    code, report = import_json(sample_registry, path, "--encoding", "utf-7")
    assert code == 4
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(3, "site_name")]
    assert "lone surrogate \\ud800 at character 2" in report["errors"][0]["message"]
    assert digest(registry_path(sample_registry)) == before


def test_an_unknown_sheet_column_with_a_lone_surrogate_is_refused_by_its_title(
    sample_registry: Path, tmp_path: Path
) -> None:
    def edit(rows: list[list[str]]) -> None:
        rows[0].append("备注")
        for row in rows[1:]:
            row.append("n")
        rows[3][-1] = "\udc80"

    before = digest(registry_path(sample_registry))
    code, report = import_json(sample_registry, utf7_sheet(tmp_path / "bad.csv", edit), "--encoding", "utf-7")
    assert code == 4
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(4, "备注")]
    assert digest(registry_path(sample_registry)) == before


# --- the feed: a publisher's change set ------------------------------------------------------------


def spoil_last(private: Path) -> Fault:
    """A fault: the body's last filing gets a lone surrogate, escaped as a buggy publisher might, signed."""
    return re_signed(private, lambda lines: [
        *lines[:-1], json.dumps(json.loads(lines[-1]) | {"subject_name": "示例\ud800"}).encode()])  # fmt: skip


def test_a_change_set_with_a_lone_surrogate_is_refused_and_the_registry_stays(
    publisher, tmp_path: Path, keys: dict[str, Path]
) -> None:
    proxy = FaultProxy(publisher.url)
    edge = edge_config(tmp_path / "edge", [proxy.url], [keys["public"]], publisher.edge_token, read_timeout=1)
    assert feed_sync(edge)[1]["result"] == "applied"
    before = registry_state(edge)
    publisher.import_records([new_filing()])

    proxy.fault = spoil_last(keys["private"])
    proxy.paths = ("/feed/v1/changes",)
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"]) == (4, "refused_malformed"), outcome
    assert "subject_name: must be valid Unicode text (a lone surrogate \\ud800 at character 3)" in outcome["message"]
    assert registry_state(edge) == before  # the last good registry stays in force
    assert feed_status(edge)["sync"]["last_error"] == outcome["message"]
    proxy.fault = None
    code, outcome = feed_sync(edge)  # the publisher fixed, the next sync catches up
    assert (code, outcome["result"]) == (0, "applied"), outcome
    assert registry_state(edge)[1] == publisher.status()["checksum"]


def test_a_snapshot_with_a_lone_surrogate_is_refused_and_nothing_is_applied(
    publisher, tmp_path: Path, keys: dict[str, Path]
) -> None:
    proxy = FaultProxy(publisher.url)
    proxy.fault = spoil_last(keys["private"])
    edge = edge_config(tmp_path / "edge", [proxy.url], [keys["public"]], publisher.edge_token, read_timeout=1)
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"]) == (4, "refused_malformed"), outcome
    assert "subject_name: must be valid Unicode text" in outcome["message"]
    assert registry_state(edge)[0::2] == (0, 0)  # serial 0, no filings
