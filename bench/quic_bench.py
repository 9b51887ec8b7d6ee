"""QUIC through the gate: Initials decided per second on one core, and an allowed flow's throughput
against a minimal uvloop UDP relay measured in the same run.

    python bench/quic_bench.py [--seconds 3] [--rounds 5]

Everything the gate does runs pinned to CPU 0 (one worker); the load and the origin share CPU 1.

Initials: new flows, each a Chrome-sized first flight (bench/quic_initial_bench.py: a ~1.9 KB
ClientHello in two Initial datagrams) from its own source address and port, sent over loopback to
the gate's quic listener from one raw socket (so root) as fast as the gate reads them (the sender
waits while the gate's socket has a backlog, so the kernel drops nothing and no flow is left half
sent). The gate's whole path: recvmsg,
flow table, header protection, AEAD, CRYPTO reassembly, SNI, `Runtime.decide`, and the verdict: an
unfiled name is blocked (violation recorded, flow held for quic.block_hold), a filed one allowed
(its upstream socket opened, the flight replayed to a backend). The figure is decisions (the gate's
icpgate_decisions_total{kind="quic"}) per CPU second of the gate's process, the median of rounds.

Throughput: a client sends bulk 1200-byte datagrams after a real first flight (aioquic's client,
SNI of a filed name), keeping a window of them in flight; an echo server behind the relay sends
each back. The gate and the baseline relay (`relay` below: a dict of upstream sockets, nothing else)
alternate for `rounds` rounds; the figures are the medians of echoed megabytes per second and per
CPU second of the relaying process, and the ratios gate/relay.

Results go to bench/out/quic.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import uvloop
from aioquic._crypto import AEAD, HeaderProtection
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import pull_quic_header
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

from benchkit import ICPGATE, free_port, stop  # noqa: E402

from icpgate.gate.quic.initial import VERSION_1, initial_keys  # noqa: E402

GATE_CPU, LOAD_CPU = 0, 1
FILED = "www.example-filed.cn"  # in the bundled sample filings
UNFILED = "www.example-unfiled.cn"
SAMPLES = REPO / "daemon" / "icpgate" / "samples" / "filings.ndjson"
BULK_SIZE = 1200
WINDOW = 64  # datagrams in flight: enough to keep a relay busy, few enough for default socket buffers


# --- the parts: echo origin, baseline relay ---------------------------------------------------------
def echo(port: int) -> None:
    """The origin: every datagram straight back to its sender."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    while True:
        data, address = sock.recvfrom(65536)
        sock.sendto(data, address)


class Relay(asyncio.DatagramProtocol):
    """The baseline: one upstream socket per client address, datagrams copied both ways, no checks."""

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend, self.flows = backend, {}

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, client: tuple[str, int]) -> None:
        flow = self.flows.get(client)
        if flow is None:
            flow = self.flows[client] = Upstream(self, client)
            loop = asyncio.get_running_loop()
            flow.task = loop.create_task(loop.create_datagram_endpoint(lambda: flow, remote_addr=self.backend))
        flow.send(data)


class Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay, client: tuple[str, int]) -> None:
        self.relay, self.client, self.transport, self.waiting, self.task = relay, client, None, [], None

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.transport = transport
        for data in self.waiting:
            transport.sendto(data)

    def datagram_received(self, data: bytes, _: tuple[str, int]) -> None:
        self.relay.transport.sendto(data, self.client)

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.waiting.append(data)
        else:
            self.transport.sendto(data)


async def relay(port: int, backend: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: Relay(("127.0.0.1", backend)), local_addr=("127.0.0.1", port))
    await asyncio.Event().wait()


