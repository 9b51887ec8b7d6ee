"""The `icpgate` command line. Exit codes are documented in docs/cli.md and kept in `Exit`."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import ipaddress
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..config.settings import Config, load_config
from ..config.tomlschema import ConfigError
from ..policy.decide import Reason
from ..policy.explain import explain, render_explanation
from ..policy.pack import load_pack
from ..registry.importers.formats import FORMATS, ImportOptions, detect_format, path_text, prepare, read_any
from ..registry.store import Guard, ImportReport, RegistryError, open_registry, require_registry
from ..telemetry.logs import log_to_stderr
from ..telemetry.multiproc import use_metrics_dir
from ..violations.store import DNS_STATES, HANDLING_STATES, MAX_NOTE, Filters, open_violations, parse_since
from . import backup_commands, inspect_commands
from .exits import Exit
from .fleet_commands import add_commands as add_fleet_commands
from .records import print_records

DEFAULT_CONFIG = Path("/etc/icpgate/config.toml")
MAX_PRINTED_WARNINGS = 20
LISTED = 20  # licences printed per kind by a dry run without --json


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help="config file (default %(default)s)")
    common.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key: dotted key, TOML value; repeatable",
    )  # fmt: skip
    parser = argparse.ArgumentParser(prog="icpgate", description="ICP filing enforcement gate")
    parser.add_argument("--version", action="version", version="icpgate " + __version__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", parents=[common], help="explain the decision for a host")
    check.add_argument("host")
    check.add_argument("--ip", help="destination IP (default: none, as from the CLI)")
    check.add_argument("--port", type=int, help="destination port")
    check.add_argument(
        "--proto", choices=("http", "tls", "quic"), default="http", help="listener kind (default %(default)s)"
    )
    check.add_argument("--path", help="HTTP request target, for the ACME HTTP-01 exception")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(handler=_cmd_check)

    imp = commands.add_parser("import", parents=[common], help="import filings into the registry")
    imp.add_argument("file", type=Path, help="a file, or a spool folder of download files (taken in order)")
    imp.add_argument("--format", choices=FORMATS, help="default: detected from the content, then the suffix")
    imp.add_argument("--encoding", help="text encoding of a CSV (default: UTF-8 if it decodes, else GB18030/GBK)")
    imp.add_argument("--skip-invalid", action="store_true", help="import the good records, skip the bad ones")
    imp.add_argument("--replace", action="store_true", help="the file is the whole registry: remove filings not in it")
    imp.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    imp.add_argument("--force", action="store_true", help="apply even what the mass-change guard refuses")
    imp.add_argument("--json", action="store_true", help="print the import report as JSON")
    imp.add_argument("--jobs", type=_positive(int), metavar="N",
                     help="processes that parse NDJSON (default: for a file of 16 MB or more, one per CPU but one,"
                     " at most 4; 1 parses in the importer itself)")  # fmt: skip
    imp.set_defaults(handler=_cmd_import)

    run = commands.add_parser("run", parents=[common], help="run the gate")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    run.set_defaults(handler=_cmd_run)

    registry = commands.add_parser("registry", help="the registry the gate enforces")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True)
    adopt = registry_commands.add_parser("adopt", parents=[common], help="make the gate enforce the registry at"
                                         " registry.path, although it is another one or behind")  # fmt: skip
    adopt.add_argument("--json", action="store_true", help="print what was adopted as JSON")
    adopt.set_defaults(handler=_cmd_registry_adopt)

    feed = commands.add_parser("feed", help="the approved-filings feed")
    feed_commands = feed.add_subparsers(dest="feed_command", required=True)
    sync = feed_commands.add_parser("sync", parents=[common], help="sync the registry from feed.urls once")
    sync.add_argument("--force", action="store_true", help="apply even what the guards refuse (see feed diff)")
    sync.add_argument("--json", action="store_true", help="print the outcome as JSON")
    sync.set_defaults(handler=_cmd_feed_sync)
    diff = feed_commands.add_parser("diff", parents=[common], help="show what the next sync would change")
    diff.add_argument("--json", action="store_true", help="print the difference as JSON")
    diff.set_defaults(handler=_cmd_feed_diff)
    status = feed_commands.add_parser("status", parents=[common], help="serial, freshness and the last sync")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_cmd_feed_status)
    serve = feed_commands.add_parser("serve", parents=[common], help="publish the registry to edge gates")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve without publish.tokens_file: anyone who can connect gets every filing")  # fmt: skip
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(handler=_cmd_feed_serve)

    filters = argparse.ArgumentParser(add_help=False)  # `violations` and `fleet violations`
    filters.add_argument("--confirmed", action="store_true", help="only DNS-confirmed violations")
    filters.add_argument("--since", metavar="T", help="last seen since: ISO 8601 time, or 90s, 15m, 24h, 7d")
    filters.add_argument("--domain", help="registrable domain or host")
    filters.add_argument("--ip", type=_ip_address, help="destination IP")
    reasons = [reason.value for reason in Reason]
    filters.add_argument("--reason", choices=reasons, metavar="R", help="reason code: %s" % ", ".join(reasons))
    filters.add_argument("--dns", choices=DNS_STATES, help="DNS state")
    filters.add_argument("--state", choices=HANDLING_STATES, help="handling state (open takes reopened in)")
    filters.add_argument("--limit", type=int, default=100, help="records at most; 0 for all (default %(default)s)")
    output = filters.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV")
    output.add_argument("--isms", action="store_true", help="print the ISMS unfiled-site report (CSV)")
    filters.add_argument("--include-unconfirmed", action="store_true",
                         help="--isms: also records DNS did not confirm, marked in a column")  # fmt: skip
    violations = commands.add_parser("violations", parents=[common, filters], help="the violation log, confirmed first")
    violations.set_defaults(handler=_cmd_violations)
    handling = violations.add_subparsers(dest="violations_command", metavar="{ack,resolve,reopen}")
    for name, state, text in (("ack", "acknowledged", "acknowledge records: seen, being worked on"),
                              ("resolve", "resolved", "mark records resolved (open again if seen after)"),
                              ("reopen", "open", "take the acknowledgement or resolution back")):  # fmt: skip
        command = handling.add_parser(name, parents=[common], help=text)
        command.add_argument("ids", type=int, nargs="+", metavar="ID", help="record ids (the ID column)")
        command.add_argument("--note", default="", help="what was done, who was called (at most 1000 characters)")
        command.set_defaults(handler=_cmd_handling, state=state)

    inspect_commands.add_parser(commands, common)
    backup_commands.add_parsers(commands, common)

    customers = commands.add_parser("customers", help="the customer map: address ranges to customers")
    customer_commands = customers.add_subparsers(dest="customers_command", required=True)
    customer_import = customer_commands.add_parser("import", parents=[common], help="replace the map from a file")
    customer_import.add_argument("file", type=Path, help="CSV (network,name,contract) or TOML ([[customer]])")
    customer_import.set_defaults(handler=_cmd_customers_import)
    customer_list = customer_commands.add_parser("list", parents=[common], help="print the map")
    customer_list.set_defaults(handler=_cmd_customers_list)

    bypass = commands.add_parser("bypass", help="inline mode: route the hosted ranges around the gate (nftables)")
    bypass_commands = bypass.add_subparsers(dest="bypass_command", required=True)
    for name, text in (("on", "add the hosted ranges to the bypass sets: not steered to the gate"),
                       ("off", "take them out: steered to the gate again"),
                       ("status", "show whether the hosted ranges are bypassed"),
                       ("watch", "poll /readyz; bypass while the gate is down or not ready")):  # fmt: skip
        command = bypass_commands.add_parser(name, parents=[common], help=text)
        command.add_argument("ranges", nargs="*", metavar="RANGE",
                             help="CIDR (default: dns.hosted_ranges, else the pack's enforce.ranges)")  # fmt: skip
        command.set_defaults(handler=_cmd_bypass)
    bypass_commands.choices["status"].add_argument("--json", action="store_true", help="print one JSON object")
    watch = bypass_commands.choices["watch"]
    watch.add_argument("--ready-url", help="default: /readyz on the config's admin API")
    watch.add_argument("--interval", type=_positive(float), default=2.0, help="seconds between polls (%(default)s)")
    watch.add_argument("--fail-after", type=_positive(int), default=3, metavar="N",
                       help="bypass on after N failed polls in a row (%(default)s)")  # fmt: skip
    watch.add_argument("--recover-after", type=_positive(int), default=5, metavar="M",
                       help="bypass off after M ready polls in a row (%(default)s)")  # fmt: skip
    watch.add_argument("--timeout", type=_positive(float), default=2.0, help="seconds for one poll (%(default)s)")
    watch.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    add_fleet_commands(commands, common, filters, _cmd_fleet)

    config = commands.add_parser("config", help="config commands")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_check = config_commands.add_parser("check", parents=[common], help="check the config and policy pack")
    config_check.set_defaults(handler=_cmd_config_check)
    return parser


def _ip_address(text: str) -> str:
    """As the admin API takes it: an address never recorded would only give an empty answer."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an IP address" % text) from None


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be more than 0")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        for problem in error.problems:
            print("config error: %s" % problem, file=sys.stderr)
        return Exit.CONFIG
    except RegistryError as error:
        print("registry error: %s" % error, file=sys.stderr)
        return Exit.REGISTRY


