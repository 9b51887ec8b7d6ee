"""The gate's Prometheus metrics (docs/metrics.md), all `icpgate_`, labels from closed sets only.

The hot path counts in plain integers (Runtime.stats, the latency buckets, the violation table);
`WorkerMetrics.sync` copies the increments into these metrics once a second. That keeps
prometheus-client's locks and (in multiprocess mode) its mmap writes off the per-request path.

A gauge without labels has a value, 0, in every process that imports this module, from the moment
it does: the supervisor and the service process too. A gauge only workers can give (the index
serial, the reload result) is therefore labelled with the worker, so that only workers have a
sample of it, and from the moment they set it.
"""

from __future__ import annotations

import platform
from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

from .. import __version__
from .identity import process_name
from .latency import BUCKETS

BUILD_INFO = Gauge("icpgate_build_info", "Version of the running daemon, and the engine reading plain HTTP (always 1).",
                   ["version", "python", "http_engine"], multiprocess_mode="max")  # fmt: skip
CONNECTIONS = Counter("icpgate_connections", "Accepted connections, by listener kind.", ["kind"])
DECISIONS = Counter(
    "icpgate_decisions", "Decisions, by listener kind, action and reason.", ["kind", "action", "reason"]
)
DETECTED = Counter("icpgate_detected_protocols", "What clients of auto listeners spoke, by listener kind and protocol.",
                   ["kind", "protocol"])  # fmt: skip
DECISION_SECONDS = Histogram("icpgate_decision_seconds", "Time to decide one connection or request.",
                             buckets=BUCKETS)  # fmt: skip
ACTIVE_CONNECTIONS = Gauge("icpgate_active_connections", "Open client connections.", multiprocess_mode="livesum")
WORKER_CONNECTIONS = Gauge("icpgate_worker_connections", "Open client connections of each worker: their spread.",
                           ["worker"], multiprocess_mode="livemax")  # fmt: skip
ACCEPT_PAUSES = Counter("icpgate_accept_pauses", "Times a worker above its share of connections stopped accepting.")
UNDECIDED_CONNECTIONS = Gauge("icpgate_undecided_connections", "Open client connections nothing of whose has been"
                              " relayed yet.", multiprocess_mode="livesum")  # fmt: skip
EVICTED = Counter("icpgate_evicted_connections", "Undecided connections closed to make room for new ones, by kind.",
                  ["kind"])  # fmt: skip
RELAYED_BYTES = Counter("icpgate_relayed_bytes", "Bytes relayed for allowed traffic.", ["direction"])
REFUSED = Counter("icpgate_refused_connections", "Connections refused before inspection.", ["why"])
TIMEOUTS = Counter("icpgate_timeouts", "Connections ended by a timeout, by kind and phase.", ["kind", "phase"])
UPSTREAM_FAILURES = Counter("icpgate_upstream_failures", "Allowed connections whose backend could not be reached.",
                            ["kind"])  # fmt: skip
RELAXED = Counter("icpgate_relaxed_decisions", "Policy blocks let through by monitor mode or an expired feed's mode.",
                  ["mode", "reason"])  # fmt: skip
REGISTRY_FILINGS = Gauge("icpgate_registry_filings", "Filings in the index the workers decide with.",
                         multiprocess_mode="livemax")  # fmt: skip
INDEX_SERIAL = Gauge("icpgate_index_serial", "The registry serial of each worker's index.", ["worker"],
                     multiprocess_mode="livemin")  # fmt: skip
LISTENERS_BOUND = Gauge("icpgate_listeners_bound", "Listening sockets bound, summed over workers.",
                        multiprocess_mode="livesum")  # fmt: skip
VIOLATION_KEYS = Gauge("icpgate_violation_keys", "Violation records held in memory until the next write.",
                       multiprocess_mode="livesum")  # fmt: skip
VIOLATIONS_FLUSHED = Counter("icpgate_violation_records_flushed", "Violation records written to the log.")
VIOLATIONS_OVERFLOW = Counter("icpgate_violation_overflow",
                              "Blocks folded into an (overflow) record because max_keys was reached.")  # fmt: skip
VIOLATIONS_DROPPED = Counter("icpgate_violation_blocks_dropped", "Blocks the violation log could not keep.", ["why"])
RELAYED_DROPPED = Counter("icpgate_relayed_names_dropped",
                          "Relayed filed names not recorded for site inspection: the table was full.")  # fmt: skip
