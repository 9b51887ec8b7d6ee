"""Long-lived connections spread evenly over the workers of one daemon.

The workers accept from one shared queue per listener (process/listen.py says why not
SO_REUSEPORT), and the kernel hands each connection to whichever worker is awake first: one took
68–89 % of long-lived connections. So each worker publishes its open connections in a table the
supervisor maps before it forks, and a worker above its fair share stops accepting (closes its
own duplicate of each listening socket: the queue stays, and the other workers take from it). The
worker that then takes a connection wakes it, through its pipe, as soon as it is back at its share:
a burst of connections is over in milliseconds, a timer would see it too late.

A worker whose heartbeat is older than `STALE_AFTER` (stopped, stuck, dead) is left out of the
share, and a paused worker resumes when no other accepts, so none ever waits for one that cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("icpgate.gate")
HEARTBEAT = 0.1  # seconds between a worker's publications of its count
STALE_AFTER = 1.0  # a worker silent this long takes no part in the share
# A worker counts as accepting (so another may pause for it) only if heard from this lately: one
# whose loop is blocked takes no connection, paused or not.
ACCEPTS_WITHIN = 0.25
SLACK = 0.1  # above its share by more than this fraction (and MIN_SLACK connections), a worker pauses
MIN_SLACK = 3.0


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000  # CLOCK_MONOTONIC: one clock for every process of the machine


class ConnectionTable:
    """Per worker, in memory shared across fork(): open connections, heartbeat, paused, woken; and
    a pipe that wakes it."""

    FIELDS = 4

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._memory = mmap.mmap(-1, 8 * self.FIELDS * workers)
        self._slots = memoryview(self._memory).cast("q")
        self.pipes = [os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for _ in range(workers)]

    def publish(self, worker: int, connections: int, paused: bool, now: int) -> None:
        at = self.FIELDS * worker
        self._slots[at] = connections
        self._slots[at + 1] = now
        self._slots[at + 2] = paused
        self._slots[at + 3] = 0  # awake: another wake-up may be sent

    def clear(self, worker: int) -> None:
        """The supervisor, for a worker that exited: its connections went with it."""
        at = self.FIELDS * worker
        self._slots[at : at + self.FIELDS] = memoryview(bytes(8 * self.FIELDS)).cast("q")

    def look(self, worker: int, connections: int, now: int) -> tuple[float, bool]:
        """The mean of the open connections of `worker` (`connections` now) and of every worker
        heard from lately, and whether one of those others accepts, or is about to: a paused one
        back at that share is woken (once until it publishes again). So in a burst of new
        connections the worker taking them pauses too, rather than taking the whole burst while
        the other wakes up."""
        oldest, lively = now - int(STALE_AFTER * 1000), now - int(ACCEPTS_WITHIN * 1000)
        slots, fields = self._slots, self.FIELDS
        total, counted, others_accept = connections, 1, False
        paused: list[int] = []
        for other in range(self.workers):
            at = fields * other
            if other != worker and slots[at + 1] >= oldest:
                total += slots[at]
                counted += 1
                if slots[at + 2]:
                    paused.append(other)
                elif slots[at + 1] >= lively:
                    others_accept = True
        share = total / counted
        for other in paused:
            at = fields * other
            if slots[at] <= share and slots[at + 1] >= lively:  # due to resume: it will accept
                others_accept = True
                if not slots[at + 3]:
                    slots[at + 3] = 1
                    with contextlib.suppress(BlockingIOError):  # full: it has wake-ups to read already
                        os.write(self.pipes[other][1], b"\0")
        return share, others_accept

    def wake_fd(self, worker: int) -> int:
        return self.pipes[worker][0]


class AcceptBalance:
    """One worker's side. Told of each connection it accepts (`accepted`), it pauses accepting
    when above its share while another worker accepts; told of each close (`closed`), it publishes
    its count at once, since the others weigh new connections by it; `keep` publishes it every
    HEARTBEAT and whenever it is woken, and resumes accepting once it is back at its share or no
    other worker accepts. `pause` and `resume` act on the listeners."""

    def __init__(self, table: ConnectionTable, worker: int, count: Callable[[], int],
                 pause: Callable[[], None], resume: Callable[[], Awaitable[None]]) -> None:  # fmt: skip
        self.table = table
        self.worker = worker
        self.count = count
        self._pause = pause
        self._resume = resume
        self.paused = False
        self._failing = False  # resuming failed last time: said once, not at every tick
        self._woken = asyncio.Event()

    def accepted(self, connections: int) -> None:
        now = _now_ms()
        share, others_accept = self.table.look(self.worker, connections, now)
        if not self.paused and others_accept and connections > share + max(MIN_SLACK, share * SLACK):
            self.paused = True
            self._pause()
        self.table.publish(self.worker, connections, self.paused, now)

    def closed(self, connections: int) -> None:
        """A count left high until the next heartbeat would keep the other workers from pausing:
        after many closes here, the next burst would go to them alone."""
        self.table.publish(self.worker, connections, self.paused, _now_ms())

    async def tick(self) -> None:
        connections, now = self.count(), _now_ms()
        share, others_accept = self.table.look(self.worker, connections, now)
        if self.paused and (connections <= share or not others_accept):
            self.paused = False
            try:
                await self._resume()
            except OSError as error:  # out of descriptors, say: paused still, tried again at the next tick
                self.paused = True
                if not self._failing:
                    log.error("cannot accept again: %s; trying again every %gs", error, HEARTBEAT)
                self._failing = True
            else:
                if self._failing:
                    log.info("accepting again")
                self._failing = False
        self.table.publish(self.worker, connections, self.paused, _now_ms())

    async def keep(self) -> None:
        """Tick every HEARTBEAT, and when another worker wakes this one; runs until cancelled."""
        wake = self.table.wake_fd(self.worker)
        loop = asyncio.get_running_loop()
        loop.add_reader(wake, self._read_wake, wake)
        try:
            while True:
                await self.tick()
                # Not asyncio.wait_for: on 3.11 it can swallow the cancel that ends this at the drain.
                timer = loop.call_later(HEARTBEAT, self._woken.set)
                try:
                    await self._woken.wait()
                finally:
                    timer.cancel()
                self._woken.clear()
        finally:
            loop.remove_reader(wake)

    def _read_wake(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 512):
                pass
        self._woken.set()
