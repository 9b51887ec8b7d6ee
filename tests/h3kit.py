"""Test kit for QUIC: an HTTP/3 origin and client on aioquic, and junk Initials for floods.

The origin runs its own event loop in a thread of the test process, so a test reads what it saw
(every datagram, every request with the ALPN it was served over) without any file or pipe. It
answers each request with the :authority it got: a test that reaches it through the gate can tell
which name the gate let through. The client speaks HTTP/3 to 127.0.0.1 with any SNI and returns
None when nothing answers, which is what a blocked QUIC flow looks like to a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent

QUIC_V1 = 0x00000001


def free_udp_port(tcp_too: bool = False) -> int:
    """A UDP port free on 127.0.0.1 (and, with `tcp_too`, free for TCP as well: a gate serves QUIC
    and its TLS fallback on the same port number, as a site does on 443)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            if not tcp_too:
                return port
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


# --- the origin --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    authority: str
    path: str
    alpn: str  # the ALPN the QUIC handshake settled on: "h3" when HTTP/3 served it
    client: tuple[str, int]


def page(request: Request) -> bytes:
    """What the origin serves: the name and protocol it was reached by, for a browser's DOM."""
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>h3 origin</title></head><body>'
        '<p id="authority">%s</p><p id="protocol">%s</p><p id="path">%s</p></body></html>\n'
        % (html.escape(request.authority), html.escape(request.alpn), html.escape(request.path))
    ).encode()


class _OriginConnection(QuicConnectionProtocol):
    """One HTTP/3 connection: every request is answered at once from its headers."""

    def __init__(self, *args, origin: H3Origin, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._origin = origin
        self._http = H3Connection(self._quic)
        self._client: tuple[str, int] = ("", 0)

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self._client = (addr[0], addr[1])
        super().datagram_received(data, addr)

    def quic_event_received(self, event: QuicEvent) -> None:
        for http_event in self._http.handle_event(event):
            if isinstance(http_event, HeadersReceived):
                self._answer(http_event)

    def _answer(self, event: HeadersReceived) -> None:
        headers = dict(event.headers)
        request = Request(
            authority=headers.get(b":authority", b"").decode("latin-1"),
            path=headers.get(b":path", b"").decode("latin-1"),
            alpn=self._quic.tls.alpn_negotiated or "",
            client=self._client,
        )
        self._origin.requests.append(request)
        body = page(request)
        self._http.send_headers(
            event.stream_id,
            [
                (b":status", b"200"),
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        self._http.send_data(event.stream_id, body, end_stream=True)
        self.transmit()


class _CountingServer(QuicServer):
    """aioquic's server, counting every datagram before it reads it (junk included)."""

    def __init__(self, *, origin: H3Origin, **kwargs) -> None:
        super().__init__(**kwargs)
        self._origin = origin

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self._origin.datagrams += 1
        self._origin.sources.add((addr[0], addr[1]))
        super().datagram_received(data, addr)


@dataclass
class H3Origin:
    """An HTTP/3 origin on 127.0.0.1:`port` in a thread; `datagrams` counts all it received."""

    port: int
    datagrams: int = 0
    sources: set[tuple[str, int]] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self, cert_chain: Path, key: Path) -> H3Origin:
        configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
        configuration.load_cert_chain(cert_chain, key)
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._bind(configuration))
            except BaseException as error:  # reported to start(), which raises it in the test
                failure.append(error)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="h3-origin-%d" % self.port, daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    async def _bind(self, configuration: QuicConfiguration) -> None:
        loop = asyncio.get_running_loop()
        self._transport, self._server = await loop.create_datagram_endpoint(
            lambda: _CountingServer(
                origin=self,
                configuration=configuration,
                create_protocol=lambda *args, **kwargs: _OriginConnection(*args, origin=self, **kwargs),
            ),
            local_addr=("127.0.0.1", self.port),
        )

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return

        def close() -> None:
            self._server.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(close)
        self._thread.join(10)

    def authorities(self) -> list[str]:
        return [request.authority for request in self.requests]


@contextlib.contextmanager
def h3_origin(cert_chain: Path, key: Path, port: int | None = None) -> Iterator[H3Origin]:
    origin = H3Origin(port or free_udp_port()).start(cert_chain, key)
    try:
        yield origin
    finally:
        origin.stop()


# --- the client --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _ClientConnection(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._pending: dict[int, tuple[asyncio.Future[Answer], list[tuple[bytes, bytes]], list[bytes]]] = {}

    async def get(self, authority: str, path: str) -> Answer:
        stream_id = self._quic.get_next_available_stream_id()
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = (future, [], [])
        request = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority.encode()),
                   (b":path", path.encode()), (b"user-agent", b"h3kit")]  # fmt: skip
        self._http.send_headers(stream_id, request, end_stream=True)
        self.transmit()
        return await future

    def quic_event_received(self, event: QuicEvent) -> None:
        for http_event in self._http.handle_event(event):
            self._collect(http_event)

    def _collect(self, event: H3Event) -> None:
        if not isinstance(event, HeadersReceived | DataReceived) or event.stream_id not in self._pending:
            return
        future, headers, body = self._pending[event.stream_id]
        if isinstance(event, HeadersReceived):
            headers.extend(event.headers)
        else:
            body.append(event.data)
        if event.stream_ended and not future.done():
            fields = dict(headers)
            future.set_result(Answer(int(fields.get(b":status", b"0")), fields, b"".join(body)))


async def fetch(host: str, port: int, ca: Path, *, path: str = "/", timeout: float = 5.0,
                address: str = "127.0.0.1", version: int = QUIC_V1, local_port: int = 0) -> Answer | None:  # fmt: skip
    """GET https://host:port/path over HTTP/3 to address:port with SNI `host`, from `local_port` (0:
    an ephemeral one); None when no answer (no handshake or no response) came within `timeout`."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host)
    configuration.load_verify_locations(cafile=str(ca))
    configuration.supported_versions = [version]
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _ClientConnection(QuicConnection(configuration=configuration)), local_addr=(address, local_port)
    )
    try:
        protocol.connect((address, port))
        authority = host if port == 443 else "%s:%d" % (host, port)

        async def exchange() -> Answer:
            await protocol.wait_connected()
            return await protocol.get(authority, path)

        try:
            return await asyncio.wait_for(exchange(), timeout)
        except (TimeoutError, ConnectionError):
            return None
    finally:
        protocol.close()  # a CONNECTION_CLOSE goes out now; nothing waits for the peer's
        transport.close()


def h3_get(host: str, port: int, ca: Path, **options) -> Answer | None:
    """`fetch` on a fresh event loop, for tests that do not run one."""
    return asyncio.run(fetch(host, port, ca, **options))


# --- junk ----------------------------------------------------------------------------------------------
def junk_initial(rng: random.Random, size: int = 1200) -> bytes:
    """A datagram that looks like a client's first QUIC v1 Initial (long header, fixed bit, Initial
    type, random 8-20 byte DCID, empty token, a Length that fits) but whose payload is random bytes:
    it passes every cheap check and fails only at the AEAD tag, the most expensive place to fail."""
    dcid = rng.randbytes(rng.randint(8, 20))
    scid = rng.randbytes(8)
    first = 0xC0 | rng.randint(0, 3)  # long header, fixed bit, type Initial, any packet number length
    header = (
        bytes([first]) + QUIC_V1.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid + b"\x00"
    )
    length = size - len(header) - 2
    return header + (0x4000 | length).to_bytes(2, "big") + os.urandom(length)
