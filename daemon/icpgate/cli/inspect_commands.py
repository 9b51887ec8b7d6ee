"""`icpgate inspect`: site inspection from the command line (docs/inspection.md).

Without options it runs a session (resuming an unfinished pass) and prints the filings to review;
`--report` prints the stored result without a DNS query, `--new-access` the hosts that need a new
access filing (新增接入) by customer, and `--dry-run` what a full pass would ask and how long it
takes at `inspect.rate`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from ..config.settings import Config, load_config
from ..registry.store import open_registry, require_registry
from ..violations.store import open_violations
from .exits import Exit

# The inspection's filing states (inspection/classify.py), here so that building the parser imports no DNS library.
STATES = ("live", "grace", "unknown", "hollow")


def add_parser(commands, common: argparse.ArgumentParser) -> None:
    inspect = commands.add_parser(
        "inspect", parents=[common], help="site inspection: hollow filings, and sites that need a new access filing"
    )
    what = inspect.add_mutually_exclusive_group()
    what.add_argument("--report", action="store_true", help="print the last result; query nothing")
    what.add_argument(
        "--new-access", action="store_true", help="hosts filed elsewhere, blocked here, DNS-confirmed, by customer"
    )
    what.add_argument("--dry-run", action="store_true", help="say what a full pass would ask and how long it takes")
    output = inspect.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV (UTF-8 with a BOM)")
    inspect.add_argument("--state", choices=STATES, action="append",
                         help="list filings in this state; repeatable (default: hollow, unknown, grace)")  # fmt: skip
    inspect.add_argument("--limit", type=int, default=100, help="filings at most; 0 for all (default %(default)s)")
    inspect.set_defaults(handler=command)


def command(args: argparse.Namespace) -> Exit:
    from ..inspection import export
    from ..inspection.report import REVIEW_STATES
    from ..inspection.run import Busy

    config = load_config(args.config, args.overrides)
    require_registry(config.registry_path)
    if args.new_access:
        document = asyncio.run(_new_access(config))
        if args.json:
            print(export.as_json(document))
        elif args.csv:
            sys.stdout.write(export.new_access_csv(document))
        else:
            sys.stdout.write(export.new_access_table(document, config.display_timezone))
        return Exit.OK
    if args.dry_run:
        return _dry_run(config, args.json)
    if not config.dns.hosted_ranges:
        print("inspect: dns.hosted_ranges is empty in %s: list our address ranges, or every site would be"
              " called elsewhere" % config.source, file=sys.stderr)  # fmt: skip
        return Exit.CONFIG
    states = tuple(args.state or REVIEW_STATES)
    try:
        document = asyncio.run(_inspect(config, run=not args.report, states=states, limit=args.limit or 2**62))
    except Busy as error:
        print("inspect: %s; see its result with --report" % error, file=sys.stderr)
        return Exit.BUSY
    if args.json:
        print(export.as_json(document))
    elif args.csv:
        sys.stdout.write(export.filings_csv(document))
    else:
        sys.stdout.write(export.filings_table(document, config.display_timezone))
    return Exit.OK


async def _inspect(config: Config, *, run: bool, states: tuple[str, ...], limit: int) -> dict:
    from ..inspection.report import report
    from ..inspection.run import Inspection, client_for, exclusive
    from ..inspection.store import open_inspection

    if not run:
        if not config.inspect.path.is_file():  # nothing inspected yet; do not create files as this user
            return await report(config, None, time.time(), limit, states=states)
        async with open_inspection(config.inspect.path) as store:
            return await report(config, store, time.time(), limit, states=states)
    with exclusive(config.inspect.path):
        async with open_inspection(config.inspect.path) as store, \
                open_registry(config.registry_path, create=False) as registry:  # fmt: skip
            await Inspection(config, registry, store, client_for(config)).session()
            return await report(config, store, time.time(), limit, states=states)


async def _new_access(config: Config) -> dict:
    from ..inspection.report import new_access

    async with open_registry(config.registry_path, create=False) as registry:
        if not config.violations.path.is_file():  # nothing blocked yet
            return await new_access(config, None, registry)
        async with open_violations(config.violations.path) as violations:
            return await new_access(config, violations, registry)


def _dry_run(config: Config, as_json: bool) -> Exit:
    from ..inspection import export
    from ..inspection.run import estimate

    async def count():
        async with open_registry(config.registry_path, create=False) as registry:
            return await estimate(config, registry)

    found = asyncio.run(count())
    facts = {"filings": found.filings, "domains": found.domains, "names": found.names, "queries": found.queries,
             "rate": config.inspect.rate, "seconds": round(found.seconds, 1),
             "sessions": max(1, -(-int(found.seconds) // int(config.inspect.max_run_time)))}  # fmt: skip
    if as_json:
        print(export.as_json(facts))
        return Exit.OK
    print("a full pass: %d filings with our access, %d domains, %d names (with www. for bare domains), at least"
          " %d DNS queries (A and AAAA; CNAME chases and retries add to it)" % (found.filings, found.domains,
                                                                               found.names, found.queries))  # fmt: skip
    print(
        "at inspect.rate = %g queries/s: %s; in %d session(s) of inspect.max_run_time = %s"
        % (config.inspect.rate, _duration(found.seconds), facts["sessions"], _duration(config.inspect.max_run_time))
    )
    return Exit.OK


def _duration(seconds: float) -> str:
    if seconds < 120:
        return "%.0f s" % seconds
    if seconds < 7200:
        return "%.0f min" % (seconds / 60)
    return "%.1f h" % (seconds / 3600)
