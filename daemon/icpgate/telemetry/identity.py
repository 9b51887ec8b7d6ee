"""Which process of the daemon this is: "0", "1"... for a worker, "supervisor", or "service".

Set once per process (the supervisor names each child right after fork); log lines and the
per-worker gauges carry it, so the workers of one daemon can be told apart.
"""

from __future__ import annotations

_name: str | None = None


def name_process(name: str) -> None:
    global _name
    _name = name


def process_name() -> str | None:
    """None outside `icpgate run` (the other commands are one process)."""
    return _name