BLOCK_LOG_SUPPRESSED = Counter("icpgate_block_log_suppressed", "Block log lines not written (rate limit).")
RELOADS = Counter("icpgate_config_reloads", "Config reloads, by result.", ["result"])
LAST_RELOAD = Gauge("icpgate_config_last_reload_success_timestamp_seconds", "When the config last loaded.",
                    multiprocess_mode="max")  # fmt: skip
RELOAD_OK = Gauge("icpgate_config_last_reload_successful", "1 when the worker's last reload worked.", ["worker"],
                  multiprocess_mode="livemin")  # fmt: skip
QUIC_FLOWS = Gauge("icpgate_quic_flows", "QUIC flows held, by state (pending, relay, blocked).", ["state"],
                   multiprocess_mode="livesum")  # fmt: skip
QUIC_UNPROVEN = Gauge("icpgate_quic_unproven_flows", "Relayed QUIC flows whose client has not answered from its"
                      " address: the ones pushed out to make room.", multiprocess_mode="livesum")  # fmt: skip
QUIC_EVICTED = Counter("icpgate_quic_evicted_flows", "Relayed QUIC flows pushed out, unproven, to make room.")
QUIC_DATAGRAMS = Counter("icpgate_quic_datagrams", "QUIC datagrams received or sent, by direction.", ["direction"])
QUIC_DROPS = Counter("icpgate_quic_dropped_datagrams", "QUIC datagrams dropped, by reason.", ["reason"])
QUIC_UNKNOWN_VERSION = Counter("icpgate_quic_unknown_version_flows", "QUIC flows of a version the gate cannot"
                               " read that rules.quic_unknown_version let through unread.")  # fmt: skip
QUIC_INITIAL_SECONDS = Histogram(
    "icpgate_quic_initial_seconds", "Time to read a QUIC flow's Initial packets and decide on its SNI.", buckets=BUCKETS
)
DNS_CHECKS = Counter("icpgate_dns_checks", "DNS confirmations of violating hosts, by result.", ["result"])
# The fleet's shipper, in the service process (fleet/shipper.py, docs/fleet.md).
FLEET_BACKLOG = Gauge("icpgate_fleet_backlog_records", "Violation records changed since the central store took"
                      " them.", multiprocess_mode="livemax")  # fmt: skip
FLEET_OLDEST_UNSHIPPED = Gauge("icpgate_fleet_oldest_unshipped_seconds", "Age of the oldest change not yet shipped.",
                               multiprocess_mode="livemax")  # fmt: skip
FLEET_LAST_SHIP = Gauge("icpgate_fleet_last_ship_timestamp_seconds", "When the central store last took a batch.",
                        multiprocess_mode="max")  # fmt: skip
FLEET_SHIPPED = Counter("icpgate_fleet_shipped_records", "Violation record changes the central store has taken.")
FLEET_FAILURES = Counter("icpgate_fleet_ship_failures", "Shipping rounds that failed (the centre away or refusing).")
FLEET_DROPPED = Counter("icpgate_fleet_backlog_dropped", "Unshipped records dropped past fleet.max_backlog.")

# Runtime.stats keys -> (metric, how the labels follow from the rest of the key; None: no labels)
_STATS = {
    "connections": (CONNECTIONS, lambda kind: (kind,)),
    "decisions": (DECISIONS, lambda kind, action, reason: (kind, action.value, reason.value)),
    "detected": (DETECTED, lambda kind, protocol: (kind, protocol)),
    "relaxed": (RELAXED, lambda mode, reason: (mode.value, reason.value)),
    "inspect_timeouts": (TIMEOUTS, lambda kind: (kind, "inspect")),
    "idle_timeouts": (TIMEOUTS, lambda kind: (kind, "idle")),
    "silent_timeouts": (TIMEOUTS, lambda kind: (kind, "silent")),
    "evicted": (EVICTED, lambda kind: (kind,)),
    "upstream_failures": (UPSTREAM_FAILURES, lambda kind: (kind,)),
    "refused_loop": (REFUSED, lambda: ("loop",)),
    "refused_full": (REFUSED, lambda: ("full",)),
    "reloads": (RELOADS, lambda result: (result,)),
    "quic_datagrams": (QUIC_DATAGRAMS, lambda direction: (direction,)),
    "quic_drops": (QUIC_DROPS, lambda reason: (reason,)),
    "quic_unknown_version": (QUIC_UNKNOWN_VERSION, None),
    "quic_evicted_flows": (QUIC_EVICTED, None),
    "accept_pauses": (ACCEPT_PAUSES, None),
}


