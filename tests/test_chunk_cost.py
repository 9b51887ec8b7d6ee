"""The gate's CPU for a chunked body grows with its bytes, not with how many chunks they are cut in.

Stepping through a chunked body chunk by chunk in Python costs about a microsecond a chunk: a body
of 1-byte chunks (`1\\r\\na\\r\\n`, six bytes each) cost the gate about 0.7 s of CPU per MB, and the
other clients of that worker waited seconds meanwhile. Requests and responses are framed alike
(gate/http/framing.py), so both are measured here: through the gate in front of real nginx for
uploads, and in front of a hostile upstream (a socket server of the test) that answers with 1-byte
chunks. Each compares, in one run, the gate's own CPU time (utime + stime from /proc) for a body
of 1-byte chunks against a body of the same size in 16 KiB chunks, and checks that a filed request
on another connection of the same worker is answered promptly while such bodies are read.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trustme
from backends import start_nginx
from gatekit import Gate, free_port, gate_config, listener, start_gate
from test_inspection_cost import cpu_seconds, process_tree

WIRE_SIZE = 4 << 20  # bytes of chunked body on the wire, whatever the chunk size
TINY = b"1\r\na\r\n"
# The 1-byte-chunk body may cost at most this many times the ordinary one, plus a constant for
# what the gate does meanwhile (registry reload checks, logging) and for measuring noise.
RATIO = 3.0
SLACK = 0.25  # seconds of CPU; before the fix the tiny chunks alone cost several times this
ATTACKERS = 3  # connections sending (or fetching) chunked bodies at once, each up to ROUNDS times
ROUNDS = 3
PROBES = 5  # filed requests on another connection while they run, one after the other
# Their slowest answer during 1-byte chunks may take this many times the slowest during 16 KiB
# chunks, plus a constant (before the fix: seconds, against a tenth of a second).
LATENCY_RATIO = 4.0
LATENCY_SLACK = 0.75
HEAD = b"POST /upload HTTP/1.1\r\nHost: example-filed.cn\r\nTransfer-Encoding: chunked\r\n\r\n"
# After the body: a request that is only answered once the gate has read through the body.
AFTER = b"GET /after HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n"
PROBE = b"GET /probe HTTP/1.1\r\nHost: example-shop.cn\r\nConnection: close\r\n\r\n"


def chunked_body(chunk: int, wire_size: int = WIRE_SIZE) -> bytes:
    """About `wire_size` bytes of chunks of `chunk` bytes each, then the last chunk."""
    one = b"%x\r\n" % chunk + b"a" * chunk + b"\r\n"
    return one * (wire_size // len(one)) + b"0\r\n\r\n"


BODIES = {"tiny": chunked_body(1), "ordinary": chunked_body(16384)}


def serve_chunked(listening: socket.socket) -> None:
    """The hostile upstream: every request (`GET /tiny` or `GET /ordinary`) is answered with that
    body, chunked, and the connection closed."""
    while True:
        try:
            connection, _ = listening.accept()
        except OSError:
            return  # closed at the end of the module
        threading.Thread(target=_answer, args=(connection,), daemon=True).start()


def _answer(connection: socket.socket) -> None:
    with connection:
        head = b""
        while b"\r\n\r\n" not in head and (data := connection.recv(65536)):
            head += data
        path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
        body = BODIES["tiny" if path == b"/tiny" else "ordinary"]
        with contextlib.suppress(OSError):
            connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)


@dataclass
class Stack:
    gate: Gate

    def port(self, name: str) -> int:
        return self.gate.ports[name]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("chunks")
    with contextlib.ExitStack() as cleanup:
        ca = trustme.CA()
        nginx = start_nginx(tmp / "uploads", ["example-filed.cn"], ca)
        cleanup.callback(nginx.stop)
        # The probes' own backend: their latency is the gate's, not that of an nginx busy with uploads.
        quiet = start_nginx(tmp / "probes", ["example-shop.cn"], ca)
        cleanup.callback(quiet.stop)
        upstream = socket.create_server(("127.0.0.1", 0))
        cleanup.callback(upstream.close)
        threading.Thread(target=serve_chunked, args=(upstream,), daemon=True).start()
        ports = {"http": free_port(), "probes": free_port(), "hostile": free_port()}
        listeners = {
            "http": listener(ports["http"], "http", nginx.http),
            "probes": listener(ports["probes"], "http", quiet.http),
            "hostile": listener(ports["hostile"], "http", upstream.getsockname()[1]),
        }
        gate = start_gate(gate_config(tmp, listeners, gate={"workers": 1}), ports)
        cleanup.callback(gate.stop)
        yield Stack(gate)
    assert "Traceback" not in gate.log(), gate.log()[-5000:]


def exchange(port: int, wire: bytes) -> bytes:
    """Send `wire`, read until the gate closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(wire)
        answer = bytearray()
        while chunk := sock.recv(1 << 20):
            answer += chunk
    return bytes(answer)


