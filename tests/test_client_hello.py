"""The fast SNI extractor, against mitmproxy's ClientHello parser as the oracle, and its reassembly."""

from __future__ import annotations

import os

import pytest
from gatekit import build_hello, python_hello, server_name_extension
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.proxy.layers.tls import get_client_hello, parse_client_hello

from icpgate.gate.tls.client_hello import MAX_HELLO_RECORDS, Hello, HelloReassembler, HelloState
from icpgate.names.hostname import HostKind, normalize_host

CAP = 16384


def fast_parse(data: bytes, max_size: int) -> Hello:
    """What the gate reads from `data` arriving in one piece."""
    return HelloReassembler(max_size).feed(data)


def fed_in_pieces(data: bytes, cuts: list[int], max_size: int = CAP) -> tuple[Hello, HelloReassembler]:
    """Feed `data` cut at the given offsets: the last answer, and the reassembler."""
    reader = HelloReassembler(max_size)
    result = reader.feed(b"")
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        result = reader.feed(data[start:end])
    return result, reader


def oracle(data: bytes) -> tuple[str, str | None]:
    """mitmproxy's reading: ('complete', sni) or ('error', None)."""
    try:
        raw = get_client_hello(data)
        if raw is None:
            return "need_more", None
        hello = parse_client_hello(data)
    except (ValueError, AssertionError, IndexError, EOFError) as error:
        return "error", str(error)
    if hello is None:
        return "need_more", None
    return "complete", hello.sni


def test_python_hello() -> None:
    hello = python_hello("www.example-filed.cn")
    assert fast_parse(hello, CAP) == (HelloState.COMPLETE, "www.example-filed.cn", "", False)
    assert oracle(hello) == ("complete", "www.example-filed.cn")


def test_every_prefix_of_a_hello_needs_more() -> None:
    hello = build_hello([server_name_extension("example-filed.cn")], key_share_size=1216, record_sizes=[300, 1, 700])
    for end in range(len(hello)):
        assert fast_parse(hello[:end], CAP).state is HelloState.NEED_MORE, end
    assert fast_parse(hello, CAP).sni == "example-filed.cn"


def test_post_quantum_size_hello() -> None:
    hello = build_hello([server_name_extension("example-filed.cn")], key_share_size=1216)
    assert len(hello) > 1300
    assert fast_parse(hello, CAP).sni == oracle(hello)[1] == "example-filed.cn"


@pytest.mark.parametrize(
    ("extensions", "error"),
    [
        ([server_name_extension("a.cn", "b.cn")], "more than one host_name"),
        ([server_name_extension("a.cn"), server_name_extension("b.cn")], "duplicate extension"),
        ([server_name_extension()], "empty server_name"),
        ([server_name_extension("a.cn", name_type=1)], "unknown server name type"),
        ([(0, b"\x00\x05\x00\x00\x09ab")], "truncated"),
        ([server_name_extension("example-filed.cn:443")], "colon"),
        ([server_name_extension("cafe::1")], "colon"),
    ],
)
def test_bad_server_names_are_refused(extensions, error: str) -> None:
    result = fast_parse(build_hello(extensions), CAP)
    assert result.state is HelloState.ERROR and error in result.error


def test_grease_and_ech_pass() -> None:
    grease = [(0x0A0A, b""), server_name_extension("example-filed.cn"), (0xDADA, b"\x00")]
    assert fast_parse(build_hello(grease), CAP).sni == "example-filed.cn"
    ech = fast_parse(build_hello([server_name_extension("public.example-filed.cn"), (0xFE0D, os.urandom(200))]), CAP)
    assert (ech.sni, ech.ech) == ("public.example-filed.cn", True)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GET / HTTP/1.1\r\n", "not a TLS handshake"),
        (b"\x16\x02\x00\x00\x05", "record version"),
        (b"\x16\x03\x01\x00\x00", "out of range"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
        (b"\x80\x2e\x01\x03\x01", "not a TLS handshake"),
        (b"\x16\x03\x01\x00\x06\x01\x01\x00\x00\x03\x03", "larger than"),
    ],
)
def test_garbage_fails_closed(data: bytes, error: str) -> None:
    result = fast_parse(data, 1000)
    assert result.state is HelloState.ERROR and error in result.error


def test_oversize_hello_fails_at_the_cap() -> None:
    hello = build_hello([server_name_extension("a.cn")], key_share_size=20000, record_sizes=[10000])
    assert "larger than" in fast_parse(hello, CAP).error


NAMES = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){1,3}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(
    name=NAMES,
    key_share=st.integers(min_value=1, max_value=2000),
    splits=st.lists(st.integers(min_value=1, max_value=400), max_size=6),
    extra=st.lists(
        st.tuples(st.integers(min_value=0x100, max_value=0xFE00), st.binary(max_size=40)),
        max_size=5,
        unique_by=lambda e: e[0],
    ),
)
def test_generated_hellos_agree_with_mitmproxy(name: str, key_share: int, splits: list[int], extra) -> None:
    extensions = [(kind, data) for kind, data in extra if kind not in (0x2B, 0x33)] + [server_name_extension(name)]
    hello = build_hello(extensions, key_share_size=key_share, record_sizes=splits)
    ours = fast_parse(hello, CAP)
    assert ours.state is HelloState.COMPLETE
    assert (ours.sni, oracle(hello)) == (name, ("complete", name))


