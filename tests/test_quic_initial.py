"""The QUIC Initial decryptor: aioquic's real client makes the datagrams, mitmproxy's QUIC
ClientHello reader is the oracle, and hand-built Initials (protected with aioquic's own
`CryptoPair`, not the code under test) cover what no honest client sends."""

from __future__ import annotations

import functools
import itertools
import ssl
from pathlib import Path

import pytest
import trustme
from aioquic.buffer import Buffer, encode_uint_var
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair, derive_key_iv_hp
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from aioquic.tls import CipherSuite, SessionTicket
from gatekit import build_hello, server_name_extension
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.proxy.layers.quic._client_hello_parser import quic_parse_client_hello_from_datagrams

from icpgate.gate.quic.initial import (
    VERSION_1,
    VERSION_2,
    InitialReassembler,
    QuicHello,
    QuicState,
    initial_keys,
    is_initial,
    peek_version,
)

SNI = "www.example-filed.cn"
SERVER = ("127.0.0.1", 443)
VERSIONS = [pytest.param(VERSION_1, id="v1"), pytest.param(VERSION_2, id="v2")]
DCID = bytes.fromhex("8394c8f03e515708")
BIG_ALPN = ["h3", *("alpn-%03d-" % i + "x" * 240 for i in range(6))]  # a ~1.7 KB hello: two datagrams
HUGE_ALPN = ["x" * 200] * 40  # an ~8.5 KB hello: eight datagrams


def client_flight(version: int, server_name: str = SNI, alpn: list[str] | None = None) -> list[bytes]:
    """The datagrams aioquic's client sends first, for one version."""
    configuration = QuicConfiguration(is_client=True, server_name=server_name, alpn_protocols=alpn or ["h3"])
    configuration.supported_versions = [version]
    client = QuicConnection(configuration=configuration)
    client.connect(SERVER, now=0.0)
    return [data for data, _ in client.datagrams_to_send(now=0.0)]


def feed_all(datagrams: list[bytes], reader: InitialReassembler | None = None) -> QuicHello:
    reader = reader or InitialReassembler()
    result = reader.feed(b"") if not datagrams else None
    for datagram in datagrams:
        result = reader.feed(datagram)
    assert result is not None
    return result


def oracle_sni(datagrams: list[bytes]) -> str | None:
    """mitmproxy's reading of the same datagrams (it drives aioquic's server side over them)."""
    hello = quic_parse_client_hello_from_datagrams(datagrams)
    assert hello is not None
    return hello.sni


# Hand-built Initials: protected by aioquic's CryptoPair, so the decryptor is checked against an
# independent implementation of RFC 9001, not against itself.


def protect(
    version: int, payload: bytes, *, dcid: bytes = DCID, packet_number: int = 0, size: int = 1200, kind: int = -1
) -> bytes:
    """One client Initial carrying `payload` frames, padded with PADDING frames up to `size` bytes
    (0: no padding). `kind` overrides the packet type bits."""
    scid = b"\x05" * 8
    initial_bits = 0 if version == VERSION_1 else 1
    type_bits = initial_bits if kind < 0 else kind
    token = b"\x00" if type_bits == initial_bits or type_bits == 3 else b""  # a token length: Initial only
    pn_len = 2

    def header(length: int) -> bytes:
        return (
            bytes([0xC0 | type_bits << 4 | (pn_len - 1)])
            + version.to_bytes(4, "big")
            + bytes([len(dcid)])
            + dcid
            + bytes([len(scid)])
            + scid
            + token
            + (0x4000 | length).to_bytes(2, "big")
            + packet_number.to_bytes(pn_len, "big")
        )

    payload += bytes(max(0, size - len(header(0)) - len(payload) - 16))
    pair = CryptoPair()
    pair.setup_initial(cid=dcid, is_client=True, version=version)
    return pair.encrypt_packet(header(pn_len + len(payload) + 16), payload, packet_number)


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + encode_uint_var(offset) + encode_uint_var(len(data)) + data


def handshake_message(extensions: list[tuple[int, bytes]] | None = None, key_share_size: int = 1216) -> bytes:
    """A Chrome-sized ClientHello (X25519MLKEM768 key share) as QUIC carries it: no TLS record."""
    record = build_hello([server_name_extension(SNI), *(extensions or [])], key_share_size=key_share_size)
    return record[5:]


