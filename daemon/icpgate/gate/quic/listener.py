"""QUIC listeners: decide each UDP flow on the SNI of its Initial packets, then relay it or drop it.

A flow (one client 4-tuple, gate/quic/flows.py) starts with a v1 or v2 Initial. Its datagrams are held
while `InitialReassembler` collects the ClientHello; the SNI then goes through the same
`Runtime.decide` as TLS over TCP. Allowed: a connected UDP socket to the backend is opened, the held
datagrams are replayed byte-exact, and from then on datagrams are relayed one by one both ways.
Blocked: the flow's datagrams are dropped for `quic.block_hold`, so a browser falls back to TCP,
where the gate shows the block page. Everything else is dropped and counted by reason: fail closed.

What a relayed flow's client may still send is checked where it could open another connection at
the server: until the client leaves its Initial phase every Initial must repeat the decided hello,
or carry a second one for the same host after a HelloRetryRequest (`InitialReassembler.verify`);
afterwards a long-header packet must be addressed to a connection ID the client or the server chose
for this connection, and may not be an Initial, except as the first packet of a new connection
(to an ID of neither): the client's socket then carries its next connection, so the old flow ends
and the new one is decided as any first flow is. After a server's Retry the client's next hello is
held and decided afresh (the server read nothing of the first); a Version Negotiation ends the flow,
so the client's next attempt is decided afresh too.

A server reassembles a hello from every Initial that reaches its connection, from any address; the
gate decides on the bytes the server will read only if those Initials all come through one flow.
So each connection ID, at its server, belongs to one flow (cids.py): an Initial of another flow
that names it is dropped (`cid_in_use`). Within the flow, `InitialReassembler` holds every CRYPTO
byte to one value and every packet number to the one any receiver would decode.

Descriptors: each relayed flow holds an upstream socket. A listener may hold at most its share of
what the open-file limit leaves beside the TCP listeners' `gate.max_connections` (`upstream_share`);
past it, and past its share of `quic.max_flows`, the oldest flow whose client has not answered from
its address is pushed out (flows.py), so spoofed Initials cannot take what real clients need.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import socket
import time
from bisect import bisect_left

from ...config.settings import ListenerConfig, QuicConfig
from ...policy.decide import Action, Verdict
from ...telemetry.identity import process_name
from ...telemetry.latency import BUCKETS
from ..blockpage import new_request_id
from ..connection import Listener, Runtime
from ..upstream import Address, UpstreamResolver
from .cids import ConnectionIds
from .flows import BLOCKED, MAX_CIDS, PENDING, RELAY, Flow, FlowKey, FlowTable, TableFull
from .initial import (
    HANDSHAKE_PACKET,
    INITIAL,
    MIN_INITIAL_DATAGRAM,
    PACKET_TYPES,
    RETRY,
    SCHEDULES,
    VERSION_NEGOTIATION,
    InitialReassembler,
    QuicError,
    QuicState,
    long_headers,
    peek_version,
)
from .sockets import (
    ANCILLARY_SPACE,
    MAX_DATAGRAM,
    MAX_REPLY_SOCKETS,
    ReplySockets,
    ask_destination,
    destination_of,
    is_ip_literal,
    open_upstream,
    source_option,
)

log = logging.getLogger("icpgate.gate")
KIND = "quic"
MAX_LITERALS = 65536
BATCH = 64  # datagrams read per wakeup of a socket, so one busy socket cannot starve the others
OTHER_DESCRIPTORS = 256  # listening sockets, admin connections, logs, metric files, databases, DNS

# Runtime.stats keys (telemetry/metrics.py turns them into icpgate_quic_* metrics)
FROM_CLIENT = ("quic_datagrams", "from_client")
TO_UPSTREAM = ("quic_datagrams", "to_upstream")
FROM_UPSTREAM = ("quic_datagrams", "from_upstream")
TO_CLIENT = ("quic_datagrams", "to_client")
DROP_REASONS = (
    "unknown_flow",  # not an Initial, and no flow for its 4-tuple
    "unknown_version",  # a version the gate cannot decrypt, and rules.quic_unknown_version = "block"
    "invalid",  # an Initial that cannot be decrypted or read, or a datagram a relayed flow may not send
    "inspect_timeout",  # held while the hello stayed incomplete past gate.inspect_timeout
    "blocked",  # of a blocked flow, during its hold
    "table_full",  # a new flow past quic.max_flows
    "loop",  # the gate's own upstream datagram come back to it (original_dst without TPROXY)
    "pending_full",  # held by a pending flow pushed out, or past the bytes a flow may hold
    "upstream_error",  # the backend cannot be reached or its socket refused the datagram
    "client_error",  # the socket towards the client refused the datagram
    "cid_in_use",  # an Initial of a new flow to a connection ID another flow holds (cids.py)
)
DROPS = {reason: ("quic_drops", reason) for reason in DROP_REASONS}
INITIAL_SECONDS = "quic_initial_seconds"
EVICTED = ("quic_evicted_flows",)  # relayed flows whose client had not answered, pushed out to make room
NEW_CONNECTION = "an Initial of a new connection"  # (key, bucket index) counts; (key,) the sum


def upstream_share(max_connections: int, listeners: int) -> int:
    """The upstream sockets one of `listeners` quic listeners may hold: what the open-file limit
    leaves beside two descriptors per TCP connection (`gate.max_connections`) and OTHER_DESCRIPTORS,
    split evenly, so that no listener, TCP or QUIC, is left without the descriptors it needs. When
    the limit cannot even cover the TCP side (the supervisor warns at start), QUIC still gets an
    eighth of it rather than nothing."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(soft // 8, soft - 2 * max_connections - OTHER_DESCRIPTORS) // max(1, listeners)


