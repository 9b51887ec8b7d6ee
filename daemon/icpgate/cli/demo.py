"""`make run`: the gate on the example config, with a tiny origin behind it.

The origin answers every request with the host it was asked for, over HTTP on 127.0.0.1:9080
and over TLS on 127.0.0.1:9443 with certificates issued per SNI from a demo CA (mitmproxy's
certificate store, in var/demo/). The gate decides what reaches it.

A demo DNS server on 127.0.0.1:9053 answers the gate's DNS confirmation, so the demo asks nothing
of the outside world: every name resolves to 127.0.0.1 (hosted here: confirmed), except `scan.*`
(198.51.100.7: not hosted) and `nx.*` (NXDOMAIN).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import ssl
import sys
import tempfile
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.certs import CertStore

from ..config.settings import load_config

ORIGIN_HTTP = ("127.0.0.1", 9080)
ORIGIN_TLS = ("127.0.0.1", 9443)
DEMO_DNS = ("127.0.0.1", 9053)


def demo_ca(directory: Path) -> CertStore:
    """The demo CA (created on first use): `curl --cacert var/demo/icpgate-ca-cert.pem`."""
    directory.mkdir(parents=True, exist_ok=True)
    return CertStore.from_store(directory, "icpgate", 2048)


def _origin_tls_context(store: CertStore, scratch: Path) -> ssl.SSLContext:
    """A server context that issues a certificate for whatever SNI the client sends."""
    contexts: dict[str, ssl.SSLContext] = {}

    def for_name(name: str) -> ssl.SSLContext:
        if name not in contexts:
            entry = store.get_cert(name, [x509.DNSName(name)])
            key = entry.privatekey.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            path = scratch / ("%d.pem" % len(contexts))
            path.write_bytes(entry.cert.to_pem() + key)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(path)
            context.set_alpn_protocols(["http/1.1"])
            contexts[name] = context
        return contexts[name]

    def choose(sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        if name:
            sock.context = for_name(name)

    main = for_name("localhost")
    main.sni_callback = choose
    return main


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello from %s: served by the demo origin behind icpgate\n" % request.host)


class _DemoResolver(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, address: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        answer = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        if name.startswith("nx."):
            answer.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            address_text = "198.51.100.7" if name.startswith("scan.") else "127.0.0.1"
            answer.answer.append(dns.rrset.from_text(question.name, 300, "IN", "A", address_text))
        self.transport.sendto(answer.to_wire(), address)


async def _serve_origin(ca_dir: Path) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with tempfile.TemporaryDirectory(prefix="icpgate-demo-") as scratch:
        context = _origin_tls_context(demo_ca(ca_dir), Path(scratch))
        await web.TCPSite(runner, *ORIGIN_HTTP).start()
        await web.TCPSite(runner, *ORIGIN_TLS, ssl_context=context).start()
        await asyncio.get_running_loop().create_datagram_endpoint(_DemoResolver, local_addr=DEMO_DNS)
        print("demo origin on http://%s:%d and https://%s:%d" % (*ORIGIN_HTTP, *ORIGIN_TLS), file=sys.stderr)
        await asyncio.Event().wait()


def run_origin(ca_dir: Path) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_origin(ca_dir))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m icpgate.cli.demo")
    parser.add_argument("-c", "--config", type=Path, required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    ca_dir = config.registry_path.parent / "demo"
    demo_ca(ca_dir)
    origin = multiprocessing.get_context("spawn").Process(target=run_origin, args=(ca_dir,), daemon=True)
    origin.start()
    from .main import main as icpgate

    try:
        return icpgate(["run", "-c", str(args.config), "--set", 'dns.resolvers = ["%s:%d"]' % DEMO_DNS])
    finally:
        origin.terminate()
        origin.join(5)


if __name__ == "__main__":
    sys.exit(main())
