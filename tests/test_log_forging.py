"""Client-supplied names cannot forge a line or a field on any surface that writes them.

A real gate gets real ClientHellos whose server name carries CR, LF, a space-separated fake field,
a terminal escape and DEL, and HTTP requests whose Host carries control bytes. Then every surface
is read as an operator or a parser would: the text and JSON logs, `icpgate violations` as a table,
JSON, CSV and ISMS report, and the status page. A violation log written by an older version, with
such a name stored raw, must come out of the same surfaces escaped.
"""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from adminkit import TOKEN, admin_request, start_observed_gate
from gatekit import build_hello, closed_by_peer, send_in_pieces, server_name_extension

from conftest import run_icpgate
from icpgate.config.settings import load_config
from icpgate.reports.export import CSV_COLUMNS, ISMS_COLUMNS

# No colon: the ClientHello parser refuses a server name with one before it is decided on.
FORGED_LINE = "2026-01-01 00.00.00,000 INFO icpgate.blocks blocked tls request_id=forged host=example-filed.cn"
# The server names a client sends: a whole forged log line, a forged field, and other controls.
NAMES = [
    "evil.example\r\n" + FORGED_LINE,
    "evil.example reason=filed rule=forged",
    "evil\x1b[2J\x1b[31m.example\x7f\x00\x0b\x0c",
]
# Host headers with control bytes (the parser refuses CR and LF themselves earlier).
HOSTS = [b"evil\x1b[2J.example", b"evil\x7f.example", b"evil\x0bexample"]
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")  # \x0a: a line break inside a value


def send_hello(port: int, name: str) -> str:
    return closed_by_peer(send_in_pieces(port, build_hello([server_name_extension(name)]), []))


def send_host(port: int, host: bytes) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    answer = sock.recv(65536)
    sock.close()
    return answer


def no_control(text: str, where: str) -> None:
    for number, line in enumerate(text.split("\n"), 1):
        found = CONTROL.search(line)
        assert found is None, "%s line %d: %r" % (where, number, line)


def admin_get(admin: int, path: str) -> str:
    status, _, body = admin_request(admin, path, {"Authorization": "Bearer " + TOKEN})
    assert status == 200, (path, status, body)
    return body.decode()


def check_reports(config: Path, admin: int) -> None:
    """`icpgate violations` in every format, and the status page: no control character, one row per record."""
    records = json.loads(run_icpgate("violations", "-c", str(config), "--json", check=True).stdout)
    no_control(json.dumps(records, ensure_ascii=False), "--json")
    for record in records["items"]:
        no_control(record["host"] + (record["domain"] or "") + (record["handling"]["note"] or ""), "--json fields")
    table = run_icpgate("violations", "-c", str(config), check=True).stdout
    no_control(table, "table")
    assert len(table.splitlines()) == 1 + len(records["items"]), table
    exported = run_icpgate("violations", "-c", str(config), "--csv", check=True).stdout
    no_control(exported, "--csv")
    rows = list(csv.reader(io.StringIO(exported)))
    assert len(rows) == 1 + len(records["items"]) and {len(row) for row in rows} == {len(CSV_COLUMNS)}, rows
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row), rows
    isms = run_icpgate("violations", "-c", str(config), "--isms", "--include-unconfirmed", check=True).stdout
    no_control(isms.replace("\r\n", "\n"), "--isms")
    assert {len(row) for row in csv.reader(io.StringIO(isms.lstrip("\ufeff")))} == {len(ISMS_COLUMNS) + 1}
    no_control(admin_get(admin, "/"), "status page")
    no_control(json.dumps(json.loads(admin_get(admin, "/api/v1/violations")), ensure_ascii=False), "admin API")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_names_with_control_characters_forge_no_line_or_field(tmp_path: Path, origin, log_format: str) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, tables={"log": {"format": log_format}})
    try:
        for name in NAMES:
            assert send_hello(observed.tls, name) in ("reset", "closed")
        for host in HOSTS:
            assert send_host(observed.http, host).startswith(b"HTTP/1.1 400")
        time.sleep(1.0)  # the violation table is flushed every 0.2 s
        check_reports(observed.config, observed.admin)
    finally:
        assert observed.gate.stop() == 0
    log = observed.gate.log()
    no_control(log, "gate log")
    blocks = [line for line in log.splitlines() if "icpgate.blocks" in line]
    assert len(blocks) == len(NAMES) + len(HOSTS), "\n".join(blocks)
    assert not any(line.startswith(FORGED_LINE[:23]) for line in log.splitlines())
    if log_format == "text":
        for line in blocks:  # each field once: a name's space cannot start a field of its own
            assert [line.count(" %s=" % key) for key in ("host", "reason", "rule", "client")] == [1] * 4, line
        assert "host=evil.example\\x0d\\x0a2026-01-01\\x2000.00.00,000\\x20INFO" in log
    else:
        entries = [json.loads(line) for line in blocks]
        hosts = sorted(entry["host"] for entry in entries if entry["proto"] == "tls")
        assert hosts == sorted(
            ["evil.example\\x0d\\x0a" + FORGED_LINE.replace(" ", "\\x20"),
             "evil.example\\x20reason=filed\\x20rule=forged", "evil\\x1b[2J\\x1b[31m.example\\x7f\\x00\\x0b\\x0c"]
        )  # fmt: skip
        assert all(entry["reason"] == "invalid" for entry in entries)


def test_a_log_an_older_version_wrote_raw_is_shown_escaped(tmp_path: Path, origin) -> None:
    """Hosts and notes stored with control characters (as before names were escaped on the way
    in) come out of every report escaped, one row per record."""
    observed = start_observed_gate(tmp_path, origin.http, origin.tls)
    try:
        with sqlite3.connect(load_config(observed.config).violations.path) as db:
            for number, name in enumerate(NAMES):
                db.execute(
                    "INSERT INTO violations (domain, host, ip, port, proto, reason, first_seen, last_seen, count,"
                    " dns_state, dns_addresses) VALUES (?, ?, '127.0.0.1', 443, 'tls', 'unfiled', ?, ?, 1,"
                    " 'confirmed', '[\"127.0.0.1\"]')",
                    ("=cmd|' /C calc'!A0\n" + name, "-" + name, time.time() - 60 - number, time.time() - number),
                )
            db.execute(
                "INSERT INTO handling (violation_id, state, note, at) VALUES (1, 'acknowledged', ?, ?)",
                ("called\r\n" + FORGED_LINE, time.time()),
            )
        check_reports(observed.config, observed.admin)
    finally:
        assert observed.gate.stop() == 0
