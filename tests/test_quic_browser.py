"""HTTP/3 as a browser does it: headless Chromium on QUIC, an aioquic origin, the real gate.

A filed site is forced onto QUIC (`--origin-to-force-quic-on`): Chromium then never tries TCP, so a
page in the DOM came over HTTP/3, and the origin confirms it served h3. An unfiled site is reached
the way a returning visitor reaches it: the profile already holds the site's `Alt-Svc: h3` from an
earlier visit, so Chromium races QUIC and TCP; the gate drops the QUIC flow and the TCP side gets the
block page. (Forcing QUIC on the unfiled site would show no block page at all: a forced origin has no
TCP fallback, Chromium just fails with ERR_QUIC_PROTOCOL_ERROR.)

Chromium trusts the test certificate for QUIC and TCP alike through
`--ignore-certificate-errors-spki-list` (the SHA-256 of its public key), which it honours only with
a `--user-data-dir`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from adminkit import TOKEN, admin_request, metric, parse_metrics
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from gatekit import Gate, free_port, gate_config, listener, start_gate
from h3kit import H3Origin, free_udp_port, h3_origin
from test_gate_process import edit_pack, wait_until
from test_quic_gate import wait_listening

from conftest import copy_policies

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FILED = "www.example-filed.cn"
UNFILED = "www.example-unfiled.cn"
WINDOWS_EPOCH = 11_644_473_600  # seconds from 1601-01-01 (Chromium's base::Time) to 1970-01-01


def spki_hash(cert_pem: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what --ignore-certificate-errors-spki-list takes."""
    certificate = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    der = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def remember_alt_svc(profile: Path, host: str, port: int) -> None:
    """Write the profile's HTTP server properties as Chromium leaves them after a response with
    `Alt-Svc: h3=":port"` from https://host:port (valid for a day)."""
    expires = int((time.time() + WINDOWS_EPOCH + 86_400) * 1_000_000)
    server = {
        "server": "https://%s:%d" % (host, port),
        "anonymization": [],
        "supports_spdy": False,
        "alternative_service": [
            {"protocol_str": "quic", "port": port, "expiration": str(expires), "advertised_alpns": ["h3"]}
        ],
    }
    state = {"net": {"http_server_properties": {"servers": [server], "version": 5}}}
    (profile / "Default").mkdir(parents=True, exist_ok=True)
    (profile / "Default" / "Network Persistent State").write_text(json.dumps(state))


def chromium_dom(profile: Path, cert: Path, host: str, port: int, *flags: str) -> str:
    """The DOM of https://host:port/page after Chromium loaded it; the error if it could not."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--enable-quic",
         # One partition for the whole profile, so the remembered Alt-Svc applies to a top-level load.
         "--disable-features=PartitionConnectionsByNetworkIsolationKey",
         "--user-data-dir=%s" % profile, "--host-resolver-rules=MAP %s 127.0.0.1" % host,
         "--ignore-certificate-errors-spki-list=%s" % spki_hash(cert), *flags,
         "--dump-dom", "https://%s:%d/page" % (host, port)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    failure = [line for line in result.stderr.splitlines() if "Page load failed" in line]
    return result.stdout or "\n".join(failure) or result.stderr[-2000:]


class UdpBlackHole:
    """A UDP socket that reads and drops every datagram, counting them: QUIC with no answer (and no
    ICMP port unreachable, which would tell Chromium at once)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.datagrams = 0
        self._running = True
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while self._running:
            try:
                self.sock.recv(65536)
                self.datagrams += 1
            except TimeoutError:
                continue

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def origin_h3(certs) -> Iterator[H3Origin]:
    with h3_origin(certs["server"], certs["key"]) as running:
        yield running


def page_gate(tmp_path: Path, certs, listeners: dict[str, dict], ports: dict[str, int]) -> Gate:
    """A gate whose pack answers blocked TLS with the block page, under the test certificate; its
    admin API (metrics) on ports["admin"]."""
    policies = copy_policies(tmp_path)
    edit_pack(policies, 'tls_action = "reset"', 'tls_action = "page"')
    keys = {"tls_certificate": str(certs["cert"]), "tls_key": str(certs["key"])}
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n")
    tables = {"admin": {"enabled": True, "port": ports["admin"], "token_file": str(token)}}
    config = gate_config(tmp_path, listeners, gate=keys, pack=policies / "default.toml", tables=tables)
    gate = start_gate(config, ports)
    if any(table["kind"] == "quic" for table in listeners.values()):
        wait_listening(gate)
    return gate


def metrics(gate: Gate) -> dict[tuple[str, tuple], float]:
    status, _, body = admin_request(gate.ports["admin"], "/metrics")
    assert status == 200
    return parse_metrics(body.decode())


def assert_block_page(dom: str, host: str) -> None:
    assert 'id="domain">%s<' % host in dom, dom
    assert 'id="reason">unfiled<' in dom
    assert "网站未备案" in dom


