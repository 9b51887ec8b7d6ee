"""One accepted connection: inspect, then relay untouched or block. Shared by HTTP and TLS.

asyncio Protocols, not streams: no task per connection on the block path, no copies beyond what
the transports make. The upstream is opened only once a connection (or its first request) has
been allowed, so a blocked connection never reaches a backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config.settings import GateConfig, ListenerConfig
from ..policy.decide import Action, Mode, Policy, Reason, Verdict
from ..telemetry.latency import LatencyHistogram
from .block_log import BlockLog
from .blockpage import BlockPages
from .relayed_table import RelayedTable
from .upstream import (
    Address,
    SourceError,
    UpstreamResolver,
    connect_from_client,
    is_local_address,
    original_destination,
    proxy_header,
    report_once,
)
from .violation_table import ViolationTable

PENDING_LIMIT = 256 * 1024  # client bytes held while the upstream connects; reading pauses above it
_LINGER_RESET = struct.pack("ii", 1, 0)


DECISION_CACHE_SIZE = 4096
# Allowed decisions that say the name is filed with our access: site inspection's sign (gate/relayed_table.py).
RELAYED_REASONS = frozenset({Reason.FILED, Reason.ACCESS_PENDING})


@dataclass
class Runtime:
    """One worker's shared state. `policy` and `pages` are replaced whole on reload."""

    policy: Policy
    pages: BlockPages
    gate: GateConfig
    tls_pages: object | None = None  # a TlsBlockPages when the pack's TLS action is "page"
    other_protocols: str = "pass"  # policy.other_protocols: `auto` listeners' clients that speak neither TLS nor HTTP
    violations: ViolationTable = field(default_factory=lambda: ViolationTable(100_000, False))
    relayed: RelayedTable = field(default_factory=lambda: RelayedTable(100_000))
    block_log: BlockLog = field(default_factory=lambda: BlockLog(1.0, 100.0))
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    bytes_to_upstream: int = 0
    bytes_to_client: int = 0
    connections: set[GateConnection] = field(default_factory=set)
    # The connections of `connections` nothing of whose has been relayed yet (silent, or still
    # sending their first request head or hello), oldest first. They give way to newcomers, oldest
    # first: beyond gate.max_undecided, and when max_connections is reached. So clients that never
    # say anything can hold neither the slots that decided traffic needs nor a newcomer's.
    undecided: OrderedDict[GateConnection, None] = field(default_factory=OrderedDict)
    stats: Counter = field(default_factory=Counter)
    # Told the number of open connections after each accept (process/balance.py): a worker above
    # its share of them stops accepting for a while. None with one worker.
    on_accept: Callable[[int], None] | None = None
    # Told the number after each close: a burst that follows many closes is shared on true counts.
    on_close: Callable[[int], None] | None = None
    # (local, remote) of our own upstream connections. An accepted connection whose (peer, local)
    # is one of them is the gate connecting to itself (original_dst without NAT), refused before
    # it loops. The whole 4-tuple: the kernel reuses a local port towards other destinations, so
    # a client may legitimately come from a port one of our upstream connections also uses.
    own_connections: set[tuple[Address, Address]] = field(default_factory=set)
    # "enforce", or the feed's stale_mode ("monitor", "open") once the registry is past max_staleness.
    # Policy.applied combines it with gate.enforcement and the pack's monitor_ranges.
    stale_mode: str = "enforce"
    # (gate.enforcement, monitor_ranges) the worker last logged, so it logs each change once
    monitoring: tuple = ("enforce", ())
    _decisions: dict[tuple, Verdict] = field(default_factory=dict)
    # the (policy, index, index generation, stale mode) the cache belongs to
    _decisions_for: tuple[object, object, int, str] = (None, None, -1, "")

    def decide(self, host: str | None, dst: Address, kind: str, path: str | None) -> Verdict:
        """`Policy.decide`, then `Policy.applied` in the mode in force, remembered per (host,
        destination, kind) while policy, index and the feed's mode stay.

        Both are pure functions of those, so a remembered verdict is the one they would give; a
        reload brings new objects, a commit to the shared index a new generation, an expired feed
        a new stale mode, and so an empty cache. The ACME exception makes the path matter too, so
        with it on, plain HTTP is not remembered. A block a mode let through is counted per call.
        """
        policy = self.policy
        index = policy.index
        generation = index.generation()
        cached_for = self._decisions_for
        if (cached_for[0] is not policy or cached_for[1] is not index or cached_for[2] != generation
                or cached_for[3] != self.stale_mode):  # fmt: skip
            self._decisions = {}
            self._decisions_for = (policy, index, generation, self.stale_mode)
        if policy.pack.acme_http01 and kind == "http":
            verdict = self._decided(policy, host, dst, kind, path)
        else:
            key = (host, dst, kind)
            verdict = self._decisions.get(key)
            if verdict is None:
                if len(self._decisions) >= DECISION_CACHE_SIZE:
                    self._decisions = {}  # junk hosts must not grow memory; popular hosts come back at once
                verdict = self._decisions[key] = self._decided(policy, host, dst, kind, path)
        if verdict.mode is not Mode.ENFORCE:
            self.stats["relaxed", verdict.mode, verdict.reason] += 1
        return verdict

    def _decided(self, policy: Policy, host: str | None, dst: Address, kind: str, path: str | None) -> Verdict:
        verdict = policy.decide(host, dst[0], dst[1], kind, path)
        if verdict.action is Action.BLOCK and (policy.monitors or self.stale_mode != "enforce"):
            return policy.applied(verdict, dst[0], self.stale_mode)  # only blocks, only when a mode may lift them
        if verdict.reason in RELAYED_REASONS and verdict.action is Action.ALLOW:
            self.relayed.add(verdict.host, dst[0], time.time())
        return verdict

    def forget_decisions(self) -> None:
        """Empty the decision cache at the next decision, so each name in use is decided, and its
        relay recorded, once more: the worker calls it when it writes the relayed names out."""
        self._decisions_for = (None, None, -1, "")

    def apply_mode(self, verdict: Verdict, dst: Address) -> Verdict:
        """`Policy.applied` in the mode in force, counting what it lets through, for a block a gate
        makes itself that monitor mode may lift (policy.other_protocols)."""
        verdict = self.policy.applied(verdict, dst[0], self.stale_mode)
        if verdict.passed:
            self.stats["relaxed", verdict.mode, verdict.reason] += 1
        return verdict

    def evict_undecided(self) -> None:
        """Close the oldest undecided connection, to make room for a new one."""
        connection, _ = self.undecided.popitem(last=False)
        self.connections.discard(connection)
        self.stats["evicted", connection.kind] += 1
        connection.evicted()

    def record_violation(self, verdict: Verdict, request_id: str, kind: str, client: Address, destination: Address,
                         *, blocked: bool) -> None:  # fmt: skip
        """Count a block, or a block a mode let through (`verdict.passed`), in the violation table,
        and log it, sampled. For every gate, TCP or UDP."""
        self.violations.add(verdict.host, destination[0], destination[1], kind, verdict.reason, client[0], blocked,
                            time.time())  # fmt: skip
        self.block_log.blocked(verdict, request_id or "-", kind, client, destination)


