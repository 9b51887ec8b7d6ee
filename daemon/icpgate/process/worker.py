"""One gate worker: loads config, pack, pages and index, serves until told.

It serves on listening sockets bound before it started (process/listen.py): by the supervisor, and
inherited across fork, in a multi-worker daemon. SIGHUP reloads config, policy pack, templates and
the index; anything invalid keeps the old state and says why. SIGTERM stops accepting, lets relays
drain up to `gate.drain_timeout`, then closes the rest.

The index is the shared file beside the registry (registry/index_store.py), mapped by every worker and
updated in place by whichever process commits to the registry, so a commit is seen at the next
lookup. The worker still follows the registry's serial (every `registry.reload_interval` seconds,
or at once when the feed client runs in this process and says so): if the writer died between its
registry commit and its index commit, or the file was damaged, it brings the index forward or
rebuilds it. It never follows a registry at the path that is another one than its index's, or one
that went back in time, except when told: SIGHUP (or `icpgate registry adopt`, which it sees as an
index rebuilt by an adoption). A restart is not told: it keeps the index `current` names.
It also sets the enforcement mode from how fresh the feed is.

Every `violations.flush_interval` it hands its violation table to the violation log, and every
second it copies its counters into the Prometheus metrics (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from ..config.settings import Config, ListenerConfig, load_config
from ..config.tomlschema import ConfigError
from ..gate.auto import AutoConnection
from ..gate.blockpage import BlockPages, Operator
from ..gate.connection import Listener, Runtime
from ..gate.http.connection import HttpConnection
from ..gate.http.engine import ENGINE as HTTP_ENGINE
from ..gate.quic.cids import ConnectionIds
from ..gate.quic.listener import QuicListener, serves_quic
from ..gate.tls.connection import TlsConnection
from ..gate.tls.page import TlsBlockPages
from ..gate.upstream import UpstreamResolver
from ..policy.decide import Policy
from ..policy.freshness import freshness
from ..policy.pack import load_pack
from ..registry.index import EMPTY_INDEX
from ..registry.index_store import (
    IndexError_,
    RegistryIdentity,
    SharedIndex,
    current_generation,
    index_path,
    kept_because,
    open_index,
)
from ..registry.store import Registry, open_registry
from ..telemetry.metrics import VIOLATIONS_DROPPED, VIOLATIONS_FLUSHED, WorkerMetrics
from ..violations.store import ViolationStore, open_violations
from .accepting import Accepting
from .balance import AcceptBalance, ConnectionTable
from .listen import bind_listeners

log = logging.getLogger("icpgate.gate")
CONNECTION_KINDS = {"http": HttpConnection, "tls": TlsConnection, "auto": AutoConnection}
METRICS_INTERVAL = 1.0
# What runs beside the gate in a one-process daemon (feed client, violation upkeep, admin API): it
# gets the config and a callback to call with the new serial after each commit, so the index follows at once.
Service = Callable[[Config, Callable[[int], None] | None], Awaitable[None]]


async def close_service(service: Service | None) -> None:
    """When the daemon stops: a service that keeps something across its runs (process/services.py's
    keeps the admin API's server) closes it."""
    close = getattr(service, "close", None)
    if close is not None:
        await close()


def build_runtime_parts(config: Config) -> tuple[Policy, BlockPages, TlsBlockPages | None]:
    """Everything a reload replaces, except the index; raises ConfigError when anything is wrong."""
    pack = load_pack(config.policy_pack)
    pages = BlockPages(pack.block, Operator(config.provider.name, config.provider.contact, config.display_timezone))
    tls_pages = TlsBlockPages(config.gate) if pack.block.tls_action == "page" else None
    return Policy(pack.policy, config.provider.id, EMPTY_INDEX, config.gate.enforcement), pages, tls_pages


def _freeze_index() -> None:
    """Move everything alive at start-up out of the collector's sight: config, pack and pages live
    as long as the worker, and walking them on every full collection only costs time."""
    gc.collect()
    gc.freeze()


class Worker:
    """`sockets`: the listening sockets by listener name, bound by the caller (see process/listen.py);
    without them the worker binds its own."""

    def __init__(self, config_path: Path, overrides: tuple[str, ...], on_ready: Callable[[], None],
                 service: Service | None = None, *, sockets: dict[str, socket.socket] | None = None,
                 config: Config | None = None, table: ConnectionTable | None = None,
                 number: int = 0) -> None:  # fmt: skip
        self.config_path = config_path
        self.overrides = overrides
        self.on_ready = on_ready
        self.service = service
        self.sockets = sockets
        # The daemon's last good config, when it has one: a worker restarted after the file was
        # edited into something invalid keeps serving with it, as the running workers do.
        self.config: Config | None = config
        self.runtime: Runtime | None = None
        self.accepting = Accepting()  # the TCP listeners
        self.servers: list[QuicListener] = []
        self.table = table  # the workers' connection counts, with more than one worker (process/balance.py)
        self.number = number
        self.listeners: list[Listener] = []
        self.registry: Registry | None = None
        self._stopping = asyncio.Event()
        self._services_stale = asyncio.Event()  # set by a reload: the in-loop services restart with the new config
        self._data_version = None
        self.serial = 0  # the registry serial the index belongs to
        self._index_lock = asyncio.Lock()
        self.metrics: WorkerMetrics | None = None
        self._reload_ok = True
        self._loaded_at = time.time()
        self._kept = ""  # why the index served does not follow the registry at the path, as last logged
        self._refused: Path | None = None  # a generation of another registry, not followed
        # The last successful sync of the registry the index enforced was built from, as last read
        # while it was adopted ("" never synced, None not read yet): its freshness while another is not.
        self._adopted_success: str | None = None

    async def run(self) -> None:
        self.config = self.config or load_config(self.config_path, self.overrides)
        policy, pages, tls_pages = build_runtime_parts(self.config)
        async with open_registry(self.config.registry_path, create=False) as registry:
            self.registry = registry
            self._data_version = await self._registry_version()
            policy.index = await asyncio.to_thread(open_index, self.config.registry_path)  # opened after fork
            self.serial = policy.index.serial
            _freeze_index()
            log.info("registry %s: serial %d, %d filings in the shared index", self.config.registry_path, self.serial,
                     len(policy.index))  # fmt: skip
            self.runtime = Runtime(policy, pages, self.config.gate, tls_pages)
            self.runtime.other_protocols = self.config.other_protocols
            self._apply_reporting(self.config)
            await self._update_enforcement()
            await self._bind(self.config.listeners)
            self.metrics = WorkerMetrics(HTTP_ENGINE)
            self._sync_metrics()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
            loop.add_signal_handler(signal.SIGINT, self._stopping.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
            async with open_violations(self.config.violations.path) as violations:
                tasks = [
                    loop.create_task(self._watch_registry()),
                    loop.create_task(self._flush_violations(violations)),
                    loop.create_task(self._publish_metrics()),
                ]
                if self.table is not None:
                    tasks.append(loop.create_task(self._balance(self.table)))
                self.on_ready()
                if self.service:
                    tasks.append(loop.create_task(self._run_service()))
                await self._stopping.wait()
                for task in tasks:
                    task.cancel()
                await self._drain()
                await self._flush_once(violations)
                self._sync_metrics()

    async def _bind(self, listeners: tuple[ListenerConfig, ...]) -> None:
        """Serve on the sockets the daemon bound. A restarted worker may read a config whose
        listeners changed since then: those wait for the restart of the daemon, as after SIGHUP."""
        if self.sockets is None:
            self.sockets = bind_listeners(listeners)
        quic = [item for item in listeners if item.kind == "quic" and item.name in self.sockets]
        cids = ConnectionIds(self.config.quic.idle_timeout)  # one per worker: its quic listeners may share servers
        for listener_config in listeners:
            sock = self.sockets.get(listener_config.name)
            if sock is None:
                log.warning("%s is not bound: listener changes take effect at the next restart", listener_config.name)
                continue
            resolver = UpstreamResolver(self.config.upstream, listener_config)
            if listener_config.kind == "quic":
                self._serve_quic(listener_config, resolver, sock, cids, len(quic))
                continue
            listener = Listener(self.runtime, listener_config, resolver)
            self.listeners.append(listener)
            factory = CONNECTION_KINDS[listener_config.kind]
            await self.accepting.add(listener_config.name, lambda factory=factory, listener=listener: factory(listener),
                                     sock)  # fmt: skip
            log.info("listening on %s", listener_config.name)

    def _serve_quic(self, listener_config: ListenerConfig, resolver: UpstreamResolver, sock: socket.socket,
                    cids: ConnectionIds, listeners: int) -> None:  # fmt: skip
        if not serves_quic():
            log.info("%s is served by worker 0", listener_config.name)
            return
        listener = QuicListener(self.runtime, listener_config, resolver, sock, self.config.quic, cids=cids,
                                listeners=listeners)  # fmt: skip
        listener.start()
        self.listeners.append(listener)
        self.servers.append(listener)  # closed with the servers when the worker stops
        log.info("listening on %s", listener_config.name)

    async def reload(self) -> bool:
        """Re-read config, pack, templates and index; keep the old state if anything is wrong."""
        try:
            config = load_config(self.config_path, self.overrides)
            policy, pages, tls_pages = build_runtime_parts(config)
        except (ConfigError, OSError) as error:  # OSError: a certificate or key that does not load (SSLError too)
            for problem in error.problems if isinstance(error, ConfigError) else [error]:
                log.error("reload refused, keeping the running config: %s", problem)
            self.runtime.stats["reloads", "failed"] += 1
            self._reload_ok = False
            return False
        if config.listeners != self.config.listeners:
            log.warning("listener changes take effect at the next restart")
        for listener in self.listeners:  # upstream mode and static map apply to new connections
            listener.resolver = UpstreamResolver(config.upstream, listener.config)
        policy.index = self.runtime.policy.index
        self.config = config
        await self.registry.follow()
        self.runtime.gate = config.gate
        self.runtime.other_protocols = config.other_protocols
        self.runtime.pages = pages
        self.runtime.tls_pages = tls_pages
        self.runtime.policy = policy
        self._apply_reporting(config)
        await self.catch_up(full=True, adopt=True)  # a reload is the operator's word: adopt the registry at the path
        self.runtime.stats["reloads", "ok"] += 1
        self._reload_ok, self._loaded_at = True, time.time()
        self._services_stale.set()
        log.info("reloaded config, policy pack %s and templates", policy.pack.name)
        return True

    def _apply_reporting(self, config: Config) -> None:
        """Violation table and block log settings, changed in place: the records held so far and
        the counts the metrics copy from stay."""
        table = self.runtime.violations
        table.max_keys = config.violations.max_keys
        table.sample_client = config.violations.sample_client
        self.runtime.relayed.max_keys = config.violations.max_keys
        self.runtime.block_log.configure(config.log.block_sample_rate, config.log.block_lines_per_second)

    async def _flush_violations(self, violations: ViolationStore) -> None:
        while True:
            await asyncio.sleep(self.config.violations.flush_interval)
            await self._flush_once(violations)

    async def _flush_once(self, violations: ViolationStore) -> None:
        """Write the table out; the gate keeps counting into a fresh one meanwhile. A batch the
        log refuses is dropped and counted: the gate never waits for the log."""
        await self._flush_relayed(violations)
        records = self.runtime.violations.take()
        if not records:
            return
        try:
            VIOLATIONS_FLUSHED.inc(await violations.write(records))
        except Exception as error:
            VIOLATIONS_DROPPED.labels("write_failed").inc(sum(record[2] for record in records.values()))
            log.error("violation log %s: cannot write %d records: %s", violations.path, len(records), error)

    async def _flush_relayed(self, violations: ViolationStore) -> None:
        """The filed names relayed since the last flush (site inspection's sign); then the decision
        cache starts afresh, so a name still in use is recorded again by the next flush."""
        relayed = self.runtime.relayed.take()
        self.runtime.forget_decisions()
        if not relayed:
            return
        try:
            await violations.write_relayed(relayed)
        except Exception as error:
            log.error("violation log %s: cannot write %d relayed names: %s", violations.path, len(relayed), error)

    async def _publish_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL)
            self._sync_metrics()

    def _sync_metrics(self) -> None:
        listeners = self.accepting.bound + len(self.servers) if not self._stopping.is_set() else 0
        self.metrics.sync(self.runtime, serial=self.serial, listeners=listeners, reload_ok=self._reload_ok,
                          loaded_at=self._loaded_at)  # fmt: skip

    async def _balance(self, table: ConnectionTable) -> None:
        """Keep this worker near its share of the daemon's connections (process/balance.py)."""
        runtime = self.runtime

        def pause() -> None:
            runtime.stats["accept_pauses"] += 1
            self.accepting.pause()

        balance = AcceptBalance(table, self.number, lambda: len(runtime.connections), pause, self.accepting.resume)
        runtime.on_accept, runtime.on_close = balance.accepted, balance.closed
        try:
            await balance.keep()
        except Exception:  # a fault of its own must not leave this worker paused
            log.exception("balancing the workers' connections stopped; accepting on every listener")
            runtime.on_accept = runtime.on_close = None
            await self.accepting.resume()
        finally:
            runtime.on_accept = runtime.on_close = None

    async def _registry_version(self) -> int:
        async with self.registry.db.execute("PRAGMA data_version") as cursor:
            (version,) = await cursor.fetchone()
        return version

    async def _run_service(self) -> None:
        """The services in this loop (a one-worker daemon). A reload restarts them with the new
        config, as the service process of a multi-worker daemon does, so the admin API reports it."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._services_stale.clear()
                running = loop.create_task(self.service(self.config, lambda _serial: loop.create_task(self.catch_up())))
                reloaded = loop.create_task(self._services_stale.wait())
                try:
                    await asyncio.wait([running, reloaded], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    reloaded.cancel()
                    if not running.done():
                        running.cancel()
                        await asyncio.gather(running, return_exceptions=True)
                if not self._services_stale.is_set():
                    break
        finally:
            await close_service(self.service)
        try:
            running.result()
        except asyncio.CancelledError:
            raise
        except Exception:  # the gate goes on with the registry it has; the failure is logged
            log.exception("the services (feed, violation upkeep, admin API) stopped")

    async def _watch_registry(self) -> None:
        interval = self.config.registry_reload_interval
        while True:
            await asyncio.sleep(interval or 1.0)
            try:
                if interval:
                    reopened = await self.registry.follow()  # another file at the path: read that one
                    version = await self._registry_version()
                    index = self.runtime.policy.index
                    moved = index.replaced() and current_generation(index.path) != self._refused
                    if reopened or version != self._data_version or index.errors or moved:
                        self._data_version = version
                        await self.catch_up()
                await self._update_enforcement()
            except Exception:  # a broken reload must not stop the gate: it keeps the last index
                log.exception("registry reload failed; keeping the last index")

    async def catch_up(self, *, full: bool = False, adopt: bool = False) -> None:
        """Make sure the shared index reflects the registry's serial. Normally the committing
        process has done it already; this repairs the cases where it could not (it died between
        the two commits, the index was damaged or deleted). `full` (a reload) reopens the index;
        `adopt` (a reload) follows the registry at the path even if it is another one, or behind."""
        async with self._index_lock:
            index: SharedIndex = self.runtime.policy.index
            damaged = index.errors > 0
            outcome = await self.registry.sync_index(rebuild=damaged, adopt=adopt)
            if outcome.how == "kept" and outcome.kept != self._kept:
                log.warning("keeping the index at serial %d: %s. `icpgate registry adopt` or a reload (SIGHUP)"
                            " switches to it", outcome.serial, outcome.kept)  # fmt: skip
            elif outcome.how not in ("kept", "current"):
                log.info("index %s to serial %d: %d filings, in %.3f s", outcome.how, outcome.serial,
                         outcome.changed, outcome.seconds)  # fmt: skip
            self._kept = outcome.kept
            if full or damaged or index.replaced():
                # a mapping, no load; in a thread, as it may wait for another process's index commit
                try:
                    fresh = await asyncio.to_thread(SharedIndex, index_path(self.config.registry_path))
                except IndexError_ as error:  # deleted again meanwhile: the next round rebuilds it
                    log.warning("cannot open the index (%s): keeping the one mapped here", error)
                    self.serial = index.serial
                    return
                if adopt or damaged or fresh.succeeds(index):
                    self.runtime.policy.index = fresh  # one reference swap: lookups see the old file or the new
                    index.close()
                    index = fresh
                else:
                    if fresh.folder != self._refused:
                        log.warning("%s was rebuilt from another registry, not by an adoption: keeping the index"
                                    " mapped here (%s)", fresh.path, index.folder.name)  # fmt: skip
                    self._refused = fresh.folder
                    fresh.close()
            self.serial = index.serial

    async def _update_enforcement(self) -> None:
        """Follow the feed's freshness into the runtime's stale mode (gate.enforcement and the
        pack's monitor_ranges are the policy's, replaced on reload), and say when monitoring changes.
        While the registry at the path is not adopted, another file's sync status (a registry copied
        in, never synced) must not open the gate (feed.stale_mode): the index enforced ages from its
        own last sync, as /readyz judges it, or, in a worker started meanwhile that never saw one,
        keeps its mode."""
        policy = self.runtime.policy
        monitoring = (policy.enforcement, policy.pack.monitor_ranges)
        if monitoring != self.runtime.monitoring:
            self.runtime.monitoring = monitoring
            if policy.enforcement == "monitor":
                log.warning("gate.enforcement = monitor: nothing is blocked but malformed traffic")
            elif policy.pack.monitor_ranges:
                log.warning("enforce.monitor_ranges: nothing is blocked but malformed traffic for %s",
                            ", ".join(map(str, policy.pack.monitor_ranges)))  # fmt: skip
        if not self.config.feed.urls:  # local imports only: always enforced, nothing to read
            return
        if not await self._not_adopted():
            self._adopted_success = (await self.registry.sync_status()).get("last_success") or ""
        elif self._adopted_success is None:  # its feed status says nothing of the index enforced
            return
        last_success = self._adopted_success or None
        mode = freshness(self.config.feed, last_success, datetime.now(UTC)).enforcement
        if mode != self.runtime.stale_mode:
            log.warning("enforcement: %s -> %s (feed last synced %s)", self.runtime.stale_mode, mode,
                        last_success or "never")  # fmt: skip
            self.runtime.stale_mode = mode

    async def _not_adopted(self) -> bool:
        """True while the registry at the path is not the one the index enforced was built from, or
        behind it (checked here, not taken from the last catch-up: a restarted worker has none)."""
        state = await self.registry.state()
        identity = RegistryIdentity(self.config.registry_path, state.registry_id, state.serial, state.checksum)
        return bool(kept_because(self.runtime.policy.index.meta(), identity))

    async def _drain(self) -> None:
        if self.table is not None:  # accepting no more: the others must not count on this worker
            self.runtime.on_accept = self.runtime.on_close = None  # nor the closes to come put it back
            self.table.clear(self.number)
        self.accepting.close()
        for server in self.servers:
            server.close()
        connections = self.runtime.connections
        log.info("stopping: draining %d connections for up to %gs", len(connections), self.config.gate.drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.gate.drain_timeout
        while connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(connections):
            connection.abort()
        await asyncio.sleep(0)
