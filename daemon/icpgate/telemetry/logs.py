"""Log output: the familiar text lines, or one JSON object per line for log shippers.

JSON lines carry the structured fields a record has (the block log's request_id, host, reason,
client, destination...) as top-level keys, so support can search for a request id directly.

Under `icpgate run` every line also names the process that wrote it, as `worker` (the worker
number, or `supervisor` / `service`) and `pid`: the workers of one daemon write to the same stream,
and without it their lines cannot be told apart.

A message, and every text field of a JSON line, is written with its control characters escaped
(telemetry/printable.py): whatever client-supplied text a message carries, one record is one line.
A traceback, which is the daemon's own text, keeps its lines.

Under systemd, stderr goes to the journal, which stamps each entry itself: when JOURNAL_STREAM names
the file stderr is (systemd.exec(5)), text lines leave out their time, and every line starts with
the record's syslog priority, `<3>` to `<7>` (sd-daemon(3)), so `journalctl -p warning` selects by
level; a traceback's lines each carry it, so they stay one record's level. docs/logs.md.
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
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))  # else 7
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
    def __init__(self, *, timestamps: bool = True) -> None:
        text, tagged = TEXT_FORMAT, TAGGED_TEXT_FORMAT
        if not timestamps:  # the journal stamps its entries: no second time in the text
            text, tagged = (form.removeprefix("%(asctime)s ") for form in (text, tagged))
        super().__init__(text)
        self._tagged = _OneLineFormatter(tagged)

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


class JournalFormatter(logging.Formatter):
    """Another formatter's lines, each prefixed with the record's syslog priority for journald."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = "<%d>" % priority(record.levelno)
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: critical 2, error 3, warning 4, info 6, debug 7."""
    return next((value for floor, value in _PRIORITIES if levelno >= floor), 7)


def stderr_is_journal() -> bool:
    """True when stderr is the stream systemd connected to the journal (JOURNAL_STREAM is
    `device:inode` of it; a child whose stderr was redirected elsewhere inherits the variable but
    not the stream)."""
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def log_to_stderr(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()
    formatter = JsonFormatter() if fmt == "json" else TextFormatter(timestamps=not journal)
    handler.setFormatter(JournalFormatter(formatter) if journal else formatter)
    handler.addFilter(_ProcessTag())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