def _refuse_bad_config(args: argparse.Namespace) -> bool:
    """Print every problem `config check` would, and say whether there were any."""
    from ..process.preflight import check_config

    problems = check_config(args.config, args.overrides)
    for problem in problems:
        print("config error: %s" % problem, file=sys.stderr)
    return bool(problems)


def _cmd_run(args: argparse.Namespace) -> Exit:
    if _refuse_bad_config(args):
        return Exit.CONFIG
    config = load_config(args.config, args.overrides)
    # Before the gate (and prometheus-client with it) is imported: it picks its storage at import.
    use_metrics_dir(config.admin.metrics_dir)
    from ..admin.server import bind_admin
    from ..process.listen import GateStartError
    from ..process.services import services
    from ..process.supervisor import run_gate

    if config.feed.urls:
        _create_registry(config)
    log_to_stderr(args.log_level, config.log.format)
    try:
        admin_socket = bind_admin(config)
    except OSError as error:
        print("cannot start: admin API on %s:%d: %s" % (config.admin.address, config.admin.port,
                                                        error.strerror or error), file=sys.stderr)  # fmt: skip
        return Exit.START
    try:
        return Exit(run_gate(args.config, tuple(args.overrides), services(admin_socket)))
    except GateStartError as error:
        print("cannot start: %s" % error, file=sys.stderr)
        return Exit.START


