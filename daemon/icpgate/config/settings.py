"""The daemon config (config.example.toml documents every key).

Unknown keys are errors, relative paths resolve from the config file's folder, and `--set`
overrides apply before checking, so an override is checked like the file itself.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path

from .display_time import parse_zone
from .tomlschema import ConfigError, Field, TableList, apply_override, problems_for, read_toml, validate


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _workers(value: int | str) -> str | None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256):
        return None
    return 'must be "auto" or a number of processes from 1 to 256'


def _address(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "%r is not an IP address" % value
    return None


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else "must be a port from 1 to 65535"


def _host_port(value: str) -> str | None:
    if value == "":
        return None
    try:
        split_host_port(value)
    except ValueError as error:
        return str(error)
    return None


def _static_map(value: dict) -> str | None:
    for key, backend in value.items():
        destination = key.rsplit(":", 1)[0] if key.count(":") == 1 or key.startswith("[") else key
        if _address(destination.strip("[]")) or not isinstance(backend, str) or _host_port(backend) or not backend:
            return 'entry %r = %r: expected "hosted IP[:port]" = "backend host:port"' % (key, backend)
    return None


def _feed_urls(value: list) -> str | None:
    for url in value:
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "file:")):
            return "%r: each feed URL must start with http://, https:// or file:" % (url,)
    return None


def _paths(value: list) -> str | None:
    return None if all(isinstance(item, str) and item for item in value) else "must be a list of file paths"


def _at_least(low: float):
    return lambda value: None if value >= low else "must be %g or more" % low


def _share(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be a share above 0 and at most 1 (0.3 is 30%)"


def _networks(value: list) -> str | None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except (TypeError, ValueError):
            return "%r is not an IP network (CIDR)" % (item,)
    return None


def _resolvers(value: list) -> str | None:
    for item in value:
        try:
            resolver_address(item)
        except (TypeError, ValueError):
            return "%r is not an IP address or IP:port" % (item,)
    return None


def _rate(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be 0 to 1"


def _one_of(*choices: str):
    return lambda value: None if value in choices else "must be one of %s" % ", ".join(map(repr, choices))


def _zone(value: str) -> str | None:
    try:
        parse_zone(value)
    except ValueError as error:
        return str(error)
    return None


_SUFFIX = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{1,63}")


def _suffixes(value: list) -> str | None:
    for item in value:
        if not isinstance(item, str) or not _SUFFIX.fullmatch(item.strip(".").lower()):
            return '%r is not a domain name suffix, e.g. "w.kunlunsl.com"' % (item,)
    return None


def _isp_ids(value: dict) -> str | None:
    for key, provider in value.items():
        if not key.isdigit() or not isinstance(provider, str) or not provider.strip():
            return 'entry %r = %r: expected "Ispid" = "provider id", e.g. "10001" = "IDC-EXAMPLE"' % (key, provider)
    return None


def _dsn(value: str) -> str | None:
    """A libpq URL or key/value string; psycopg parses it fully when it connects (fleet/central.py)."""
    if value == "" or value.startswith(("postgresql://", "postgres://")) or "=" in value:
        return None
    return "must be a libpq URL (postgresql://...) or key=value pairs (host=... dbname=...)"


def _label(value: str) -> str | None:
    if len(value) <= 64 and value.isprintable():
        return None
    return "must be at most 64 printable characters"


LISTENER_SPEC = {
    "address": Field((str,), check=_address),
    "port": Field((int,), check=_port),
    "kind": Field((str,), check=_one_of("http", "tls", "auto", "quic")),
    "backend": Field((str,), "", _host_port),
    "proxy_protocol": Field((str,), "", _one_of("", "v1", "v2")),
    "transparent": Field((bool,), False),
}

CONFIG_SPEC = {
    "provider": {
        "id": Field((str,), check=_non_empty),
        "name": Field((str,), ""),
        "contact": Field((str,), ""),
    },
    "registry": {
        "path": Field((str,), check=_non_empty),
        "reload_interval": Field((int, float), 0.5, lambda v: None if v >= 0 else "must be 0 (off) or more"),
    },
    "policy": {
        "pack": Field((str,), "policies/default.toml", _non_empty),
        "other_protocols": Field((str,), "pass", _one_of("pass", "block")),
    },
    "gate": {
        "workers": Field((int, str), 1, _workers),
        "max_connections": Field((int,), 10000, _positive),
        "max_undecided": Field((int,), 1024, _positive),
        "inspect_timeout": Field((int, float), 5.0, _positive),
        "max_hello_size": Field((int,), 16384, lambda v: None if 512 <= v <= 65536 else "must be 512 to 65536"),
        "max_header_size": Field((int,), 32768, lambda v: None if 1024 <= v <= 1048576 else "must be 1024 to 1048576"),
        "idle_timeout": Field((int, float), 300.0, _positive),
        "half_close_timeout": Field((int, float), 30.0, _positive),
        "connect_timeout": Field((int, float), 5.0, _positive),
        "drain_timeout": Field((int, float), 10.0, lambda v: None if v >= 0 else "must be 0 or more"),
        "server_first_wait": Field((int, float), 1.0, lambda v: None if 0 < v <= 30 else "must be above 0, at most 30"),
        "server_first_timeout": Field(
            (int, float), 10.0, lambda v: None if 0 < v <= 600 else "must be above 0, at most 600"
        ),
        "enforcement": Field((str,), "enforce", _one_of("enforce", "monitor")),
        "tls_certificate": Field((str,), ""),
        "tls_key": Field((str,), ""),
        "tls_ca_dir": Field((str,), ""),
    },
    "upstream": {
        "mode": Field((str,), "original_dst", _one_of("original_dst", "static")),
        "static": Field((dict,), {}, _static_map),
        "source": Field((str,), "gate", _one_of("gate", "client")),
    },
    "quic": {
        "idle_timeout": Field((int, float), 120.0, _positive),
        "max_flows": Field((int,), 100_000, _at_least(16)),
        "block_hold": Field((int, float), 60.0, _positive),
    },
    "listeners": TableList(LISTENER_SPEC),
    "feed": {
        "urls": Field((list,), [], _feed_urls),
        "public_keys": Field((list,), [], _paths),
        "allow_unsigned": Field((bool,), False),
        "token_file": Field((str,), ""),
        "wait": Field((int, float), 30.0, lambda v: None if 0 <= v <= 300 else "must be 0 to 300 seconds"),
        "min_interval": Field((int, float), 0.25, _at_least(0)),
        "start_delay": Field((int, float), 5.0, _at_least(0)),
        "backoff_initial": Field((int, float), 1.0, _positive),
        "backoff_max": Field((int, float), 300.0, _positive),
        "connect_timeout": Field((int, float), 5.0, _positive),
        "read_timeout": Field((int, float), 30.0, _positive),
        "total_timeout": Field((int, float), 600.0, _positive),
        "max_body": Field((int,), 512 * 1024 * 1024, _at_least(1024)),
        "guard_share": Field((int, float), 0.3, _share),
        "guard_min_filings": Field((int,), 100, _at_least(0)),
        "stale_after": Field((int, float), 3600.0, _positive),
        "max_staleness": Field((int, float), 86400.0, _positive),
        "stale_mode": Field((str,), "enforce", _one_of("enforce", "monitor", "open")),
    },
    "violations": {
        "path": Field((str,), ""),
        "flush_interval": Field((int, float), 5.0, _positive),
        "max_keys": Field((int,), 100_000, _at_least(16)),
        "retention": Field((int, float), 30 * 86400.0, _positive),
        "sample_client": Field((bool,), False),
    },
    "dns": {
        "enabled": Field((bool,), True),
        "resolvers": Field((list,), [], _resolvers),
        "hosted_ranges": Field((list,), [], _networks),
        "rate": Field((int, float), 20.0, _positive),
        "timeout": Field((int, float), 3.0, _positive),
        "min_ttl": Field((int, float), 60.0, _at_least(0)),
        "max_ttl": Field((int, float), 3600.0, _positive),
        "recheck_after": Field((int, float), 86400.0, _positive),
    },
    "inspect": {
        "enabled": Field((bool,), False),
        "path": Field((str,), ""),
        "interval": Field((int, float), 86400.0, _at_least(60)),
        "resolvers": Field((list,), [], _resolvers),
        "rate": Field((int, float), 20.0, _positive),
        "concurrency": Field((int,), 8, lambda v: None if 1 <= v <= 256 else "must be 1 to 256"),
        "timeout": Field((int, float), 3.0, _positive),
        "retries": Field((int,), 2, lambda v: None if 0 <= v <= 10 else "must be 0 to 10"),
        "max_run_time": Field((int, float), 43200.0, _positive),
        "grace_period": Field((int, float), 30 * 86400.0, _at_least(0)),
        "relayed_within": Field((int, float), 7 * 86400.0, _positive),
        "cdn_suffixes": Field((list,), [], _suffixes),
        "hollow_alert_share": Field((int, float), 0.2, _share),
    },
    "admin": {
        "enabled": Field((bool,), True),
        "address": Field((str,), "127.0.0.1", _address),
        "port": Field((int,), 9180, _port),
        "token_file": Field((str,), ""),
        "metrics_dir": Field((str,), ""),
    },
    "log": {
        "format": Field((str,), "text", _one_of("text", "json")),
        "block_sample_rate": Field((int, float), 1.0, _rate),
        "block_lines_per_second": Field((int, float), 100.0, _at_least(0)),
    },
    "import": {
        "default_timezone": Field((str,), "+08:00", _zone),
        "isp_ids": Field((dict,), {}, _isp_ids),
    },
    "display": {"timezone": Field((str,), "+08:00", _zone)},
    "fleet": {
        "dsn": Field((str,), "", _dsn),
        "password_file": Field((str,), ""),
        "edge_id": Field((str,), "", _label),
        "site": Field((str,), "", _label),
        "ship_interval": Field((int, float), 5.0, _positive),
        "heartbeat_interval": Field((int, float), 5.0, _positive),
        "batch_size": Field((int,), 1000, lambda v: None if 1 <= v <= 100_000 else "must be 1 to 100000"),
        "max_backlog": Field((int,), 1_000_000, _at_least(1)),
        "transaction_pooling": Field((bool,), False),
        "connect_timeout": Field((int, float), 5.0, _positive),
        "retention_days": Field((int,), 180, lambda v: None if v >= 1 else "must be 1 or more"),
        "silent_after": Field((int, float), 60.0, _positive),
    },
    "publish": {
        "signing_key": Field((str,), ""),
        "history": Field((int, float), 7 * 86400.0, _positive),
        "poll_interval": Field((int, float), 0.25, _at_least(0)),
        "max_wait": Field((int, float), 60.0, lambda v: None if 0 <= v <= 300 else "must be 0 to 300 seconds"),
        "cache_dir": Field((str,), ""),
        "tokens_file": Field((str,), ""),
    },
}


def _cross_check(values: dict) -> list[tuple[str, str]]:
    """What no single key can say wrong: combinations `run` could not serve safely or bind at all."""
    errors = []
    feed = values["feed"]
    if feed["urls"] and not feed["public_keys"] and not feed["allow_unsigned"]:
        errors.append(("feed.public_keys", "feed.urls is set but no public key is listed, so feed bodies would be"
                       " applied without any signature check: list the publisher's Ed25519 public key (PEM), or"
                       " set feed.allow_unsigned = true to accept unsigned feeds knowingly"))  # fmt: skip
    if values["inspect"]["enabled"] and not values["dns"]["hosted_ranges"]:
        errors.append(("inspect.enabled", "site inspection needs our address ranges: list them in"
                       " dns.hosted_ranges (the policy pack's enforce.ranges may be every address, which would"
                       " call every site hosted)"))  # fmt: skip
    gate = values["gate"]
    if gate["server_first_timeout"] <= gate["server_first_wait"]:
        errors.append(("gate.server_first_timeout", "must be longer than gate.server_first_wait (%g s): a silent client"
                       " must have time to answer the server's banner" % gate["server_first_wait"]))  # fmt: skip
    for have, missing in (("tls_certificate", "tls_key"), ("tls_key", "tls_certificate")):
        if gate[have] and not gate[missing]:
            errors.append(("gate." + missing, "gate.%s is set, so this must be too" % have))
    sockets = [("listeners[%d]" % number, item["address"], item["port"], item["kind"] == "quic") for number, item in
               enumerate(values["listeners"])]  # fmt: skip
    if values["admin"]["enabled"]:
        sockets.append(("admin", values["admin"]["address"], values["admin"]["port"], False))
    for later, (key, address, port, udp) in enumerate(sockets):
        for first_key, first_address, first_port, first_udp in sockets[:later]:
            if port == first_port and udp == first_udp and _addresses_collide(address, first_address):
                errors.append((key + ".port", "%s:%d collides with %s (%s:%d): both cannot listen on the same"
                               " port and address family (a wildcard address takes the port on every address)"
                               % (address, port, first_key, first_address, first_port)))  # fmt: skip
                break
    return errors


def _addresses_collide(one: str, other: str) -> bool:
    """Same family and the same address, or either the wildcard (0.0.0.0, ::) of that family."""
    a, b = ipaddress.ip_address(one), ipaddress.ip_address(other)
    return a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified)


def split_host_port(value: str, *, any_port: bool = False) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into its parts; ValueError says what is wrong. `any_port` (an
    address to listen on) allows port 0: the kernel picks a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise ValueError("%r is not host:port" % value)
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    id: str
    name: str
    contact: str


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: str
    port: int
    kind: str  # "http", "tls", "auto" (the first bytes decide) or "quic" (UDP)
    backend: str  # "host:port" overriding the upstream mode, or ""
    proxy_protocol: str  # "", "v1" or "v2"
    transparent: bool  # IP_TRANSPARENT: accepts what TPROXY steers to it, for any destination

    @property
    def name(self) -> str:
        host = "[%s]" % self.address if ":" in self.address else self.address
        return "%s:%d/%s" % (host, self.port, self.kind)


@dataclass(frozen=True, slots=True)
class GateConfig:
    workers: int
    max_connections: int
    max_undecided: int  # connections nothing of whose has been relayed yet; the oldest give way beyond it
    inspect_timeout: float
    max_hello_size: int
    max_header_size: int
    idle_timeout: float
    half_close_timeout: float  # a relay one side has finished (sent EOF) lives at most this long idle
    connect_timeout: float
    drain_timeout: float
    server_first_wait: float  # an `auto` connection silent this long connects upstream for the server's bytes
    server_first_timeout: float  # an `auto` connection whose client has sent nothing this long is closed
    enforcement: str  # "enforce", or "monitor": decide, record and count as when enforcing, block nothing
    tls_certificate: Path | None  # the operator's certificate for the TLS block page
    tls_key: Path | None
    tls_ca_dir: Path | None  # a mitmproxy certificate store: per-SNI certificates for the TLS block page


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    mode: str  # "original_dst" or "static"
    static: dict[str, str]  # hosted "IP" or "IP:port" -> "backend host:port"
    source: str  # "gate": connect from the gate's address; "client": from the client's own (transparent)


@dataclass(frozen=True, slots=True)
class QuicConfig:
    """UDP `quic` listeners (docs/quic.md). Seconds."""

    idle_timeout: float  # a relayed flow silent this long is forgotten
    max_flows: int  # flows held per worker, relayed and in inspection together
    block_hold: float  # a blocked flow's datagrams are dropped this long, so the browser falls back to TCP


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """The feed client (docs/feed-protocol.md). Timeouts and intervals in seconds."""

    urls: tuple[str, ...]
    public_keys: tuple[Path, ...]  # every body must carry a good signature by one of them
    allow_unsigned: bool  # no public_keys on purpose: unsigned bodies are applied (and warned about)
    token_file: Path | None  # the bearer token this edge shows the publisher
    wait: float  # long-poll: how long a changes request may wait at the publisher
    min_interval: float  # between two requests, at least (the publisher's hint may ask for more)
    start_delay: float  # a random delay up to this at start, so a fleet does not sync at once
    backoff_initial: float
    backoff_max: float
    connect_timeout: float
    read_timeout: float  # silence while reading a body (on top of `wait` for long-polls)
    total_timeout: float  # a whole request, snapshot included
    max_body: int  # bytes on the wire; the inflated body may be at most MAX_INFLATION times that
    guard_share: float
    guard_min_filings: int
    stale_after: float  # since the last successful sync: warn
    max_staleness: float  # since the last successful sync: switch to `stale_mode`
    stale_mode: str  # "enforce", "monitor" or "open"


@dataclass(frozen=True, slots=True)
class ViolationsConfig:
    """The violation log (docs/violations.md)."""

    path: Path  # its own SQLite file: its writes never wait behind a feed transaction
    flush_interval: float
    max_keys: int  # distinct records held in memory per worker; beyond it they fold into one per destination
    retention: float  # records not seen for this long are deleted, sample client addresses with them
    sample_client: bool


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """DNS confirmation of violating hosts."""

    enabled: bool
    resolvers: tuple[tuple[str, int], ...]  # empty: the system's (/etc/resolv.conf)
    hosted_ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    rate: float  # queries per second, at most
    timeout: float
    min_ttl: float  # answers are cached for their TTL, clamped to [min_ttl, max_ttl]
    max_ttl: float
    recheck_after: float


@dataclass(frozen=True, slots=True)
class InspectConfig:
    """Site inspection of the filings that name us as their access provider (docs/inspection.md). Seconds."""

    enabled: bool  # the service process runs a pass every `interval`
    path: Path  # the inspection history, its own SQLite file
    interval: float
    resolvers: tuple[tuple[str, int], ...]  # empty: dns.resolvers (and, when that is empty, the system's)
    rate: float  # DNS queries per second, at most, retries and CNAME chases included
    concurrency: int  # names resolved at once
    timeout: float  # one query, all resolvers together
    retries: int  # a timeout or SERVFAIL is asked again this many times before the name counts as `error`
    max_run_time: float  # a pass stops after this long and the next one resumes where it stopped
    grace_period: float  # no hosted or indirect name for this long before a filing is called hollow
    relayed_within: float  # the gate relayed filed traffic for the name this recently: `indirect`
    cdn_suffixes: tuple[str, ...]  # a CNAME chain into one of them: `indirect`
    hollow_alert_share: float  # the share of hollow filings above which the alert fires


@dataclass(frozen=True, slots=True)
class AdminConfig:
    enabled: bool
    address: str
    port: int
    token_file: Path | None  # the bearer token for state-changing calls; without it they are refused
    metrics_dir: Path | None  # prometheus-client's multiprocess directory; None: a fresh temporary one


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str  # "text" or "json"
    block_sample_rate: float  # the share of blocked requests that get a log line
    block_lines_per_second: float  # and at most this many per second and worker


@dataclass(frozen=True, slots=True)
class PublishConfig:
    signing_key: Path | None  # Ed25519 private key (PEM); unsigned bodies when None
    history: float  # seconds of removals kept for changes requests; older clients get a snapshot
    poll_interval: float  # the minimum wait between polls the publisher asks of clients
    max_wait: float  # longest long-poll the publisher holds
    cache_dir: Path  # where precomputed snapshots are kept
    tokens_file: Path | None  # the edges' bearer tokens, `name token` a line (docs/feed-protocol.md)


@dataclass(frozen=True, slots=True)
class ImportConfig:
    """`icpgate import` (docs/filings-format.md)."""

    default_timezone: tzinfo  # for timestamps in a spreadsheet or an XML download that name no zone
    isp_ids: dict[str, str]  # the national system's access-provider id (Ispid) -> our provider id


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The fleet's central store (docs/fleet.md); `dsn` empty: this edge works on SQLite alone."""

    dsn: str
    password_file: Path | None  # the password, when the DSN, PGPASSWORD or ~/.pgpass do not give it
    edge_id: str  # a label for people; the edge's identity is the UUID in its violation log
    site: str
    ship_interval: float
    heartbeat_interval: float
    batch_size: int  # records per shipping transaction
    max_backlog: int  # unshipped records kept past violations.retention; beyond it the oldest are dropped
    transaction_pooling: bool  # behind pgbouncer in transaction mode: no prepared statements
    connect_timeout: float
    retention_days: int  # the central history's, by whole monthly partitions
    silent_after: float  # `fleet status`: an edge without a heartbeat for this long is silent

    @property
    def enabled(self) -> bool:
        return bool(self.dsn)


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    provider: ProviderConfig
    registry_path: Path
    registry_reload_interval: float
    policy_pack: Path
    other_protocols: str  # an `auto` listener's client speaking neither TLS nor HTTP: "pass" or "block"
    gate: GateConfig
    upstream: UpstreamConfig
    listeners: tuple[ListenerConfig, ...]
    quic: QuicConfig
    feed: FeedConfig
    publish: PublishConfig
    violations: ViolationsConfig
    dns: DnsConfig
    inspect: InspectConfig
    admin: AdminConfig
    log: LogConfig
    imports: ImportConfig
    display_timezone: tzinfo  # times shown to people; machine formats stay UTC
    fleet: FleetConfig


