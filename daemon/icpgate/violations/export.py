"""`icpgate violations`: the log as a table, JSON, CSV, or the ISMS unfiled-site report.

The ISMS (信息安全管理系统) layout is the one IDC operators file upward: domain, top domain, IP,
port, protocol, violation type (1 = 未备案), first and last seen, visit count, blocked flag and
current state. The current state is the decision the registry gives now, so a site that has been
approved since it was blocked shows as such. Junk and overflow records have no domain and are
left out of that report.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from typing import Any

from ..config import Config
from ..hostname import parent_names
from ..policy import Action, Policy
from ..policy_pack import load_pack
from ..registry import open_registry

ISMS_COLUMNS = (
    "域名", "顶级域名", "IP", "端口", "协议", "违规类型",
    "首次发现时间", "最后发现时间", "访问次数", "是否阻断", "当前状态",
)  # fmt: skip
ISMS_UNFILED = 1  # 违规类型 1: 未备案
CSV_COLUMNS = ("domain", "host", "ip", "port", "proto", "reason", "first_seen", "last_seen", "count", "blocked",
               "dns_state", "dns_addresses", "dns_checked_at", "client")  # fmt: skip


def as_json(records: list[dict[str, Any]], total: int) -> str:
    return json.dumps({"total": total, "items": records}, ensure_ascii=False, indent=2)


def as_csv(records: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        dns = record["dns"]
        writer.writerow((record["domain"] or "", record["host"], record["ip"], record["port"], record["proto"],
                         record["reason"], record["first_seen"], record["last_seen"], record["count"],
                         int(record["blocked"]), dns["state"], " ".join(dns["addresses"]), dns["checked_at"] or "",
                         record["client"] or ""))  # fmt: skip
    return out.getvalue()


def as_table(records: list[dict[str, Any]], total: int) -> str:
    if not records:
        return "no violations recorded\n"
    rows = [("DNS", "COUNT", "HOST", "DESTINATION", "REASON", "LAST SEEN", "RESOLVES TO")]
    for record in records:
        dns = record["dns"]
        rows.append((dns["state"], str(record["count"]), record["host"],
                     "%s:%d/%s" % (record["ip"], record["port"], record["proto"]), record["reason"],
                     record["last_seen"], " ".join(dns["addresses"]) or dns["detail"] or "-"))  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]  # fmt: skip
    if total > len(records):
        lines.append("... %d more (use --limit)" % (total - len(records)))
    return "\n".join(lines) + "\n"


async def as_isms(config: Config, records: list[dict[str, Any]]) -> str:
    """The ISMS unfiled-site report as CSV (UTF-8 with BOM, which the spreadsheet tools expect)."""
    records = [record for record in records if record["domain"]]
    pack = load_pack(config.policy_pack)
    names = sorted({name for record in records for name in parent_names(record["host"])})
    async with open_registry(config.registry_path, create=False) as registry:
        policy = Policy(pack.policy, config.provider.id, await registry.index_for(names))
    out = io.StringIO()
    out.write("\ufeff")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(ISMS_COLUMNS)
    for record in records:
        now = policy.decide(record["host"], record["ip"], record["port"], record["proto"])
        state = (
            "已阻断（%s）" % now.reason.value if now.action is Action.BLOCK else "已备案放行（%s）" % now.reason.value
        )
        writer.writerow((record["host"], record["domain"], record["ip"], record["port"], record["proto"].upper(),
                         ISMS_UNFILED, _local(record["first_seen"]), _local(record["last_seen"]), record["count"],
                         "是" if record["blocked"] else "否", state))  # fmt: skip
    return out.getvalue()


def _local(iso: str) -> str:
    """ISMS wants `YYYY-MM-DD HH:MM:SS`, Beijing time."""
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(timezone(timedelta(hours=8)))
    return moment.strftime("%Y-%m-%d %H:%M:%S")
