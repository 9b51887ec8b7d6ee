"""The status page: feed state, block rate by reason and the top confirmed violations, in plain
HTML (no scripts, no external assets), for an operator without Grafana at hand."""

from __future__ import annotations

from html import escape
from typing import Any

from ..config import Config

_STYLE = "".join(
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
    )
)


def render_status_page(config: Config, feed: dict[str, Any], rates: dict[str, float], top: list[dict[str, Any]],
                       summary: dict[str, int]) -> str:  # fmt: skip
    fresh = feed["freshness"]
    sync = feed["sync"]
    mode = fresh["enforcement"]
    age = "%.0f s ago" % (fresh["age"] or 0)
    rows_feed = [
        ("Enforcement 执行模式", '<span class="mode %s">%s</span>' % (escape(mode), escape(mode))),
        ("Feed 备案数据源", escape(", ".join(config.feed.urls)) or "none (local imports only)"),
        ("Freshness", '<span class="%s">%s</span>' % (escape(fresh["state"]), escape(fresh["state"]))),
        (
            "Last successful sync",
            "%s (%s)" % (escape(sync["last_success"]), escape(age)) if sync.get("last_success") else "never",
        ),
        ("Last result", escape("%s %s" % (sync.get("last_result", "-"), sync.get("last_message", "")))),
        ("Registry serial", "%d (%d filings)" % (feed["serial"], feed["filings"])),
    ]
    feed_html = "<dl>%s</dl>" % "".join("<dt>%s</dt><dd>%s</dd>" % row for row in rows_feed)
    if rates:
        rate_rows = "".join('<tr><td>%s</td><td class="num">%.2f</td></tr>' % (escape(reason), rate)
                            for reason, rate in sorted(rates.items(), key=lambda item: -item[1]))  # fmt: skip
        rates_html = (
            "<table><tr><th>Reason 原因</th><th class=num>Blocks/s (last minute)</th></tr>%s</table>" % rate_rows
        )
    else:
        rates_html = '<p class="empty">Measuring; the rate shows after the first 10 seconds.</p>'
    if top:
        violation_rows = "".join(_violation_row(record) for record in top)
        top_html = (
            "<table><tr><th>Domain 域名</th><th>Host</th><th>IP:port</th><th>Proto</th><th>Reason</th>"
            "<th class=num>Count</th><th>Last seen</th><th>Resolves to</th></tr>%s</table>" % violation_rows
        )
    else:
        top_html = '<p class="empty">No confirmed violations.</p>'
    counts = ", ".join("%s %d" % (escape(state), count) for state, count in sorted(summary.items())) or "none"
    return """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="30"><title>icpgate status — %(provider)s</title><style>%(style)s</style></head>
<body><main><h1>icpgate — %(provider)s</h1>
<section><h2>Feed and enforcement</h2>%(feed)s</section>
<section><h2>Block rate by reason</h2>%(rates)s</section>
<section><h2>Top confirmed violations 已确认违规</h2>%(top)s<p class="empty">Records by DNS state: %(counts)s.
All records: <a href="/api/v1/violations">/api/v1/violations</a>.</p></section>
</main></body></html>
""" % {
        "provider": escape(config.provider.name or config.provider.id), "style": _STYLE, "feed": feed_html,
        "rates": rates_html, "top": top_html, "counts": counts,
    }  # fmt: skip


def _violation_row(record: dict[str, Any]) -> str:
    cells = (
        escape(record["domain"] or "-"), escape(record["host"]), escape("%s:%d" % (record["ip"], record["port"])),
        escape(record["proto"]), escape(record["reason"]), '<td class="num">%d</td>' % record["count"],
        escape(record["last_seen"]), escape(", ".join(record["dns"]["addresses"])),
    )  # fmt: skip
    return "<tr>%s</tr>" % "".join(cell if cell.startswith("<td") else "<td>%s</td>" % cell for cell in cells)
