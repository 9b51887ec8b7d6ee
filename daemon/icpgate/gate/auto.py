"""`auto` listeners: every port. The client's first bytes decide which gate takes the connection.

An `AutoConnection` accepts, counts and guards the connection like any other (max_connections,
the loop guard), reads the client's first bytes with `sniff.Sniffer`, and then hands the
transport over (`transport.set_protocol`) to the connection a `tls` or `http` listener would have
made, or to an `OtherConnection`, which relays or blocks per `policy.other_protocols`. From then
on that connection is the only owner: it is in `runtime.connections` instead, it re-arms the
connection's timer, and an upstream already open is handed over with it.

A client that sends nothing for `gate.server_first_wait` may be waiting for the server (SSH, SMTP,
MySQL): the upstream is connected and the server's bytes reach the client. The client's own
bytes are still classified whenever they come, and nothing the client sent is relayed before
that; a request or a hello blocked then closes the upstream too, which never saw a byte of it.
A server-first client answers the banner; one that has sent nothing within
`gate.server_first_timeout` of its accept never will, and is closed (with its upstream): a silent
client costs no more than a slowloris on any other listener. Until its first byte is relayed it is
also one of the worker's undecided connections (`Runtime.undecided`), which give way to newcomers.
"""

from __future__ import annotations

import asyncio

from ..policy.decide import Action, Reason, Verdict
from .blockpage import new_request_id
from .connection import GateConnection, Listener, Runtime
from .http.connection import HttpConnection
from .sniff import Protocol, Sniffer
from .tls.connection import TlsConnection
from .upstream import Address

# The per-connection state a handover moves: all of GateConnection's (what connection_made found,
# the upstream, flow control, half-close flags, timers), whatever the subclass adds on its own.
_STATE = tuple(name for name in GateConnection.__slots__ if name != "__weakref__")
# policy.other_protocols = "block"; monitor mode lets it through like the policy's other host rules.
OTHER_BLOCK = Verdict(Action.BLOCK, Reason.NO_HOST, "policy.other_protocols", "")


def not_enforced(runtime: Runtime, destination: Address) -> Verdict | None:
    """The policy's verdict when `destination` is outside enforcement (enforce.ranges, ports,
    exempt_ranges): other protocols are relayed there as every protocol is, whatever
    policy.other_protocols says. None on an enforced destination."""
    verdict = runtime.policy.decide(None, destination[0], destination[1], "other")
    return verdict if verdict.reason is Reason.NOT_ENFORCED else None


class OtherConnection(GateConnection):
    """Neither TLS nor HTTP: relayed untouched, or blocked, per `policy.other_protocols`."""

    kind = "other"
    __slots__ = ("_decided",)

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener)
        self._decided = False

    def inspect(self, data: bytes) -> None:
        if not self._decided:
            self._decided = True
            runtime, destination = self.runtime, self.destination
            if runtime.other_protocols == "pass":
                verdict = OTHER_BLOCK._replace(action=Action.ALLOW)
            else:
                verdict = not_enforced(runtime, destination) or runtime.apply_mode(OTHER_BLOCK, destination)
            self.count_decision(verdict)
            if verdict.passed:
                self.record_violation(verdict, "", blocked=False)
            elif verdict.action is Action.BLOCK:
                self.runtime.stats["blocks", self.kind, verdict.reason] += 1
                self.record_violation(verdict, new_request_id())
                self.close()
                return
            self.inspection_done()
        self.send_upstream(data)

    def inspection_timed_out(self) -> None:
        self.close()


_GATES: dict[Protocol, type[GateConnection]] = {
    Protocol.TLS: TlsConnection,
    Protocol.HTTP: HttpConnection,
    Protocol.OTHER: OtherConnection,
}


