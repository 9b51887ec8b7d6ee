"""The status page's site inspection section: filings by state, domains by class, the hollow
filings hollow the longest, and the hosts that need a new access filing (新增接入), by customer."""

from __future__ import annotations

from datetime import tzinfo
from html import escape
from typing import Any

from ..config.display_time import local_text

STATE_NAMES = {"live": "正常 · live", "grace": "观察期 · grace", "unknown": "解析失败 · unknown",
               "hollow": "空壳 · hollow"}  # fmt: skip


def render_inspection(inspection: dict[str, Any] | None, enabled: bool, zone: tzinfo) -> str:
    if inspection is None:
        return ""
    facts = inspection["summary"]
    last = facts["last_pass"]
    if last is None:
        note = "未启用 · off (inspect.enabled)" if not enabled else "尚未检查 · not run yet"
        head = '<p class="empty">%s</p>' % note
    else:
        states = " · ".join("%s %d" % (escape(STATE_NAMES[state]), count) for state, count in facts["filings"].items())
        classes = ", ".join("%s %d" % (escape(klass), count) for klass, count in facts["domains"].items())
        head = "<dl>%s</dl>" % "".join("<dt>%s</dt><dd>%s</dd>" % row for row in (
            ("上次检查 · Last pass", "%d: %s %s" % (last["id"], escape(last["state"]),
                                                  escape(local_text(last["finished"] or last["started"], zone)))),
            ("备案 · Filings", states),
            ("空壳占比 · Hollow share", '<span id="hollow-share">%.1f%%</span>' % (100 * facts["hollow_share"])),
            ("域名 · Domains", classes),
        ))  # fmt: skip
    rows = "".join(
        "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>" % (
            escape(filing["licence"]), escape(filing["site_name"]), escape(local_text(filing["since"], zone)),
            escape("; ".join("%s %s" % (domain["domain"], domain["class"]) for domain in filing["domains"])))
        for filing in inspection["filings"]["items"]
    )  # fmt: skip
    hollow = (
        "<table><tr><th>网站备案号 · Licence</th><th>网站 · Site</th><th>空壳始于 · Hollow since</th>"
        "<th>域名 · Domains</th></tr>%s</table>" % rows
        if rows
        else '<p class="empty">没有空壳备案。 · No hollow filing.</p>'
    )
    groups = inspection["new_access"]["customers"]
    new_rows = "".join(
        "<tr><td>%s</td><td>%s</td><td>%s</td><td class=num>%d</td></tr>" % (
            escape("%s（%s）" % (group["customer"]["name"], group["customer"]["contract"]) if group["customer"]
                   else "-"),
            escape(host["host"]), escape(host["licence"]), host["count"])
        for group in groups for host in group["hosts"]
    )  # fmt: skip
    new_access = (
        "<table><tr><th>客户 · Customer</th><th>主机 · Host</th><th>网站备案号 · Licence</th>"
        "<th class=num>次数 · Count</th></tr>%s</table>" % new_rows
        if new_rows
        else '<p class="empty">没有需要新增接入的网站。 · No site needs a new access filing.</p>'
    )
    return (
        "<section><h2>网站巡查 · Site inspection</h2>%s<h2>空壳备案（前 20 条，核实后再取消接入） · Hollow filings"
        " (review before 取消接入)</h2>%s<h2>需新增接入 · Sites that need a new access filing (新增接入)</h2>%s"
        '<p class="empty">全部 · All: <a href="/api/v1/inspection">/api/v1/inspection</a></p></section>'
        % (head, hollow, new_access)
    )