class Listener:
    """What the connections of one listening socket share."""

    def __init__(self, runtime: Runtime, config: ListenerConfig, resolver: UpstreamResolver) -> None:
        self.runtime = runtime
        self.config = config
        self.resolver = resolver


class UpstreamProtocol(asyncio.Protocol):
    """The backend side of a relay: everything is handed to the owning connection."""

    __slots__ = ("owner", "transport")

    def __init__(self, owner: GateConnection) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.owner.from_upstream(data)

    def eof_received(self) -> bool:
        return self.owner.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_client_reading("upstream-full")

    def resume_writing(self) -> None:
        self.owner.resume_client_reading("upstream-full")


class GateConnection(asyncio.Protocol):
    """Client side. Subclasses implement `inspect` (bytes before the relay is open) and blocking."""

    kind = ""
    __slots__ = (
        "__weakref__",
        "_client_eof",
        "_client_write_closed",
        "_closing",
        "_connect_task",
        "_deadline",
        "_last_activity",
        "_pending",
        "_read_pauses",
        "_timer",
        "_undecided",
        "_upstream_ends",
        "_upstream_eof",
        "_upstream_write_closed",
        "client",
        "destination",
        "listener",
        "local",
        "loop",
        "runtime",
        "transport",
        "upstream",
    )  # fmt: skip

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.runtime = listener.runtime
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client: Address = ("", 0)
        self.destination: Address = ("", 0)
        self.local: Address = ("", 0)  # the accepted socket's own address (the loop guard's key)
        self.upstream: asyncio.Transport | None = None
        self._upstream_write_closed = False  # the client's EOF: passed on, or due once connected
        self._connect_task: asyncio.Task | None = None
        self._pending = bytearray()  # for the upstream, until it is connected
        self._read_pauses: set[str] = set()
        self._client_eof = False
        self._client_write_closed = False  # the backend's EOF was passed on: nothing more can be written
        self._upstream_eof = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        # Inspection must finish by this time; once closing, the final answer must be written by it.
        self._deadline: float | None = None
        self._last_activity = 0.0
        self._upstream_ends: tuple[Address, Address] | None = None
        self._undecided = False  # in runtime.undecided: accepted, nothing of the client's relayed yet

    # --- client transport callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        runtime = self.runtime
        runtime.stats["connections", self.kind] += 1
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.client = (peer[0], peer[1])
        self.local = (local[0], local[1])
        if (self.client, self.local) in runtime.own_connections:
            runtime.stats["refused_loop"] += 1
            transport.abort()
            return
        runtime.connections.add(self)
        if runtime.on_accept is not None:
            runtime.on_accept(len(runtime.connections))
        runtime.undecided[self] = None
        self._undecided = True
        gate = runtime.gate
        while len(runtime.undecided) > gate.max_undecided:  # more than one after a reload lowered it
            runtime.evict_undecided()
        if len(runtime.connections) > gate.max_connections:
            if len(runtime.undecided) > 1:  # an older one has yet to say anything: it gives way
                runtime.evict_undecided()
            else:  # every other slot carries decided traffic
                runtime.stats["refused_full"] += 1
                self.refuse_full()
                return
        sock = transport.get_extra_info("socket")
        destination = original_destination(sock.fileno(), sock.family) if sock is not None else None
        self.destination = destination or self.local
        self._last_activity = self.loop.time()
        self._set_deadline(runtime.gate.inspect_timeout)

    def data_received(self, data: bytes) -> None:
        self._last_activity = self.loop.time()
        self.inspect(data)

    def eof_received(self) -> bool:
        self._client_eof = True
        self._half_closed()
        if self.upstream is None and self._connect_task is None:
            # EOF before the inspection finished: nothing was allowed, nothing to relay.
            self.inspection_ended_early()
            return False
        self.close_upstream_writes()
        if self._upstream_eof:
            self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        runtime = self.runtime
        runtime.connections.discard(self)
        if runtime.on_close is not None:
            runtime.on_close(len(runtime.connections))
        if self._undecided:
            self.runtime.undecided.pop(self, None)
        self._cancel_timer()
        if self._connect_task is not None:
            self._connect_task.cancel()
        if self.upstream is not None:
            if exc is None:
                self.upstream.close()
            else:
                self.upstream.abort()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- hooks for subclasses ---------------------------------------------------------------
    def inspect(self, data: bytes) -> None:
        raise NotImplementedError

    def inspection_timed_out(self) -> None:
        raise NotImplementedError

    def inspection_ended_early(self) -> None:
        self.close()

    def refuse_full(self) -> None:
        self.close()

    def upstream_failed(self) -> None:
        self.close()

    def on_upstream_data(self, data: bytes) -> None:
        self.transport.write(data)

    # --- relay ------------------------------------------------------------------------------
    def decide(self, host: str | None, path: str | None = None) -> Verdict:
        runtime = self.runtime
        started = time.perf_counter()
        verdict = runtime.decide(host, self.destination, self.kind, path)
        runtime.latency.observe(time.perf_counter() - started)
        self.count_decision(verdict)
        if verdict.passed:  # a block let through by monitor mode or a stale feed: still a violation
            self.record_violation(verdict, "", blocked=False)
        return verdict

    def count_decision(self, verdict: Verdict) -> None:
        self.runtime.stats["decisions", self.kind, verdict.action, verdict.reason] += 1

    def record_violation(self, verdict: Verdict, request_id: str, *, blocked: bool = True) -> None:
        """Count a block (or a block a mode let through) in the violation table and log it, sampled."""
        self.runtime.record_violation(verdict, request_id, self.kind, self.client, self.destination, blocked=blocked)

    def inspection_done(self) -> None:
        """Inspection passed: from here on the idle timeout governs the connection."""
        self._deadline = None

    def send_upstream(self, data: bytes) -> None:
        """Forward client bytes, opening the upstream connection on first use. Only allowed bytes
        come here: the first makes the connection a decided one."""
        if self._undecided:
            self._undecided = False
            self.runtime.undecided.pop(self, None)
        self.runtime.bytes_to_upstream += len(data)
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self._pending += data
        if len(self._pending) > PENDING_LIMIT:
            self.pause_client_reading("connecting")
        if self._connect_task is None:
            self._connect_task = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        if (self.client, self.local) in self.runtime.own_connections:
            # Our own connection, which connection_made could not know yet: the loop sees the
            # accept before the connect that made it completes. Its first bytes (or the server-first
            # timer) come only after that, so it is caught here before it dials again.
            self._connect_task = None
            self.runtime.stats["refused_loop"] += 1
            self.abort()
            return
        backend = self.listener.resolver.backend_for(self.destination)
        if backend is None:
            self.runtime.stats["upstream_errors", "no_backend"] += 1
            self.upstream_failed()
            return
        try:
            transport, _ = await asyncio.wait_for(self._open_upstream(backend), self.runtime.gate.connect_timeout)
        except (TimeoutError, OSError) as error:
            if isinstance(error, SourceError):
                report_once(error)
            self.runtime.stats["upstream_errors", getattr(error, "cause", type(error).__name__)] += 1
            if not self._closing:
                self.upstream_failed()
            return
        finally:
            self._connect_task = None
        if self._closing or self.transport is None or self.transport.is_closing():
            transport.abort()
            return
        source, remote = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        # From the client's address, a connection of ours is looped back only to a backend on this host.
        if source and remote and (self.listener.resolver.source != "client" or is_local_address(remote[0])):
            self._upstream_ends = ((source[0], source[1]), (remote[0], remote[1]))
            self.runtime.own_connections.add(self._upstream_ends)
        self.upstream = transport
        if self.listener.config.proxy_protocol:
            transport.write(proxy_header(self.listener.config.proxy_protocol, self.client, self.destination))
        if self._pending:
            transport.write(bytes(self._pending))
            self._pending.clear()
        self.resume_client_reading("connecting")
        if self._upstream_write_closed and transport.can_write_eof():
            transport.write_eof()

    async def _open_upstream(self, backend: Address) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Connect from the gate's address, or (upstream.source = "client") from the client's."""
        if self.listener.resolver.source == "client":
            sock = await connect_from_client(self.loop, self.client, backend)
            return await self.loop.create_connection(lambda: UpstreamProtocol(self), sock=sock)
        return await self.loop.create_connection(lambda: UpstreamProtocol(self), backend[0], backend[1])

    def close_upstream_writes(self) -> None:
        """Pass the client's EOF on to the backend now, or as soon as the connection to it is up."""
        self._upstream_write_closed = True
        if self.upstream is not None and self.upstream.can_write_eof():
            self.upstream.write_eof()

    def from_upstream(self, data: bytes) -> None:
        self._last_activity = self.loop.time()
        self.runtime.bytes_to_client += len(data)
        self.on_upstream_data(data)

    def upstream_eof(self) -> bool:
        self._upstream_eof = True
        self._half_closed()
        if self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
            self._client_write_closed = True
        if self._client_eof:
            self.close()
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        if self._upstream_ends is not None:
            self.runtime.own_connections.discard(self._upstream_ends)
        self.upstream = None
        if self.transport is None or self.transport.is_closing():
            return
        if exc is not None:
            self.transport.abort()
        else:
            self.transport.close()

    def pause_client_reading(self, reason: str) -> None:
        if not self._read_pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._read_pauses.add(reason)

    def resume_client_reading(self, reason: str) -> None:
        if reason not in self._read_pauses:
            return
        self._read_pauses.discard(reason)
        if not self._read_pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- ending -----------------------------------------------------------------------------
    def reply_and_close(self, data: bytes) -> None:
        """Send a final answer; the close waits for it to be written (the idle timer bounds that)."""
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            if not self._client_write_closed:
                self.transport.write(data)
            self.transport.close()
            self._set_deadline(self.runtime.gate.inspect_timeout)
        if self.upstream is not None:
            self.upstream.close()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as the clouds do for blocked TLS."""
        self._closing = True
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.transport.abort()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.close()

    def evicted(self) -> None:
        """Closed to make room (Runtime.evict_undecided), which has already forgotten it."""
        self._undecided = False
        self.abort()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
        if self.upstream is not None:
            self.upstream.abort()

    # --- timers ---------------------------------------------------------------------------
    def _set_deadline(self, seconds: float) -> None:
        self._deadline = self.loop.time() + seconds
        if self._timer is None or self._timer.when() > self._deadline:
            self._cancel_timer()
            self._timer = self.loop.call_later(seconds, self._on_timer)

    def _on_timer(self) -> None:
        """One timer per connection: the phase deadline while inspecting or closing, else idleness."""
        self._timer = None
        if self.transport is None:
            return
        now = self.loop.time()
        gate = self.runtime.gate
        if self._deadline is not None:
            if now < self._deadline:
                self._timer = self.loop.call_later(self._deadline - now, self._on_timer)
                return
            self._deadline = None
            if self._closing:  # a final answer the client never read
                self.abort()
                return
            self.runtime.stats["inspect_timeouts", self.kind] += 1
            self.inspection_timed_out()
            if self._closing and self._deadline is None:
                self._set_deadline(gate.inspect_timeout)
            elif self._timer is None and not self._closing:
                self._timer = self.loop.call_later(gate.idle_timeout, self._on_timer)
            return
        if self._closing:
            return
        limit = self._idle_limit()
        idle = now - self._last_activity
        if idle >= limit:
            self.runtime.stats["idle_timeouts", self.kind] += 1
            self.abort()
            return
        self._timer = self.loop.call_later(limit - idle, self._on_timer)

    def _idle_limit(self) -> float:
        """Once either side has finished (EOF), the other gets the shorter half-close timeout."""
        gate = self.runtime.gate
        if self._client_eof or self._upstream_eof:
            return min(gate.idle_timeout, gate.half_close_timeout)
        return gate.idle_timeout

    def _half_closed(self) -> None:
        """Bring the timer forward to the half-close limit (it may be set for the idle timeout)."""
        if self._deadline is None and not self._closing:
            self._cancel_timer()
            self._timer = self.loop.call_later(self._idle_limit(), self._on_timer)

    def restart_inspect_deadline(self) -> None:
        """A new HTTP request head has begun: it must be complete within the inspection timeout."""
        self._set_deadline(self.runtime.gate.inspect_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