class AutoConnection(GateConnection):
    kind = "auto"
    __slots__ = ("_eof_pending", "_handover", "_silence", "_sniffer")

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener)
        self._sniffer = Sniffer(self.runtime.gate.max_header_size)
        # server_first_wait, then server_first_timeout, until the client's first byte
        self._silence: asyncio.TimerHandle | None = None
        self._handover: type[GateConnection] | None = None  # decided while the server-first connect runs
        self._eof_pending = False  # the client's EOF came with that decision

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if transport.is_closing():  # refused: the loop guard, or max_connections
            return
        # Nothing to inspect yet: the inspection deadline runs from the first byte, the silence
        # timers until then. A silent client gets the server's bytes after server_first_wait, and
        # is closed after server_first_timeout (the idle timeout stays armed behind them).
        gate = self.runtime.gate
        self._deadline = None
        self._cancel_timer()
        self._timer = self.loop.call_later(gate.idle_timeout, self._on_timer)
        self._silence = self.loop.call_later(gate.server_first_wait, self._server_first)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_silence()
        super().connection_lost(exc)

    # --- the client's first bytes --------------------------------------------------------------
    def inspect(self, data: bytes) -> None:
        sniffer = self._sniffer
        if self._handover is not None:  # decided; reading is paused, but a read may have been under way
            sniffer.buffer += data
            return
        if not sniffer.started and data:
            self._end_silence()
            self.restart_inspect_deadline()
        protocol = sniffer.feed(data)
        if protocol is not None:
            self._decided(protocol)

    def eof_received(self) -> bool:
        if self._handover is not None:  # decided already: the EOF follows the handover
            self._eof_pending = True
            return True
        if not self._sniffer.started:  # a silent client: relay the half-close if the server is there
            return super().eof_received()
        self._eof_pending = True
        return self._decided(self._sniffer.at_end())

    def inspection_timed_out(self) -> None:
        """A prefix of TLS or HTTP that never became either (or a server-first connect that outlived
        the deadline): fail closed."""
        if self._handover is None:
            self.runtime.stats["detected", self.kind, "unknown"] += 1
        detail = "no protocol recognised within %gs" % self.runtime.gate.inspect_timeout
        verdict = Verdict(Action.BLOCK, Reason.INVALID, "auto.first_bytes", "", detail=detail)
        self.count_decision(verdict)
        self.runtime.stats["blocks", self.kind, verdict.reason] += 1
        self.record_violation(verdict, new_request_id())
        self.close()

    def upstream_failed(self) -> None:
        """The server-first connect failed: a silent client has nothing to wait for."""
        self.runtime.stats["upstream_failures", self.kind] += 1
        self.close()

    # --- server first ----------------------------------------------------------------------
    def _server_first(self) -> None:
        self._silence = None
        if self._closing or self.transport is None or self._sniffer.started:
            return
        runtime, destination = self.runtime, self.destination
        gate = runtime.gate
        self._silence = self.loop.call_later(gate.server_first_timeout - gate.server_first_wait, self._silent_too_long)
        if (runtime.other_protocols != "pass" and not_enforced(runtime, destination) is None
                and not runtime.policy.applied(OTHER_BLOCK, destination[0], runtime.stale_mode).passed):  # fmt: skip
            return  # a server-first protocol is another protocol: nothing of the server's may reach the client
        self._connect_task = self.loop.create_task(self._connect_for_server())

    def _silent_too_long(self) -> None:
        """server_first_timeout without a byte from the client: whatever the server said, the
        client never answered. Not a violation (it asked for nothing); counted as a timeout."""
        self._silence = None
        if self._closing or self.transport is None or self._sniffer.started:
            return
        self.runtime.stats["silent_timeouts", self.kind] += 1
        self.abort()  # nothing of the client's to flush, and a client that reads nothing must not hold it

    async def _connect_for_server(self) -> None:
        await self._connect()
        if self._handover is not None:  # the client spoke while the connect ran
            gate, self._handover = self._handover, None
            if not self._closing and self.transport is not None and not self.transport.is_closing():
                self._hand_over(gate)

    def _end_silence(self) -> None:
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None

    # --- the handover ----------------------------------------------------------------------
    def _decided(self, protocol: Protocol) -> bool:
        """Hand the connection to the gate for `protocol`; returns what eof_received must."""
        self.runtime.stats["detected", self.kind, protocol.value] += 1
        gate = _GATES[protocol]
        if self._connect_task is not None:
            # The upstream being connected belongs to this connection until the connect ends.
            self._handover = gate
            self.pause_client_reading("classified")
            return True
        return self._hand_over(gate)

    def _hand_over(self, gate: type[GateConnection]) -> bool:
        target = gate(self.listener)
        self._end_silence()
        self._cancel_timer()  # bound to this object; the target arms its own
        for name in _STATE:
            setattr(target, name, getattr(self, name))
        runtime = self.runtime
        runtime.connections.discard(self)
        runtime.connections.add(target)
        if self._undecided:  # still undecided: the target takes its place (behind the others: once per connection)
            self._undecided = False
            runtime.undecided.pop(self, None)
            runtime.undecided[target] = None
        if target.upstream is not None:
            target.upstream.get_protocol().owner = target
        transport, data, eof = self.transport, bytes(self._sniffer.buffer), self._eof_pending
        self._sniffer.buffer.clear()
        self.transport = self.upstream = None
        self._closing = True
        transport.set_protocol(target)
        loop = self.loop
        if target._deadline is not None:
            target._timer = loop.call_at(target._deadline, target._on_timer)
        else:
            target._timer = loop.call_later(target._idle_limit(), target._on_timer)
        target.resume_client_reading("classified")
        target.data_received(data)
        if eof and not target._closing:
            return target.eof_received()
        return True
