"""The compiled HTTP engine and the pure-Python reference are one set of rules: fed the same reads,
an inspector and a response tracker answer the same with the compiled engine as without it.

The strategies build requests and responses from the parts that decide what the gate does (method,
target form, version, Host forms, framing and upgrade fields, line ends), then mutate a byte, split
the reads and pipeline a second message, so both the plain cases the engine answers and the near
misses it must pass on are covered. The whole HTTP suite also runs with `ICPGATE_HTTP_ENGINE=python`
(`make test`), so the gate's behaviour is checked end to end on both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icpgate.gate.http import engine, inspector, responses
from icpgate.gate.http.framing import FramingError
from icpgate.gate.http.inspector import Head, HttpInspector
from icpgate.gate.http.responses import CONNECT, NO_SWITCH, UPGRADE, ResponseTracker

MAX_HEAD = 8192
COMPILED = engine.compiled is not None

# What curl, a browser and h2load send: the compiled engine must answer these itself.
EVERYDAY_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: www.example-filed.cn\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
    b"GET /index.html?q=1 HTTP/1.1\r\nHost: www.example-filed.cn\r\nConnection: keep-alive\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0\r\nAccept: text/html,application/xhtml+xml\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: zh-CN,zh;q=0.9\r\nCookie: a=b\r\n\r\n",
    b"GET /static/a.css HTTP/1.1\r\nhost: example-filed.cn:8080\r\nuser-agent: h2load nghttp2/1.52.0\r\n\r\n",
    b"HEAD / HTTP/1.0\r\nHost: example-filed.cn\r\nConnection: keep-alive\r\n\r\n",
]


def test_the_engine_the_suite_runs_is_the_one_asked_for() -> None:
    """`make test` builds the compiled engine and runs the suite with it, then the HTTP suite with
    the reference: a build that silently fell back would not be tested at all."""
    if os.environ.get("ICPGATE_HTTP_ENGINE") == "python":
        assert (engine.ENGINE, engine.compiled) == ("python", None)
    else:
        assert engine.ENGINE == "compiled", engine.ENGINE_NOTE


def test_the_compiled_engine_answers_everyday_requests_and_responses_itself() -> None:
    if not COMPILED:
        return  # the reference run: the next tests compare nothing either, they run the reference
    for request in EVERYDAY_REQUESTS:
        assert engine.compiled.read_plain_head(request, MAX_HEAD) is not None, request
    answer = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\nContent-Type: text/html\r\n\r\nhello"
    assert engine.compiled.whole_plain_response(answer, MAX_HEAD)


@contextmanager
def reference_only():
    """The pure-Python path alone: what the inspector and tracker do without the compiled engine."""
    with (
        mock.patch.object(inspector, "_read_plain_head", None),
        mock.patch.object(responses, "_whole_plain_response", None),
    ):
        yield


def inspect(reads: list[bytes]) -> list[tuple[object, ...]]:
    """Every event of every read, and the state after each read, as values to compare."""
    checked = HttpInspector(MAX_HEAD)
    seen: list[tuple[object, ...]] = []
    for data in reads:
        seen.append(tuple(checked.feed(data)))
        seen.append((checked.in_head, checked.awaiting_switch))
        if checked.awaiting_switch:
            checked.switch_answered(False)  # the backend refused: both read on as HTTP
    return seen


def track(expected: list[tuple[bool, int]], reads: list[bytes]) -> list[object]:
    tracker = ResponseTracker(MAX_HEAD)
    for head_request, switch in expected:
        tracker.expect(head_request, switch)
    seen: list[object] = []
    for data in reads:
        try:
            seen.append(tracker.feed(data, stop_when_idle=len(seen) % 2 == 1))
        except FramingError as error:
            seen.append(("framing error", str(error)))
            break
        seen.append((tracker.idle, tracker.tunnel, tracker.switched))
    return seen


METHODS = st.sampled_from([b"GET"] * 30 + [b"HEAD", b"POST", b"OPTIONS", b"CONNECT", b"PUT", b"get", b"PRI", b"G T"])
TARGETS = st.sampled_from([b"/", b"/a?b=c"] * 15 + [
    b"/", b"/a?b=c", b"/%00", b"*", b"http://example-filed.cn/", b"https://example-filed.cn/", b"example-filed.cn:443",
    b"/\xe4", b"/a b", b"//x", b"",
])  # fmt: skip
VERSIONS = st.sampled_from(
    [b"HTTP/1.1"] * 30
    + [b"HTTP/1.0"] * 6
    + [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/0.9", b""]
)
HOSTS = st.sampled_from([
    b"example-filed.cn", b" example-filed.cn \t", b"", b"exa mple.cn", b"ex\xaa.cn", b"EXAMPLE-filed.CN:80",
    b"[::1]:8080", b"a,b", b"example-unfiled.cn",
])  # fmt: skip
FIELDS = st.one_of(
    st.tuples(st.sampled_from([b"Host", b"host", b"HOST", b"Host ", b" Host", b"Hostx", b"X-Host"]), HOSTS),
    st.tuples(
        st.sampled_from([b"Content-Length", b"content-length"]), st.sampled_from([b"0", b"5", b"-1", b"00", b""])
    ),
    st.tuples(st.just(b"Transfer-Encoding"), st.sampled_from([b"chunked", b"gzip, chunked", b"identity"])),
    st.tuples(st.just(b"Upgrade"), st.sampled_from([b"websocket", b"h2c", b"", b"foo/1"])),
    st.tuples(st.just(b"Connection"), st.sampled_from([b"close", b"keep-alive", b"Upgrade", b"keep-alive, close"])),
    st.tuples(st.just(b"Accept"), st.sampled_from([b"application/json", b"text/html", b""])),
    st.tuples(
        st.sampled_from([b"X-A", b"x-a", b"User-Agent", b"Cookie", b"X_B", b"", b"Q", b"a"]), st.binary(max_size=6)
    ),
)
PLAIN_FIELDS = st.tuples(st.sampled_from([b"User-Agent", b"Accept", b"Cookie", b"X-A"]),
                         st.sampled_from([b"curl/8", b"*/*", b"a=b; c=d", b"", b" x "]))  # fmt: skip


@st.composite
def requests(draw) -> bytes:
    eol = draw(st.sampled_from([b"\r\n"] * 20 + [b"\n", b"\r"]))
    line = b" ".join(part for part in (draw(METHODS), draw(TARGETS), draw(VERSIONS)) if part)
    fields = [name + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + value for name, value in draw(
        st.lists(st.one_of(PLAIN_FIELDS, FIELDS) if draw(st.booleans()) else PLAIN_FIELDS, max_size=6))]  # fmt: skip
    if draw(st.sampled_from([True, True, True, False])):  # hypothesis leans to the first: the plain case
        fields.insert(draw(st.integers(0, len(fields))), b"Host: example-filed.cn")
    if draw(st.sampled_from([False] * 9 + [True])):
        fields.append(b" folded")
    head = line + b"\r\n" + b"".join(field + eol for field in fields) + b"\r\n"
    body = draw(st.sampled_from([b""] * 6 + [b"hello", b"5\r\nhello\r\n0\r\n\r\n"]))
    return draw(st.sampled_from([b""] * 6 + [b"\r\n"])) + head + body


@st.composite
def mutated(draw, messages) -> list[bytes]:
    """One to three messages on one connection, perhaps one byte changed, in reads split anywhere."""
    stream = b"".join(draw(st.lists(messages, min_size=1, max_size=3)))
    if stream and draw(st.sampled_from([False, False, True])):
        at = draw(st.integers(0, len(stream) - 1))
        stream = stream[:at] + draw(st.sampled_from([b"", b"\r", b"\n", b" ", b"\x00", b"\x80", b"A", b":"])) + stream[
            at + draw(st.integers(0, 1)):]  # fmt: skip
    reads = []
    while stream:
        whole = stream.find(b"\r\n\r\n") + 4  # most reads hold whole messages: the engine's case
        size = draw(st.sampled_from([whole if whole >= 4 else len(stream)] * 12 + list(range(1, len(stream) + 1))))
        reads.append(stream[:size])
        stream = stream[size:]
    return reads


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(requests()))
def test_the_inspector_decides_the_same_with_the_compiled_engine_as_without(reads: list[bytes]) -> None:
    with reference_only():
        reference = inspect(reads)
    assert inspect(reads) == reference


@settings(max_examples=300, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=4))
def test_every_head_the_compiled_engine_reads_is_the_head_the_inspector_reads(messages: list[bytes]) -> None:
    """Whole messages one per read, the engine's case: what it answers is exactly the reference's
    single Head event, and the requests that follow are read the same after it."""
    with reference_only():
        reference = inspect(messages)
    assert inspect(messages) == reference
    if COMPILED:
        for message in messages:
            plain = engine.compiled.read_plain_head(message, MAX_HEAD)
            if plain is not None:
                with reference_only():
                    events = list(HttpInspector(MAX_HEAD).feed(message))
                assert len(events) == 1 and isinstance(events[0], Head) and events[0].raw == message
                assert (events[0].request.method, events[0].request.target, events[0].request.version,
                        events[0].request.host, events[0].request.headers) == plain  # fmt: skip


STATUS_LINES = st.sampled_from([b"HTTP/1.1 200 OK"] * 10 + [
    b"HTTP/1.1 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 200 ", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 100 Continue",
    b"HTTP/1.1 099 X", b"HTTP/2 200", b"HTTP/1.1 200 \xe5\xa5\xbd", b"HTTP/1.1 200 \x7f", b"HTTP/1.1 999 x",
    b"HTTP/1.1 20 OK", b"HTTP/1.1 503\tbusy",
])  # fmt: skip
PLAIN_RESPONSE_FIELDS = st.tuples(st.sampled_from([b"Server", b"Content-Type", b"ETag"]),
                                  st.sampled_from([b" nginx", b" text/html", b"\t\"x\" "]))  # fmt: skip
RESPONSE_FIELDS = st.one_of(
    st.tuples(
        st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Content-Length "]),
        st.sampled_from([b"5", b" 5 ", b"0", b"05", b"-1", b"5,5", b"", b"9" * 19, b"5\r"]),
    ),
    st.tuples(st.sampled_from([b"Transfer-Encoding", b"transfer-encoding"]), st.sampled_from([b"chunked", b"gzip"])),
    st.tuples(
        st.sampled_from([b"Server", b"Content-Type", b"X-Content-Length", b" Content-Length"]),
        st.sampled_from([b"nginx", b"text/html", b"5", b"a\nb"]),
    ),
)


@st.composite
def answers(draw) -> bytes:
    eol = draw(st.sampled_from([b"\r\n"] * 8 + [b"\n"]))
    fields = [name + b":" + value for name, value in draw(
        st.lists(st.one_of(PLAIN_RESPONSE_FIELDS, RESPONSE_FIELDS) if draw(st.booleans()) else PLAIN_RESPONSE_FIELDS,
                 max_size=4))]  # fmt: skip
    if draw(st.sampled_from([True, True, True, False])):
        fields.insert(draw(st.integers(0, len(fields))), b"Content-Length: 5")
    head = draw(STATUS_LINES) + b"\r\n" + b"".join(field + eol for field in fields) + b"\r\n"
    return head + draw(st.sampled_from([b"hello"] * 6 + [b"", b"hell", b"hello!", b"5\r\nhello\r\n0\r\n\r\n"]))


EXPECTED = st.tuples(st.sampled_from([False] * 4 + [True]), st.sampled_from([NO_SWITCH] * 6 + [UPGRADE, CONNECT]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EXPECTED, max_size=4), mutated(answers()))
def test_the_tracker_frames_the_same_with_the_compiled_engine_as_without(expected, reads: list[bytes]) -> None:
    with reference_only():
        reference = track(expected, reads)
    assert track(expected, reads) == reference


# For one byte, PyBytes_FromStringAndSize returns CPython's shared single-character object: an
# engine that lowered a one-letter header name (`Q: 1`) in place in it rewrote b"Q" to b"q" in the
# whole process (b"Q" == b"q" after that), and its head held two keys that print as b"a" for
# `A: 1` then `a: 2` (the reference keeps the first value, that head answered b"2"). In a child
# process, since such a corruption would leak into the rest of the suite.
_SINGLE_LETTER_NAMES = r"""
import sys
from unittest import mock
from icpgate.gate.http import engine, inspector, responses
from icpgate.gate.http.inspector import HttpInspector

