"""The fleet's part of the service process: the shipper, with its own handles on the local files."""

from __future__ import annotations

from ..config.settings import Config
from ..registry.store import open_registry
from ..violations.store import open_violations
from .heartbeat import BypassProbe, edge_health
from .shipper import Shipper


async def run_fleet(config: Config) -> None:
    """Ship the violation log and beat until cancelled (a reload or the end of the service)."""
    async with open_violations(config.violations.path) as store, open_registry(config.registry_path) as registry:
        bypass = BypassProbe(config)

        async def health() -> dict:
            return await edge_health(config, registry, store, bypass)

        await Shipper(config, store, health).run()
