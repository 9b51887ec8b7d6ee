"""The process model: one process for one worker, else a supervisor and N forked workers.

Workers share the listening ports with SO_REUSEPORT and each load the index. The supervisor
holds no index and serves nothing: it reports readiness to systemd once every worker is up,
pings the watchdog, forwards SIGHUP and SIGTERM, and restarts a worker that dies. One more child,
the service process, runs the feed client, the violation upkeep and the admin API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import select
import signal
import time
from pathlib import Path

import uvloop
from prometheus_client import multiprocess

from ..config import load_config
from ..registry import require_registry
from ..sdnotify import notify, watchdog_interval
from ..telemetry.multiproc import ENV
from .worker import GateStartError, Service, Worker, build_runtime_parts

log = logging.getLogger("icpgate.supervisor")
RESTART_DELAY = 1.0
SERVICE = -1  # the child number of the service process
READY_TIMEOUT = 300.0  # loading a large index takes a while
STOP_GRACE = 5.0


def run_gate(config_path: Path, overrides: tuple[str, ...], service: Service | None = None) -> int:
    """`icpgate run`: check everything first, so a bad config fails before anything binds.

    `service` (feed client, violation upkeep, admin API) runs in the worker's loop with one
    worker, else in its own process. The caller sets up the metrics directory first (cli.py).
    """
    config = load_config(config_path, overrides)
    build_runtime_parts(config)
    require_registry(config.registry_path)  # before forking: one clear error, not one per worker
    _raise_file_limit(config.gate.max_connections)
    if config.gate.workers == 1:
        return _run_worker(config_path, overrides, lambda: notify("READY=1"), watchdog=True, service=service)
    return Supervisor(config_path, overrides, config.gate.workers, config.gate.drain_timeout, service).run()


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


def _run_worker(config_path: Path, overrides: tuple[str, ...], on_ready, *, watchdog: bool,
                service: Service | None = None) -> int:  # fmt: skip
    """Run one worker; with `watchdog`, ping systemd's watchdog from the moment it is ready."""

    async def main() -> None:
        pinger: asyncio.Task | None = None

        def ready() -> None:
            nonlocal pinger
            on_ready()
            if watchdog:
                pinger = asyncio.get_running_loop().create_task(_watchdog())

        try:
            await Worker(config_path, overrides, ready, service).run()
        finally:
            if pinger:
                pinger.cancel()
            notify("STOPPING=1")

    uvloop.run(main())
    return 0


def _run_service(service: Service, config) -> int:
    """The service process of a multi-worker daemon; workers follow its commits by polling.
    SIGHUP ends it (signals are at their defaults here) and the supervisor starts it afresh with
    the new config; SIGTERM ends it at once, which is safe: every registry write is a transaction."""
    uvloop.run(service(config, None))
    return 0


async def _watchdog() -> None:
    interval = watchdog_interval()
    while interval:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


class Supervisor:
    def __init__(self, config_path: Path, overrides: tuple[str, ...], workers: int, drain_timeout: float,
                 service: Service | None) -> None:  # fmt: skip
        self.config_path = config_path
        self.overrides = overrides
        self.count = workers
        self.drain_timeout = drain_timeout
        self.service = service
        self.children: dict[int, int] = {}  # pid -> worker number (SERVICE for the service process)
        self._signals: list[int] = []

    def run(self) -> int:
        ready_read, ready_write = os.pipe()
        for number in range(self.count):
            self._spawn(number, ready_write)
        if self.service:
            self._spawn(SERVICE, ready_write)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda received, _frame: self._signals.append(received))
        if not self._await_ready(ready_read):
            self._stop()
            raise GateStartError("the workers did not become ready (their errors are logged above)")
        notify("READY=1")
        log.info("%d workers ready", self.count)
        interval = watchdog_interval()
        next_ping = 0.0
        while True:
            if interval and time.monotonic() >= next_ping:
                notify("WATCHDOG=1")
                next_ping = time.monotonic() + interval
            while self._signals:
                received = self._signals.pop(0)
                if received in (signal.SIGTERM, signal.SIGINT):
                    notify("STOPPING=1")
                    self._stop()
                    return 0
                if received == signal.SIGHUP:
                    notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
                    self._forward(signal.SIGHUP)
                    notify("READY=1")
            self._reap_and_restart(ready_write)
            self._drain_pipe(ready_read)
            time.sleep(0.2)

    def _spawn(self, number: int, ready_write: int) -> None:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                if number == SERVICE:
                    code = _run_service(self.service, load_config(self.config_path, self.overrides))
                else:
                    code = _run_worker(
                        self.config_path, self.overrides, lambda: os.write(ready_write, b"1"), watchdog=False
                    )
            except GateStartError as error:
                log.error("worker %d: %s", number, error)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                os._exit(code)
        self.children[pid] = number

    def _await_ready(self, ready_read: int) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        ready = 0
        while ready < self.count and time.monotonic() < deadline:
            if signal.SIGTERM in self._signals or signal.SIGINT in self._signals:
                return False
            readable, _, _ = select.select([ready_read], [], [], 0.5)
            if readable:
                ready += len(os.read(ready_read, 64))
            if self._reap():
                return False  # a worker died while starting: the config or the registry is bad
        return ready >= self.count

    def _reap(self) -> list[tuple[int, int, int]]:
        """(pid, status, worker number) of every worker that has exited since the last call."""
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return exited
            if pid == 0:
                return exited
            number = self.children.pop(pid, None)
            if number is not None:
                exited.append((pid, status, number))

    def _reap_and_restart(self, ready_write: int) -> None:
        for pid, status, number in self._reap():
            if ENV in os.environ:  # its live gauges (connections, listeners) go with it
                multiprocess.mark_process_dead(pid)
            if number == SERVICE:
                log.info("restarting the service process (pid %d, status %d)", pid, status)
                self._spawn(number, ready_write)
                continue
            log.error("worker %d (pid %d) exited with status %d; restarting", number, pid, status)
            time.sleep(RESTART_DELAY)
            self._spawn(number, ready_write)

    def _drain_pipe(self, ready_read: int) -> None:
        while select.select([ready_read], [], [], 0)[0]:
            os.read(ready_read, 64)

    def _forward(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                self.children.pop(pid, None)

    def _stop(self) -> None:
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + STOP_GRACE
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        self._forward(signal.SIGKILL)