@functools.cache
def huge_flight(version: int) -> tuple[bytes, ...]:
    return tuple(client_flight(version, alpn=HUGE_ALPN))


@functools.cache
def one_datagram() -> bytes:
    (datagram,) = client_flight(VERSION_1)
    return datagram


def test_initial_keys_match_the_rfc_vectors() -> None:
    """RFC 9001 Appendix A.1 and RFC 9369 Appendix A.1, and aioquic's key schedule for other IDs."""
    assert initial_keys(VERSION_1, DCID) == (
        bytes.fromhex("1f369613dd76d5467730efcbe3b1a22d"),
        bytes.fromhex("fa044b2f42a3fd3b46fb255c"),
        bytes.fromhex("9f50449e04a0e810283a1e9933adedd2"),
    )
    assert initial_keys(VERSION_2, DCID) == (
        bytes.fromhex("8b1a0bc121284290a29e0971b5cd045d"),
        bytes.fromhex("91f73e2351d8fa91660e909f"),
        bytes.fromhex("45b95e15235d6f45a6b19cbcb0294ba9"),
    )
    pair = CryptoPair()
    for version in (VERSION_1, VERSION_2):
        for dcid in (b"\x00" * 8, bytes(range(20)), b"\xff" * 13):
            pair.setup_initial(cid=dcid, is_client=True, version=version)
            assert pair.send.secret is not None
            expected = derive_key_iv_hp(
                cipher_suite=CipherSuite.AES_128_GCM_SHA256, secret=pair.send.secret, version=version
            )
            assert initial_keys(version, dcid) == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_aioquic_client_initial(version: int) -> None:
    datagrams = client_flight(version)
    assert len(datagrams) == 1
    assert is_initial(datagrams[0]) and peek_version(datagrams[0]) == version
    assert feed_all(datagrams) == QuicHello(QuicState.COMPLETE, SNI, version)
    assert oracle_sni(datagrams) == SNI


def test_no_sni_and_ech_flag_come_from_the_tls_parser() -> None:
    """The SNI reading is client_hello's: a hello without server_name, and one with an ECH extension."""
    assert feed_all(client_flight(VERSION_1, server_name="127.0.0.1")).sni is None
    hello = handshake_message(extensions=[(0xFE0D, b"\x00" * 40)])
    assert feed_all([protect(VERSION_1, crypto_frame(0, hello))]) == QuicHello(QuicState.COMPLETE, SNI, VERSION_1, True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("alpn", [pytest.param(BIG_ALPN, id="two-datagrams"), pytest.param(HUGE_ALPN, id="eight")])
def test_hello_across_packets_and_datagrams(version: int, alpn: list[str]) -> None:
    datagrams = client_flight(version, alpn=alpn)
    assert len(datagrams) == (2 if alpn is BIG_ALPN else 8)
    for order in (datagrams, datagrams[::-1]):
        reader = InitialReassembler()
        for datagram in order[:-1]:
            assert reader.feed(datagram).state is QuicState.NEED_MORE
        assert reader.feed(order[-1]) == QuicHello(QuicState.COMPLETE, SNI, version)
        assert oracle_sni(list(order)) == SNI


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=st.permutations(range(8)), version=st.sampled_from([VERSION_1, VERSION_2]))
def test_any_order_of_datagrams_gives_the_same_sni(order: list[int], version: int) -> None:
    flight = huge_flight(version)
    datagrams = [flight[index] for index in order]
    assert feed_all(datagrams) == QuicHello(QuicState.COMPLETE, SNI, version)
    assert oracle_sni(datagrams) == SNI


@settings(max_examples=30, deadline=None)
@given(order=st.permutations(range(8)), duplicates=st.lists(st.integers(0, 7), max_size=4))
def test_duplicated_datagrams_are_consistent_overlaps(order: list[int], duplicates: list[int]) -> None:
    flight = huge_flight(VERSION_1)
    datagrams = [flight[index] for index in [*duplicates, *order]]
    assert feed_all(datagrams).sni == SNI