def _cmd_feed_sync(args: argparse.Namespace) -> Exit:
    from .feed_commands import sync

    return sync(load_config(args.config, args.overrides), force=args.force, as_json=args.json)


def _cmd_feed_diff(args: argparse.Namespace) -> Exit:
    from .feed_commands import diff

    return diff(load_config(args.config, args.overrides), as_json=args.json)


def _cmd_registry_adopt(args: argparse.Namespace) -> Exit:
    from .registry_commands import adopt

    return adopt(load_config(args.config, args.overrides), as_json=args.json)


def _cmd_feed_status(args: argparse.Namespace) -> Exit:
    from .feed_commands import status

    return status(load_config(args.config, args.overrides), as_json=args.json)


def _cmd_feed_serve(args: argparse.Namespace) -> Exit:
    from ..config.settings import split_host_port
    from ..feed.publisher import serve

    try:
        host, port = split_host_port(args.listen, any_port=True)
    except ValueError as error:
        print("feed serve: --listen: %s" % error, file=sys.stderr)
        return Exit.USAGE
    if _refuse_bad_config(args):
        return Exit.CONFIG
    config = load_config(args.config, args.overrides)
    if config.publish.tokens_file is None and not args.no_auth:
        print("feed serve: publish.tokens_file is not set in %s: without it every filing, site owners' names"
              " included, goes to anyone who can connect. Give each edge a token (docs/feed-protocol.md),"
              " or pass --no-auth to serve without them knowingly" % config.source, file=sys.stderr)  # fmt: skip
        return Exit.CONFIG
    if config.publish.tokens_file is not None and args.no_auth:
        print("feed serve: --no-auth contradicts publish.tokens_file in %s; drop one" % config.source,
              file=sys.stderr)  # fmt: skip
        return Exit.USAGE
    log_to_stderr(args.log_level)
    require_registry(config.registry_path)
    return Exit(serve(config, host, port))