def serves_quic() -> bool:
    """Whether this process serves the `quic` listeners: the first worker only. The workers share
    each listening socket, and a flow's datagrams must all reach the one worker that holds its state;
    without SO_REUSEPORT (process/listen.py says why) only one reader per socket can guarantee that."""
    return process_name() in (None, "0")


class QuicListener(Listener):
    """One `kind = "quic"` UDP socket and its flows. `resolver` is replaced on reload, as for TCP."""

    def __init__(self, runtime: Runtime, config: ListenerConfig, resolver: UpstreamResolver, sock: socket.socket,
                 quic: QuicConfig, *, cids: ConnectionIds | None = None, listeners: int = 1) -> None:  # fmt: skip
        """`cids` is the worker's, shared by its `listeners` quic listeners, which split `quic.max_flows`
        and the descriptors `upstream_share` leaves evenly."""
        super().__init__(runtime, config, resolver)
        self.sock = sock
        self.quic = quic
        self.loop = asyncio.get_running_loop()
        self.table = FlowTable(max(16, quic.max_flows // listeners), runtime.stats)
        self.cids = cids or ConnectionIds(quic.idle_timeout)
        self.local: Address = sock.getsockname()[:2]
        share = upstream_share(runtime.gate.max_connections, listeners)  # max_connections as at start: a reload
        # may change it, but descriptors taken cannot be given back
        self.replies = None
        if config.transparent:  # its reply sockets come out of the same share
            self.replies = ReplySockets(self.loop, self._read, max(1, min(MAX_REPLY_SOCKETS, share // 8)))
            share -= self.replies.limit
        self.max_upstreams = share  # upstream sockets held at once
        self.upstreams = 0
        # a wildcard-bound listener names each reply's source address (see sockets.source_option)
        self.wildcard = not config.transparent and ipaddress.ip_address(self.local[0]).is_unspecified
        # bound to one address, not transparent: every datagram it reads was sent to `local`
        self.fixed = not config.transparent and not self.wildcard
        # (local address, backend) of each upstream socket: a datagram from the one to the other is our own
        self.own: set[tuple[Address, Address]] = set()
        self._buffer = memoryview(bytearray(MAX_DATAGRAM))
        self._literals: set[str] = set()  # backend hosts known to be IP literals (parsing one costs microseconds)
        self._names: dict[str, str] = {}  # backend names resolved, see _backend
        self._resolving: set[str] = set()
        self.closed = False

    def start(self) -> None:
        if self.max_upstreams < self.table.max_flows:
            log.warning("%s: the open-file limit leaves it %d upstream sockets, below its %d of quic.max_flows: "
                        "past them, relayed flows whose client has not answered are pushed out",
                        self.config.name, self.max_upstreams, self.table.max_flows)  # fmt: skip
        if self.config.proxy_protocol:
            log.warning("%s: proxy_protocol does not apply to QUIC (the backend reads QUIC datagrams); not sent",
                        self.config.name)  # fmt: skip
        if self.fixed:
            self.loop.add_reader(self.sock.fileno(), self._read_fixed)
        else:
            ask_destination(self.sock)
            self.loop.add_reader(self.sock.fileno(), self._read, self.sock, self.local)

    def close(self) -> None:
        """Stop: the socket is closed and every flow forgotten (QUIC has no graceful hand-over)."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for flow in list(self.table.flows.values()):
            self._remove(flow)
        if self.replies is not None:
            self.replies.close()

    # --- from clients ---------------------------------------------------------------------------
    def _read(self, sock: socket.socket, fallback: Address) -> None:
        """Datagrams from clients, on the listening socket or a reply socket (see ReplySockets)."""
        view = self._buffer
        stats = self.runtime.stats
        now = self.loop.time()
        for _ in range(BATCH):
            try:
                size, ancdata, _flags, peer = sock.recvmsg_into((view,), ANCILLARY_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for something the socket sent: nothing to read
                continue
            stats[FROM_CLIENT] += 1
            destination = destination_of(ancdata) or fallback
            self._datagram(bytes(view[:size]), (peer[0], peer[1], destination[0], destination[1]), now)

    def _read_fixed(self) -> None:
        """As `_read`, for a listener with one address (`fixed`): no control message to ask for and
        parse, which is a third of the cost of reading a datagram."""
        sock = self.sock
        view = self._buffer
        stats = self.runtime.stats
        now = self.loop.time()
        address, port = self.local
        for _ in range(BATCH):
            try:
                size, peer = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for something the socket sent: nothing to read
                continue
            stats[FROM_CLIENT] += 1
            self._datagram(bytes(view[:size]), (peer[0], peer[1], address, port), now)

    def _datagram(self, data: bytes, key: FlowKey, now: float) -> None:
        flow = self.table.flows.get(key)
        if flow is None:
            self._first(data, key, now)
            return
        if flow.state == RELAY:
            self._to_upstream(flow, data, now)
        elif flow.state == PENDING:
            flow.last_seen = now
            self._inspect(flow, data, now)
        else:
            self._drop("blocked")

    def _first(self, data: bytes, key: FlowKey, now: float) -> None:
        """A datagram of no known flow: only an Initial of a version the gate reads opens one. The
        cheap checks come before any state is made."""
        if self.own and ((key[0], key[1]), (key[2], key[3])) in self.own:
            self.runtime.stats["refused_loop"] += 1
            self._drop("loop")
            return
        version = peek_version(data)
        if version is None:
            self._drop("unknown_flow")
            return
        types = PACKET_TYPES.get(version)
        if types is None:
            if version == 0:
                self._drop("invalid")
            elif self.runtime.policy.pack.quic_unknown_version is Action.ALLOW:
                self._pass_unknown(data, key, version, now)
            else:
                self._drop("unknown_version")
            return
        if types[(data[0] >> 4) & 3] != INITIAL:
            self._drop("unknown_flow")
            return
        if len(data) < MIN_INITIAL_DATAGRAM:
            self._drop("invalid")
            return
        dcid = data[6 : 6 + data[5]]
        server = self.resolver.backend_for((key[2], key[3])) or (key[2], key[3])
        if self.cids.taken((dcid, server), None, now):
            self._drop("cid_in_use")
            return
        flow = self._admit(key, InitialReassembler(self.runtime.gate.max_hello_size), now)
        if flow is None:
            return
        flow.version = version
        flow.dcid, flow.server = dcid, server
        flow.cids.add(dcid)
        self.cids.claim((dcid, server), flow)
        flow.timer = self.loop.call_at(now + self.runtime.gate.inspect_timeout, self._on_timer, flow)
        self._inspect(flow, data, now)

    def _admit(self, key: FlowKey, reader: InitialReassembler | None, now: float) -> Flow | None:
        table = self.table
        try:
            while (victim := table.victim()) is not None:
                if victim.state == RELAY:
                    self._evict(victim)
                else:
                    self._remove(victim, "pending_full")
        except TableFull:
            self._drop("table_full")
            return None
        flow = Flow(key, reader, now)
        table.add(flow)
        return flow

    def _pass_unknown(self, data: bytes, key: FlowKey, version: int, now: float) -> None:
        """rules.quic_unknown_version = "allow": the flow is relayed unread (nothing to decide on)."""
        self.runtime.stats["quic_unknown_version",] += 1
        flow = self._admit(key, None, now)
        if flow is None:
            return
        flow.version = version
        flow.held = [data]
        self._open(flow)

    def _inspect(self, flow: Flow, data: bytes, now: float) -> None:
        table = self.table
        while (victim := table.hold(flow, data)) is not None:
            self._remove(victim, "pending_full")
            if victim is flow:
                self._drop("pending_full")
                return
        started = time.perf_counter()
        result = flow.reader.feed(data)
        state = result.state
        if state is QuicState.NEED_MORE:
            flow.cost += time.perf_counter() - started
            return
        if state is not QuicState.COMPLETE or result.version != flow.version:
            log.debug("quic %s:%d: %s", flow.client[0], flow.client[1], result.error or "another version")
            self._remove(flow, "invalid")
            return
        verdict = self._decide(flow, result.sni)
        self._observe(flow.cost + time.perf_counter() - started)
        if verdict.action is Action.ALLOW:
            self._open(flow)
        else:
            self._block(flow, verdict, now)

    def _decide(self, flow: Flow, sni: str | None) -> Verdict:
        """As GateConnection.decide: the same policy, cache, modes, counts and violation records."""
        runtime = self.runtime
        started = time.perf_counter()
        verdict = runtime.decide(sni, flow.destination, KIND, None)
        runtime.latency.observe(time.perf_counter() - started)
        runtime.stats["decisions", KIND, verdict.action, verdict.reason] += 1
        if verdict.passed:  # a block let through by monitor mode or a stale feed: still a violation
            runtime.record_violation(verdict, "", KIND, flow.client, flow.destination, blocked=False)
        return verdict

    def _observe(self, seconds: float) -> None:
        stats = self.runtime.stats
        stats[INITIAL_SECONDS, bisect_left(BUCKETS, seconds)] += 1
        stats[INITIAL_SECONDS,] += seconds

    def _block(self, flow: Flow, verdict: Verdict, now: float) -> None:
        runtime = self.runtime
        runtime.stats["blocks", KIND, verdict.reason] += 1
        runtime.record_violation(verdict, new_request_id(), KIND, flow.client, flow.destination, blocked=True)
        self._drop("blocked", len(flow.held))
        flow.held = []
        flow.reader = None
        self._close_upstream(flow)  # a flow blocked after a Retry had one
        self.table.set_state(flow, BLOCKED)
        self._rearm(flow, now + self.quic.block_hold)

    # --- allowed flows --------------------------------------------------------------------------
    def _open(self, flow: Flow) -> None:
        """Connect the flow's own upstream socket (unless it has one: a hello read again after a
        Retry) and replay what the client sent so far."""
        held = flow.held
        if flow.upstream is None and not (self._make_room(flow) and self._connect(flow)):
            return
        self.table.set_state(flow, RELAY)
        flow.relayed = True
        flow.held = []
        reader = flow.reader
        if reader is not None:
            flow.cids.add(reader.dcid)
            reader.cids = flow.cids
        self._rearm(flow, flow.last_seen + self.quic.idle_timeout)
        for datagram in held:
            self._send_upstream(flow, datagram)

    def _make_room(self, flow: Flow) -> bool:
        """A descriptor for the flow's upstream socket, within the listener's share: the oldest
        unproven flows are pushed out for it. False (the flow is forgotten, counted) when every
        socket is a proven flow's."""
        while self.upstreams >= self.max_upstreams:
            victim = self.table.oldest_unproven()
            if victim is None:
                self._remove(flow, "table_full")
                return False
            self._evict(victim)
        return True

    def _evict(self, flow: Flow) -> None:
        """Push out a relayed flow whose client has not answered from its address: its later
        datagrams find no flow. Its connection IDs stay barred to other flows (cids.py)."""
        self.runtime.stats[EVICTED] += 1
        self._remove(flow)

    def _connect(self, flow: Flow) -> bool:
        """Open the flow's upstream socket and its way back to the client; False (the flow is
        forgotten, counted) when there is none to be had."""
        try:
            flow.upstream = self._upstream(flow)
            if flow.upstream is not None:
                if self.replies is not None and flow.destination != self.local:
                    flow.reply = self.replies.take(flow.destination)
                elif self.wildcard:
                    flow.source = source_option(flow.destination)
        except OSError as error:
            log.debug("quic %s:%d: cannot relay to the backend: %s", flow.client[0], flow.client[1], error)
            self.runtime.stats["upstream_failures", KIND] += 1
            self._remove(flow, "upstream_error")
            return False
        upstream = flow.upstream
        if upstream is None:
            self._remove(flow, "upstream_error")
            return False
        self.upstreams += 1
        flow.ends = (upstream.getsockname()[:2], upstream.getpeername()[:2])
        self.own.add(flow.ends)
        self.loop.add_reader(upstream.fileno(), self._from_upstream, flow)
        return True

    def _upstream(self, flow: Flow) -> socket.socket | None:
        """The flow's connected socket to its backend, or None (counted) when there is none to use."""
        backend = self.resolver.backend_for(flow.destination)
        if backend is None:
            self.runtime.stats["upstream_errors", "no_backend"] += 1
            return None
        address = self._backend(backend)
        if address is None:
            return None
        source = (flow.client[0], 0) if self.resolver.source == "client" else None
        return open_upstream(address, source)

    def _backend(self, backend: Address) -> Address | None:
        """An IP literal for the backend. A name is looked up in the background the first time it is
        needed (the flow waiting for it is dropped; the client's retransmission finds it) and kept."""
        host, port = backend
        if host in self._literals:
            return backend
        if is_ip_literal(host):
            if len(self._literals) >= MAX_LITERALS:
                self._literals.clear()  # original destinations across a large hosted range: start afresh
            self._literals.add(host)
            return backend
        address = self._names.get(host)
        if address is not None:
            return address, port
        if host not in self._resolving:
            self._resolving.add(host)
            self.loop.create_task(self._resolve(host, port))
        return None

    async def _resolve(self, host: str, port: int) -> None:
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            self._names[host] = infos[0][4][0]
        except (OSError, IndexError) as error:
            log.warning("quic backend %s: cannot resolve it: %s", host, error)
        finally:
            self._resolving.discard(host)

    def _to_upstream(self, flow: Flow, data: bytes, now: float) -> None:
        """Relay a client datagram the flow may send. A dropped one does not keep the flow alive."""
        if not data:  # no QUIC packet is empty
            self._drop("invalid")
            return
        if flow.reader is not None or data[0] & 0x80:
            problem = self._client_problem(flow, data)
            if problem is NEW_CONNECTION:
                # the client's socket starts another connection (a NAT reusing the port, a fixed-port
                # client): the old one is over for the gate, and this one is decided as a new flow's
                self._remove(flow)
                self._first(data, flow.key, now)
                return
            if problem:
                log.debug("quic %s:%d: dropped: %s", flow.client[0], flow.client[1], problem)
                self._drop("invalid")
                return
        if not flow.proven and self._answers(flow, data):
            self.table.prove(flow)
        flow.last_seen = now
        self._send_upstream(flow, data)

    @staticmethod
    def _answers(flow: Flow, data: bytes) -> bool:
        """Whether the client sends to a connection ID the server chose (a Retry's, or its own in
        its first packets): it learnt it from a datagram sent to its address, so it is there."""
        if data[0] & 0x80:
            if len(data) < 6:
                return False
            dcid = data[6 : 6 + data[5]]
            return dcid != flow.dcid and dcid in flow.cids
        return any(data[1 : 1 + len(cid)] == cid for cid in flow.cids if cid != flow.dcid)

    def _client_problem(self, flow: Flow, data: bytes) -> str:
        """Why a relayed flow's client may not send this datagram, or ''. `NEW_CONNECTION`: past its
        Initial phase, the client opens another connection (an Initial first, to an unknown ID)."""
        reader = flow.reader
        if reader is not None:
            problem = reader.verify(data)
            if not problem and reader.left_initial:
                flow.reader = None  # the client has dropped its Initial keys: no Initial may follow
            return problem
        if flow.version not in SCHEDULES:
            return ""  # an unknown version passed by the pack: nothing the gate can read
        try:
            packets = long_headers(data, flow.version)
        except QuicError as error:
            return str(error)
        for index, (kind, dcid, _) in enumerate(packets):
            if kind == INITIAL:
                if not index and dcid not in flow.cids:
                    return NEW_CONNECTION
                return "an Initial after the client's Initial phase"
            if dcid not in flow.cids:
                return "a long-header packet to a connection ID of another connection"
        return ""

    def _send_upstream(self, flow: Flow, data: bytes) -> None:
        try:
            flow.upstream.send(data)
        except OSError:  # a full buffer, or an ICMP error from the backend's earlier answer
            self._drop("upstream_error")
            return
        runtime = self.runtime
        runtime.stats[TO_UPSTREAM] += 1
        runtime.bytes_to_upstream += len(data)

    # --- from backends --------------------------------------------------------------------------
    def _from_upstream(self, flow: Flow) -> None:
        sock = flow.upstream
        view = self._buffer
        stats = self.runtime.stats
        now = self.loop.time()
        for _ in range(BATCH):
            try:
                size = sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP unreachable: the backend is not listening (the client will give up)
                stats["upstream_failures", KIND] += 1
                return
            stats[FROM_UPSTREAM] += 1
            data = bytes(view[:size])
            if data and data[0] & 0x80 and flow.version in SCHEDULES and not self._server_long_header(flow, data):
                return
            flow.last_seen = now
            self._to_client(flow, data)

    def _server_long_header(self, flow: Flow, data: bytes) -> bool:
        """Learn the connection IDs the server chose; follow a Retry. False: the flow is over."""
        try:
            packets = long_headers(data, flow.version)
        except QuicError:
            return True  # the client's stack judges the server's packets
        for kind, _, scid in packets:
            if kind == HANDSHAKE_PACKET:
                flow.settled = True  # the server has read the whole hello: no other bytes can change its name
            if kind == VERSION_NEGOTIATION:
                self._to_client(flow, data)
                self._remove(flow)  # the client's next Initial, in another version, is decided anew
                return False
            if kind == RETRY and flow.state == RELAY and flow.reader is not None:
                self._retry(flow)
            if len(flow.cids) < MAX_CIDS and scid not in flow.cids:
                flow.cids.add(scid)
                self.cids.claim((scid, flow.server), flow)
        return True

    def _retry(self, flow: Flow) -> None:
        """The server answered the first hello with a Retry, so it read nothing of it: the client's next
        Initials, under keys from the Retry's connection ID, carry the hello the server will read
        (the same one, RFC 9000 §17.2.5.2, though aioquic's client makes a new one). It is held and
        decided afresh, as a new flow's, and relayed over the same upstream socket: the Retry token
        is bound to that socket's address."""
        flow.reader = InitialReassembler(self.runtime.gate.max_hello_size, min_dcid=0)  # the server's ID
        flow.cost = 0.0
        self.table.set_state(flow, PENDING)
        self._rearm(flow, self.loop.time() + self.runtime.gate.inspect_timeout)

    def _to_client(self, flow: Flow, data: bytes) -> None:
        """From the address the client sent to: the reply socket (TPROXY), IP_PKTINFO (a wildcard
        listener), or simply the listener's own."""
        try:
            if flow.source:
                self.sock.sendmsg((data,), flow.source, 0, flow.client)
            else:
                (flow.reply or self.sock).sendto(data, flow.client)
        except OSError:
            self._drop("client_error")
            return
        self.runtime.stats[TO_CLIENT] += 1
        self.runtime.bytes_to_client += len(data)

    # --- timers and ends ------------------------------------------------------------------------
    def _rearm(self, flow: Flow, when: float) -> None:
        if flow.timer is not None:
            flow.timer.cancel()
        flow.timer = self.loop.call_at(when, self._on_timer, flow)

    def _on_timer(self, flow: Flow) -> None:
        """One timer per flow: the inspection deadline, the block hold, or idleness."""
        flow.timer = None
        if self.table.flows.get(flow.key) is not flow:
            return
        now = self.loop.time()
        if flow.state == PENDING:
            self.runtime.stats["inspect_timeouts", KIND] += 1
            self._remove(flow, "inspect_timeout")
        elif flow.state == BLOCKED:
            self._remove(flow)
        elif now - flow.last_seen >= self.quic.idle_timeout:
            self.runtime.stats["idle_timeouts", KIND] += 1
            self._remove(flow)
        else:
            flow.timer = self.loop.call_at(flow.last_seen + self.quic.idle_timeout, self._on_timer, flow)

    def _remove(self, flow: Flow, drop_reason: str = "") -> None:
        """Forget a flow; its held datagrams, if any, are dropped and counted under `drop_reason`."""
        if not self.table.remove(flow):
            return
        if flow.cids:
            keys = [(cid, flow.server) for cid in flow.cids]
            self.cids.release(keys, flow, flow.relayed and not flow.settled, self.loop.time())
        if drop_reason and flow.held:
            self._drop(drop_reason, len(flow.held))
        flow.held = []
        flow.reader = None
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        self._close_upstream(flow)
        if flow.reply is not None:
            self.replies.release(flow.destination)
            flow.reply = None

    def _close_upstream(self, flow: Flow) -> None:
        if flow.upstream is not None:
            self.loop.remove_reader(flow.upstream.fileno())
            flow.upstream.close()
            flow.upstream = None
            self.upstreams -= 1
            self.own.discard(flow.ends)

    def _drop(self, reason: str, count: int = 1) -> None:
        self.runtime.stats[DROPS[reason]] += count
