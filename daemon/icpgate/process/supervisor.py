"""The process model: one process for one worker, else a supervisor and N forked workers.

The listening sockets are bound here, before anything forks (process/listen.py): the workers inherit
them and accept from them, and a second daemon on the same ports is refused. The supervisor holds
no index and serves nothing: it reports readiness to systemd once every worker is up, pings the
watchdog, forwards SIGHUP and SIGTERM, and restarts a child that dies, backing off while it keeps
dying. One more child, the service process, runs the feed client, the violation upkeep and the
admin API; it takes a new config on SIGHUP itself, and keeps the running one when the new one is bad.

Readiness: each worker writes its number to a pipe once its index is loaded and it serves. The
supervisor waits for every number. A worker that fails to start (it exits with an error it has
logged) ends the start-up; one killed by a signal is restarted and waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
from prometheus_client import multiprocess

from ..config.settings import Config, load_config
from ..config.tomlschema import ConfigError
from ..gate.http.engine import ENGINE, ENGINE_NOTE
from ..registry.store import require_registry
from ..telemetry.identity import name_process
from ..telemetry.multiproc import ENV
from .balance import ConnectionTable
from .listen import GateStartError, bind_listeners, close_all
from .sdnotify import notify, watchdog_interval
from .worker import Service, Worker, build_runtime_parts, close_service

log = logging.getLogger("icpgate.supervisor")
service_log = logging.getLogger("icpgate.services")
SERVICE = -1  # the child number of the service process
READY_TIMEOUT = 300.0  # loading a large index takes a while
STOP_GRACE = 5.0
RESTART_DELAY = 0.5  # doubled for each further exit within STABLE_AFTER of the child's start
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def run_gate(config_path: Path, overrides: tuple[str, ...], service: Service | None = None) -> int:
    """`icpgate run`: check everything first, so a bad config fails before anything binds.

    `service` (feed client, violation upkeep, admin API) runs in the worker's loop with one
    worker, else in its own process. The caller sets up the metrics directory first (cli/main.py).
    """
    config = load_config(config_path, overrides)
    name_process("0" if config.gate.workers == 1 else "supervisor")
    # Not only a check: it creates what the workers then share (the TLS block page's CA, created
    # on first use), once and before any port accepts, rather than racing in N workers.
    build_runtime_parts(config)
    require_registry(config.registry_path)  # before forking: one clear error, not one per worker
    _raise_file_limit(config.gate.max_connections)
    sockets = bind_listeners(config.listeners)
    if config.gate.workers == 1:
        return _run_worker(config_path, overrides, lambda: notify("READY=1"), watchdog=True, service=service,
                           sockets=sockets)  # fmt: skip
    return Supervisor(config_path, overrides, config, sockets, service).run()


def _raise_file_limit(max_connections: int) -> None:
    """A relay holds two descriptors; shells start programs with a soft limit of 1024. Raise the
    soft limit to the hard one (as proxies do) and say so when even that is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 2 * max_connections + 64
    if hard != resource.RLIM_INFINITY and hard < needed:
        log.warning("open-file limit %d is below the %d that gate.max_connections = %d needs", hard, needed,
                    max_connections)  # fmt: skip


def _run_worker(config_path: Path, overrides: tuple[str, ...], on_ready: Callable[[], None], *, watchdog: bool,
                sockets: dict, service: Service | None = None, config: Config | None = None,
                table: ConnectionTable | None = None, number: int = 0) -> int:  # fmt: skip
    """Run one worker; with `watchdog`, ping systemd's watchdog from the moment it is ready."""

    async def main() -> None:
        pinger: asyncio.Task | None = None

        def ready() -> None:
            nonlocal pinger
            on_ready()
            if watchdog:
                pinger = asyncio.get_running_loop().create_task(_watchdog())

        try:
            await Worker(config_path, overrides, ready, service, sockets=sockets, config=config, table=table,
                         number=number).run()  # fmt: skip
        finally:
            if pinger:
                pinger.cancel()
            notify("STOPPING=1")

    uvloop.run(main())
    return 0


def load_valid_config(config_path: Path, overrides: tuple[str, ...]) -> Config:
    """The config as a worker's reload accepts it (pack and templates too); ConfigError if not."""
    config = load_config(config_path, overrides)
    build_runtime_parts(config)
    return config