def _create_registry(config: Config) -> None:
    """An edge that syncs from a feed may start with no registry: it starts empty (blocking every
    filed-only site: fail closed) and the first sync fills it."""
    if not config.registry_path.is_file():

        async def create() -> None:
            async with open_registry(config.registry_path):
                pass

        asyncio.run(create())


def _filters(args: argparse.Namespace, command: str) -> Filters | None:
    """The filters of `violations` and `fleet violations`; None (after saying why) when they are wrong."""
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as error:
        print("%s: --since: %s" % (command, error), file=sys.stderr)
        return None
    if args.include_unconfirmed and not args.isms:
        print("%s: --include-unconfirmed goes with --isms" % command, file=sys.stderr)
        return None
    confirmed = args.confirmed or (args.isms and not args.include_unconfirmed)
    return Filters(confirmed, since, args.domain, args.ip, args.reason, args.dns, args.state)


def _cmd_fleet(args: argparse.Namespace) -> Exit:
    from ..fleet.central import CentralError

    config = load_config(args.config, args.overrides)
    try:
        if args.fleet_command != "violations" or getattr(args, "handling_command", None):
            return args.fleet_handler(args, config)
        filters = _filters(args, "fleet violations")
        return Exit.USAGE if filters is None else args.fleet_handler(args, config, filters)
    except CentralError as error:
        print("fleet %s: %s" % (args.fleet_command, error), file=sys.stderr)
        return Exit.FLEET


def _cmd_violations(args: argparse.Namespace) -> Exit:
    config = load_config(args.config, args.overrides)
    filters = _filters(args, "violations")
    if filters is None:
        return Exit.USAGE
    if _no_violation_log(config, "violations"):
        return Exit.REGISTRY
    if not config.registry_path.is_file():
        print("violations: warning: registry %s does not exist: the registry's decision now is left out"
              % config.registry_path, file=sys.stderr)  # fmt: skip
    total, records = asyncio.run(_violations(config, filters, args.limit or 2**62))
    print_records(args, records, total, config.display_timezone)
    return Exit.OK


async def _violations(config: Config, filters: Filters, limit: int) -> tuple[int, list[dict]]:
    from ..reports.current import annotate_from_file

    async with open_violations(config.violations.path) as store:
        total, records = await store.query(filters, limit)
    await annotate_from_file(config, records)
    return total, records


def _no_violation_log(config: Config, command: str) -> bool:
    """Say so when the violation log is not there: an empty answer would hide that this config
    points somewhere the daemon does not write (docs/deployment.md, "Install")."""
    if config.violations.path.is_file():
        return False
    print("%s: no violation log at %s: the daemon creates it when it starts; is %s the config it runs with?"
          % (command, config.violations.path, config.source), file=sys.stderr)  # fmt: skip
    return True


