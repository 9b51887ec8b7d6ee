"""Truncated files through `icpgate import`: the sample files cut at a byte inside a multi-byte
character, inside a JSON value and inside a quoted CSV cell say that the line is truncated, with
its line and column, and import nothing; NDJSON reports every wrong field of a line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from conftest import SAMPLE_CSV, SAMPLES, run_icpgate, sample_records, write_ndjson


def import_file(config: Path, path: Path, *extra: str) -> tuple[int, dict]:
    result = run_icpgate("import", str(path), "--json", "-c", str(config), *extra)
    return result.returncode, json.loads(result.stdout)


def cut(source: Path, target: Path, line: int, at: int) -> tuple[bytes, bytes]:
    """`source` up to byte `at` of its line `line` (1-based): (the lines before, what is left of that line)."""
    lines = source.read_bytes().split(b"\n")
    before = b"".join(part + b"\n" for part in lines[: line - 1])
    target.write_bytes(before + lines[line - 1][:at])
    return before, lines[line - 1][:at]


def inside_a_character(text: bytes) -> int:
    """A byte offset inside the first three-byte UTF-8 character of `text`: after its lead byte."""
    return next(index for index, byte in enumerate(text) if byte >= 0xE0) + 1


def assert_refused_as(config: Path, path: Path, line: int, message: str) -> None:
    code, report = import_file(config, path)
    assert (code, report["committed"], report["error_count"]) == (4, False, 1), report
    (error,) = report["errors"]
    assert (error["line"], error["message"]) == (line, message), error


@pytest.mark.parametrize("source", [SAMPLES, SAMPLE_CSV], ids=["ndjson", "csv"])
def test_a_file_cut_inside_a_utf8_character_says_it_is_truncated(config_path: Path, tmp_path: Path,
                                                                   source: Path) -> None:  # fmt: skip
    line = 5
    whole = source.read_bytes().split(b"\n")[line - 1]
    at = inside_a_character(whole)
    _, left = cut(source, tmp_path / ("cut" + source.suffix), line, at)
    column = len(left.decode("utf-8", errors="ignore")) + 1  # the cut character's own column
    assert_refused_as(config_path, tmp_path / ("cut" + source.suffix), line, "truncated: the file ends at column %d,"
                      " inside a multi-byte UTF-8 character (byte %d of the line)" % (column, at))  # fmt: skip
    result = run_icpgate("import", str(tmp_path / ("cut" + source.suffix)), "-c", str(config_path))
    assert "cut%s:%d: record: truncated: the file ends at column %d" % (source.suffix, line, column) in result.stderr
    assert "--encoding" not in result.stderr  # before: "not UTF-8 (byte ...); give --encoding if it is another one"


def test_a_gbk_spreadsheet_cut_inside_a_character_says_it_is_truncated(config_path: Path, tmp_path: Path) -> None:
    text = SAMPLE_CSV.read_text(encoding="utf-8")
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes(text.encode("gb18030"))
    lines = gbk.read_bytes().split(b"\n")
    at = next(index for index, byte in enumerate(lines[3]) if byte >= 0x81) + 1  # after a GBK lead byte
    cut(gbk, tmp_path / "cut.csv", 4, at)
    column = len(lines[3][: at - 1].decode("gb18030")) + 1
    assert_refused_as(config_path, tmp_path / "cut.csv", 4, "truncated: the file ends at column %d, inside a"
                      " multi-byte GB18030 character (byte %d of the line)" % (column, at))  # fmt: skip


@pytest.mark.parametrize(("marker", "inside"), [
    (b'"updated_at": "2026', "a string that starts at column %d"),
    (b'"limit_access": fal', "a JSON value (Expecting value at column %d)"),
    (b'"domains": [', "a JSON value (Expecting value at column %d)"),
    (b'"access": [{"provider": "IDC-EXAMPLE", "status": "active"', "a JSON value (Expecting ',' delimiter at"
                                                                     " column %d)"),
    (b'"ips": ["203.0.113.0/24"', "a JSON value (Expecting ',' delimiter at column %d)"),
])  # fmt: skip
def test_an_ndjson_file_cut_inside_a_json_value_says_the_line_is_truncated(
    config_path: Path, tmp_path: Path, marker: bytes, inside: str
) -> None:
    line = next(number for number, text in enumerate(SAMPLES.read_bytes().split(b"\n"), start=1) if marker in text)
    whole = SAMPLES.read_bytes().split(b"\n")[line - 1]
    at = whole.index(marker) + len(marker)
    _, left = cut(SAMPLES, tmp_path / "cut.ndjson", line, at)
    text = left.decode("utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        where = error.colno  # where Python's own parser stops: the value that was cut
    assert_refused_as(config_path, tmp_path / "cut.ndjson", line, "truncated: the line ends at column %d, inside %s"
                      % (len(text) + 1, inside % where))  # fmt: skip


def test_broken_json_that_is_not_cut_is_not_called_truncated(config_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.ndjson"
    path.write_text('{"licence": "x",}\n{"licence": tru}\n', encoding="utf-8")
    code, report = import_file(config_path, path)
    assert code == 4 and [(e["line"], e["message"]) for e in report["errors"]] == [
        (1, "not valid JSON at column 17: Expecting property name enclosed in double quotes"),
        (2, "not valid JSON at column 13: Expecting value"),
    ], report


def test_a_spreadsheet_cut_inside_a_quoted_cell_says_it_is_truncated(config_path: Path, tmp_path: Path) -> None:
    """Domains last and quoted: before, the cut cell's first names imported as if they were all of them."""
    rows = list(csv.DictReader(io.StringIO(SAMPLE_CSV.read_text(encoding="utf-8"))))
    columns = [name for name in rows[0] if name != "domains"] + ["domains"]
    rows[-1]["domains"] = "cut-first.example-cut.cn, cut-second.example-cut.cn"
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = out.getvalue().rstrip("\n")
    path = tmp_path / "quoted.csv"
    path.write_text(text[: text.rindex("cut-second") + len("cut-second.example-c")], encoding="utf-8")
    last = path.read_text(encoding="utf-8").split("\n")
    assert_refused_as(config_path, path, len(last), "truncated: the file ends at column %d, inside this quoted cell"
                      % (len(last[-1]) + 1))  # fmt: skip
    code, report = import_file(config_path, path)
    assert report["errors"][0]["field"] == "domains"
    code, report = import_file(config_path, path, "--skip-invalid")  # the whole rows before it import
    assert (code, report["skipped"], report["inserted"]) == (0, 1, len({row["licence"] for row in rows[:-1]})), report


def test_an_ndjson_line_reports_every_wrong_field(config_path: Path, tmp_path: Path) -> None:
    records = sample_records()[:3]
    records[1] |= {"status": "approved-ish", "updated_at": "yesterday", "domains": ["com.cn"]}
    del records[1]["site_name"]
    code, report = import_file(config_path, write_ndjson(tmp_path / "three.ndjson", records))
    assert (code, report["error_count"]) == (4, 4), report
    assert {(e["line"], e["field"]) for e in report["errors"]} == {
        (2, "site_name"), (2, "status"), (2, "domains[0]"), (2, "updated_at"),
    }  # fmt: skip
    code, report = import_file(config_path, tmp_path / "three.ndjson", "--skip-invalid")
    assert (code, report["inserted"], report["skipped"]) == (0, 2, 1), report  # one record left out, not four
