"""Read the filings interchange format (docs/filings-format.md): NDJSON records, checked field by
field. Spreadsheets (registry/importers/spreadsheet.py) and download files
(registry/importers/miit_xml.py) are mapped onto the same records and checked here too;
registry/importers/formats.py picks the reader.

Every refusal names the line and the field, and every wrong field of a record is reported, because
operators fix these files by hand. A line cut short (a truncated file) says so, with its column.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import orjson

from ..names.hostname import HostKind, normalize_host
from ..names.suffixes import is_public_suffix
from .filings import AccessRecord, AccessStatus, Filing, FilingStatus, SubjectType
from .licence import LicenceError, is_website_licence, parse_licence

REQUIRED_FIELDS = (
    "licence", "subject_licence", "subject_name", "subject_type", "site_name",
    "status", "domains", "access", "updated_at",
)  # fmt: skip
_REQUIRED = frozenset(REQUIRED_FIELDS)
KNOWN_FIELDS = _REQUIRED | {"limit_access"}
CSV_COLUMNS = (
    "licence", "subject_licence", "subject_name", "subject_type", "site_name", "status",
    "limit_access", "domains", "access_provider", "access_status", "access_ips", "updated_at",
)  # fmt: skip
MAX_TEXT_LENGTH = 256
MAX_DOMAINS = 1000
MAX_IPS = 1000
MAX_EXTRA_DEPTH = 64  # lists and objects within an unknown field's value; json.dumps recurses and the stack is finite
TOO_DEEP = "lists and objects nested too deeply for a JSON parser: not accepted"  # json.loads's RecursionError
_CONTROL = re.compile(r"[\x00-\x1f]")  # what `char < " "` refuses, in one C call


class RecordError(ValueError):
    """A record that cannot be imported, with where it is and which field is wrong."""

    def __init__(self, line: int, field: str, message: str, source: str = "") -> None:
        super().__init__(message)
        self.line = line
        self.field = field
        self.message = message
        self.source = source

    def __reduce__(self) -> tuple:
        return RecordError, (self.line, self.field, self.message, self.source)  # across processes (importers/pool.py)

    def __str__(self) -> str:
        where = "%s:%d" % (self.source, self.line) if self.source else "line %d" % self.line
        return "%s: %s: %s" % (where, self.field or "record", self.message)


@dataclass(frozen=True, slots=True)
class ParsedFiling:
    line: int
    filing: Filing
    warnings: tuple[str, ...]


def parse_filing(record: object, line: int) -> ParsedFiling:
    """Validate one decoded record; raise RecordError naming the first wrong field."""
    if not isinstance(record, dict):
        raise RecordError(line, "", "a filing must be a JSON object")
    if not record.keys() >= _REQUIRED:
        missing = next(name for name in REQUIRED_FIELDS if name not in record)
        raise RecordError(line, missing, "required field is missing")
    warnings: list[str] = []
    licence = _website_licence(record["licence"], line, warnings)
    subject_licence = _subject_licence(record["subject_licence"], licence, line)
    filing = Filing(
        licence=licence,
        subject_licence=subject_licence,
        subject_name=_text(record, "subject_name", line),
        subject_type=_enum(SubjectType, record["subject_type"], "subject_type", line),
        site_name=_text(record, "site_name", line),
        status=_enum(FilingStatus, record["status"], "status", line),
        limit_access=_bool(record.get("limit_access", False), "limit_access", line),
        domains=_domains(record["domains"], line),
        access=_access_records(record["access"], line),
        updated_at=_timestamp(record["updated_at"], line),
        extra=_extra(record, line),
    )
    return ParsedFiling(line, filing, tuple(warnings))


def _extra(record: dict, line: int) -> dict[str, object]:
    """The unknown fields, kept as they came; most records have none, and counting says so."""
    if len(record) == len(REQUIRED_FIELDS) + ("limit_access" in record):  # every required field is there
        return {}
    extra = {k: v for k, v in record.items() if k not in KNOWN_FIELDS}
    error = _too_deep(extra, line)
    if error:
        raise error
    try:
        orjson.dumps(extra)  # refuses a lone surrogate, in a key too, in a tenth of the time walking takes
    except orjson.JSONEncodeError:  # that, or what orjson does not write: ints beyond 64 bits, deep nesting
        error = _surrogate_error(extra, "", line)
        if error:
            raise error from None
    return extra


def _too_deep(extra: dict[str, object], line: int) -> RecordError | None:
    """The first unknown field nested deeper than MAX_EXTRA_DEPTH, as the error naming it: json.loads
    reads nesting that json.dumps (the digest, the stage row), called deeper in the stack, may not
    write. Iterative."""
    stack: list[tuple[str, object, int]] = [(key, value, 0) for key, value in reversed(extra.items())]
    while stack:
        field, value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth == MAX_EXTRA_DEPTH:
                return RecordError(line, _escaped(field), "nested deeper than %d levels of lists and objects"
                                   % MAX_EXTRA_DEPTH)  # fmt: skip
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((field, item, depth + 1) for _, item in reversed(list(items)))
    return None


def _escaped(text: str) -> str:
    """Text with any lone surrogate as its `\\udXXX` escape: fit for UTF-8, the report and SQLite."""
    return text.encode("utf-8", "backslashreplace").decode()


def _surrogate_error(value: object, field: str, line: int) -> RecordError | None:
    """The first lone surrogate in `value`'s strings or keys, at any depth, as the error naming where:
    json.loads reads a `\\ud800` escape without its pair, UTF-8 (so the digest, SQLite) cannot hold
    it. Iterative: json.loads nests deeper than the stack allows."""
    stack = [(field, value)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError as error:
                return _not_unicode(line, field, error)
        elif isinstance(value, dict):
            children = []
            for key, item in value.items():
                name = "%s.%s" % (field, key) if field else str(key)
                try:
                    str(key).encode()
                except UnicodeEncodeError as error:
                    return _not_unicode(line, _escaped(name), error, "field name must be valid Unicode text")
                children.append((name, item))
            stack.extend(reversed(children))  # the first in the record is reported first
        elif isinstance(value, list):
            stack.extend(("%s[%d]" % (field, index), item) for index, item in reversed(list(enumerate(value))))
    return None


def _not_unicode(
    line: int, field: str, error: UnicodeEncodeError, rule: str = "must be valid Unicode text"
) -> RecordError:
    """Name the surrogate by its escape and position: printed as it is, it would fail as it did here."""
    code = ord(error.object[error.start])
    return RecordError(line, field, "%s (a lone surrogate \\u%04x at character %d)" % (rule, code, error.start + 1))


def record_errors(record: dict, line: int) -> list[RecordError]:
    """Every wrong field of a record, not only the first: for spreadsheets, fixed by hand in one go."""
    errors = [RecordError(line, name, "required field is missing") for name in REQUIRED_FIELDS if name not in record]
    checks = {
        "licence": lambda: _website_licence(record["licence"], line, []),
        "subject_name": lambda: _text(record, "subject_name", line),
        "subject_type": lambda: _enum(SubjectType, record["subject_type"], "subject_type", line),
        "site_name": lambda: _text(record, "site_name", line),
        "status": lambda: _enum(FilingStatus, record["status"], "status", line),
        "limit_access": lambda: _bool(record["limit_access"], "limit_access", line),
        "domains": lambda: _domains(record["domains"], line),
        "updated_at": lambda: _timestamp(record["updated_at"], line),
    }
    for name, check in checks.items():
        if name in record:
            try:
                check()
            except RecordError as error:
                errors.append(error)
    unknown = _surrogate_error({k: v for k, v in record.items() if k not in KNOWN_FIELDS}, "", line)
    if unknown:
        errors.append(unknown)
    errors.extend(_access_errors(record.get("access", []), line))
    if "subject_licence" in record and "licence" in record:
        try:
            _subject_licence(record["subject_licence"], _website_licence(record["licence"], line, []), line)
        except RecordError as error:
            if error.field == "subject_licence":
                errors.append(error)
    return errors


def _access_errors(value: object, line: int) -> list[RecordError]:
    """The access records' errors, the status and the addresses of each checked apart."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        try:
            _access_records(value, line)
        except RecordError as error:
            return [error]
        return []
    errors = []
    for index, item in enumerate(value):
        for probe in ({**item, "ips": []}, {**item, "provider": "-", "status": AccessStatus.ACTIVE.value}):
            try:
                _access_records([probe], line)
            except RecordError as error:
                error.field = error.field.replace("access[0]", "access[%d]" % index, 1)
                errors.append(error)
    return errors


