"""`icpgate feed sync|diff|status`: the operator's view of the feed (serve lives in publisher.py)."""

from __future__ import annotations

import asyncio
import json
import sys

from ..config.settings import Config
from ..feed.client import SUCCESS, FeedClient, Outcome
from ..feed.protocol import SyncResult
from ..feed.signing import KeyFileError
from ..feed.status import feed_status, outcome_json
from ..feed.tokens import TokenFileError
from ..registry.store import open_registry
from .exits import Exit

LISTED = 20  # licences printed per kind without --json


def sync(config: Config, *, force: bool, as_json: bool) -> Exit:
    outcome = _run(config, force=force, dry_run=False)
    if outcome is None:
        return Exit.CONFIG
    if as_json:
        print(json.dumps(outcome_json(outcome), ensure_ascii=False, indent=2))
    elif outcome.result in SUCCESS:
        print("%s: %s" % (outcome.result.value, outcome.message or "serial %d" % outcome.serial))
    else:
        print("%s: %s" % (outcome.result.value, outcome.message), file=sys.stderr)
        if outcome.result is SyncResult.REFUSED_GUARD:
            print("look at `icpgate feed diff`, then `icpgate feed sync --force` to apply it", file=sys.stderr)
    return _exit(outcome)


def diff(config: Config, *, as_json: bool) -> Exit:
    outcome = _run(config, force=True, dry_run=True)
    if outcome is None:
        return Exit.CONFIG
    if as_json:
        print(json.dumps(outcome_json(outcome), ensure_ascii=False, indent=2))
        return _exit(outcome)
    report = outcome.report
    if outcome.result is not SyncResult.APPLIED or report is None:
        stream = sys.stdout if outcome.result in SUCCESS else sys.stderr
        print("%s: %s" % (outcome.result.value, outcome.message or "nothing pending"), file=stream)
        return _exit(outcome)
    print("pending from %s: serial %d -> %d" % (outcome.source, report.serial, outcome.target))
    for kind, count in (("added", report.inserted), ("changed", report.updated), ("removed", report.removed)):
        print("%-8s %d" % (kind, count))
        for licence in report.listed.get(kind, [])[:LISTED]:
            print("  %s" % licence)
        if count > LISTED:
            print("  … and %d more (--json lists up to 1000)" % (count - LISTED))
    return Exit.OK


def status(config: Config, *, as_json: bool) -> Exit:
    data = asyncio.run(_status(config))
    if as_json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return Exit.OK
    sync = data["sync"]
    fresh = data["freshness"]
    age = "never" if fresh["age"] is None else "%.0f s ago" % fresh["age"]
    print("registry     %s" % data["registry"])
    print("serial       %d (%d filings, checksum %s…)" % (data["serial"], data["filings"], data["checksum"][:16]))
    print("feed         %s" % (", ".join(config.feed.urls) or "none (feed.urls is empty: local imports only)"))
    if config.feed.urls:
        print("signatures   %s" % _signatures(config))
    print("last success %s" % age)
    print("freshness    %s (stale after %gs, max staleness %gs, then %s)" % (
        fresh["state"], config.feed.stale_after, config.feed.max_staleness, config.feed.stale_mode))  # fmt: skip
    print("enforcement  %s" % fresh["enforcement"])
    if sync:
        print("last result  %s at %s: %s" % (sync.get("last_result"), sync.get("last_attempt"),
                                             sync.get("last_message") or "-"))  # fmt: skip
        print("failures     %d in a row" % sync.get("failures", 0))
        if sync.get("pending"):
            pending = sync["pending"]
            print("pending      refused by the guard: +%d ~%d -%d (icpgate feed diff; feed sync --force)" % (
                pending["added"], pending["changed"], pending["removed"]))  # fmt: skip
    return Exit.OK


async def _status(config: Config) -> dict:
    async with open_registry(config.registry_path, create=False) as registry:
        return await feed_status(config, registry)


def _signatures(config: Config) -> str:
    keys = len(config.feed.public_keys)
    if keys:
        return "required (%d public key%s in feed.public_keys)" % (keys, "" if keys == 1 else "s")
    return "NOT REQUIRED (feed.allow_unsigned = true): unsigned feed data is applied as it comes"


def _run(config: Config, *, force: bool, dry_run: bool) -> Outcome | None:
    async def once() -> Outcome:
        async with (
            open_registry(config.registry_path, create=not dry_run) as registry,  # diff only reads
            FeedClient(config, registry) as client,
        ):
            return await client.sync(force=force, dry_run=dry_run)

    if not config.feed.urls:
        print("feed.urls is empty in %s: there is no feed to sync from" % config.source, file=sys.stderr)
        return None
    try:
        return asyncio.run(once())
    except KeyFileError as error:
        print("config error: feed.public_keys: %s" % error, file=sys.stderr)
        return None
    except TokenFileError as error:
        print("config error: feed.token_file: %s" % error, file=sys.stderr)
        return None


def _exit(outcome: Outcome) -> Exit:
    if outcome.result in SUCCESS:
        return Exit.OK
    return Exit.FEED if outcome.result is SyncResult.ERROR else Exit.DATA
