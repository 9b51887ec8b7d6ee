"""QUIC ClientHellos decided per CPU second on one core, from a Chrome-sized first flight.

    python bench/quic_initial_bench.py [--seconds 2]

The flight is made by aioquic's real client, its ClientHello grown with ALPN entries to the size of
Chrome's (~1.9 KB with an X25519MLKEM768 key share), so it spans two Initial packets in two
datagrams, as Chrome's does. Each round feeds both datagrams to a fresh `InitialReassembler`: key
derivation, header protection, decryption, CRYPTO reassembly and the SNI read, all per flow.

For the choice of crypto library it also times the crypto alone (keys, header protection and AEAD
for the same two packets) with `cryptography`, with aioquic's `CryptoPair`, and with aioquic's C
classes, which the gate uses (with `cryptography` only for packets over 1500 bytes); and mitmproxy's
`quic_parse_client_hello_from_datagrams` (a full aioquic server handshake) for scale.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import AEAD, CryptoPair, HeaderProtection
from aioquic.quic.packet import pull_quic_header
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from mitmproxy.proxy.layers.quic._client_hello_parser import quic_parse_client_hello_from_datagrams

from icpgate.gate.quic.initial import VERSION_1, InitialReassembler, QuicState, initial_keys

SNI = "www.example-filed.cn"


def chrome_sized_flight() -> tuple[list[bytes], int]:
    """aioquic's first flight with a hello padded by ALPN entries to about Chrome's size."""
    padding = 1900 - 480  # aioquic's own hello with one ALPN entry is ~480 bytes
    alpn = ["h3", *("x%02d" % i + "y" * 197 for i in range(padding // 201)), "z" * (padding % 201)]
    configuration = QuicConfiguration(is_client=True, server_name=SNI, alpn_protocols=alpn)
    client = QuicConnection(configuration=configuration)
    client.connect(("127.0.0.1", 443), now=0.0)
    flight = [data for data, _ in client.datagrams_to_send(now=0.0)]
    crypto_bytes = 0
    for datagram in flight:
        header = pull_quic_header(Buffer(data=datagram), host_cid_length=8)
        crypto_bytes += header.packet_length
    return flight, crypto_bytes


def packets(flight: list[bytes]) -> list[tuple[bytes, int]]:
    """Each datagram's Initial packet and the offset of its packet number."""
    found = []
    for datagram in flight:
        buffer = Buffer(data=datagram)
        header = pull_quic_header(buffer, host_cid_length=8)
        found.append((datagram[: header.packet_length], buffer.tell()))
    return found


def decide(flight: list[bytes]) -> None:
    reader = InitialReassembler()
    for datagram in flight:
        result = reader.feed(datagram)
    assert result.state is QuicState.COMPLETE and result.sni == SNI, result


def crypto_cryptography(dcid: bytes, protected: list[tuple[bytes, int]]) -> None:
    key, iv, hp = initial_keys(VERSION_1, dcid)
    aead = AESGCM(key)
    mask_of = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    for packet, pn_offset in protected:
        mask = mask_of.update(packet[pn_offset + 4 : pn_offset + 20])
        header = bytearray(packet[: pn_offset + 2])
        header[0] ^= mask[0] & 0x0F
        header[pn_offset] ^= mask[1]
        header[pn_offset + 1] ^= mask[2]
        number = (header[pn_offset] << 8) | header[pn_offset + 1]
        nonce = (int.from_bytes(iv, "big") ^ number).to_bytes(12, "big")
        aead.decrypt(nonce, packet[pn_offset + 2 :], bytes(header))


def crypto_aioquic(dcid: bytes, protected: list[tuple[bytes, int]]) -> None:
    pair = CryptoPair()
    pair.setup_initial(cid=dcid, is_client=False, version=VERSION_1)
    for packet, pn_offset in protected:
        pair.decrypt_packet(packet, pn_offset, 0)


def crypto_aioquic_primitives(dcid: bytes, protected: list[tuple[bytes, int]]) -> None:
    """aioquic's C AEAD and header protection with the gate's key schedule: the fastest mix, but
    those classes refuse packets over 1500 bytes (PACKET_LENGTH_MAX in aioquic's _crypto.c)."""
    key, iv, hp = initial_keys(VERSION_1, dcid)
    aead = AEAD(b"aes-128-gcm", key, iv)
    protection = HeaderProtection(b"aes-128-ecb", hp)
    for packet, pn_offset in protected:
        header, number = protection.remove(packet, pn_offset)
        aead.decrypt(packet[len(header) :], header, number)


def rate(work: Callable[[], None], seconds: float) -> float:
    """Calls per CPU second of `work` (this process's CPU time: one core, whatever else runs on the
    machine), over about `seconds` of it after a warm-up."""
    for _ in range(50):
        work()
    calls = 0
    started = time.process_time()
    while True:
        for _ in range(100):
            work()
        calls += 100
        used = time.process_time() - started
        if used >= seconds:
            return calls / used


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    flight, packet_bytes = chrome_sized_flight()
    protected = packets(flight)
    assert len(protected) == 2, "the hello should span two datagrams"
    dcid = pull_quic_header(Buffer(data=flight[0]), host_cid_length=8).destination_cid
    print("flight: %d datagrams, %d bytes of Initial packets, hello ~%d bytes" % (len(flight), packet_bytes, 1900))
    figures = [
        ("InitialReassembler (decided)", rate(lambda: decide(flight), args.seconds)),
        ("crypto only, cryptography", rate(lambda: crypto_cryptography(dcid, protected), args.seconds)),
        ("crypto only, aioquic CryptoPair", rate(lambda: crypto_aioquic(dcid, protected), args.seconds)),
        ("crypto only, aioquic C classes", rate(lambda: crypto_aioquic_primitives(dcid, protected), args.seconds)),
        ("mitmproxy quic_parse_client_hello", rate(lambda: quic_parse_client_hello_from_datagrams(flight), 1.0)),
    ]
    for name, per_second in figures:
        print("%-36s %9.0f /s  %7.1f µs each" % (name, per_second, 1e6 / per_second))


if __name__ == "__main__":
    main()