def _cmd_handling(args: argparse.Namespace) -> Exit:
    config = load_config(args.config, args.overrides)
    if len(args.note) > MAX_NOTE:
        print("violations %s: --note: at most %d characters" % (args.violations_command, MAX_NOTE), file=sys.stderr)
        return Exit.USAGE
    if _no_violation_log(config, "violations %s" % args.violations_command):
        return Exit.REGISTRY

    async def apply() -> list[int]:
        async with open_violations(config.violations.path) as store:
            return await store.set_handling(args.ids, args.state, args.note.strip(), time.time())

    missing = asyncio.run(apply())
    if missing:
        print("violations %s: no record with id %s; nothing was changed"
              % (args.violations_command, ", ".join(map(str, missing))), file=sys.stderr)  # fmt: skip
        return Exit.DATA
    print("%d record(s) %s" % (len(args.ids), args.state))
    return Exit.OK


def _cmd_customers_import(args: argparse.Namespace) -> Exit:
    from ..violations.customers import CustomerError, read_customers

    config = load_config(args.config, args.overrides)
    try:
        customers = read_customers(args.file)
    except CustomerError as error:
        print("error: %s" % error, file=sys.stderr)
        print("refused %s; the customer map stays as it was" % args.file, file=sys.stderr)
        return Exit.DATA

    async def store_them() -> None:
        async with open_violations(config.violations.path) as store:
            await store.replace_customers(customers)

    asyncio.run(store_them())
    names = len({customer.name for customer in customers})
    print("imported %d ranges of %d customers from %s" % (len(customers), names, path_text(args.file)))
    return Exit.OK


def _cmd_customers_list(args: argparse.Namespace) -> Exit:
    config = load_config(args.config, args.overrides)
    if _no_violation_log(config, "customers list"):
        return Exit.REGISTRY

    async def read() -> list:
        async with open_violations(config.violations.path) as store:
            return (await store.customers()).customers

    customers = sorted(asyncio.run(read()), key=lambda customer: (customer.name, customer.network))
    for customer in customers:
        print("%-24s  %s  %s" % (customer.network, customer.name, customer.contract))
    if not customers:
        print("no customer map imported")
    return Exit.OK


def _cmd_bypass(args: argparse.Namespace) -> Exit:
    from ..inline.bypass import BypassSets, NftError, RangeError, configured_ranges, parse_ranges, render_status

    try:
        if args.ranges:
            ranges, source = parse_ranges(args.ranges), "the command line"
        else:
            ranges, source = configured_ranges(args.config, args.overrides)
    except RangeError as error:
        print("bypass: %s" % error, file=sys.stderr)
        return Exit.USAGE
    sets = BypassSets()
    try:
        if args.bypass_command == "watch":
            return _bypass_watch(args, sets, ranges)
        if args.bypass_command == "status":
            status = sets.status(ranges)
            print(json.dumps(status.to_json() | {"source": source}) if args.json else render_status(status, source))
            return Exit.OK
        changed = sets.turn_on(ranges) if args.bypass_command == "on" else sets.turn_off(ranges)
    except NftError as error:
        print("bypass: %s" % error, file=sys.stderr)
        return Exit.NFT
    done = "added to" if args.bypass_command == "on" else "removed from"
    print("bypass %s: %s (%d %s the sets; ranges from %s)" % (args.bypass_command, ", ".join(map(str, ranges)),
                                                             len(changed), done, source))  # fmt: skip
    return Exit.OK


def _bypass_watch(args: argparse.Namespace, sets, ranges: tuple) -> Exit:
    from ..inline.watch import WatchSettings, ready_url, watch

    try:
        url = args.ready_url or ready_url(load_config(args.config, args.overrides))
    except ValueError as error:
        print("bypass watch: %s" % error, file=sys.stderr)
        return Exit.USAGE
    log_to_stderr(args.log_level)
    watch(sets, ranges, WatchSettings(url, args.interval, args.fail_after, args.recover_after, args.timeout))
    return Exit.OK


