"""One log line per blocked request, sampled and rate-limited, carrying the block page's request id.

A block that monitor mode or a stale feed let through gets the same line, saying "passed" and the mode.

Support finds a customer's blocked request from the id on their screenshot. A flood of junk must
not become a flood of log lines: past `lines_per_second` lines are counted, not written. The host
is the client's (a refused name as it came): it is written escaped, so that it stays one field of
one line whatever it holds.
"""

from __future__ import annotations

import logging
import random
import time

from ..policy.decide import Mode, Verdict
from ..telemetry.printable import printable_name

log = logging.getLogger("icpgate.blocks")


class BlockLog:
    __slots__ = ("_allowance", "_checked", "rate", "sample_rate", "suppressed")

    def __init__(self, sample_rate: float, lines_per_second: float) -> None:
        self.configure(sample_rate, lines_per_second)
        self._allowance = lines_per_second
        self._checked = time.monotonic()
        self.suppressed = 0  # sampled lines not written because of the rate limit

    def configure(self, sample_rate: float, lines_per_second: float) -> None:
        self.sample_rate = sample_rate
        self.rate = lines_per_second

    def blocked(self, verdict: Verdict, request_id: str, kind: str, client: tuple[str, int],
                destination: tuple[str, int]) -> None:  # fmt: skip
        """Log a block, or a block that monitor mode or a stale feed let through (`verdict.passed`)."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._checked) * self.rate)
        self._checked = now
        if self._allowance < 1.0:
            self.suppressed += 1
            return
        self._allowance -= 1.0
        event = "passed" if verdict.passed else "blocked"
        host = printable_name(verdict.host)
        log.info(
            "%s %s request_id=%s host=%s reason=%s rule=%s mode=%s client=%s:%d dst=%s:%d",
            _EVENT_TEXT[verdict.mode], kind, request_id, host or "-", verdict.reason.value, verdict.rule,
            verdict.mode.value, client[0], client[1], destination[0], destination[1],
            extra={"event": event, "request_id": request_id, "proto": kind, "host": host,
                   "reason": verdict.reason.value, "rule": verdict.rule, "mode": verdict.mode.value,
                   "client": "%s:%d" % client, "destination": "%s:%d" % destination},
        )  # fmt: skip


# The line's first words: what the gate did, and in which mode.
_EVENT_TEXT = {Mode.ENFORCE: "blocked", Mode.MONITOR: "passed (monitor mode)", Mode.OPEN: "passed (stale feed, open)"}