def load_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and check a config file; raise ConfigError listing every problem."""
    data, text = read_toml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    values, errors = validate(data, CONFIG_SPEC)
    if not errors:
        errors = _cross_check(values)
    if errors:
        raise ConfigError(problems_for(path, text, errors))
    base = path.resolve().parent
    gate, quic = values["gate"], values["quic"]
    return Config(
        source=path,
        provider=ProviderConfig(**values["provider"]),
        registry_path=_resolve(base, values["registry"]["path"]),
        registry_reload_interval=float(values["registry"]["reload_interval"]),
        policy_pack=_resolve(base, values["policy"]["pack"]),
        other_protocols=values["policy"]["other_protocols"],
        gate=GateConfig(
            workers=(os.cpu_count() or 1) if gate["workers"] == "auto" else gate["workers"],
            max_connections=gate["max_connections"],
            max_undecided=gate["max_undecided"],
            inspect_timeout=float(gate["inspect_timeout"]),
            max_hello_size=gate["max_hello_size"],
            max_header_size=gate["max_header_size"],
            idle_timeout=float(gate["idle_timeout"]),
            half_close_timeout=float(gate["half_close_timeout"]),
            connect_timeout=float(gate["connect_timeout"]),
            drain_timeout=float(gate["drain_timeout"]),
            server_first_wait=float(gate["server_first_wait"]),
            server_first_timeout=float(gate["server_first_timeout"]),
            enforcement=gate["enforcement"],
            tls_certificate=_resolve_optional(base, gate["tls_certificate"]),
            tls_key=_resolve_optional(base, gate["tls_key"]),
            tls_ca_dir=_resolve_optional(base, gate["tls_ca_dir"]),
        ),
        upstream=UpstreamConfig(**values["upstream"]),
        listeners=tuple(ListenerConfig(**listener) for listener in values["listeners"]),
        quic=QuicConfig(**{key: value if key == "max_flows" else float(value) for key, value in quic.items()}),
        feed=_feed_config(base, values["feed"]),
        publish=PublishConfig(
            signing_key=_resolve_optional(base, values["publish"]["signing_key"]),
            history=float(values["publish"]["history"]),
            poll_interval=float(values["publish"]["poll_interval"]),
            max_wait=float(values["publish"]["max_wait"]),
            cache_dir=_resolve_optional(base, values["publish"]["cache_dir"])
            or _resolve(base, values["registry"]["path"] + ".feed"),
            tokens_file=_resolve_optional(base, values["publish"]["tokens_file"]),
        ),
        violations=_violations_config(base, values["violations"], values["registry"]["path"]),
        dns=_dns_config(values["dns"]),
        inspect=_inspect_config(base, values["inspect"], values["registry"]["path"]),
        admin=AdminConfig(
            enabled=values["admin"]["enabled"],
            address=values["admin"]["address"],
            port=values["admin"]["port"],
            token_file=_resolve_optional(base, values["admin"]["token_file"]),
            metrics_dir=_resolve_optional(base, values["admin"]["metrics_dir"]),
        ),
        log=LogConfig(**{key: value if key == "format" else float(value) for key, value in values["log"].items()}),
        imports=ImportConfig(parse_zone(values["import"]["default_timezone"]), dict(values["import"]["isp_ids"])),
        display_timezone=parse_zone(values["display"]["timezone"]),
        fleet=_fleet_config(base, values["fleet"]),
    )


def _fleet_config(base: Path, fleet: dict) -> FleetConfig:
    return FleetConfig(**{
        **fleet,
        **{key: float(fleet[key]) for key in ("ship_interval", "heartbeat_interval", "connect_timeout",
                                              "silent_after")},
        "password_file": _resolve_optional(base, fleet["password_file"]),
        "edge_id": fleet["edge_id"] or socket.gethostname(),
    })  # fmt: skip


def _violations_config(base: Path, violations: dict, registry_path: str) -> ViolationsConfig:
    return ViolationsConfig(
        path=_resolve_optional(base, violations["path"]) or _resolve(base, registry_path).with_suffix(".violations.db"),
        flush_interval=float(violations["flush_interval"]),
        max_keys=violations["max_keys"],
        retention=float(violations["retention"]),
        sample_client=violations["sample_client"],
    )


def _dns_config(dns: dict) -> DnsConfig:
    floats = {key: float(value) for key, value in dns.items() if isinstance(value, int | float)
              and not isinstance(value, bool)}  # fmt: skip
    return DnsConfig(**{
        **dns, **floats,
        "resolvers": tuple(resolver_address(item) for item in dns["resolvers"]),
        "hosted_ranges": tuple(ipaddress.ip_network(item, strict=False) for item in dns["hosted_ranges"]),
    })  # fmt: skip


def _inspect_config(base: Path, inspect: dict, registry_path: str) -> InspectConfig:
    floats = {key: float(value) for key, value in inspect.items() if isinstance(value, int | float)
              and not isinstance(value, bool) and key not in ("concurrency", "retries")}  # fmt: skip
    return InspectConfig(**{
        **inspect, **floats,
        "path": _resolve_optional(base, inspect["path"]) or _resolve(base, registry_path).with_suffix(".inspection.db"),
        "resolvers": tuple(resolver_address(item) for item in inspect["resolvers"]),
        "cdn_suffixes": tuple(item.strip(".").lower() for item in inspect["cdn_suffixes"]),
    })  # fmt: skip


def resolver_address(value: str) -> tuple[str, int]:
    """`IP`, `IP:port` or `[v6]:port` into (IP, port); ValueError when it is neither."""
    try:
        return str(ipaddress.ip_address(value)), 53
    except ValueError:
        host, port = split_host_port(value)
        return str(ipaddress.ip_address(host)), port


def _feed_config(base: Path, feed: dict) -> FeedConfig:
    floats = {key: float(value) for key, value in feed.items() if isinstance(value, int | float) and key not in (
        "max_body", "guard_min_filings")}  # fmt: skip
    return FeedConfig(**{
        **feed, **floats,
        "urls": tuple(_file_url(base, url) for url in feed["urls"]),
        "public_keys": tuple(_resolve(base, key) for key in feed["public_keys"]),
        "token_file": _resolve_optional(base, feed["token_file"]),
    })  # fmt: skip


def _file_url(base: Path, url: str) -> str:
    """`file:` URLs may be relative to the config file, like every other path in it."""
    if not url.startswith("file:"):
        return url
    return "file:" + str(_resolve(base, url.removeprefix("file:").removeprefix("//")))


def _resolve(base: Path, value: str) -> Path:
    return (base / Path(value).expanduser()).resolve()


def _resolve_optional(base: Path, value: str) -> Path | None:
    return _resolve(base, value) if value else None
