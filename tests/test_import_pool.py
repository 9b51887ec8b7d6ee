"""NDJSON parsed in a pool of processes (`icpgate import --jobs N`): the same records, the same
errors with the same line numbers in the same order, and the same registry as parsing in the
importer itself, across chunk boundaries and when the file's text ends it early."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SAMPLES, run_icpgate
from icpgate.registry.importers.formats import _lines
from icpgate.registry.importers.pool import read_ndjson_in_pool
from icpgate.registry.interchange import ParsedFiling, RecordError, read_ndjson
from icpgate.registry.staging import staged


def comparable(items) -> list[tuple]:
    """Records and errors as values: errors by line, field and message."""
    out = []
    for item in items:
        if isinstance(item, RecordError):
            out.append(("error", item.line, item.field, item.message))
        else:
            out.append(staged(item) if isinstance(item, ParsedFiling) else item)
    return out


def mixed_lines() -> list[bytes]:
    """The sample filings with, between them, lines of every kind an import refuses or skips."""
    good = SAMPLES.read_bytes().splitlines(keepends=True)
    bad_record = json.loads(good[3])
    bad_record.update(site_name="", domains=["not a domain"], status="unknown")  # several errors on one line
    lines = []
    for index, line in enumerate(good):
        lines.append(line)
        if index % 5 == 1:
            lines.append(b"{not json\n")
        if index % 7 == 2:
            lines.append(b"\n")
        if index % 6 == 4:
            lines.append(json.dumps(bad_record, ensure_ascii=False).encode() + b"\n")
        if index % 9 == 8:
            lines.append(b"[1, 2]\n")
    return [*lines, good[0][:40]]  # ends inside a value: truncated


def test_records_and_errors_are_those_of_parsing_in_the_importer_in_file_order() -> None:
    lines = mixed_lines()
    expected = comparable(read_ndjson(_lines(io.BytesIO(b"".join(lines)), "utf-8")))
    assert sum(1 for item in expected if item[0] == "error") > 10
    for chunk in (1, 7, len(lines)):  # a line per task, chunks across every kind of line, one chunk
        got = read_ndjson_in_pool(_lines(io.BytesIO(b"".join(lines)), "utf-8"), 2, chunk)
        assert comparable(got) == expected, chunk


def collected(items) -> tuple[list[tuple], tuple | None]:
    """What an iteration yields, and the error that ended it, if one did."""
    out: list = []
    try:
        for item in items:
            out.append(item)
    except RecordError as error:
        return comparable(out), ("error", error.line, error.field, error.message)
    return comparable(out), None


def test_text_that_cannot_be_decoded_ends_the_file_after_every_record_before_it() -> None:
    lines = mixed_lines()
    lines.insert(30, b"\xff\xfe broken\n")
    expected = collected(read_ndjson(_lines(io.BytesIO(b"".join(lines)), "utf-8")))
    assert expected[1] is not None and expected[1][1] == 31 and len(expected[0]) > 20
    for chunk in (1, 7, 29, 30, 31):
        got = collected(read_ndjson_in_pool(_lines(io.BytesIO(b"".join(lines)), "utf-8"), 2, chunk))
        assert got == expected, chunk


def config_for(tmp_path: Path, name: str) -> Path:
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    text = text.replace('path = "var/registry.db"', 'path = "%s"' % (tmp_path / (name + ".db")))
    text = text.replace('pack = "policies/default.toml"', 'pack = "%s"' % (REPO / "policies" / "default.toml"))
    path = tmp_path / (name + ".toml")
    path.write_text(text, encoding="utf-8")
    return path


def checksum(tmp_path: Path, name: str) -> str:
    with sqlite3.connect(tmp_path / (name + ".db")) as db:
        return db.execute("SELECT checksum FROM state").fetchone()[0]


def test_an_import_in_the_pool_reports_and_stores_what_one_in_the_importer_does(tmp_path: Path) -> None:
    source = tmp_path / "generated.ndjson"
    subprocess.run([sys.executable, str(REPO / "bench" / "gen_filings.py"), "5000", str(source)], check=True,
                   capture_output=True)  # fmt: skip
    lines = source.read_bytes().splitlines(keepends=True)
    for at in (4500, 2001, 2000, 1999, 0):  # around the pool's chunks of 2,000 lines
        lines.insert(at, b"{not json\n")
    lines.insert(3000, lines[10])  # a duplicate licence: refused when the whole file is staged
    path = tmp_path / "mixed.ndjson"
    path.write_bytes(b"".join(lines))
    reports = {}
    for name, jobs in (("importer", "1"), ("pool", "3")):
        result = run_icpgate("import", str(path), "--json", "--skip-invalid", "--jobs", jobs,
                             "-c", str(config_for(tmp_path, name)))  # fmt: skip
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads(result.stdout)
        reports[name]["checksum"] = checksum(tmp_path, name)
    assert len(reports["pool"]["errors"]) >= 6
    assert reports["pool"] == reports["importer"]
