"""`icpgate fleet serve` against a real PostgreSQL fed by the real shipper: the whole fleet's edges,
violations and handling behind the bearer token, read with the reader's role, a central store away
answered with a 503 and recovered from, and the fleet's OpenAPI document driven by schemathesis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import test_fleet
from adminkit import TOKEN, admin_request
from gatekit import free_port, wait_for_port
from test_fleet import PASSWORD, _fleet, _log_with, _ship, migrated

from icpgate.fleet import handling
from icpgate.violations.store import open_violations

centre = test_fleet.centre  # the fixture: PostgreSQL with the roles and the schema
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def _serve_config(folder: Path, server) -> Path:
    (folder / "admin.token").write_text(TOKEN + "\n")
    (folder / "password").write_text(PASSWORD % "x" + "\n")
    config = folder / "centre.toml"
    config.write_text(
        '[provider]\nid = "IDC-EXAMPLE"\nname = "示例机房"\n[registry]\npath = "%s"\n'
        '[admin]\ntoken_file = "%s"\n[fleet]\ndsn = "postgresql://icpgate_read@127.0.0.1:%d/icpgate"\n'
        'password_file = "%s"\nedge_id = "noc"\n' % (folder / "r.db", folder / "admin.token", server.port,
                                                     folder / "password"))  # fmt: skip
    return config


async def _confirm(path: Path, host: str) -> None:
    async with open_violations(path) as store:
        await store.set_dns(host, "192.0.2.1", "confirmed", ["192.0.2.1"], "", time.time())


def test_fleet_serve_shows_the_whole_fleet_behind_the_token(centre, tmp_path: Path) -> None:
    migrated(centre)
    logs = {name: tmp_path / ("%s.db" % name) for name in ("a", "b")}
    edges = {"a": asyncio.run(_log_with(logs["a"], ["shop.example-serve.cn", "blog.example-serve.cn"])),
             "b": asyncio.run(_log_with(logs["b"], ["shop.example-serve.cn"]))}  # fmt: skip
    asyncio.run(_confirm(logs["a"], "shop.example-serve.cn"))  # the page lists confirmed records
    for name, edge in edges.items():
        asyncio.run(_ship(_fleet(centre.dsn("icpgate_edge_%s" % name, PASSWORD % name)), logs[name], edge))
    shop = centre.execute("SELECT id FROM fleet.records WHERE host = 'shop.example-serve.cn'")[0][0]
    with psycopg.connect(centre.dsn("icpgate_noc", PASSWORD % "x")) as connection:
        assert handling.handle(connection, [shop], "acknowledged", "已致电客户", "张三") == []

    port = free_port()
    config = _serve_config(tmp_path, centre)
    command = [sys.executable, "-m", "icpgate", "fleet", "serve", "-c", str(config), "--listen", "127.0.0.1:%d" % port]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, process=process)
        auth = {"Authorization": "Bearer " + TOKEN}

        def get(path: str, headers: dict | None = auth) -> tuple[int, dict | str]:
            status, _, body = admin_request(port, path, headers)
            text = body.decode()
            return status, json.loads(text) if text.startswith("{") else text

        # Nothing but /healthz without the token, or with a wrong one.
        for path in ("/", "/api/v1/edges", "/api/v1/violations", "/api/v1/violations/%d/handling" % shop,
                     "/openapi.json"):  # fmt: skip
            assert get(path, None)[0] == 401, path
            assert get(path, {"Authorization": "Bearer wrong"})[0] == 401, path
        assert get("/healthz", None) == (200, {"status": "ok"})

        # The edges, the violations across the fleet with their handling, and the trail.
        status, body = get("/api/v1/edges")
        assert status == 200 and {edge["uuid"] for edge in body["edges"]} >= {e.uuid for e in edges.values()}
        status, body = get("/api/v1/violations?domain=shop.example-serve.cn")
        assert status == 200 and body["total"] == 1
        item = body["items"][0]
        assert item["id"] == shop and item["count"] == 4 and len(item["edges"]) == 2
        assert item["handling"]["state"] == "acknowledged" and item["handling"]["by"] == "张三 (icpgate_noc)"
        status, body = get("/api/v1/violations?domain=example-serve.cn&limit=1&offset=1")
        assert status == 200 and body["total"] == 2 and len(body["items"]) == 1 and body["next_offset"] is None
        status, body = get("/api/v1/violations/%d/handling" % shop)
        assert status == 200 and [(t["state"], t["role"], t["by"]) for t in body["items"]] == [
            ("acknowledged", "icpgate_noc", "张三")]  # fmt: skip
        # The edge's parameter checks, and the fleet's own.
        assert get("/api/v1/violations?reason=nope")[0] == 400
        status, body = get("/api/v1/violations?site=site-9")
        assert status == 404 and "site-9" in body["error"] and "known: s" in body["error"]
        # The page, bilingual, with the edges and the handling.
        status, page = get("/")
        assert status == 200 and "机群" in page and "fleet" in page and "已致电客户" in page
        assert "a" in page and "shop.example-serve.cn" in page and "示例机房" in page

        # It reads with the reader's role.
        roles = centre.execute("SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name = 'icpgate'")
        assert roles == [("icpgate_read",)]

        # The central store away: a 503 that says so; back: answers again.
        centre.stop()
        try:
            status, body = get("/api/v1/edges")
            assert status == 503 and "cannot be reached" in body["error"]
        finally:
            centre.start()
        deadline = time.monotonic() + 20
        while get("/api/v1/edges")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)

        # The fleet's OpenAPI document holds against the running server.
        result = subprocess.run(
            [str(SCHEMATHESIS), "run", "http://127.0.0.1:%d/openapi.json" % port, "--checks", "all",
             "--max-examples", "25", "--generation-database", "none", "-H", "Authorization: Bearer " + TOKEN,
             "--seed", "20261207"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert process.returncode == 0 and "Traceback" not in output, output