def heads(data, compiled):
    patches = [] if compiled else [mock.patch.object(inspector, "_read_plain_head", None)]
    for patch in patches:
        patch.start()
    try:
        return [(e.request.method, e.request.target, e.request.host, sorted(e.request.headers.items()), e.raw)
                for e in HttpInspector(8192).feed(data)]
    finally:
        for patch in patches:
            patch.stop()

for c in range(0x41, 0x5B):
    hash(bytes([c]))  # as in a process that has used these objects: their hash is kept in them

failures = []
for data in (
    b"GET / HTTP/1.1\r\nHost: a.cn\r\nA: 1\r\na: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.cn\r\nQ: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.cn\r\nH: 1\r\nh: 2\r\nX-A: 3\r\n\r\n",
):
    reference = heads(data, compiled=False)
    compiled = heads(data, compiled=True)
    if compiled != reference:
        failures.append("head differs for %r: %r != %r" % (data, compiled, reference))
    if engine.compiled is not None:
        plain = engine.compiled.read_plain_head(data, 8192)
        if plain is not None and sorted(plain[4].items()) != reference[0][3]:
            failures.append("read_plain_head's headers differ for %r: %r" % (data, plain[4]))
for c in range(0x41, 0x5B):
    if bytes([c]).hex() != "%02x" % c:
        failures.append("the interpreter's b%r now holds %r" % (chr(c), bytes([c]).hex()))
print("\n".join(failures) or "ok")
"""


def test_a_one_letter_header_name_changes_neither_the_head_nor_the_interpreter() -> None:
    result = subprocess.run([sys.executable, "-c", _SINGLE_LETTER_NAMES], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "ok", result.stdout
