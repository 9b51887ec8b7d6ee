"""The failure bypass of inline mode, on the shipped nftables ruleset in namespaces the tests create.

`icpgate bypass on|off|status` change and read the sets `bypass4`/`bypass6` of the real
systemd/icpgate-inline.nft (read back with `nft -j list set`); a dead gate drops what is steered to
it (fail closed) until the bypass routes the hosted ranges around it; `icpgate bypass watch` turns
the bypass on when a real gate's /readyz fails (killed, or not ready to serve) and off once it is
ready again, after the thresholds and never before; an expired feed alone is left to the gate.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import netnskit
import pytest
from gatekit import free_port, gate_config, listener

from conftest import ICPGATE, REPO
from icpgate.admin.state_metrics import readiness
from icpgate.config.settings import load_config
from icpgate.inline.bypass import BypassSets, parse_ranges
from icpgate.inline.watch import Watcher, WatchSettings, probe

HOSTED = [netnskit.HOSTED4, netnskit.HOSTED6]
BANNER_PORT = 2222  # steered to the gate like every hosted port; no gate listener serves it in these tests


@pytest.fixture
def net() -> Iterator[netnskit.Topology]:
    with netnskit.topology("icpbp") as topology:
        topology.load_ruleset({})
        yield topology


def bypass(net: netnskit.Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return net.run(net.gate, *ICPGATE, "bypass", *args, check=False)


def set_elements(net: netnskit.Topology, name: str) -> list:
    answer = json.loads(net.run(net.gate, "nft", "-j", "list", "set", "inet", "icpgate", name).stdout)
    return next(item["set"] for item in answer["nftables"] if "set" in item).get("elem", [])


def bypassed(net: netnskit.Topology) -> dict[str, list]:
    return {name: set_elements(net, name) for name in ("bypass4", "bypass6")}


ON = {"bypass4": [{"prefix": {"addr": "203.0.113.0", "len": 24}}],
      "bypass6": [{"prefix": {"addr": "2001:db8:2::", "len": 64}}]}  # fmt: skip
OFF = {"bypass4": [], "bypass6": []}


REACHED = 10.0  # how long a connection that should reach the server may take on a loaded machine


def banner_from(net: netnskit.Topology, address: str, timeout: float = 1.5) -> bytes | None:
    """The server's banner through the gate namespace, or None when the connection gets nowhere.

    A check that expects the banner passes `timeout=REACHED`: the banner server is a Python process,
    and on a machine busy with other work (seen once: IPv6, just after the bypass went on) it can take
    longer than the 1.5 s that judges a connection that gets nowhere."""
    with net.socket(net.client, socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, BANNER_PORT))
            return sock.recv(100)
        except OSError:
            return None


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)


# --- the command on the shipped ruleset ---------------------------------------------------------------
def test_on_off_and_status_change_and_read_exactly_the_sets(net: netnskit.Topology, tmp_path: Path) -> None:
    config = gate_config(tmp_path, {"http": listener(free_port(), "http")}, tables={"dns": {"hosted_ranges": HOSTED}})
    status = json.loads(bypass(net, "status", "--json", "-c", str(config)).stdout)
    assert status["state"] == "off" and status["source"].startswith("dns.hosted_ranges")
    assert bypassed(net) == OFF

    done = bypass(net, "on", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert bypassed(net) == ON
    assert bypass(net, "on", "-c", str(config)).returncode == 0  # again: nothing to add, no error
    assert bypassed(net) == ON
    status = json.loads(bypass(net, "status", "--json", "-c", str(config)).stdout)
    assert status["state"] == "on" and all(item["bypassed"] for item in status["ranges"])
    assert "bypass       on" in bypass(net, "status", "-c", str(config)).stdout

    # An element the operator put there for another reason stays through `off`.
    net.run(net.gate, "nft", "add", "element", "inet", "icpgate", "bypass4", "{ 192.0.2.0/24 }")
    assert bypass(net, "off", "-c", str(config)).returncode == 0
    assert bypassed(net) == {"bypass4": [{"prefix": {"addr": "192.0.2.0", "len": 24}}], "bypass6": []}
    assert bypass(net, "off", "-c", str(config)).returncode == 0  # again: nothing to remove, no error
    assert json.loads(bypass(net, "status", "--json", "-c", str(config)).stdout)["state"] == "off"


def test_ranges_on_the_command_line_and_their_mistakes(net: netnskit.Topology) -> None:
    assert bypass(net, "on", "203.0.113.0/25", "203.0.113.128/25", "2001:db8:2::/64").returncode == 0
    assert bypassed(net) == ON  # the two halves merged into one element
    partial = json.loads(bypass(net, "status", "--json", "203.0.113.0/24", "198.51.100.0/24").stdout)
    assert partial["state"] == "partial"
    assert {item["range"]: item["bypassed"] for item in partial["ranges"]} == {
        "198.51.100.0/24": False, "203.0.113.0/24": True}  # fmt: skip

    typo = bypass(net, "on", "203.0.113.7/24")
    assert typo.returncode == 2 and "host bits set" in typo.stderr
    # A range that overlaps an element without being inside it is refused; nothing changes.
    overlap = bypass(net, "on", "203.0.112.0/23", "198.51.100.0/24")
    assert overlap.returncode == 8 and "overlaps 203.0.112.0/23" in overlap.stderr
    assert bypassed(net) == ON


def test_without_the_ruleset_or_without_cap_net_admin_it_says_so(net: netnskit.Topology) -> None:
    # CAP_NET_ADMIN is all nft needs: a process with nothing else can switch the bypass.
    only_net_admin = ["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all"]
    assert net.run(net.gate, *only_net_admin, *ICPGATE, "bypass", "on", *HOSTED, check=False).returncode == 0
    assert bypassed(net) == ON
    no_caps = net.run(net.gate, "setpriv", "--bounding-set=-all", "--inh-caps=-all", *ICPGATE, "bypass", "off",
                      *HOSTED, check=False)  # fmt: skip
    assert no_caps.returncode == 8 and "needs CAP_NET_ADMIN" in no_caps.stderr
    assert bypassed(net) == ON

    net.run(net.gate, "nft", "delete", "table", "inet", "icpgate")
    missing = bypass(net, "status", *HOSTED)
    assert missing.returncode == 8 and "is the inline ruleset loaded?" in missing.stderr


def test_a_dead_gate_fails_closed_and_the_bypass_routes_around_it(net: netnskit.Topology) -> None:
    netnskit.start_banner(net, BANNER_PORT)
    for address in (netnskit.SERVER4, netnskit.SERVER6):
        assert banner_from(net, address) is None, address  # steered to a gate that is not there: dropped
    assert bypass(net, "on", *HOSTED).returncode == 0
    for address in (netnskit.SERVER4, netnskit.SERVER6):
        assert banner_from(net, address, REACHED) == netnskit.BANNER, address  # routed straight to the server
    assert bypass(net, "off", *HOSTED).returncode == 0
    assert banner_from(net, netnskit.SERVER4) is None


# --- the watcher ----------------------------------------------------------------------------------------
def nft_in(net: netnskit.Topology, tmp_path: Path) -> str:
    """An `nft` that runs in the gate namespace, for a Watcher driven from the test process."""
    wrapper = tmp_path / "nft"
    wrapper.write_text('#!/bin/sh\nexec ip netns exec %s nft "$@"\n' % net.gate)
    wrapper.chmod(0o755)
    return str(wrapper)


def test_the_watcher_switches_only_after_the_thresholds_in_a_row(net: netnskit.Topology, tmp_path: Path) -> None:
    sets = BypassSets(nft_in(net, tmp_path))
    watcher = Watcher(sets, parse_ranges(HOSTED), WatchSettings("http://unused", fail_after=3, recover_after=4))
    watcher.start()
    for result in ["down", "down", None, "down", "down", None, None, "down", "down"]:
        watcher.observe(result)  # never three failures in a row: the gate is given the benefit
        assert bypassed(net) == OFF
    watcher.observe("down")
    assert bypassed(net) == ON  # the third in a row
    for result in [None, None, None, "down", None, None, None, "down"]:
        watcher.observe(result)  # never four ready polls in a row
        assert bypassed(net) == ON
    for _ in range(3):
        watcher.observe(None)
    assert bypassed(net) == ON
    watcher.observe(None)
    assert bypassed(net) == OFF

    # A ruleset reloaded meanwhile empties the sets: the watcher puts the ranges back at its next poll.
    for _ in range(3):
        watcher.observe("down")
    assert bypassed(net) == ON
    net.run(net.gate, "nft", "flush", "set", "inet", "icpgate", "bypass4")
    watcher.observe("down")
    assert bypassed(net) == ON


def start_gate_in(net: netnskit.Topology, tmp_path: Path, admin: int, tables: dict | None = None):
    config = gate_config(tmp_path, {"http": listener(free_port(), "http", free_port())}, gate={"workers": 1},
                         tables={"admin": {"enabled": True, "port": admin}} | (tables or {}))  # fmt: skip
    log = (tmp_path / "gate.log").open("w")
    return net.popen(net.gate, [sys.executable, "-m", "icpgate", "run", "-c", str(config)], stdout=log, stderr=log)


def watch_in(net: netnskit.Topology, tmp_path: Path, admin: int) -> Path:
    log = tmp_path / "watch.log"
    url = "http://127.0.0.1:%d/readyz" % admin
    argv = [*ICPGATE, "bypass", "watch", *HOSTED, "--ready-url", url, "--interval", "0.2", "--fail-after", "3",
            "--recover-after", "4"]  # fmt: skip
    net.popen(net.gate, argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return log


def switches(log: Path) -> list[str]:
    return [line.split(": bypass ", 1)[1] for line in log.read_text().splitlines() if ": bypass O" in line]


def metrics_in(net: netnskit.Topology, admin: int) -> str:
    return net.run(net.gate, "curl", "-s", "http://127.0.0.1:%d/metrics" % admin).stdout


def test_watch_bypasses_a_gate_while_it_is_down(net: netnskit.Topology, tmp_path: Path) -> None:
    netnskit.start_banner(net, BANNER_PORT)
    admin = free_port()
    log = watch_in(net, tmp_path, admin)
    wait_until(lambda: bypassed(net) == ON)  # no gate yet: down
    assert banner_from(net, netnskit.SERVER4, REACHED) == netnskit.BANNER
    assert switches(log)[0].startswith("ON: /readyz failed 3 times in a row (last: ")

    gate = start_gate_in(net, tmp_path, admin)
    wait_until(lambda: bypassed(net) == OFF, timeout=60)
    assert switches(log)[1].startswith("OFF: /readyz ready 4 times in a row")
    assert "icpgate_ready 1.0" in metrics_in(net, admin)
    assert banner_from(net, netnskit.SERVER4) is None  # steered again, and the gate has no listener for it

    os.kill(gate.pid, signal.SIGKILL)  # `ip netns exec` became the gate: this is the gate itself
    gate.wait(10)
    wait_until(lambda: bypassed(net) == ON)
    assert banner_from(net, netnskit.SERVER6, REACHED) == netnskit.BANNER
    assert [line.split(":")[0] for line in switches(log)] == ["ON", "OFF", "ON"]
    assert "Connection refused" in switches(log)[2]


def test_an_expired_feed_alone_is_left_to_the_stale_mode(net: netnskit.Topology, tmp_path: Path) -> None:
    """/readyz fails for a feed that never answered, but the gate serves and enforces the last good
    registry (feed.stale_mode): the watcher does not trade that for no enforcement at all."""
    admin = free_port()
    log = watch_in(net, tmp_path, admin)
    wait_until(lambda: bypassed(net) == ON)  # no gate yet: down
    feed = {"urls": ["http://127.0.0.1:%d/feed/v1" % free_port()], "allow_unsigned": True}
    start_gate_in(net, tmp_path, admin, tables={"feed": feed})
    wait_until(lambda: bypassed(net) == OFF, timeout=60)
    assert net.run(net.gate, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                   "http://127.0.0.1:%d/readyz" % admin).stdout == "503"  # fmt: skip
    assert "icpgate_ready 0.0" in metrics_in(net, admin)
    assert [line.split(":")[0] for line in switches(log)] == ["ON", "OFF"]


class ReadyzServer(ThreadingHTTPServer):
    """Answers /readyz with a fixed status and body, on loopback."""

    def __init__(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/readyz" % self.server_address[1]


def test_probe_fails_for_a_gate_not_ready_to_serve_but_not_for_the_feed_alone(config_path: Path) -> None:
    config = load_config(config_path)
    starting = readiness(config, [], {})  # what /readyz answers before any worker has loaded its index
    expired = readiness(load_config(config_path, ['feed.urls = ["http://127.0.0.1:1/feed/v1"]',
                                                  "feed.allow_unsigned = true"]), [], {})  # fmt: skip
    for name in ("registry", "listeners"):
        expired[name] = starting[name] | {"ok": True}
    cases = [(503, {"ready": False, "checks": starting}, "HTTP 503 (not ready: listeners, registry)"),
             (503, {"ready": False, "checks": expired}, None), (200, {"ready": True, "checks": {}}, None),
             (503, {"unexpected": "body"}, "HTTP 503"), (500, {}, "HTTP 500")]  # fmt: skip
    for status, body, expected in cases:
        server = ReadyzServer(status, body)
        try:
            assert probe(server.url, 2.0) == expected, body
        finally:
            server.shutdown()
            server.server_close()
    assert "refused" in probe("http://127.0.0.1:%d/readyz" % free_port(), 2.0)


# --- the guide shows the shipped ruleset -------------------------------------------------------------------
def test_the_guide_shows_the_shipped_ruleset_verbatim() -> None:
    guide = (REPO / "docs" / "deployment.md").read_text()
    blocks = [block.split("\n", 1)[1] for block in guide.split("```")[1::2] if block.startswith("nft\n")]
    assert blocks == [(REPO / "systemd" / "icpgate-inline.nft").read_text()]
