"""Red-team findings on inline mode (issue 12), each a test that failed before its fix.

The namespace tests run the shipped ruleset and config.inline.example.toml (TPROXY, transparent
upstream, `auto` on every port) in tests/netnskit.py's three namespaces; the server is a socket
this process holds inside the server namespace, so a test sees exactly which connections reach it
and from which address and port.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import netnskit
import pytest
from netnskit import CLIENT4, CLIENT6, SERVER4, SERVER6

from conftest import REPO, SAMPLES, run_icpgate

INLINE_CONFIG = REPO / "config.inline.example.toml"
SERVER_FIRST_WAIT = 1.0  # the example's gate.server_first_wait
BANNER = b"220 redteam banner\r\n"
SERVICE_PORT = 2323
FAMILIES = {4: (socket.AF_INET, CLIENT4, SERVER4), 6: (socket.AF_INET6, CLIENT6, SERVER6)}


class PeerServer:
    """A server-first service in the server namespace that remembers the peer of every connection."""

    def __init__(self, net: netnskit.Topology, family: int, address: str, port: int) -> None:
        self.sock = net.socket(net.server, family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(64)
        self.peers: list[tuple[str, int]] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append((peer[0], peer[1]))
            self.held.append(conn)
            conn.sendall(BANNER)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class InlineGate:
    def __init__(self, net: netnskit.Topology, tmp: Path) -> None:
        self.net, self.tmp = net, tmp
        self.log_path = tmp / "gate.log"
        sets = [
            'registry.path="%s"' % (tmp / "registry.db"),
            'admin.metrics_dir="%s"' % (tmp / "metrics"),
            "gate.workers=1",
        ]  # one worker: the loop guard's set is per worker
        argv = [sys.executable, "-m", "icpgate", "run", "-c", str(INLINE_CONFIG)]
        argv += [arg for value in sets for arg in ("--set", value)]
        with self.log_path.open("w") as log:
            self.process = net.popen(net.gate, argv, stdout=log, stderr=log, start_new_session=True)
        net.wait_for_port(net.gate, "127.0.0.1", 8000, timeout=30, process=self.process)
        net.wait_for_port(net.gate, "::1", 8000, timeout=30, process=self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def inline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[netnskit.Topology, InlineGate]]:
    tmp = tmp_path_factory.mktemp("redteam-inline")
    imported = run_icpgate("import", str(SAMPLES), "-c", str(INLINE_CONFIG), "--set",
                           'registry.path="%s"' % (tmp / "registry.db"))  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    with netnskit.topology("icpr") as net:
        net.load_ruleset({})
        gate = InlineGate(net, tmp)
        try:
            yield net, gate
        finally:
            assert net.stop(gate.process, timeout=30) == 0
            assert "Traceback" not in gate.log(), gate.log()


def _banner(sock: socket.socket) -> bytes:
    sock.settimeout(SERVER_FIRST_WAIT + 5)
    try:
        return sock.recv(1024)
    except (ConnectionResetError, TimeoutError) as error:
        return type(error).__name__.encode()


@pytest.mark.parametrize("family", [4, 6])
def test_a_client_port_equal_to_one_of_our_upstream_ports_is_not_taken_for_a_loop(inline, family: int) -> None:
    """With upstream.source = "client" the gate's upstream connections use the client's address and a
    port the gate's kernel picked. The same client may well open another connection from that port
    to the same service (its own kernel, or the NAT in front of it, knows nothing of the gate's
    choice): that is a new client, not the gate dialling itself, and must be served. It was
    refused as a loop (aborted) before."""
    net, gate = inline
    kind, client, server_address = FAMILIES[family]
    server = PeerServer(net, kind, server_address, SERVICE_PORT + family)
    try:
        first = net.socket(net.client, kind)
        first.connect((server_address, SERVICE_PORT + family))
        assert _banner(first) == BANNER, gate.log()[-2000:]
        assert len(server.peers) == 1 and server.peers[0][0] == client  # transparent: the client's address
        upstream_port = server.peers[0][1]
        if upstream_port == first.getsockname()[1]:
            pytest.fail("the gate reused the client's own port; the test cannot tell the two apart")
        second = net.socket(net.client, kind)
        second.bind((client, upstream_port))  # the port the gate's upstream uses towards the same service
        second.connect((server_address, SERVICE_PORT + family))
        assert _banner(second) == BANNER, gate.log()[-2000:]
        assert len(server.peers) == 2
        first.close()
        second.close()
    finally:
        server.close()


@pytest.mark.parametrize("source", ["gate", "client"])
def test_the_gate_dialling_itself_is_refused_as_a_loop(tmp_path: Path, source: str) -> None:
    """The original destination is the gate itself (original_dst without NAT on loopback): its
    connection to itself is refused as a loop, and it still serves afterwards. Before, the guard
    never fired (the accept is seen before the connect that made it completes): the gate dialled
    itself about 10,000 times, until it ran out of file descriptors, and then answered 502. With
    upstream.source = "client" the guard must hold as well (a backend on this host)."""
    from adminkit import admin_request, metric, parse_metrics
    from gatekit import free_port, gate_config, listener, start_gate, wait_for_port
    from test_gate_process import http_get, status_of

    port, admin = free_port(), free_port()
    tables = {"admin": {"enabled": True, "address": "127.0.0.1", "port": admin}}
    config = gate_config(tmp_path, {"http": listener(port, "http")}, upstream='[upstream]\nsource = "%s"' % source,
                         tables=tables)  # fmt: skip
    gate = start_gate(config, {"http": port})
    try:
        wait_for_port(admin)
        assert status_of(http_get(port, "example-filed.cn")) in (0, 502)
        deadline, loops = time.monotonic() + 10, 0.0
        while not loops and time.monotonic() < deadline:
            time.sleep(0.2)
            loops = metric(parse_metrics(admin_request(admin, "/metrics")[2].decode()),
                           "icpgate_refused_connections_total", why="loop")  # fmt: skip
        assert loops >= 1
        connections = metric(parse_metrics(admin_request(admin, "/metrics")[2].decode()), "icpgate_connections_total",
                             kind="http")  # fmt: skip
        assert connections <= 3  # the client's, the gate's own (refused), nothing more
        assert status_of(http_get(port, "example-unfiled.cn")) == 403
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def test_other_protocols_block_applies_only_where_the_policy_enforces(tmp_path: Path, origin) -> None:
    """`policy.other_protocols = "block"` is a rule of the enforced destinations like the others
    (docs/gate.md: "the policy decides on the connection's destination as for every listener"):
    a destination in `enforce.exempt_ranges` (or outside `enforce.ranges` / `enforce.ports`) is
    relayed untouched whatever it speaks, as unfiled HTTP there is. Before, SSH to an exempt
    destination was closed and a server-first service there never got its banner through."""
    from gatekit import free_port, gate_config, listener, send_in_pieces, start_gate
    from test_gate_auto import BANNER as SMTP_BANNER
    from test_gate_auto import BannerServer
    from test_gate_http import exchange
    from test_gate_process import edit_pack
    from test_gate_tls import wait_for_record

    from conftest import copy_policies

    policies = copy_policies(tmp_path)
    pack = edit_pack(policies, "exempt_ranges = []", 'exempt_ranges = ["127.0.0.0/8"]')
    banner = BannerServer()
    ports = {"record": free_port(), "banner": free_port()}
    listeners = {"record": listener(ports["record"], "auto", origin.record_port),
                 "banner": listener(ports["banner"], "auto", banner.port)}  # fmt: skip
    config = gate_config(tmp_path, listeners, pack=pack, gate={"server_first_wait": 0.2})
    config.write_text(config.read_text().replace("[policy]\n", '[policy]\nother_protocols = "block"\n'))
    gate = start_gate(config, ports)
    try:
        answer = exchange(ports["record"], b"GET / HTTP/1.1\r\nHost: example-unfiled.cn\r\n\r\n")
        assert b"X-ICP-Gate" not in answer.partition(b"\r\n\r\n")[0]  # exempt: not the gate's block page
        before = len(origin.recorded())
        payload = b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(range(256))
        sock = send_in_pieces(ports["record"], payload, [])
        wait_for_record(origin, before, len(payload))
        sock.close()
        assert origin.recorded()[before] == payload
        silent = socket.create_connection(("127.0.0.1", ports["banner"]), timeout=5)
        assert silent.recv(1024) == SMTP_BANNER
        silent.close()
    finally:
        banner.close()
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


@pytest.mark.parametrize("family", [4, 6])
def test_a_client_address_is_not_limited_to_one_upstream_per_ephemeral_port(inline, family: int) -> None:
    """With upstream.source = "client" every upstream connection of one client address is bound to
    that address. Bound with port 0 alone, each took an ephemeral port for the address whatever
    its destination, so one busy address (a NAT, a proxy) had at most ip_local_port_range of them
    through the gate at once, and the next failed with EADDRINUSE. Here the range is two ports
    wide and the client holds three connections to three services: each must get its banner.
    (IP_BIND_ADDRESS_NO_PORT lets connect() choose the port per destination, as HAProxy does.)"""
    net, gate = inline
    kind, client, server_address = FAMILIES[family]
    ports = [SERVICE_PORT + 10 + 3 * family + offset for offset in range(3)]
    servers = [PeerServer(net, kind, server_address, port) for port in ports]
    key = "net.ipv4.ip_local_port_range"  # IPv6 uses the same range
    saved = net.run(net.gate, "sysctl", "-n", key).stdout.split()
    net.run(net.gate, "sysctl", "-qw", "%s=40000 40001" % key)
    clients = []
    try:
        for port in ports:
            sock = net.socket(net.client, kind)
            clients.append(sock)
            sock.connect((server_address, port))
            assert _banner(sock) == BANNER, (port, gate.log()[-2000:])
        assert all(server.peers and server.peers[0][0] == client for server in servers)
    finally:
        net.run(net.gate, "sysctl", "-qw", "%s=%s" % (key, " ".join(saved)))
        for sock in clients:
            sock.close()
        for server in servers:
            server.close()


@pytest.mark.parametrize("family", [4, 6])
def test_hosted_servers_can_still_open_connections_to_the_outside(inline, family: int) -> None:
    """A customer's server opens a connection out (package updates, APIs, outgoing mail): its SYN
    leaves the hosted range, and the answer (SYN-ACK, then the data) comes back to a hosted
    address on the server's ephemeral port. The ruleset steered every TCP packet to a hosted
    address and port to the gate, so the answer went to a listener, which reset it: no hosted
    server could open any connection while the gate ran (nor while it was down). Only new
    connections in (SYN) are steered; the rest of a connection the gate does not hold is routed."""
    net, _ = inline
    kind, client, server_address = FAMILIES[family]
    outside = net.socket(net.client, kind)
    outside.bind((client, 0))
    outside.listen(4)
    outside.settimeout(10)
    try:
        with net.socket(net.server, kind) as sock:
            sock.settimeout(10)
            sock.connect((client, outside.getsockname()[1]))
            accepted, peer = outside.accept()
            assert peer[0] == server_address
            with accepted:
                accepted.sendall(b"hello from outside\n")
                assert sock.recv(100) == b"hello from outside\n"
                sock.sendall(b"and back\n")
                assert accepted.recv(100) == b"and back\n"
    except (ConnectionRefusedError, ConnectionResetError, TimeoutError) as error:
        pytest.fail("the hosted server's outgoing connection failed: %r" % error)
    finally:
        outside.close()


def _queue_seq(sock: socket.socket) -> int:
    """The next sequence number `sock` expects from its peer (TCP_REPAIR; root only)."""
    tcp_repair, tcp_repair_queue, tcp_queue_seq, tcp_recv_queue = 19, 20, 21, 1
    sock.setsockopt(socket.IPPROTO_TCP, tcp_repair, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, tcp_repair_queue, tcp_recv_queue)
        return struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, tcp_queue_seq, 4))[0]
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, tcp_repair, 0)


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def _too_big(family: int, server: tuple[str, int], client: tuple[str, int], seq: int, mtu: int) -> bytes:
    """An ICMP "fragmentation needed" (ICMPv6 "packet too big") about a TCP segment from the hosted
    server's address to the client, as a router between them would send to the hosted address."""
    ports = struct.pack("!HHI", server[1], client[1], seq)
    if family == 4:
        inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1500, 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
                            socket.inet_aton(server[0]), socket.inet_aton(client[0])) + ports  # fmt: skip
        message = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + inner
        return message[:2] + struct.pack("!H", _checksum(message)) + message[4:]
    addresses = socket.inet_pton(socket.AF_INET6, server[0]) + socket.inet_pton(socket.AF_INET6, client[0])
    inner = struct.pack("!IHBB", 6 << 28, 1460, socket.IPPROTO_TCP, 64) + addresses
    return struct.pack("!BBHI", 2, 0, 0, mtu) + inner + ports  # the kernel fills in an ICMPv6 checksum


