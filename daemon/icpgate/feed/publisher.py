"""`icpgate feed serve`: publish a registry to edge gates (docs/feed-protocol.md).

Every request must carry one of the edges' bearer tokens (`publish.tokens_file`), unless the
operator started it with `--no-auth`: the filings name individual site owners.

Snapshots are built in the background whenever the serial moves, written compressed and signed
to `publish.cache_dir`, and served as static files with an ETag. With tokens they are marked
`private` (a shared cache must not hand one edge's answer to anyone else); without, `public`.
Change sets are built per (since, serial) once and shared by every edge asking for them.
Long-polls wait on one future that the registry watcher resolves when the serial moves, which
another process (`icpgate import`) may do at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web

from ..config.settings import Config
from ..registry.store import Registry, RegistryState, open_registry
from .protocol import FORMAT_HEADER, FORMATS, FORMATS_HEADER, Header, choose, encode_changes, write_snapshot
from .signing import SIGNATURE_HEADER, load_private_key, sign
from .sources import CHECKSUM_HEADER, POLL_HEADER, SERIAL_HEADER
from .tokens import TokenFileError, authorise, load_tokens

log = logging.getLogger("icpgate.publisher")
WATCH_INTERVAL = 0.1  # seconds between looks at the registry for commits by other processes
PRUNE_INTERVAL = 60.0
CHANGES_CACHE = 64  # change sets kept, by (since, serial)


@dataclass(frozen=True, slots=True)
class Snapshot:
    path: Path
    serial: int
    etag: str
    signature: str | None
    checksum: str  # the registry's at `serial`


class Publisher:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.publish = config.publish
        self.tokens = Tokens(config.publish.tokens_file) if config.publish.tokens_file else None
        self.key = load_private_key(config.publish.signing_key) if config.publish.signing_key else None
        self.registry: Registry | None = None
        self.state: RegistryState | None = None
        self.snapshot: Snapshot | None = None
        self._moved: asyncio.Future[None] | None = None  # resolved when the serial moves
        self._changes: OrderedDict[tuple[int, int], tuple[bytes, str | None, int]] = OrderedDict()
        self._building: dict[tuple[int, int], asyncio.Task] = {}
        self._snapshot_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authorise] if self.tokens else [])
        app.router.add_get("/feed/v1/snapshot", self.get_snapshot)
        app.router.add_get("/feed/v1/changes", self.get_changes)
        app.router.add_get("/feed/v1/", self.get_status)
        app.cleanup_ctx.append(self._lifetime)
        app.on_shutdown.append(self._release_long_polls)
        return app

    async def _release_long_polls(self, _app: web.Application) -> None:
        """Stopping: answer every waiting long-poll now (the client asks again elsewhere or later)."""
        if self._moved and not self._moved.done():
            self._moved.set_result(None)

    async def _lifetime(self, _app: web.Application):
        async with open_registry(self.config.registry_path, create=False) as registry:
            self.registry = registry
            self.state = await registry.state()
            self._moved = asyncio.get_running_loop().create_future()
            self.publish.cache_dir.mkdir(parents=True, exist_ok=True)
            self._snapshot_task = asyncio.create_task(self._build_snapshot())
            self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._prune())]
            if self.tokens:
                self._tasks.append(asyncio.create_task(self.tokens.follow()))
            log.info("publishing %s at serial %d (%d filings)", registry.path, self.state.serial, self.state.filings)
            yield
            for task in (*self._tasks, self._snapshot_task, *self._building.values()):
                task.cancel()
            await asyncio.gather(*self._tasks, self._snapshot_task, return_exceptions=True)

    # --- following the registry ---------------------------------------------------------------

    async def _watch(self) -> None:
        version = None
        while True:
            try:
                async with self.registry.db.execute("PRAGMA data_version") as cursor:
                    (current,) = await cursor.fetchone()
                if current != version:
                    version = current
                    await self._refresh()
            except Exception:
                log.exception("reading the registry failed; serving serial %d", self.state.serial)
            await asyncio.sleep(WATCH_INTERVAL)

    async def _refresh(self) -> None:
        state = await self.registry.state()
        if state == self.state:
            return
        moved = state.serial != self.state.serial
        self.state = state
        if moved:
            log.info("serial %d: %d filings", state.serial, state.filings)
            self._moved.set_result(None)
            self._moved = asyncio.get_running_loop().create_future()
            if self._snapshot_task.done():
                self._snapshot_task = asyncio.create_task(self._build_snapshot())

    async def _prune(self) -> None:
        while True:
            before = datetime.now(UTC) - timedelta(seconds=self.publish.history)
            try:
                await self.registry.prune_history(before.strftime("%Y-%m-%dT%H:%M:%SZ"))
                await self._refresh()  # our own commit: the watcher does not see it
            except Exception:
                log.exception("pruning the change history failed")
            await asyncio.sleep(PRUNE_INTERVAL)

    async def _build_snapshot(self) -> None:
        """Build snapshots until one matches the current serial (imports may land meanwhile)."""
        while self.snapshot is None or self.snapshot.serial != self.state.serial:
            try:
                self.snapshot = await self._write_snapshot()
            except Exception:
                log.exception("building the snapshot failed; retrying")
                await asyncio.sleep(5)

    async def _write_snapshot(self) -> Snapshot:
        async with (
            open_registry(self.config.registry_path, create=False) as registry,  # its own connection
            registry.snapshot_read() as state,
        ):
            name = "snapshot-%d-%s.ndjson.gz" % (state.serial, state.checksum[:16])
            path = self.publish.cache_dir / name
            etag = '"%d-%s"' % (state.serial, state.checksum[:16])
            if not path.is_file():
                header = Header("snapshot", state.serial, None, _now(), state.filings, state.checksum)
                partial = path.with_suffix(".partial")
                with partial.open("wb") as out:
                    await write_snapshot(header, registry.records(), out)
                    out.flush()
                    os.fsync(out.fileno())
                partial.replace(path)
        signature = sign(self.key, await asyncio.to_thread(path.read_bytes)) if self.key else None
        for old in self.publish.cache_dir.glob("snapshot-*.ndjson.gz"):
            if old != path and (self.snapshot is None or old != self.snapshot.path):
                old.unlink(missing_ok=True)
        log.info("snapshot of serial %d ready: %s (%d bytes)", state.serial, path.name, path.stat().st_size)
        return Snapshot(path, state.serial, etag, signature, state.checksum)

    # --- serving --------------------------------------------------------------------------------

    @web.middleware
    async def _authorise(self, request: web.Request, handler) -> web.StreamResponse:
        if self.tokens.authorise(request.headers.get("Authorization")) is None:
            self.tokens.refused(request.remote or "?", "Authorization" in request.headers)
            error = ', error="invalid_token"' if "Authorization" in request.headers else ""
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Bearer realm="icpgate-feed"' + error},
                                       text="a valid feed token is required (Authorization: Bearer ...)\n")  # fmt: skip
        return await handler(request)

    def _headers(self) -> dict[str, str]:
        return {SERIAL_HEADER: str(self.state.serial), CHECKSUM_HEADER: self.state.checksum,
                POLL_HEADER: "%g" % self.publish.poll_interval}  # fmt: skip

    def _cacheable(self) -> dict[str, str]:
        """Snapshots are static per ETag and format. Behind tokens only the edge's own cache may keep one."""
        age = max(1, int(self.publish.poll_interval))
        if self.tokens:
            return {"Cache-Control": "private, max-age=%d" % age, "Vary": "Authorization, " + FORMATS_HEADER}
        return {"Cache-Control": "public, max-age=%d" % age, "Vary": FORMATS_HEADER}

    def _format(self, request: web.Request) -> dict[str, str]:
        """The answer's format header: the newest format the edge and this release share, or 406
        naming ours, so an edge of another release says why instead of refusing a body it cannot read."""
        chosen = choose(request.headers.get(FORMATS_HEADER))
        if chosen is None:
            raise web.HTTPNotAcceptable(headers={**self._headers(), FORMATS_HEADER: ", ".join(FORMATS)},
                                        text="this publisher writes %s; the edge reads %s\n"
                                        % (", ".join(FORMATS), request.headers[FORMATS_HEADER]))  # fmt: skip
        return {FORMAT_HEADER: chosen}

    async def get_snapshot(self, request: web.Request) -> web.StreamResponse:
        snapshot = self.snapshot
        if snapshot is None:
            raise web.HTTPServiceUnavailable(headers={"Retry-After": "5", **self._headers()},
                                             text="the first snapshot is being built\n")  # fmt: skip
        headers = {**self._headers(), SERIAL_HEADER: str(snapshot.serial), CHECKSUM_HEADER: snapshot.checksum,
                   "ETag": snapshot.etag, **self._cacheable(), **self._format(request)}  # fmt: skip
        if snapshot.signature:
            headers[SIGNATURE_HEADER] = snapshot.signature
        if snapshot.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = "application/gzip"
        headers["Content-Disposition"] = 'attachment; filename="%s"' % snapshot.path.name
        return web.FileResponse(snapshot.path, headers=headers)

    async def get_changes(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query["since"])
            wait = min(float(request.query.get("wait", "0")), self.publish.max_wait)
            if since < 0 or not wait >= 0:
                raise ValueError
        except (KeyError, ValueError):
            raise web.HTTPBadRequest(text="expected ?since=<serial>[&wait=<seconds>]\n") from None
        chosen = self._format(request)
        if since == self.state.serial and wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._moved), wait)
        state = self.state
        if since > state.serial:
            raise web.HTTPConflict(headers=self._headers(), text="serial %d is ahead of ours, %d\n"
                                   % (since, state.serial))  # fmt: skip
        if since < state.floor:
            raise web.HTTPGone(headers=self._headers(), text="changes since %d are no longer kept; take a snapshot\n"
                               % since)  # fmt: skip
        if since == state.serial:
            return web.Response(status=204, headers={**self._headers(), "Cache-Control": "no-store"})
        body, signature, serial = await self._change_set(since, state.serial)
        headers = {**self._headers(), SERIAL_HEADER: str(serial), "Cache-Control": "no-store",
                   "Content-Type": "application/gzip", **chosen}  # fmt: skip
        if signature:
            headers[SIGNATURE_HEADER] = signature
        return web.Response(body=body, headers=headers)

    async def _change_set(self, since: int, serial: int) -> tuple[bytes, str | None, int]:
        """Built once per (since, serial) however many edges ask at the same moment."""
        key = (since, serial)
        if key in self._changes:
            return self._changes[key]
        task = self._building.get(key)
        if task is None:
            task = self._building[key] = asyncio.create_task(self._build_change_set(since))
            task.add_done_callback(lambda _task: self._building.pop(key, None))
        built = await asyncio.shield(task)
        self._changes[key] = built
        while len(self._changes) > CHANGES_CACHE:
            self._changes.popitem(last=False)
        return built

    async def _build_change_set(self, since: int) -> tuple[bytes, str | None, int]:
        state, changes = await self.registry.changes_since(since)
        header = Header("changes", state.serial, since, _now(), len(changes), state.checksum)
        body = encode_changes(header, changes)
        return body, (sign(self.key, body) if self.key else None), state.serial

    async def get_status(self, _request: web.Request) -> web.Response:
        state, snapshot = self.state, self.snapshot
        return web.json_response({
            "serial": state.serial, "floor": state.floor, "checksum": state.checksum, "filings": state.filings,
            "changed_at": state.changed_at, "signed": self.key is not None, "tokens": self.tokens is not None,
            "snapshot": {"serial": snapshot.serial, "etag": snapshot.etag} if snapshot else None,
            "formats": list(FORMATS),
        }, headers=self._headers())  # fmt: skip


