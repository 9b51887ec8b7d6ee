"""Filed names the gate relayed on our addresses, kept in memory per worker until it writes them out.

Site inspection (docs/inspection.md) reads them as a sign that a filed site whose DNS points
elsewhere is still served here, behind someone else's front. The gate records a name when it first
decides it (Runtime.decide's cache miss), never per request; the worker renews its decision
cache at each flush, so a name in use is recorded again once per flush interval. Memory is
bounded: past `max_keys` names, new ones are dropped and counted.
"""

from __future__ import annotations

# (host, destination IP) -> [first seen, last seen]
RelayedKey = tuple[str, str]


class RelayedTable:
    __slots__ = ("dropped", "max_keys", "records")

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.records: dict[RelayedKey, list[float]] = {}
        self.dropped = 0  # names not recorded: the table was full

    def add(self, host: str, ip: str, now: float) -> None:
        record = self.records.get((host, ip))
        if record is not None:
            record[1] = now
        elif len(self.records) < self.max_keys:
            self.records[host, ip] = [now, now]
        else:
            self.dropped += 1

    def take(self) -> dict[RelayedKey, list[float]]:
        """Hand the records to the writer and start afresh."""
        records, self.records = self.records, {}
        return records

    def __len__(self) -> int:
        return len(self.records)
