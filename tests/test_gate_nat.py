"""The default upstream mode behind real NAT: iptables REDIRECT in network namespaces this test makes.

Two namespaces joined by a veth pair: a client, and a gate host whose PREROUTING redirects
hosted addresses (203.0.113.10/11, 2001:db8::10 on its loopback) to the gate's port. The gate must
read the original destination with SO_ORIGINAL_DST (IPv4 and IPv6), decide on it, and connect there.
Every address lives inside the namespaces, which the fixture removes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gatekit import gate_config

from conftest import REPO, copy_policies

HOSTED_V4 = ("203.0.113.10", "203.0.113.11")
HOSTED_V6 = "2001:db8::10"
GATE_PORT = 8080


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


class Namespaces:
    def __init__(self) -> None:
        tag = "%d" % (os.getpid() % 100000)
        self.client, self.host = "icpg-c%s" % tag, "icpg-g%s" % tag
        self.veth_client, self.veth_host = "icpc%s" % tag, "icpg%s" % tag

    def run(self, namespace: str, *command: str) -> None:
        sh("ip", "netns", "exec", namespace, *command)

    def up(self) -> None:
        sh("ip", "netns", "add", self.client)
        sh("ip", "netns", "add", self.host)
        sh("ip", "link", "add", self.veth_client, "type", "veth", "peer", "name", self.veth_host)
        sh("ip", "link", "set", self.veth_client, "netns", self.client)
        sh("ip", "link", "set", self.veth_host, "netns", self.host)
        for namespace, device, v4, v6 in ((self.client, self.veth_client, "10.77.0.1", "fd77::1"),
                                          (self.host, self.veth_host, "10.77.0.2", "fd77::2")):  # fmt: skip
            self.run(namespace, "ip", "link", "set", "lo", "up")
            self.run(namespace, "ip", "addr", "add", v4 + "/24", "dev", device)
            self.run(namespace, "ip", "-6", "addr", "add", v6 + "/64", "dev", device, "nodad")
            self.run(namespace, "ip", "link", "set", device, "up")
        self.run(self.client, "ip", "route", "add", "203.0.113.0/24", "via", "10.77.0.2")
        self.run(self.client, "ip", "-6", "route", "add", "2001:db8::/32", "via", "fd77::2")
        for address in HOSTED_V4:
            self.run(self.host, "ip", "addr", "add", address + "/32", "dev", "lo")
            self.run(self.host, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", self.veth_host, "-p", "tcp",
                     "-d", address, "--dport", "80", "-j", "REDIRECT", "--to-ports", str(GATE_PORT))  # fmt: skip
        self.run(self.host, "ip", "-6", "addr", "add", HOSTED_V6 + "/128", "dev", "lo", "nodad")
        self.run(self.host, "ip6tables", "-t", "nat", "-A", "PREROUTING", "-i", self.veth_host, "-p", "tcp",
                 "-d", HOSTED_V6, "--dport", "80", "-j", "REDIRECT", "--to-ports", str(GATE_PORT))  # fmt: skip

    def down(self) -> None:
        for namespace in (self.client, self.host):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture(scope="module")
def nat(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("nat")
    spaces = Namespaces()
    spaces.down()
    spaces.up()
    processes = []
    try:
        origin = subprocess.Popen(
            ["ip", "netns", "exec", spaces.host, sys.executable, str(REPO / "tests" / "origin.py"), "--http", "80",
             "--bind", ",".join([*HOSTED_V4, HOSTED_V6])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        processes.append(origin)
        assert "ready" in origin.stdout.readline()
        policies = copy_policies(tmp)
        pack = policies / "default.toml"
        pack.write_text(pack.read_text().replace("exempt_ranges = []", 'exempt_ranges = ["%s/32"]' % HOSTED_V4[1]))
        listeners = {"v4": {"address": "0.0.0.0", "port": GATE_PORT, "kind": "http"},
                     "v6": {"address": "::", "port": GATE_PORT, "kind": "http"}}  # fmt: skip
        config = gate_config(tmp, listeners, pack=pack)
        log = (tmp / "gate.log").open("w")
        gate = subprocess.Popen(["ip", "netns", "exec", spaces.host, sys.executable, "-m", "icpgate", "run", "-c",
                                 str(config)], stdout=log, stderr=log)  # fmt: skip
        processes.append(gate)
        spaces.run(spaces.client, "curl", "-s", "--retry", "40", "--retry-connrefused", "--retry-delay", "0",
                   "-o", "/dev/null", "http://%s/" % HOSTED_V4[0])  # fmt: skip
        yield spaces, tmp / "gate.log"
    finally:
        for process in processes:
            process.terminate()
            process.wait(20)
        spaces.down()


def curl_from_client(spaces: Namespaces, url: str, host: str) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", spaces.client, "curl", "-s", "-g", "--max-time", "10", "-H", "Host: " + host,
         "-w", " %{http_code}", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return result.stdout


def test_redirected_ipv4_goes_to_the_original_destination(nat) -> None:
    spaces, _ = nat
    answer = curl_from_client(spaces, "http://%s/path" % HOSTED_V4[0], "example-filed.cn")
    assert answer.endswith(" 200") and '"host": "example-filed.cn"' in answer
    assert "reason=unfiled" not in answer
    assert curl_from_client(spaces, "http://%s/" % HOSTED_V4[0], "example-unfiled.cn").endswith(" 403")


def test_redirected_ipv6_goes_to_the_original_destination(nat) -> None:
    spaces, _ = nat
    answer = curl_from_client(spaces, "http://[%s]/" % HOSTED_V6, "example-filed.cn")
    assert answer.endswith(" 200") and '"host": "example-filed.cn"' in answer
    assert curl_from_client(spaces, "http://[%s]/" % HOSTED_V6, "example-unfiled.cn").endswith(" 403")


def test_the_policy_sees_the_original_destination(nat) -> None:
    spaces, log = nat
    # 203.0.113.11 is exempt in this pack: an unfiled site there is relayed, at .10 it is blocked.
    exempt = curl_from_client(spaces, "http://%s/" % HOSTED_V4[1], "example-unfiled.cn")
    assert exempt.endswith(" 200") and '"host": "example-unfiled.cn"' in exempt
    assert curl_from_client(spaces, "http://%s/" % HOSTED_V4[0], "example-unfiled.cn").endswith(" 403")
    assert "Traceback" not in Path(log).read_text()
