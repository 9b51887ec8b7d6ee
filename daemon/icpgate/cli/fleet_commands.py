"""`icpgate fleet migrate|maintain|status|violations|inspect|serve|customers`: the operations centre's
view of the fleet, its handling of records (`fleet violations ack|resolve|reopen|history`), site
inspection's results and its customer map."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.display_time import local_text
from ..config.settings import Config
from ..violations.store import MAX_NOTE, Filters
from .exits import Exit
from .inspect_commands import STATES as INSPECTION_STATES
from .records import print_records

if TYPE_CHECKING:
    import psycopg

FLAG_TEXT = {"silent": "SILENT", "not_enforcing": "NOT ENFORCING", "behind": "BEHIND",
             "checksum_differs": "CHECKSUM DIFFERS"}  # fmt: skip


def add_commands(commands, common: argparse.ArgumentParser, filters: argparse.ArgumentParser,
                 dispatch: Callable[[argparse.Namespace], Exit]) -> None:  # fmt: skip
    """`icpgate fleet ...`; `filters` holds `icpgate violations`' filter options, `dispatch` loads
    the config and calls the command's `fleet_handler` (psycopg is imported only then)."""
    dsn = argparse.ArgumentParser(add_help=False)
    dsn.add_argument("--dsn", help="connect with this libpq DSN instead of fleet.dsn (e.g. the owner's or a reader's)")
    fleet = commands.add_parser("fleet", help="the fleet's central store (PostgreSQL)")
    fleet_commands = fleet.add_subparsers(dest="fleet_command", required=True)
    migrate = fleet_commands.add_parser("migrate", parents=[common, dsn], help="create or migrate the central schema")
    migrate.add_argument("--print-roles", action="store_true",
                         help="print the roles' SQL (a superuser runs it first); change nothing")  # fmt: skip
    migrate.add_argument("--edge", action="append", default=[], metavar="LABEL",
                         help="--print-roles: a login role for this edge; repeatable")  # fmt: skip
    migrate.set_defaults(handler=dispatch, fleet_handler=migrate_command)
    maintain = fleet_commands.add_parser("maintain", parents=[common, dsn],
                                         help="retention: drop history past fleet.retention_days")  # fmt: skip
    maintain.set_defaults(handler=dispatch, fleet_handler=maintain_command)
    status = fleet_commands.add_parser("status", parents=[common, dsn], help="every edge, its health and its flags")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--silent-after", type=float, metavar="S", help="seconds (default fleet.silent_after)")
    status.set_defaults(handler=dispatch, fleet_handler=status_command)
    serve = fleet_commands.add_parser("serve", parents=[common, dsn],
                                      help="the fleet's status page and read API (bearer token)")  # fmt: skip
    serve.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(handler=dispatch, fleet_handler=serve_command)
    violations = fleet_commands.add_parser("violations", parents=[common, dsn, filters],
                                           help="violations across the fleet, confirmed first")  # fmt: skip
    violations.add_argument("--edge", help="seen at this edge (fleet.edge_id)")
    violations.add_argument("--site", help="seen at this site (fleet.site)")
    violations.set_defaults(handler=dispatch, fleet_handler=violations_command)
    handling = violations.add_subparsers(dest="handling_command", metavar="{ack,resolve,reopen,history}")
    for name, state, text in (("ack", "acknowledged", "acknowledge records for the whole fleet"),
                              ("resolve", "resolved", "mark records resolved (open again if seen after)"),
                              ("reopen", "open", "take the acknowledgement or resolution back")):  # fmt: skip
        command = handling.add_parser(name, parents=[common, dsn], help=text)
        command.add_argument("ids", type=int, nargs="+", metavar="ID", help="record ids (the ID column)")
        command.add_argument("--note", default="", help="what was done, who was called (at most 1000 characters)")
        command.add_argument("--by", help="who does it, for the audit trail (beside the PostgreSQL role)")
        command.set_defaults(handler=dispatch, fleet_handler=handle_command, state=state)
    history = handling.add_parser("history", parents=[common, dsn], help="the audit trail of records' handling")
    history.add_argument("ids", type=int, nargs="+", metavar="ID", help="record ids (the ID column)")
    history.add_argument("--json", action="store_true", help="print JSON")
    history.set_defaults(handler=dispatch, fleet_handler=history_command)
    inspect = fleet_commands.add_parser(
        "inspect", parents=[common, dsn], help="site inspection's results, as the inspecting edge shipped them"
    )
    inspect.add_argument("--new-access", action="store_true",
                         help="hosts filed elsewhere, blocked at any edge, DNS-confirmed, by customer")  # fmt: skip
    inspect_output = inspect.add_mutually_exclusive_group()
    inspect_output.add_argument("--json", action="store_true", help="print JSON")
    inspect_output.add_argument("--csv", action="store_true", help="print CSV (UTF-8 with a BOM)")
    inspect.add_argument("--state", choices=INSPECTION_STATES, action="append",
                         help="list filings in this state; repeatable (default: hollow, unknown, grace)")  # fmt: skip
    inspect.add_argument("--limit", type=int, default=100, help="filings at most; 0 for all (default %(default)s)")
    inspect.set_defaults(handler=dispatch, fleet_handler=inspect_command)
    customers = fleet_commands.add_parser("customers", help="the customer map at the centre, for the fleet's dashboard")
    customer_commands = customers.add_subparsers(dest="customers_command", required=True)
    customer_import = customer_commands.add_parser("import", parents=[common, dsn],
                                                   help="replace the centre's map with a file's")  # fmt: skip
    customer_import.add_argument("file", type=Path, help="as for `icpgate customers import`")
    customer_import.set_defaults(handler=dispatch, fleet_handler=customers_import_command)


