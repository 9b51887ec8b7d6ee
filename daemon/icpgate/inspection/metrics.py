"""The inspection's gauges (docs/metrics.md), computed by the admin API at scrape time from the
history, as the violation log's are. Exported at zero while inspection is off or has not run, so
dashboards and the alert find their series."""

from __future__ import annotations

from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from ..config.display_time import from_iso
from .classify import CLASSES, STATES


def inspection_families(summary: dict[str, Any] | None) -> list[Metric]:
    summary = summary or {}
    domains = GaugeMetricFamily("icpgate_inspection_domains", "Domains of filings with our access, by the class"
                                " of their last inspection.", labels=["class"])  # fmt: skip
    for klass in CLASSES:
        domains.add_metric([klass], summary.get("domains", {}).get(klass, 0))
    filings = GaugeMetricFamily("icpgate_inspection_filings", "Filings with our access, by inspection state.",
                                labels=["state"])  # fmt: skip
    for state in STATES:
        filings.add_metric([state], summary.get("filings", {}).get(state, 0))
    share = GaugeMetricFamily("icpgate_inspection_hollow_share", "Hollow filings as a share of those inspected.",
                              value=summary.get("hollow_share", 0.0))  # fmt: skip
    threshold = GaugeMetricFamily("icpgate_inspection_hollow_alert_share", "inspect.hollow_alert_share: the"
                                  " hollow share above which IcpgateHollowFilings fires (0: inspection off).",
                                  value=summary.get("hollow_alert_share", 0.0))  # fmt: skip
    complete = summary.get("last_complete")
    finished = GaugeMetricFamily("icpgate_inspection_last_complete_timestamp_seconds", "When the last complete"
                                 " inspection pass finished (0: never).",
                                 value=from_iso(complete).timestamp() if complete else 0.0)  # fmt: skip
    return [domains, filings, share, threshold, finished]
