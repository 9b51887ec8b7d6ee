"""Logs under systemd: when stderr is the journal's stream (JOURNAL_STREAM names it), every line
starts with its syslog priority and text lines carry no time of their own (the journal stamps each
entry); anywhere else the lines are as before. docs/logs.md."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

from gatekit import free_port, gate_config, listener, start_gate
from test_gate_process import http_get, status_of, wait_until
from test_gate_workers import alive, started

from icpgate.telemetry.logs import JournalFormatter, TextFormatter

PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def run_gate(tmp: Path, origin, *, fmt: str, journal: str | None) -> tuple[str, int]:
    """A gate whose stderr is a file, with JOURNAL_STREAM naming that file ("this"), another file
    ("other": a child whose stderr was redirected inherits the variable), or unset. It relays one
    request, blocks one, and loses a worker (the supervisor's warning); returns its log and its
    first worker's pid."""
    port = free_port()
    config = gate_config(tmp, {"http": listener(port, "http", origin.http)}, gate={"workers": 2},
                         tables={"log": {"format": fmt}})  # fmt: skip
    log_path = config.with_suffix(".log")
    log_path.touch()  # start_gate opens it with "w": the same inode, which JOURNAL_STREAM names
    other = tmp / "elsewhere.log"
    other.touch()
    named = {"this": log_path, "other": other}.get(journal or "")
    env = {"JOURNAL_STREAM": "%d:%d" % (os.stat(named).st_dev, os.stat(named).st_ino)} if named else {}
    gate = start_gate(config, {"http": port}, env=env)
    try:
        assert status_of(http_get(port, "www.example-filed.cn")) == 200
        assert status_of(http_get(port, "example-unfiled.cn")) == 403
        victim = started(gate.log())["worker 0"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: started(gate.log())["worker 0"] != victim and not alive(victim), timeout=20)
    finally:
        assert gate.stop() == 0
    return gate.log(), victim


def test_under_the_journal_text_lines_carry_their_priority_and_no_time(tmp_path: Path, origin) -> None:
    log, victim = run_gate(tmp_path, origin, fmt="text", journal="this")
    lines = log.splitlines()
    assert lines, log
    levels = set()
    for line in lines:
        match = re.match(r"<(\d)>(DEBUG|INFO|WARNING|ERROR|CRITICAL) \[worker=", line)
        assert match, line  # a priority, then the level: no time of its own
        assert int(match[1]) == PRIORITY[match[2]], line
        assert not TIME.search(line), line
        levels.add(match[2])
    assert {"INFO", "WARNING"} <= levels or {"INFO", "ERROR"} <= levels, levels  # the lost worker is not info
    assert any("blocked" in line and "example-unfiled.cn" in line for line in lines), log
    assert any(str(victim) in line and not line.startswith("<6>") for line in lines), log


def test_under_the_journal_json_lines_are_prefixed_and_keep_their_fields(tmp_path: Path, origin) -> None:
    log, _ = run_gate(tmp_path, origin, fmt="json", journal="this")
    for line in log.splitlines():
        match = re.match(r"<(\d)>(\{.*\})$", line)
        assert match, line
        entry = json.loads(match[2])
        assert int(match[1]) == PRIORITY[entry["level"].upper()], line
        assert {"time", "level", "logger", "message", "worker", "pid"} <= set(entry), entry
    blocks = [json.loads(line[3:]) for line in log.splitlines() if '"event": "blocked"' in line]
    assert blocks and blocks[0]["host"] == "example-unfiled.cn" and blocks[0]["reason"] == "unfiled", log


def test_stderr_elsewhere_keeps_times_and_no_prefix(tmp_path: Path, origin) -> None:
    """JOURNAL_STREAM names another file: stderr was redirected (a pipe, a file), not the journal."""
    log, _ = run_gate(tmp_path, origin, fmt="text", journal="other")
    for line in log.splitlines():
        assert TIME.match(line) and not line.startswith("<"), line


def test_a_traceback_keeps_the_priority_on_every_line() -> None:
    """journald makes one entry per line: each of a traceback's lines carries the record's priority."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("icpgate.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = JournalFormatter(TextFormatter(timestamps=False)).format(record).split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert lines[0] == "<3>ERROR icpgate.test: failed" and lines[-1] == "<3>ValueError: boom"
