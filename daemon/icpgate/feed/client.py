"""The feed client: keep a registry in sync with a publisher, refusing anything doubtful.

One sync asks the sources in order for the changes since the registry's serial (or a snapshot
when there is none, or the history is gone), checks signature, header, serial and records, and
applies the result as one registry transaction that also checks the checksum and the guards.
Whatever it refuses leaves the last good registry in force; every outcome is recorded in the
registry's sync status, where `icpgate feed status`, the workers and the admin side read it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

from ..config.settings import Config
from ..registry.store import Guard, ImportReport, Refusal, Registry, RegistryState, Update, open_registry
from .protocol import MAX_INFLATION, Body, FeedError, SyncResult, decode
from .signing import load_public_keys, verify
from .sources import Answer, Fetched, FileSource, HttpSource
from .tokens import read_token

log = logging.getLogger("icpgate.feed")
_REFUSALS = {
    Refusal.GUARD: SyncResult.REFUSED_GUARD,
    Refusal.CHECKSUM: SyncResult.REFUSED_CHECKSUM,
    Refusal.ROLLBACK: SyncResult.REFUSED_ROLLBACK,
}
SUCCESS = frozenset({SyncResult.APPLIED, SyncResult.UNCHANGED})


@dataclass
class Outcome:
    result: SyncResult
    message: str = ""
    source: str = ""
    serial: int = 0  # the registry's serial afterwards
    target: int | None = None  # the serial the update brings (or would bring, in a dry run)
    report: ImportReport | None = None  # when an update was applied, refused by a guard, or diffed
    poll_interval: float = 0.0
    etag: str = ""
    checksum_mismatch: bool = False  # a change set did not add up; a snapshot was taken instead
    failures: list[str] = field(default_factory=list)  # sources tried before this one, and why they failed


class FeedClient:
    """Use as `async with FeedClient(config, registry) as client:`; it owns an HTTP session."""

    def __init__(self, config: Config, registry: Registry, on_applied: Callable[[int], None] | None = None) -> None:
        self.config = config.feed
        self.registry = registry
        self.on_applied = on_applied
        self.keys = load_public_keys(config.feed.public_keys)
        self.token = read_token(config.feed.token_file) if config.feed.token_file else None
        self.guard = Guard(config.feed.guard_share, config.feed.guard_min_filings)
        self._publisher: tuple[int, str | None] | None = None  # the serial (and checksum) last heard of
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FeedClient:
        headers = {"User-Agent": "icpgate-feed"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token  # aiohttp drops it on a redirect to another host
        self.session = aiohttp.ClientSession(headers=headers)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.close()

    async def run(self) -> None:
        """Sync for ever: long-poll while things go well, back off (with jitter) while they do not."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.uniform(0, self.config.start_delay))
        failures = 0
        wait = 0.0
        while True:
            started = loop.time()
            try:
                outcome = await self.sync(wait=wait)
            except Exception as error:  # a bug must not end syncing; the last good registry stays
                log.exception("feed sync failed")
                outcome = Outcome(SyncResult.ERROR, "internal error: %s" % error)
            if outcome.result in SUCCESS:
                failures = 0
                wait = self.config.wait
                delay = max(self.config.min_interval, outcome.poll_interval) - (loop.time() - started)
            else:
                failures += 1
                wait = 0.0
                delay = backoff(failures, self.config.backoff_initial, self.config.backoff_max)
            await asyncio.sleep(max(0.0, delay))

    async def sync(self, *, wait: float = 0.0, force: bool = False, dry_run: bool = False) -> Outcome:
        """One sync from the first source that works. `force` skips the guards (after a human
        looked at `icpgate feed diff`); `dry_run` stops before the commit and reports.

        A registry deleted or replaced at the path is followed (created if missing): the sync goes
        into the file there, not into one nobody else reads. The gate keeps enforcing its index until
        the operator adopts that registry (registry/index_store.py). The sync status goes with it: it
        is the record of this feed's syncs (the freshness of the index the gate enforces), not of the
        file, and it names the registry it succeeded into, so the new one starts with a snapshot."""
        status = await self.registry.sync_status()
        carried = status | {"registry": status.get("registry") or (await self.registry.state()).registry_id}
        if await self.registry.follow(create=not dry_run, sync_status=None if dry_run else carried):
            log.warning("feed: %s is another file now: syncing into it; the gate keeps enforcing its index until"
                        " it is adopted (icpgate registry adopt, or a reload)", self.registry.path)  # fmt: skip
        state = await self.registry.state()
        status = await self.registry.sync_status()
        failed: list[Outcome] = []
        for url in self.config.urls:
            source = FileSource(url, self.config) if url.startswith("file:") else HttpSource(url, self.config,
                                                                                            self.session)  # fmt: skip
            try:
                outcome = await self._sync_from(source, state, status, wait, force, dry_run)
            except FeedError as error:
                failed.append(Outcome(error.result, error.message, url, state.serial))
                continue
            outcome.source = url
            if outcome.result in SUCCESS or outcome.result is SyncResult.REFUSED_GUARD:
                outcome.failures = ["%s: %s" % (f.source, f.message) for f in failed]
                break
            failed.append(outcome)
        else:
            outcome = _worst(failed, state.serial)
        if not dry_run:
            await self._record(outcome, status, state.registry_id)
        return outcome

    async def _sync_from(self, source, state: RegistryState, status: dict, wait: float, force: bool,
                         dry_run: bool) -> Outcome:  # fmt: skip
        ours = status.get("registry", state.registry_id) == state.registry_id  # else: carried from another
        if state.serial == 0 or not status.get("last_success") or not ours:
            return await self._snapshot(source, state, status if ours else {}, force, dry_run)  # no etag of theirs
        fetched = await source.changes(state.serial, wait)
        self._heard(fetched.serial, fetched.checksum)
        if fetched.answer is Answer.UNCHANGED:
            if fetched.serial is not None and fetched.serial < state.serial:
                return _behind(fetched.serial, state.serial)
            return Outcome(SyncResult.UNCHANGED, serial=state.serial, poll_interval=fetched.poll_interval)
        if fetched.answer is Answer.BEHIND:
            return _behind(fetched.serial, state.serial)
        if fetched.answer is Answer.GONE:
            return await self._snapshot(source, state, status, force, dry_run)
        body = self._decode(fetched, "changes")
        self._heard(body.header.serial, body.header.sha256)
        if body.header.since != state.serial:
            raise FeedError(SyncResult.REFUSED_MALFORMED, "changes since %s, but we asked for those since %d"
                            % (body.header.since, state.serial))  # fmt: skip
        if body.header.serial <= state.serial:
            return _behind(body.header.serial, state.serial)
        update = Update(body.records, source.url, "changes",
                        removals=body.removals, serial=body.header.serial, checksum=body.header.sha256)  # fmt: skip
        outcome = await self._apply(update, state, force, dry_run, fetched)
        if outcome.result is SyncResult.REFUSED_CHECKSUM:
            log.warning("feed: the changes to serial %d do not add up (%s); taking a snapshot",
                        body.header.serial, outcome.message)  # fmt: skip
            outcome = await self._snapshot(source, state, status, force, dry_run)
            outcome.checksum_mismatch = True
        return outcome

    async def _snapshot(self, source, state: RegistryState, status: dict, force: bool, dry_run: bool) -> Outcome:
        fetched = await source.snapshot(status.get("etag", "") if state.serial else "")
        self._heard(fetched.serial, fetched.checksum)
        if fetched.answer is not Answer.BODY:
            return Outcome(SyncResult.UNCHANGED, serial=state.serial, poll_interval=fetched.poll_interval)
        body = self._decode(fetched, "snapshot")
        header = body.header
        self._heard(header.serial, header.sha256)
        if header.serial < state.serial:
            return _behind(header.serial, state.serial)
        if header.serial == state.serial:
            if header.sha256 == state.checksum:
                return Outcome(SyncResult.UNCHANGED, serial=state.serial, poll_interval=fetched.poll_interval,
                               etag=fetched.etag)  # fmt: skip
            return Outcome(SyncResult.REFUSED_ROLLBACK, "the snapshot has our serial %d but other contents: the"
                           " publisher's history differs from ours" % state.serial, serial=state.serial)  # fmt: skip
        update = Update(body.records, source.url, "snapshot", replace=True, serial=header.serial,
                        checksum=header.sha256)  # fmt: skip
        return await self._apply(update, state, force, dry_run, fetched)

    def _heard(self, serial: int | None, checksum: str | None) -> None:
        """The publisher's serial, and its checksum there when the answer said: the fleet's heartbeat
        compares them with the registry's (feed lag; a registry unlike the publisher's at its serial)."""
        if serial is not None:
            self._publisher = (serial, checksum)

    def _decode(self, fetched: Fetched, kind: str) -> Body:
        verify(self.keys, fetched.body, fetched.signature)  # before inflating anything
        return decode(fetched.body, self.config.max_body * MAX_INFLATION, kind)

    async def _apply(self, update: Update, state: RegistryState, force: bool, dry_run: bool,
                     fetched: Fetched) -> Outcome:  # fmt: skip
        report = await self.registry.apply(update, guard=None if force else self.guard, dry_run=dry_run)
        outcome = Outcome(SyncResult.APPLIED, serial=report.serial, target=update.serial, report=report,
                          poll_interval=fetched.poll_interval, etag=fetched.etag)  # fmt: skip
        if report.error_count:
            first = report.errors[0]
            more = " (and %d more)" % (report.error_count - 1) if report.error_count > 1 else ""
            outcome.result, outcome.message = SyncResult.REFUSED_MALFORMED, "%s%s" % (first, more)
        elif report.refused:
            outcome.result, outcome.message = _REFUSALS[report.refused], report.refusal
        elif not dry_run and not report.committed:
            outcome.result, outcome.message = SyncResult.UNCHANGED, "serial %d was already applied" % report.serial
        elif dry_run:
            outcome.message = "dry run: nothing applied"
        else:
            outcome.message = "serial %d -> %d: %d added, %d changed, %d removed" % (
                state.serial, report.serial, report.inserted, report.updated, report.removed)  # fmt: skip
            if self.on_applied:
                self.on_applied(report.serial)
        return outcome

    async def _record(self, outcome: Outcome, status: dict, registry: str) -> None:
        now = _now()
        ok = outcome.result in SUCCESS
        results = dict(status.get("results", {}))
        results[outcome.result.value] = results.get(outcome.result.value, 0) + 1
        report = outcome.report
        pending = None
        if outcome.result is SyncResult.REFUSED_GUARD and report:
            pending = {"added": report.inserted, "changed": report.updated, "removed": report.removed,
                       "message": outcome.message}  # fmt: skip
        status = status | {
            "sources": list(self.config.urls),
            "source": outcome.source,
            "last_attempt": now,
            "last_result": outcome.result.value,
            "last_message": outcome.message,
            "failures": 0 if ok else status.get("failures", 0) + 1,
            "results": results,
            "checksum_mismatches": status.get("checksum_mismatches", 0) + int(outcome.checksum_mismatch),
            "pending": pending,
        }
        if self._publisher is not None:
            serial, checksum = self._publisher
            if checksum is None and serial == status.get("publisher_serial"):
                checksum = status.get("publisher_checksum")
            status |= {"publisher_serial": serial, "publisher_checksum": checksum}
            if outcome.serial >= serial:
                status["in_step_at"] = now  # at the publisher's serial (or past it, by a local import)
        if ok:
            status["last_success"] = now
            status["registry"] = registry  # the registry this success is of (see `sync`)
            status["last_error"] = ""
            status["etag"] = outcome.etag or status.get("etag", "")
            if outcome.result is SyncResult.APPLIED:
                status["last_applied"] = now
        else:
            status["last_error"] = outcome.message
            status["last_error_at"] = now
        await self.registry.set_sync_status(status)
        if outcome.result is SyncResult.APPLIED and not self.keys:
            log.warning("feed: %s from %s: UNSIGNED data applied without a signature check"
                        " (feed.allow_unsigned = true)", outcome.message, outcome.source)  # fmt: skip
        elif outcome.result is SyncResult.APPLIED:
            log.info("feed: %s from %s", outcome.message, outcome.source)
        elif outcome.result is SyncResult.ERROR:
            log.warning("feed: %s; keeping serial %d", outcome.message, outcome.serial)
        elif not ok:
            log.error("feed: %s: %s; keeping serial %d", outcome.result.value, outcome.message, outcome.serial)


