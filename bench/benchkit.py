"""What the feed benchmarks share: where things are, how to run icpgate, a free loopback port."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ICPGATE = [sys.executable, "-m", "icpgate"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
