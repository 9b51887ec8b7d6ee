"""The admin API's handlers and server (docs/admin-api.md).

Read-only calls answer from the registry and the violation log through the admin's own
connections; the calls that change state (POST /api/v1/feed/sync, POST .../handling) need the
bearer token.
Bad parameters get a 400 with a JSON message, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .. import __version__
from ..config.settings import Config
from ..config.tomlschema import ConfigError
from ..feed.client import FeedClient
from ..feed.status import feed_status, outcome_json
from ..inspection import report as inspection_report
from ..inspection.classify import STATES as INSPECTION_STATES
from ..inspection.metrics import inspection_families
from ..inspection.report import REVIEW_STATES, new_access, report
from ..inspection.store import InspectionStore
from ..names.hostname import HostKind, normalize_host, parent_names
from ..policy.decide import Reason
from ..policy.explain import explain_with
from ..policy.pack import load_pack
from ..registry.index_store import read_meta
from ..registry.store import Registry
from ..reports.current import annotate
from ..violations import store as violation_store
from ..violations.store import Filters, ViolationStore, parse_since
from .openapi import openapi_document
from .state_metrics import (
    BlockRate,
    enforcement_check,
    exposition,
    readiness,
    ready_family,
    registry_family,
    registry_warnings,
    state_families,
    worker_families,
)
from .status_page import render_status_page

log = logging.getLogger("icpgate.admin")
MAX_PAGE = 1000
MAX_OFFSET = 2**62  # SQLite's OFFSET is a signed 64-bit integer
JSON = "application/json"
RATE_SAMPLE_INTERVAL = 10.0


class BadRequest(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=json.dumps({"error": message}), content_type=JSON)


class AdminApi:
    def __init__(self, config: Config, registry: Registry, store: ViolationStore,
                 inspection: InspectionStore | None = None) -> None:  # fmt: skip
        self.config = config
        self.registry = registry
        self.store = store
        self.inspection = inspection  # None while inspect.enabled is off
        self.token = read_token(config)
        self.block_rate = BlockRate()
        self._sync_lock = asyncio.Lock()
        self._pilot: tuple = ()  # the pack's monitor_ranges, as of _pack_stamp (its mtime)
        self._pack_stamp: int | None = -1
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._adopted_sync: dict = {}  # the sync status last read while the registry at the path was enforced

    # (method, path, handler): the server (admin/runner.py) sends each request to the AdminApi in service.
    ROUTES = (
        ("GET", "/", "status_page"),
        ("GET", "/healthz", "healthz"),
        ("GET", "/readyz", "readyz"),
        ("GET", "/metrics", "metrics"),
        ("GET", "/openapi.json", "openapi"),
        ("GET", "/api/v1/decision", "decision"),
        ("GET", "/api/v1/violations", "violations"),
        ("POST", "/api/v1/violations/{id}/handling", "set_handling"),
        ("GET", "/api/v1/filings/{domain}", "filing"),
        ("GET", "/api/v1/feed", "feed"),
        ("GET", "/api/v1/inspection", "inspection_report"),
        ("POST", "/api/v1/feed/sync", "feed_sync"),
    )

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Count a request in flight, so that a reload closes this API's stores only after its last one."""
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def drained(self, timeout: float) -> None:
        """Wait (up to `timeout`) until no request is in flight here: the server sends new ones elsewhere."""
        with contextlib.suppress(TimeoutError):
            while self._in_flight:
                self._idle.clear()
                await asyncio.wait_for(self._idle.wait(), timeout)

    # --- health and metrics -----------------------------------------------------------------
    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        """Ready when every worker has its index and its listeners, and the feed is not expired.
        `warnings` says what needs the operator without making the gate unready (which, inline,
        would route the hosted ranges around it): a registry at the path that is not adopted."""
        warnings = await self._registry_warnings()
        families = await asyncio.to_thread(worker_families)
        checks = readiness(self.config, families, await self._readiness_sync(warnings), self._monitor_ranges())
        ready = all(check["ok"] for check in checks.values())
        body = {
            "ready": ready,
            "mode": checks["enforcement"]["mode"],
            "checks": checks,
            "warnings": warnings,
            "version": __version__,
        }
        return web.json_response(body, status=200 if ready else 503)

    async def _readiness_sync(self, warnings: list[dict[str, str]]) -> dict:
        """The sync status readiness judges the feed by: the registry's at the path, but while that
        registry is not adopted (`warnings`) the one last read of the registry enforced, so a registry
        copied into place that never synced does not fail /readyz (inline, the bypass)."""
        if warnings and self._adopted_sync:
            return self._adopted_sync
        status = await self.registry.sync_status()
        if not warnings:
            self._adopted_sync = status
        return status

    async def _registry_warnings(self) -> list[dict[str, str]]:
        """Compare the registry at the path (reopened if another file is there now) with the index
        the gate enforces."""
        await self.registry.follow()
        meta = await asyncio.to_thread(read_meta, self.config.registry_path)
        state = None if self.registry.replaced() else await self.registry.state()
        return registry_warnings(self.config.registry_path, meta, state)

    async def metrics(self, _request: web.Request) -> web.Response:
        families = await self._families()
        body = await asyncio.to_thread(exposition, families)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _families(self) -> list:
        warnings = await self._registry_warnings()
        workers = await asyncio.to_thread(worker_families)
        state = await self.registry.state()
        sync = await self.registry.sync_status()
        summary = await self.store.summary()
        ready = ready_family(readiness(self.config, workers, await self._readiness_sync(warnings),
                                       self._monitor_ranges()))  # fmt: skip
        inspected = await inspection_report.summary(self.config, self.inspection, time.time())
        return (
            workers
            + state_families(self.config, sync, state.serial, summary)
            + [ready, registry_family(warnings)]
            + inspection_families(inspected)
        )

    def _monitor_ranges(self) -> tuple:
        """The pack's enforce.monitor_ranges (a pilot), read again when the file changes; a pack
        that cannot be read now keeps the last answer (the workers keep their last good pack too)."""
        try:
            stamp = self.config.policy_pack.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp != self._pack_stamp:  # each change is read, and a failure logged, once
            self._pack_stamp = stamp
            try:
                self._pilot = load_pack(self.config.policy_pack).policy.monitor_ranges
            except (OSError, ConfigError) as error:
                log.warning("cannot read the policy pack for its monitor_ranges: %s", error)
        return self._pilot

    async def sample_block_rate(self) -> None:
        while True:
            try:
                self.block_rate.add(await asyncio.to_thread(worker_families))
            except Exception:  # a torn metrics file must not end sampling
                log.exception("cannot read the metrics for the status page")
            await asyncio.sleep(RATE_SAMPLE_INTERVAL)

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    # --- decisions, filings, violations -------------------------------------------------------
    async def decision(self, request: web.Request) -> web.Response:
        query = request.query
        host = _single(query, "host")
        if host is None:
            raise BadRequest("host is required")
        ip = _ip_param(query)
        port = _int_param(query, "port", None, 1, 65535)
        proto = _single(query, "proto")
        proto = "http" if proto is None else proto
        if proto not in ("http", "tls", "quic"):
            raise BadRequest("proto must be http, tls or quic")
        try:
            pack = load_pack(self.config.policy_pack)
        except ConfigError as error:
            raise web.HTTPServiceUnavailable(text=str(error)) from None
        facts = await explain_with(self.registry, self.config, pack, host, ip, port, proto, _single(query, "path"))
        return web.json_response(facts)

    async def filing(self, request: web.Request) -> web.Response:
        domain = request.match_info["domain"]
        name = normalize_host(domain)
        if name.kind is not HostKind.NAME:
            raise BadRequest("%r is not a domain name" % domain)
        index = await self.registry.index_for(list(parent_names(name.value)))
        match = index.lookup(name.value)
        filing = await self.registry.get_filing(match.filing.licence) if match else None
        if filing is None:
            return web.json_response({"error": "no filing covers %s" % name.value, "domain": name.value}, status=404)
        return web.json_response({"domain": name.value, "matched": match.domain, "filing": filing.to_json()})

    async def violations(self, request: web.Request) -> web.Response:
        query = request.query
        limit, offset = page_params(query)
        total, items = await self.store.query(violation_filters(query), limit, offset)
        await self._annotate(items)
        return web.json_response(page_json(total, limit, offset, items))

    async def set_handling(self, request: web.Request) -> web.Response:
        """Acknowledge, resolve or reopen one record, with a note (behind the token)."""
        self._authorize(request)
        text = request.match_info["id"]
        if not text.isdigit() or int(text) > MAX_OFFSET:
            raise BadRequest("id: %r is not a record id" % text)
        body = await _json_body(request)
        unknown = sorted(set(body) - {"state", "note"})
        if unknown:
            raise BadRequest("unknown field %r; expected state and note" % unknown[0])
        state, note = body.get("state"), body.get("note", "")
        if state not in violation_store.SET_STATES:
            raise BadRequest("state must be one of %s" % ", ".join(violation_store.SET_STATES))
        if not isinstance(note, str) or len(note) > violation_store.MAX_NOTE:
            raise BadRequest("note must be a string of at most %d characters" % violation_store.MAX_NOTE)
        if await self.store.set_handling([int(text)], state, note.strip(), time.time()):
            return web.json_response({"error": "no violation record with id %s" % text}, status=404)
        record = await self.store.get(int(text))
        await self._annotate([record])
        return web.json_response(record)

    async def _annotate(self, records: list[dict]) -> None:
        try:
            await annotate(self.registry, self.config, records)
        except ConfigError:  # the pack cannot be read now: say nothing rather than guess
            for record in records:
                record["current"] = None

    # --- site inspection ---------------------------------------------------------------------
    async def inspection_report(self, request: web.Request) -> web.Response:
        """The inspection's summary, one page of filings to review, and the 新增接入 list by customer."""
        query = request.query
        limit = _int_param(query, "limit", 100, 1, MAX_PAGE)
        offset = _int_param(query, "offset", 0, 0, MAX_OFFSET)
        states = tuple(query.getall("state", [])) or REVIEW_STATES
        unknown = sorted(set(states) - set(INSPECTION_STATES))
        if unknown:
            raise BadRequest("state: %r is not one of %s" % (unknown[0], ", ".join(INSPECTION_STATES)))
        document = await report(self.config, self.inspection, time.time(), limit, offset, states)
        filings = document["filings"]
        following = offset + len(filings["items"])
        filings["next_offset"] = following if following < filings["total"] else None
        document["enabled"] = self.config.inspect.enabled
        document["new_access"] = await new_access(self.config, self.store, self.registry)
        return web.json_response(document)

    # --- feed ------------------------------------------------------------------------------
    async def feed(self, _request: web.Request) -> web.Response:
        await self.registry.follow()
        return web.json_response(await feed_status(self.config, self.registry))

    async def feed_sync(self, request: web.Request) -> web.Response:
        self._authorize(request)
        if not self.config.feed.urls:
            return web.json_response({"error": "feed.urls is empty: there is no feed to sync from"}, status=409)
        async with self._sync_lock, FeedClient(self.config, self.registry) as client:
            outcome = await client.sync()
        return web.json_response(outcome_json(outcome))

    def _authorize(self, request: web.Request) -> None:
        authorize(request, self.token)

    # --- status page -------------------------------------------------------------------------
    async def status_page(self, _request: web.Request) -> web.Response:
        warnings = await self._registry_warnings()
        status = await feed_status(self.config, self.registry)
        _, top = await self.store.query(Filters(confirmed=True), 20, 0)
        await self._annotate(top)
        summary = await self.store.summary()
        enforcement = enforcement_check(self.config, status["freshness"]["enforcement"], self._monitor_ranges())
        inspected = await report(self.config, self.inspection, time.time(), 20, states=("hollow",))
        inspected["new_access"] = await new_access(self.config, self.store, self.registry)
        html = render_status_page(self.config, status, enforcement, self.block_rate.per_second(), top, summary,
                                  inspected, warnings)  # fmt: skip
        return web.Response(text=html, content_type="text/html", charset="utf-8")


