"""The block page and its JSON twin: which domain, why, what to do, who to call, which request.

Templates and per-reason texts come from the policy pack (policies/templates/). They are read
and checked once, at start and on reload; rendering is a string substitution.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import re
import secrets
import string
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from json.encoder import encode_basestring as json_string
from pathlib import Path
from typing import ClassVar

from ..config.display_time import BEIJING, zone_label
from ..config.tomlschema import ConfigError, Problem
from ..policy.decide import Reason, Verdict
from ..policy.pack import BlockSettings

MESSAGE_KEYS = ("title_zh", "title_en", "why_zh", "why_en", "todo_zh", "todo_en")
# Fields that differ per request; everything else in a page is filled in once, when it is loaded.
_PER_REQUEST = re.compile(r"\$\{?(domain|licence|request_id|time)\b\}?")
STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 451: "Unavailable For Legal Reasons", 502: "Bad Gateway",
               503: "Service Unavailable"}  # fmt: skip
# What the rendered block responses of one pack may hold before they are forgotten and rendered again.
RESPONSE_CACHE_BYTES = 4 << 20
# Reasons a block can carry; `filed`, `exempt` and `not_enforced` never block.
BLOCK_REASONS = tuple(r for r in Reason if r not in (Reason.FILED, Reason.EXEMPT, Reason.NOT_ENFORCED))


_request_prefix = ""
_request_counter = itertools.count(1)


def _new_request_prefix() -> None:
    """Per process, and again in each forked worker: ids from different workers never collide."""
    global _request_prefix, _request_counter
    _request_prefix = secrets.token_hex(4)
    _request_counter = itertools.count(1)


_new_request_prefix()
os.register_at_fork(after_in_child=_new_request_prefix)


def new_request_id() -> str:
    """Short enough to read off a screenshot, unique enough to find one request in the logs."""
    return "%s%08x" % (_request_prefix, next(_request_counter) & 0xFFFFFFFF)


class _Clock:
    """The block page's timestamps, formatted once per second rather than once per block: UTC for
    the JSON answer, the display zone (Beijing time by default) for the page people read."""

    second = -1
    text = ""
    local: ClassVar[dict[tzinfo, str]] = {}

    @classmethod
    def now(cls) -> str:
        cls._tick()
        return cls.text

    @classmethod
    def local_now(cls, zone: tzinfo) -> str:
        cls._tick()
        if zone not in cls.local:
            cls.local[zone] = datetime.fromtimestamp(cls.second, zone).strftime("%Y-%m-%d %H:%M:%S")
        return cls.local[zone]

    @classmethod
    def _tick(cls) -> None:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            cls.local = {}


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    contact: str
    zone: tzinfo = BEIJING  # `display.timezone`: the page's time is shown in it


class BlockPages:
    """Renders block responses for one loaded pack; replaced as a whole on reload."""

    def __init__(self, settings: BlockSettings, operator: Operator) -> None:
        self.settings = settings
        self.operator = operator
        self.messages = _load_messages(settings.messages)
        self.pages = {reason: self._compile(reason) for reason in BLOCK_REASONS}
        self._responses: dict[tuple, _Response] = {}
        self._responses_size = 0

    def _compile(self, reason: Reason) -> list[bytes | str]:
        """The page with everything but the per-request fields filled in, split around those.

        Even positions are literal HTML (encoded once, here), odd positions name a per-request field.
        """
        status = 400 if reason is Reason.INVALID else self.settings.http_status
        fixed = {
            "reason": reason.value,
            "status": str(status),
            "operator_name": self.operator.name or "—",
            "operator_contact": self.operator.contact or "—",
            "zone": zone_label(self.operator.zone),
            **self.messages[reason.value],
        }
        escaped = {key: html.escape(value) for key, value in fixed.items()}
        text = _load_template(self.settings.page_for(reason.value)).safe_substitute(escaped)
        return [part if index % 2 else part.encode() for index, part in enumerate(_PER_REQUEST.split(text))]

    def http_response(self, verdict: Verdict, request_id: str, *, json_body: bool, head_only: bool) -> bytes:
        """A complete HTTP/1.1 response that ends the connection.

        Rendered once per (reason, host, licence, kind of body) and remembered with the request id
        and the time left open: only those two, and the length they change, are filled in per block.
        """
        licence = verdict.filing.licence if verdict.filing else None
        key = (verdict.reason, verdict.host, licence, json_body, head_only)
        response = self._responses.get(key)
        if response is None:
            response = self._render(verdict, licence, json_body, head_only)
            if self._responses_size + response.size > RESPONSE_CACHE_BYTES:
                self._responses.clear()  # junk hosts must not grow memory; popular ones come back at once
                self._responses_size = 0
            self._responses[key] = response
            self._responses_size += response.size
        header_id = request_id.encode()
        if json_body:
            return response.fill(header_id, json_string(request_id).encode(), json_string(_Clock.now()).encode())
        return response.fill(header_id, header_id, _Clock.local_now(self.operator.zone).encode())

    def _render(self, verdict: Verdict, licence: str | None, json_body: bool, head_only: bool) -> _Response:
        status = 400 if verdict.reason is Reason.INVALID else self.settings.http_status
        if json_body:
            # The JSON answer is the facts with "request_id" and "time" last: the encoder writes
            # them as `, "request_id": <string>, "time": <string>}` after the rest.
            fixed = json.dumps(self._facts(verdict, status), ensure_ascii=False)[:-1]
            body: list[bytes | str] = [(fixed + ', "request_id": ').encode(), "request_id", b', "time": ', "time", b"}"]
            content_type = "application/json; charset=utf-8"
        else:
            fields = {
                "domain": html.escape(verdict.host) if verdict.host else "—",
                "licence": html.escape(licence) if licence is not None else "—",
            }
            body = [b""]
            for index, part in enumerate(self.pages[verdict.reason]):
                if not index % 2:
                    body[-1] += part  # type: ignore[operator]
                elif part in fields:
                    body[-1] += fields[part].encode()  # type: ignore[operator]
                else:
                    body += [part, b""]
            content_type = "text/html; charset=utf-8"
        header = "blocked; reason=%s; id=" % verdict.reason.value
        return _Response(status, content_type, header, body, head_only)

    def _facts(self, verdict: Verdict, status: int) -> dict[str, object]:
        """What the page says, as data: the JSON answer but for its request id and time."""
        text = self.messages[verdict.reason.value]
        return {
            "blocked": True,
            "status": status,
            "domain": verdict.host or None,
            "reason": verdict.reason.value,
            "title": {"zh": text["title_zh"], "en": text["title_en"]},
            "why": {"zh": text["why_zh"], "en": text["why_en"]},
            "action_required": {"zh": text["todo_zh"], "en": text["todo_en"]},
            "licence": verdict.filing.licence if verdict.filing else None,
            "operator": {"name": self.operator.name, "contact": self.operator.contact},
        }


class _Response:
    """One rendered block response with the request id and the time left open: a bytes format
    string with fields for them, the body's length (which they change) and the head's request id.
    """

    __slots__ = ("_fixed_length", "_format", "_ids", "_times", "size")

    def __init__(self, status: int, content_type: str, gate_header: str, body: list[bytes | str],
                 head_only: bool) -> None:  # fmt: skip
        """`body` alternates literal bytes (even positions) and the name of a per-request field
        (odd positions), as BlockPages.pages does."""
        head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %%(length)d\r\nCache-Control: no-store\r\n"
                "Connection: close\r\nX-ICP-Gate: %s%%(id)s\r\n\r\n"
                % (status, STATUS_TEXT[status], content_type, gate_header.replace("%", "%%"))).encode()  # fmt: skip
        literal = [part for index, part in enumerate(body) if not index % 2]
        fields = [part for index, part in enumerate(body) if index % 2]
        self._fixed_length = sum(len(part) for part in literal)
        self._ids = fields.count("request_id")
        self._times = fields.count("time")
        body_format = b"".join(b"%%(%s)s" % part.encode() if index % 2 else part.replace(b"%", b"%%")  # type: ignore[union-attr]
                               for index, part in enumerate(body))  # fmt: skip
        self._format = head if head_only else head + body_format
        self.size = len(self._format)

    def fill(self, request_id: bytes, body_id: bytes, now: bytes) -> bytes:
        """The response for one block: `request_id` as it goes into the head, `body_id` and `now`
        as they go into the body."""
        length = self._fixed_length + self._ids * len(body_id) + self._times * len(now)
        return self._format % {b"length": length, b"id": request_id, b"request_id": body_id, b"time": now}


def error_response(status: int, message: str, request_id: str) -> bytes:
    """Plain answers that are not blocks: 502 when the backend is down, 503 when full."""
    body = ("%d %s\n%s\nrequest id: %s\n" % (status, STATUS_TEXT[status], message, request_id)).encode()
    return _response(status, "text/plain; charset=utf-8", body, "error; id=%s" % request_id, head_only=False)


def _response(status: int, content_type: str, body: bytes, gate_header: str, head_only: bool) -> bytes:
    head = (
        "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nCache-Control: no-store\r\n"
        "Connection: close\r\nX-ICP-Gate: %s\r\n\r\n"
        % (status, STATUS_TEXT[status], content_type, len(body), gate_header)
    ).encode()
    return head if head_only else head + body


def _load_messages(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError([Problem(str(path), "", None, "cannot read messages: %s" % error)]) from None
    problems = []
    for reason in BLOCK_REASONS:
        table = data.get(reason.value)
        if not isinstance(table, dict):
            problems.append(Problem(str(path), reason.value, None, "missing the texts for this reason"))
            continue
        for key in MESSAGE_KEYS:
            if not isinstance(table.get(key), str) or not table[key].strip():
                problems.append(Problem(str(path), "%s.%s" % (reason.value, key), None, "missing or empty"))
    if problems:
        raise ConfigError(problems)
    return {reason: {key: data[reason][key] for key in MESSAGE_KEYS} for reason in data}


def _load_template(path: Path) -> string.Template:
    try:
        return string.Template(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([Problem(str(path), "", None, "cannot read template: %s" % error)]) from None
