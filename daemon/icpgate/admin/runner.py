"""The admin API's HTTP server, kept across the services' restarts.

A reload restarts the services with the new config. Restarting the admin API's server with them
closed, unanswered, the connections it had accepted and not yet read (aiohttp's shutdown closes
idle connections), so a monitor polling /readyz through a reload, the bypass watcher among them,
saw a failure. The server now stays up: each run of the services opens the admin's stores for its
config and swaps a new AdminApi in; the previous one finishes its requests in flight, then its
stores are closed. The server itself is closed when the daemon stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..config.settings import Config
from ..inspection.store import open_inspection
from ..registry.store import open_registry
from ..violations.store import open_violations
from .server import AdminApi

log = logging.getLogger("icpgate.admin")
DRAIN_TIMEOUT = 30.0  # what a replaced AdminApi's requests in flight get before its stores close


class AdminServer:
    def __init__(self, sock: socket.socket) -> None:
        """`sock`: bound before the workers started, so a bad port fails early."""
        self._sock = sock
        self._runner: web.AppRunner | None = None
        self._api: AdminApi | None = None
        self._stores: contextlib.AsyncExitStack | None = None
        # APIs swapped out, finishing their requests: their own tasks, so that the next reload, which
        # cancels `serve`, cannot cut a retirement short (the stores, dropped, would be closed by the
        # garbage collector under a request still in flight).
        self._retiring: set[asyncio.Task] = set()

    async def serve(self, config: Config) -> None:
        """Serve `config`'s admin API until cancelled; the next call serves the next config's."""
        stores = contextlib.AsyncExitStack()
        try:
            registry = await stores.enter_async_context(open_registry(config.registry_path))
            store = await stores.enter_async_context(open_violations(config.violations.path))
            inspection = (await stores.enter_async_context(open_inspection(config.inspect.path))
                          if config.inspect.enabled else None)  # fmt: skip
        except BaseException:
            await stores.aclose()
            raise
        api = AdminApi(config, registry, store, inspection)
        previous, previous_stores = self._api, self._stores
        self._api, self._stores = api, stores
        if self._runner is None:
            await self._start()
        if previous is not None and previous_stores is not None:
            retiring = asyncio.get_running_loop().create_task(self._retire(previous, previous_stores))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        await api.sample_block_rate()

    async def close(self) -> None:
        """Stop serving (requests in flight finish first) and close the stores."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._stores is not None:
            await self._stores.aclose()
            self._stores, self._api = None, None

    @staticmethod
    async def _retire(api: AdminApi, stores: contextlib.AsyncExitStack) -> None:
        await api.drained(DRAIN_TIMEOUT)
        await stores.aclose()

    async def _start(self) -> None:
        app = web.Application()
        add = {"GET": web.get, "POST": web.post}
        app.add_routes([add[method](path, self._forward(name)) for method, path, name in AdminApi.ROUTES])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock.dup()).start()
        log.info("admin API on http://%s:%d/", *self._sock.getsockname()[:2])

    def _forward(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            api = self._api
            if api is None:
                raise web.HTTPServiceUnavailable(text="the admin API is stopping")
            async with api.serving():
                return await getattr(api, name)(request)

        return handler
