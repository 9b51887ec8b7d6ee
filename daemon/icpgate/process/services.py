"""What runs beside the gate workers: the feed client, violation upkeep, site inspection, the fleet's
shipper and the admin API.

With one worker they run in its event loop; with several, in one supervised service process (one
process owns the state and its writers, N workers serve), which restarts them with the new config
on SIGHUP (process/supervisor.py, docs/gate.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from ..admin.runner import AdminServer
from ..config.settings import Config
from ..feed.client import run_feed
from ..inspection.schedule import run_scheduled
from ..policy.pack import load_pack
from ..reports.dns_check import Confirmer, hosted_ranges
from ..telemetry.metrics import FLEET_DROPPED
from ..violations.store import ViolationStore, open_violations

log = logging.getLogger("icpgate.services")
PRUNE_INTERVAL = 3600.0


class Services:
    """The daemon's services, as `run_gate` takes them: each call runs them with a config until
    cancelled (a reload cancels them and calls again with the new one); the admin API's server
    outlives the calls, so a reload never refuses or cuts an admin request. `close` when the
    daemon stops."""

    def __init__(self, admin_socket: socket.socket | None) -> None:
        self.admin = AdminServer(admin_socket) if admin_socket is not None else None

    async def __call__(self, config: Config, on_applied: Callable[[int], None] | None) -> None:
        await run_services(config, on_applied, admin=self.admin)

    async def close(self) -> None:
        if self.admin is not None:
            await self.admin.close()


def services(admin_socket: socket.socket | None) -> Services:
    """The daemon's service, with the admin API on `admin_socket` (if any)."""
    return Services(admin_socket)


async def run_services(config: Config, on_applied: Callable[[int], None] | None, *,
                       admin: AdminServer | None) -> None:  # fmt: skip
    async with asyncio.TaskGroup() as group:
        if config.feed.urls:
            group.create_task(run_feed(config, on_applied))
        group.create_task(upkeep_violations(config))
        if config.inspect.enabled:
            group.create_task(run_scheduled(config))
        if config.fleet.enabled:
            # Imported here, in the service process after the fork: the workers never load psycopg.
            from ..fleet.service import run_fleet

            group.create_task(run_fleet(config))
        if admin is not None:
            group.create_task(admin.serve(config))


async def upkeep_violations(config: Config) -> None:
    """Expire old records (and their sample client addresses); confirm new hosts with DNS."""
    async with open_violations(config.violations.path) as store, asyncio.TaskGroup() as group:
        if config.dns.enabled:
            ranges = hosted_ranges(config.dns, load_pack(config.policy_pack).policy.enforce_ranges)
            group.create_task(Confirmer(config.dns, store, ranges).run())
        group.create_task(_prune(config, store))


async def _prune(config: Config, store: ViolationStore) -> None:
    """A failed pass (the log locked past its busy timeout) is logged and tried again; it must not
    take the feed client and the admin API down with it."""
    while True:
        before = time.time() - config.violations.retention
        try:
            removed = await store.prune(before, hold_unshipped=config.fleet.enabled)
            if config.fleet.enabled and (dropped := await store.drop_held(before, config.fleet.max_backlog)):
                FLEET_DROPPED.inc(dropped)
                log.error("violation log: %d unshipped records dropped: past the retention and beyond"
                          " fleet.max_backlog = %d while the central store is away", dropped,
                          config.fleet.max_backlog)  # fmt: skip
        except Exception as error:
            log.error("violation log %s: cannot remove expired records: %s", store.path, error)
        else:
            if removed:
                log.info("violation log: %d records past the %gs retention removed", removed,
                         config.violations.retention)  # fmt: skip
        await asyncio.sleep(min(PRUNE_INTERVAL, config.violations.retention / 10))