def shown(value: object) -> str:
    """A value of any type, for a message: a list or an object by its kind, since its repr recurses as
    deep as json.loads nests (past the stack) and is as long as the line."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def _website_licence(value: object, line: int, warnings: list[str]) -> str:
    if not isinstance(value, str):
        raise RecordError(line, "licence", "must be a string")
    try:
        parsed = parse_licence(value)
    except LicenceError as error:
        raise RecordError(line, "licence", str(error)) from None
    if not is_website_licence(parsed):
        raise RecordError(line, "licence", "must be a website filing number (…号-N), got %r" % value)
    warnings.extend("licence: %s" % w for w in parsed.warnings)
    return parsed.normalized


def _subject_licence(value: object, website_licence: str, line: int) -> str:
    if not isinstance(value, str):
        raise RecordError(line, "subject_licence", "must be a string")
    expected = website_licence.rsplit("-", 1)[0]
    if value == expected:  # the usual case, and a normal form parses back to itself: no second parse
        return value
    try:
        parsed = parse_licence(value)
    except LicenceError as error:
        raise RecordError(line, "subject_licence", str(error)) from None
    if parsed.normalized != expected:
        raise RecordError(line, "subject_licence", "%r is not the subject of %r" % (value, website_licence))
    return parsed.normalized


def _text(record: dict, name: str, line: int) -> str:
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise RecordError(line, name, "must be a non-empty string")
    if len(value) > MAX_TEXT_LENGTH:
        raise RecordError(line, name, "longer than %d characters" % MAX_TEXT_LENGTH)
    try:
        value.encode()  # the cheapest test for a lone surrogate: a few tens of ns
    except UnicodeEncodeError as error:
        raise _not_unicode(line, name, error) from None
    return value.strip()


def _enum(kind, value: object, field: str, line: int):
    if isinstance(value, str):  # not a list: Enum's own error would repr it, as deep as it nests
        try:
            return kind(value)
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in kind)
    raise RecordError(line, field, "%s is not one of: %s" % (shown(value), allowed))


def _bool(value: object, name: str, line: int) -> bool:
    if not isinstance(value, bool):
        raise RecordError(line, name, "must be true or false")
    return value


def _domains(value: object, line: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise RecordError(line, "domains", "must be a non-empty list of domain names")
    if len(value) > MAX_DOMAINS:
        raise RecordError(line, "domains", "more than %d domains" % MAX_DOMAINS)
    names: dict[str, None] = {}
    for index, raw in enumerate(value):
        field = "domains[%d]" % index
        if not isinstance(raw, str):
            raise RecordError(line, field, "must be a string")
        host = normalize_host(raw)
        if host.kind is HostKind.INVALID:
            raise RecordError(line, field, "%r: %s" % (raw, host.error))
        if host.kind is not HostKind.NAME:
            raise RecordError(line, field, "%r is an IP address, not a domain" % raw)
        if ":" in raw:
            raise RecordError(line, field, "%r: a filed domain has no port" % raw)
        if is_public_suffix(host.value):
            raise RecordError(
                line, field, "%r is a public suffix; a filing for it would cover every domain below it" % raw
            )
        names[host.value] = None
    return tuple(names)


def _access_records(value: object, line: int) -> tuple[AccessRecord, ...]:
    if not isinstance(value, list):
        raise RecordError(line, "access", "must be a list of access records")
    records = []
    for index, item in enumerate(value):
        field = "access[%d]" % index
        if not isinstance(item, dict):
            raise RecordError(line, field, "must be an object")
        provider = item.get("provider")
        if not isinstance(provider, str) or not provider.strip():
            raise RecordError(line, field + ".provider", "must be a non-empty string")
        if _CONTROL.search(provider):
            raise RecordError(line, field + ".provider", "must not contain control characters")
        try:
            provider.encode()
        except UnicodeEncodeError as error:
            raise _not_unicode(line, field + ".provider", error) from None
        status = _enum(AccessStatus, item.get("status"), field + ".status", line)
        ips = _networks(item.get("ips", []), line, field + ".ips")
        records.append(AccessRecord(provider.strip(), status, ips))
    return tuple(records)


def _networks(value: object, line: int, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_IPS:
        raise RecordError(line, field, "must be a list of at most %d addresses or CIDR ranges" % MAX_IPS)
    networks = []
    for index, raw in enumerate(value):
        try:
            networks.append(_canonical_network(raw))
        except (TypeError, ValueError) as error:
            raise RecordError(line, "%s[%d]" % (field, index), "%s: %s" % (shown(raw), error)) from None
    return tuple(networks)


@lru_cache(maxsize=65536)
def _canonical_network(raw: str) -> str:
    """A provider's few ranges repeat across all its filings: parse each spelling once."""
    return str(ipaddress.ip_network(raw, strict=True))


