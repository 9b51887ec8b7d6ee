"""The guard against the gate dialling itself, at the one point a real socket cannot reach on demand.

The kernel hands out the same local port to connections towards different destinations, so a
client may come from (127.0.0.1, P) while one of the gate's own upstream connections also uses
(127.0.0.1, P). Which ports collide is the kernel's choice; this stub transport makes it happen.
(That original_dst without NAT is refused end to end is tested in test_gate_process.py.)
"""

from __future__ import annotations

import asyncio

from conftest import REPO, run
from icpgate.config.settings import load_config
from icpgate.gate.connection import Listener, Runtime
from icpgate.gate.http.connection import HttpConnection
from icpgate.gate.upstream import UpstreamResolver
from icpgate.process.worker import build_runtime_parts

GATE = ("127.0.0.1", 8080)
ORIGIN = ("127.0.0.1", 9080)
SHARED_PORT = ("127.0.0.1", 40000)


class StubTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        super().__init__()
        self.extra = {"peername": peer, "sockname": local}
        self.aborted = False

    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def accept(peer: tuple[str, int], local: tuple[str, int]) -> StubTransport:
    async def main() -> StubTransport:
        config = load_config(REPO / "config.example.toml")
        policy, pages, tls_pages = build_runtime_parts(config)
        runtime = Runtime(policy, pages, config.gate, tls_pages)
        runtime.own_connections.add((SHARED_PORT, ORIGIN))  # one of our upstream connections
        listener = Listener(runtime, config.listeners[0], UpstreamResolver(config.upstream, config.listeners[0]))
        transport = StubTransport(peer, local)
        connection = HttpConnection(listener)
        connection.connection_made(transport)
        connection.connection_lost(None)
        return transport

    return run(main())


def test_a_client_on_a_port_our_upstream_also_uses_is_served() -> None:
    assert not accept(peer=SHARED_PORT, local=GATE).aborted


def test_our_own_upstream_connection_arriving_back_is_refused() -> None:
    assert accept(peer=SHARED_PORT, local=ORIGIN).aborted
