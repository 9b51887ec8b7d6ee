"""TOML files checked against a small schema, every problem reported with file, key and line.

Used by the daemon config and by policy packs. tomllib gives no positions for keys, so `locate`
finds the line of a dotted key by following table headers; good enough to point an operator at
the right line, which is all it is for.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED = object()


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    key: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = "%s:%d" % (self.file, self.line) if self.line else self.file
        return "%s: %s: %s" % (where, self.key or "(file)", self.message)


class ConfigError(Exception):
    """One or more problems in a TOML file; the file is refused whole."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Field:
    """A key: its TOML types, its default (REQUIRED when it has none) and an optional check.

    `check` returns an error message, or None when the value is fine.
    """

    types: tuple[type, ...]
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None


@dataclass(frozen=True, slots=True)
class TableList:
    """An array of tables (`[[listeners]]` or `listeners = [{...}]`), each checked against `spec`."""

    spec: Mapping[str, Any]
    default: Any = ()


Spec = Mapping[str, "Field | TableList | Spec"]
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def validate(data: Mapping[str, Any], spec: Spec, prefix: str = "") -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Check `data` against `spec`; return the values with defaults filled in, and (key, message) errors."""
    values: dict[str, Any] = {}
    errors: list[tuple[str, str]] = []
    for name in data:
        if name not in spec:
            errors.append((prefix + name, "unknown key"))
    for name, rule in spec.items():
        key = prefix + name
        present = name in data
        value = data.get(name)
        if isinstance(rule, TableList):
            values[name], sub_errors = _validate_table_list(value if present else list(rule.default), rule, key)
            errors.extend(sub_errors)
        elif isinstance(rule, Field):
            if not present:
                if rule.default is REQUIRED:
                    errors.append((key, "required key is missing"))
                values[name] = None if rule.default is REQUIRED else rule.default
                continue
            message = _type_error(value, rule.types) or (rule.check(value) if rule.check else None)
            if message:
                errors.append((key, message))
            values[name] = value
        else:
            if present and not isinstance(value, dict):
                errors.append((key, "must be a table"))
                value = {}
            values[name], sub_errors = validate(value or {}, rule, key + ".")
            errors.extend(sub_errors)
    return values, errors


def _validate_table_list(value: Any, rule: TableList, key: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    if not isinstance(value, list):
        return [], [(key, "must be a list of tables")]
    items, errors = [], []
    for number, item in enumerate(value):
        item_key = "%s[%d]" % (key, number)
        if not isinstance(item, dict):
            errors.append((item_key, "must be a table"))
            continue
        checked, sub_errors = validate(item, rule.spec, item_key + ".")
        items.append(checked)
        errors.extend(sub_errors)
    return items, errors


def _type_error(value: Any, types: tuple[type, ...]) -> str | None:
    # bool is an int in Python; in TOML they are different types.
    if isinstance(value, bool) and bool not in types:
        return "must be %s" % " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
    if not isinstance(value, types):
        return "must be %s" % " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
    return None


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse a TOML file; a syntax error becomes a ConfigError with its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([Problem(str(path), "", None, "cannot read: %s" % error)]) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as error:
        match = re.search(r"at line (\d+)", str(error))
        raise ConfigError([Problem(str(path), "", int(match[1]) if match else None, str(error))]) from None


def problems_for(path: Path, text: str, errors: list[tuple[str, str]]) -> list[Problem]:
    return [Problem(str(path), key, locate(text, key), message) for key, message in errors]


_HEADER = re.compile(r"\s*\[(\[)?\s*([^\]\s]+)\s*\]")
_KEY = re.compile(r"\s*([A-Za-z0-9_\-.\"']+)\s*=")


def locate(text: str, dotted_key: str) -> int | None:
    """The line where `dotted_key` (e.g. `provider.id`, `listeners[1].port`) is set, or its nearest parent."""
    lines = _key_lines(text)
    key = dotted_key
    while key:
        if key in lines:
            return lines[key]
        key = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", key) if re.search(r"(\.|\[)", key) else ""
    return None


def _key_lines(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    table = ""
    counts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        header = _HEADER.match(line)
        if header:
            name = header[2].replace('"', "")
            if header[1]:
                counts[name] = counts.get(name, -1) + 1
                table = "%s[%d]" % (name, counts[name])
            else:
                table = name
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            full = (table + "." if table else "") + key[1].replace('"', "").replace("'", "")
            lines.setdefault(full, number)
    return lines


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply `--set KEY=VALUE`: a dotted key and a TOML value (`'registry.path="/tmp/r.db"'`)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", key):
        raise ConfigError([Problem("--set", assignment, None, "expected KEY=VALUE with a dotted key")])
    try:
        value = tomllib.loads("value = " + raw)["value"]
    except tomllib.TOMLDecodeError as error:
        message = "value is not TOML (strings need quotes: %s='\"text\"'): %s" % (key, error)
        raise ConfigError([Problem("--set", key, None, message)]) from None
    *parents, last = key.split(".")
    table = data
    for part in parents:
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([Problem("--set", key, None, "%s is not a table" % part)])
        table = child
    table[last] = value
