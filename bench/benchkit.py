"""What the feed benchmarks share: where things are, how to run icpgate, a free loopback port."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ICPGATE = [sys.executable, "-m", "icpgate"]


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `grace` seconds."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def h2load_rate(command: list[str], url: str, requests: int) -> float:
    """Run an h2load `command` (everything but the URL; `-n requests` among it) and return its
    req/s; RuntimeError unless every request was done, so a rate is never read off a broken run."""
    result = subprocess.run([*command, url], capture_output=True, text=True, timeout=300)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", result.stdout)
    done = re.search(r"(\d+) done", result.stdout)
    if not rate or not done or int(done[1]) != requests:
        raise RuntimeError("h2load did not finish every request:\n%s\n%s" % (result.stdout, result.stderr))
    return float(rate[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 300.0) -> float:
    """Seconds until something accepts on loopback `port`; TimeoutError after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return time.monotonic() - started
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("port %d" % port)


def wait_snapshot(url: str, timeout: float = 600, poll: float = 0.2) -> dict:
    """Wait until the publisher at `url` (its status document) has a snapshot of its serial."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                status = json.loads(answer.read())
                if status["snapshot"] and status["snapshot"]["serial"] == status["serial"]:
                    return status
        except OSError:
            pass
        time.sleep(poll)
    sys.exit("the publisher's snapshot was not ready within %d s" % timeout)


def write_config(folder: Path, body: str = "") -> Path:
    """A config in `folder` for a registry there: the default pack, no admin API, no DNS, plus `body`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "%s"\nreload_interval = 0.5\n[policy]\n'
                    'pack = "%s"\n[admin]\nenabled = false\n[dns]\nenabled = false\n%s'
                    % (folder / "registry.db", REPO / "policies" / "default.toml", body))  # fmt: skip
    return path
