"""`icpgate fleet serve`: the status page and the admin API's read calls over the central store, for
the whole fleet: edges, violations and their handling, site inspection (docs/fleet.md "fleet serve").

It reads with the reader's role (fleet.dsn or --dsn) and changes nothing. Unlike an edge's admin
API, which listens on loopback, it serves the whole fleet's data, so every call but /healthz needs
the bearer token of admin.token_file. The parameters, the token check, the records' shape and the
page's style are the edge's own (admin/server.py, admin/status_page.py, admin/openapi.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..admin.openapi import fleet_openapi_document
from ..admin.server import BadRequest, authorize, page_json, page_params, read_token, text_param, violation_filters
from ..config.settings import Config
from ..inspection.classify import STATES as INSPECTION_STATES
from ..inspection.report import REVIEW_STATES
from ..violations.store import Filters
from . import handling, inspection_views, views
from .central import connect_args
from .status_page import render_fleet_page

log = logging.getLogger("icpgate.fleet")
T = TypeVar("T")
_OPEN = frozenset({"/healthz"})
_LABELS = ["edge", "site"]


class CentralReader:
    """One read-only connection (autocommit: no transaction left open), used by one thread at a
    time, made again after it broke, so a restarted PostgreSQL costs one failed request."""

    def __init__(self, config: Config, dsn: str | None) -> None:
        self.arguments = connect_args(config.fleet, dsn)
        self._connection: psycopg.Connection | None = None
        self._lock = threading.Lock()

    async def read(self, work: Callable[[psycopg.Connection], T]) -> T:
        return await asyncio.to_thread(self._read, work)

    def _read(self, work: Callable[[psycopg.Connection], T]) -> T:
        with self._lock:
            if self._connection is None or self._connection.closed:
                self._connection = psycopg.connect(**self.arguments, autocommit=True)
            try:
                return work(self._connection)
            except psycopg.OperationalError:
                self._connection.close()
                self._connection = None
                raise

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()


class FleetApi:
    def __init__(self, config: Config, reader: CentralReader) -> None:
        self.config = config
        self.reader = reader
        self.token = read_token(config)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.add_routes([
            web.get("/", self.status_page),
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi),
            web.get("/api/v1/edges", self.edges),
            web.get("/api/v1/violations", self.violations),
            web.get("/api/v1/violations/{id}/handling", self.history),
            web.get("/api/v1/inspection", self.inspection),
        ])  # fmt: skip
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """The token before anything; the central store away is a 503 that says so, not a traceback."""
        if request.path not in _OPEN:
            authorize(request, self.token)
        try:
            return await handler(request)
        except psycopg.OperationalError as error:
            log.warning("fleet serve: the central store: %s", str(error).strip().splitlines()[0])
            return web.json_response({"error": "the central store cannot be reached"}, status=503)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, _request: web.Request) -> web.Response:
        """Each edge's health as the centre sees it, for the fleet's alerts (dashboards/alerts.yml)."""

        def read(connection: psycopg.Connection) -> tuple[list[dict], list[tuple]]:
            return views.edges(connection, self.config.fleet.silent_after), views.new_violations(connection)

        found, new = await self.reader.read(read)
        return web.Response(body=edge_exposition(found, new), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(fleet_openapi_document())

    async def edges(self, _request: web.Request) -> web.Response:
        found = await self.reader.read(lambda connection: views.edges(connection, self.config.fleet.silent_after))
        return web.json_response({"edges": found})

    async def violations(self, request: web.Request) -> web.Response:
        query = request.query
        limit, offset = page_params(query)
        filters = views.FleetFilters(violation_filters(query), text_param(query, "edge"), text_param(query, "site"))

        def read(connection: psycopg.Connection) -> tuple[int, list[dict]]:
            edges, sites = views.labels(connection)
            for name, value, known in (("edge", filters.edge, edges), ("site", filters.site, sites)):
                if value is not None and value not in known:  # a name, not a malformed parameter: 404
                    raise web.HTTPNotFound(text=json.dumps({"error": "%s: no edge reports %r; known: %s" % (
                        name, value, ", ".join(sorted(known)))}), content_type="application/json")  # fmt: skip
            return views.violations(connection, filters, limit, offset)

        total, items = await self.reader.read(read)
        await views.annotate(self.config, items)
        return web.json_response(page_json(total, limit, offset, items))

    async def history(self, request: web.Request) -> web.Response:
        text = request.match_info["id"]
        if not text.isdigit() or int(text) > 2**62:
            raise BadRequest("id: %r is not a record id" % text)
        trail = await self.reader.read(lambda connection: handling.history(connection, [int(text)]))
        return web.json_response({"id": int(text), "items": trail})

    async def inspection(self, request: web.Request) -> web.Response:
        """The inspecting edge's report, with the 新增接入 list over every edge's violations."""
        limit, offset = page_params(request.query)
        states = tuple(request.query.getall("state", [])) or REVIEW_STATES
        unknown = sorted(set(states) - set(INSPECTION_STATES))
        if unknown:
            raise BadRequest("state: %r is not one of %s" % (unknown[0], ", ".join(INSPECTION_STATES)))
        document = await self._inspection(limit, offset, states)
        filings = document["filings"]
        following = offset + len(filings["items"])
        filings["next_offset"] = following if following < filings["total"] else None
        return web.json_response(document)

    async def _inspection(self, limit: int, offset: int, states: tuple[str, ...]) -> dict:
        def read(connection: psycopg.Connection) -> tuple[dict, tuple[list[dict], int]]:
            return (inspection_views.report(connection, time.time(), limit, offset, states,
                                            self.config.fleet.silent_after),
                    inspection_views.new_access_records(connection))  # fmt: skip

        document, (records, unchecked) = await self.reader.read(read)
        document["enabled"] = document["inspection"]["edge"] is not None
        document["new_access"] = await inspection_views.new_access(self.config, records, unchecked)
        return document

    async def status_page(self, _request: web.Request) -> web.Response:
        def read(connection: psycopg.Connection) -> tuple:
            found = views.edges(connection, self.config.fleet.silent_after)
            _, top = views.violations(connection, views.FleetFilters(Filters(confirmed=True)), 20)
            return found, top, views.handling_counts(connection)

        found, top, counts = await self.reader.read(read)
        await views.annotate(self.config, top)
        inspected = await self._inspection(20, 0, ("hollow",))
        html = render_fleet_page(self.config, found, top, counts, inspected)
        return web.Response(text=html, content_type="text/html", charset="utf-8")


def edge_exposition(edges: list[dict], new: Sequence[tuple[str, str, str, int]] = ()) -> bytes:
    """The edges' gauges (docs/metrics.md, "The fleet"), labelled with edge and site; a gauge an
    edge cannot fill (no feed, an older edge) is left out for it rather than made up. `new`: the
    records each edge first saw lately, by DNS state (views.new_violations)."""
    families = {
        "silence": GaugeMetricFamily("icpgate_fleet_edge_silence_seconds", "Seconds since the edge's last"
                                     " heartbeat, by the central store's clock.", labels=_LABELS),
        "enforcing": GaugeMetricFamily("icpgate_fleet_edge_enforcing", "1 when the edge enforces (not monitor"
                                       " mode, not an expired feed's open mode).", labels=_LABELS),
        "serials": GaugeMetricFamily("icpgate_fleet_edge_feed_serials_behind", "Serials the edge's registry is"
                                     " behind the publisher's, as the edge last heard it.", labels=_LABELS),
        "seconds": GaugeMetricFamily("icpgate_fleet_edge_feed_seconds_behind", "Seconds since the edge was last"
                                     " at the publisher's serial; 0 when it is.", labels=_LABELS),
        "backlog": GaugeMetricFamily("icpgate_fleet_edge_backlog_records", "Records the edge has not shipped"
                                     " yet, at its last heartbeat.", labels=_LABELS),
        "checksum": GaugeMetricFamily("icpgate_fleet_edge_checksum_differs", "1 when the edge's registry has"
                                      " another checksum than the publisher's at the same serial.", labels=_LABELS),
    }  # fmt: skip
    for edge in edges:
        labels = [edge["edge_id"], edge["site"]]
        feed = edge["feed"]
        values = {"silence": edge["silence"], "enforcing": float(edge["mode"] == "enforce"),
                  "serials": feed["serials_behind"], "seconds": feed["seconds_behind"],
                  "backlog": edge["shipping"]["backlog"],
                  "checksum": float("checksum_differs" in edge["flags"])}  # fmt: skip
        for name, value in values.items():
            if value is not None:
                families[name].add_metric(labels, value)
    fresh = GaugeMetricFamily("icpgate_fleet_new_violation_records", "Violation records the edge first saw in the"
                              " last %d minutes, by its own first sighting (a shipped backlog is not new)."
                              % (views.NEW_WITHIN // 60), labels=[*_LABELS, "dns"])  # fmt: skip
    for edge_id, site, dns, records in new:
        fresh.add_metric([edge_id, site, dns], records)
    families["new"] = fresh
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return self.families


def serve(config: Config, dsn: str | None, host: str, port: int) -> int:
    """Run until SIGINT/SIGTERM; 6 (the CLI's START) when it cannot listen."""
    import uvloop

    return uvloop.run(_serve(config, dsn, host, port))


async def _serve(config: Config, dsn: str | None, host: str, port: int) -> int:
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        log.error("fleet serve: cannot listen on %s:%d: %s", host, port, error.strerror or error)
        return 6
    reader = CentralReader(config, dsn)
    runner = web.AppRunner(FleetApi(config, reader).app(), access_log=None, shutdown_timeout=5, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        log.info("fleet serve: the fleet's status page and read API on http://%s:%d/ (bearer token)", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        return 0
    finally:
        await runner.cleanup()
        reader.close()
