"""Download files of the national filing system (企业下载数据格式.xsd) through the real CLI and real
registry files: GBK, streamed, access ranges as CIDRs, cancellations against the file and the store."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from miitkit import Site, Subject, baxx, document, v4, write_gbk, zxxx

from conftest import check_json, run_icpgate
from conftest import import_json as conftest_import_json

ISP_MAP = ["--set", 'import.isp_ids = {"10001" = "IDC-EXAMPLE"}']
OUR_RANGE = (v4("203.0.113.0"), v4("203.0.113.255"))


def subject_one() -> Subject:
    return Subject(1001, "京ICP备20269001号", "示例网络科技有限公司", sites=[
        Site(2001, "京ICP备20269001号-1", "示例站", ["example-xml.cn", "www.example-xml-two.cn"],
             [(3001, 10001, [OUR_RANGE]), (3002, 10002, [("2001:db8::", "2001:db8::ffff")])]),
        Site(2002, "京ICP备20269001号-2", "示例站二", ["example-xml-three.cn"],
             [(3003, 10001, [(v4("203.0.113.16"), v4("203.0.113.47"))])], modified="2026-11-21 08:30:00"),
    ])  # fmt: skip


def subject_two() -> Subject:
    return Subject(1002, "沪ICP备20269002号", "张示例", dwxz=5, sites=[
        Site(2003, "沪ICP备20269002号-1", "个人博客", ["example-xml-blog.cn"], [(3004, 10001, [OUR_RANGE])]),
    ])  # fmt: skip


def import_json(config: Path, path: Path, *extra: str) -> tuple[int, dict]:
    return conftest_import_json(config, path, *ISP_MAP, *extra)


def stored(config: Path) -> dict[str, dict]:
    with sqlite3.connect(config.parent / "registry.db") as conn:
        rows = conn.execute("SELECT licence, status, subject_type, updated_at, extra FROM filings").fetchall()
        access = conn.execute("SELECT f.licence, a.provider, a.status, a.ips FROM access a"
                              " JOIN filings f ON f.id = a.filing_id ORDER BY a.rowid").fetchall()  # fmt: skip
    filings = {licence: {"status": status, "subject_type": kind, "updated_at": updated, "extra": json.loads(extra),
                         "access": []} for licence, status, kind, updated, extra in rows}  # fmt: skip
    for licence, provider, status, ips in access:
        filings[licence]["access"].append((provider, status, ips))
    return filings


def test_a_download_file_imports_websites_with_their_access_ranges(config_path: Path, tmp_path: Path) -> None:
    path = write_gbk(tmp_path / "download-0001.xml", document(baxx(subject_one()) + baxx(subject_two())))
    assert b"\xca\xbe\xc0\xfd" in path.read_bytes()  # 示例 in GBK: the file really is GBK
    code, report = import_json(config_path, path)
    assert code == 0, report
    assert (report["records"], report["inserted"]) == (3, 3)
    filings = stored(config_path)
    site = filings["京ICP备20269001号-1"]
    assert site["status"] == "approved" and site["subject_type"] == "enterprise"
    assert site["access"] == [("IDC-EXAMPLE", "active", "203.0.113.0/24"), ("10002", "active", "2001:db8::/112")]
    assert site["updated_at"] == "2026-11-20T08:00:00Z"  # 16:00 Beijing time
    assert site["extra"] == {"miit_ztid": "1001", "miit_wzid": "2001", "miit_jrids": {"3001": "IDC-EXAMPLE",
                                                                                      "3002": "10002"}}  # fmt: skip
    assert filings["京ICP备20269001号-2"]["access"] == [("IDC-EXAMPLE", "active", "203.0.113.16/28 203.0.113.32/28")]
    assert filings["京ICP备20269001号-2"]["updated_at"] == "2026-11-21T00:30:00Z"
    assert filings["沪ICP备20269002号-1"]["subject_type"] == "individual"
    # Personal data in the file (ID numbers, phones, addresses) is never stored.
    raw = (config_path.parent / "registry.db").read_bytes()
    for secret in ("EXAMPLE00001001", "13800000000", "示例住所", "示例负责人"):
        assert secret.encode() not in raw and secret.encode("gbk") not in raw
    facts = check_json(config_path, "www.example-xml-two.cn", "--ip", "203.0.113.9", *ISP_MAP)
    assert facts["action"] == "allow" and facts["filing"]["licence"] == "京ICP备20269001号-1"


def test_cancellations_apply_to_stored_filings_and_to_the_same_file(config_path: Path, tmp_path: Path) -> None:
    assert import_json(config_path, write_gbk(tmp_path / "d1.xml", document(baxx(subject_one()))))[0] == 0
    # A later download: website 2002 deregistered, access 3001 cancelled, an unknown subject.
    cancel = write_gbk(tmp_path / "d2.xml", document(zxsj=zxxx(1, 2002) + zxxx(2, 3001) + zxxx(0, 99999)))
    code, report = import_json(config_path, cancel)
    assert code == 0 and report["updated"] == 2, report
    filings = stored(config_path)
    assert filings["京ICP备20269001号-2"]["status"] == "deregistered"
    assert filings["京ICP备20269001号-1"]["status"] == "approved"
    assert filings["京ICP备20269001号-1"]["access"][0] == ("IDC-EXAMPLE", "cancelled", "203.0.113.0/24")
    assert any("主体注销 of record 99999" in note for note in report["notes"])
    facts = check_json(config_path, "example-xml.cn", "--ip", "203.0.113.9", *ISP_MAP)
    assert (facts["action"], facts["reason"]) == ("block", "access_cancelled")
    # Cancellations before their filings in one file (xs:all allows either order): subject 1002 deregistered.
    both = write_gbk(tmp_path / "d3.xml", document(baxx(subject_two()), zxsj=zxxx(0, 1002)).replace(
        "<BASJ>", "<ZXSJ>\n%s</ZXSJ>\n<BASJ>" % zxxx(0, 1002), 1).replace("</BASJ>\n<ZXSJ>", "</BASJ>\n<XX>", 1)
        .replace("</ZXSJ>\n</ICP>", "</XX>\n</ICP>"))  # fmt: skip
    code, report = import_json(config_path, both)
    assert code == 0, report
    assert stored(config_path)["沪ICP备20269002号-1"]["status"] == "deregistered"


def test_bad_records_name_file_line_and_element_and_nothing_is_imported(config_path: Path, tmp_path: Path) -> None:
    bad = subject_two()
    bad.sites[0].access = [(3004, 10001, [(v4("203.0.113.9"), v4("203.0.113.1"))])]
    text = document(baxx(subject_one()) + baxx(bad)).replace("<Baxh>京ICP备20269001号-2</Baxh>", "")
    path = write_gbk(tmp_path / "bad.xml", text)
    result = run_icpgate("import", str(path), "-c", str(config_path))
    assert result.returncode == 4
    assert "%s:5: Wz_xx[1].Baxh: required element is missing or empty" % path in result.stderr
    assert "%s:10: Wz_xx[0].Jr_xx[0].Ip_xx[0]: Qsip 203.0.113.9 .. Zzip 203.0.113.1 is not a range" % path in (
        result.stderr)  # fmt: skip
    assert "refused" in result.stderr
    assert not (config_path.parent / "registry.db").exists() or not stored(config_path)
    broken = write_gbk(tmp_path / "broken.xml", document(baxx(subject_two())).replace("</Zt_xx>", "", 1))
    code, report = import_json(config_path, broken)
    assert code == 4 and report["errors"][0]["line"] == 7 and "tag mismatch" in report["errors"][0]["message"]
    other = write_gbk(tmp_path / "other.xml", '<?xml version="1.0" encoding="GBK"?>\n<UploadData><ICP/></UploadData>\n')
    code, report = import_json(config_path, other)
    assert code == 4 and "root element is <UploadData>" in report["errors"][0]["message"]


def test_lists_are_notes_and_gzip_and_detection_work(config_path: Path, tmp_path: Path) -> None:
    lists = ("<FFJRHMD><Ffjrxx><Id>1</Id><Ym>example-illegal.cn</Ym><Ip>%s</Ip><Zjjrz>1</Zjjrz><Szs>1</Szs>"
             "<Dqjcsj>2026-11-20 10:00:00</Dqjcsj></Ffjrxx></FFJRHMD>\n<WBAWZLB><Wbawz_xx><Id>2</Id>"
             "<Wzym_mc>example-unfiled-xml.cn</Wzym_mc><IP>%s</IP><Yys>1</Yys></Wbawz_xx></WBAWZLB>\n"
             % (v4("203.0.113.5"), v4("203.0.113.6")))  # fmt: skip
    text = document(baxx(subject_two()), lists=lists)
    path = tmp_path / "download-0002.dat"  # no telling suffix: detected from the content
    path.write_bytes(gzip.compress(text.encode("gbk")))
    code, report = import_json(config_path, path)
    assert code == 0 and report["records"] == 1, report
    assert any("FFJRHMD" in note and "example-illegal.cn at 203.0.113.5" in note for note in report["notes"])
    assert any("WBAWZLB" in note and "example-unfiled-xml.cn at 203.0.113.6" in note for note in report["notes"])


PEAK_RSS = """
import sys
from pathlib import Path
from icpgate.config.display_time import BEIJING
from icpgate.registry.importers.miit_xml import MiitOptions, read_download
with open(sys.argv[1], "rb") as stream:
    count = sum(1 for _ in read_download(stream, MiitOptions(BEIJING, {})))