def _session_ticket(tmp_path: Path) -> SessionTicket:
    """A full handshake between aioquic's client and server, in memory, for a 0-RTT ticket."""
    ca = trustme.CA()
    cert = ca.issue_cert(SNI)
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    server_configuration = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    server_configuration.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    stored: dict[bytes, SessionTicket] = {}
    tickets: list[SessionTicket] = []
    client = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True, server_name=SNI, alpn_protocols=["h3"], verify_mode=ssl.CERT_NONE
        ),
        session_ticket_handler=tickets.append,
    )
    client.connect(SERVER, now=0.0)
    server: QuicConnection | None = None
    for _ in range(10):
        for datagram, _ in client.datagrams_to_send(now=0.0):
            if server is None:
                header = pull_quic_header(Buffer(data=datagram), host_cid_length=8)
                server = QuicConnection(
                    configuration=server_configuration,
                    original_destination_connection_id=header.destination_cid,
                    session_ticket_fetcher=stored.pop,
                    session_ticket_handler=lambda ticket: stored.__setitem__(ticket.ticket, ticket),
                )
            server.receive_datagram(datagram, ("127.0.0.1", 50000), now=0.0)
        assert server is not None
        for datagram, _ in server.datagrams_to_send(now=0.0):
            client.receive_datagram(datagram, SERVER, now=0.0)
        if tickets:
            return tickets[0]
    raise AssertionError("aioquic's server issued no session ticket")


def test_coalesced_initial_and_zero_rtt_with_padding(tmp_path: Path) -> None:
    """aioquic's client resuming with early data: Initial + 0-RTT in one datagram, zeros after them."""
    # aioquic sends early stream data, when asked to, in the same first datagram as its Initial.
    configuration = QuicConfiguration(
        is_client=True, server_name=SNI, alpn_protocols=["h3"], session_ticket=_session_ticket(tmp_path)
    )
    client = QuicConnection(configuration=configuration)
    client.connect(SERVER, now=0.0)
    client.send_stream_data(0, b"GET / HTTP/0.9 early data", end_stream=True)
    flight = [data for data, _ in client.datagrams_to_send(now=0.0)]
    kinds, position = [], 0
    while position < len(flight[0]) and flight[0][position]:
        header = pull_quic_header(Buffer(data=flight[0][position:]), host_cid_length=8)
        kinds.append(header.packet_type)
        position += header.packet_length
    assert kinds == [QuicPacketType.INITIAL, QuicPacketType.ZERO_RTT]
    assert position < len(flight[0]) and not any(flight[0][position:])  # padding after the last packet
    assert feed_all(flight) == QuicHello(QuicState.COMPLETE, SNI, VERSION_1)
    assert oracle_sni(flight) == SNI


@pytest.mark.parametrize("version", VERSIONS)
def test_hand_built_coalesced_packets(version: int) -> None:
    """Initial + 0-RTT (v2 numbers packet types differently) + zero padding, and nonzero trailing bytes."""
    hello = handshake_message()
    initial = protect(version, crypto_frame(0, hello), size=0)
    zero_rtt = protect(version, b"\x01" * 40, size=0, kind=1 if version == VERSION_1 else 2)
    datagram = initial + zero_rtt
    padded = datagram + bytes(100)
    assert feed_all([padded]) == QuicHello(QuicState.COMPLETE, SNI, version)
    assert feed_all([zero_rtt + initial + bytes(100)]).sni == SNI
    garbage = feed_all([padded[:-1] + b"\x01"])
    assert garbage.state is QuicState.ERROR and "after the padding" in garbage.error


@pytest.mark.parametrize("version", VERSIONS)
def test_truncated_datagrams_are_errors(version: int) -> None:
    datagram = client_flight(version)[0]
    packet_end = pull_quic_header(Buffer(data=datagram), host_cid_length=8).packet_length
    for end in (1, 4, 5, 6, 10, 20, 30, 40, 100, packet_end - 1, packet_end, 1199):
        result = feed_all([datagram[:end]])
        assert result.state is QuicState.ERROR, (end, result)
    assert "runs past the datagram" in feed_all([datagram[: packet_end - 1]]).error
    assert "under 1200" in feed_all([datagram[:packet_end]]).error  # aioquic pads after the packet


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=1400))
def test_garbage_never_raises_nor_completes(data: bytes) -> None:
    result = feed_all([data])
    assert result.state in (QuicState.ERROR, QuicState.UNKNOWN_VERSION)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 1199), flip=st.integers(1, 255))
