"""Whose site is it? The customer map: address ranges to customer name and contract id, so a
violation names the customer to call. Imported with `icpgate customers import FILE` (CSV or TOML,
docs/violations.md) into the violation log, where every query reads it: no restart, no reload.

A record's destination IP takes the most specific range that holds it.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# CSV headers: English, or as Chinese spreadsheets name them.
HEADERS = {
    "network": ("network", "range", "ranges", "ip", "地址段", "ip段", "ip地址段", "ip地址", "网段"),
    "name": ("name", "customer", "客户", "客户名称", "客户名"),
    "contract": ("contract", "contract_id", "合同", "合同号", "合同编号"),
}
_HEADER_OF = {alias: column for column, aliases in HEADERS.items() for alias in aliases}
_SEPARATORS = re.compile(r"[;；、，,\s]+")
MAX_TEXT = 256


@dataclass(frozen=True, slots=True)
class Customer:
    network: str  # a CIDR range, canonical
    name: str
    contract: str
    line: int = 0


class CustomerError(ValueError):
    def __init__(self, source: str, line: int, field: str, message: str) -> None:
        super().__init__("%s:%d: %s: %s" % (source, line, field or "record", message))


class CustomerMap:
    """Longest-prefix lookup over a few thousand ranges: one dict probe per prefix length in use."""

    def __init__(self, customers: list[Customer]) -> None:
        self.customers = customers
        self.by_length: dict[tuple[int, int], dict[int, Customer]] = {}
        for customer in customers:
            network = ipaddress.ip_network(customer.network)
            key = (network.version, network.prefixlen)
            self.by_length.setdefault(key, {})[int(network.network_address)] = customer
        self.lengths = sorted(self.by_length, key=lambda key: -key[1])

    def lookup(self, ip: str) -> dict[str, str] | None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        value, bits = int(address), address.max_prefixlen
        for version, length in self.lengths:
            if version != address.version:
                continue
            customer = self.by_length[(version, length)].get(value >> (bits - length) << (bits - length))
            if customer:
                return {"name": customer.name, "contract": customer.contract, "network": customer.network}
        return None


def read_customers(path: Path) -> list[Customer]:
    """The whole map from a CSV or TOML file; CustomerError names the file, line and field."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CustomerError(str(path), 0, "", "cannot read: %s" % (error.strerror or error)) from None
    text = _decode(raw, str(path))
    customers = _from_toml(text, str(path)) if path.suffix.lower() == ".toml" else _from_csv(text, str(path))
    seen: dict[str, Customer] = {}
    for customer in customers:
        if customer.network in seen:
            raise CustomerError(str(path), customer.line, "network", "%s is also at line %d"
                                % (customer.network, seen[customer.network].line))  # fmt: skip
        seen[customer.network] = customer
    return customers


def _decode(raw: bytes, source: str) -> str:
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise CustomerError(source, 1, "", "neither UTF-8 nor GB18030 text")


def _from_csv(text: str, source: str) -> list[Customer]:
    reader = csv.reader(io.StringIO(text))
    header = [_HEADER_OF.get(re.sub(r"\s", "", cell).lower(), "") for cell in next(reader, [])]
    for column in ("network", "name"):
        if column not in header:
            raise CustomerError(source, 1, column, "the header lacks this column (%s)" % "/".join(HEADERS[column]))
    customers = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        cells = {name: row[index].strip() for index, name in enumerate(header) if name and index < len(row)}
        customers.extend(_customers(cells.get("network", ""), cells.get("name", ""), cells.get("contract", ""),
                                    source, reader.line_num))  # fmt: skip
    return customers


def _from_toml(text: str, source: str) -> list[Customer]:
    """`[[customer]]` tables: name, contract, ranges (a list of CIDR or first-last ranges)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CustomerError(source, getattr(error, "lineno", 0) or 0, "", str(error)) from None
    unknown = set(data) - {"customer"}
    if unknown:
        raise CustomerError(source, 0, sorted(unknown)[0], "unknown key; expected [[customer]] tables")
    lines = _table_lines(text)
    customers = []
    for index, table in enumerate(data.get("customer", [])):
        line = lines[index] if index < len(lines) else 0
        if not isinstance(table, dict) or set(table) - {"name", "contract", "ranges"}:
            raise CustomerError(source, line, "customer[%d]" % index, "expected keys name, contract, ranges")
        ranges: Any = table.get("ranges", [])
        if not isinstance(ranges, list) or not all(isinstance(item, str) for item in ranges):
            raise CustomerError(source, line, "customer[%d].ranges" % index, "must be a list of strings")
        name, contract = table.get("name", ""), table.get("contract", "")
        if not isinstance(name, str) or not isinstance(contract, str):
            raise CustomerError(source, line, "customer[%d]" % index, "name and contract must be strings")
        customers.extend(_customers(" ".join(ranges), name, contract, source, line, "customer[%d]." % index))
    return customers


def _table_lines(text: str) -> list[int]:
    return [number for number, line in enumerate(text.splitlines(), start=1) if line.strip() == "[[customer]]"]


def _customers(ranges: str, name: str, contract: str, source: str, line: int, prefix: str = "") -> list[Customer]:
    name, contract = name.strip(), contract.strip()
    if not name:
        raise CustomerError(source, line, prefix + "name", "must not be empty")
    for field, value in (("name", name), ("contract", contract)):
        if len(value) > MAX_TEXT or any(char < " " for char in value):
            raise CustomerError(source, line, prefix + field, "at most %d characters, no control characters" % MAX_TEXT)
    parts = [part for part in _SEPARATORS.split(ranges) if part]
    if not parts:
        raise CustomerError(source, line, prefix + "network", "no address range")
    customers = []
    for part in parts:
        try:
            networks = _networks(part)
        except ValueError as error:
            raise CustomerError(source, line, prefix + "network", "%r: %s" % (part, error)) from None
        customers.extend(Customer(str(network), name, contract, line) for network in networks)
    return customers


def _networks(text: str) -> list[Network]:
    """A CIDR range, a single address, or `first-last` (summarised into CIDR blocks)."""
    if "-" in text:
        first, last = (ipaddress.ip_address(part.strip()) for part in text.split("-", 1))
        if first.version != last.version or last < first:
            raise ValueError("not a range from a lower to a higher address of one family")
        return list(ipaddress.summarize_address_range(first, last))  # type: ignore[arg-type]
    return [ipaddress.ip_network(text, strict=True)]
