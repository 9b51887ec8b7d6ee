"""A minimal TLS 1.3 client that forces a HelloRetryRequest and may change its SNI in between.

Real stacks never change the name between their two ClientHellos, so tests that check what a
gate or a server does when a client does need this one. It speaks just enough TLS 1.3
(RFC 8446) to read the server's certificate and stops there: no certificate check, no Finished.

API (other test suites import it):

    retry_handshake(host, port, first_sni, second_sni, timeout=10.0) -> RetryResult

connects to host:port and sends ClientHello #1 with `first_sni` (None: no server_name) and an
EMPTY key_share, so any TLS 1.3 server must answer with a HelloRetryRequest; reads it; sends
ClientHello #2 with `second_sni`, an X25519 key share and the HRR's cookie if it carried one; and
then, if the server answers with a ServerHello, derives the handshake keys and decrypts the
server's flight up to its Certificate message.

`RetryResult` fields:
    outcome: "certificate"  the server sent its certificate after the second hello (see certificate_der)
             "reset"        the connection was reset (a gate blocking it)
             "closed"       the peer closed the connection (EOF) before a certificate came
             "alert"        the server sent a TLS alert (see `alert`)
             "no_retry"     the server answered the first hello with a ServerHello, not a HelloRetryRequest
             "second_retry" the server answered the second hello with another HelloRetryRequest
             "timeout"      nothing came for `timeout` seconds
    certificate_der: the DER of the server's end-entity certificate, when outcome is "certificate"
    retried: whether a HelloRetryRequest was received (outcomes after it say what became of hello #2)
    cookie: whether the HelloRetryRequest carried a cookie (echoed in hello #2)
    alert: the alert description (e.g. 112 unrecognized_name), when outcome is "alert"

`client_hello(sni, key_share, cookie=b"", random=..., session_id=...)` builds one ClientHello
record on its own, for tests that drive the bytes themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

HRR_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()
X25519 = 0x001D
AES_128_GCM_SHA256 = 0x1301
CHACHA20_POLY1305_SHA256 = 0x1303
SUITES = {AES_128_GCM_SHA256: AESGCM, CHACHA20_POLY1305_SHA256: ChaCha20Poly1305}
# ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256/384/512, rsa_pkcs1_sha256/384, ed25519
SIGNATURE_SCHEMES = (0x0403, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0807)
EXT_SERVER_NAME, EXT_GROUPS, EXT_SIGNATURES = 0x0000, 0x000A, 0x000D
EXT_SUPPORTED_VERSIONS, EXT_COOKIE, EXT_KEY_SHARE = 0x002B, 0x002C, 0x0033
HANDSHAKE, ALERT, CHANGE_CIPHER_SPEC, APPLICATION_DATA = 0x16, 0x15, 0x14, 0x17
SERVER_HELLO, ENCRYPTED_EXTENSIONS, CERTIFICATE, MESSAGE_HASH = 0x02, 0x08, 0x0B, 0xFE


@dataclass
class RetryResult:
    outcome: str
    certificate_der: bytes | None = None
    retried: bool = False
    cookie: bool = False
    alert: int | None = None


class _Ended(Exception):
    def __init__(self, outcome: str, alert: int | None = None) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.alert = alert


def _vector(data: bytes, length_bytes: int) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!H", kind) + _vector(data, 2)


def client_hello(
    sni: str | None,
    key_share: bytes | None,
    cookie: bytes = b"",
    random: bytes = b"\x00" * 32,
    session_id: bytes = b"\x00" * 32,
) -> bytes:
    """One ClientHello handshake message (not framed): TLS 1.3 only, X25519 only; `key_share`
    is the X25519 public key, or None for an empty key_share (which forces a retry request)."""
    extensions = []
    if sni is not None:
        extensions.append(_extension(EXT_SERVER_NAME, _vector(b"\x00" + _vector(sni.encode(), 2), 2)))
    extensions += [
        _extension(EXT_SUPPORTED_VERSIONS, _vector(b"\x03\x04", 1)),
        _extension(EXT_GROUPS, _vector(struct.pack("!H", X25519), 2)),
        _extension(EXT_SIGNATURES, _vector(b"".join(struct.pack("!H", s) for s in SIGNATURE_SCHEMES), 2)),
        _extension(EXT_KEY_SHARE, _vector(struct.pack("!H", X25519) + _vector(key_share, 2) if key_share else b"", 2)),
    ]
    if cookie:
        extensions.append(_extension(EXT_COOKIE, _vector(cookie, 2)))
    body = (
        b"\x03\x03"
        + random
        + _vector(session_id, 1)
        + _vector(b"".join(struct.pack("!H", s) for s in SUITES), 2)
        + b"\x01\x00"
        + _vector(b"".join(extensions), 2)
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def _record(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BHH", kind, 0x0301 if kind == HANDSHAKE else 0x0303, len(payload)) + payload


class _Records:
    """Reads TLS records and the handshake messages in them from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.handshake = b""  # plaintext handshake bytes not yet returned as messages
        self.decrypt = None  # set once the handshake keys are known

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                raise _Ended("reset") from None
            except TimeoutError:
                raise _Ended("timeout") from None
            if not chunk:
                raise _Ended("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def record(self) -> tuple[int, bytes]:
        header = self._read(5)
        kind, _, length = struct.unpack("!BHH", header)
        payload = self._read(length)
        if kind == APPLICATION_DATA and self.decrypt is not None:
            plain = self.decrypt(header, payload).rstrip(b"\x00")
            kind, payload = plain[-1], plain[:-1]
        if kind == ALERT:
            raise _Ended("alert", payload[1] if len(payload) > 1 else None)
        return kind, payload

    def message(self) -> bytes:
        """The next handshake message, whole (type and length included); CCS records are skipped."""
        while True:
            if len(self.handshake) >= 4:
                size = 4 + int.from_bytes(self.handshake[1:4], "big")
                if len(self.handshake) >= size:
                    message, self.handshake = self.handshake[:size], self.handshake[size:]
                    return message
            kind, payload = self.record()
            if kind == HANDSHAKE:
                self.handshake += payload
            elif kind != CHANGE_CIPHER_SPEC:
                raise _Ended("closed")  # unexpected record: treat as the end of what we can read


def _extensions(data: bytes) -> dict[int, bytes]:
    found, offset = {}, 0
    while offset + 4 <= len(data):
        kind, length = struct.unpack_from("!HH", data, offset)
        found[kind] = data[offset + 4 : offset + 4 + length]
        offset += 4 + length
    return found


def _server_hello(message: bytes) -> tuple[bytes, int, dict[int, bytes]]:
    """(random, cipher suite, extensions) of a ServerHello or HelloRetryRequest message."""
    body = message[4:]
    random = body[2:34]
    offset = 35 + body[34]  # after the echoed session id
    suite = struct.unpack_from("!H", body, offset)[0]
    offset += 3  # suite and compression method
    return random, suite, _extensions(body[offset + 2 :])


def _expand_label(secret: bytes, label: str, context: bytes, length: int) -> bytes:
    info = struct.pack("!H", length) + _vector(b"tls13 " + label.encode(), 1) + _vector(context, 1)
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def _extract(salt: bytes, key: bytes) -> bytes:
    return hmac.new(salt, key, hashlib.sha256).digest()


def _handshake_decryptor(shared: bytes, transcript: bytes, suite: int):
    """The server's handshake traffic decryption, from the ECDHE secret and the transcript to ServerHello."""
    zeros = b"\x00" * 32
    early = _extract(zeros, zeros)
    derived = _expand_label(early, "derived", hashlib.sha256(b"").digest(), 32)
    handshake_secret = _extract(derived, shared)
    traffic = _expand_label(handshake_secret, "s hs traffic", hashlib.sha256(transcript).digest(), 32)
    cipher = SUITES[suite]
    key = _expand_label(traffic, "key", b"", 32 if cipher is ChaCha20Poly1305 else 16)
    iv = _expand_label(traffic, "iv", b"", 12)
    aead = cipher(key)
    sequence = 0

    def decrypt(header: bytes, payload: bytes) -> bytes:
        nonlocal sequence
        nonce = bytes(a ^ b for a, b in zip(iv, sequence.to_bytes(12, "big"), strict=True))
        sequence += 1
        return aead.decrypt(nonce, payload, header)

    return decrypt


def _first_certificate(message: bytes) -> bytes:
    body = message[4:]
    offset = 1 + body[0]  # certificate_request_context
    offset += 3  # certificate_list length
    length = int.from_bytes(body[offset : offset + 3], "big")
    return body[offset + 3 : offset + 3 + length]


def retry_handshake(
    host: str, port: int, first_sni: str | None, second_sni: str | None, timeout: float = 10.0
) -> RetryResult:
    """Hello #1 (first_sni, empty key_share), the server's HelloRetryRequest, hello #2 (second_sni):
    what came of it. See the module docstring."""
    random, session_id = os.urandom(32), os.urandom(32)
    result = RetryResult("closed")
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        records = _Records(sock)
        try:
            first = client_hello(first_sni, None, random=random, session_id=session_id)
            sock.sendall(_record(HANDSHAKE, first))
            retry = records.message()
            if retry[0] != SERVER_HELLO or _server_hello(retry)[0] != HRR_RANDOM:
                return RetryResult("no_retry")
            extensions = _server_hello(retry)[2]
            result.retried = True
            cookie = extensions.get(EXT_COOKIE, b"")[2:]
            result.cookie = bool(cookie)
            key = X25519PrivateKey.generate()
            public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            second = client_hello(second_sni, public, cookie, random=random, session_id=session_id)
            try:
                sock.sendall(_record(CHANGE_CIPHER_SPEC, b"\x01") + _record(HANDSHAKE, second))
            except (BrokenPipeError, ConnectionResetError):
                raise _Ended("reset") from None
            server_hello = records.message()
            answer_random, suite, extensions = _server_hello(server_hello)
            if answer_random == HRR_RANDOM:
                return RetryResult("second_retry", retried=True, cookie=result.cookie)
            share = extensions[EXT_KEY_SHARE]
            server_key = X25519PublicKey.from_public_bytes(share[4 : 4 + int.from_bytes(share[2:4], "big")])
            # RFC 8446 4.4.1: after a retry request the first hello enters the transcript as its hash.
            synthetic = bytes([MESSAGE_HASH, 0, 0, 32]) + hashlib.sha256(first).digest()
            transcript = synthetic + retry + second + server_hello
            records.decrypt = _handshake_decryptor(key.exchange(server_key), transcript, suite)
            while True:
                message = records.message()
                if message[0] == CERTIFICATE:
                    result.outcome = "certificate"
                    result.certificate_der = _first_certificate(message)
                    return result
        except _Ended as ended:
            result.outcome, result.alert = ended.outcome, ended.alert
            return result