# --- load ----------------------------------------------------------------------------------------------
def first_flight(server_name: str, chrome_sized: bool = False) -> list[bytes]:
    """What a real client sends first: aioquic's Initial datagram(s) for `server_name`; with
    `chrome_sized`, its hello grown by ALPN entries to Chrome's ~1.9 KB, which takes two datagrams
    (as in quic_initial_bench.py)."""
    alpn = ["h3"]
    if chrome_sized:
        padding = 1900 - 480  # aioquic's own hello with one ALPN entry is ~480 bytes
        alpn += [*("x%02d" % i + "y" * 197 for i in range(padding // 201)), "z" * (padding % 201)]
    configuration = QuicConfiguration(is_client=True, server_name=server_name, alpn_protocols=alpn)
    client = QuicConnection(configuration=configuration)
    client.connect(("127.0.0.1", 443), now=time.monotonic())
    return [data for data, _ in client.datagrams_to_send(now=time.monotonic())]


class Resealed:
    """A first flight sealed again under a new connection ID for every flow, as every client picks its
    own: the gate keeps an ID to one flow and drops another flow's Initial under it. About 20 µs a
    flight (aioquic's AEAD and header protection, the gate's key schedule): the sender stays ahead."""

    def __init__(self, flight: list[bytes]) -> None:
        self.packets = []  # (plain header, payload, packet number, the padding after it) per datagram
        for datagram in flight:
            buf = Buffer(data=datagram)
            header = pull_quic_header(buf, host_cid_length=8)
            pair = CryptoPair()
            pair.setup_initial(cid=header.destination_cid, is_client=False, version=VERSION_1)
            plain, payload, number = pair.decrypt_packet(datagram[: header.packet_length], buf.tell(), 0)
            assert len(header.destination_cid) == 8
            self.packets.append((plain, payload, number, datagram[header.packet_length :]))

    def __call__(self) -> list[bytes]:
        dcid = os.urandom(8)
        key, iv, hp = initial_keys(VERSION_1, dcid)
        aead, protection = AEAD(b"aes-128-gcm", key, iv), HeaderProtection(b"aes-128-ecb", hp)
        flight = []
        for plain, payload, number, tail in self.packets:
            header = plain[:6] + dcid + plain[14:]
            flight.append(protection.apply(header, aead.encrypt(payload, header, number)) + tail)
        return flight


def open_flow(port: int, timeout: float = 20.0) -> socket.socket:
    """A client socket whose flow the relay (or gate) has let through: its first flight came back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(0.5)
        try:
            for datagram in first_flight(FILED):
                sock.send(datagram)
            sock.recv(65536)
            return sock
        except (TimeoutError, ConnectionRefusedError):
            sock.close()
    raise TimeoutError("no flow through port %d" % port)


def bulk_mbps(port: int, relay_pid: int, seconds: float) -> tuple[float, float]:
    """Echoed megabytes through `port` over `seconds`, WINDOW datagrams in flight (a datagram lost
    refills the window after 20 ms without an answer): (per second, per CPU second of the relaying
    process). The second is steadier on a shared machine: a relay that gets less of its core moves
    fewer bytes, but not fewer per CPU second."""
    sock = open_flow(port)
    sock.settimeout(0.02)
    payload = bytes([0x40]) + os.urandom(BULK_SIZE - 1)  # a short-header packet, as 1-RTT data is
    with sock:
        while True:  # drain the rest of the first flight's echo
            try:
                sock.recv(65536)
            except TimeoutError:
                break
        received = 0
        cpu = cpu_seconds(relay_pid)
        started = time.monotonic()
        deadline = started + seconds
        for _ in range(WINDOW):
            sock.send(payload)
        while (now := time.monotonic()) < deadline:
            try:
                received += len(sock.recv(65536))
                sock.send(payload)
            except TimeoutError:
                for _ in range(WINDOW):
                    sock.send(payload)
        cpu = cpu_seconds(relay_pid) - cpu
        return received / (now - started) / 1e6, received / cpu / 1e6


def sink(port: int) -> None:
    """A backend that reads and never answers: the allowed flows' replayed flights end here."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    while True:
        sock.recv(65536)


def udp_socket(port: int) -> tuple[int, int]:
    """(bytes waiting, datagrams dropped) of the UDP socket bound to 127.0.0.1:port, from the
    kernel's /proc/net/udp (rx_queue and drops)."""
    wanted = "0100007F:%04X" % port
    for _ in range(50):  # the listing comes a page at a time and can skip a line while sockets churn
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted:
                return int(fields[4].split(":")[1], 16), int(fields[-1])
    return 0, 0


def udp_packet(source: tuple[str, int], port: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet from `source` to 127.0.0.1:port, for a raw socket: the kernel fills in the
    IP checksum and ID (raw(7)); a zero UDP checksum means none, which IPv4 allows."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(source[0]), socket.inet_aton("127.0.0.1"))  # fmt: skip
    return header + struct.pack("!HHHH", source[1], port, 8 + len(payload), 0) + payload


def send_flights(port: int, flights: Resealed, seconds: float, first_flow: int) -> int:
    """New flows for `seconds`, each from its own source address and port (127.1.0.0/16, ports from
    1024 up, numbered from `first_flow`) and under its own connection ID, so no flow meets another's
    state; returns flows sent.
    The datagrams go out of one raw socket with those sources written in: one system call each, where
    a socket per flow would make the sender, not the gate, the bottleneck."""
    flows = 0
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        while time.monotonic() < deadline:
            for _ in range(16):  # 32 datagrams, ~74 KB of socket buffer: with 64 KB waiting, under 208 KB
                number = first_flow + flows
                source = ("127.1.%d.%d" % (number >> 8 & 255, number & 255), 1024 + (number >> 16) % 64000)
                for datagram in flights():
                    raw.sendto(udp_packet(source, port, datagram), ("127.0.0.1", 0))
                flows += 1
            while udp_socket(port)[0] > 64 * 1024:  # the gate is behind: a full buffer would drop half-flights
                time.sleep(0.0002)
    return flows


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children (the supervisor and its worker)."""
    total = 0
    children = Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split()
    for candidate in [pid, *map(int, children)]:
        fields = Path("/proc/%d/stat" % candidate).read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def quic_counts(admin: int) -> dict[str, float]:
    """The gate's QUIC decisions by action ("allow", "block") and its datagram drops by reason."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % admin, timeout=10) as answer:
        text = answer.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "icpgate_decisions_total" and sample.labels.get("kind") == "quic":
                key = sample.labels["action"]
            elif sample.name == "icpgate_quic_dropped_datagrams_total":
                key = "dropped " + sample.labels["reason"]
            else:
                continue
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def settled_counts(admin: int) -> dict[str, float]:
    """The counts once they have stopped moving (the worker publishes them about once a second)."""
    last, still_since = {}, time.monotonic()
    while True:
        now = quic_counts(admin)
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since > 1.5:
            return now
        time.sleep(0.25)


def initials_per_cpu_second(gate: subprocess.Popen, admin: int, port: int, name: str, seconds: float,
                            round_number: int) -> tuple[float, float]:  # fmt: skip
    """(decisions per CPU second of the gate, decisions per second of wall time) for flights of `name`.
    Flows left undecided (a datagram lost in a full socket buffer while the machine was busy) are
    reported: they cost the gate CPU without a decision, so the round's figure is a little low."""
    flights = Resealed(first_flight(name, chrome_sized=True))
    action = "allow" if name == FILED else "block"
    before, cpu_before, kernel_before = settled_counts(admin), cpu_seconds(gate.pid), udp_socket(port)[1]
    started = time.monotonic()
    sent = send_flights(port, flights, seconds, round_number << 20)
    wall = time.monotonic() - started
    after = settled_counts(admin)
    cpu = cpu_seconds(gate.pid) - cpu_before
    decided = after.get(action, 0.0) - before.get(action, 0.0)
    if decided < sent:
        drops = {key: value - before.get(key, 0.0) for key, value in after.items() if value > before.get(key, 0.0)}
        print("note: %d of %d flows undecided; the kernel dropped %d datagrams; the gate: %s"
              % (sent - decided, sent, udp_socket(port)[1] - kernel_before, drops), flush=True)  # fmt: skip
    return decided / cpu, decided / wall


# --- processes -------------------------------------------------------------------------------------------
def spawn(cpu: int, *command: str, log: Path | None = None) -> subprocess.Popen:
    out = log.open("w") if log else subprocess.DEVNULL
    return subprocess.Popen(["taskset", "-c", str(cpu), *command], stdout=out, stderr=out)


def gate_config(work: Path, ports: dict[str, int]) -> Path:
    """One worker; a quic listener to the echo origin (throughput) and one to the sink (Initials);
    blocked flows forgotten after a second and allowed ones after a quarter, so the flood of new flows
    keeps the table (and /proc/net/udp, which the sender reads for the backlog) small;
    the admin API for the decision counts."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "gate.toml"
    listeners = "".join(
        '[[listeners]]\naddress = "127.0.0.1"\nport = %d\nkind = "quic"\nbackend = "127.0.0.1:%d"\n' % pair
        for pair in ((ports["gate_bulk"], ports["echo"]), (ports["gate_initials"], ports["sink"]))
    )
    config.write_text(
        '[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "%s"\nreload_interval = 0\n[policy]\npack = "%s"\n'
        "[gate]\nworkers = 1\n[quic]\nblock_hold = 1.0\nidle_timeout = 0.25\n"
        "[admin]\nport = %d\n[dns]\nenabled = false\n%s"
        % (work / "registry.db", REPO / "policies" / "default.toml", ports["admin"], listeners)
    )
    subprocess.run([*ICPGATE, "import", str(SAMPLES), "-c", str(config)], check=True, capture_output=True)
    return config


def wait_admin(port: int, timeout: float = 60.0) -> None:
    """Until the gate answers on its admin port (its quic listeners are bound before it serves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/readyz" % port, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the gate did not become ready: see bench/out/quic/gate.log")


def warm_up(gate: subprocess.Popen, ports: dict[str, int]) -> None:
    """Until the gate decides flights on its quic listener (ready on the admin port is not yet bound
    on UDP), then half a second more of them: imports, caches and allocator warm."""
    flights = Resealed(first_flight(UNFILED, chrome_sized=True))
    deadline = time.monotonic() + 60
    while quic_counts(ports["admin"]).get("block", 0.0) == 0:
        if time.monotonic() > deadline or gate.poll() is not None:
            raise RuntimeError("the gate decides no QUIC flow: see bench/out/quic/gate.log")
        send_flights(ports["gate_initials"], flights, 0.1, 0xF00000)
        time.sleep(0.5)
    send_flights(ports["gate_initials"], flights, 0.5, 0xF80000)


def compare(rounds: int, measure: dict[str, Callable[[], tuple[float, float]]]) -> dict[str, dict]:
    """Each measurement `rounds` times, alternating: medians of (MB/s, MB per CPU second)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in measure}
    for _ in range(rounds):
        for name, run in measure.items():
            samples[name].append(run())
    return {
        "mb_per_second": {name: statistics.median(v[0] for v in values) for name, values in samples.items()},
        "mb_per_cpu_second": {name: statistics.median(v[1] for v in values) for name, values in samples.items()},
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--role", choices=["echo", "sink", "relay"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "echo":
        return echo(args.port)
    if args.role == "sink":
        return sink(args.port)
    if args.role == "relay":
        return uvloop.run(relay(args.port, args.backend))

    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        sys.exit("the Initials sender needs CAP_NET_RAW (run as root) for its raw socket")
    os.sched_setaffinity(0, {LOAD_CPU})
    work = OUT / "quic"
    me = [sys.executable, __file__]
    ports = {name: free_port() for name in ("echo", "sink", "relay", "gate_bulk", "gate_initials", "admin")}
    processes = [spawn(LOAD_CPU, *me, "--role", role, "--port", str(ports[role])) for role in ("echo", "sink")]
    try:
        relay_process = spawn(GATE_CPU, *me, "--role", "relay", "--port", str(ports["relay"]),
                              "--backend", str(ports["echo"]))  # fmt: skip
        processes.append(relay_process)
        config = gate_config(work, ports)
        gate = spawn(GATE_CPU, *ICPGATE, "run", "-c", str(config), "--log-level", "warning", log=work / "gate.log")
        processes.append(gate)
        wait_admin(ports["admin"])
        warm_up(gate, ports)
        rounds = range(args.rounds)
        initials = {
            name: [initials_per_cpu_second(gate, ports["admin"], ports["gate_initials"], name, args.seconds, n)
                   for n in rounds]
            for name in (UNFILED, FILED)
        }  # fmt: skip
        bulk = compare(args.rounds, {
            "relay": lambda: bulk_mbps(ports["relay"], relay_process.pid, args.seconds),
            "icpgate": lambda: bulk_mbps(ports["gate_bulk"], gate.pid, args.seconds),
        })  # fmt: skip
    finally:
        for process in reversed(processes):
            stop(process)
    results: dict[str, object] = {"seconds": args.seconds, "rounds": args.rounds, "initials": {}}
    print("$ python bench/quic_bench.py --seconds %g --rounds %d" % (args.seconds, args.rounds))
    for name, samples in initials.items():
        verdict = "allowed" if name == FILED else "blocked"
        per_cpu = statistics.median(cpu for cpu, _ in samples)
        per_wall = statistics.median(wall for _, wall in samples)
        results["initials"][verdict] = {"per_cpu_second": round(per_cpu), "per_second": round(per_wall),
                                        "samples": samples}  # fmt: skip
        print("%-45s %8.0f /CPU s (%5.1f µs each; %6.0f /s wall)  goal >= 15000"
              % ("QUIC Initials decided, %s, one core" % verdict, per_cpu, 1e6 / per_cpu, per_wall))  # fmt: skip
    ratios = {}
    for unit, figures in (("MB/s", bulk["mb_per_second"]), ("MB/CPU s", bulk["mb_per_cpu_second"])):
        ratios[unit] = round(figures["icpgate"] / figures["relay"], 2)
        print("%-45s relay %8.1f  icpgate %8.1f %-8s ratio %.2f (goal >= 0.7)"
              % ("QUIC allowed flow, bulk 1200 B datagrams", figures["relay"], figures["icpgate"], unit,
                 ratios[unit]))  # fmt: skip
    results |= {"bulk": bulk, "bulk_ratio": ratios}
    (OUT / "quic.json").write_text(json.dumps(results, indent=2))
    print("wrote %s" % (OUT / "quic.json"))


if __name__ == "__main__":
    main()