def test_any_flipped_byte_is_an_error(position: int, flip: int) -> None:
    """Every byte of a datagram is accounted for: the header is authenticated or changes the keys
    (DCID), the rest is ciphertext, tag or zero padding. A changed byte never yields an SNI."""
    datagram = bytearray(one_datagram())
    assert feed_all([bytes(datagram)]).sni == SNI
    datagram[position] ^= flip
    result = feed_all([bytes(datagram)])
    assert result.state is not QuicState.COMPLETE
    if position > 0:  # a flipped type bit may turn the Initial into a 0-RTT packet, skipped unread
        assert result.state in (QuicState.ERROR, QuicState.UNKNOWN_VERSION), result


def test_wrong_keys_and_tampered_tag() -> None:
    datagram = client_flight(VERSION_1)[0]
    tag_end = pull_quic_header(Buffer(data=datagram), host_cid_length=8).packet_length
    tampered = datagram[: tag_end - 1] + bytes([datagram[tag_end - 1] ^ 1]) + datagram[tag_end:]
    assert "fails authentication" in feed_all([tampered]).error
    other_dcid = datagram[:6] + bytes([datagram[6] ^ 0xFF]) + datagram[7:]
    assert "fails authentication" in feed_all([other_dcid]).error
    as_v2 = datagram[:1] + VERSION_2.to_bytes(4, "big") + datagram[5:]
    assert feed_all([as_v2]).state is QuicState.ERROR


def test_unknown_version() -> None:
    datagram = client_flight(VERSION_1)[0]
    draft29 = datagram[:1] + (0xFF00001D).to_bytes(4, "big") + datagram[5:]
    assert peek_version(draft29) == 0xFF00001D and not is_initial(draft29)
    assert feed_all([draft29]) == QuicHello(QuicState.UNKNOWN_VERSION, version=0xFF00001D)
    assert feed_all([draft29, datagram]).state is QuicState.UNKNOWN_VERSION  # final
    assert "Version Negotiation" in feed_all([datagram[:1] + bytes(4) + datagram[5:]]).error
    assert peek_version(b"\x40" + datagram[1:]) is None and not is_initial(b"\x40" + datagram[1:])


def test_flows_do_not_mix() -> None:
    """Every packet after the first must carry the flow's version and Destination Connection ID."""
    v1 = client_flight(VERSION_1, alpn=BIG_ALPN)
    v2 = client_flight(VERSION_2, alpn=BIG_ALPN)
    assert "version" in feed_all([v1[0], v2[1]]).error
    other = client_flight(VERSION_1, alpn=BIG_ALPN)
    assert "Destination Connection ID" in feed_all([v1[0], other[1]]).error


@pytest.mark.parametrize("version", VERSIONS)
def test_overlapping_crypto_must_agree(version: int) -> None:
    hello = handshake_message()
    assert len(hello) > 1300
    first = protect(version, crypto_frame(0, hello[:1000]), packet_number=0, size=1200)
    second = protect(version, crypto_frame(600, hello[600:]), packet_number=1, size=1200)
    for order in ([first, second], [second, first]):
        assert feed_all(order) == QuicHello(QuicState.COMPLETE, SNI, version)
    changed = bytearray(hello)
    changed[800] ^= 0x55
    lying = protect(version, crypto_frame(600, bytes(changed[600:])), packet_number=1, size=1200)
    for order in ([first, lying], [lying, first]):
        result = feed_all(order)
        assert result.state is QuicState.ERROR and "differs" in result.error, result


def test_chrome_style_chaos_protection() -> None:
    """Chrome cuts its hello into out-of-order CRYPTO frames among PING and PADDING frames."""
    hello = handshake_message()
    cuts = [0, 90, 300, 301, 700, 1000, 1100, len(hello)]
    pieces = [crypto_frame(start, hello[start:end]) for start, end in itertools.pairwise(cuts)]
    first = b"\x01" + pieces[5] + b"\x00" * 7 + pieces[1] + b"\x01\x01" + pieces[3]
    second = pieces[6] + b"\x00" * 30 + pieces[0] + pieces[4] + b"\x01" + pieces[2]
    datagrams = [protect(VERSION_1, first, packet_number=0), protect(VERSION_1, second, packet_number=1)]
    for order in (datagrams, datagrams[::-1]):
        assert feed_all(order) == QuicHello(QuicState.COMPLETE, SNI, VERSION_1)


def test_tiny_disjoint_crypto_frames_are_capped() -> None:
    """Many one-byte pieces with holes between them: refused once 64 are held, not stored in a long list."""
    hello = handshake_message()
    frames = b"".join(crypto_frame(offset, hello[offset : offset + 1]) for offset in range(1, 400, 2))
    result = feed_all([protect(VERSION_1, frames)])
    assert result.state is QuicState.ERROR and "64 disjoint pieces" in result.error


