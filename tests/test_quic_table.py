"""The QUIC flow table under Initials from spoofed addresses: a filed client is still served, the
table stays bounded, and the descriptors of the other listeners stay theirs.

Filed names are public and Initial keys derive from the packet itself, so anyone can send valid
filed Initials: one replayed from thousands of addresses, or thousands made up. Sources here are
loopback addresses 127.66.x.y (Linux accepts all of 127/8 as its own) that never answer, as spoofed
ones cannot. The gate runs under an open-file limit of 1,024 (as a unit could set it) in front of
aioquic's HTTP/3 origin, with an HTTP listener beside its QUIC one, and a real aioquic client and
HTTP clients come after the flood.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adminkit import admin_request, metric, parse_metrics
from gatekit import Gate, free_port, gate_config, listener, wait_for_port
from h3kit import H3Origin, free_udp_port, h3_get, h3_origin
from test_gate_process import http_get, status_of
from test_quic_flood import rss_kb
from test_quic_gate import one_initial, wait_listening

FILED = "www.example-filed.cn"
NOFILE = 1024
MAX_CONNECTIONS = 128  # the TCP side keeps 2 x 128 + 256 descriptors: the QUIC listener may hold 512
QUIC_SHARE = NOFILE - 2 * MAX_CONNECTIONS - 256
SOURCES = 2000  # more relayed flows than the descriptors allow


def start_limited_gate(tmp: Path, http_backend: int, quic_backend: int, max_flows: int, nofile: int = NOFILE) -> Gate:
    """`icpgate run` under an open-file limit of `nofile`, an http listener and a quic one, admin API on."""
    ports = {"http": free_port(), "quic": free_udp_port(), "admin": free_port()}
    listeners = {"http": listener(ports["http"], "http", http_backend),
                 "quic": listener(ports["quic"], "quic", quic_backend)}  # fmt: skip
    tables = {"admin": {"enabled": True, "port": ports["admin"]}, "quic": {"max_flows": max_flows}}
    config = gate_config(tmp, listeners, gate={"max_connections": MAX_CONNECTIONS}, tables=tables)
    log_path = config.with_suffix(".log")
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "icpgate", "run", "-c", str(config)], stdout=log,
                                   stderr=log, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                                     (nofile, nofile)))  # fmt: skip
    gate = Gate(config, ports, process, log_path)
    wait_for_port(ports["http"])
    wait_for_port(ports["admin"])
    assert wait_listening(gate), gate.log()
    return gate


def spoof(port: int, datagrams: list[bytes]) -> None:
    """Each datagram from an address of its own, which then goes away: nothing answers there."""
    for number, datagram in enumerate(datagrams):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.66.%d.%d" % (number >> 8, number & 255), 0))
            sock.sendto(datagram, ("127.0.0.1", port))
        if number % 50 == 49:
            time.sleep(0.01)  # within what the gate's socket buffer holds


def metrics(gate: Gate) -> dict:
    status, _, body = admin_request(gate.ports["admin"], "/metrics")
    assert status == 200
    return parse_metrics(body.decode())


def descriptors(gate: Gate) -> int:
    return len(os.listdir("/proc/%d/fd" % gate.process.pid))


@pytest.fixture
def h3(certs: dict[str, Path]):
    """The HTTP/3 origin. The flood's hellos are hand-made (no signature algorithms aioquic takes):
    it refuses each at once, and its warning for each is not kept."""
    quiet = logging.getLogger("quic")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with h3_origin(certs["server"], certs["key"]) as running:
        yield running
    quiet.setLevel(level)


def test_one_initial_replayed_from_many_addresses(tmp_path: Path, origin, h3: H3Origin, certs) -> None:
    """Replays share the first one's connection ID: they are dropped before any state is made, and a
    table of 64 flows (a test-sized quic.max_flows) still takes a real client."""
    gate = start_limited_gate(tmp_path, origin.http, h3.port, max_flows=64)
    try:
        port = gate.ports["quic"]
        spoof(port, [one_initial(FILED)] * SOURCES)
        time.sleep(1.0)
        answer = h3_get(FILED, port, certs["ca"], timeout=5)
        assert answer is not None and answer.status == 200, gate.log()
        time.sleep(1.2)  # the worker syncs its metrics every second
        samples = metrics(gate)
        assert metric(samples, "icpgate_quic_flows") <= 2  # the replayed one and the real client's
        assert metric(samples, "icpgate_quic_dropped_datagrams_total", reason="cid_in_use") >= SOURCES - 100
        assert metric(samples, "icpgate_quic_dropped_datagrams_total", reason="table_full") == 0
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log()


def test_made_up_initials_cannot_take_the_descriptors(tmp_path: Path, origin, h3: H3Origin, certs) -> None:
    """2,000 different filed Initials from 2,000 addresses, each a flow the gate relays, under an
    open-file limit of 1,024: the QUIC listener keeps to its share of descriptors by pushing out
    its oldest unanswered flows, so HTTP clients, the admin API and a real QUIC client are served."""
    gate = start_limited_gate(tmp_path, origin.http, h3.port, max_flows=100_000)
    try:
        port = gate.ports["quic"]
        spoof(port, [one_initial(FILED) for _ in range(SOURCES)])
        time.sleep(1.0)
        held = descriptors(gate)
        unproven = metric(metrics(gate), "icpgate_quic_unproven_flows")
        # HTTP clients of the other listener, several at once, and the admin API answer
        clients = [socket.create_connection(("127.0.0.1", gate.ports["http"]), timeout=5) for _ in range(50)]
        for sock in clients:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % FILED.encode())
        for sock in clients:
            assert sock.recv(100).startswith(b"HTTP/1.1 200"), gate.log()[-2000:]
            sock.close()
        assert status_of(http_get(gate.ports["http"], FILED)) == 200
        answer = h3_get(FILED, port, certs["ca"], timeout=5)
        assert answer is not None and answer.status == 200
        time.sleep(1.2)
        after = metrics(gate)
    finally:
        assert gate.stop() == 0
    log = gate.log()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
    assert held <= NOFILE - 2 * MAX_CONNECTIONS, held  # the TCP side's descriptors stayed free
    assert 0 < unproven <= QUIC_SHARE
    assert metric(after, "icpgate_quic_evicted_flows_total") > SOURCES // 2
    assert metric(after, "icpgate_quic_dropped_datagrams_total", reason="upstream_error") == 0


def test_a_relayed_flow_costs_a_few_kilobytes(tmp_path: Path, origin, h3: H3Origin) -> None:
    """The memory a relayed flow holds, unanswered (as each flow of a spoofed flood is), once the
    decision is made: its entry, its decided hello, its upstream socket's objects. Measured as the
    worker's resident memory over 4,000 such flows, after 1,000 to warm the allocator up."""
    gate = start_limited_gate(tmp_path, origin.http, h3.port, max_flows=100_000, nofile=8192)
    try:
        port = gate.ports["quic"]
        warm, measured = [one_initial(FILED) for _ in range(1000)], [one_initial(FILED) for _ in range(4000)]
        spoof(port, warm)
        time.sleep(1.2)
        before, flows_before = rss_kb(gate.process.pid), metric(metrics(gate), "icpgate_quic_flows", state="relay")
        spoof(port, measured)
        time.sleep(1.2)
        after, flows = rss_kb(gate.process.pid), metric(metrics(gate), "icpgate_quic_flows", state="relay")
        evicted = metric(metrics(gate), "icpgate_quic_evicted_flows_total")
    finally:
        assert gate.stop() == 0
    # every flow held (nothing pushed out), but for datagrams a busy kernel dropped: enough to measure
    assert evicted == 0 and flows - flows_before > len(measured) // 2
    per_flow = (after - before) / (flows - flows_before)
    print("%.2f KB per relayed flow" % per_flow)
    assert per_flow < 6.5, "%.2f KB per relayed flow" % per_flow
