"""Ed25519 detached signatures over feed bodies (the exact bytes sent, before inflating).

Keys are PEM files as `openssl genpkey -algorithm ed25519` writes them. A signature travels as
`ed25519 <key id> <base64>`: in the `Icpgate-Signature` header, or in `<file>.sig` next to a file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .protocol import FeedError, SyncResult

SIGNATURE_HEADER = "Icpgate-Signature"


def key_id(key: Ed25519PublicKey) -> str:
    """Eight bytes of SHA-256 over the raw public key: names a key in signatures and logs."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file."""


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise KeyFileError("%s: not a readable PEM private key: %s" % (path, error)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError("%s: not an Ed25519 key" % path)
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError, TypeError) as error:
            raise KeyFileError("%s: not a readable PEM public key: %s" % (path, error)) from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError("%s: not an Ed25519 key" % path)
        keys[key_id(key)] = key
    return keys


def sign(key: Ed25519PrivateKey, body: bytes) -> str:
    return "ed25519 %s %s" % (key_id(key.public_key()), base64.b64encode(key.sign(body)).decode())


def verify(keys: dict[str, Ed25519PublicKey], body: bytes, signature: str | None) -> str | None:
    """The id of the key that signed `body`; None when no keys are configured. Raises FeedError."""
    if not keys:
        return None
    if not signature:
        raise FeedError(SyncResult.REFUSED_SIGNATURE, "the body is not signed, and feed.public_keys requires it")
    parts = signature.split()
    if len(parts) != 3 or parts[0] != "ed25519":
        raise FeedError(SyncResult.REFUSED_SIGNATURE, "the signature is not `ed25519 <key id> <base64>`")
    key = keys.get(parts[1])
    if key is None:
        raise FeedError(SyncResult.REFUSED_SIGNATURE, "signed by key %s, which is not among feed.public_keys"
                        % parts[1])  # fmt: skip
    try:
        key.verify(base64.b64decode(parts[2], validate=True), body)
    except (InvalidSignature, binascii.Error, ValueError):
        raise FeedError(SyncResult.REFUSED_SIGNATURE, "bad signature by key %s" % parts[1]) from None
    return parts[1]
