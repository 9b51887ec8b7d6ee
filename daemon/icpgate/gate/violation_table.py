"""Blocked decisions, counted in memory per violation key until the worker writes them out.

The hot path pays one dict lookup per block. Memory is bounded: junk (malformed hosts, IP
literals, no host) folds into one record per destination, and past `max_keys` distinct records
new hosts fold into one "(overflow)" record per destination, counted. Only when even those would
grow past a small slack is a block dropped, and that is counted too.
"""

from __future__ import annotations

from ..policy.decide import Reason

JUNK_HOST = "(junk)"
OVERFLOW_HOST = "(overflow)"
JUNK_REASONS = frozenset({Reason.INVALID, Reason.NO_HOST, Reason.IP_LITERAL})
OVERFLOW_SLACK = 1024  # overflow records beyond max_keys: one per destination, which we host

# (host, destination IP, destination port, protocol, reason)
ViolationKey = tuple[str, str, int, str, str]
# [first seen, last seen, count, passed (counted but let through by a stale-feed mode), client]
ViolationRecord = list


class ViolationTable:
    __slots__ = ("dropped", "max_keys", "overflowed", "records", "sample_client")

    def __init__(self, max_keys: int, sample_client: bool) -> None:
        self.max_keys = max_keys
        self.sample_client = sample_client
        self.records: dict[ViolationKey, ViolationRecord] = {}
        self.overflowed = 0  # blocks folded into an overflow record (their host is not kept)
        self.dropped = 0  # blocks not recorded at all

    def add(self, host: str, ip: str, port: int, proto: str, reason: Reason, client: str, blocked: bool,
            now: float) -> None:  # fmt: skip
        if reason in JUNK_REASONS:
            host = JUNK_HOST
        key = (host, ip, port, proto, reason.value)
        records = self.records
        record = records.get(key)
        if record is None:
            if len(records) >= self.max_keys and host is not JUNK_HOST:
                self.overflowed += 1
                key = (OVERFLOW_HOST, ip, port, proto, reason.value)
                record = records.get(key)
            if record is None:
                if len(records) >= self.max_keys + OVERFLOW_SLACK:
                    self.dropped += 1
                    return
                record = records[key] = [now, now, 0, 0, None]
        record[1] = now
        record[2] += 1
        if not blocked:
            record[3] += 1
        if self.sample_client:
            record[4] = client

    def take(self) -> dict[ViolationKey, ViolationRecord]:
        """Hand the records to the writer and start afresh."""
        records, self.records = self.records, {}
        return records

    def __len__(self) -> int:
        return len(self.records)
