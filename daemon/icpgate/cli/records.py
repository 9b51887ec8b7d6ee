"""How `icpgate violations` and `icpgate fleet violations` print their records: one of the exports
(reports/export.py), as the command's --json, --csv or --isms asks, else the table."""

from __future__ import annotations

import argparse
import sys
from datetime import tzinfo
from typing import Any


def print_records(args: argparse.Namespace, records: list[dict[str, Any]], total: int, zone: tzinfo) -> None:
    from ..reports import export  # here, not at the top: `icpgate run` never prints records

    if args.json:
        print(export.as_json(records, total))
    elif args.csv:
        sys.stdout.write(export.as_csv(records))
    elif args.isms:
        sys.stdout.write(export.as_isms(records, mark_dns=args.include_unconfirmed))
    else:
        sys.stdout.write(export.as_table(records, total, zone))