@settings(max_examples=500, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255), cut=st.integers(min_value=0))
def test_mutated_hellos_same_sni_or_refused(position: int, value: int, cut: int) -> None:
    # Only structures both parsers read (records, handshake header, lists, server_name) or both
    # treat as opaque (an unknown extension): mitmproxy also checks inner extension formats that
    # SNI extraction has no reason to read, and the backend's TLS stack refuses those anyway.
    extensions = [(0x5A5A, b"opaque"), server_name_extension("example-filed.cn")]
    hello = bytearray(build_hello(extensions, record_sizes=[60], tls13=False))
    hello[position % len(hello)] = value
    data = bytes(hello[: len(hello) - cut % 8]) if cut % 3 == 0 else bytes(hello)
    ours = fast_parse(data, CAP)
    theirs = oracle(data)
    if ours.state is HelloState.COMPLETE:
        # Whatever we accept, mitmproxy accepts too, and reads the same name from it, or none when
        # it finds the name invalid, in which case the policy refuses it too. We are never more
        # lenient: we also refuse odd record versions, inexact lengths and duplicate extensions.
        assert theirs[0] == "complete"
        if theirs[1] is None:
            assert ours.sni is None or normalize_host(ours.sni).kind is HostKind.INVALID
        else:
            assert theirs[1] == ours.sni


# --- the reassembler: split anywhere, record cap, oversize, garbage ----------------------------------
@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(st.integers(min_value=1, max_value=300), max_size=MAX_HELLO_RECORDS - 1),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=30),
    trailer=st.binary(max_size=20),
)
def test_split_anywhere_same_answer_and_end(records: list[int], cuts: list[int], trailer: bytes) -> None:
    """However records and segments cut the hello, the answer is the one-piece answer, and `end`
    marks where the hello's records stop (what follows is kept for the relay, not read)."""
    hello = build_hello([server_name_extension("example-filed.cn")], key_share_size=600, record_sizes=records)
    data = hello + trailer
    result, reader = fed_in_pieces(data, sorted({c % len(data) for c in cuts}))
    assert result == fast_parse(hello, CAP) == (HelloState.COMPLETE, "example-filed.cn", "", False)
    assert reader.end == len(hello) and bytes(reader.data) == data


def test_each_record_is_read_once() -> None:
    """One byte at a time: a record is consumed when its last byte arrives, never re-read."""
    hello = build_hello([server_name_extension("example-filed.cn")], record_sizes=[1] * 40)
    reader = HelloReassembler(CAP)
    ends = []
    for index in range(len(hello)):
        before = reader.end
        assert reader.feed(hello[index : index + 1]).state is (
            HelloState.COMPLETE if index == len(hello) - 1 else HelloState.NEED_MORE
        )
        if reader.end != before:
            ends.append(reader.end)
    assert ends == [*range(6, 6 * 41, 6), len(hello)]


def test_record_cap() -> None:
    body_size = len(build_hello([server_name_extension("example-filed.cn")])) - 5
    at_cap = [1] * (MAX_HELLO_RECORDS - 1)  # plus the rest in one: exactly the cap
    assert fast_parse(build_hello([server_name_extension("a.cn")], record_sizes=at_cap), CAP).sni == "a.cn"
    over = build_hello([server_name_extension("a.cn")], record_sizes=[1] * body_size)
    result, reader = fed_in_pieces(over, list(range(1, len(over))))
    assert result.state is HelloState.ERROR
    assert result.error == "ClientHello spans more than %d TLS records" % MAX_HELLO_RECORDS
    assert reader.end == 6 * MAX_HELLO_RECORDS  # refused at the cap, not at the end of the hello


def test_oversize_and_garbage_fail_as_soon_as_they_show() -> None:
    big = build_hello([server_name_extension("a.cn")], key_share_size=3000, record_sizes=[4])
    result, reader = fed_in_pieces(big, [5, 9], max_size=2000)  # the handshake header says 3 KB
    assert result.state is HelloState.ERROR and "larger than 2000" in result.error
    assert reader.end == 9
    result, reader = fed_in_pieces(build_hello([], key_share_size=3000), [5], max_size=2000)
    assert "larger than 2000" in result.error and reader.end == 0  # the record header says so
    reader = HelloReassembler(2000)
    assert reader.feed(b"\x16\x03").state is HelloState.NEED_MORE
    assert "record version 3.9" in reader.feed(b"\x09").error
    assert "not a TLS handshake" in HelloReassembler(CAP).feed(b"G").error
    final = HelloReassembler(CAP)
    assert final.feed(b"\x17").state is HelloState.ERROR
    assert final.feed(python_hello("example-filed.cn")).state is HelloState.ERROR  # an error is final


def test_a_hello_followed_by_more_handshake_in_its_record_is_refused() -> None:
    hello = build_hello([server_name_extension("a.cn")])
    stretched = hello[:3] + (int.from_bytes(hello[3:5], "big") + 4).to_bytes(2, "big") + hello[5:] + b"\x0f\x00\x00\x00"
    assert "handshake data after the ClientHello" in fast_parse(stretched, CAP).error
