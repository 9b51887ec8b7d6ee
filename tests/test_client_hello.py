"""The fast SNI extractor, against mitmproxy's ClientHello parser as the oracle."""

from __future__ import annotations

import os

import pytest
from gatekit import build_hello, python_hello, server_name_extension
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.proxy.layers.tls import get_client_hello, parse_client_hello

from icpgate.gate.client_hello import HelloState
from icpgate.gate.client_hello import parse_client_hello as fast_parse
from icpgate.hostname import HostKind, normalize_host

CAP = 16384


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
