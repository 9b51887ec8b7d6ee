"""The failure bypass of inline mode: the hosted ranges in nftables' `bypass4`/`bypass6` sets.

systemd/icpgate-inline.nft steers the hosted ranges to the gate with TPROXY, except destinations in
the interval sets `bypass4` and `bypass6` of table `inet icpgate`. A dead gate drops what is steered
to it (fail closed); putting the hosted ranges in those sets routes their traffic around the gate
instead, unchecked. Changes go through the `nft` command (it needs CAP_NET_ADMIN), each one a
single transaction covering both sets, so the two address families never disagree.

The state is kept only in the sets: `on` adds the ranges that are missing, `off` removes exactly the
ranges given, and a range already inside a wider element counts as bypassed (and is left alone).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config.settings import Config, load_config
from ..policy.pack import load_pack

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TABLE = ("inet", "icpgate")
SETS = {4: "bypass4", 6: "bypass6"}
NFT_TIMEOUT = 10.0
EVERYTHING = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


class NftError(Exception):
    """nft failed, or answered what cannot be read; the message says what to check."""


class RangeError(ValueError):
    """A range given on the command line is not a network."""


@dataclass(frozen=True)
class Status:
    """Which of the ranges the sets bypass now: "on" (all), "off" (none) or "partial"."""

    ranges: tuple[Network, ...]
    bypassed: tuple[Network, ...]
    elements: dict[str, list[str]]

    @property
    def state(self) -> str:
        if len(self.bypassed) == len(self.ranges):
            return "on"
        return "off" if not self.bypassed else "partial"

    def to_json(self) -> dict:
        return {
            "state": self.state,
            "ranges": [{"range": str(net), "bypassed": net in self.bypassed} for net in self.ranges],
            "sets": self.elements,
        }


def parse_ranges(texts: list[str]) -> tuple[Network, ...]:
    """Networks from the command line; host bits set are refused, as a typo rather than a range."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as error:
            raise RangeError("%r is not an IP network (CIDR): %s" % (text, error)) from None
    return _collapsed(networks)


def configured_ranges(config_path: Path, overrides: list[str]) -> tuple[tuple[Network, ...], str]:
    """The hosted ranges and where they came from: `dns.hosted_ranges` ("our address ranges"), or
    else the policy pack's `enforce.ranges`; the pack's default, everything, means steer nothing."""
    return ranges_of(load_config(config_path, overrides))


def ranges_of(config: Config) -> tuple[tuple[Network, ...], str]:
    """configured_ranges for a loaded config (the fleet's heartbeat reads the bypass state too)."""
    if config.dns.hosted_ranges:
        return _collapsed(config.dns.hosted_ranges), "dns.hosted_ranges in %s" % config.source
    pack = load_pack(config.policy_pack)
    ranges = pack.policy.enforce_ranges or EVERYTHING
    return _collapsed(ranges), "enforce.ranges in %s" % pack.source


def _collapsed(networks) -> tuple[Network, ...]:
    """Overlaps merged (nft refuses overlapping intervals in one command), IPv4 first."""
    v4 = ipaddress.collapse_addresses(n for n in networks if n.version == 4)
    v6 = ipaddress.collapse_addresses(n for n in networks if n.version == 6)
    return (*v4, *v6)


