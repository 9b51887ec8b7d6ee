"""One ClientHello spliced from two QUIC flows, against aioquic's real server behind the gate.

A QUIC server finds a connection by its Destination Connection ID, whatever address a datagram
comes from, and decodes a packet number against the largest it has received (RFC 9000 §17.1,
Appendix A.3). An attacker who makes the server drop one packet of a relayed hello (a packet
number the server decodes differently from the gate, so its tag fails there; or an Initial over
the 1,500 bytes aioquic's AEAD takes) and then, from another port under the same connection ID,
sends a second filed-looking hello whose bytes at the dropped range complete the first for an
unfiled name, gets that name handshaked. Here aioquic's client makes the hello for the unfiled
name, the attacker's packets are sealed by hand (with `cryptography`, as aioquic cannot seal over
1,500 bytes), and aioquic's client state machine finishes the handshake and sends the request, so
success means the origin served the unfiled name.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from pathlib import Path

import pytest
from aioquic.buffer import Buffer, encode_uint_var
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair, derive_key_iv_hp
from aioquic.quic.events import HandshakeCompleted
from aioquic.quic.packet import pull_quic_header
from aioquic.tls import CipherSuite
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from gatekit import Gate
from h3kit import H3Origin, h3_origin
from test_quic_gate import drops, short_header, start_quic_gate, stop

from icpgate.gate.quic.initial import VERSION_1

FILED = "www.example-filed.cn"
UNFILED = "www.example-fraud.cn"  # as long as FILED: the two hellos differ only in the name's bytes
assert len(FILED) == len(UNFILED)


def seal(payload: bytes, *, dcid: bytes, scid: bytes, number: int, pn_len: int = 2, size: int = 1200) -> bytes:
    """A client's v1 Initial carrying `payload` frames, padded to `size` bytes, sealed with
    `cryptography`'s AES-GCM and AES-ECB (any length, unlike aioquic's AEAD) under the keys of
    `dcid`. `number` is the full packet number (the nonce); its low `pn_len` bytes go on the wire."""
    pair = CryptoPair()
    pair.setup_initial(cid=dcid, is_client=True, version=VERSION_1)
    key, iv, hp = derive_key_iv_hp(cipher_suite=CipherSuite.AES_128_GCM_SHA256, secret=pair.send.secret,
                                   version=VERSION_1)  # fmt: skip
    start = bytes([0xC0 | (pn_len - 1)]) + VERSION_1.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
    start += bytes([len(scid)]) + scid + b"\x00"  # no token
    payload += bytes(max(0, size - len(start) - 2 - pn_len - len(payload) - 16))  # PADDING frames
    truncated = (number & ((1 << 8 * pn_len) - 1)).to_bytes(pn_len, "big")
    header = start + (0x4000 | pn_len + len(payload) + 16).to_bytes(2, "big") + truncated
    nonce = (int.from_bytes(iv, "big") ^ number).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, payload, header)
    sample = sealed[4 - pn_len : 20 - pn_len]
    mask = Cipher(algorithms.AES(hp), modes.ECB()).encryptor().update(sample)
    protected = bytearray(header)
    protected[0] ^= mask[0] & 0x0F
    for index in range(pn_len):
        protected[len(start) + 2 + index] ^= mask[1 + index]
    return bytes(protected) + sealed


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + encode_uint_var(offset) + encode_uint_var(len(data)) + data


def crypto_of(datagram: bytes, dcid: bytes) -> bytes:
    """The CRYPTO bytes of a one-packet Initial datagram from aioquic's client (from offset 0)."""
    buf = Buffer(data=datagram)
    header = pull_quic_header(buf, host_cid_length=8)
    pair = CryptoPair()
    pair.setup_initial(cid=dcid, is_client=False, version=VERSION_1)
    _, payload, _ = pair.decrypt_packet(datagram[: header.packet_length], buf.tell(), 0)
    frames = Buffer(data=payload)
    data = b""
    while not frames.eof():
        kind = frames.pull_uint_var()
        if kind == 0x06:
            assert frames.pull_uint_var() == len(data)
            data += frames.pull_bytes(frames.pull_uint_var())
        else:
            assert kind == 0x00, kind
    return data