# --- the harness, against the origin alone -----------------------------------------------------------
def test_chromium_forced_onto_quic_loads_from_the_h3_origin(tmp_path: Path, certs, origin_h3: H3Origin) -> None:
    """Nothing listens on TCP at that port: the page can only have come over QUIC."""
    dom = chromium_dom(tmp_path / "profile", certs["cert"], FILED, origin_h3.port,
                       "--origin-to-force-quic-on=%s:%d" % (FILED, origin_h3.port))  # fmt: skip
    assert '<p id="authority">%s:%d</p>' % (FILED, origin_h3.port) in dom, dom
    assert '<p id="protocol">h3</p>' in dom
    served = [(r.authority, r.path, r.alpn) for r in origin_h3.requests]
    assert ("%s:%d" % (FILED, origin_h3.port), "/page", "h3") in served, served


def test_chromium_forced_onto_quic_has_no_tcp_fallback(tmp_path: Path, certs) -> None:
    """Why the unfiled tests use a remembered Alt-Svc instead of forcing QUIC."""
    port = free_udp_port()
    hole = UdpBlackHole(port)
    try:
        dom = chromium_dom(tmp_path / "profile", certs["cert"], UNFILED, port,
                           "--origin-to-force-quic-on=%s:%d" % (UNFILED, port))  # fmt: skip
    finally:
        hole.close()
    assert "ERR_QUIC_PROTOCOL_ERROR" in dom or "ERR_CONNECTION" in dom or "ERR_TIMED_OUT" in dom, dom
    assert hole.datagrams > 0


def test_a_remembered_alt_svc_with_no_quic_answer_falls_back_to_the_gates_tcp_page(
    tmp_path: Path, certs, origin
) -> None:
    """The fallback half of the harness, before any QUIC gate: UDP swallowed, the gate's TLS
    listener (block page) on the same port number."""
    port = free_udp_port(tcp_too=True)
    gate = page_gate(tmp_path, certs, {"tls": listener(port, "tls", origin.tls)}, {"tls": port, "admin": free_port()})
    hole = UdpBlackHole(port)
    try:
        remember_alt_svc(tmp_path / "profile", UNFILED, port)
        dom = chromium_dom(tmp_path / "profile", certs["cert"], UNFILED, port)
    finally:
        hole.close()
        assert gate.stop() == 0
    assert_block_page(dom, UNFILED)
    assert hole.datagrams > 0, "Chromium never tried QUIC: the remembered Alt-Svc was not used"


# --- through the gate ---------------------------------------------------------------------------------
@pytest.fixture
def quic_gate(tmp_path: Path, certs, origin, origin_h3: H3Origin):
    """A gate with a QUIC listener in front of the h3 origin and a TLS listener (block page) on the
    same port number, as a site serves h3 and its TCP fallback on 443."""
    port = free_udp_port(tcp_too=True)
    listeners = {"quic": listener(port, "quic", origin_h3.port), "tls": listener(port, "tls", origin.tls)}
    gate = page_gate(tmp_path, certs, listeners, {"tls": port, "admin": free_port()})
    yield gate, port
    assert gate.stop() == 0
    assert "Traceback" not in gate.log(), gate.log()


def test_a_filed_page_loads_over_h3_through_the_gate(tmp_path: Path, certs, origin_h3: H3Origin, quic_gate) -> None:
    gate, port = quic_gate
    dom = chromium_dom(
        tmp_path / "profile", certs["cert"], FILED, port, "--origin-to-force-quic-on=%s:%d" % (FILED, port)
    )
    assert '<p id="authority">%s:%d</p>' % (FILED, port) in dom, dom + gate.log()
    assert '<p id="protocol">h3</p>' in dom
    assert ("%s:%d" % (FILED, port), "/page", "h3") in [(r.authority, r.path, r.alpn) for r in origin_h3.requests]
    wait_until(lambda: metric(metrics(gate), "icpgate_decisions_total", kind="quic", action="allow") >= 1)
    assert metric(metrics(gate), "icpgate_decisions_total", kind="quic", action="block") == 0


def test_an_unfiled_page_gets_no_quic_answer_and_the_block_page_over_tcp(
    tmp_path: Path, certs, origin_h3: H3Origin, quic_gate
) -> None:
    gate, port = quic_gate
    remember_alt_svc(tmp_path / "profile", UNFILED, port)
    dom = chromium_dom(tmp_path / "profile", certs["cert"], UNFILED, port)
    assert_block_page(dom, UNFILED)
    assert origin_h3.datagrams == 0, "a blocked QUIC flow reached the origin"
    # Chromium did try QUIC, and the gate decided that flow on its SNI and dropped it.
    wait_until(lambda: metric(metrics(gate), "icpgate_decisions_total", kind="quic", action="block") >= 1)
    counts = metrics(gate)
    assert metric(counts, "icpgate_decisions_total", kind="quic", action="block", reason="unfiled") >= 1
    assert metric(counts, "icpgate_decisions_total", kind="quic", action="allow") == 0
    assert metric(counts, "icpgate_quic_dropped_datagrams_total", reason="blocked") >= 1
    assert metric(counts, "icpgate_quic_datagrams_total", direction="to_upstream") == 0