@pytest.mark.parametrize("family", [4, 6])
def test_path_mtu_errors_reach_the_gate_sockets_that_hold_the_connection(inline, family: int) -> None:
    """The gate holds the client's connection under the hosted server's address, so a router on the
    client's path that cannot forward the gate's segments sends its ICMP error (fragmentation
    needed, packet too big) to the hosted address. Routed on to the server, which holds no such
    connection, it was lost: the gate never lowered the path MTU and large answers stalled on such
    paths (a PMTU black hole). The ruleset must deliver ICMP errors about the gate's sockets to the
    gate, as it does their TCP and UDP packets."""
    net, _ = inline
    kind, client, server_address = FAMILIES[family]
    mtu = 1200 if family == 4 else 1300
    server = PeerServer(net, kind, server_address, SERVICE_PORT + 30 + family)
    try:
        sock = net.socket(net.client, kind)
        sock.connect((server_address, SERVICE_PORT + 30 + family))
        assert _banner(sock) == BANNER  # the gate's socket has sent; nothing of it is unacknowledged now
        seq = _queue_seq(sock)
        packet = _too_big(family, (server_address, SERVICE_PORT + 30 + family), sock.getsockname()[:2], seq, mtu)
        send = "import socket; socket.socket(%d, socket.SOCK_RAW, %d).sendto(bytes.fromhex(%r), (%r, 0))" % (
            kind,
            socket.IPPROTO_ICMP if family == 4 else socket.IPPROTO_ICMPV6,
            packet.hex(),
            server_address,
        )
        net.run(net.client, sys.executable, "-c", send)  # a raw socket of the client namespace
        deadline = time.monotonic() + 5
        cached = ""
        while "mtu %d" % mtu not in cached and time.monotonic() < deadline:
            time.sleep(0.1)
            cached = net.run(net.gate, "ip", "-%d" % family, "route", "show", "cache", client).stdout
        assert "mtu %d" % mtu in cached, cached
        sock.close()
    finally:
        server.close()


