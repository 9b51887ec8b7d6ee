"""The gate reads the backend's responses: which answer belongs to which request.

A scripted backend (a real TCP server in this process) sends exactly the bytes a test needs: an
earlier response whose body looks like a `101`, a refused upgrade, an unframable answer.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from gatekit import closed_by_peer, free_port, gate_config, listener, start_gate

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
UNFILED = b"GET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n"


class ScriptedBackend:
    """Accepts connections and plays `script` on each: an int waits until that many request heads
    have arrived in all, bytes are sent. What each connection sent is kept in `received`."""

    def __init__(self, script: list[int | bytes]) -> None:
        self.script = script
        self.received: list[bytes] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.server.settimeout(30)
        try:
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._talk, args=(conn,), daemon=True).start()
        except OSError:
            return

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        data = b""
        with conn:
            try:
                for step in self.script:
                    if isinstance(step, bytes):
                        conn.sendall(step)
                        continue
                    while data.count(b"\r\n\r\n") < step:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                while chunk := conn.recv(65536):
                    data += chunk
            except OSError:
                pass
            finally:
                self.received.append(data)

    def close(self) -> None:
        self.server.close()


def gate_for(tmp_path: Path, backend_port: int, inspect_timeout: float = 2.0):
    port = free_port()
    config = gate_config(
        tmp_path, {"http": listener(port, "http", backend_port)}, gate={"inspect_timeout": inspect_timeout}
    )
    return start_gate(config, {"http": port})


@pytest.fixture
def scripted(tmp_path: Path):
    started = []

    def start(script: list[int | bytes], inspect_timeout: float = 2.0):
        backend = ScriptedBackend(script)
        gate = gate_for(tmp_path, backend.port, inspect_timeout)
        started.append((backend, gate))
        return backend, gate

    yield start
    for backend, gate in started:
        backend.close()
        assert gate.stop() == 0
        assert "Traceback" not in gate.log(), gate.log()


def test_a_101_inside_an_earlier_response_does_not_open_a_tunnel(scripted) -> None:
    # The backend's answer to /a arrives in two reads; the second starts with what looks like a
    # 101 and arrives while the upgrade request is waiting for its answer.
    fake = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    script = [
        1,
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(fake),
        2,
        fake,
        b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n",
    ]
    backend, gate = scripted(script)
    sock = socket.create_connection(("127.0.0.1", gate.ports["http"]), timeout=10)
    sock.sendall(b"GET /a HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")
    time.sleep(0.3)
    sock.sendall(UPGRADE)
    time.sleep(0.3)
    sock.sendall(UNFILED)  # held while the upgrade is unanswered, then read as HTTP once it is refused
    answer = closed_by_peer(sock)
    assert "426 Upgrade Required" in answer and "reason=unfiled" in answer, answer
    time.sleep(0.2)
    assert backend.received and all(b"example-unfiled.cn" not in received for received in backend.received)


def test_a_blocked_pipelined_request_is_answered_once_earlier_answers_are_complete(scripted) -> None:
    _, gate = scripted([1, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"], inspect_timeout=8.0)
    sock = socket.create_connection(("127.0.0.1", gate.ports["http"]), timeout=10)
    started = time.monotonic()
    sock.sendall(b"GET /a HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n" + UNFILED)
    answer = closed_by_peer(sock)
    elapsed = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 200 OK") and "first" in answer and "reason=unfiled" in answer
    assert answer.index("first") < answer.index("reason=unfiled")
    assert elapsed < 4, "the block waited for the inspection timeout (%.1fs)" % elapsed


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nhi",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",  # a switch nobody asked for
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
def test_an_unframable_response_closes_the_connection(scripted, answer: bytes) -> None:
    _, gate = scripted([1, answer])
    sock = socket.create_connection(("127.0.0.1", gate.ports["http"]), timeout=10)
    sock.sendall(b"GET /a HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")
    assert closed_by_peer(sock) in ("reset", "closed") or "X-ICP-Gate" not in closed_by_peer(sock)
    deadline = time.monotonic() + 5
    while "unreadable response from the backend" not in gate.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "unreadable response from the backend" in gate.log()


def test_a_half_close_behind_a_refused_upgrade_still_delivers_the_held_request(scripted) -> None:
    script = [
        1,
        b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n",
        2,
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext",
    ]
    _, gate = scripted(script)
    sock = socket.create_connection(("127.0.0.1", gate.ports["http"]), timeout=10)
    sock.sendall(UPGRADE + b"GET /next HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")
    sock.shutdown(socket.SHUT_WR)
    answer = closed_by_peer(sock)
    assert "426 Upgrade Required" in answer and answer.endswith("next"), answer
    assert "Traceback" not in gate.log()
