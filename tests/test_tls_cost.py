"""What a ClientHello cut into tiny TLS records costs the gate: linear, capped, and nobody waits.

The gate's CPU time is read from /proc/<pid>/stat (utime + stime) around each batch, so the
comparison is within one run on one machine: a 16 KB hello in 1-byte records against the same
hello in one record.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from gatekit import build_hello, closed_by_peer, free_port, gate_config, listener, server_name_extension, start_gate

WHOLE = 200  # hellos in one piece: enough for the 10 ms CPU ticks to count them
SPLIT = 20  # hellos in 1-byte records, one record per send
PER_READ_ALLOWANCE = 0.005  # CPU seconds a split connection may cost beyond 3x a whole one: its reads
TICK = 1 / os.sysconf("SC_CLK_TCK")  # the resolution of utime and stime


def cpu_seconds(pid: int) -> float:
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK  # utime, stime


def refused(port: int, data: bytes, piece: int = 0) -> str:
    """Send `data` (in sends of `piece` bytes, Nagle off, paced so that the gate reads them one by
    one, when given) and say how the gate ended the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for offset in range(0, len(data), piece or len(data)):
            sock.sendall(data[offset : offset + (piece or len(data))])
            if piece:
                time.sleep(0.0002)
    except (ConnectionResetError, BrokenPipeError):
        sock.close()
        return "reset"
    return closed_by_peer(sock)


def hello_16k(records: list[int] | None = None) -> bytes:
    """A ~16 KB hello (unfiled: blocked once read), in one record or the given record sizes."""
    extensions = [server_name_extension("example-unfiled.cn"), (0x0015, b"\x00" * 14900)]
    return build_hello(extensions, key_share_size=1216, record_sizes=records)


def one_byte_records() -> bytes:
    return hello_16k([1] * (len(hello_16k()) - 5))


@pytest.fixture
def own_gate(tmp_path: Path, origin):
    """A gate of its own, default hello cap (16 KiB), so its CPU time is this test's alone."""
    ports = {"tls": free_port()}
    running = start_gate(gate_config(tmp_path, {"tls": listener(ports["tls"], "tls", origin.tls)}), ports)
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log()


def test_one_byte_records_are_refused_at_the_cap_and_cost_no_more_than_whole_hellos(own_gate) -> None:
    port = own_gate.ports["tls"]
    pid = own_gate.process.pid
    whole, split = hello_16k(), one_byte_records()
    assert 16000 < len(whole) < 16384 and len(split) > 90000

    started = cpu_seconds(pid)
    for _ in range(WHOLE):
        assert refused(port, whole) == "reset"  # unfiled
    per_whole = (cpu_seconds(pid) - started) / WHOLE
    # Before the reassembler every read re-parsed every record so far: about 2 s of CPU for one of
    # these. Checked after each connection, so that a regression fails at the first one.
    started = cpu_seconds(pid)
    for count in range(1, SPLIT + 1):
        assert refused(port, split, piece=6) == "reset"  # at client_hello.MAX_HELLO_RECORDS records
        split_cpu = cpu_seconds(pid) - started
        assert split_cpu <= count * (3 * per_whole + PER_READ_ALLOWANCE) + TICK, (count, split_cpu, per_whole)


def test_a_filed_client_is_served_while_split_hellos_pour_in(own_gate, certs) -> None:
    port = own_gate.ports["tls"]
    split = one_byte_records()
    done = threading.Event()
    outcomes: list[str] = []

    def attack() -> None:
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            outcomes.append(refused(port, split, piece=6))

    attackers = [threading.Thread(target=attack) for _ in range(4)]
    for attacker in attackers:
        attacker.start()
    try:
        time.sleep(0.3)
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        began = time.monotonic()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="example-filed.cn") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\nConnection: close\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 200")
        served_in = time.monotonic() - began
    finally:
        done.set()
        for attacker in attackers:
            attacker.join(60)
    assert outcomes and set(outcomes) == {"reset"}, outcomes
    assert served_in < 1.0, served_in