def upload(stack: Stack, kind: str) -> bytes:
    return exchange(stack.port("http"), HEAD + BODIES[kind] + AFTER)


def download(stack: Stack, kind: str) -> bytes:
    return exchange(stack.port("hostile"), b"GET /%s HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n" % kind.encode())


def uploaded(answer: bytes) -> bool:
    """nginx answered the upload and the request behind it: the gate read through the whole body."""
    return re.findall(rb"server=([a-z0-9.-]+)", answer) == [b"example-filed.cn", b"example-filed.cn"]


def downloaded(answer: bytes, kind: str) -> bool:
    return answer.endswith(BODIES[kind]) and b"x-icp-gate" not in answer.lower()


def gate_cpu(stack: Stack, action: Callable[[], bytes]) -> tuple[float, bytes]:
    pids = process_tree(stack.gate.process.pid)
    before = cpu_seconds(pids)
    answer = action()
    return cpu_seconds(pids) - before, answer


def probe_latency(port: int) -> float:
    started = time.monotonic()
    answer = exchange(port, PROBE)
    assert b"server=example-shop.cn" in answer, answer
    return time.monotonic() - started


def latencies_while(stack: Stack, attack: Callable[[], bool]) -> tuple[list[float], list[bool]]:
    """Probe latencies (another listener of the same worker) while ATTACKERS connections run `attack` at once
    (again, up to ROUNDS times, until the probes are done)."""
    results: list[bool] = []
    stop = threading.Event()

    def attacker() -> None:
        for _ in range(ROUNDS):
            results.append(attack())
            if stop.is_set():
                return

    attackers = [threading.Thread(target=attacker) for _ in range(ATTACKERS)]
    for thread in attackers:
        thread.start()
    latencies: list[float] = []
    while len(latencies) < PROBES and any(thread.is_alive() for thread in attackers):
        latencies.append(probe_latency(stack.port("probes")))
        time.sleep(0.02)
    stop.set()
    for thread in attackers:
        thread.join(120)
    return latencies, results


def compare_latencies(stack: Stack, attack: Callable[[str], bool]) -> None:
    """The slowest probe answer during 1-byte chunks against the slowest during 16 KiB chunks."""
    slowest = {}
    for kind in ("ordinary", "tiny"):
        latencies, results = latencies_while(stack, lambda kind=kind: attack(kind))
        assert latencies and results and all(results), (kind, results)
        slowest[kind] = max(latencies)
    assert slowest["tiny"] <= LATENCY_RATIO * slowest["ordinary"] + LATENCY_SLACK, (
        "slowest answer to another client: %.3fs during 1-byte chunks, %.3fs during 16 KiB chunks"
        % (slowest["tiny"], slowest["ordinary"])
    )


def test_one_byte_request_chunks_cost_about_what_their_bytes_cost(stack: Stack) -> None:
    upload(stack, "ordinary")  # warm-up: imports, first connections
    ordinary, ordinary_answer = gate_cpu(stack, lambda: upload(stack, "ordinary"))
    tiny, tiny_answer = gate_cpu(stack, lambda: upload(stack, "tiny"))
    assert uploaded(ordinary_answer) and uploaded(tiny_answer), (ordinary_answer[-300:], tiny_answer[-300:])
    assert tiny <= RATIO * ordinary + SLACK, (
        "gate CPU for %d bytes of chunked body: %.3fs in 1-byte chunks, %.3fs in 16 KiB chunks"
        % (WIRE_SIZE, tiny, ordinary)
    )


def test_one_byte_response_chunks_cost_about_what_their_bytes_cost(stack: Stack) -> None:
    download(stack, "ordinary")
    ordinary, ordinary_answer = gate_cpu(stack, lambda: download(stack, "ordinary"))
    tiny, tiny_answer = gate_cpu(stack, lambda: download(stack, "tiny"))
    assert downloaded(ordinary_answer, "ordinary") and downloaded(tiny_answer, "tiny"), tiny_answer[:300]
    assert tiny <= RATIO * ordinary + SLACK, (
        "gate CPU for a %d-byte chunked response: %.3fs in 1-byte chunks, %.3fs in 16 KiB chunks"
        % (WIRE_SIZE, tiny, ordinary)
    )


def test_other_clients_are_answered_while_one_byte_chunks_are_uploaded(stack: Stack) -> None:
    compare_latencies(stack, lambda kind: uploaded(upload(stack, kind)))


def test_other_clients_are_answered_while_a_hostile_upstream_sends_one_byte_chunks(stack: Stack) -> None:
    compare_latencies(stack, lambda kind: downloaded(download(stack, kind), kind))
