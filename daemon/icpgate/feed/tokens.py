"""Bearer tokens between the publisher and its edges.

The publisher's tokens file holds one edge a line, `name token`, with `#` comments and blank lines
ignored; names appear in the publisher's log, tokens never do. An edge's token file holds its
token alone. A token is 32 to 512 characters of the RFC 6750 token alphabet
(`openssl rand -hex 32` makes a good one).
"""

from __future__ import annotations

import hmac
import re
from pathlib import Path

_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]{32,512}=*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file (and line), never a token."""


def read_token(path: Path) -> str:
    """An edge's token: the file's one non-empty line."""
    lines = [line.strip() for line in _read(path).splitlines() if line.strip()]
    if len(lines) != 1:
        raise TokenFileError("%s: expected the token alone on one line, found %d lines" % (path, len(lines)))
    if not _TOKEN.fullmatch(lines[0]):
        raise TokenFileError("%s: not a token: 32 to 512 characters of A-Z a-z 0-9 - . _ ~ + / (then = padding)"
                             % path)  # fmt: skip
    return lines[0]


def load_tokens(path: Path) -> dict[str, str]:
    """The publisher's tokens file as {name: token}; every problem is refused with its line."""
    tokens: dict[str, str] = {}
    seen: dict[str, int] = {}
    for number, raw in enumerate(_read(path).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = "%s:%d" % (path, number)
        if len(parts) != 2:
            raise TokenFileError("%s: expected `name token`, found %d fields" % (where, len(parts)))
        name, token = parts
        if not _NAME.fullmatch(name):
            raise TokenFileError("%s: %r is not a name (letters, digits, . _ -, at most 64)" % (where, name))
        if not _TOKEN.fullmatch(token):
            raise TokenFileError("%s: the token for %s is not 32 to 512 characters of A-Z a-z 0-9 - . _ ~ + /"
                                 % (where, name))  # fmt: skip
        if name in tokens:
            raise TokenFileError("%s: name %s is already at line %d" % (where, name, seen[name]))
        if token in tokens.values():
            raise TokenFileError("%s: the token for %s is also another edge's: give each edge its own"
                                 % (where, name))  # fmt: skip
        tokens[name], seen[name] = token, number
    if not tokens:
        raise TokenFileError("%s: no tokens: every edge would be refused" % path)
    return tokens


def authorise(tokens: dict[str, str], header: str | None) -> str | None:
    """The name of the edge whose token `header` (`Bearer <token>`) carries, or None.

    Every token is compared, in constant time, whatever matches: the time taken says nothing
    about which token, or how much of one, was right.
    """
    scheme, _, presented = (header or "").partition(" ")
    candidate = presented.strip().encode() if scheme.lower() == "bearer" else b""
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(candidate, token.encode()) and candidate:
            found = name
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenFileError("%s: cannot read: %s" % (path, getattr(error, "strerror", None) or error)) from None
