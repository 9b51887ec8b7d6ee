"""`icpgate import` of a large file on a terminal: the progress bar goes to the terminal and the
import finishes (it crashed there once, and only there: a pipe has no progress bar). The real CLI
runs under a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

from conftest import ICPGATE, sample_records


def big_ndjson(path: Path, count: int) -> Path:
    template = sample_records()[0]
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            subject = "京ICP备2031%06d号" % n
            record = template | {"licence": subject + "-1", "subject_licence": subject,
                                 "domains": ["tty-%d.example-tty.cn" % n]}  # fmt: skip
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def run_on_terminal(args: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run with stdout and stderr on the slave side of a new pty; returns (exit code, what it printed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout=10), output.decode("utf-8", "replace")


def test_a_large_import_on_a_terminal_shows_progress_and_finishes(config_path: Path, tmp_path: Path) -> None:
    path = big_ndjson(tmp_path / "big.ndjson", 6000)
    assert path.stat().st_size > 1_000_000  # the size from which the progress bar shows
    code, output = run_on_terminal([*ICPGATE, "import", str(path), "-c", str(config_path)])
    assert "Traceback" not in output, output
    assert code == 0, output
    assert "importing" in output and "filings" in output  # the progress bar drew on the terminal
    assert "imported 6000 filings from %s (6000 new" % path in output
