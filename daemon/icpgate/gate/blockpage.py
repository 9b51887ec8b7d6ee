"""The block page and its JSON twin: which domain, why, what to do, who to call, which request.

Templates and per-reason texts come from the policy pack (policies/templates/). They are read
and checked once, at start and on reload; rendering is a string substitution.
"""

from __future__ import annotations

import html
import json
import secrets
import string
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..policy import Reason, Verdict
from ..policy_pack import BlockSettings
from ..tomlschema import ConfigError, Problem

MESSAGE_KEYS = ("title_zh", "title_en", "why_zh", "why_en", "todo_zh", "todo_en")
STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 451: "Unavailable For Legal Reasons", 502: "Bad Gateway",
               503: "Service Unavailable"}  # fmt: skip
# Reasons a block can carry; `filed`, `exempt` and `not_enforced` never block.
BLOCK_REASONS = tuple(r for r in Reason if r not in (Reason.FILED, Reason.EXEMPT, Reason.NOT_ENFORCED))


def new_request_id() -> str:
    """Short enough to read off a screenshot, random enough to find one request in the logs."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    contact: str


class BlockPages:
    """Renders block responses for one loaded pack; replaced as a whole on reload."""

    def __init__(self, settings: BlockSettings, operator: Operator) -> None:
        self.settings = settings
        self.operator = operator
        self.messages = _load_messages(settings.messages)
        self.templates = {reason: _load_template(settings.page_for(reason.value)) for reason in BLOCK_REASONS}

    def http_response(self, verdict: Verdict, request_id: str, *, json_body: bool, head_only: bool) -> bytes:
        """A complete HTTP/1.1 response that ends the connection."""
        status = 400 if verdict.reason is Reason.INVALID else self.settings.http_status
        facts = self.facts(verdict, request_id, status)
        if json_body:
            body, content_type = json.dumps(facts, ensure_ascii=False).encode(), "application/json; charset=utf-8"
        else:
            body, content_type = self._html(verdict.reason, facts), "text/html; charset=utf-8"
        header = "blocked; reason=%s; id=%s" % (verdict.reason.value, request_id)
        return _response(status, content_type, body, header, head_only)

    def facts(self, verdict: Verdict, request_id: str, status: int) -> dict[str, object]:
        """What the page says, as data: the JSON answer and the template's fields."""
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
            "request_id": request_id,
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def _html(self, reason: Reason, facts: dict) -> bytes:
        fields = {
            "domain": facts["domain"] or "—",
            "reason": facts["reason"],
            "licence": facts["licence"] or "—",
            "operator_name": self.operator.name or "—",
            "operator_contact": self.operator.contact or "—",
            "request_id": facts["request_id"],
            "time": facts["time"],
            "status": str(facts["status"]),
        }
        fields.update(self.messages[reason.value])
        escaped = {key: html.escape(value) for key, value in fields.items()}
        return self.templates[reason].safe_substitute(escaped).encode()


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
