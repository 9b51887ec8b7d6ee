"""100,000 junk QUIC Initials from thousands of source ports: the gate's memory stays within what its
flow table may hold, every datagram it read is counted as dropped, none reaches the origin, and a
filed HTTP/3 client still gets its page during and after the flood.

Two kinds of junk, from alternate sockets, so both the cheap and the dear way to fail are flooded:
- garbage: a valid-looking Initial long header, random DCID, random payload (fails at the AEAD tag);
- incomplete: a genuine Initial whose ClientHello needs seven more datagrams that never come, sent
  twice from the same port (the gate must hold it while it waits: the memory attack), each under a
  connection ID of its own (the gate drops a replay of one under another's ID before any state).
Sockets come in waves of a few hundred, each wave on fresh ephemeral ports: 50,000 4-tuples, and
more incomplete flows at once than the table lets wait. The flood paces itself on the backlog of
the gate's socket, so the gate, not the kernel's buffer, meets it.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

from adminkit import TOKEN, admin_request, metric, parse_metrics
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from gatekit import Gate, free_port, gate_config, listener, start_gate
from h3kit import free_udp_port, h3_get, h3_origin, junk_initial
from test_gate_process import wait_until
from test_quic_gate import wait_listening
from test_quic_splice import crypto, crypto_of, seal

from icpgate.gate.quic.flows import MAX_HELD, MAX_PENDING
from icpgate.gate.quic.listener import DROP_REASONS

FLOOD = 100_000
WAVE = 250  # sockets open at once
PER_SOCKET = 2  # datagrams from each: 50,000 source ports in all
INSPECT_TIMEOUT = 5.0  # an incomplete hello held this long: some 6,000 of the flood's would be pending at once
BURST = 25  # datagrams sent back to back (~58 KB with the kernel's overhead): with BACKLOG, under the 208 KB buffer
BACKLOG = 64 * 1024  # bytes waiting in the gate's socket above which the flood pauses
RATE = 10_000  # datagrams per second at most
MAX_FLOWS = 8192  # above quic_flows.MAX_PENDING (4096), so the pending limit is what the flood meets
FILED = "www.example-filed.cn"
assert MAX_FLOWS > MAX_PENDING


def incomplete_initials(count: int) -> list[bytes]:
    """First datagrams of a real eight-datagram first flight (a ~8.5 KB ClientHello, as aioquic
    sends with forty 200-byte ALPN names), each needing the other seven to complete: its frames
    sealed again under `count` connection IDs of their own, as `count` clients would send them."""
    configuration = QuicConfiguration(is_client=True, server_name=FILED, alpn_protocols=["x" * 200] * 40)
    client = QuicConnection(configuration=configuration)
    client.connect(("127.0.0.1", 443), now=0.0)
    flight = [data for data, _ in client.datagrams_to_send(now=0.0)]
    assert len(flight) == 8
    dcid = flight[0][6 : 6 + flight[0][5]]
    frames = crypto(0, crypto_of(flight[0], dcid))
    return [seal(frames, dcid=os.urandom(8), scid=b"\x05" * 8, number=0) for _ in range(count)]


def client_port() -> int:
    """A free UDP port below the ephemeral range, for the filed clients: the flood's sockets take
    ephemeral ports, and a filed client on a port a junk flow still holds would (rightly) lose its
    first Initial to that flow, which would blur the books."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(low // 2, low), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free UDP port below %d" % low)


def udp_socket(port: int) -> tuple[int, int]:
    """(bytes waiting, datagrams dropped) of the UDP socket bound to 127.0.0.1:port, from the kernel:
    what the gate has yet to read, and what did not fit in its buffer. Read again when the line is
    missing: /proc/net/udp comes a page at a time, and while the flood opens and closes sockets the
    listing can skip a line between two pages."""
    wanted = "0100007F:%04X" % port
    for _ in range(50):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted:
                return int(fields[4].split(":")[1], 16), int(fields[-1])
    raise AssertionError("no UDP socket on port %d" % port)


def udp_drops(port: int) -> int:
    return udp_socket(port)[1]


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (the supervisor and its worker)."""
    total = 0
    pids = [pid, *map(int, Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split())]
    for candidate in pids:
        for line in Path("/proc/%d/status" % candidate).read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def flood(port: int, total: int, incomplete: list[bytes], seed: int = 13) -> int:
    """Send `total` junk datagrams at up to RATE per second, slower when the gate's socket has a
    backlog (on a shared machine the gate may get less than a core); returns how many were sent.
    Takes the incomplete Initials it sends from `incomplete`: each goes to one socket only."""
    rng = random.Random(seed)
    sent = 0
    started = time.monotonic()
    while sent < total:
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(WAVE)]
        wave = {number: incomplete.pop() for number in range(1, WAVE, 2)}  # a connection ID per socket
        try:
            for _ in range(PER_SOCKET):
                for number, sock in enumerate(sockets):
                    if sent >= total:
                        break
                    datagram = wave[number] if number % 2 else junk_initial(rng)
                    sock.sendto(datagram, ("127.0.0.1", port))
                    sent += 1
                    if sent % BURST:
                        continue
                    if (ahead := sent / RATE - (time.monotonic() - started)) > 0:
                        time.sleep(ahead)
                    while udp_socket(port)[0] > BACKLOG:  # the gate is behind: wait, do not overrun it
                        time.sleep(0.002)
        finally:
            for sock in sockets:
                sock.close()
    return sent


def start_quic_gate(tmp_path: Path, origin, backend: int) -> tuple[Gate, int]:
    """A gate with a QUIC listener in front of `backend`, a flow table of MAX_FLOWS and its admin
    API (metrics) on; the HTTP listener is there because the gate kit waits for a TCP port."""
    port, http, admin = free_udp_port(), free_port(), free_port()
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n")
    tables = {"admin": {"enabled": True, "port": admin, "token_file": str(token)}, "quic": {"max_flows": MAX_FLOWS}}
    listeners = {"http": listener(http, "http", origin.http), "quic": listener(port, "quic", backend)}
    config = gate_config(tmp_path, listeners, gate={"inspect_timeout": INSPECT_TIMEOUT}, tables=tables)
    gate = start_gate(config, {"http": http, "admin": admin})
    wait_listening(gate)
    return gate, port


def metrics(gate: Gate) -> dict[tuple[str, tuple], float]:
    status, _, body = admin_request(gate.ports["admin"], "/metrics")
    assert status == 200
    return parse_metrics(body.decode())


def counted(gate: Gate) -> dict[str, float]:
    """The gate's QUIC datagram books: read from clients, relayed to the backend, dropped."""
    now = metrics(gate)
    return {
        "read": metric(now, "icpgate_quic_datagrams_total", direction="from_client"),
        "relayed": metric(now, "icpgate_quic_datagrams_total", direction="to_upstream"),
        "dropped": metric(now, "icpgate_quic_dropped_datagrams_total"),
        **{reason: metric(now, "icpgate_quic_dropped_datagrams_total", reason=reason) for reason in DROP_REASONS},
        "flows": metric(now, "icpgate_quic_flows"),
    }


