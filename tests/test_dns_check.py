"""DNS confirmation against a real dnsmasq and a server that never answers, on a real violation log."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest
from dnskit import SilentResolver, start_dnsmasq

from icpgate.config.settings import DnsConfig
from icpgate.reports.dns_check import Confirmer
from icpgate.violations.store import Filters, open_violations

RANGES = (ipaddress.ip_network("192.0.2.0/24"),)


def dns_config(*resolvers: tuple[str, int], rate: float = 100.0, timeout: float = 2.0) -> DnsConfig:
    return DnsConfig(enabled=True, resolvers=resolvers, hosted_ranges=RANGES, rate=rate, timeout=timeout,
                     min_ttl=1.0, max_ttl=3600.0, recheck_after=86400.0)  # fmt: skip


def record(host: str, ip: str = "127.0.0.1") -> dict:
    return {(host, ip, 80, "http", "unfiled"): [time.time(), time.time(), 1, 0, None]}


@pytest.fixture
def dnsmasq(tmp_path: Path):
    server = start_dnsmasq(tmp_path, hosts={"a.example-one.cn": "192.0.2.1", "b.example-two.cn": "198.51.100.2",
                                            "v6.example-three.cn": "2001:db8::3"}, ttl=300)  # fmt: skip
    yield server
    server.stop()


async def test_an_unanswering_server_marks_an_error_after_the_timeout(tmp_path: Path) -> None:
    silent = SilentResolver()
    try:
        async with open_violations(tmp_path / "v.db") as store:
            await store.write(record("quiet.example-unfiled.cn"))
            started = time.monotonic()
            assert (
                await Confirmer(dns_config(("127.0.0.1", silent.port), timeout=1.0), store, RANGES).check_pending() == 1
            )
            assert 0.9 <= time.monotonic() - started < 5
            (item,) = (await store.query(Filters()))[1]
        assert item["dns"]["state"] == "error" and "timeout" in item["dns"]["detail"]
        assert item["dns"]["addresses"] == [] and item["dns"]["checked_at"]
    finally:
        silent.close()


async def test_answers_are_cached_for_their_ttl(tmp_path: Path, dnsmasq) -> None:
    async with open_violations(tmp_path / "v.db") as store:
        confirmer = Confirmer(dns_config(("127.0.0.1", dnsmasq.port)), store, RANGES)
        await store.write(record("a.example-one.cn", "127.0.0.1"))
        await confirmer.check_pending()
        await store.write(record("a.example-one.cn", "127.0.0.2"))  # the same host seen on another address
        await confirmer.check_pending()
        items = (await store.query(Filters(domain="example-one.cn")))[1]
    assert [item["dns"]["state"] for item in items] == ["confirmed", "confirmed"]
    assert dnsmasq.queries("a.example-one.cn") == 2  # A and AAAA once: the second record used the cache


async def test_a_v6_answer_outside_our_ranges_is_not_hosted(tmp_path: Path, dnsmasq) -> None:
    async with open_violations(tmp_path / "v.db") as store:
        await store.write(record("v6.example-three.cn") | record("b.example-two.cn"))
        await Confirmer(dns_config(("127.0.0.1", dnsmasq.port)), store, RANGES).check_pending()
        items = {item["host"]: item["dns"] for item in (await store.query(Filters()))[1]}
    assert items["v6.example-three.cn"] == items["v6.example-three.cn"] | {"state": "not_hosted",
                                                                           "addresses": ["2001:db8::3"]}  # fmt: skip
    assert items["b.example-two.cn"]["state"] == "not_hosted"


async def test_queries_keep_to_the_rate(tmp_path: Path, dnsmasq) -> None:
    async with open_violations(tmp_path / "v.db") as store:
        hosts = {}
        for number in range(6):
            hosts |= record("h%d.example-rate.cn" % number)
        await store.write(hosts)
        started = time.monotonic()
        await Confirmer(dns_config(("127.0.0.1", dnsmasq.port), rate=4.0), store, RANGES).check_pending()
        elapsed = time.monotonic() - started
    # 12 queries at 4 a second, with a burst of 4: at least 2 s.
    assert elapsed >= 1.9