status = Path("/proc/self/status").read_text()
print(count, next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) * 1024)
"""


def write_download(path: Path, count: int) -> Path:
    with path.open("wb") as out:
        out.write(b'<?xml version="1.0" encoding="GBK"?>\n<DownloadData>\n<ICP>\n<BASJ>\n')
        for n in range(count):
            subject = Subject(10_000 + n, "京ICP备2027%06d号" % n, "大文件测试公司%d" % n, sites=[
                Site(50_000 + n, "京ICP备2027%06d号-1" % n, "站点%d" % n, ["bulk-%d.example-xml.cn" % n],
                     [(90_000 + n, 10001, [OUR_RANGE])])])  # fmt: skip
            out.write(baxx(subject).encode("gbk"))
        out.write(b"</BASJ>\n</ICP>\n</DownloadData>\n")
    return path


def peak_rss(path: Path) -> tuple[int, int]:
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
    count, peak = result.stdout.split()
    return int(count), int(peak)


def test_a_large_download_streams_in_bounded_memory(config_path: Path, tmp_path: Path) -> None:
    """30,000 filings (~28 MB of GBK XML) take no more memory to read than 2,000 (~2 MB): the reader's
    peak resident set does not grow with the file. The whole large file imports through the CLI."""
    small, large = write_download(tmp_path / "small.xml", 2_000), write_download(tmp_path / "large.xml", 30_000)
    assert large.stat().st_size > 25_000_000
    (small_count, small_peak), (large_count, large_peak) = peak_rss(small), peak_rss(large)
    assert (small_count, large_count) == (2_000, 30_000)
    assert large_peak - small_peak < 5_000_000, (small_peak, large_peak)  # measured: the same within 1 MB
    code, report = import_json(config_path, large)
    assert code == 0 and report["inserted"] == 30_000


def test_a_spool_folder_is_taken_in_order_and_stops_at_a_refused_file(config_path: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    write_gbk(spool / "download-1.xml", document(baxx(subject_one())))
    write_gbk(spool / "download-2.xml", document(zxsj=zxxx(1, 2001)))  # needs download-1 first
    write_gbk(spool / "download-10.xml", document(baxx(subject_two())).replace("<Dwmc>张示例</Dwmc>", ""))
    write_gbk(spool / "download-11.xml", document(zxsj=zxxx(0, 1002)))
    for path in spool.iterdir():
        os.utime(path, (time.time() - 60, time.time() - 60))  # written a while ago: settled
    result = run_icpgate("import", str(spool), "-c", str(config_path), *ISP_MAP)
    assert result.returncode == 4, result.stderr
    assert result.stdout.index("download-1.xml") < result.stdout.index("download-2.xml")
    assert "refused %s" % (spool / "download-10.xml") in result.stderr and "download-11" not in result.stdout
    assert sorted(p.name for p in (spool / "imported").iterdir()) == ["download-1.xml", "download-2.xml"]
    assert stored(config_path)["京ICP备20269001号-1"]["status"] == "deregistered"
    write_gbk(spool / "download-10.xml", document(baxx(subject_two())))  # fixed by hand
    os.utime(spool / "download-10.xml", (time.time() - 60, time.time() - 60))
    code, reports = import_json(config_path, spool)
    assert code == 0 and [r["source"].rsplit("/", 1)[1] for r in reports] == ["download-10.xml", "download-11.xml"]
    assert stored(config_path)["沪ICP备20269002号-1"]["status"] == "deregistered"
    assert not list(spool.glob("*.xml"))
