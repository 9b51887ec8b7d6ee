"""The QUIC flow table: one entry per client 4-tuple, bounded in entries and in held bytes.

Flows are keyed by (client address, client port, destination address, destination port): a QUIC
connection changes its IDs inside encrypted frames the gate cannot read (RFC 9312 §2). The IDs a
server finds the connection by are bound to the flow apart from this table (cids.py). A flow is
`PENDING` while its ClientHello is incomplete (its datagrams are held for replay), `RELAY` once
allowed, `BLOCKED` for the hold period after a block.

A relayed flow is *unproven* until its client sends a packet to a connection ID the server chose:
that ID went only to the client's address, so a client that uses it receives there. One Initial
replayed from spoofed addresses, or Initials made up by the thousand (their keys are public), make
relayed flows whose clients never answer; each holds an upstream socket. So unproven flows are
the ones that make room: they are pushed out, oldest first, when the table or the listener's
descriptors run short, and a client whose address answers is never pushed out by them.

The table only keeps the books; the gate (gate/quic/listener.py) does the I/O and closes what the table
gives back to it. Limits, so that a flood of Initials from spoofed addresses cannot grow memory:
- `max_flows` entries in all. A blocked entry only saves work (a blocked client's retransmissions
  would be blocked again anyway), so it is the first to go when the table is full, then the oldest
  pending flow, then the oldest unproven one; a new flow is refused only when proven flows fill it.
- `max_pending` flows in inspection, at most half the table, and `max_held` bytes held by all of
  them: past either, the oldest pending flow makes room. A real client completes its hello within a
  round trip, so under a flood of incomplete hellos it is the flood's flows that are old.
"""

from __future__ import annotations

import socket
from asyncio import TimerHandle
from collections import Counter, OrderedDict

from ..upstream import Address
from .initial import InitialReassembler

PENDING = "pending"
RELAY = "relay"
BLOCKED = "blocked"
FLOWS = {state: ("quic_flows", state) for state in (PENDING, RELAY, BLOCKED)}
UNPROVEN = ("quic_unproven_flows",)  # relayed flows among FLOWS[RELAY] whose client has not answered
MAX_HELD_PER_FLOW = 64 * 1024  # a 16 KiB ClientHello fits in ~15 full-sized datagrams
MAX_PENDING = 4096
MAX_HELD = 16 * 1024 * 1024
MAX_CIDS = 8  # connection IDs a server announces in its long headers (Retry, Initial, Handshake)

FlowKey = tuple[str, int, str, int]


class Flow:
    """One client 4-tuple's state. `reader` stays after the decision until the client leaves its
    Initial phase: until then every Initial it sends must carry the hello that was decided (gate/quic/listener.py)."""

    __slots__ = (
        "cids",
        "client",
        "cost",
        "dcid",
        "destination",
        "ends",
        "held",
        "held_bytes",
        "key",
        "last_seen",
        "proven",
        "reader",
        "relayed",
        "reply",
        "server",
        "settled",
        "source",
        "state",
        "timer",
        "upstream",
        "version",
    )

    def __init__(self, key: FlowKey, reader: InitialReassembler | None, now: float) -> None:
        self.key = key
        self.client: Address = (key[0], key[1])
        self.destination: Address = (key[2], key[3])
        self.state = PENDING
        self.reader = reader
        self.held: list[bytes] = []  # client datagrams, as received, for replay once allowed
        self.held_bytes = 0
        self.upstream: socket.socket | None = None
        self.reply: socket.socket | None = None  # what answers the client; None: the listener's socket
        self.source: list | None = None  # the IP_PKTINFO that makes a wildcard listener answer from the right address
        self.ends: tuple[Address, Address] | None = None  # the upstream socket's (local address, backend)
        self.cids: set[bytes] = set()  # Destination Connection IDs the client may use: its first, the server's
        self.dcid = b""  # the client's first Destination Connection ID
        self.server: Address = self.destination  # the backend, as configured: the connection IDs are bound there
        self.relayed = False  # a datagram of it went to the backend
        self.proven = False  # its client sent to a connection ID the server chose: it receives at its address
        self.settled = False  # the server sent a Handshake packet: it has read the whole ClientHello
        self.last_seen = now  # last datagram either way (held or relayed: one dropped does not count)
        self.timer: TimerHandle | None = None
        self.version = 0  # the QUIC version of its first Initial
        self.cost = 0.0  # seconds spent reading its Initials so far