def serve(config: Config, host: str, port: int) -> int:
    """Run the publisher until SIGINT/SIGTERM; 6 (the CLI's START) when it cannot listen."""
    import uvloop

    return uvloop.run(_serve(config, host, port))


async def _serve(config: Config, host: str, port: int) -> int:
    try:  # bound before anything starts, so a port in use stops nothing half-started
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=1024)  # fmt: skip
    except OSError as error:
        log.error("cannot listen on %s: %s", _where(host, port), error.strerror or error)
        return 6
    publisher = Publisher(config)
    runner = web.AppRunner(publisher.app(), access_log=None, shutdown_timeout=5, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        auth = (
            "bearer tokens for %d edge(s) from %s" % (len(publisher.tokens.names), config.publish.tokens_file)
            if publisher.tokens
            else "NO AUTHENTICATION (--no-auth): anyone who can connect gets every filing"
        )
        bound = sock.getsockname()[1]  # port 0 asks the kernel for a free one: say which
        log.log(logging.INFO if publisher.tokens else logging.WARNING, "feed publisher listening on http://%s/feed/v1"
                " (%s)", _where(host, bound), auth)  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping")
        return 0
    finally:
        await runner.cleanup()


def _where(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class Tokens:
    """The edges' tokens, re-read when the file changes (a bad new file keeps the old tokens)."""

    CHECK_INTERVAL = 1.0
    REFUSAL_LOG_INTERVAL = 60.0  # per client address: a scanner must not flood the log

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._tokens = load_tokens(path)
        self._refusals: OrderedDict[str, float] = OrderedDict()

    @property
    def names(self) -> list[str]:
        return list(self._tokens)

    def authorise(self, header: str | None) -> str | None:
        return authorise(self._tokens, header)

    def refused(self, client: str, had_header: bool) -> None:
        now = time.monotonic()
        if now - self._refusals.get(client, -self.REFUSAL_LOG_INTERVAL) < self.REFUSAL_LOG_INTERVAL:
            return
        self._refusals[client] = now
        self._refusals.move_to_end(client)
        while len(self._refusals) > 1024:
            self._refusals.popitem(last=False)
        log.warning("refused a request from %s: %s (further refusals from it are not logged for %gs)", client,
                    "a wrong token" if had_header else "no token", self.REFUSAL_LOG_INTERVAL)  # fmt: skip

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(self.CHECK_INTERVAL)
            stamp = self._stat()
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                tokens = load_tokens(self.path)
            except TokenFileError as error:
                log.error("tokens file changed but cannot be used, keeping the %d tokens in force: %s",
                          len(self._tokens), error)  # fmt: skip
                continue
            self._tokens = tokens
            log.info("tokens file re-read: %d edges (%s)", len(tokens), ", ".join(tokens))

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