def migrate_command(args: argparse.Namespace, config: Config) -> Exit:
    from ..fleet import central
    from ..fleet.schema import roles_sql

    if args.print_roles:
        sys.stdout.write(roles_sql(args.edge))
        return Exit.OK
    if args.edge:
        print("fleet migrate: --edge goes with --print-roles", file=sys.stderr)
        return Exit.USAGE
    with _connect(args, config) as connection:
        before, after = central.migrate(connection)
    print("central schema: version %d%s" % (after, "" if before == after else " (was %d)" % before))
    return Exit.OK


def maintain_command(args: argparse.Namespace, config: Config) -> Exit:
    from ..fleet import central

    with _connect(args, config) as connection:
        done = central.maintain(connection, config.fleet.retention_days)
    print("history before %s removed: %d monthly partitions dropped (%s), %d records removed" % (
        done["cutoff"], len(done["partitions_dropped"]), ", ".join(done["partitions_dropped"]) or "none",
        done["records_removed"]))  # fmt: skip
    print("site inspection: %d rows of passes the edges forgot removed" % done["inspection_rows_removed"])
    return Exit.OK


def status_command(args: argparse.Namespace, config: Config) -> Exit:
    from ..fleet import views

    with _connect(args, config) as connection:
        found = views.edges(connection, args.silent_after or config.fleet.silent_after)
    if args.json:
        print(json.dumps({"edges": found}, ensure_ascii=False, indent=2))
        return Exit.OK
    if not found:
        print("no edge has reported to the central store yet")
        return Exit.OK
    rows = [("EDGE", "SITE", "MODE", "SERIAL", "BEHIND", "BACKLOG", "LAST SEEN", "FLAGS")]
    for edge in found:
        registry = edge["registry"]
        rows.append((edge["edge_id"], edge["site"] or "-", edge["mode"] or "-", str(registry["serial"]),
                     str(registry["behind"]), str(edge["shipping"]["backlog"]),
                     "%s (%.0fs ago)" % (edge["last_seen"], edge["silence"]),
                     ", ".join(FLAG_TEXT[flag] for flag in edge["flags"]) or "ok"))  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return Exit.OK


def serve_command(args: argparse.Namespace, config: Config) -> Exit:
    """`fleet serve`: with a reader's role; refused without admin.token_file (it serves the whole fleet)."""
    from ..config.settings import split_host_port
    from ..fleet.serve import serve
    from ..telemetry.logs import log_to_stderr

    try:
        host, port = split_host_port(args.listen)
    except ValueError as error:
        print("fleet serve: --listen: %s" % error, file=sys.stderr)
        return Exit.USAGE
    if config.admin.token_file is None:
        print("fleet serve: admin.token_file is not set in %s: the fleet's data is served only behind a bearer"
              " token" % config.source, file=sys.stderr)  # fmt: skip
        return Exit.CONFIG
    if not (args.dsn or config.fleet.dsn):
        print("fleet serve: fleet.dsn is not set in %s, and no --dsn was given" % config.source, file=sys.stderr)
        return Exit.CONFIG
    log_to_stderr(args.log_level, config.log.format)
    return Exit(serve(config, args.dsn, host, port))


def violations_command(args: argparse.Namespace, config: Config, filters: Filters) -> Exit:
    from ..fleet import views

    with _connect(args, config) as connection:
        edges, sites = views.labels(connection)
        for name, value, known in (("--edge", args.edge, edges), ("--site", args.site, sites)):
            if value is not None and value not in known:
                print("fleet violations: %s: no edge reports %r; known: %s" % (
                    name, value, ", ".join(sorted(known)) or "none"), file=sys.stderr)  # fmt: skip
                return Exit.USAGE
        total, records = views.violations(connection, views.FleetFilters(filters, args.edge, args.site),
                                          args.limit or 2**62)  # fmt: skip
    asyncio.run(views.annotate(config, records))
    print_records(args, records, total, config.display_timezone)
    return Exit.OK


