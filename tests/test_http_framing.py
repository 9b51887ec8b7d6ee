"""The HTTP framing the gate relies on: chunked bodies, response tracking, and request heads.

Each parser is checked the way an attacker would try it: split at every byte, framing that
backends read differently, and bodies that look like the next message.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icpgate.gate.http.framing import ChunkedBody, FramingError
from icpgate.gate.http.inspector import Body, Head, HttpInspector, Invalid, Tunnel
from icpgate.gate.http.responses import CONNECT, NO_SWITCH, UPGRADE, ResponseTracker

CHUNKED = b"5\r\nhello\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\nExpires: never\r\n\r\n"


def body_end(pieces: list[bytes]) -> int | None:
    """Where the body ends, counted over all pieces; None if it never does."""
    body, seen = ChunkedBody(1024), 0
    for piece in pieces:
        end = body.advance(piece)
        if body.done:
            return seen + end
        seen += len(piece)
    return None


def test_chunked_body_ends_where_its_framing_says_however_it_is_split() -> None:
    data = CHUNKED + b"GET /next HTTP/1.1\r\n"
    for cut in range(len(data) + 1):
        assert body_end([data[:cut], data[cut:]]) == len(CHUNKED), cut
    assert body_end([bytes([b]) for b in data]) == len(CHUNKED)


@pytest.mark.parametrize(
    "body",
    [
        b"5;ext=1\r\nhello\r\n0\r\n\r\n",  # chunk extensions: backends disagree on them
        b"5\nhello\r\n0\r\n\r\n",  # bare LF
        b" 5\r\nhello\r\n0\r\n\r\n",  # whitespace
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello!\r\n0\r\n\r\n",  # data longer than its size
        b"5\r\nhello\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"11111111111111111\r\n",  # 17 hex digits
        b"0\r\nbad trailer\r\n\r\n",
        b"0\r\n: empty name\r\n\r\n",
    ],
)
def test_ambiguous_chunked_framing_is_refused(body: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkedBody(1024).advance(body)


def test_trailer_section_is_bounded() -> None:
    body = ChunkedBody(64)
    with pytest.raises(FramingError):
        body.advance(b"0\r\n" + b"X-Long: " + b"a" * 100 + b"\r\n\r\n")


def test_a_chunk_full_of_line_feeds_costs_what_any_chunk_costs() -> None:
    size = 4 << 20

    def cost(data: bytes) -> float:
        started = time.process_time()
        body = ChunkedBody(1024)
        for offset in range(0, len(data), 65536):
            body.advance(data[offset : offset + 65536])
        assert body.done
        return time.process_time() - started

    framed = b"%x\r\n" % size
    newlines = cost(framed + b"\n" * size + b"\r\n0\r\n\r\n")
    letters = cost(framed + b"a" * size + b"\r\n0\r\n\r\n")
    assert newlines < 3 * letters + 0.05


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """Well-formed chunked bodies whose chunks straddle the bulk path's reach (1-255 bytes, stepped
    over in runs by one regular expression) and the chunk-by-chunk one (256 and more), with every
    size spelling the framer takes: either case, leading zeros up to 16 digits."""
    body = b""
    for size in draw(st.lists(st.integers(1, 300) | st.sampled_from([1, 15, 16, 255, 256]), max_size=12)):
        digits = "%x" % size
        digits = "0" * draw(st.integers(0, 16 - len(digits))) + digits
        digits = "".join(c.upper() if draw(st.booleans()) else c for c in digits)
        body += digits.encode() + b"\r\n" + draw(st.binary(min_size=size, max_size=size)) + b"\r\n"
    fields = draw(st.lists(st.sampled_from([b"X-A: 1", b"t:", b"Expires:\tnever ", b"a-b: \xff"]), max_size=3))
    return body + b"0" * draw(st.integers(1, 16)) + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def framing_outcome(pieces: list[bytes]) -> int | str:
    """Where the body ends over all pieces, "refused", or "open" when it has not ended."""
    try:
        end = body_end(pieces)
    except FramingError:
        return "refused"
    return "open" if end is None else end


@given(chunked_bodies(), st.lists(st.integers(1, 64), max_size=20))
def test_runs_of_small_chunks_end_where_chunk_by_chunk_reading_ends(body: bytes, cuts: list[int]) -> None:
    stream = body + b"GET /next HTTP/1.1\r\n"
    pieces, offset = [], 0
    for cut in cuts:
        pieces.append(stream[offset : offset + cut])
        offset += cut
    pieces.append(stream[offset:])
    assert framing_outcome([stream]) == framing_outcome(pieces) == len(body)


@given(chunked_bodies(), st.integers(0, 10**6), st.binary(min_size=1, max_size=3), st.integers(0, 3))
def test_a_damaged_body_is_read_alike_in_runs_and_byte_by_byte(
    body: bytes, at: int, insert: bytes, remove: int
) -> None:
    """One byte at a time, no run can be matched: the framer steps chunk by chunk. Whatever the
    damage (bytes inserted, removed), reading the whole body at once must come to the same end."""
    at %= len(body)
    damaged = body[:at] + insert + body[at + remove :]
    assert framing_outcome([damaged]) == framing_outcome([bytes([b]) for b in damaged]), damaged


@pytest.mark.parametrize("spelling", ["%x", "%X", "0%x", "%016x", "%016X"])
def test_every_size_the_bulk_path_reads_is_read_exactly(spelling: str) -> None:
    """Each chunk size of 1-255 bytes is its own branch of a generated regular expression: each
    one, and its neighbours, is checked here, with one byte too few and one too many."""
    for size in range(1, 300):
        line = (spelling % size).encode() + b"\r\n"
        exact = line + b"\n" * size + b"\r\n" + line + b"a" * size + b"\r\n0\r\n\r\n"
        assert framing_outcome([exact]) == len(exact), size
        for wrong in (size - 1, size + 1):
            assert framing_outcome([line + b"a" * wrong + b"\r\n0\r\n\r\n"]) == "refused", (size, wrong)


def test_one_byte_chunks_cost_what_their_bytes_cost() -> None:
    """The framer alone, 4 MiB in 1-byte chunks against 4 MiB in 16 KiB chunks and in 256-byte
    chunks (the smallest the framer steps over one by one). Chunk by chunk, the first cost 40
    times the second."""

    def cost(chunk: int) -> float:
        one = b"%x\r\n" % chunk + b"a" * chunk + b"\r\n"
        data = one * ((4 << 20) // len(one)) + b"0\r\n\r\n"
        started = time.process_time()
        body = ChunkedBody(1024)
        for offset in range(0, len(data), 65536):
            body.advance(data[offset : offset + 65536])
        assert body.done
        return time.process_time() - started

    ordinary = cost(16384)
    assert cost(1) < 10 * ordinary + 0.06
    assert cost(256) < 10 * ordinary + 0.06


# --- responses ----------------------------------------------------------------------------------
def ok(body: bytes = b"hi", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def test_pipelined_responses_are_paired_with_their_requests_split_anywhere() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED
    stream = ok(b"HTTP/1.1 101 Switching Protocols\r\n\r\n") + chunked + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
    stream += b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"last")
    for cut in range(len(stream) + 1):
        tracker = ResponseTracker(4096)
        for head_request in (False, False, True, False):
            tracker.expect(head_request, NO_SWITCH)
        assert tracker.feed(stream[:cut]) == cut
        assert tracker.feed(stream[cut:]) == len(stream) - cut
        assert tracker.idle and tracker.switched is None and not tracker.tunnel, cut


def test_a_101_inside_a_body_is_not_an_answer() -> None:
    tracker = ResponseTracker(4096)
    tracker.expect(False, NO_SWITCH)
    tracker.expect(False, UPGRADE)
    tracker.feed(ok(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"))
    assert tracker.switched is None and not tracker.tunnel and not tracker.idle
    tracker.feed(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    assert tracker.switched is False and tracker.idle


def test_switches_open_the_tunnel_only_for_the_request_that_asked() -> None:
    tracker = ResponseTracker(4096)
    tracker.expect(False, UPGRADE)
    tracker.feed(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x00")
    assert tracker.switched is True and tracker.tunnel
    connect = ResponseTracker(4096)
    connect.expect(False, CONNECT)
    connect.feed(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert connect.switched is True and connect.tunnel
    refused = ResponseTracker(4096)
    refused.expect(False, CONNECT)
    refused.feed(b"HTTP/1.1 405 Not Allowed\r\nContent-Length: 2\r\n\r\nno")
    assert refused.switched is False and not refused.tunnel and refused.idle
    plain = ResponseTracker(4096)
    plain.expect(False, NO_SWITCH)
    with pytest.raises(FramingError):
        plain.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")


def test_stop_when_idle_cuts_at_the_end_of_the_last_expected_answer() -> None:
    tracker = ResponseTracker(4096)
    tracker.expect(False, NO_SWITCH)
    first = ok(b"one")
    assert tracker.feed(first + b"HTTP/1.1 200 OK\r\n", stop_when_idle=True) == len(first)
    assert tracker.idle


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX: y\r\n\r\n",  # a bare LF
        b"HTTP/2 200\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
    ],
)
def test_unframable_responses_are_errors(response: bytes) -> None:
    tracker = ResponseTracker(4096)
    tracker.expect(False, NO_SWITCH)
    with pytest.raises(FramingError):
        tracker.feed(response)


def test_a_response_without_framing_runs_until_close_and_head_answers_have_no_body() -> None:
    tracker = ResponseTracker(4096)
    tracker.expect(True, NO_SWITCH)  # HEAD
    tracker.expect(False, NO_SWITCH)
    tracker.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nHTTP/1.1 200 OK\r\n\r\nall of this")
    assert not tracker.idle
    tracker.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")  # body, until the connection closes
    assert not tracker.idle and tracker.switched is None
    malformed = ResponseTracker(4096)  # a length the gate cannot read is no length: the body runs until close
    malformed.expect(False, NO_SWITCH)
    malformed.expect(False, UPGRADE)
    malformed.feed(b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhiHTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert not malformed.tunnel and malformed.switched is None


def test_an_oversize_response_head_is_an_error() -> None:
    tracker = ResponseTracker(1024)
    tracker.expect(False, NO_SWITCH)
    tracker.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(FramingError):
        tracker.feed(b"X: " + b"a" * 2000)


# --- request heads ------------------------------------------------------------------------------
def events(data: bytes) -> list:
    return list(HttpInspector(32768).feed(data))


def refused(data: bytes) -> bool:
    """The gate refuses the request: llhttp rejects it, or the head parses but must not pass."""
    (event,) = events(data)
    return isinstance(event, Invalid) or bool(event.request.error)


@pytest.mark.parametrize(
    "target",
    [b"ftp://unfiled.example/", b"ws://unfiled.example/", b"x://unfiled.example/", b"HTTPS:unfiled.example/",
     b"unfiled.example/", b"*", b"http:///path", b"http://user@unfiled.example/",
     b"https://example-filed.cn/", b"HTTPS://example-filed.cn", b"hTtPs://example-filed.cn/"],
)  # fmt: skip
def test_request_targets_other_than_path_or_http_url_are_refused(target: bytes) -> None:
    assert refused(b"GET %s HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n" % target), target


def test_http_absolute_targets_are_decided_on_their_authority() -> None:
    for target in (b"http://Example-Filed.cn/x", b"HTTP://example-filed.cn", b"http://example-filed.cn?q"):
        (head,) = events(b"GET %s HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n" % target)
        assert not head.request.error and head.request.host.lower() == "example-filed.cn", target
    (head,) = events(b"OPTIONS * HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")
    assert not head.request.error and head.request.host == "example-filed.cn"


@pytest.mark.parametrize("host", [b"www.ex\xaample-filed.cn", b"www.exam\xadple-filed.cn", b"\xe7\xa4\xba.cn"])
def test_bytes_outside_ascii_in_a_name_are_refused(host: bytes) -> None:
    assert refused(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    assert refused(b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (host, host))


def test_every_upgrade_token_of_every_upgrade_header_is_seen() -> None:
    (head,) = events(b"GET / HTTP/1.1\r\nHost: a.cn\r\nConnection: upgrade\r\nUpgrade: websocket, h2c\r\n\r\n")
    assert head.request.upgrade == (b"websocket", b"h2c")
    (head,) = events(b"GET / HTTP/1.1\r\nHost: a.cn\r\nUpgrade: websocket\r\nUpgrade: H2C\r\n\r\n")
    assert head.request.upgrade == (b"websocket", b"h2c")
    (head,) = events(b"GET / HTTP/1.1\r\nHost: a.cn\r\nUpgrade: ,websocket ,, TLS/1.0\r\n\r\n")
    assert head.request.upgrade == (b"websocket", b"tls/1.0")


@pytest.mark.parametrize(
    "extra",
    [b"Upgrade: websocket\r\nContent-Length: 5\r\n", b"Upgrade: websocket\r\nTransfer-Encoding: chunked\r\n"],
)
def test_a_body_on_an_upgrade_or_connect_is_refused(extra: bytes) -> None:
    assert refused(b"GET / HTTP/1.1\r\nHost: a.cn\r\nConnection: upgrade\r\n%s\r\nhello" % extra)
    assert refused(b"CONNECT a.cn:443 HTTP/1.1\r\nHost: a.cn:443\r\nContent-Length: 5\r\n\r\nhello")


def test_bytes_after_an_upgrade_wait_for_the_answer_then_are_inspected_or_tunnelled() -> None:
    upgrade = b"GET / HTTP/1.1\r\nHost: a.cn\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    follow = b"GET / HTTP/1.1\r\nHost: b.cn\r\n\r\n"
    for accepted, expected in ((False, Head), (True, Tunnel)):
        inspector = HttpInspector(32768)
        first = list(inspector.feed(upgrade + follow))
        assert [type(e) for e in first] == [Head]
        inspector.switch_answered(accepted)
        (event,) = inspector.feed(b"")
        assert isinstance(event, expected)


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_request_boundaries_survive_any_split(cuts: list[int]) -> None:
    stream = (
        b"POST /a HTTP/1.1\r\nHost: a.cn\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED
        + b"POST /b HTTP/1.1\r\nHost: b.cn\r\nContent-Length: 3\r\n\r\nabc"
        + b"GET /c HTTP/1.1\r\nHost: c.cn\r\n\r\n"
    )  # fmt: skip
    inspector, hosts, forwarded, offset = HttpInspector(32768), [], b"", 0
    for cut in [*cuts, len(stream)]:
        piece, offset = stream[offset : offset + cut], offset + cut
        for event in inspector.feed(piece):
            assert not isinstance(event, Invalid), event
            if isinstance(event, Head):
                hosts.append(event.request.host)
                forwarded += event.raw
            elif isinstance(event, Body):
                forwarded += event.raw
        if offset >= len(stream):
            break
    assert hosts == ["a.cn", "b.cn", "c.cn"] and forwarded == stream
