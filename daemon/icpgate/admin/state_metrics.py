"""/metrics: the workers' metrics (multiprocess files) plus what the admin reads from the registry
and the violation log at scrape time: feed state, enforcement mode, violation records by DNS state.
The enforcement mode and /readyz's checks are computed here once, so they cannot disagree."""

from __future__ import annotations

import glob
import os
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from ..config.settings import Config
from ..feed.protocol import SyncResult
from ..policy.decide import daemon_mode
from ..policy.freshness import freshness
from ..registry.index_store import IndexMeta, RegistryIdentity, kept_because
from ..registry.store import RegistryState
from ..telemetry.multiproc import ENV
from ..violations.store import DNS_STATES

MODES = ("enforce", "monitor", "open")  # policy.Mode
RATE_WINDOW = 60.0


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def worker_families() -> list[Metric]:
    """Every process's metrics: from the multiprocess directory under `icpgate run`."""
    if ENV not in os.environ:
        return list(REGISTRY.collect())
    # A worker that is starting creates its file before prometheus-client sizes it: an empty file
    # cannot be read yet (struct.error), and holds nothing, so it is left out until it is.
    files = [path for path in glob.glob(os.path.join(os.environ[ENV], "*.db")) if _initialised(path)]
    return list(MultiProcessCollector.merge(files, accumulate=True))


def _initialised(path: str) -> bool:
    try:
        return os.path.getsize(path) >= 8
    except OSError:  # the file of a worker that has just exited and been cleaned up
        return False


def state_families(config: Config, sync: dict, serial: int, violations: dict[str, int]) -> list[Metric]:
    fresh = freshness(config.feed, sync.get("last_success"), datetime.now(UTC))
    configured = GaugeMetricFamily(
        "icpgate_feed_configured", "1 when feed.urls is set.", value=int(bool(config.feed.urls))
    )
    feed_serial = GaugeMetricFamily("icpgate_feed_serial", "The registry serial the feed has brought.", value=serial)
    success = GaugeMetricFamily("icpgate_feed_last_success_timestamp_seconds", "Last successful sync (0: never).",
                                value=_timestamp(sync.get("last_success")))  # fmt: skip
    attempt = GaugeMetricFamily("icpgate_feed_last_attempt_timestamp_seconds", "Last sync attempt (0: never).",
                                value=_timestamp(sync.get("last_attempt")))  # fmt: skip
    failures = GaugeMetricFamily("icpgate_feed_consecutive_failures", "Sync failures since the last success.",
                                 value=sync.get("failures", 0))  # fmt: skip
    results = CounterMetricFamily("icpgate_feed_syncs", "Feed syncs, by result.", labels=["result"])
    counts = sync.get("results", {})
    for result in SyncResult:
        results.add_metric([result.value], counts.get(result.value, 0))
    mismatches = CounterMetricFamily("icpgate_feed_checksum_mismatches", "Change sets that did not add up.",
                                     value=sync.get("checksum_mismatches", 0))  # fmt: skip
    mode = GaugeMetricFamily("icpgate_enforcement_mode", "1 for the mode the gate is in.", labels=["mode"])
    current, _ = daemon_mode(config.gate.enforcement, fresh.enforcement)
    for name in MODES:
        mode.add_metric([name], int(name == current))
    records = GaugeMetricFamily("icpgate_violation_records", "Records in the violation log, by DNS state.",
                                labels=["dns"])  # fmt: skip
    for state in DNS_STATES:
        records.add_metric([state], violations.get(state, 0))
    return [configured, feed_serial, success, attempt, failures, results, mismatches, mode, records]