class BypassSets:
    """The two sets, read and changed through `nft` in the current network namespace."""

    def __init__(self, nft: str | None = None) -> None:
        self.nft = nft or shutil.which("nft") or "/usr/sbin/nft"

    def status(self, ranges: tuple[Network, ...]) -> Status:
        elements = {SETS[version]: self._elements(SETS[version]) for version in (4, 6)}
        present = [net for nets in elements.values() for net in nets]
        bypassed = tuple(net for net in ranges if any(_covers(element, net) for element in present))
        return Status(ranges, bypassed, {name: [str(net) for net in nets] for name, nets in elements.items()})

    def turn_on(self, ranges: tuple[Network, ...]) -> tuple[Network, ...]:
        """Add the ranges not yet bypassed, in one transaction; returns those added."""
        status = self.status(ranges)
        present = [ipaddress.ip_network(text) for texts in status.elements.values() for text in texts]
        missing = tuple(net for net in ranges if net not in status.bypassed)
        for net in missing:
            clash = next((element for element in present if element.version == net.version and element.overlaps(net)),
                         None)  # fmt: skip
            if clash is not None:
                raise NftError("%s holds %s, which overlaps %s without covering it; remove it from the set or "
                                 "give ranges that do not overlap" % (SETS[net.version], clash, net))  # fmt: skip
        self._apply("add", missing)
        return missing

    def turn_off(self, ranges: tuple[Network, ...]) -> tuple[Network, ...]:
        """Remove the ranges that are set elements as given, in one transaction; returns those removed.
        A range inside a wider element was not put there by `on`: it stays."""
        status = self.status(ranges)
        present = {text for texts in status.elements.values() for text in texts}
        listed = tuple(net for net in ranges if str(net) in present)
        self._apply("delete", listed)
        return listed

    def _apply(self, verb: str, networks: tuple[Network, ...]) -> None:
        lines = []
        for version, name in SETS.items():
            chosen = [str(net) for net in networks if net.version == version]
            if chosen:
                lines.append("%s element %s %s %s { %s }" % (verb, *TABLE, name, ", ".join(chosen)))
        if lines:
            self._run(["-f", "-"], "\n".join(lines) + "\n")

    def _elements(self, name: str) -> list[Network]:
        answer = self._run(["-j", "list", "set", *TABLE, name])
        try:
            found = [item["set"] for item in json.loads(answer)["nftables"] if "set" in item]
            return [net for element in found[0].get("elem", []) for net in _element_networks(element)]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise NftError("cannot read `nft -j list set %s %s %s`: %s" % (*TABLE, name, error)) from None

    def _run(self, args: list[str], script: str | None = None) -> str:
        command = [self.nft, *args]
        try:
            done = subprocess.run(command, input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise NftError("cannot run %s: %s" % (self.nft, error)) from None
        if done.returncode != 0:
            message = " ".join(done.stderr.split()) or "exit %d" % done.returncode
            hint = ""
            if "No such file or directory" in done.stderr:
                hint = " (is the inline ruleset loaded? table %s %s with sets %s)" % (*TABLE, ", ".join(SETS.values()))
            elif "Operation not permitted" in done.stderr:
                hint = " (nft needs CAP_NET_ADMIN)"
            raise NftError("nft %s: %s%s" % (" ".join(args), message, hint))
        return done.stdout


def _covers(element: Network, net: Network) -> bool:
    return element.version == net.version and net.subnet_of(element)  # type: ignore[arg-type]


def _element_networks(element: object) -> list[Network]:
    """nft's JSON forms of a set element: an address, a prefix, a range, or any of them wrapped in
    {"elem": {"val": ...}} when the element carries a timeout or a comment."""
    if isinstance(element, dict) and "elem" in element:
        return _element_networks(element["elem"]["val"])
    if isinstance(element, str):
        return [ipaddress.ip_network(element)]
    if isinstance(element, dict) and "prefix" in element:
        prefix = element["prefix"]
        return [ipaddress.ip_network("%s/%d" % (prefix["addr"], prefix["len"]))]
    if isinstance(element, dict) and "range" in element:
        first, last = (ipaddress.ip_address(end) for end in element["range"])
        return list(ipaddress.summarize_address_range(first, last))
    raise TypeError("unknown set element %r" % (element,))


def render_status(status: Status, source: str) -> str:
    lines = ["bypass       %s" % status.state, "ranges       from %s" % source]
    for net in status.ranges:
        lines.append("  %-40s %s" % (net, "bypassed (not steered to the gate)" if net in status.bypassed
                                      else "steered to the gate"))  # fmt: skip
    for name, elements in status.elements.items():
        lines.append("%-12s %s" % (name, ", ".join(elements) or "(empty)"))
    return "\n".join(lines)
