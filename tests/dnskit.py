"""A real DNS server for the tests: dnsmasq on a free loopback port, with only the records given.

No upstream servers (--no-resolv), no /etc/hosts: nothing is asked of, or learnt from, the outside.
Every query is logged to a file, so a test can count what the gate really asked.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Dnsmasq:
    port: int
    process: subprocess.Popen
    log_path: Path

    def queries(self, name: str) -> int:
        """How many queries for `name` dnsmasq has received."""
        return sum(
            1 for line in self.log_path.read_text().splitlines() if "query[" in line and " %s from" % name in line
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def free_udp_port() -> int:
    """A port free for UDP and for TCP too: dnsmasq listens on both."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def start_dnsmasq(tmp: Path, *, hosts: dict[str, str], cnames: dict[str, str] | None = None,
                  nxdomain: tuple[str, ...] = (), ttl: int = 300, extra: tuple[str, ...] = ()) -> Dnsmasq:  # fmt: skip
    """`hosts` maps a name to an address (A or AAAA), `cnames` an alias to its target; the names
    in `nxdomain` answer NXDOMAIN. Everything else is refused (no upstream). `extra`: more
    dnsmasq options (`--local=/cn/`: unknown names there answer NXDOMAIN; `--server=/d/IP#port`)."""
    port = free_udp_port()
    log_path = tmp / "dnsmasq.log"
    arguments = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
        "--bind-interfaces", "--listen-address=127.0.0.1", "--port=%d" % port, "--log-queries",
        "--log-facility=%s" % log_path, "--local-ttl=%d" % ttl, "--user=root", "--pid-file=",
    ]  # fmt: skip
    arguments += ["--host-record=%s,%s" % (name, address) for name, address in hosts.items()]
    arguments += ["--cname=%s,%s" % (alias, target) for alias, target in (cnames or {}).items()]
    arguments += ["--address=/%s/" % name for name in nxdomain]
    arguments += list(extra)
    process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (log_path.exists() and "started" in log_path.read_text()):
        if process.poll() is not None:
            raise RuntimeError("dnsmasq exited: %s" % process.stderr.read())
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError("dnsmasq did not start")
        time.sleep(0.05)
    return Dnsmasq(port, process, log_path)


class SilentResolver:
    """A UDP socket that takes DNS queries and never answers: the unanswering server."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()
