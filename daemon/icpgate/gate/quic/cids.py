"""Which flow may reach a QUIC connection: each connection ID a server may hold belongs to one flow.

A QUIC server finds a connection by the Destination Connection ID of a packet, whatever address it
comes from, and reassembles the ClientHello from every Initial that reaches that connection. The
gate decides per flow (one client 4-tuple, flows.py). Were two flows allowed to feed one connection,
a server that dropped a packet of the first would fill the gap from the second, and read a hello
neither flow's decision saw (docs/quic.md). So a connection ID, at the server it is relayed to, is
claimed by the first flow that uses it, and any other flow whose Initial names it is dropped:

- while the owning flow lives (`owners`, exact);
- after it ends, for `hold` seconds (quic.idle_timeout, what the gate assumes a server keeps an
  idle connection), unless the server has answered with a Handshake packet: it has then read the
  whole hello, and bytes from another flow can no longer change which name it serves. These IDs go
  into `RecentIds`, a fixed-size filter: a flood of flows cannot grow it, and when it is fuller than
  planned it errs towards dropping an honest new connection (which retries, or falls back to TCP),
  never towards letting a remembered ID through.

One table per worker, shared by its `quic` listeners: two listeners may relay to the same server.
"""

from __future__ import annotations

import os
from hashlib import blake2b

from ..upstream import Address

CidKey = tuple[bytes, Address]  # (connection ID, the server it is relayed to: backend or destination)
FILTER_BITS = 1 << 24  # 2 MiB per generation. With HASHES, a false positive rate of 2e-11 after
HASHES = 8  # 100,000 IDs per period, 4e-4 after a million (a flood at the gate's full rate)


class RecentIds:
    """Keys added in the last `period` to 2 `period` seconds: two Bloom filters, the current one
    and the one before it, swapped every `period`. No key is ever forgotten early; a key never
    added is reported with probability (1 - e^(-HASHES * n / FILTER_BITS))^HASHES after n adds."""

    __slots__ = ("_added", "_current", "_older", "_period", "_salt", "_shift", "_since")

    def __init__(self, period: float, bits: int = FILTER_BITS) -> None:
        self._period = period
        self._shift = bits.bit_length() - 1  # bits is a power of two: each index takes this many bits
        self._current = bytearray(bits // 8)  # zero pages: memory is taken only as bits are set
        self._older = bytearray(bits // 8)
        self._added = 0  # keys in the two filters: none, and a lookup costs nothing
        self._since: float | None = None
        self._salt = os.urandom(16)  # keyed, so that no one can choose IDs that fill the same bits

    def _bits(self, key: CidKey) -> list[int]:
        cid, (host, port) = key
        message = bytes([len(cid)]) + cid + port.to_bytes(2, "big") + host.encode()
        shift = self._shift
        value = int.from_bytes(blake2b(message, digest_size=(shift * HASHES + 7) // 8, key=self._salt).digest())
        mask = (1 << shift) - 1
        return [value >> (shift * index) & mask for index in range(HASHES)]

    def _rotate(self, now: float) -> None:
        if self._since is None:
            self._since = now
        elif now - self._since >= self._period:
            stale = now - self._since >= 2 * self._period
            self._older = bytearray(len(self._current)) if stale else self._current
            self._current = bytearray(len(self._current))
            self._since = now

    def add(self, key: CidKey, now: float) -> None:
        self._rotate(now)
        self._added += 1
        current = self._current
        for bit in self._bits(key):
            current[bit >> 3] |= 1 << (bit & 7)

    def seen(self, key: CidKey, now: float) -> bool:
        if not self._added:
            return False
        self._rotate(now)
        bits = self._bits(key)
        for table in (self._current, self._older):
            for bit in bits:
                if not table[bit >> 3] >> (bit & 7) & 1:
                    break
            else:
                return True
        return False


class ConnectionIds:
    """The worker's bindings of connection IDs to flows (see the module's docstring)."""

    __slots__ = ("owners", "recent")

    def __init__(self, hold: float, bits: int = FILTER_BITS) -> None:
        self.owners: dict[CidKey, object] = {}
        self.recent = RecentIds(hold, bits)

    def taken(self, key: CidKey, flow: object, now: float) -> bool:
        """Whether `flow` may not use this ID: another live flow holds it, or an ended one did."""
        owner = self.owners.get(key)
        if owner is not None:
            return owner is not flow
        return self.recent.seen(key, now)

    def claim(self, key: CidKey, flow: object) -> None:
        """Bind the ID to `flow`, unless another flow holds it (a server's ID colliding with one a
        client chose: the first binding stands)."""
        self.owners.setdefault(key, flow)

    def release(self, keys: list[CidKey], flow: object, remember: bool, now: float) -> None:
        """The flow has ended: its IDs are free, or (`remember`) kept from other flows for `hold`."""
        owners = self.owners
        for key in keys:
            if owners.get(key) is flow:
                del owners[key]
                if remember:
                    self.recent.add(key, now)