def _run_service(service: Service, config: Config, config_path: Path, overrides: tuple[str, ...]) -> int:
    """The service process of a multi-worker daemon; workers follow its commits by polling.

    SIGHUP restarts the services with the new config, or keeps them running on the old one (and
    says why, once) when it is invalid, as the workers do. SIGTERM cancels them, which is safe:
    every registry write is a transaction. If the services fail, the process exits and the
    supervisor starts it again."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop, hup = asyncio.Event(), asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        running = loop.create_task(service(config, None))
        service_log.info("services started: feed client, violation upkeep, admin API (as configured)")
        stopping = loop.create_task(stop.wait())
        while True:
            reloading = loop.create_task(hup.wait())
            await asyncio.wait([running, stopping, reloading], return_when=asyncio.FIRST_COMPLETED)
            if running.done():
                reloading.cancel()
                stopping.cancel()
                running.result()  # raises what ended the services
                raise RuntimeError("the services ended")
            if stopping.done():
                service_log.info("stopping the services")
                reloading.cancel()
                await _cancel(running)
                await close_service(service)
                return
            hup.clear()
            try:
                new = load_valid_config(config_path, overrides)
            except (ConfigError, OSError) as error:  # OSError: a certificate or key that does not load
                for problem in error.problems if isinstance(error, ConfigError) else [error]:
                    service_log.error("reload refused, keeping the running config: %s", problem)
                continue
            await _cancel(running)
            running = loop.create_task(service(new, None))
            service_log.info("services restarted with the new config")

    uvloop.run(main())
    return 0


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _watchdog() -> None:
    interval = watchdog_interval()
    while interval:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def child_name(number: int) -> str:
    return "the service process" if number == SERVICE else "worker %d" % number


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return "was killed by signal %d (%s)" % (number, signal.Signals(number).name)
    return "exited with status %d" % os.waitstatus_to_exitcode(status)


class Supervisor:
    def __init__(self, config_path: Path, overrides: tuple[str, ...], config: Config, sockets: dict,
                 service: Service | None) -> None:  # fmt: skip
        self.config_path = config_path
        self.overrides = overrides
        self.config = config  # the last good one: a restarted service process starts with it
        self.count = config.gate.workers
        self.sockets = sockets
        self.service = service
        self.table = ConnectionTable(self.count)  # mapped before the forks: every worker shares it
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (child number, started at)
        self.ready: set[int] = set()  # worker numbers that reported ready
        self._quick_exits: dict[int, int] = {}  # child number -> exits in a row within STABLE_AFTER
        self._restarts: dict[int, float] = {}  # child number -> when to start it again
        self._signals: list[int] = []  # appended to by the signal handlers, taken by _take_signals
        self._reload_pending = False  # a SIGHUP that came during start-up
        self._ready_read, self._ready_write = os.pipe()
        self._wake_read, self._wake_write = os.pipe()
        self._pending = b""
        self._stopping = False

    def run(self) -> int:
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, lambda received, _frame: self._signals.append(received))
        for number in range(self.count):
            self._spawn(number)
        if self.service:
            self._spawn(SERVICE)
        try:
            if not self._start():
                return 0
            notify("READY=1")
            log.info("%d workers ready; plain HTTP is read by the %s engine%s", self.count, ENGINE,
                     " (%s)" % ENGINE_NOTE if ENGINE_NOTE else "")  # fmt: skip
            self._serve()
            return 0
        finally:
            notify("STOPPING=1")
            self._stop()

    def _start(self) -> bool:
        """Wait until every worker is ready: False if told to stop first; GateStartError if one fails."""
        deadline = time.monotonic() + READY_TIMEOUT
        while len(self.ready) < self.count:
            if time.monotonic() > deadline:
                waiting = sorted(set(range(self.count)) - self.ready)
                raise GateStartError("workers %s not ready after %gs" % (waiting, READY_TIMEOUT))
            self._wait(min(0.5, deadline - time.monotonic()))
            received = self._take_signals()
            self._reload_pending |= signal.SIGHUP in received
            if received & {signal.SIGTERM, signal.SIGINT}:
                log.info("stopped before the workers were ready")
                return False
            for number, status in self._reap():
                if number != SERVICE and os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
                    raise GateStartError("worker %d could not start (%s; its error is logged above)" % (
                        number, describe_exit(status)))  # fmt: skip
            self._restart_due()
        return True

    def _serve(self) -> None:
        interval = watchdog_interval()
        next_ping = 0.0
        while True:
            if interval and time.monotonic() >= next_ping:
                notify("WATCHDOG=1")
                next_ping = time.monotonic() + interval
            received = self._take_signals()
            if received & {signal.SIGTERM, signal.SIGINT}:
                return
            if signal.SIGHUP in received or self._reload_pending:
                self._reload_pending = False
                notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
                self._reload()
                notify("READY=1")
            self._reap()
            self._restart_due()
            wake_at = [next_ping if interval else time.monotonic() + 1.0, *self._restarts.values()]
            self._wait(max(min(wake_at) - time.monotonic(), 0.0))

    def _reload(self) -> None:
        """Forward SIGHUP; each child checks the new config itself. Keep it for restarts if it is valid."""
        with contextlib.suppress(Exception):  # the children say what is wrong; the supervisor must not fall
            self.config = load_valid_config(self.config_path, self.overrides)
        self._forward(signal.SIGHUP)

    def _take_signals(self) -> set[int]:
        """The signals received since the last call. pop() is atomic against the handlers, which
        run between any two bytecodes of this loop: rebuilding the list could lose a SIGTERM."""
        received = set()
        while self._signals:
            received.add(self._signals.pop())
        return received

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal arrives, a worker reports ready, or `timeout` passes."""
        try:
            readable, _, _ = select.select([self._ready_read, self._wake_read], [], [], timeout)
        except InterruptedError:
            return
        if self._wake_read in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 512)
        if self._ready_read in readable:
            self._pending += os.read(self._ready_read, 512)
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                self.ready.add(int(line))
                log.info("worker %s ready", line.decode())

    def _spawn(self, number: int) -> None:
        # Block the handled signals across fork: the child must not run the supervisor's handlers
        # between fork() and resetting them.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(number)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        self.children[pid] = (number, time.monotonic())
        log.info("started %s (pid %d)", child_name(number), pid)

    def _child(self, number: int) -> None:
        """Runs in the forked child; never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            for fd in (self._ready_read, self._wake_read, self._wake_write):
                os.close(fd)
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # systemd talks to the supervisor
                os.environ.pop(name, None)
            if number == SERVICE:
                name_process("service")
                os.close(self._ready_write)
                close_all(self.sockets)  # the service serves no gate port
                code = _run_service(self.service, self.config, self.config_path, self.overrides)
            else:
                name_process(str(number))
                ready_write = self._ready_write
                code = _run_worker(self.config_path, self.overrides, lambda: _write_all(ready_write, b"%d\n" % number),
                                   watchdog=False, sockets=self.sockets, config=self.config, table=self.table,
                                   number=number)  # fmt: skip
        except GateStartError as error:
            log.error("%s", error)
        except ConfigError as error:
            for problem in error.problems:
                log.error("cannot start with this config: %s", problem)
        except BaseException:
            log.exception("%s failed", child_name(number))
        finally:
            logging.shutdown()
            os._exit(code)

    def _reap(self) -> list[tuple[int, int]]:
        """(child number, wait status) of every child that has exited since the last call; each is
        logged, its live gauges removed, and, unless stopping, its restart scheduled."""
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # none left
                self.children.clear()
                return exited
            if pid == 0:
                return exited
            if pid not in self.children:
                continue
            number, started = self.children.pop(pid)
            self.ready.discard(number)
            if number != SERVICE:
                self.table.clear(number)  # its connections went with it
            if ENV in os.environ:  # its live gauges (connections, listeners) go with it
                multiprocess.mark_process_dead(pid)
            exited.append((number, status))
            if self._stopping:
                log.info("%s (pid %d) %s", child_name(number), pid, describe_exit(status))
                continue
            quick = time.monotonic() - started < STABLE_AFTER
            self._quick_exits[number] = self._quick_exits.get(number, 0) + 1 if quick else 0
            delay = min(RESTART_DELAY * 2 ** max(self._quick_exits[number] - 1, 0), MAX_RESTART_DELAY)
            self._restarts[number] = time.monotonic() + delay
            log.error("%s (pid %d) %s; restarting it in %gs", child_name(number), pid, describe_exit(status), delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for number, due in list(self._restarts.items()):
            if due <= now:
                del self._restarts[number]
                self._spawn(number)

    def _forward(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _stop(self) -> None:
        """Close the listening sockets (the port is free for a new daemon once the workers have
        closed theirs), let the children drain, then kill what is left."""
        self._stopping = True
        self._restarts.clear()
        close_all(self.sockets)
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.gate.drain_timeout + STOP_GRACE
        while self.children and time.monotonic() < deadline:
            self._reap()
            if self.children:
                self._wait(0.05)
        if self.children:
            for pid, (number, _) in self.children.items():
                log.error("%s (pid %d) did not stop in time; killing it", child_name(number), pid)
            self._forward(signal.SIGKILL)
            while self.children:
                self._reap()
                self._wait(0.05)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except OSError as error:
            if error.errno != errno.EINTR:
                raise
