"""Host and SNI normalisation: one canonical spelling per name, or a reason it is refused.

Everything that matches names against the registry goes through `normalize_host`, so the gate,
the importer and the CLI agree on what a name is. The common case (an ASCII name in LDH form) takes
a regex fast path; anything else goes through IDNA UTS-46 (`idna`) to A-labels.
"""

from __future__ import annotations

import ipaddress
import re
from enum import Enum
from functools import lru_cache
from typing import NamedTuple

import idna

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
# Far longer than any legal host with a port; cheap guard before any real work.
MAX_RAW_LENGTH = 1024

# Letters, digits, hyphen and underscore: DNS carries underscores and browsers send them in Host.
_ASCII_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")
_DOTTED_QUAD = re.compile(r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}")
_PORT = re.compile(r"\d{1,5}")


class HostKind(Enum):
    NAME = "name"
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    INVALID = "invalid"


class Host(NamedTuple):
    """A normalised host: `value` is the canonical spelling, or empty with `error` set."""

    kind: HostKind
    value: str
    error: str = ""


def _invalid(reason: str) -> Host:
    return Host(HostKind.INVALID, "", reason)


def normalize_host(raw: str) -> Host:
    """Normalise a Host header value, SNI or name typed by an operator.

    Lowercases, strips one trailing dot, an optional `:port` and IPv6 brackets, maps Unicode names
    to A-labels and validates lengths and characters. Whitespace is refused, not trimmed: the
    name decided on must be the name the client sent. Never raises.
    """
    if len(raw) > MAX_RAW_LENGTH:
        return _invalid("longer than %d characters" % MAX_RAW_LENGTH)
    text = raw.lower()
    if not text:
        return _invalid("empty")
    if text[0] == "[":
        return _bracketed_ipv6(text)
    colons = text.count(":")
    if colons == 1:
        text, port = text.split(":")
        if not _valid_port(port):
            return _invalid("malformed port %r" % port)
    elif colons > 1:
        # An IPv6 literal in a Host must be bracketed (RFC 3986), and an SNI holds no literal at
        # all. nginx cuts an unbracketed one at its first colon: `cafe::1` would reach vhost `cafe`.
        return _invalid("IPv6 literal without brackets")
    if text.endswith("."):
        text = text[:-1]
    if _DOTTED_QUAD.fullmatch(text):
        return Host(HostKind.IPV4, str(ipaddress.IPv4Address(text)))
    if text.isascii():
        return _ascii_name(text)
    return _unicode_name(text)


def _valid_port(port: str) -> bool:
    return bool(_PORT.fullmatch(port)) and int(port) <= 65535


def _bracketed_ipv6(text: str) -> Host:
    end = text.find("]")
    if end < 0:
        return _invalid("unclosed IPv6 bracket")
    rest = text[end + 1 :]
    if rest and not (rest[0] == ":" and _valid_port(rest[1:])):
        return _invalid("malformed port after IPv6 literal")
    return _ipv6(text[1:end])


def _ipv6(text: str) -> Host:
    if "%" in text:
        return _invalid("IPv6 zone identifiers are not hosts")
    try:
        return Host(HostKind.IPV6, ipaddress.IPv6Address(text).compressed)
    except ValueError:
        return _invalid("malformed IPv6 literal")


def _ascii_name(text: str) -> Host:
    if len(text) > MAX_NAME_LENGTH:
        return _invalid("name longer than %d characters" % MAX_NAME_LENGTH)
    if not _ASCII_NAME.fullmatch(text):
        return _invalid(_ascii_refusal(text))
    last_label = text.rsplit(".", 1)[-1]
    if last_label.isdigit():
        # Not a dotted quad, yet numeric at the top: `127.1`, `1.2.3.4.5`. No TLD is numeric.
        return _invalid("numeric top-level label (not a well-formed IPv4 address)")
    if "xn--" in text:
        return _checked_a_labels(text)
    return Host(HostKind.NAME, text)


def _ascii_refusal(text: str) -> str:
    """Say which rule an ASCII name breaks; only called once the fast path has refused it."""
    for label in text.split("."):
        if not label:
            return "empty label"
        if len(label) > MAX_LABEL_LENGTH:
            return "label longer than %d characters" % MAX_LABEL_LENGTH
        if label[0] == "-" or label[-1] == "-":
            return "label starts or ends with a hyphen"
        for char in label:
            if not (char.isalnum() or char in "-_"):
                return "character %r not allowed in a host name" % char
    return "malformed host name"


def _checked_a_labels(text: str) -> Host:
    """An A-label must decode to a valid U-label, or it is a forged `xn--` name."""
    for label in text.split("."):
        if label.startswith("xn--") and not _valid_a_label(label):
            return _invalid("invalid A-label %r" % label)
    return Host(HostKind.NAME, text)


@lru_cache(maxsize=4096)
def _valid_a_label(label: str) -> bool:
    """Decoding costs ~20 µs a label; a busy name's labels are checked once."""
    try:
        idna.decode(label)
    except (idna.IDNAError, UnicodeError, ValueError):
        return False
    return True


@lru_cache(maxsize=4096)
def _unicode_name(text: str) -> Host:
    """UTS-46 costs tens of microseconds; a busy name is mapped once."""
    try:
        encoded = idna.encode(text, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError) as error:
        return _invalid("not a valid internationalised name: %s" % error)
    # UTS-46 may map to a trailing dot (e.g. a final ideographic full stop).
    if encoded.endswith("."):
        encoded = encoded[:-1]
    return _ascii_name(encoded)


def parent_names(name: str):
    """Yield the name and each parent: `a.b.example.cn`, `b.example.cn`, `example.cn`, `cn`."""
    while True:
        yield name
        dot = name.find(".")
        if dot < 0:
            return
        name = name[dot + 1 :]