def backoff(failures: int, initial: float, cap: float) -> float:
    """Exponential, capped, with jitter: between half and all of min(cap, initial * 2^(failures-1))."""
    ceiling = min(cap, initial * 2 ** min(failures - 1, 32))
    return random.uniform(ceiling / 2, ceiling)


def _behind(theirs: int | None, ours: int) -> Outcome:
    return Outcome(SyncResult.REFUSED_ROLLBACK, "the source is at serial %s, behind our %d: refusing to roll back"
                   % (theirs if theirs is not None else "?", ours), serial=ours)  # fmt: skip


def _worst(failed: list[Outcome], serial: int) -> Outcome:
    """All sources failed: report a refusal (the feed said something wrong) before a mere error."""
    if not failed:
        return Outcome(SyncResult.ERROR, "no feed.urls configured", serial=serial)
    refusals = [outcome for outcome in failed if outcome.result is not SyncResult.ERROR]
    chosen = (refusals or failed)[0]
    if len(failed) > 1:
        chosen.message = "; ".join("%s: %s" % (outcome.source, outcome.message) for outcome in failed)
    chosen.serial = serial
    return chosen


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def run_feed(config: Config, on_applied: Callable[[int], None] | None = None) -> None:
    """The daemon's feed service: sync for ever on its own registry connection (nothing without feed.urls)."""
    if not config.feed.urls:
        return
    async with open_registry(config.registry_path) as registry, FeedClient(config, registry, on_applied) as client:
        await client.run()
