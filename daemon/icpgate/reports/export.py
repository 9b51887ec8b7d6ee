"""`icpgate violations`: the log as a table, JSON, CSV, or the ISMS unfiled-site report.

The ISMS (信息安全管理系统) layout is the one IDC operators file upward: domain, top domain, IP,
port, protocol, violation type (1 = 未备案), first and last seen, visit count, blocked flag and
current state, then the customer and what the operator has done about it. By default it holds
DNS-confirmed records only: a scanner or a spoofed Host is no unfiled site of ours. The current
state is the decision the registry gives now, so a site that has been approved since it was
blocked shows as such. Junk and overflow records have no domain and are left out of that report.

People read the table in `display.timezone`; JSON and CSV stay UTC ISO 8601.

Records come from the violation log with client-supplied text already escaped; every cell of the
table and the CSV files is escaped again here (telemetry/printable.py), whatever handed the
records in, so that a row stays one row. A CSV cell that a spreadsheet would run as a formula
(`=`, `+`, `-`, `@` first) gets a leading `'`, as OWASP advises for CSV exports.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from datetime import tzinfo
from typing import Any

from ..config.display_time import BEIJING, local_text, zone_label
from ..telemetry.printable import printable
from .current import current_en, current_zh

ISMS_COLUMNS = (
    "域名", "顶级域名", "IP", "端口", "协议", "违规类型",
    "首次发现时间", "最后发现时间", "访问次数", "是否阻断", "当前状态",
    "客户名称", "合同编号", "处理状态", "处理备注",
)  # fmt: skip
ISMS_DNS_COLUMN = "DNS核实"  # with --include-unconfirmed only
ISMS_UNFILED = 1  # 违规类型 1: 未备案
FORMULA_STARTS = ("=", "+", "-", "@")
HANDLING_ZH = {"open": "未处理", "acknowledged": "已受理", "resolved": "已解决", "reopened": "再次出现"}
DNS_ZH = {"confirmed": "已确认", "not_hosted": "未解析到本机房", "error": "解析失败", "unchecked": "未核实"}
CSV_COLUMNS = ("id", "domain", "host", "ip", "port", "proto", "reason", "first_seen", "last_seen", "count", "blocked",
               "dns_state", "dns_addresses", "dns_checked_at", "client", "current", "customer", "contract",
               "handling_state", "handling_note", "handling_at")  # fmt: skip


def as_json(records: list[dict[str, Any]], total: int) -> str:
    return json.dumps({"total": total, "items": records}, ensure_ascii=False, indent=2)


def as_csv(records: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        dns, customer, handling = record["dns"], record["customer"] or {}, record["handling"]
        current = record.get("current")
        _write_row(writer, (record["id"], record["domain"] or "", record["host"], record["ip"], record["port"],
                         record["proto"], record["reason"], record["first_seen"], record["last_seen"], record["count"],
                         int(record["blocked"]), dns["state"], " ".join(dns["addresses"]), dns["checked_at"] or "",
                         record["client"] or "", "%s:%s" % (current["action"], current["reason"]) if current else "",
                         customer.get("name", ""), customer.get("contract", ""), handling["state"],
                         handling["note"] or "", handling["at"] or ""))  # fmt: skip
    return out.getvalue()


def as_table(records: list[dict[str, Any]], total: int, zone: tzinfo = BEIJING) -> str:
    if not records:
        return "no violations recorded\n"
    rows = [("ID", "DNS", "COUNT", "HOST", "DESTINATION", "REASON", "NOW", "STATE", "CUSTOMER",
             "LAST SEEN (%s)" % zone_label(zone), "RESOLVES TO")]  # fmt: skip
    for record in records:
        dns, customer, handling = record["dns"], record["customer"], record["handling"]
        state = handling["state"] + (": " + handling["note"] if handling["note"] else "")
        count = "%d (%d passed)" % (record["count"], record["passed"]) if record["passed"] else str(record["count"])
        rows.append((str(record["id"]), dns["state"], count, record["host"],
                     "%s:%d/%s" % (record["ip"], record["port"], record["proto"]), record["reason"],
                     current_en(record), state[:40],
                     "%s %s" % (customer["name"], customer["contract"]) if customer else "-",
                     local_text(record["last_seen"], zone),
                     " ".join(dns["addresses"]) or dns["detail"] or "-"))  # fmt: skip
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(_width(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell + " " * (width - _width(cell)) for cell, width in zip(row, widths, strict=False))
             + "  " + row[-1] for row in rows]  # fmt: skip
    if total > len(records):
        lines.append("... %d more (use --limit)" % (total - len(records)))
    return "\n".join(lines) + "\n"


def _width(text: str) -> int:
    """Terminal columns: Chinese characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def as_isms(records: list[dict[str, Any]], mark_dns: bool = False) -> str:
    """The ISMS unfiled-site report as CSV (UTF-8 with BOM, which the spreadsheet tools expect), in
    Beijing time as the regulator reads it. `mark_dns` adds a column with each record's DNS check."""
    out = io.StringIO()
    out.write("\ufeff")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(ISMS_COLUMNS + ((ISMS_DNS_COLUMN,) if mark_dns else ()))
    for record in records:
        if not record["domain"]:
            continue
        customer, handling = record["customer"] or {}, record["handling"]
        row = [record["host"], record["domain"], record["ip"], record["port"], record["proto"].upper(), ISMS_UNFILED,
               local_text(record["first_seen"], BEIJING), local_text(record["last_seen"], BEIJING), record["count"],
               "是" if record["blocked"] else "否", current_zh(record), customer.get("name", ""),
               customer.get("contract", ""), HANDLING_ZH[handling["state"]], handling["note"] or ""]  # fmt: skip
        if mark_dns:
            row.append(DNS_ZH[record["dns"]["state"]])
        _write_row(writer, row)
    return out.getvalue()


def _write_row(writer: Any, cells: list | tuple) -> None:
    """A CSV row with its text cells escaped, and kept from being read as formulas."""
    writer.writerow([_csv_cell(cell) if isinstance(cell, str) else cell for cell in cells])


def _csv_cell(text: str) -> str:
    text = printable(text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text
