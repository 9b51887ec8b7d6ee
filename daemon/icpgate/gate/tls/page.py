"""The TLS block action "page": terminate TLS ourselves and serve the block page over HTTP/1.1.

Only blocked connections get here; allowed TLS is never terminated. The certificate is the
operator's own (`gate.tls_certificate`/`tls_key`), or one issued per SNI from an operator CA
through mitmproxy's certificate store (`gate.tls_ca_dir`), so browsers that trust that CA show
the page instead of a certificate error.
"""

from __future__ import annotations

import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ...config.settings import GateConfig
from ...config.tomlschema import ConfigError, Problem
from ..http.inspector import Head, HttpInspector, Invalid

CONTEXT_CACHE = 1024
READ_SIZE = 65536


class TlsBlockPages:
    """SSL contexts for the TLS block page, one per SNI when issuing from a CA."""

    def __init__(self, gate: GateConfig) -> None:
        self._default: ssl.SSLContext | None = None
        self._store = None
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._tmp = tempfile.TemporaryDirectory(prefix="icpgate-certs-")
        if gate.tls_ca_dir is not None:
            from mitmproxy.certs import CertStore

            self._store = CertStore.from_store(gate.tls_ca_dir, "icpgate", 2048)
        elif gate.tls_certificate is not None and gate.tls_key is not None:
            self._default = _context(lambda ctx: ctx.load_cert_chain(gate.tls_certificate, gate.tls_key))
        else:
            message = 'tls_action = "page" needs gate.tls_certificate and gate.tls_key, or gate.tls_ca_dir'
            raise ConfigError([Problem("config", "gate.tls_certificate", None, message)])

    def context_for(self, sni: str | None) -> ssl.SSLContext:
        if self._store is None:
            return self._default  # type: ignore[return-value]
        name = sni or "icpgate.invalid"
        context = self._contexts.get(name)
        if context is not None:
            self._contexts.move_to_end(name)
            return context
        entry = self._store.get_cert(name, [x509.DNSName(name)])
        path = Path(self._tmp.name) / ("%d.pem" % len(self._contexts))
        key = entry.privatekey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.write_bytes(entry.cert.to_pem() + key)
        context = _context(lambda ctx: ctx.load_cert_chain(path))
        path.unlink()
        self._contexts[name] = context
        if len(self._contexts) > CONTEXT_CACHE:
            self._contexts.popitem(last=False)
        return context


def _context(load: Callable[[ssl.SSLContext], None]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # the page is HTTP/1.1, whatever the client prefers
    load(context)
    return context


class TlsPageSession:
    """TLS over memory BIOs, fed the already-read ClientHello, answering one request with the page."""

    def __init__(self, context: ssl.SSLContext, write: Callable[[bytes], None], max_header_size: int) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._write = write
        self._handshaken = False
        self._inspector = HttpInspector(max_header_size)
        self.finished = False

    def feed(self, data: bytes, answer: Callable[[Head | None], bytes]) -> None:
        """Feed client bytes; `answer` turns the request head (None if unreadable) into the response."""
        self._incoming.write(data)
        try:
            if not self._handshaken:
                self._tls.do_handshake()
                self._handshaken = True
            plaintext = self._read_available()
        except ssl.SSLWantReadError:  # the handshake needs more bytes
            self._flush()
            return
        except (ssl.SSLError, ValueError):  # includes the client's close_notify
            self._flush()
            self.finished = True
            return
        for event in self._inspector.feed(plaintext) if plaintext else ():
            if isinstance(event, Head | Invalid):
                self._tls.write(answer(event if isinstance(event, Head) else None))
                self.finished = True
                break
        self._flush()

    def _read_available(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                return b"".join(chunks)
            if not chunk:  # closed
                return b"".join(chunks)
            chunks.append(chunk)

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._write(pending)
