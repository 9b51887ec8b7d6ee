"""The QUIC gate on UDP: a real `icpgate run` with a `quic` listener in front of h3kit's aioquic
HTTP/3 origin, aioquic's client through it, and hand-built Initials (protected with aioquic's own
`CryptoPair`, see test_quic_initial) for the shapes no honest client sends on demand.

Every test reads what the origin received: a datagram the gate should drop must never reach it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

import netnskit
import pytest
from adminkit import admin_request, metric, parse_metrics
from aioquic.asyncio import connect, serve
from aioquic.quic.configuration import QuicConfiguration
from gatekit import (
    Gate,
    build_hello,
    free_port,
    gate_config,
    listener,
    server_name_extension,
    start_gate,
    wait_for_port,
)
from h3kit import H3Origin, free_udp_port, h3_get, h3_origin
from netnskit import CLIENT4, CLIENT6, SERVER4, SERVER6
from test_quic_initial import DCID, crypto_frame, protect

from conftest import REPO, SAMPLES, check_json, copy_policies, run_icpgate
from icpgate.gate.quic import sockets as quic_socket
from icpgate.gate.quic.initial import VERSION_1, VERSION_2

INLINE_CONFIG = REPO / "config.inline.example.toml"
FILED = "www.example-filed.cn"
UNFILED = "www.example-unfiled.cn"
VERSIONS = [pytest.param(VERSION_1, id="v1"), pytest.param(VERSION_2, id="v2")]


def start_quic_gate(tmp: Path, backend: int | None = None, *, address: str = "127.0.0.1", admin: bool = False,
                    violations: bool = False, tables: dict | None = None, **options) -> Gate:  # fmt: skip
    """`icpgate run` with one quic listener (to 127.0.0.1:`backend`); `options` go to gate_config.
    Started again on another port if the free one was taken meanwhile (a shared machine)."""
    tables = dict(tables or {})
    if violations:
        tables["violations"] = {"path": str(tmp / "violations.db"), "flush_interval": 0.2}
    for _ in range(3):
        port = free_udp_port()
        ports = {"quic": port}
        if admin:
            ports["admin"] = free_port()
            tables["admin"] = {"enabled": True, "port": ports["admin"]}
        table = listener(port, "quic", backend) | {"address": address}
        running = start_gate(gate_config(tmp, {"quic": table}, tables=tables, **options), {})
        running.ports.update(ports)
        if wait_listening(running):
            if admin:
                wait_for_port(ports["admin"])
            return running
        if "Address already in use" not in running.log():
            break
    raise RuntimeError("gate did not start:\n" + running.log())


def wait_listening(gate: Gate, timeout: float = 20.0) -> bool:
    """Until the gate's log says its quic listener serves (a UDP port cannot be probed by connecting);
    False, and the gate stopped, if it did not come up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "/quic" in gate.log() and "listening on" in gate.log():
            return True
        if gate.process.poll() is not None:
            break
        time.sleep(0.05)
    gate.stop()
    return False


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
    sources = set(origin.sources)
    assert len(sources) == 1
    assert h3_get(UNFILED, port, certs["ca"], timeout=2.0) is None
    # not one datagram of the unfiled flow reached the origin: it would come from another upstream socket
    assert origin.sources == sources
    assert origin.authorities() == ["%s:%d" % (FILED, port)]
    time.sleep(0.5)  # the violation table is written every 0.2 s
    with sqlite3.connect(tmp_path / "violations.db") as db:
        rows = db.execute("SELECT host, proto, reason, count FROM violations").fetchall()
    assert rows == [(UNFILED, "quic", "unfiled", 1)]
    assert "blocked quic" in quic_gate.log() and "host=%s" % UNFILED in quic_gate.log()


@pytest.mark.parametrize("version", VERSIONS)
def test_aioquic_client_in_each_version(quic_gate: Gate, origin: H3Origin, certs: dict[str, Path],
                                        version: int) -> None:  # fmt: skip
    port = quic_gate.ports["quic"]
    answer = h3_get(FILED, port, certs["ca"], version=version)
    assert answer is not None and answer.status == 200
    sources = set(origin.sources)
    assert h3_get(UNFILED, port, certs["ca"], timeout=1.5, version=version) is None
    assert origin.sources == sources


def test_a_client_port_carries_one_connection_after_another(quic_gate: Gate, origin: H3Origin,
                                                             certs: dict[str, Path]) -> None:  # fmt: skip
    """A NAT reusing a port, or a client bound to a fixed one: a new connection from the 4-tuple of a
    relayed flow is decided afresh, not dropped until the old flow idles out."""
    port = quic_gate.ports["quic"]
    local_port = free_udp_port()
    for _ in range(2):
        answer = h3_get(FILED, port, certs["ca"], local_port=local_port)
        assert answer is not None and answer.status == 200
        time.sleep(1.0)
    assert len(origin.sources) == 2  # the second connection on an upstream socket of its own
    assert origin.authorities() == ["%s:%d" % (FILED, port)] * 2