def _timestamp(value: object, line: int) -> str:
    if not isinstance(value, str):
        raise RecordError(line, "updated_at", "must be an RFC 3339 timestamp string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise RecordError(line, "updated_at", "%r is not an RFC 3339 timestamp" % value) from None
    if moment.tzinfo is None:
        raise RecordError(line, "updated_at", "%r has no time zone" % value)
    try:
        value.encode()  # fromisoformat takes any character between date and time, a lone surrogate too
    except UnicodeEncodeError as error:
        raise _not_unicode(line, "updated_at", error) from None
    return value


def read_ndjson(lines: Iterable[str], first: int = 1) -> Iterator[ParsedFiling | RecordError]:
    """Yield each record of NDJSON text, parsed, or every error that refuses it; `first` is the
    number of the first line."""
    for line, text in enumerate(lines, start=first):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except (ValueError, RecursionError) as error:
            yield json_error(error, text, line)
            continue
        try:
            yield parse_filing(record, line)
        except RecordError as error:
            yield from (record_errors(record, line) if isinstance(record, dict) else ()) or (error,)


# What is left of a line where the JSON parser stopped, when the line was cut inside a value: part
# of a literal or of a number's sign, fraction or exponent; or (after a bad escape) of a \u escape.
_CUT_VALUE = re.compile(r"t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?|-|\.|[eE][+-]?")
_CUT_ESCAPE = re.compile(r"u[0-9a-fA-F]{0,3}")


def json_error(error: ValueError | RecursionError, text: str, line: int) -> RecordError:
    """The error of a line that json.loads refuses; a line that ends inside a value is truncated.
    Beside syntax, json.loads refuses nesting deeper than the stack (RecursionError) and integers of
    more than 4300 digits (ValueError): malformed lines all the same, never a traceback."""
    if isinstance(error, RecursionError):
        return RecordError(line, "", TOO_DEEP)
    if not isinstance(error, json.JSONDecodeError):
        return RecordError(line, "", "not accepted as JSON: %s" % error)
    body = text.rstrip("\r\n")
    rest = body[error.pos :].strip()
    unterminated = error.msg.startswith("Unterminated string")
    escape = error.msg.startswith("Invalid \\uXXXX escape")
    if unterminated or not rest or (_CUT_ESCAPE if escape else _CUT_VALUE).fullmatch(rest):
        inside = ("a string that starts at column %d" % error.colno if unterminated
                  else "a JSON value (%s at column %d)" % (error.msg, error.colno))  # fmt: skip
        return RecordError(line, "", "truncated: the line ends at column %d, inside %s" % (len(body) + 1, inside))
    return RecordError(line, "", "not valid JSON at column %d: %s" % (error.colno, error.msg))