@pytest.mark.parametrize("line", [b"GET ?\r\n", b"GET ?x=1\r\n"])
def test_an_http_0_9_request_apache_serves_is_not_relayed_as_another_protocol(tmp_path: Path, line: bytes) -> None:
    """Apache serves HTTP/0.9 by default (HttpProtocolOptions Allow0.9), and `GET ?` gets its
    default virtual host: no Host, no check. The classifier took the two-word line for another
    protocol (no `/`, `*` or `scheme://` target) and an `auto` listener relayed it untouched."""
    import trustme
    from backends import start_apache
    from gatekit import free_port, gate_config, listener, start_gate
    from test_gate_auto import _served

    from icpgate.gate.sniff import Protocol, Sniffer

    apache = start_apache(tmp_path, ["example-unfiled.cn"], trustme.CA())
    port = free_port()
    gate = start_gate(gate_config(tmp_path, {"auto": listener(port, "auto", apache.http)}), {"auto": port})
    try:
        assert b"served" in _served(apache.http, line)  # Apache itself serves it
        answer = _served(port, line)
        assert b"served" not in answer and answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    finally:
        apache.stop()
        assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()
    sniffer = Sniffer(32768)
    assert (sniffer.feed(line) or sniffer.at_end()) is Protocol.HTTP
