"""Log output: the familiar text lines, or one JSON object per line for log shippers.

JSON lines carry the structured fields a record has (the block log's request_id, host, reason,
client, destination...) as top-level keys, so support can search for a request id directly.

Under `icpgate run` every line also names the process that wrote it, as `worker` (the worker
number, or `supervisor` / `service`) and `pid`: the workers of one daemon write to the same stream,
and without it their lines cannot be told apart.

A message, and every text field of a JSON line, is written with its control characters escaped
(telemetry/printable.py): whatever client-supplied text a message carries, one record is one line.
A traceback, which is the daemon's own text, keeps its lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

from .identity import process_name
from .printable import printable

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TAGGED_TEXT_FORMAT = "%(asctime)s %(levelname)s [worker=%(worker)s pid=%(pid)d] %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record was passed in `extra`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class _ProcessTag(logging.Filter):
    """Adds `worker` and `pid` to every record; the pid is read per record, so a forked child
    that has not been named yet still shows its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = process_name()
        if name is not None:
            record.worker = name
            record.pid = os.getpid()
        return True


class _OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)  # set afresh from msg and args by every format()
        return super().formatMessage(record)


class TextFormatter(_OneLineFormatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._tagged = _OneLineFormatter(TAGGED_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self._tagged.format(record) if hasattr(record, "worker") else super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": printable(record.getMessage()),
        }
        entry.update((key, printable(value) if isinstance(value, str) else value)
                     for key, value in vars(record).items() if key not in _STANDARD)  # fmt: skip
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_to_stderr(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ProcessTag())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