def _cmd_config_check(args: argparse.Namespace) -> Exit:
    from ..process.preflight import check_config

    problems = check_config(args.config, args.overrides)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return Exit.CONFIG
    print("%s: OK" % args.config)
    return Exit.OK


def _cmd_check(args: argparse.Namespace) -> Exit:
    config = load_config(args.config, args.overrides)
    pack = load_pack(config.policy_pack)
    host = args.host.strip()  # typed or pasted by an operator
    explanation = asyncio.run(explain(config, pack, host, args.ip, args.port, args.proto, args.path))
    if args.json:
        print(json.dumps(explanation, ensure_ascii=False, indent=2))
    else:
        print(render_explanation(explanation))
    return Exit.OK if explanation["action"] == "allow" else Exit.BLOCKED


def _cmd_import(args: argparse.Namespace) -> Exit:
    config = load_config(args.config, args.overrides)
    if not args.file.exists():
        print("import: no such file: %s" % path_text(args.file), file=sys.stderr)
        return Exit.DATA
    if args.encoding:
        try:
            codecs.lookup(args.encoding)
        except LookupError:
            print("import: --encoding: unknown encoding %r" % args.encoding, file=sys.stderr)
            return Exit.USAGE
    if not config.registry_path.exists():  # the first import; or a config that is not the daemon's
        print("note: no registry at %s yet: creating it" % config.registry_path, file=sys.stderr)
    guard = Guard(config.feed.guard_share, config.feed.guard_min_filings)
    if args.file.is_dir():
        return _import_folder(config, args, guard)
    options = ImportOptions(args.encoding, config.imports.default_timezone, config.imports.isp_ids, jobs=args.jobs)
    report = asyncio.run(_import(config, args, args.file, args.format, options, guard, replace=args.replace))
    _print_report(report, options.notes, args.json, dry_run=args.dry_run)
    if report.index_note and report.committed:
        print("warning: the running gate does not enforce this import: %s" % report.index_note, file=sys.stderr)
    if report.forced and report.committed:
        print("warning: --force: the mass-change guard was overridden (%s); recorded with the import in %s"
              % (report.forced, config.registry_path), file=sys.stderr)  # fmt: skip
    if args.dry_run:
        return Exit.DATA if report.error_count or report.refused else Exit.OK
    return Exit.OK if report.committed else Exit.DATA


def _import_folder(config: Config, args: argparse.Namespace, guard: Guard) -> Exit:
    """Each download file of a spool folder in order, one transaction each; the first refused file
    stops the run (a later file may cancel what it carries) and stays where it is."""
    from ..feed.sources import DownloadFolder

    if args.replace or args.dry_run:
        print("import: --replace and --dry-run take one file, not a folder", file=sys.stderr)
        return Exit.USAGE
    folder = DownloadFolder(args.file)
    reports = []
    code = Exit.OK
    for path in folder.pending(time.time()):
        options = ImportOptions(args.encoding, config.imports.default_timezone, config.imports.isp_ids, jobs=args.jobs)
        report = asyncio.run(_import(config, args, path, args.format or "miit-xml", options, guard, replace=False))
        reports.append(_report_json(report, options.notes))
        if not args.json:
            _print_report(report, options.notes, False)
        if not report.committed:
            code = Exit.DATA
            break
        folder.done(path)
    if args.json:
        print(json.dumps(reports, ensure_ascii=False, indent=2))
    elif not reports:
        print("nothing to import in %s" % path_text(args.file))
    return code


async def _import(config: Config, args: argparse.Namespace, path: Path, fmt: str | None, options: ImportOptions,
                  guard: Guard, *, replace: bool) -> ImportReport:  # fmt: skip
    fmt = fmt or detect_format(path)
    progress = _progress_bar(path)
    try:
        async with open_registry(config.registry_path) as registry:
            await prepare(path, fmt, options, registry)
            return await registry.import_filings(
                read_any(path, fmt, options), source=path_text(path), fmt=fmt, skip_invalid=args.skip_invalid,
                progress=progress.update if progress is not None else None, replace=replace, guard=guard,
                force=args.force, dry_run=args.dry_run,
            )  # fmt: skip
    finally:
        if progress is not None:  # a tqdm without a total refuses bool(): test for None, not truth
            progress.close()