def handle_command(args: argparse.Namespace, config: Config) -> Exit:
    """Handling at the centre: with an operator's role (fleet.dsn or --dsn); the edges take it back."""
    import psycopg

    from ..fleet import handling

    command = "fleet violations %s" % args.handling_command
    if len(args.note) > MAX_NOTE:
        print("%s: --note: at most %d characters" % (command, MAX_NOTE), file=sys.stderr)
        return Exit.USAGE
    with _connect(args, config) as connection:
        try:
            missing = handling.handle(connection, args.ids, args.state, args.note.strip(), args.by)
        except psycopg.errors.InsufficientPrivilege as error:
            print("%s: the central store refuses: %s (handling needs a member of icpgate_operator)"
                  % (command, str(error).strip()), file=sys.stderr)  # fmt: skip
            return Exit.FLEET
    if missing:
        print("%s: no record with id %s; nothing was changed" % (command, ", ".join(map(str, missing))),
              file=sys.stderr)  # fmt: skip
        return Exit.DATA
    print("%d record(s) %s for the fleet" % (len(args.ids), args.state))
    return Exit.OK


def history_command(args: argparse.Namespace, config: Config) -> Exit:
    from ..fleet import handling

    with _connect(args, config) as connection:
        trail = handling.history(connection, args.ids)
    if args.json:
        print(json.dumps({"items": trail}, ensure_ascii=False, indent=2))
        return Exit.OK
    for entry in trail:
        print("%d  %s  %s %s:%d/%s %s  %s  by %s%s" % (
            entry["id"], local_text(entry["at"], config.display_timezone), entry["host"], entry["ip"],
            entry["port"], entry["proto"], entry["reason"], entry["state"], handling.who(entry["role"], entry["by"]),
            ": " + entry["note"] if entry["note"] else ""))  # fmt: skip
    if not trail:
        print("no handling recorded for %s" % ", ".join(map(str, args.ids)))
    return Exit.OK


def inspect_command(args: argparse.Namespace, config: Config) -> Exit:
    """`fleet inspect`: the report `icpgate inspect --report` gives on the inspecting edge, from the
    centre (with a reader's role); `--new-access` over every edge's violations."""
    import time

    from ..fleet import inspection_views
    from ..inspection import export
    from ..inspection.report import REVIEW_STATES

    with _connect(args, config) as connection:
        if args.new_access:
            records, unchecked = inspection_views.new_access_records(connection)
        else:
            states = tuple(args.state or REVIEW_STATES)
            document = inspection_views.report(connection, time.time(), args.limit or 2**62, 0, states,
                                               config.fleet.silent_after)  # fmt: skip
    if args.new_access:
        found = asyncio.run(inspection_views.new_access(config, records, unchecked))
        if args.json:
            print(export.as_json(found))
        elif args.csv:
            sys.stdout.write(export.new_access_csv(found))
        else:
            sys.stdout.write(export.new_access_table(found, config.display_timezone))
        return Exit.OK
    for warning in document["inspection"]["warnings"]:
        print("fleet inspect: warning: %s" % warning, file=sys.stderr)
    if args.json:
        print(export.as_json(document))
    elif args.csv:
        sys.stdout.write(export.filings_csv(document))
    else:
        inspection = document["inspection"]
        if inspection["edge"] is not None:
            print("inspected by edge %s (site %s)" % (inspection["edge"], inspection["site"] or "-"))
        sys.stdout.write(export.filings_table(document, config.display_timezone))
    return Exit.OK


def customers_import_command(args: argparse.Namespace, config: Config) -> Exit:
    """The edge's customer file, into fleet.customers, with an operator's role (fleet.dsn or --dsn)."""
    import psycopg

    from ..fleet.customers import customer_count, replace_customers
    from ..violations.customers import CustomerError, read_customers

    try:
        customers = read_customers(args.file)
    except CustomerError as error:
        print("error: %s" % error, file=sys.stderr)
        print("refused %s; the centre's customer map stays as it was" % args.file, file=sys.stderr)
        return Exit.DATA
    with _connect(args, config) as connection:
        try:
            replace_customers(connection, customers)
        except psycopg.errors.InsufficientPrivilege as error:
            print("fleet customers import: the central store refuses: %s (the map needs a member of"
                  " icpgate_operator)" % str(error).strip(), file=sys.stderr)  # fmt: skip
            return Exit.FLEET
        ranges, names = customer_count(connection)
    print("the centre's customer map: %d ranges of %d customers from %s" % (ranges, names, args.file))
    return Exit.OK


def _connect(args: argparse.Namespace, config: Config) -> psycopg.Connection:
    import psycopg

    from ..fleet import central

    dsn = args.dsn or config.fleet.dsn
    if not dsn:
        raise central.CentralError("fleet.dsn is not set in %s, and no --dsn was given" % config.source)
    try:
        return psycopg.connect(**central.connect_args(config.fleet, dsn))
    except psycopg.Error as error:
        raise central.CentralError("cannot connect to the central store: %s" % str(error).strip()) from None
