"""Spreadsheets as operators export them, through the real CLI: GBK, Chinese headers and values,
Excel's dates, full-width separators, blank rows, gzip, and every error of a row reported."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

from conftest import import_json, run_icpgate

HEADER = (
    "网站备案号,主体备案号,主办单位名称,主办单位性质,网站名称,备案状态,网站域名,接入服务商,接入状态,接入IP,"
    "审核通过时间,负责人手机\n"
)
ROWS = [
    "京ICP备20268001号-1,京ICP备20268001号,示例表格有限公司,企业,表格站,已备案,example-sheet.cn；www.example-sheet2.cn,"
    "IDC-EXAMPLE,正常,203.0.113.0/24、2001:db8::/48,2026/11/02,13800000000",
    "京ICP备20268001号-1,京ICP备20268001号,示例表格有限公司,企业,表格站,已备案,example-sheet.cn；www.example-sheet2.cn,"
    "IDC-OTHER,已取消接入,198.51.100.0/24,2026/11/02,13800000000",
    "沪ICP备20268002号-1,沪ICP备20268002号,李示例,个人,个人站,审核中,example-sheet-blog.cn,IDC-EXAMPLE,初审通过,,"
    "2026-11-02 08:00,",
    "粤ICP备20268003号-1,粤ICP备20268003号,示例市示例局,政府机关,政务站,已注销,example-sheet-gov.cn,,,,46328.5,",
    "浙ICP备20268004号-1,浙ICP备20268004号,示例研究所,事业单位,研究站,已备案,example-sheet-inst.cn,IDC-EXAMPLE,正常,"
    "203.0.113.0/24,2026年11月2日,",
]


def filings(config: Path) -> dict[str, tuple]:
    with sqlite3.connect(config.parent / "registry.db") as conn:
        rows = conn.execute("SELECT licence, subject_type, status, updated_at, extra FROM filings").fetchall()
        access = conn.execute("SELECT f.licence, a.provider, a.status, a.ips FROM access a JOIN filings f"
                              " ON f.id = a.filing_id ORDER BY a.rowid").fetchall()  # fmt: skip
        domains = conn.execute("SELECT f.licence, d.name FROM domains d JOIN filings f ON f.id = d.filing_id"
                               " ORDER BY d.name").fetchall()  # fmt: skip
    result = {licence: (kind, status, updated, json.loads(extra), [], []) for licence, kind, status, updated, extra
              in rows}  # fmt: skip
    for licence, *record in access:
        result[licence][4].append(tuple(record))
    for licence, name in domains:
        result[licence][5].append(name)
    return result


def test_a_gbk_sheet_with_chinese_headers_and_values_imports(config_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "备案导出.csv"
    path.write_bytes((HEADER + "\r\n".join(ROWS) + "\r\n,,,,,,,,,,,\r\n,,,,,,,,,,,\r\n").encode("gbk"))
    code, report = import_json(config_path, path)
    assert code == 0, report
    assert report["records"] == 4 and report["inserted"] == 4
    stored = filings(config_path)
    assert set(stored) == {"京ICP备20268001号-1", "沪ICP备20268002号-1", "粤ICP备20268003号-1", "浙ICP备20268004号-1"}
    company = stored["京ICP备20268001号-1"]
    assert company[:3] == ("enterprise", "approved", "2026-11-01T16:00:00Z")  # midnight Beijing time
    assert company[4] == [("IDC-EXAMPLE", "active", "203.0.113.0/24 2001:db8::/48"),
                          ("IDC-OTHER", "cancelled", "198.51.100.0/24")]  # fmt: skip
    assert company[5] == ["example-sheet.cn", "www.example-sheet2.cn"]
    assert stored["沪ICP备20268002号-1"][:3] == ("individual", "pending", "2026-11-02T00:00:00Z")
    assert stored["沪ICP备20268002号-1"][4] == [("IDC-EXAMPLE", "first_review", "")]
    assert stored["粤ICP备20268003号-1"][:3] == ("government", "deregistered", "2026-11-02T04:00:00Z")  # serial 46328.5
    assert stored["浙ICP备20268004号-1"][:3] == ("institution", "approved", "2026-11-01T16:00:00Z")
    assert all(extra == {} for *_, extra, _, _ in stored.values())  # the phone column is left out
    assert any("负责人手机" in note for note in report["notes"])
    assert "13800000000" not in (config_path.parent / "registry.db").read_bytes().decode("latin-1")


def test_every_error_of_a_row_is_reported_with_line_and_column(config_path: Path, tmp_path: Path) -> None:
    bad = [
        ROWS[0],
        "京ICP备20268005号-1,京ICP备20268009号,示例,公司,站,可能,com.cn,IDC-EXAMPLE,也许,203.0.113.7/24,明天,",
        ROWS[4].replace("2026年11月2日", "2026年13月2日"),
    ]
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(gzip.compress((HEADER + "\n".join(bad) + "\n").encode("gb18030")))
    result = run_icpgate("import", str(path), "-c", str(config_path))
    assert result.returncode == 4
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    where = "error: %s:3: " % path
    expected = [
        where + "subject_licence (主体备案号): '京ICP备20268009号' is not the subject of '京ICP备20268005号-1'",
        where + "status (备案状态): '可能' is not one of",
        where + "domains[0] (网站域名): 'com.cn' is a public suffix",
        where + "access_status (接入状态): '也许' is not one of",
        where + "access_ips[0] (接入IP): '203.0.113.7/24'",
        where + "updated_at (审核通过时间): '明天' is not a time",
        "error: %s:4: updated_at (审核通过时间): '2026年13月2日' is not a valid date" % path,
    ]
    for text in expected:
        assert any(line.startswith(text) for line in errors), (text, errors)
    assert len(errors) == len(expected), errors
    assert "nothing was imported" in result.stderr


def test_encoding_option_and_utf8_with_bom(config_path: Path, tmp_path: Path) -> None:
    sheet = (HEADER + ROWS[4] + "\n").encode("utf-8-sig")
    path = tmp_path / "utf8.csv"
    path.write_bytes(sheet)
    assert import_json(config_path, path)[0] == 0
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes((HEADER + ROWS[2] + "\n").encode("gbk"))
    code, report = import_json(config_path, gbk, "--encoding", "utf-8")
    assert code == 4 and "not UTF-8" in report["errors"][0]["message"]
    assert import_json(config_path, gbk, "--encoding", "gbk")[0] == 0
    assert run_icpgate("import", str(gbk), "-c", str(config_path), "--encoding", "klingon").returncode == 2