def _progress_bar(path: Path):
    """A progress bar for large imports on a terminal; None otherwise."""
    if not sys.stderr.isatty() or path.stat().st_size < 1_000_000:
        return None
    from tqdm import tqdm

    return tqdm(unit=" filings", unit_scale=True, desc="importing", file=sys.stderr)


def _report_json(report: ImportReport, notes: list[str], dry_run: bool = False) -> dict:
    return {
        "source": report.source, "committed": report.committed, "dry_run": dry_run, "records": report.records,
        "inserted": report.inserted, "updated": report.updated, "unchanged": report.unchanged,
        "removed": report.removed, "skipped": report.skipped, "serial": report.serial,
        "filings_before": report.filings_before, "refused": report.refused, "refusal": report.refusal,
        "forced": report.forced, "listed": report.listed, "index_note": report.index_note,
        "errors": [{"line": e.line, "field": e.field, "message": e.message} for e in report.errors],
        "error_count": report.error_count, "warnings": report.warnings, "notes": notes,
    }  # fmt: skip


def _print_report(report: ImportReport, notes: list[str], as_json: bool, *, dry_run: bool = False) -> None:
    if as_json:
        print(json.dumps(_report_json(report, notes, dry_run), ensure_ascii=False, indent=2))
        return
    for error in report.errors:
        error.source = error.source or report.source
        print("error: %s" % error, file=sys.stderr)
    if report.error_count > len(report.errors):
        print("error: … and %d more" % (report.error_count - len(report.errors)), file=sys.stderr)
    for warning in report.warnings[:MAX_PRINTED_WARNINGS]:
        print("warning: %s: %s" % (report.source, warning), file=sys.stderr)
    if len(report.warnings) > MAX_PRINTED_WARNINGS:
        print("warning: … and %d more" % (len(report.warnings) - MAX_PRINTED_WARNINGS), file=sys.stderr)
    for note in notes:
        print("note: %s: %s" % (report.source, note), file=sys.stderr)
    skipped = ", %d invalid skipped" % report.skipped if report.skipped else ""
    removed = ", %d removed" % report.removed if report.removed else ""
    counts = "%d new, %d updated, %d unchanged%s%s" % (report.inserted, report.updated, report.unchanged, removed,
                                                       skipped)  # fmt: skip
    if report.error_count:
        print("refused %s: %d error(s); nothing was imported" % (report.source, report.error_count), file=sys.stderr)
    elif dry_run:
        print("dry run: %s would import %d filings into a registry of %d (%s); nothing was changed" % (
            report.source, report.records, report.filings_before, counts))  # fmt: skip
        for kind, total in (("added", report.inserted), ("changed", report.updated), ("removed", report.removed)):
            for licence in report.listed.get(kind, [])[:LISTED]:
                print("  %-8s %s" % (kind, licence))
            if total > LISTED:
                print("  %-8s … and %d more (--json lists up to 1000)" % (kind, total - LISTED))
        if report.refused or report.forced:
            print("the mass-change guard refuses this import: %s; --force applies it" % (report.refusal
                                                                                       or report.forced))  # fmt: skip
    elif report.refused:
        print("refused %s: the mass-change guard: %s (%s; feed.guard_share); nothing was imported"
              % (report.source, report.refusal, counts), file=sys.stderr)  # fmt: skip
        print("see what it would change with --dry-run, then add --force to apply it", file=sys.stderr)
    elif report.committed:
        print("imported %d filings from %s (%s); serial %d" % (report.records, report.source, counts, report.serial))


if __name__ == "__main__":
    sys.exit(main())
