"""The gate's CPU cost for a request body grows with its bytes, not with how many line feeds it has.

A chunked body is framed by its chunk sizes; an inspector that parses it line by line pays once
per line feed, so 1 MiB of `\\n` inside one chunk was about a million parse steps (a 4 MB upload
took 10 s of CPU and stalled every other connection of that worker). This compares, in one run,
the gate's own CPU time (utime + stime from /proc) for a chunk of line feeds against a chunk of
ordinary bytes of the same size, through the gate in front of real nginx, and checks that a
filed request on another connection is answered promptly while the upload is inspected.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from backends import Backend, start_nginx
from gatekit import Gate, free_port, gate_config, listener, start_gate

BODY_SIZE = 2 << 20
# The newline body may cost at most this many times the ordinary one, plus a constant for what
# the gate does meanwhile (registry reload checks, logging) and for measuring noise.
RATIO = 3.0
SLACK = 0.3  # seconds of CPU
PROMPT = 0.5  # seconds for a filed request on another connection
HEAD = b"POST /upload HTTP/1.1\r\nHost: example-filed.cn\r\nTransfer-Encoding: chunked\r\n\r\n"
# After the body: a request that is only answered once the gate has read through the body.
AFTER = b"GET /after HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n"
PROBE = b"GET /probe HTTP/1.1\r\nHost: example-shop.cn\r\nConnection: close\r\n\r\n"


@dataclass
class Stack:
    gate: Gate
    nginx: Backend

    @property
    def port(self) -> int:
        return self.gate.ports["http"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("cost")
    with contextlib.ExitStack() as cleanup:
        nginx = start_nginx(tmp, ["example-filed.cn", "example-shop.cn"], trustme.CA())
        cleanup.callback(nginx.stop)
        port = free_port()
        config = gate_config(tmp, {"http": listener(port, "http", nginx.http)}, gate={"workers": 1})
        gate = start_gate(config, {"http": port})
        cleanup.callback(gate.stop)
        yield Stack(gate, nginx)
    assert "Traceback" not in gate.log(), gate.log()[-5000:]


def process_tree(root: int) -> list[int]:
    """The gate and its worker processes."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def upload(port: int, content: bytes) -> bytes:
    """One chunk of `content`, then a request behind it; returns both answers."""
    wire = HEAD + b"%x\r\n" % len(content) + content + b"\r\n0\r\n\r\n" + AFTER
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(wire)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def served(answer: bytes) -> list[str]:
    return [m.decode() for m in re.findall(rb"server=([a-z0-9.-]+)", answer)]


def measured_upload(stack: Stack, content: bytes) -> tuple[float, bytes]:
    pids = process_tree(stack.gate.process.pid)
    before = cpu_seconds(pids)
    answer = upload(stack.port, content)
    return cpu_seconds(pids) - before, answer


def probe_latency(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(PROBE)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert served(answer) == ["example-shop.cn"], answer
    return time.monotonic() - started


def test_newlines_in_a_chunk_cost_no_more_than_other_bytes(stack: Stack) -> None:
    upload(stack.port, b"warm" * 1024)  # imports, first connection
    ordinary, ordinary_answer = measured_upload(stack, b"x" * BODY_SIZE)
    newlines, newline_answer = measured_upload(stack, b"\n" * BODY_SIZE)
    for answer in (ordinary_answer, newline_answer):
        assert served(answer) == ["example-filed.cn", "example-filed.cn"], answer[-500:]
    assert newlines <= RATIO * ordinary + SLACK, (
        "gate CPU for %d bytes in one chunk: %.3fs of line feeds vs %.3fs of ordinary bytes"
        % (BODY_SIZE, newlines, ordinary)
    )


def test_other_connections_are_answered_while_a_newline_upload_is_inspected(stack: Stack) -> None:
    result: dict[str, bytes] = {}
    uploader = threading.Thread(target=lambda: result.update(answer=upload(stack.port, b"\n" * BODY_SIZE)))
    uploader.start()
    latencies = [probe_latency(stack.port)]
    while uploader.is_alive():
        latencies.append(probe_latency(stack.port))
        time.sleep(0.02)
    uploader.join()
    assert served(result["answer"]) == ["example-filed.cn", "example-filed.cn"], result["answer"][-500:]
    assert max(latencies) < PROMPT, "probe latencies during the upload: %s" % ["%.3f" % x for x in latencies]
