"""`icpgate inspect`: the report as a table, JSON or CSV (UTF-8 with a BOM, as the spreadsheet
tools expect, like the project's other exports). Tables in `display.timezone`; JSON and CSV UTC."""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from datetime import tzinfo
from typing import Any

from ..config.display_time import local_text, zone_label

STATE_ZH = {"hollow": "空壳", "unknown": "解析失败", "grace": "观察期", "live": "正常"}
CLASS_ZH = {"hosted": "解析到本机房", "indirect": "间接接入", "elsewhere": "解析到他处", "unresolved": "无解析",
            "error": "解析失败"}  # fmt: skip
FILING_COLUMNS = ("网站备案号", "网站名称", "主办单位", "接入状态", "检查结论", "state", "自何时 since", "域名",
                  "解析类别", "class", "解析地址", "说明", "检查时间")  # fmt: skip
NEW_ACCESS_COLUMNS = ("客户名称", "合同编号", "主机", "域名", "网站备案号", "目的地址", "访问次数", "首次发现时间",
                      "最后发现时间", "解析到", "违规记录编号")  # fmt: skip


def as_json(document: dict[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False, indent=2)


def filings_csv(report: dict[str, Any]) -> str:
    """One row per domain of each filing listed."""
    out, writer = _csv()
    writer.writerow(FILING_COLUMNS)
    for filing in report["filings"]["items"]:
        for domain in filing["domains"]:
            writer.writerow((filing["licence"], filing["site_name"], filing["subject_name"], filing["access"],
                             STATE_ZH[filing["state"]], filing["state"], filing["since"] or "", domain["domain"],
                             CLASS_ZH[domain["class"]], domain["class"], " ".join(domain["addresses"]),
                             domain["detail"], domain["checked_at"] or ""))  # fmt: skip
    return out.getvalue()


def new_access_csv(document: dict[str, Any]) -> str:
    out, writer = _csv()
    writer.writerow(NEW_ACCESS_COLUMNS)
    for group in document["customers"]:
        customer = group["customer"] or {}
        for host in group["hosts"]:
            writer.writerow((customer.get("name", ""), customer.get("contract", ""), host["host"], host["domain"] or "",
                             host["licence"], " ".join(host["destinations"]), host["count"], host["first_seen"],
                             host["last_seen"], " ".join(host["resolves_to"]),
                             " ".join(map(str, host["violation_ids"]))))  # fmt: skip
    return out.getvalue()


def _csv() -> tuple[io.StringIO, Any]:
    out = io.StringIO()
    out.write("\ufeff")
    return out, csv.writer(out, lineterminator="\r\n")


def summary_text(summary: dict[str, Any], zone: tzinfo) -> str:
    last = summary["last_pass"]
    if last is None:
        return "no inspection has run yet\n"
    when = local_text(last["finished"] or last["started"], zone)
    lines = [
        "last pass %d: %s %s (%s); %d filings, %d domains, %d DNS queries" % (
            last["id"], last["state"], when, zone_label(zone), last["filings"], last["domains"], last["queries"]),
        "domains:  " + ", ".join("%s %d" % item for item in summary["domains"].items()),
        "filings:  " + ", ".join("%s %d" % item for item in summary["filings"].items())
        + "; hollow share %.1f%% (alert above %.1f%%)" % (100 * summary["hollow_share"],
                                                         100 * summary["hollow_alert_share"]),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def filings_table(report: dict[str, Any], zone: tzinfo) -> str:
    text = summary_text(report["summary"], zone)
    items = report["filings"]["items"]
    if not items:
        return text + "no filing to review\n"
    rows = [("STATE", "SINCE (%s)" % zone_label(zone), "LICENCE", "SITE", "DOMAIN", "CLASS", "DETAIL")]
    for filing in items:
        for number, domain in enumerate(filing["domains"]):
            first = number == 0
            rows.append((filing["state"] if first else "", local_text(filing["since"], zone) if first else "",
                         filing["licence"] if first else "", filing["site_name"] if first else "", domain["domain"],
                         domain["class"], domain["detail"]))  # fmt: skip
    lines = _columns(rows)
    more = report["filings"]["total"] - len(items) - report["filings"]["offset"]
    if more > 0:
        lines.append("... %d more (use --limit)" % more)
    lines.append("review each hollow filing before cancelling its access (取消接入): never on DNS alone")
    return text + "\n".join(lines) + "\n"


def new_access_table(document: dict[str, Any], zone: tzinfo) -> str:
    if not document["customers"]:
        text = "no host needs a new access filing (新增接入)\n"
    else:
        rows = [("CUSTOMER", "HOST", "LICENCE", "DESTINATIONS", "COUNT", "LAST SEEN (%s)" % zone_label(zone))]
        for group in document["customers"]:
            customer = group["customer"]
            name = "%s %s" % (customer["name"], customer["contract"]) if customer else "(no customer)"
            for host in group["hosts"]:
                rows.append((name, host["host"], host["licence"], " ".join(host["destinations"]), str(host["count"]),
                             local_text(host["last_seen"], zone)))  # fmt: skip
        text = "\n".join(_columns(rows)) + "\n" + "%s\n%s\n" % (document["instructions"]["zh"],
                                                              document["instructions"]["en"])  # fmt: skip
    if document["awaiting_dns"]:
        text += "%d filed_elsewhere records await their DNS check\n" % document["awaiting_dns"]
    return text


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(_width(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return ["  ".join(cell + " " * (width - _width(cell)) for cell, width in zip(row, widths, strict=False))
            + "  " + row[-1] for row in rows]  # fmt: skip


def _width(text: str) -> int:
    """Terminal columns: Chinese characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)
