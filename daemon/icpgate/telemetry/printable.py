"""Client-supplied text made safe to write where people and parsers read lines and fields.

A server name or Host header the gate refused may hold anything a client could put there: CR and LF
that start a forged log line, a space that starts a forged `key=value` field, an escape sequence
for the operator's terminal, a right-to-left override that reorders what is shown. Every surface
that writes such text (the logs, the violation log and its exports, the status page) passes it
through here first.

Each character `str.isprintable` refuses (controls, separators other than the space, format
characters, unassigned code points) becomes `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN`; `printable_name`
escapes the space too, as no name holds one. Printable text, Chinese included, is left as it is.
Escaping twice changes nothing more than escaping once, so layers may each escape.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with every non-printable character escaped; a line of it stays one line."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def printable_name(name: str) -> str:
    """A host or server name for a log field or a table cell: `printable`, and spaces escaped too."""
    if name.isprintable() and " " not in name:
        return name
    return "".join(char if char.isprintable() and char != " " else _escape(char) for char in name)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return "\\x%02x" % code
    if code <= 0xFFFF:
        return "\\u%04x" % code
    return "\\U%08x" % code