class Client:
    """aioquic's client state machine for `name`, its first flight kept back (and its retransmissions
    of it): the test sends hand-made Initials carrying (most of) its hello instead, then lets it
    finish the handshake over its own sockets and ask the origin for the page."""

    def __init__(self, gate_port: int, name: str = UNFILED) -> None:
        configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=name,
                                          verify_mode=ssl.CERT_NONE)  # fmt: skip
        self.quic = QuicConnection(configuration=configuration)
        self.server = ("127.0.0.1", gate_port)
        self.quic.connect(self.server, now=time.monotonic())
        (first,) = [data for data, _ in self.quic.datagrams_to_send(now=time.monotonic())]
        self.dcid = first[6 : 6 + first[5]]
        self.scid = self.quic.host_cid
        self.hello = crypto_of(first, self.dcid)
        self.sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        for number, sock in enumerate(self.sockets):
            sock.bind(("127.0.%d.%d" % (91, 10 + number), 0))  # two flows: two client addresses

    def seal(self, offset: int, data: bytes, number: int, **options) -> bytes:
        return seal(crypto(offset, data), dcid=self.dcid, scid=self.scid, number=number, **options)

    def send(self, flow: int, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.sockets[flow].sendto(datagram, self.server)
            time.sleep(0.05)  # in order, as a server reading one socket sees them

    def finish(self, authority: str, flow: int = 1, timeout: float = 4.0) -> int | None:
        """Let the client answer the server over a flow's socket: the status of a GET for
        `authority` once the handshake is done, or None if it never completes."""
        http: H3Connection | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            for data, _ in self.quic.datagrams_to_send(now=now):
                if data[0] & 0xF0 != 0xC0 or data[6 : 6 + data[5]] != self.dcid:  # not its own first hello again
                    self.sockets[flow].sendto(data, self.server)
            timer = self.quic.get_timer()
            wait = min(0.05, max(0.0, (timer or now + 1) - now))
            readable, _, _ = select.select(self.sockets, [], [], wait)
            for sock in readable:
                data = sock.recv(65536)
                self.quic.receive_datagram(data, self.server, now=time.monotonic())
            if timer is not None and time.monotonic() >= timer:
                self.quic.handle_timer(now=time.monotonic())
            while (event := self.quic.next_event()) is not None:
                if isinstance(event, HandshakeCompleted):
                    http = H3Connection(self.quic)
                    stream = self.quic.get_next_available_stream_id()
                    http.send_headers(stream, [(b":method", b"GET"), (b":scheme", b"https"),
                                               (b":authority", authority.encode()), (b":path", b"/")],
                                      end_stream=True)  # fmt: skip
                elif http is not None:
                    for answer in http.handle_event(event):
                        if isinstance(answer, HeadersReceived):
                            return int(dict(answer.headers)[b":status"])
        return None

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def spliced(hello: bytes) -> tuple[bytes, bytes, int, int]:
    """The two filed-looking hellos: `first` is the unfiled hello with the filed name in its place;
    `second`'s server_name extension becomes an unknown one that carries the unfiled name at the same
    offset, and a server_name for the filed name goes at the end. Returns them and the name's range."""
    start = hello.index(UNFILED.encode())
    end = start + len(UNFILED)
    first = hello[:start] + FILED.encode() + hello[end:]
    extension = start - 9  # type, length, list length, name type, name length
    assert hello[extension : extension + 2] == b"\x00\x00"
    name = b"\x00" + len(FILED).to_bytes(2, "big") + FILED.encode()
    sni = b"\x00\x00" + (len(name) + 2).to_bytes(2, "big") + (len(name)).to_bytes(2, "big") + name
    second = bytearray(hello[:extension] + b"\x7a\x7a" + hello[extension + 2 :] + sni)
    second[1:4] = (len(second) - 4).to_bytes(3, "big")  # the handshake message grew by the new extension
    body = 4 + 2 + 32  # type and length, version, random
    body += 1 + second[body]  # session id
    body += 2 + int.from_bytes(second[body : body + 2], "big")  # cipher suites
    body += 1 + second[body]  # compression methods
    second[body : body + 2] = (int.from_bytes(second[body : body + 2], "big") + len(sni)).to_bytes(2, "big")
    return first, bytes(second), start, end


def attack(client: Client, lost_by: str) -> None:
    """Flow one relays the filed `first` hello but the server loses the packet with the name's range;
    flow two, under the same connection ID, relays the filed-looking `second` whose bytes at that
    range are the unfiled name: only its packet with that range reaches the server."""
    first, second, start, end = spliced(client.hello)
    size = len(client.hello)
    if lost_by == "packet-number":
        # One-byte packet numbers: the gate took them as full ones; the server decodes 10 after 200
        # as 266 (RFC 9000 A.3), so that packet fails its tag there.
        client.send(0, client.seal(0, first[:start], 200, pn_len=1), client.seal(start, first[start:end], 10, pn_len=1),
                    client.seal(end, first[end:], 201, pn_len=1))  # fmt: skip
        client.send(1, client.seal(0, second[:start], 202, pn_len=1),
                    client.seal(start, second[start:end], 203, pn_len=1),
                    client.seal(end, second[end:], 10, pn_len=1))  # fmt: skip
        return
    # An Initial of 1,600 bytes: the gate opens it with `cryptography`, aioquic's AEAD refuses it.
    client.send(0, client.seal(0, first[:start], 0), client.seal(start, first[start:end], 1, size=1600),
                client.seal(end, first[end:], 2))  # fmt: skip
    if lost_by == "first-flow-gone":
        # the first flow leaves its Initial phase (a 1-RTT packet) and its port opens a new
        # connection: the gate forgets that flow, while the server still waits for the missing range
        other = seal(crypto(0, first), dcid=b"\x42" * 8, scid=client.scid, number=0)
        client.send(0, short_header(client.scid), other)
    client.send(1, client.seal(0, second[:start], 3), client.seal(start, second[start:end], 4),
                client.seal(end, second[end:size], 5), client.seal(size, second[size:], 6, size=1600))  # fmt: skip


@pytest.fixture
def origin(certs: dict[str, Path]):
    with h3_origin(certs["server"], certs["key"]) as running:
        yield running


@pytest.fixture
def gate(tmp_path: Path, origin: H3Origin):
    running = start_quic_gate(tmp_path, origin.port, admin=True)
    yield running
    stop(running)


@pytest.mark.parametrize("lost_by", ["packet-number", "oversized", "first-flow-gone"])
def test_a_hello_spliced_from_two_flows_is_not_served(gate: Gate, origin: H3Origin, lost_by: str) -> None:
    client = Client(gate.ports["quic"])
    try:
        attack(client, lost_by)
        status = client.finish(UNFILED)
    finally:
        client.close()
    assert status is None, "the origin completed a handshake for %s (status %s)" % (UNFILED, status)
    assert origin.authorities() == []
    counted = drops(gate)
    if lost_by == "packet-number":
        # the first flow's packet 10 after 200 is refused (a receiver would not decode it as 10), and
        # the flow with it: nothing of it reached the server
        assert counted["invalid"] >= 2
        assert origin.datagrams == 0
    else:
        # the oversized Initial was not refused for its size: the first flow went to the server
        assert origin.datagrams >= 3
        assert counted["cid_in_use"] >= 4  # the second flow's Initials (and the client's own), under the first's ID


def test_packet_numbers_are_decoded_as_a_receiver_does(gate: Gate, origin: H3Origin) -> None:
    """A client may skip packet numbers (RFC 9000 §12.3) and send the low byte alone: after 254 and
    255, a 0 on the wire is packet 256 to the server (RFC 9000 A.3). The gate must open it with that
    number too, or it drops the flow the server would serve."""
    client = Client(gate.ports["quic"], FILED)
    hello = client.hello
    try:
        client.send(0, client.seal(0, hello[:100], 254, pn_len=1), client.seal(100, hello[100:200], 255, pn_len=1),
                    client.seal(200, hello[200:], 256, pn_len=1))  # fmt: skip
        status = client.finish(FILED, flow=0)
    finally:
        client.close()
    assert status == 200
    assert origin.authorities() == [FILED]
