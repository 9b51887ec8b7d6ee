"""The scheduled inspection in the service process (`[inspect] enabled`): a session every
`inspect.interval`, and at once after a restart that interrupted one.

A failure (the registry or the history locked past its busy timeout, no resolver) is logged and
tried again later; it never takes the feed client or the admin API down with it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..config.settings import Config
from ..registry.store import open_registry
from .report import summary
from .run import Busy, Inspection, client_for, exclusive
from .store import open_inspection

log = logging.getLogger("icpgate.inspect")
RETRY = 300.0  # seconds after a failed session, or while another process holds the lock
MAX_SLEEP = 3600.0  # the schedule is looked at again at least this often


async def run_scheduled(config: Config) -> None:
    while True:
        try:
            wait = await _session_if_due(config)
        except asyncio.CancelledError:
            raise
        except Busy as error:
            log.info("%s; the scheduled one waits", error)
            wait = RETRY
        except Exception:
            log.exception("site inspection failed; trying again in %gs", RETRY)
            wait = RETRY
        await asyncio.sleep(min(wait, MAX_SLEEP))


async def _session_if_due(config: Config) -> float:
    """Run a session if one is due; return the seconds until the next one is."""
    with exclusive(config.inspect.path):
        async with open_inspection(config.inspect.path) as store:
            last = await store.last_pass()
            due = 0.0 if last is None or last.state == "running" else last.session_started + config.inspect.interval
            if time.time() < due:
                return due - time.time()
            async with open_registry(config.registry_path, create=False) as registry:
                await Inspection(config, registry, store, client_for(config)).session()
            facts = await summary(config, store, time.time())
    if facts["hollow_share"] > config.inspect.hollow_alert_share:
        log.warning("site inspection: %d of %d filings with our access are hollow (%.0f%%, above"
                    " inspect.hollow_alert_share): review them (docs/inspection.md)", facts["filings"]["hollow"],
                    facts["filings_total"], 100 * facts["hollow_share"])  # fmt: skip
    return config.inspect.interval
