"""A reload restarts the services with the new config, but the admin API answers all along: a
monitor that polls /readyz through reloads (the bypass watcher, inline) never sees a failure.

Before, the admin API's server was restarted with the services, and aiohttp's shutdown closed the
connections it had accepted and not yet read: such a request got no answer at all."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
from pathlib import Path

import pytest
from adminkit import admin_request, start_observed_gate

RELOADS = 12
POLLERS = 4


@pytest.mark.parametrize("workers", [1, 2])
def test_the_admin_api_answers_through_reloads(tmp_path: Path, origin, workers: int) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, workers=workers)
    answers: list[int] = []
    failures: list[str] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                answers.append(admin_request(observed.admin, "/readyz")[0])
            except (urllib.error.URLError, ConnectionError, OSError) as error:
                failures.append(repr(error))

    pollers = [threading.Thread(target=poll) for _ in range(POLLERS)]
    try:
        for thread in pollers:
            thread.start()
        for number in range(1, RELOADS + 1):
            observed.gate.signal(signal.SIGHUP)
            # each reload done (every worker reloaded, and the service process restarted) before the next
            deadline = time.monotonic() + 20
            while not _reloaded(observed.gate.log(), workers, number):
                assert time.monotonic() < deadline, observed.gate.log()[-3000:]
                time.sleep(0.05)
    finally:
        done.set()
        for thread in pollers:
            thread.join(timeout=15)
    log = observed.gate.log()
    observed.gate.stop()
    assert not failures, failures[:5]
    assert set(answers) == {200} and len(answers) > RELOADS, (len(answers), set(answers))
    assert log.count("admin API on") == 1, log[-3000:]  # one server all along
    assert "Traceback" not in log, log


def _reloaded(log: str, workers: int, number: int) -> bool:
    done = log.count("reloaded config") >= workers * number
    return done and (workers == 1 or log.count("services restarted") >= number)
