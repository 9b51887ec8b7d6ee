"""The QUIC gate on UDP: a real `icpgate run` with a `quic` listener in front of h3kit's aioquic
HTTP/3 origin, aioquic's client through it, and hand-built Initials (protected with aioquic's own
`CryptoPair`, see test_quic_initial) for the shapes no honest client sends on demand.

Every test reads what the origin received: a datagram the gate should drop must never reach it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from gatekit import Gate, gate_config, listener, start_gate
from h3kit import H3Origin, fetch, free_udp_port, h3_get, h3_origin
from test_quic_initial import crypto_frame, handshake_message, protect

from icpgate.gate.quic_initial import VERSION_1, VERSION_2

FILED = "www.example-filed.cn"
UNFILED = "www.example-unfiled.cn"
VERSIONS = [pytest.param(VERSION_1, id="v1"), pytest.param(VERSION_2, id="v2")]


def wait_listening(gate: Gate, timeout: float = 20.0) -> None:
    """Until the gate's log says its quic listener serves (a UDP port cannot be probed by connecting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "/quic" in gate.log() and "listening on" in gate.log():
            return
        if gate.process.poll() is not None:
            break
        time.sleep(0.05)
    gate.stop()
    raise RuntimeError("gate did not start:\n" + gate.log())


def start_quic_gate(tmp: Path, backend: int, *, quic: dict | None = None, gate: dict | None = None,
                    pack: Path | None = None, violations: bool = False) -> Gate:  # fmt: skip
    port = free_udp_port()
    tables: dict[str, dict] = {"quic": quic or {}}
    if violations:
        tables["violations"] = {"path": str(tmp / "violations.db"), "flush_interval": 0.2}
    config = gate_config(tmp, {"quic": listener(port, "quic", backend)}, gate=gate, pack=pack, tables=tables)
    running = start_gate(config, {})
    running.ports["quic"] = port
    wait_listening(running)
    return running


def stop(gate: Gate) -> str:
    assert gate.stop() == 0
    log = gate.log()
    assert "Traceback" not in log, log
    return log


@pytest.fixture
def origin(certs: dict[str, Path]):
    with h3_origin(certs["server"], certs["key"]) as running:
        yield running


@pytest.fixture
def quic_gate(tmp_path: Path, origin: H3Origin):
    running = start_quic_gate(tmp_path, origin.port, violations=True)
    yield running
    stop(running)


def test_filed_passes_unfiled_gets_nothing(quic_gate: Gate, origin: H3Origin, certs: dict[str, Path],
                                           tmp_path: Path) -> None:  # fmt: skip
    port = quic_gate.ports["quic"]
    answer = h3_get(FILED, port, certs["ca"])
    assert answer is not None and answer.status == 200
    assert b">%s:%d<" % (FILED.encode(), port) in answer.body  # the origin served the name the gate decided
    seen = origin.datagrams
    assert seen > 0
    assert h3_get(UNFILED, port, certs["ca"], timeout=2.0) is None
    assert origin.datagrams == seen  # not one datagram of the unfiled flow reached the origin
    assert origin.authorities() == ["%s:%d" % (FILED, port)]
    time.sleep(0.5)  # the violation table is written every 0.2 s
    with sqlite3.connect(tmp_path / "violations.db") as db:
        rows = db.execute("SELECT host, proto, reason, count FROM violations").fetchall()
    assert rows == [(UNFILED, "quic", "unfiled", 1)]
    assert "blocked quic" in quic_gate.log() and "host=%s" % UNFILED in quic_gate.log()