def readiness(config: Config, workers: list[Metric], sync: dict,
              monitor_ranges: tuple | list = ()) -> dict[str, dict]:  # fmt: skip
    """The checks of /readyz, also behind `icpgate_ready`: every worker has its index and its
    listeners, and the feed is not expired. `enforcement` only reports (monitor mode is a choice,
    not a fault): the daemon's mode, the key that set it and the pack's pilot ranges."""
    bound = sum(value for _, value in sample_values(workers, "icpgate_listeners_bound"))
    # a quic listener is served by worker 0 alone (gate/quic/listener.py)
    quic = sum(listener.kind == "quic" for listener in config.listeners)
    expected = config.gate.workers * (len(config.listeners) - quic) + quic
    serials = sample_values(workers, "icpgate_index_serial")
    fresh = freshness(config.feed, sync.get("last_success"), datetime.now(UTC))
    return {
        "registry": {"ok": bool(serials), "serial": int(min(v for _, v in serials)) if serials else None},
        "listeners": {"ok": bound >= expected, "bound": int(bound), "expected": expected},
        "feed": {"ok": fresh.state != "expired", "state": fresh.state, "age": fresh.age,
                 "enforcement": fresh.enforcement},
        "enforcement": enforcement_check(config, fresh.enforcement, monitor_ranges),
    }  # fmt: skip


def enforcement_check(config: Config, stale: str, monitor_ranges: tuple | list) -> dict:
    """The daemon's mode (policy.daemon_mode), the key that set it and the pilot ranges."""
    mode, rule = daemon_mode(config.gate.enforcement, stale)
    return {"ok": True, "mode": mode.value, "rule": rule or None, "monitor_ranges": [str(n) for n in monitor_ranges]}


def registry_warnings(path: Path, meta: IndexMeta | None, state: RegistryState | None) -> list[dict[str, str]]:
    """/readyz's `warnings`: the registry at `path` (`state`, None when there is none) is not the one
    the index served (`meta`) follows, so its changes are not enforced until the operator adopts it.
    A warning, not a failed check: the gate enforces its last good index, and in inline mode a failed
    /readyz would route the hosted ranges around it."""
    if meta is None:
        return []
    if state is None:
        reason = "there is no registry at %s" % path
    else:
        reason = kept_because(meta, RegistryIdentity(path, state.registry_id, state.serial, state.checksum))
    if not reason:
        return []
    return [{"check": "registry", "message": "%s: the gate keeps enforcing its index (registry %s, serial %d) until"
             " the registry is adopted with `icpgate registry adopt` or a reload" % (reason, meta.registry,
                                                                                   meta.serial)}]  # fmt: skip


def registry_family(warnings: list[dict[str, str]]) -> GaugeMetricFamily:
    """1 while the registry at registry.path is not the one the gate enforces (the warning above)."""
    return GaugeMetricFamily("icpgate_registry_not_adopted", "1 while the registry at registry.path is another"
                             " one than the index enforced, or behind it.",
                             value=int(any(w["check"] == "registry" for w in warnings)))  # fmt: skip


def ready_family(checks: dict[str, dict]) -> GaugeMetricFamily:
    """1 when /readyz answers 200: a not-ready alert needs it as a series, the probe is not scraped."""
    return GaugeMetricFamily("icpgate_ready", "1 when every /readyz check passes.",
                             value=int(all(check["ok"] for check in checks.values())))  # fmt: skip


def exposition(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def sample_values(families: list[Metric], name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name`."""
    return [(sample.labels, sample.value) for family in families for sample in family.samples if sample.name == name]


def _timestamp(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


class BlockRate:
    """Blocks per second by reason over the last minute, from samples of the decision counters."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, dict[str, float]]] = deque()

    def add(self, families: list[Metric]) -> None:
        totals: dict[str, float] = {}
        for labels, value in sample_values(families, "icpgate_decisions_total"):
            if labels.get("action") == "block":
                totals[labels["reason"]] = totals.get(labels["reason"], 0.0) + value
        now = time.monotonic()
        self.samples.append((now, totals))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()

    def per_second(self) -> dict[str, float]:
        if len(self.samples) < 2:
            return {}
        (start, first), (end, last) = self.samples[0], self.samples[-1]
        elapsed = max(end - start, 1e-9)
        return {reason: max(0.0, value - first.get(reason, 0.0)) / elapsed for reason, value in sorted(last.items())}
