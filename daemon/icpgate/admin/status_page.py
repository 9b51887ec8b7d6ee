"""The status page: feed state, block rate by reason and the top confirmed violations with the
registry's decision now, the customer and the handling, in plain HTML (no scripts, no external
assets), in Chinese and English, for an operator without Grafana at hand."""

from __future__ import annotations

from datetime import tzinfo
from html import escape
from typing import Any

from .. import __version__
from ..config.display_time import local_text, zone_label
from ..config.settings import Config
from ..reports.current import current_en, current_zh
from ..reports.export import HANDLING_ZH
from .inspection_section import render_inspection

STYLE = "".join(
    (
        'body{font:15px/1.45 system-ui,"Noto Sans CJK SC","WenQuanYi Micro Hei",sans-serif;margin:0}',
        "body{color:#1d2433;background:#f5f6f8}",
        "main{max-width:72rem;margin:0 auto;padding:1rem}",
        "h1{font-size:1.4rem;margin:.2rem 0 1rem}",
        "h2{font-size:1.1rem;margin:1.4rem 0 .5rem}",
        "section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.8rem 1rem;margin-bottom:1rem}",
        "table{border-collapse:collapse;width:100%;font-size:.9rem}",
        "th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #eceff3}",
        "th{color:#5b6475;font-weight:600}",
        ".num{text-align:right;font-variant-numeric:tabular-nums}",
        ".mode{display:inline-block;padding:.1rem .6rem;border-radius:1rem;font-weight:600}",
        ".enforce{background:#e3f4e8;color:#1b6b35}",
        ".monitor,.open{background:#fdecea;color:#a1261b}",
        ".stale,.expired{color:#a1261b;font-weight:600}",
        "dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:0}",
        "dt{color:#5b6475}",
        "dd{margin:0}",
        ".empty{color:#5b6475}",
        ".warning{background:#fdecea;border-color:#e4a29b;color:#a1261b}",
    )
)


# The violations table's header cells, for violation_row's cells (here and on the fleet's page).
VIOLATION_HEADER = (
    "<th>编号 · ID</th><th>域名 · Domain</th><th>主机 · Host</th><th>IP:端口 · IP:port</th>"
    "<th>协议 · Proto</th><th>原因 · Reason</th><th class=num>次数 · Count</th>"
    "<th>最后发现 · Last seen</th><th>解析到 · Resolves to</th><th>当前状态 · Now</th>"
    "<th>客户 · Customer</th><th>处理 · Handling</th>"
)


def render_status_page(config: Config, feed: dict[str, Any], enforcement: dict[str, Any], rates: dict[str, float],
                       top: list[dict[str, Any]], summary: dict[str, int],
                       inspection: dict[str, Any] | None = None,
                       warnings: list[dict[str, str]] = ()) -> str:  # fmt: skip
    """The page in zh-CN and English, side by side; times in `display.timezone`. `enforcement` is
    /readyz's check of that name: the daemon's mode, the key that set it, the pilot ranges.
    `warnings` are /readyz's, shown first as a banner."""
    zone = config.display_timezone
    fresh = feed["freshness"]
    sync = feed["sync"]
    mode = enforcement["mode"]
    age = fresh["age"] or 0
    last_success = (
        "%s（%.0f 秒前 · %.0f s ago）" % (escape(local_text(sync["last_success"], zone)), age, age)
        if sync.get("last_success")
        else "从未 · never"
    )
    serial = "%d（%d 条备案 · %d filings）" % (feed["serial"], feed["filings"], feed["filings"])
    rows_feed = [
        (
            "执行模式 · Enforcement",
            '<span class="mode %s">%s</span>%s' % (escape(mode), escape(mode), _mode_note(enforcement)),
        ),
        ("备案数据源 · Feed", escape(", ".join(config.feed.urls)) or "无（仅本地导入） · none (local imports only)"),
        ("数据新鲜度 · Freshness", '<span class="%s">%s</span>' % (escape(fresh["state"]), escape(fresh["state"]))),
        ("上次同步成功 · Last successful sync", last_success),
        ("上次结果 · Last result", escape("%s %s" % (sync.get("last_result", "-"), sync.get("last_message", "")))),
        ("注册库版本 · Registry serial", serial),
        ("时区 · Time zone", escape(zone_label(zone))),
    ]
    if enforcement["monitor_ranges"]:
        rows_feed.insert(1, ("试点监控范围 · Monitored ranges (pilot)", "%s（只记录，不阻断 · recorded, not blocked）"
                             % escape(", ".join(enforcement["monitor_ranges"]))))  # fmt: skip
    feed_html = "<dl>%s</dl>" % "".join("<dt>%s</dt><dd>%s</dd>" % row for row in rows_feed)
    if rates:
        rate_rows = "".join('<tr><td>%s</td><td class="num">%.2f</td></tr>' % (escape(reason), rate)
                            for reason, rate in sorted(rates.items(), key=lambda item: -item[1]))  # fmt: skip
        rates_html = (
            "<table><tr><th>原因 · Reason</th><th class=num>每秒阻断（最近一分钟） · Blocks/s (last minute)</th></tr>"
            "%s</table>" % rate_rows
        )
    else:
        rates_html = '<p class="empty">正在统计，10 秒后显示。 · Measuring; the rate shows after 10 seconds.</p>'
    if top:
        violation_rows = "".join(violation_row(record, zone) for record in top)
        top_html = "<table><tr>%s</tr>%s</table>" % (VIOLATION_HEADER, violation_rows)
    else:
        top_html = '<p class="empty">没有已确认的违规。 · No confirmed violations.</p>'
    counts = ", ".join("%s %d" % (escape(state), count) for state, count in sorted(summary.items())) or "none"
    return """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="30"><title>icpgate 状态 · status — %(provider)s</title>
<style>%(style)s</style></head>
<body><main><h1>icpgate — %(provider)s</h1>
%(warnings)s<section><h2>备案数据与执行 · Feed and enforcement</h2>%(feed)s</section>
<section><h2>各原因阻断速率 · Block rate by reason</h2>%(rates)s</section>
<section><h2>已确认违规（前 20 条） · Top confirmed violations</h2>%(top)s
<p class="empty">按 DNS 核实状态统计的记录 · Records by DNS state: %(counts)s.
全部记录 · All records: <a href="/api/v1/violations">/api/v1/violations</a></p></section>
%(inspection)s
<p class="empty">icpgate %(version)s</p>
</main></body></html>
""" % {
        "provider": escape(config.provider.name or config.provider.id), "style": STYLE, "feed": feed_html,
        "rates": rates_html, "top": top_html, "counts": counts, "warnings": _banner(warnings),
        "inspection": render_inspection(inspection, config.inspect.enabled, zone), "version": escape(__version__),
    }  # fmt: skip


