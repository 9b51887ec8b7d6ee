"""`icpgate bypass watch`: turn the bypass on while the gate is down or not ready, off once it is back.

It runs apart from the gate (systemd/icpgate-bypass.service), so it outlives a gate that crashed,
hangs or is being restarted. It polls /readyz; after `fail_after` failures in a row (no answer, or
not ready for any reason but an expired feed) it puts the hosted ranges in the bypass sets, after
`recover_after` successes in a row it takes them out. A change needs that many polls in a row that
disagree with the current state, so it can never flap faster than the thresholds allow. It keeps
no state of its own beyond the counts: a restarted watcher leaves a bypass that is on in place
until the gate has recovered.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..config.settings import Config
from .bypass import BypassSets, Network, NftError

log = logging.getLogger("icpgate.bypass")


@dataclass(frozen=True)
class WatchSettings:
    ready_url: str
    interval: float = 2.0
    fail_after: int = 3
    recover_after: int = 5
    timeout: float = 2.0


def ready_url(config: Config) -> str:
    """The admin API's /readyz, from the config the gate runs with."""
    if not config.admin.enabled:
        raise ValueError("the admin API is off in %s (admin.enabled): give --ready-url" % config.source)
    host = config.admin.address
    return "http://%s:%d/readyz" % ("[%s]" % host if ":" in host else host, config.admin.port)


# /readyz checks that fail without stopping the gate from serving: not a reason to bypass it.
LEFT_TO_THE_GATE = frozenset({"feed"})
# Straight to the admin API: an http_proxy in the service's environment must not answer for the gate.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(url: str, timeout: float) -> str | None:
    """None when the gate can serve; otherwise why not, for the log. A 503 for the feed alone is
    not a failure here: an expired feed is feed.stale_mode's to handle (by default the gate goes on
    enforcing the last good registry), and the bypass would enforce nothing instead."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return None if response.status == 200 else "HTTP %d" % response.status
    except urllib.error.HTTPError as error:
        failed = _failed_checks(error.read())
        if failed and failed <= LEFT_TO_THE_GATE:
            return None
        return "HTTP %d%s" % (error.code, " (not ready: %s)" % ", ".join(sorted(failed)) if failed else "")
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", None) or error)


def _failed_checks(body: bytes) -> set[str]:
    """The names of the /readyz checks that failed; empty when the body is not /readyz's."""
    try:
        checks = json.loads(body)["checks"]
        return {name for name, check in checks.items() if not check["ok"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        return set()


class Watcher:
    """The hysteresis: counts of polls in a row, and the state the sets were last seen in."""

    def __init__(self, sets: BypassSets, ranges: tuple[Network, ...], settings: WatchSettings) -> None:
        self.sets = sets
        self.ranges = ranges
        self.settings = settings
        self.failures = 0
        self.successes = 0
        self.state = "unknown"  # "on", "off" or "partial", as the sets were last read

    def start(self) -> None:
        self.state = self.sets.status(self.ranges).state
        log.info("watching %s every %gs: bypass on after %d failures in a row, off after %d successes; "
                 "bypass is %s for %s", self.settings.ready_url, self.settings.interval, self.settings.fail_after,
                 self.settings.recover_after, self.state, _names(self.ranges))  # fmt: skip

    def observe(self, failure: str | None) -> None:
        """Count one poll's result; past a threshold, make the sets agree with it."""
        if failure is None:
            if self.failures:
                log.info("/readyz answers ready again after %d failure(s)", self.failures)
            self.failures, self.successes = 0, self.successes + 1
            if self.successes >= self.settings.recover_after:
                self._reconcile("off", "ready %d times in a row" % self.successes)
        else:
            if not self.failures:
                log.warning("/readyz failed: %s", failure)
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.settings.fail_after:
                self._reconcile("on", "failed %d times in a row (last: %s)" % (self.failures, failure))

    def _reconcile(self, wanted: str, why: str) -> None:
        """Read the sets each time rather than trust memory: a reloaded ruleset empties them, and
        an operator may have switched by hand; while the watcher runs, it owns them."""
        try:
            self.state = self.sets.status(self.ranges).state
            if self.state == wanted:
                return
            if wanted == "on":
                self.sets.turn_on(self.ranges)
            else:
                self.sets.turn_off(self.ranges)
        except NftError as error:  # tried again at the next poll
            log.error("cannot turn the bypass %s: %s", wanted, error)
            return
        self.state = wanted
        if wanted == "on":
            log.warning("bypass ON: /readyz %s; %s are routed around the gate, unchecked", why, _names(self.ranges))
        else:
            log.warning("bypass OFF: /readyz %s; %s are steered to the gate again", why, _names(self.ranges))

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; leaves the sets as they are when it ends."""
        while not stop.is_set():
            self.observe(probe(self.settings.ready_url, self.settings.timeout))
            stop.wait(self.settings.interval)
        log.info("stopped; the bypass stays %s", self.state)


def watch(sets: BypassSets, ranges: tuple[Network, ...], settings: WatchSettings) -> None:
    """Run a watcher in the foreground until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    watcher = Watcher(sets, ranges, settings)
    watcher.start()
    watcher.run(stop)


def _names(ranges: tuple[Network, ...]) -> str:
    return ", ".join(str(net) for net in ranges)