def authorize(request: web.Request, token: str | None) -> None:
    """The bearer token's check (the edge's write calls, everything `fleet serve` answers)."""
    if token is None:
        raise web.HTTPForbidden(text='{"error": "no admin.token_file is configured"}', content_type=JSON)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise web.HTTPUnauthorized(text=json.dumps({"error": "a valid bearer token is required"}),
                                   content_type=JSON, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def violation_filters(query) -> Filters:
    """`GET /api/v1/violations`' filters (an edge's, and the fleet's with edge and site besides)."""
    reason = text_param(query, "reason")
    if reason is not None and reason not in Reason.__members__.values():
        raise BadRequest("reason: unknown reason %r" % reason)
    dns = text_param(query, "dns")
    if dns is not None and dns not in violation_store.DNS_STATES:
        raise BadRequest("dns must be one of %s" % ", ".join(violation_store.DNS_STATES))
    state = text_param(query, "state")
    if state is not None and state not in violation_store.HANDLING_STATES:
        raise BadRequest("state must be one of %s" % ", ".join(violation_store.HANDLING_STATES))
    since = text_param(query, "since")
    try:
        since = parse_since(since) if since is not None else None
    except ValueError as error:
        raise BadRequest("since: %s" % error) from None
    return Filters(confirmed=_bool_param(query, "confirmed"), since=since, domain=text_param(query, "domain"),
                   ip=_ip_param(query), reason=reason, dns=dns, state=state)  # fmt: skip


def page_params(query) -> tuple[int, int]:
    return _int_param(query, "limit", 100, 1, MAX_PAGE), _int_param(query, "offset", 0, 0, MAX_OFFSET)


def page_json(total: int, limit: int, offset: int, items: list) -> dict:
    following = offset + len(items)
    return {"total": total, "limit": limit, "offset": offset,
            "next_offset": following if following < total else None, "items": items}  # fmt: skip


def read_token(config: Config) -> str | None:
    if config.admin.token_file is None:
        return None
    token = config.admin.token_file.read_text(encoding="utf-8").strip()
    return token or None


async def _json_body(request: web.Request) -> dict:
    if request.content_type != JSON:
        raise BadRequest("the body must be application/json")
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested deeper than the parser goes
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _int_param(query, name: str, default: int | None, low: int, high: int) -> int | None:
    text = _single(query, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest("%s: %r is not an integer" % (name, text)) from None
    if not low <= value <= high:
        raise BadRequest("%s must be %d to %d" % (name, low, high))
    return value


def _ip_param(query) -> str | None:
    text = text_param(query, "ip")
    if text is None:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise BadRequest("ip: %r is not an IP address" % text) from None


def _bool_param(query, name: str) -> bool:
    text = _single(query, name)
    text = "false" if text is None else text.lower()
    if text not in ("true", "false", "1", "0"):
        raise BadRequest("%s must be true or false" % name)
    return text in ("true", "1")


def _single(query, name: str) -> str | None:
    """The parameter's one value, None when absent; given twice is a mistake."""
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadRequest("%s is given %d times" % (name, len(values)))
    return values[0] if values else None


def text_param(query, name: str) -> str | None:
    """None when absent; a parameter given empty is a mistake, not a wildcard."""
    text = _single(query, name)
    if text == "":
        raise BadRequest("%s must not be empty" % name)
    return text


class _MalformedRequests(logging.Filter):
    """aiohttp logs a malformed request with a traceback; for a client's junk one line will do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            record.msg, record.args, record.exc_info = "admin API: malformed request refused: %s", (
                str(record.exc_info[1]).splitlines()[0],), None  # fmt: skip
        return True


logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())


def bind_admin(config: Config) -> socket.socket | None:
    """The admin API's listening socket, or None when it is off; OSError says why it cannot bind."""
    if not config.admin.enabled:
        return None
    family = socket.AF_INET6 if ":" in config.admin.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.admin.address, config.admin.port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
