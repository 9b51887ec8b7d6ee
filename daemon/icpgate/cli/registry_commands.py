"""`icpgate registry adopt`: the operator's word that the gate may enforce the registry at
registry.path although it is another one than the gate's index, or behind it (registry/index_store.py).

The index is rebuilt from that registry in a new generation and `current` points at it, marked as
an adoption, so a running gate's workers switch to it within `registry.reload_interval`; a gate
that is not running starts with it. A reload (SIGHUP) does the same from inside the daemon."""

from __future__ import annotations

import asyncio
import json

from ..config.settings import Config
from ..registry.index_store import read_meta
from ..registry.store import open_registry, require_registry
from .exits import Exit


def adopt(config: Config, *, as_json: bool) -> Exit:
    require_registry(config.registry_path)  # adopting nothing would empty the gate
    before = read_meta(config.registry_path)

    async def rebuild():
        async with open_registry(config.registry_path, create=False) as registry:
            return await registry.sync_index(adopt=True), await registry.state()

    outcome, state = asyncio.run(rebuild())
    report = {
        "registry": state.registry_id, "serial": outcome.serial, "how": outcome.how, "filings": state.filings,
        "previous": {"registry": before.registry, "serial": before.serial} if before else None,
    }  # fmt: skip
    if as_json:
        print(json.dumps(report, indent=2))
    elif outcome.how == "current":
        print("the gate already enforces registry %s at serial %d" % (state.registry_id, outcome.serial))
    else:
        was = " (was registry %s at serial %d)" % (before.registry, before.serial) if before else ""
        print("the gate now enforces registry %s at serial %d, %d filings%s" % (state.registry_id, outcome.serial,
                                                                                 state.filings, was))  # fmt: skip
    return Exit.OK