class FlowTable:
    __slots__ = (
        "blocked",
        "counts",
        "flows",
        "held_bytes",
        "max_flows",
        "max_held",
        "max_pending",
        "pending",
        "unproven",
    )

    def __init__(
        self, max_flows: int, counts: Counter, max_pending: int = MAX_PENDING, max_held: int = MAX_HELD
    ) -> None:
        self.max_flows = max_flows
        self.max_pending = min(max_pending, max_flows // 2)  # a flood of hellos leaves room for the rest
        self.max_held = max_held
        self.flows: dict[FlowKey, Flow] = {}
        # In order of arrival and of blocking: the oldest first. OrderedDicts, because a plain dict's
        # first item is found by skipping the slots of every item deleted before it.
        self.pending: OrderedDict[FlowKey, Flow] = OrderedDict()
        self.blocked: OrderedDict[FlowKey, Flow] = OrderedDict()
        self.unproven: OrderedDict[FlowKey, Flow] = OrderedDict()  # relayed, in order of relaying
        self.held_bytes = 0
        self.counts = counts  # ("quic_flows", state) -> flows: the worker's stats, shared by its QUIC listeners

    def get(self, key: FlowKey) -> Flow | None:
        return self.flows.get(key)

    def victim(self) -> Flow | None:
        """The flow to remove before a new one may enter, or None when there is room. Raises
        `TableFull` when the table holds only proven relayed flows, which may not be pushed out."""
        if len(self.pending) >= self.max_pending:
            return next(iter(self.pending.values()))
        if len(self.flows) < self.max_flows:
            return None
        for kept in (self.blocked, self.pending, self.unproven):
            if kept:
                return next(iter(kept.values()))
        raise TableFull

    def oldest_unproven(self) -> Flow | None:
        """The relayed flow to push out when the listener's upstream sockets run short."""
        return next(iter(self.unproven.values()), None)

    def prove(self, flow: Flow) -> None:
        """Its client answered from its address: the flow is no longer pushed out to make room."""
        flow.proven = True
        self._forget_unproven(flow)

    def add(self, flow: Flow) -> None:
        self.flows[flow.key] = flow
        self.pending[flow.key] = flow
        self.counts[FLOWS[PENDING]] += 1

    def hold(self, flow: Flow, datagram: bytes) -> Flow | None:
        """Keep a pending flow's datagram. Returns a flow to remove first (the oldest pending one, maybe
        this one) when the bytes held would pass a cap; the datagram is then not kept."""
        size = len(datagram)
        if flow.held_bytes + size > MAX_HELD_PER_FLOW:
            return flow
        if self.held_bytes + size > self.max_held:
            return next(iter(self.pending.values()))
        flow.held.append(datagram)
        flow.held_bytes += size
        self.held_bytes += size
        return None

    def _release(self, flow: Flow) -> None:
        self.held_bytes -= flow.held_bytes
        flow.held_bytes = 0

    def set_state(self, flow: Flow, state: str) -> None:
        """PENDING -> RELAY or BLOCKED; RELAY -> PENDING when a server's Retry makes the client send
        its hello again, to be read anew. The held datagrams are the caller's (replayed or dropped)."""
        counts = self.counts
        counts[FLOWS[flow.state]] -= 1
        counts[FLOWS[state]] += 1
        if flow.state == PENDING:
            del self.pending[flow.key]
            self._release(flow)
        elif flow.state == RELAY:
            self._forget_unproven(flow)
        flow.state = state
        if state == BLOCKED:
            self.blocked[flow.key] = flow
        elif state == PENDING:
            self.pending[flow.key] = flow
        elif not flow.proven:
            self.unproven[flow.key] = flow
            counts[UNPROVEN] += 1

    def _forget_unproven(self, flow: Flow) -> None:
        if self.unproven.pop(flow.key, None) is flow:
            self.counts[UNPROVEN] -= 1

    def remove(self, flow: Flow) -> bool:
        """Forget the flow; False if it was gone already."""
        if self.flows.get(flow.key) is not flow:
            return False
        del self.flows[flow.key]
        self.counts[FLOWS[flow.state]] -= 1
        if flow.state == PENDING:
            del self.pending[flow.key]
            self._release(flow)
        elif flow.state == BLOCKED:
            del self.blocked[flow.key]
        else:
            self._forget_unproven(flow)
        return True


class TableFull(Exception):
    """`max_flows` proven relayed flows: a new flow must be dropped."""
