"""A worker's TCP listeners, which it can stop and start accepting on without closing the queue.

Each is served from this worker's own duplicate of the daemon's listening socket: pausing (for
balance, process/balance.py) closes the duplicate only, so the socket stays bound and its queue
stays for the other workers; resuming serves a new duplicate. At the drain the inherited sockets
are closed too, so that once every worker has, the port is free for a new daemon.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from .listen import BACKLOG, GateStartError


class Accepting:
    def __init__(self) -> None:
        self._listeners: list[tuple[str, Callable[[], asyncio.Protocol], socket.socket]] = []
        self._servers: dict[str, asyncio.Server] = {}
        self._paused = False
        self._closed = False

    @property
    def bound(self) -> int:
        """Listeners bound, accepting or paused: a pause is no missing listener for readiness."""
        return len(self._listeners)

    async def add(self, name: str, factory: Callable[[], asyncio.Protocol], sock: socket.socket) -> None:
        self._listeners.append((name, factory, sock))
        try:
            await self._serve(name, factory, sock)
        except OSError as error:
            raise GateStartError("cannot listen on %s: %s" % (name, error.strerror or error)) from None

    def pause(self) -> None:
        self._paused = True
        for server in self._servers.values():
            server.close()
        self._servers.clear()

    async def resume(self) -> None:
        """Accept on every listener again; OSError (and paused on all) if one cannot."""
        if self._closed:  # draining: never again
            return
        self._paused = False
        for name, factory, sock in self._listeners:
            if name not in self._servers:
                try:
                    await self._serve(name, factory, sock)
                except OSError:
                    self.pause()
                    raise
            if self._paused:  # paused again meanwhile (a connection accepted on one served already)
                self.pause()
                return

    def close(self) -> None:
        """Stop accepting and close the inherited sockets: the drain."""
        self._closed = True
        self.pause()
        for _, _, sock in self._listeners:
            sock.close()

    async def _serve(self, name: str, factory: Callable[[], asyncio.Protocol], sock: socket.socket) -> None:
        own = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        try:
            self._servers[name] = await asyncio.get_running_loop().create_server(factory, sock=own, backlog=BACKLOG)
        except BaseException:
            own.close()
            raise