def test_a_new_connection_on_an_allowed_port_is_decided(quic_gate: Gate, origin: H3Origin,
                                                        certs: dict[str, Path]) -> None:  # fmt: skip
    """The 4-tuple a filed name was allowed on does not carry another name's connection past the gate."""
    port = quic_gate.ports["quic"]
    local_port = free_udp_port()
    answer = h3_get(FILED, port, certs["ca"], local_port=local_port)
    assert answer is not None and answer.status == 200
    time.sleep(0.5)  # the first connection's CONNECTION_CLOSE, relayed after the answer
    sources, datagrams = set(origin.sources), origin.datagrams
    assert h3_get(UNFILED, port, certs["ca"], timeout=2.0, local_port=local_port) is None
    assert (origin.sources, origin.datagrams) == (sources, datagrams)  # not one datagram of it reached the origin
    assert origin.authorities() == ["%s:%d" % (FILED, port)]
    assert "host=%s" % UNFILED in quic_gate.log()


# --- hand-built flights against a recording backend ---------------------------------------------------
class Recorder:
    """A UDP backend that keeps every datagram it receives with its sender (each relayed flow has its
    own upstream socket, so its own sender port), and answers when told to."""

    def __init__(self, sock: socket.socket | None = None, address: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self.received: list[tuple[tuple[str, int], bytes]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            with self._lock:
                self.received.append((sender, data))

    def datagrams(self, since: int = 0, settle: float = 0.3, at_least: int = 0) -> list[bytes]:
        """What arrived since `since`: once `at_least` datagrams have (waiting up to 5 s on a busy
        machine), then `settle` seconds more, for any that should not have come."""
        deadline = time.monotonic() + 5
        while self.mark() - since < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(settle)
        with self._lock:
            return [data for _, data in self.received[since:]]

    def expect(self, since: int, expected: list[bytes]) -> None:
        """Exactly `expected` arrived since `since`, in that order, and nothing more."""
        assert self.datagrams(since, at_least=len(expected)) == expected

    def senders(self) -> set[tuple[str, int]]:
        with self._lock:
            return {sender for sender, _ in self.received}

    def mark(self) -> int:
        with self._lock:
            return len(self.received)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def recorder():
    running = Recorder()
    yield running
    running.close()


@pytest.fixture(scope="module")
def recorded_gate(tmp_path_factory: pytest.TempPathFactory, recorder: Recorder):
    """One gate for the tests that only send datagrams: quic listener to the recorder, admin API on."""
    running = start_quic_gate(tmp_path_factory.mktemp("quic"), recorder.port, admin=True)
    yield running
    stop(running)


_clients = itertools.count(1)


def client() -> socket.socket:
    """A client socket from an address of its own (127.77.0.0/16): a new flow at the gate. A fresh
    port alone is not enough, the kernel may hand out a port a closed socket of an earlier flow had."""
    number = next(_clients)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.77.%d.%d" % (number >> 8 & 255, number & 255), 0))
    sock.settimeout(2.0)
    return sock


def send(port: int, *datagrams: bytes, sock: socket.socket | None = None) -> socket.socket:
    sock = sock or client()
    for datagram in datagrams:
        sock.sendto(datagram, ("127.0.0.1", port))
    return sock


def hello_for(sni: str) -> bytes:
    """A Chrome-sized ClientHello for `sni` (post-quantum key share), as a QUIC CRYPTO stream carries it."""
    return build_hello([server_name_extension(sni)], key_share_size=1216)[5:]


def zero_rtt_type(version: int) -> int:
    return 1 if version == VERSION_1 else 2  # RFC 9369 renumbers the long-header types


def flights(version: int, sni: str, dcid: bytes | None = None) -> dict[str, list[bytes]]:
    """The same ClientHello cut the ways a gate reading only one packet would get wrong, under
    `dcid` or, as a real client's, a connection ID of its own: the gate keeps each ID to one flow."""
    dcid = dcid or os.urandom(8)
    hello = hello_for(sni)
    cut = 700
    first, second = crypto_frame(0, hello[:cut]), crypto_frame(cut, hello[cut:])
    one_packet = protect(version, crypto_frame(0, hello), size=0, dcid=dcid)
    two_packets = protect(version, first, size=0, dcid=dcid) + protect(version, second, packet_number=1, size=0,
                                                                       dcid=dcid)  # fmt: skip
    datagram_1 = protect(version, first, size=1250, dcid=dcid)
    datagram_2 = protect(version, second, packet_number=1, size=1250, dcid=dcid)
    zero_rtt = protect(version, b"\x01" * 60, size=0, kind=zero_rtt_type(version), dcid=dcid)
    return {
        "one-packet": [one_packet],
        "two-packets-one-datagram": [two_packets],
        "two-datagrams": [datagram_1, datagram_2],
        "reordered": [datagram_2, datagram_1],
        "coalesced-0rtt": [protect(version, crypto_frame(0, hello), size=0, dcid=dcid) + zero_rtt],
        "padded": [one_packet + bytes(300)],
    }


def one_initial(sni: str, version: int = VERSION_1) -> bytes:
    """A one-datagram first flight for `sni` under a connection ID of its own."""
    (datagram,) = flights(version, sni)["one-packet"]
    return datagram


SHAPES = ["one-packet", "two-packets-one-datagram", "two-datagrams", "reordered", "coalesced-0rtt", "padded"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_hello_shapes_are_decided_and_replayed_byte_exact(recorded_gate: Gate, recorder: Recorder, version: int,
                                                          shape: str) -> None:  # fmt: skip
    port = recorded_gate.ports["quic"]
    mark = recorder.mark()
    blocked = send(port, *flights(version, UNFILED)[shape])
    assert recorder.datagrams(mark) == []
    mark = recorder.mark()
    flight = flights(version, FILED)[shape]
    allowed = send(port, *flight)
    recorder.expect(mark, flight)  # held, then replayed as they came, in their order
    # the backend's answer comes back from the gate's port; the blocked client gets nothing
    ((sender, _),) = recorder.received[-1:]
    recorder.sock.sendto(b"answer", sender)
    assert allowed.recvfrom(100) == (b"answer", ("127.0.0.1", port))
    blocked.settimeout(0.3)
    with pytest.raises(TimeoutError):
        blocked.recvfrom(100)
    allowed.close()
    blocked.close()


def drops(gate: Gate) -> dict[str, float]:
    """icpgate_quic_dropped_datagrams_total by reason, once the worker has copied its counters out."""
    time.sleep(1.2)  # the worker syncs its metrics every second
    status, _, body = admin_request(gate.ports["admin"], "/metrics")
    assert status == 200
    samples = parse_metrics(body.decode())
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "icpgate_quic_dropped_datagrams_total"}  # fmt: skip


def short_header(dcid: bytes = b"\x11" * 8) -> bytes:
    """A 1-RTT packet as a client sends once its handshake is done: the gate cannot read past the header."""
    return b"\x41" + dcid + bytes(range(200))


SERVER_CID = b"\x5e" * 8


def server_handshake(scid: bytes) -> bytes:
    """A server's v1 Handshake packet: the gate reads its connection IDs in the clear, not its payload."""
    return b"\xe0" + VERSION_1.to_bytes(4, "big") + b"\x08" + b"\x05" * 8 + bytes([len(scid)]) + scid + b"\x40\x20" + \
        bytes(32)  # fmt: skip


def prove(sock: socket.socket, recorder: Recorder, port: int, first: bytes, scid: bytes = b"") -> bytes:
    """Answer the flow whose first datagram was `first` as its server would, and have its client
    send a 1-RTT packet to the server's connection ID: the gate then knows the client receives at
    its address, and never pushes the flow out to make room. Returns that 1-RTT packet."""
    with recorder._lock:
        sender = next(sender for sender, data in recorder.received if data == first)
    scid = scid or os.urandom(8)
    recorder.sock.sendto(server_handshake(scid), sender)
    assert sock.recvfrom(200)[0] == server_handshake(scid)
    send(port, short_header(scid), sock=sock)
    return short_header(scid)


@pytest.mark.parametrize("version", VERSIONS)
def test_junk_and_strangers_are_dropped_by_reason(recorded_gate: Gate, recorder: Recorder, version: int) -> None:
    port = recorded_gate.ports["quic"]
    before = drops(recorded_gate)
    (good,) = flights(version, FILED)["one-packet"]
    garbage = bytearray(good)
    garbage[60:70] = bytes(10)  # ciphertext changed: the tag fails
    handshake = protect(version, b"\x01" * 40, size=1200, kind=3 if version == VERSION_2 else 2)
    zero_rtt = protect(version, b"\x01" * 40, size=1200, kind=zero_rtt_type(version))
    cases = {
        "invalid": [good[:1000], good[:1199], bytes(garbage), good[:100] + bytes(1100), good[:7]],
        "unknown_flow": [short_header(), handshake, zero_rtt, b"", b"\x00" * 1200],
        "unknown_version": [b"\xc0\x1a\x2a\x3a\x4a" + good[5:]],
    }
    mark = recorder.mark()
    for datagrams in cases.values():
        for datagram in datagrams:
            send(port, datagram).close()
    assert recorder.datagrams(mark) == []
    after = drops(recorded_gate)
    for reason, datagrams in cases.items():
        assert after.get(reason, 0) - before.get(reason, 0) == len(datagrams), reason
    assert "Traceback" not in recorded_gate.log()


def test_an_allowed_flow_cannot_carry_another_connection(recorded_gate: Gate, recorder: Recorder) -> None:
    """Servers tell connections apart by connection ID: after the decision, an Initial that opens
    another connection on the same 4-tuple, or repeats the hello differently, must not pass."""
    port = recorded_gate.ports["quic"]
    dcid = os.urandom(8)
    datagram_1, datagram_2 = flights(VERSION_1, FILED, dcid)["two-datagrams"]
    unfiled_1, _ = flights(VERSION_1, UNFILED, dcid)["two-datagrams"]
    other_dcid = protect(VERSION_1, crypto_frame(0, hello_for(UNFILED)), dcid=b"\x42" * 8, size=1250)
    mark = recorder.mark()
    sock = send(port, datagram_1, datagram_2)
    recorder.expect(mark, [datagram_1, datagram_2])
    send(port, datagram_1, unfiled_1, other_dcid, short_header(), datagram_2, sock=sock)
    # a retransmission passes; another hello under the same ID, or another ID, does not. The short
    # header ends the client's Initial phase: no Initial at all passes after it.
    recorder.expect(mark, [datagram_1, datagram_2, datagram_1, short_header()])
    sock.close()


def test_a_second_hello_must_name_the_same_host(recorded_gate: Gate, recorder: Recorder) -> None:
    """After a HelloRetryRequest the client sends a second ClientHello in the CRYPTO stream, after the
    first; servers may serve the name in the second. It passes only naming the decided host; one
    naming another spoils the flow: nothing of it passes from then on."""
    port = recorded_gate.ports["quic"]
    first = hello_for(FILED)
    dcid = os.urandom(8)
    (initial,) = flights(VERSION_1, FILED, dcid)["one-packet"]
    same = protect(VERSION_1, crypto_frame(len(first), hello_for(FILED.upper())), packet_number=1, size=1250,
                   dcid=dcid)  # fmt: skip
    mark = recorder.mark()
    send(port, initial, same).close()
    recorder.expect(mark, [initial, same])  # the same name (in another case) goes on
    other = hello_for(UNFILED)
    cut = 600
    dcid = os.urandom(8)  # another client: a connection ID of its own
    (initial,) = flights(VERSION_1, FILED, dcid)["one-packet"]
    same = protect(VERSION_1, crypto_frame(len(first), hello_for(FILED.upper())), packet_number=3, size=1250,
                   dcid=dcid)  # fmt: skip
    part_1 = protect(VERSION_1, crypto_frame(len(first), other[:cut]), packet_number=1, size=1250, dcid=dcid)
    part_2 = protect(VERSION_1, crypto_frame(len(first) + cut, other[cut:]), packet_number=2, size=1250, dcid=dcid)
    mark = recorder.mark()
    sock = send(port, initial, part_1, part_2, same, short_header())
    # the first part cannot name anything yet: a server cannot read a hello without its end
    recorder.expect(mark, [initial, part_1])
    sock.close()


def test_empty_datagrams_are_dropped_everywhere(recorded_gate: Gate, recorder: Recorder) -> None:
    port = recorded_gate.ports["quic"]
    (initial,) = flights(VERSION_1, FILED)["one-packet"]
    mark = recorder.mark()
    sock = send(port, b"", initial, b"", short_header(), b"", short_header())
    recorder.expect(mark, [initial, short_header(), short_header()])
    sock.close()
    assert "Traceback" not in recorded_gate.log()


def retry_packet(dcid: bytes, scid: bytes) -> bytes:
    """A server's v1 Retry: long header, type 3, a token and the integrity tag (which only the client checks)."""
    return b"\xf0" + VERSION_1.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid + \
        b"token" + bytes(16)  # fmt: skip


@pytest.mark.parametrize("name", [FILED, UNFILED])
def test_the_hello_after_a_retry_is_decided_afresh(recorded_gate: Gate, recorder: Recorder, name: str) -> None:
    """A server's Retry means it read nothing of the first hello: the one the client sends next,
    under keys from the Retry's connection ID (here 4 bytes, the server's choice), is the one it
    will serve, so that one is held and decided, and relayed over the same upstream socket."""
    port = recorded_gate.ports["quic"]
    (initial,) = flights(VERSION_1, FILED)["one-packet"]
    mark = recorder.mark()
    sock = send(port, initial)
    recorder.expect(mark, [initial])
    sender = recorder.received[-1][0]
    retry_cid = b"\x77" * 4
    recorder.sock.sendto(retry_packet(b"\x05" * 8, retry_cid), sender)
    assert sock.recvfrom(200)[0][:1] == b"\xf0"  # the Retry reached the client
    hello = hello_for(name)
    cut = 700
    part_1 = protect(VERSION_1, crypto_frame(0, hello[:cut]), dcid=retry_cid, packet_number=1, size=1250)
    part_2 = protect(VERSION_1, crypto_frame(cut, hello[cut:]), dcid=retry_cid, packet_number=2, size=1250)
    mark = recorder.mark()
    send(port, part_1, part_2, short_header(retry_cid), sock=sock)
    if name == FILED:
        recorder.expect(mark, [part_1, part_2, short_header(retry_cid)])
        assert recorder.received[-1][0] == sender  # the same upstream socket: the Retry token is bound to it
    else:
        recorder.expect(mark, [])  # held until the hello was whole, then blocked: nothing reached the server
    sock.close()


def test_version_negotiation_ends_the_flow(recorded_gate: Gate, recorder: Recorder) -> None:
    """After a server's Version Negotiation the client starts over: its next Initial is decided anew."""
    port = recorded_gate.ports["quic"]
    (initial,) = flights(VERSION_1, FILED)["one-packet"]
    mark = recorder.mark()
    sock = send(port, initial)
    recorder.expect(mark, [initial])
    negotiation = b"\x80" + bytes(4) + b"\x08" + b"\x05" * 8 + b"\x08" + DCID + VERSION_2.to_bytes(4, "big")
    recorder.sock.sendto(negotiation, recorder.received[-1][0])
    assert sock.recvfrom(200)[0] == negotiation
    mark = recorder.mark()
    (unfiled,) = flights(VERSION_2, UNFILED)["one-packet"]
    send(port, unfiled, short_header(), sock=sock)
    assert recorder.datagrams(mark) == []
    sock.close()


# --- timers and limits ------------------------------------------------------------------------------
@pytest.fixture
def timed_gate(tmp_path: Path, recorder: Recorder):
    """Short timers and the smallest table the config allows."""
    quic = {"block_hold": 1.0, "idle_timeout": 1.0, "max_flows": 16}
    running = start_quic_gate(tmp_path, recorder.port, admin=True, gate={"inspect_timeout": 1.0}, tables={"quic": quic})
    yield running
    stop(running)


def test_a_blocked_flow_is_dropped_for_the_hold(timed_gate: Gate, recorder: Recorder) -> None:
    port = timed_gate.ports["quic"]
    (unfiled,) = flights(VERSION_1, UNFILED)["one-packet"]
    (filed,) = flights(VERSION_1, FILED)["one-packet"]
    mark = recorder.mark()
    sock = send(port, unfiled, unfiled, filed)  # the retransmission and even a filed hello: held off
    assert recorder.datagrams(mark) == []
    assert drops(timed_gate)["blocked"] == 3
    time.sleep(0.5)  # past the 1 s hold
    send(port, filed, sock=sock)
    recorder.expect(mark, [filed])
    sock.close()


def test_an_idle_flow_is_forgotten(timed_gate: Gate, recorder: Recorder) -> None:
    port = timed_gate.ports["quic"]
    (filed,) = flights(VERSION_1, FILED)["one-packet"]
    mark = recorder.mark()
    sock = send(port, filed)
    for _ in range(3):  # traffic keeps it alive past the timeout
        time.sleep(0.5)
        send(port, short_header(), sock=sock)
    recorder.expect(mark, [filed] + [short_header()] * 3)
    time.sleep(1.5)
    send(port, short_header(), sock=sock)  # a 1-RTT packet of a flow the gate no longer knows
    recorder.expect(mark, [filed] + [short_header()] * 3)
    assert drops(timed_gate)["unknown_flow"] == 1
    sock.close()


def test_an_incomplete_hello_times_out(timed_gate: Gate, recorder: Recorder) -> None:
    port = timed_gate.ports["quic"]
    first, second = flights(VERSION_1, FILED)["two-datagrams"]
    mark = recorder.mark()
    sock = send(port, first)
    time.sleep(1.5)
    send(port, second, sock=sock)  # too late: the first half was dropped, this one waits alone
    assert recorder.datagrams(mark, settle=1.5) == []
    assert drops(timed_gate)["inspect_timeout"] == 2
    sock.close()


def test_the_table_is_bounded(timed_gate: Gate, recorder: Recorder) -> None:
    port = timed_gate.ports["quic"]
    blocked = [send(port, one_initial(UNFILED)) for _ in range(4)]
    mark = recorder.mark()
    filed = [one_initial(FILED) for _ in range(16)]
    relayed = [send(port, datagram) for datagram in filed]  # blocked flows make room
    recorder.expect(mark, filed)
    # answered flows (their clients use the server's connection ID) are never pushed out
    answers = [prove(sock, recorder, port, datagram) for sock, datagram in zip(relayed, filed, strict=True)]
    recorder.expect(mark, filed + answers)
    late_datagram = one_initial(FILED)
    late = send(port, late_datagram)
    recorder.expect(mark, filed + answers)
    assert drops(timed_gate)["table_full"] == 1
    _, _, body = admin_request(timed_gate.ports["admin"], "/metrics")
    samples = parse_metrics(body.decode())
    assert metric(samples, "icpgate_quic_initial_seconds_count") == 20  # each decided flow's hello, once
    time.sleep(0.5)  # the relayed flows idle out
    send(port, late_datagram, sock=late)
    recorder.expect(mark, [*filed, *answers, late_datagram])
    for sock in blocked + relayed + [late]:
        sock.close()


def test_a_flood_of_hellos_leaves_room_for_new_flows(tmp_path: Path, recorder: Recorder) -> None:
    """With a relayed flow in a small table, incomplete hellos from many ports take at most half of
    it and push out their oldest: a filed client arriving after them is still served."""
    running = start_quic_gate(tmp_path, recorder.port, admin=True, tables={"quic": {"max_flows": 16}})
    port = running.ports["quic"]
    try:
        filed, filed_late = one_initial(FILED), one_initial(FILED)
        incomplete = [flights(VERSION_1, FILED)["two-datagrams"][0] for _ in range(40)]
        mark = recorder.mark()
        relayed = send(port, filed)
        recorder.expect(mark, [filed])
        prove(relayed, recorder, port, filed, SERVER_CID)
        flood = []
        for burst in range(4):  # in bursts the socket's receive buffer holds
            flood += [send(port, datagram) for datagram in incomplete[10 * burst : 10 * burst + 10]]
            time.sleep(0.05)
        late = send(port, filed_late)
        send(port, short_header(), sock=relayed)  # the relayed flow was not pushed out
        recorder.expect(mark, [filed, short_header(SERVER_CID), filed_late, short_header()])
        counted = drops(running)
        assert counted.get("table_full", 0) == 0
        assert counted["pending_full"] == 40 - 8 + 1  # pending flows past half the table, oldest first
        for sock in [*flood, relayed, late]:
            sock.close()
    finally:
        stop(running)


def test_an_unknown_version_passes_only_when_the_pack_says_so(tmp_path: Path, recorder: Recorder) -> None:
    policies = copy_policies(tmp_path)
    pack = policies / "default.toml"
    text = pack.read_text(encoding="utf-8")
    pack.write_text(text.replace('quic_unknown_version = "block"', 'quic_unknown_version = "allow"'), encoding="utf-8")
    running = start_quic_gate(tmp_path, recorder.port, pack=pack)
    port = running.ports["quic"]
    try:
        (initial,) = flights(VERSION_1, UNFILED)["one-packet"]
        unknown = b"\xc0\x1a\x2a\x3a\x4a" + initial[5:]  # a reserved (greased) version: nothing to read
        mark = recorder.mark()
        sock = send(port, unknown, short_header(), b"\xff" * 30)
        recorder.expect(mark, [unknown, short_header(), b"\xff" * 30])  # relayed unread, as they came
        send(port, initial).close()  # a version the gate reads is still decided
        recorder.expect(mark, [unknown, short_header(), b"\xff" * 30])
        sock.close()
    finally:
        stop(running)


def test_check_explains_a_quic_decision(tmp_path: Path) -> None:
    """`icpgate check --proto quic` runs the decision the QUIC gate makes, and says so."""
    config = gate_config(tmp_path, {})
    filed = check_json(config, FILED, "--proto", "quic", "--ip", "127.0.0.1", "--port", "443")
    assert (filed["action"], filed["reason"], filed["destination"]) == (
        "allow", "filed", {"ip": "127.0.0.1", "port": 443, "proto": "quic"})  # fmt: skip
    unfiled = check_json(config, UNFILED, "--proto", "quic")
    assert (unfiled["action"], unfiled["reason"]) == ("block", "unfiled")
    text = run_icpgate("check", UNFILED, "--proto", "quic", "--port", "443", "-c", str(config))
    assert text.returncode == 1 and "(quic)" in text.stdout and "BLOCK (unfiled)" in text.stdout


# --- inline: TPROXY for UDP ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inline(tmp_path_factory: pytest.TempPathFactory):
    """The shipped inline example (transparent quic listeners, upstream.source = "client") running in
    the gate namespace of netnskit's topology, paths overridden only."""
    tmp = tmp_path_factory.mktemp("inline-quic")
    overrides = ["--set", 'registry.path="%s"' % (tmp / "registry.db"),
                 "--set", 'admin.metrics_dir="%s"' % (tmp / "metrics")]  # fmt: skip
    imported = run_icpgate("import", str(SAMPLES), "-c", str(INLINE_CONFIG), *overrides)
    assert imported.returncode == 0, imported.stderr
    with netnskit.topology("icpq") as net:
        net.load_ruleset({})  # the shipped ruleset, UDP 443 steered to the quic listeners
        log_path = tmp / "gate.log"
        with log_path.open("w") as log:
            gate = net.popen(net.gate, [sys.executable, "-m", "icpgate", "run", "-c", str(INLINE_CONFIG), *overrides],
                             stdout=log, stderr=log)  # fmt: skip
        deadline = time.monotonic() + 30
        while "listening on [::]:8443/quic" not in log_path.read_text():
            assert gate.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield net
        assert net.stop(gate) == 0
        assert "Traceback" not in log_path.read_text(), log_path.read_text()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_tproxy_flows_keep_both_addresses(inline: netnskit.Topology, family: int) -> None:
    """The server sees the client's own address and the client hears the server's: TPROXY in, the
    original destination from the datagram's ancillary data, replies sent from it."""
    net = inline
    server_ip, client_ip = (SERVER4, CLIENT4) if family == socket.AF_INET else (SERVER6, CLIENT6)
    server = Recorder(net.socket(net.server, family, socket.SOCK_DGRAM), (server_ip, 443))
    try:
        (filed,) = flights(VERSION_1, "example-filed.cn")["one-packet"]
        (unfiled,) = flights(VERSION_1, "example-unfiled.cn")["one-packet"]
        blocked = net.socket(net.client, family, socket.SOCK_DGRAM)
        blocked.sendto(unfiled, (server_ip, 443))
        allowed = net.socket(net.client, family, socket.SOCK_DGRAM)
        allowed.settimeout(3)
        allowed.sendto(filed, (server_ip, 443))
        server.expect(0, [filed])
        (sender,) = server.senders()
        assert sender[0] == client_ip  # upstream.source = "client": from the client's address
        server.sock.sendto(b"answer", sender)
        data, peer = allowed.recvfrom(100)
        assert (data, peer[:2]) == (b"answer", (server_ip, 443))
        allowed.sendto(short_header(), (server_ip, 443))
        server.expect(0, [filed, short_header()])
        blocked.close()
        allowed.close()
    finally:
        server.close()


def test_a_wildcard_listener_answers_from_the_address_dialled(tmp_path: Path, recorder: Recorder) -> None:
    """Bound to 0.0.0.0, the gate names each reply's source (IP_PKTINFO): a client that sent to
    127.0.0.2 hears back from 127.0.0.2, not from the address the route to it would pick."""
    running = start_quic_gate(tmp_path, recorder.port, address="0.0.0.0")
    port = running.ports["quic"]
    try:
        (filed,) = flights(VERSION_1, FILED)["one-packet"]
        mark = recorder.mark()
        sock = client()
        sock.sendto(filed, ("127.0.0.2", port))
        recorder.expect(mark, [filed])
        recorder.sock.sendto(b"answer", recorder.received[-1][0])
        assert sock.recvfrom(100) == (b"answer", ("127.0.0.2", port))
        sock.close()
    finally:
        stop(running)


def test_the_gate_does_not_relay_to_itself(tmp_path: Path) -> None:
    """original_dst without TPROXY: the destination is the gate's own socket. Its own datagram comes
    back as a new flow, which is refused instead of decided and relayed again, and again."""
    running = start_quic_gate(tmp_path, admin=True)
    port = running.ports["quic"]
    try:
        (filed,) = flights(VERSION_1, FILED)["one-packet"]
        send(port, filed).close()
        time.sleep(0.5)
        assert drops(running).get("loop") == 1
        status, _, body = admin_request(running.ports["admin"], "/metrics")
        assert status == 200
        samples = parse_metrics(body.decode())
        assert metric(samples, "icpgate_quic_datagrams_total", direction="to_upstream") == 1
        assert metric(samples, "icpgate_decisions_total", kind="quic") == 1
        assert metric(samples, "icpgate_quic_flows", state="relay") == 1  # the first, relayed (to the gate)
        assert metric(samples, "icpgate_quic_flows", state="pending") == 0
    finally:
        stop(running)


def test_monitor_mode_relays_and_records(tmp_path: Path, recorder: Recorder) -> None:
    """gate.enforcement = "monitor": QUIC follows the same Runtime.decide as TCP, so an unfiled flow is
    relayed and recorded as a violation that passed; junk is still dropped."""
    running = start_quic_gate(tmp_path, recorder.port, violations=True, gate={"enforcement": "monitor"})
    port = running.ports["quic"]
    try:
        (unfiled,) = flights(VERSION_1, UNFILED)["one-packet"]
        mark = recorder.mark()
        send(port, unfiled, unfiled[:1199]).close()
        recorder.expect(mark, [unfiled])
        time.sleep(0.5)
        with sqlite3.connect(tmp_path / "violations.db") as db:
            rows = db.execute("SELECT host, proto, reason, count, passed FROM violations").fetchall()
        assert rows == [(UNFILED, "quic", "unfiled", 1, 1)]
        assert "passed (monitor mode) quic" in running.log()
    finally:
        stop(running)


def test_an_allowed_flow_without_a_backend_is_dropped(tmp_path: Path) -> None:
    """upstream.mode = "static" with the destination missing from the map: nowhere to relay to."""
    running = start_quic_gate(tmp_path, admin=True, upstream='[upstream]\nmode = "static"')
    port = running.ports["quic"]
    try:
        first, second = flights(VERSION_1, FILED)["two-datagrams"]
        send(port, first, second).close()
        assert drops(running).get("upstream_error") == 2  # the held datagrams, never sent anywhere
    finally:
        stop(running)


def test_an_ipv6_listener_relays_to_an_ipv4_backend(tmp_path: Path, recorder: Recorder) -> None:
    running = start_quic_gate(tmp_path, recorder.port, address="::1")
    port = running.ports["quic"]
    try:
        (filed,) = flights(VERSION_2, FILED)["two-packets-one-datagram"]
        mark = recorder.mark()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.settimeout(2.0)
        sock.sendto(filed, ("::1", port))
        recorder.expect(mark, [filed])
        recorder.sock.sendto(b"answer", recorder.received[-1][0])
        data, peer = sock.recvfrom(100)
        assert (data, peer[:2]) == (b"answer", ("::1", port))
        sock.close()
    finally:
        stop(running)


def test_reply_sockets_are_shared_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TPROXY reply sockets (IP_TRANSPARENT, bound to the address a client sent to): one per
    destination, shared by its flows; at the cap an unused one is closed, and none in use ever is."""
    monkeypatch.setattr(quic_socket, "MAX_REPLY_SOCKETS", 2)
    loop = asyncio.new_event_loop()
    delivered: list[tuple[bytes, tuple[str, int]]] = []

    def deliver(sock: socket.socket, destination: tuple[str, int]) -> None:
        delivered.append((sock.recv(100), destination))

    replies = quic_socket.ReplySockets(loop, deliver)
    try:
        port = free_udp_port()
        first, second, third = (("127.0.0.%d" % last, port) for last in (2, 3, 4))
        one = replies.take(first)
        assert replies.take(first) is one  # a second flow to the same destination shares it
        two = replies.take(second)
        with pytest.raises(quic_socket.ReplySocketsFull):
            replies.take(third)  # both in use
        replies.release(second)
        replies.take(third)  # the unused one made room
        assert two.fileno() == -1 and one.fileno() != -1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"to the first", first)  # bound there, the reply socket also receives
            loop.run_until_complete(asyncio.sleep(0.1))
        assert delivered == [(b"to the first", first)]
    finally:
        replies.close()
        loop.close()


def test_several_workers_one_reader(tmp_path: Path, recorder: Recorder) -> None:
    """With several workers, the first alone reads the quic socket: a flow's datagrams all reach the
    worker that holds its state (two workers reading would split two-datagram hellos between them)."""
    running = start_quic_gate(tmp_path, recorder.port, gate={"workers": 2})
    port = running.ports["quic"]
    try:
        deadline = time.monotonic() + 10
        while "/quic is served by worker 0" not in running.log():  # said by worker 1
            assert time.monotonic() < deadline, running.log()
            time.sleep(0.05)
        sent = [flights(VERSION_1, FILED)["two-datagrams"] for _ in range(10)]
        mark = recorder.mark()
        for flight in sent:
            send(port, *flight).close()
        recorder.expect(mark, [datagram for flight in sent for datagram in flight])
    finally:
        stop(running)


async def echo_through(gate_port: int, origin_port: int, certs: dict[str, Path], server_name: str) -> bytes | None:
    """Raw QUIC (ALPN "echo") through the gate to an aioquic server that sends every new client a
    Retry first (address validation, as servers under load do); the server echoes one stream."""

    running: set[asyncio.Task] = set()

    def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def run() -> None:
            writer.write(await reader.read())
            writer.write_eof()

        task = asyncio.ensure_future(run())
        running.add(task)
        task.add_done_callback(running.discard)

    server_configuration = QuicConfiguration(is_client=False, alpn_protocols=["echo"])
    server_configuration.load_cert_chain(certs["server"], certs["key"])
    server = await serve("127.0.0.1", origin_port, configuration=server_configuration, retry=True,
                         stream_handler=echo)  # fmt: skip
    client_configuration = QuicConfiguration(is_client=True, alpn_protocols=["echo"], server_name=server_name)
    client_configuration.load_verify_locations(cafile=str(certs["ca"]))
    try:
        async with asyncio.timeout(3):
            async with connect("127.0.0.1", gate_port, configuration=client_configuration) as connection:
                reader, writer = await connection.create_stream()
                writer.write(b"ping through a Retry")
                writer.write_eof()
                return await reader.read()
    except (TimeoutError, ConnectionError):
        return None
    finally:
        server.close()


def test_a_server_that_sends_retry(tmp_path: Path, certs: dict[str, Path]) -> None:
    """aioquic's client and server, the server validating addresses with Retry: the flow keeps its
    upstream socket (the Retry token is bound to its address) and the client's new Initials, under
    the Retry's keys, repeat the decided hello."""
    origin_port = free_udp_port()
    running = start_quic_gate(tmp_path, origin_port)
    try:
        port = running.ports["quic"]
        assert asyncio.run(echo_through(port, origin_port, certs, FILED)) == b"ping through a Retry"
        assert asyncio.run(echo_through(port, origin_port, certs, UNFILED)) is None
    finally:
        stop(running)
