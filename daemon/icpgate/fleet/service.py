"""The fleet's part of the service process: the shipper, with its own handles on the local files."""

from __future__ import annotations

from contextlib import AsyncExitStack

from ..config.settings import Config
from ..inspection.store import open_inspection
from ..registry.store import open_registry
from ..violations.store import open_violations
from .heartbeat import BypassProbe, edge_health
from .inspection_shipper import InspectionShipping
from .shipper import Shipper


async def run_fleet(config: Config) -> None:
    """Ship the violation log (and, on the edge that runs `[inspect]`, the inspection's results)
    and beat until cancelled (a reload or the end of the service)."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_violations(config.violations.path))
        registry = await stack.enter_async_context(open_registry(config.registry_path))
        steps = []
        if config.inspect.enabled:
            inspection = await stack.enter_async_context(open_inspection(config.inspect.path))
            steps.append(InspectionShipping(inspection, config.inspect))
        bypass = BypassProbe(config)

        async def health() -> dict:
            return await edge_health(config, registry, store, bypass)

        await Shipper(config, store, health, steps).run()