def build_info(http_engine: str) -> None:
    BUILD_INFO.labels(__version__, platform.python_version(), http_engine).set(1)


class WorkerMetrics:
    """One worker's view: remembers what it last copied so each sync adds only the increments."""

    def __init__(self, http_engine: str) -> None:
        worker = process_name() or "0"
        self._serial = INDEX_SERIAL.labels(worker)
        self._connections = WORKER_CONNECTIONS.labels(worker)
        self._reload_ok = RELOAD_OK.labels(worker)
        self._stats: Tally = Tally()
        self._latency = [0] * (len(BUCKETS) + 1)
        self._latency_total = 0.0
        self._plain: Tally = Tally()
        build_info(http_engine)

    def sync(self, runtime, *, serial: int, listeners: int, reload_ok: bool, loaded_at: float) -> None:
        stats = runtime.stats
        for key, value in list(stats.items()):
            if isinstance(key, str):  # a counter without labels: stats["refused_loop"] is ("refused_loop",)
                key = (key,)
            if key[0] == "quic_flows":  # a gauge: flows held now
                QUIC_FLOWS.labels(key[1]).set(value)
                continue
            if key[0] == "quic_unproven_flows":
                QUIC_UNPROVEN.set(value)
                continue
            delta = value - self._stats[key]
            if delta <= 0:
                continue
            if key[0] == "quic_initial_seconds":
                self._stats[key] = value
                _histogram_add(QUIC_INITIAL_SECONDS, key[1] if len(key) > 1 else None, delta)
                continue
            if key[0] not in _STATS:
                continue
            metric, labels = _STATS[key[0]]
            (metric.labels(*labels(*key[1:])) if labels else metric).inc(delta)
            self._stats[key] = value
        self._sync_latency(runtime.latency)
        violations = runtime.violations
        self._add(RELAYED_BYTES.labels("to_upstream"), "up", runtime.bytes_to_upstream)
        self._add(RELAYED_BYTES.labels("to_client"), "down", runtime.bytes_to_client)
        self._add(VIOLATIONS_OVERFLOW, "overflow", violations.overflowed)
        self._add(VIOLATIONS_DROPPED.labels("table_full"), "dropped", violations.dropped)
        self._add(BLOCK_LOG_SUPPRESSED, "suppressed", runtime.block_log.suppressed)
        self._add(RELAYED_DROPPED, "relayed_dropped", runtime.relayed.dropped)
        ACTIVE_CONNECTIONS.set(len(runtime.connections))
        self._connections.set(len(runtime.connections))
        UNDECIDED_CONNECTIONS.set(len(runtime.undecided))
        VIOLATION_KEYS.set(len(violations))
        REGISTRY_FILINGS.set(len(runtime.policy.index))
        self._serial.set(serial)
        LISTENERS_BOUND.set(listeners)
        self._reload_ok.set(1 if reload_ok else 0)
        LAST_RELOAD.set(loaded_at)

    def _add(self, metric, name: str, value: int) -> None:
        delta = value - self._plain[name]
        if delta > 0:
            metric.inc(delta)
            self._plain[name] = value

    def _sync_latency(self, latency) -> None:
        for bucket, (count, seen) in enumerate(zip(latency.counts, self._latency, strict=True)):
            if count > seen:
                _histogram_add(DECISION_SECONDS, bucket, count - seen)
                self._latency[bucket] = count
        if latency.total > self._latency_total:
            _histogram_add(DECISION_SECONDS, None, latency.total - self._latency_total)
            self._latency_total = latency.total


def _histogram_add(histogram: Histogram, bucket: int | None, delta: float) -> None:
    """Add `delta` observations to one bucket, or (bucket None) `delta` seconds to the sum.
    prometheus-client has no call to add counted observations; its histogram keeps one value per
    bucket (not cumulative) and a sum, which is what is incremented here."""
    if bucket is None:
        histogram._sum.inc(delta)
    else:
        histogram._buckets[bucket].inc(delta)