def _banner(warnings: list[dict[str, str]]) -> str:
    if not warnings:
        return ""
    items = "".join("<li>%s</li>" % escape(warning["message"]) for warning in warnings)
    return ('<section class="warning" role="alert"><h2>需要处理 · Needs attention</h2>'
            "<p>注册库未被采用：网关仍按上一份有效索引执行。 · The registry is not adopted: the gate"
            " enforces its last good index.</p><ul>%s</ul></section>\n" % items)  # fmt: skip


# What the mode means for the operator, after its name, by the key that set it.
_MODE_NOTES = {
    "gate.enforcement": "gate.enforcement = monitor：只记录，不阻断（格式错误的流量除外） · recorded, not blocked "
    "(malformed traffic excepted)",
    "feed.stale_mode": "feed.stale_mode：备案数据已过期 · the feed has expired",
}


def _mode_note(enforcement: dict[str, Any]) -> str:
    note = _MODE_NOTES.get(enforcement["rule"] or "")
    return " — %s" % escape(note) if note else ""


def violation_row(record: dict[str, Any], zone: tzinfo, *extra: str) -> str:
    """One record under VIOLATION_HEADER; `extra` cells (text) after them."""
    customer, handling = record["customer"], record["handling"]
    cells = (
        str(record["id"]), escape(record["domain"] or "-"), escape(record["host"]),
        escape("%s:%d" % (record["ip"], record["port"])), escape(record["proto"]),
        escape(record["reason"]) + _passed(record),
        '<td class="num">%d</td>' % record["count"], escape(local_text(record["last_seen"], zone)),
        escape(", ".join(record["dns"]["addresses"])),
        escape("%s · %s" % (current_zh(record), current_en(record)) if record.get("current") else "-"),
        escape("%s（%s）" % (customer["name"], customer["contract"]) if customer else "-"),
        escape("%s · %s%s%s" % (HANDLING_ZH[handling["state"]], handling["state"],
                                "：" + handling["note"] if handling["note"] else "",
                                " — %s" % handling["by"] if handling.get("by") else "")),
        *map(escape, extra),
    )  # fmt: skip
    return "<tr>%s</tr>" % "".join(cell if cell.startswith("<td") else "<td>%s</td>" % cell for cell in cells)


def _passed(record: dict[str, Any]) -> str:
    """Passes by monitor mode or a stale feed are violations too; say how many of the count were let through."""
    if not record["passed"]:
        return ""
    return escape("（放行 %d 次 · passed %d of %d）" % (record["passed"], record["passed"], record["count"]))
