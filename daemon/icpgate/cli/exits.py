"""The command line's exit codes, documented in docs/cli.md; shared by every command module."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0  # done; for `check`: the host is allowed
    BLOCKED = 1  # `check`: the host is blocked
    USAGE = 2  # wrong arguments (argparse)
    CONFIG = 3  # the config or the policy pack is invalid
    DATA = 4  # an import was refused; nothing was imported
    REGISTRY = 5  # the registry or the violation log cannot be used (missing: the config points elsewhere)
    START = 6  # `run`: the gate could not start (a listener cannot bind, workers do not come up)
    FEED = 7  # `feed sync`/`diff`: no source could be reached (refused feed data is DATA)
    NFT = 8  # `bypass`: nft failed (no inline ruleset loaded, no CAP_NET_ADMIN, a conflicting set element)
    BUSY = 9  # `inspect`: another inspection (the daemon's scheduled one) is running
    FLEET = 10  # `fleet`: the central store cannot be reached, or refuses (roles, schema)