def settled(gate: Gate, port: int, sent: int) -> dict[str, float]:
    """The books once the gate has dropped (or the kernel dropped for it) the `sent` junk datagrams
    so far and every flow in inspection has been decided or timed out: every datagram read is then
    either relayed or dropped. (Counting reads instead would let a filed client's datagrams stand
    in for junk still in the socket.)"""
    books: dict[str, float] = {}

    def balanced() -> bool:
        books.update(counted(gate))
        return books["dropped"] + udp_drops(port) >= sent and books["read"] == books["relayed"] + books["dropped"]

    wait_until(balanced, timeout=20, step=0.25)
    return books


def memory_cap_kb() -> int:
    """What the flood may add to the gate's memory, from its limits: the datagrams pending flows hold
    (MAX_HELD in all, whatever max_flows is); their readers' CRYPTO bytes, decrypted from those same
    held datagrams, so no more again; a flow entry for each of `max_flows` (the object, its dict
    slots, a reader with its cipher contexts, a timer: under 2 KiB); and 8 MiB for the allocator
    and the interpreter's caches. 56 MiB here, where an unbounded table would keep the whole flood
    (the 100,000 datagrams alone are 120 MB)."""
    return (2 * MAX_HELD + MAX_FLOWS * 2048 + 8 * 1024 * 1024) // 1024


def test_a_flood_of_junk_initials_keeps_memory_bounded_and_filed_flows_working(tmp_path: Path, origin, certs) -> None:
    incomplete = incomplete_initials((5000 + FLOOD) // PER_SOCKET // 2 + WAVE)
    with h3_origin(certs["server"], certs["key"]) as h3:
        gate, port = start_quic_gate(tmp_path, origin, h3.port)
        try:
            # Warm-up: the code paths, the allocator's arenas, one filed flow.
            answer = h3_get(FILED, port, certs["ca"], local_port=client_port())
            assert answer is not None and answer.status == 200, gate.log()
            flood(port, 5000, incomplete, seed=1)
            before = settled(gate, port, 5000)
            kernel_before = udp_drops(port)
            rss_before = rss_kb(gate.process.pid)
            sources_before = len(h3.sources)

            sent: list[int] = []
            flooding = threading.Thread(target=lambda: sent.append(flood(port, FLOOD, incomplete)))
            flooding.start()
            peak_flows, peak_rss = 0.0, 0
            during = None
            while flooding.is_alive():
                peak_flows = max(peak_flows, counted(gate)["flows"])
                peak_rss = max(peak_rss, rss_kb(gate.process.pid))
                if during is None:  # a filed client in the middle of the flood
                    during = h3_get(FILED, port, certs["ca"], timeout=10, local_port=client_port())
                time.sleep(0.3)
            flooding.join()
            after_answer = h3_get(FILED, port, certs["ca"], local_port=client_port())
            after = settled(gate, port, 5000 + FLOOD)
            kernel = udp_drops(port) - kernel_before
            peak_rss = max(peak_rss, rss_kb(gate.process.pid))
        finally:
            assert gate.stop() == 0
        log = gate.log()
        assert "Traceback" not in log, log

    assert sent == [FLOOD]
    for answer in (during, after_answer):
        assert answer is not None and answer.status == 200
        assert b">%s:%d<" % (FILED.encode(), port) in answer.body

    # The books: everything the gate read of the flood it dropped; what it did not read, the kernel
    # dropped for it (a full socket buffer), and that stays a small part: the test is of the gate.
    dropped = after["dropped"] - before["dropped"]
    by_reason = {reason: after[reason] - before[reason] for reason in DROP_REASONS}
    assert FLOOD - kernel <= dropped <= FLOOD, (dropped, kernel, by_reason)
    assert kernel < FLOOD // 20, "the kernel dropped %d datagrams the gate did not read in time" % kernel
    # The flood met the pending limit: its oldest incomplete flows made room, no new flow was refused.
    assert after["pending_full"] > before["pending_full"], "the flood never reached the table's limits"
    assert after["table_full"] == before["table_full"] == 0
    # Only the two filed clients' flows reached the origin (one upstream socket each).
    assert len(h3.sources) - sources_before == 2

    # The table stayed within max_flows; memory within what the table may hold.
    assert peak_flows <= MAX_FLOWS
    assert peak_rss - rss_before <= memory_cap_kb(), (rss_before, peak_rss)
