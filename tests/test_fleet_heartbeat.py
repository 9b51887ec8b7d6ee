"""The heartbeat's feed lag and bypass state, from a real publisher and a real edge registry, as
the centre stores them and `fleet serve` exports them for the alerts: in step, behind the
publisher (its serial heard, a change refused), and at the publisher's serial with another
registry (a local import on the edge)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import psycopg
import test_fleet
from feedkit import bulk_records, config_text, feed_sync, make_key, start_publisher
from test_fleet import PASSWORD, icpgate, migrated

from conftest import write_ndjson
from icpgate.config.settings import load_config
from icpgate.fleet import views
from icpgate.fleet.heartbeat import edge_health
from icpgate.fleet.serve import edge_exposition
from icpgate.fleet.shipper import Edge, register, send_heartbeat
from icpgate.registry.store import open_registry
from icpgate.violations.store import open_violations

centre = test_fleet.centre  # the fixture: PostgreSQL with the roles and the schema


def _edge_config(folder: Path, publisher, public_key: Path, server) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "password").write_text(PASSWORD % "a")
    config = config_text(folder, registry=folder / "registry.db", feed={
        "urls": [publisher.url], "public_keys": [str(public_key)], "token_file": str(publisher.edge_token),
        "start_delay": 0, "connect_timeout": 2, "read_timeout": 2, "wait": 0})  # fmt: skip
    with config.open("a") as text:
        text.write('[violations]\npath = "%s"\n[fleet]\ndsn = "postgresql://icpgate_edge_a@127.0.0.1:%d/icpgate"\n'
                   'password_file = "%s"\nedge_id = "hb-a"\nsite = "hb"\n' % (folder / "v.db", server.port,
                                                                            folder / "password"))  # fmt: skip
    return config


def _beat(config_path: Path) -> dict:
    """The heartbeat as the service process makes it, sent to the centre; the centre's view of it."""
    config = load_config(config_path)

    async def run() -> dict:
        async with open_violations(config.violations.path) as store, open_registry(config.registry_path) as registry:
            health = await edge_health(config, registry, store)
            edge = Edge((await store.shipping_state())["edge_uuid"], "hb-a", "hb")
            async with await psycopg.AsyncConnection.connect(config.fleet.dsn, password=PASSWORD % "a") as connection:
                await register(connection, edge)
                await send_heartbeat(connection, edge, health)
                await connection.commit()
            return health

    return asyncio.run(run())


def _centre_view(server) -> tuple[dict, dict[str, float]]:
    with psycopg.connect(server.dsn("icpgate_read", PASSWORD % "x"), autocommit=True) as connection:
        edge = next(e for e in views.edges(connection, 60) if e["edge_id"] == "hb-a")
    text = edge_exposition([edge]).decode()
    return edge, {name: float(value) for name, value in re.findall(r"^(icpgate_\w+)\{[^}]*\} (\S+)$", text, re.M)}


def test_the_heartbeat_carries_feed_lag_and_a_registry_unlike_the_publishers(centre, tmp_path: Path) -> None:
    migrated(centre)
    private, public = make_key(tmp_path / "feed.pem")
    publisher = start_publisher(tmp_path / "publisher", private, records=bulk_records(0, 5))
    try:
        config = _edge_config(tmp_path / "edge", publisher, public, centre)
        assert feed_sync(config)[1]["result"] == "applied"
        serial = publisher.status()["serial"]

        # In step with the publisher.
        health = _beat(config)
        assert (health["publisher_serial"], health["feed_serials_behind"], health["feed_seconds_behind"]) == (
            serial, 0, 0.0)  # fmt: skip
        assert health["bypass"] == "unknown"  # no inline ruleset here for nft to read
        edge, gauges = _centre_view(centre)
        assert edge["bypass"] == "unknown" and edge["feed"]["serials_behind"] == 0 and edge["flags"] == []
        assert gauges["icpgate_fleet_edge_checksum_differs"] == 0 and gauges["icpgate_fleet_edge_enforcing"] == 1

        # The publisher moves on; the edge hears its serial but refuses the change (another key).
        publisher.import_records(bulk_records(5, 1))
        other = make_key(tmp_path / "other.pem")[1]
        config.write_text(config.read_text().replace(str(public), str(other)))
        time.sleep(1.1)
        assert feed_sync(config)[1]["result"] == "refused_signature"
        health = _beat(config)
        assert health["publisher_serial"] == serial + 1 and health["feed_serials_behind"] == 1
        assert health["feed_seconds_behind"] >= 1.0
        edge, gauges = _centre_view(centre)
        assert "behind" in edge["flags"] and gauges["icpgate_fleet_edge_feed_serials_behind"] == 1

        # At the publisher's serial with other contents: a filing imported on the edge itself.
        config.write_text(config.read_text().replace(str(other), str(public)))
        local = write_ndjson(tmp_path / "local.ndjson", bulk_records(90, 1))
        assert icpgate(config, "import", str(local)).returncode == 0
        feed_sync(config)  # the publisher: nothing after our serial, and its checksum there
        health = _beat(config)
        assert health["publisher_serial"] == health["registry_serial"] == serial + 1
        assert health["publisher_checksum"] != health["registry_checksum"]
        edge, gauges = _centre_view(centre)
        assert "checksum_differs" in edge["flags"] and gauges["icpgate_fleet_edge_checksum_differs"] == 1
    finally:
        publisher.stop()