def test_datagrams_without_packets() -> None:
    for empty in (b"", bytes(1200)):
        assert "datagram" in feed_all([empty]).error
    half = client_flight(VERSION_1, alpn=BIG_ALPN)[0]
    for empty in (b"", bytes(1200)):
        result = feed_all([half, empty])
        assert result.state is QuicState.ERROR and "datagram" in result.error, result


def test_crypto_frames_in_one_packet_any_order() -> None:
    hello = handshake_message(key_share_size=32)  # small: aioquic's AEAD seals at most 1500 bytes
    frames = crypto_frame(90, hello[90:]) + crypto_frame(0, hello[:50]) + crypto_frame(40, hello[40:95])
    assert feed_all([protect(VERSION_1, frames)]).sni == SNI


def test_caps() -> None:
    hello = handshake_message()
    beyond = feed_all([protect(VERSION_1, crypto_frame(16380, b"x" * 10))])
    assert "beyond 16384" in beyond.error
    small = feed_all([protect(VERSION_1, crypto_frame(0, hello), size=1200)], InitialReassembler(max_crypto=1024))
    assert small.state is QuicState.ERROR
    half = protect(VERSION_1, crypto_frame(0, hello[:900]))
    reader = InitialReassembler(max_datagrams=5)
    assert [reader.feed(half).state for _ in range(6)][-2:] == [QuicState.NEED_MORE, QuicState.ERROR]
    assert "5 datagrams" in reader.result.error
    after = feed_all([protect(VERSION_1, crypto_frame(0, hello) + crypto_frame(len(hello), b"\x02\x00"))])
    assert "beyond the ClientHello" in after.error
    too_many = protect(VERSION_1, b"\x01\x01\x01", size=0) * 20
    assert "packets" in feed_all([too_many], InitialReassembler(max_packets=10)).error


def test_frames_an_initial_may_carry() -> None:
    hello = handshake_message()
    ack = b"\x02\x05\x00\x01\x01\x00\x02"  # largest 5, delay 0, 1 range: first 1, gap 0, length 2
    ack_ecn = b"\x03\x00\x00\x00\x00\x01\x02\x03"
    close = b"\x1c\x0a\x06\x03bye"
    frames = b"\x01" + ack + crypto_frame(0, hello) + ack_ecn + close
    assert feed_all([protect(VERSION_1, frames)]).sni == SNI
    for frame, name in ((b"\x08\x00\x01x", "0x08"), (b"\x07\x01x", "0x07"), (b"\x1d\x00\x00", "0x1d")):
        result = feed_all([protect(VERSION_1, crypto_frame(0, hello) + frame)])
        assert result.state is QuicState.ERROR and name in result.error
    truncated_ack = feed_all([protect(VERSION_1, b"\x02\x05\x00\x40", size=0) + bytes(1200)])
    assert truncated_ack.state is QuicState.ERROR
    lying_ack = feed_all([protect(VERSION_1, b"\x02\x05\x00\x3f\x00" + b"\x00" * 10, size=0) + bytes(1200)])
    assert lying_ack.state is QuicState.ERROR


def test_what_no_first_flight_holds() -> None:
    hello = handshake_message()
    not_hello = feed_all([protect(VERSION_1, crypto_frame(0, b"\x02" + hello[1:]))])
    assert "not a ClientHello" in not_hello.error
    small = feed_all([protect(VERSION_1, crypto_frame(0, hello[:100]), size=0)])
    assert "under 1200" in small.error
    short_dcid = feed_all([protect(VERSION_1, crypto_frame(0, hello), dcid=b"\x01\x02\x03\x04")])
    assert "under 8" in short_dcid.error
    retry = feed_all([protect(VERSION_1, crypto_frame(0, hello), kind=3)])
    assert "Retry" in retry.error
    short_header = feed_all([b"\x40" + bytes(1199)])
    assert short_header.state is QuicState.ERROR
    bad_tls = feed_all([protect(VERSION_1, crypto_frame(0, b"\x01\x00\x00\x04\x03\x03\x00\x00"))])
    assert bad_tls.state is QuicState.ERROR and bad_tls.error.startswith("ClientHello:")
