"""The fleet's status page (`icpgate fleet serve`): every edge with its flags, and the top
confirmed violations across the fleet with their handling and the edges that saw them, in Chinese
and English, in the edge's page's style (admin/status_page.py)."""

from __future__ import annotations

from html import escape
from typing import Any

from ..admin.inspection_section import render_inspection
from ..admin.status_page import STYLE, VIOLATION_HEADER, violation_row
from ..config.display_time import local_text, zone_label
from ..config.settings import Config

FLAGS_TEXT = {"silent": "无心跳 · silent", "not_enforcing": "未执行阻断 · not enforcing",
              "behind": "落后 · behind", "checksum_differs": "校验和不一致 · checksum differs"}  # fmt: skip
_FLAGGED = ".flag{color:#a1261b;font-weight:600}"


def render_fleet_page(config: Config, edges: list[dict[str, Any]], top: list[dict[str, Any]],
                      counts: dict[str, int], inspection: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The page; `counts` are the fleet's records by handling state, `inspection` the central
    inspection report (fleet/inspection_views.py) with its 新增接入 list."""
    zone = config.display_timezone
    if edges:
        edge_rows = "".join(_edge_row(edge, zone) for edge in edges)
        edges_html = (
            "<table><tr><th>节点 · Edge</th><th>站点 · Site</th><th>执行模式 · Mode</th>"
            "<th class=num>注册库版本 · Serial</th><th class=num>落后 · Behind</th><th class=num>积压 · Backlog</th>"
            "<th>最后心跳 · Last seen</th><th>标记 · Flags</th></tr>%s</table>" % edge_rows
        )
    else:
        edges_html = '<p class="empty">还没有节点上报。 · No edge has reported yet.</p>'
    if top:
        rows = "".join(violation_row(record, zone, _seen_at(record)) for record in top)
        top_html = "<table><tr>%s<th>发现节点 · Seen at</th></tr>%s</table>" % (VIOLATION_HEADER, rows)
    else:
        top_html = '<p class="empty">没有已确认的违规。 · No confirmed violations.</p>'
    summary = ", ".join("%s %d" % (escape(state), count) for state, count in sorted(counts.items())) or "none"
    return """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="30"><title>icpgate 机群状态 · fleet status — %(provider)s</title>
<style>%(style)s</style></head>
<body><main><h1>icpgate 机群 · fleet — %(provider)s</h1>
<section><h2>边缘节点 · Edges</h2>%(edges)s<p class="empty">时区 · Time zone: %(zone)s</p></section>
<section><h2>全网已确认违规（前 20 条） · Top confirmed violations across the fleet</h2>%(top)s
<p class="empty">按处理状态统计的记录 · Records by handling: %(summary)s.
全部记录 · All records: <a href="/api/v1/violations">/api/v1/violations</a></p></section>
%(inspection)s
</main></body></html>
""" % {
        "provider": escape(config.provider.name or config.provider.id), "style": STYLE + _FLAGGED,
        "edges": edges_html, "zone": escape(zone_label(zone)), "top": top_html, "summary": summary,
        "inspection": _inspection_html(inspection, zone),
    }  # fmt: skip


def _edge_row(edge: dict[str, Any], zone) -> str:
    registry, flags = edge["registry"], edge["flags"]
    mode = edge["mode"] or "-"
    cells = (
        escape(edge["edge_id"]), escape(edge["site"] or "-"),
        '<span class="mode %s">%s</span>' % (escape(mode), escape(mode)),
        '<td class="num">%s</td>' % escape(str(registry["serial"])),
        '<td class="num">%s</td>' % escape(str(registry["behind"])),
        '<td class="num">%s</td>' % escape(str(edge["shipping"]["backlog"])),
        "%s（%.0f 秒前 · %.0f s ago）" % (escape(local_text(edge["last_seen"], zone)), edge["silence"],
                                         edge["silence"]),
        ('<span class="flag">%s</span>' % escape(", ".join(FLAGS_TEXT[flag] for flag in flags))
         if flags else "正常 · ok"),
    )  # fmt: skip
    return "<tr>%s</tr>" % "".join(cell if cell.startswith("<td") else "<td>%s</td>" % cell for cell in cells)


def _seen_at(record: dict[str, Any]) -> str:
    return ", ".join("%s/%s %d" % (edge["site"], edge["edge_id"], edge["count"]) for edge in record["edges"])


def _inspection_html(inspection: dict[str, Any] | None, zone) -> str:
    """The edge's section (admin/inspection_section.py), headed by the edge that inspects and any warning."""
    if inspection is None:
        return ""
    about = inspection["inspection"]
    who = ('<p class="empty">巡查节点 · Inspected by: %s</p>' % escape("%s/%s" % (about["site"], about["edge"]))
           if about["edge"] is not None else "")  # fmt: skip
    warnings = "".join('<p class="flag">%s</p>' % escape(warning) for warning in about["warnings"])
    return who + warnings + render_inspection(inspection, inspection["enabled"], zone)
