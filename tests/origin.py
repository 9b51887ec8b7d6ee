"""A real origin for the gate tests, run as a subprocess (`python tests/origin.py --http PORT ...`).

- `--http` / `--tls`: an aiohttp app answering with what it received (host, method, path, a
  SHA-256 of the body) and echoing WebSocket messages on /ws; TLS with the given certificate.
- `--tls-echo`: TLS that echoes every byte back (checksums over large transfers).
- `--hold`: plain TCP that reads, discards, and never closes its side, even after EOF.
- `--record DIR`: plain TCP that stores every connection's bytes in DIR/<n>.bin, unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import ssl
from pathlib import Path

from aiohttp import WSMsgType, web


async def answer(request: web.Request) -> web.Response:
    body = await request.read()
    facts = {
        "host": request.headers.get("Host"),
        "method": request.method,
        "path": request.path_qs,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_length": len(body),
        "version": "%d.%d" % request.version,
    }
    return web.json_response(facts)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str("echo: " + message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class Holder(asyncio.Protocol):
    """Reads and discards, and keeps its side open after the peer's EOF: a backend that never finishes."""

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return True


class Recorder(asyncio.Protocol):
    count = 0

    def __init__(self, directory: Path) -> None:
        Recorder.count += 1
        self.path = directory / ("%d.bin" % Recorder.count)
        self.path.write_bytes(b"")

    def data_received(self, data: bytes) -> None:
        with self.path.open("ab") as out:
            out.write(data)


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = None
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert)
    if args.http:
        for address in args.bind.split(","):
            await web.TCPSite(runner, address, args.http).start()
    if args.tls:
        await web.TCPSite(runner, "127.0.0.1", args.tls, ssl_context=context).start()
    if args.tls_echo:
        await loop.create_server(Echo, "127.0.0.1", args.tls_echo, ssl=context)
    if args.hold:
        await loop.create_server(Holder, "127.0.0.1", args.hold)
    if args.record:
        directory = Path(args.record)
        await loop.create_server(lambda: Recorder(directory), "127.0.0.1", args.record_port)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int)
    parser.add_argument("--bind", default="127.0.0.1", help="addresses for --http, comma-separated")
    parser.add_argument("--tls", type=int)
    parser.add_argument("--tls-echo", type=int)
    parser.add_argument("--cert")
    parser.add_argument("--hold", type=int)
    parser.add_argument("--record")
    parser.add_argument("--record-port", type=int)
    asyncio.run(main(parser.parse_args()))
