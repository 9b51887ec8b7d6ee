"""Load a policy pack (TOML in policies/): what is enforced, the switches, and how blocks look."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.tomlschema import ConfigError, Field, problems_for, read_toml, validate
from ..names.hostname import HostKind, normalize_host
from ..names.suffixes import is_public_suffix
from .decide import Action, PolicyPack, Reason

HTTP_BLOCK_STATUSES = (403, 451)
TLS_ACTIONS = ("reset", "alert", "page")


def _networks(value: list) -> str | None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=True)
        except (TypeError, ValueError) as error:
            return "%r is not a CIDR range: %s" % (item, error)
    return None


def _ports(value: list) -> str | None:
    bad = [p for p in value if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536]
    return "ports must be integers from 1 to 65535, not %r" % bad[0] if bad else None


def _domains(value: list) -> str | None:
    for item in value:
        host = normalize_host(item) if isinstance(item, str) else None
        if host is None or host.kind is not HostKind.NAME:
            return "%r is not a domain name" % (item,)
        if is_public_suffix(host.value):
            return "%r is a public suffix; exempting it would exempt every domain below it" % item
    return None


def _action(value: str) -> str | None:
    return None if value in ("allow", "block") else 'must be "allow" or "block", not %r' % value


def _one_of(choices: tuple) -> Any:
    return lambda value: (
        None if value in choices else "must be one of %s, not %r" % (", ".join(map(str, choices)), value)
    )


def _reason_pages(value: dict) -> str | None:
    codes = {reason.value for reason in Reason}
    unknown = [k for k in value if k not in codes]
    if unknown:
        return "%r is not a reason code" % unknown[0]
    return None if all(isinstance(v, str) for v in value.values()) else "each page must be a file path"


PACK_SPEC = {
    "pack": {"name": Field((str,)), "description": Field((str,), "")},
    "enforce": {
        "ranges": Field((list,), ["0.0.0.0/0", "::/0"], _networks),
        "ports": Field((list,), [], _ports),
        "exempt_ranges": Field((list,), [], _networks),
        "exempt_domains": Field((list,), [], _domains),
        "monitor_ranges": Field((list,), [], _networks),
    },
    "rules": {
        "access_pending": Field((str,), "allow", _action),
        "ip_literal": Field((str,), "allow", _action),
        "no_host": Field((str,), "block", _action),
        "acme_http01": Field((bool,), False),
        "require_access_ip": Field((bool,), False),
        "h2c": Field((str,), "block", _action),
        "connect": Field((str,), "block", _action),
        "quic_unknown_version": Field((str,), "block", _action),
    },
    "block": {
        "http_status": Field((int,), 403, _one_of(HTTP_BLOCK_STATUSES)),
        "tls_action": Field((str,), "reset", _one_of(TLS_ACTIONS)),
        "page": Field((str,), "templates/block.html"),
        "messages": Field((str,), "templates/messages.toml"),
        "pages": Field((dict,), {}, _reason_pages),
    },
}


@dataclass(frozen=True, slots=True)
class BlockSettings:
    """How a block looks: HTTP status, TLS action, and the page templates per reason."""

    http_status: int
    tls_action: str
    page: Path
    messages: Path
    pages: dict[str, Path]

    def page_for(self, reason: str) -> Path:
        return self.pages.get(reason, self.page)


@dataclass(frozen=True, slots=True)
class LoadedPack:
    source: Path
    policy: PolicyPack
    block: BlockSettings
    description: str


def load_pack(path: Path) -> LoadedPack:
    """Read and check a pack; raise ConfigError listing every problem with its line."""
    data, text = read_toml(path)
    values, errors = validate(data, PACK_SPEC)
    base = path.parent
    block = values["block"]
    for key in ("page", "messages"):
        if isinstance(block[key], str) and not (base / block[key]).is_file():
            errors.append(("block." + key, "file not found: %s" % (base / block[key])))
    for reason, page in (block["pages"] if isinstance(block["pages"], dict) else {}).items():
        if isinstance(page, str) and not (base / page).is_file():
            errors.append(("block.pages." + reason, "file not found: %s" % (base / page)))
    if errors:
        raise ConfigError(problems_for(path, text, errors))
    return LoadedPack(path, _policy_pack(values), _block(values["block"], base), values["pack"]["description"])


def _policy_pack(values: dict[str, Any]) -> PolicyPack:
    enforce, rules = values["enforce"], values["rules"]
    ranges = tuple(ipaddress.ip_network(r) for r in enforce["ranges"])
    everything = {str(r) for r in ranges} >= {"0.0.0.0/0", "::/0"}
    return PolicyPack(
        name=values["pack"]["name"],
        enforce_ranges=None if everything else ranges,
        enforce_ports=frozenset(enforce["ports"]) or None,
        exempt_ranges=tuple(ipaddress.ip_network(r) for r in enforce["exempt_ranges"]),
        exempt_domains=frozenset(normalize_host(d).value for d in enforce["exempt_domains"]),
        monitor_ranges=tuple(ipaddress.ip_network(r) for r in enforce["monitor_ranges"]),
        access_pending=Action(rules["access_pending"]),
        ip_literal=Action(rules["ip_literal"]),
        no_host=Action(rules["no_host"]),
        acme_http01=rules["acme_http01"],
        require_access_ip=rules["require_access_ip"],
        h2c=Action(rules["h2c"]),
        connect=Action(rules["connect"]),
        quic_unknown_version=Action(rules["quic_unknown_version"]),
    )


def _block(block: dict[str, Any], base: Path) -> BlockSettings:
    return BlockSettings(
        http_status=block["http_status"],
        tls_action=block["tls_action"],
        page=base / block["page"],
        messages=base / block["messages"],
        pages={reason: base / page for reason, page in block["pages"].items()},
    )
