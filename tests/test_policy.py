"""The decision function over the sample registry: every reason code, suffix attacks, switches."""

from __future__ import annotations

import dataclasses
import ipaddress
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, run
from icpgate.config.settings import load_config
from icpgate.policy.decide import Action, Policy, Reason
from icpgate.policy.pack import load_pack
from icpgate.registry.index_store import open_index
from icpgate.registry.store import open_registry


@pytest.fixture(params=["shared", "dict"])
def policy(request: pytest.FixtureRequest, sample_registry: Path) -> Policy:
    """The same decisions from the shared index file the workers use and from the in-memory one."""
    config = load_config(sample_registry)
    if request.param == "shared":
        index = open_index(config.registry_path)
        request.addfinalizer(index.close)
    else:

        async def load():
            async with open_registry(config.registry_path) as registry:
                return await registry.load_index()

        index = run(load())
    return Policy(load_pack(config.policy_pack).policy, config.provider.id, index)


def with_pack(policy: Policy, **changes) -> Policy:
    return Policy(dataclasses.replace(policy.pack, **changes), policy.provider_id, policy.index)


CASES = [
    ("example-filed.cn", Action.ALLOW, Reason.FILED),
    ("deep.a.b.c.www.example-filed.cn", Action.ALLOW, Reason.FILED),
    ("WWW.Example-Filed.CN.:80", Action.ALLOW, Reason.FILED),
    ("www.示例备案.cn", Action.ALLOW, Reason.FILED),
    ("example-hotpot.cn", Action.ALLOW, Reason.FILED),  # cancelled and active here: active wins
    ("example-pending-access.cn", Action.ALLOW, Reason.ACCESS_PENDING),
    ("example-moving.cn", Action.ALLOW, Reason.ACCESS_PENDING),
    ("example-pending.cn", Action.BLOCK, Reason.PENDING),
    ("example-elsewhere.cn", Action.BLOCK, Reason.FILED_ELSEWHERE),
    ("example-noaccess.cn", Action.BLOCK, Reason.FILED_ELSEWHERE),
    ("example-cancelled.cn", Action.BLOCK, Reason.ACCESS_CANCELLED),
    ("example-left.cn", Action.BLOCK, Reason.ACCESS_CANCELLED),
    ("example-deregistered.cn", Action.BLOCK, Reason.DEREGISTERED),
    ("example-closed.cn", Action.BLOCK, Reason.DEREGISTERED),
    ("example-limited.cn", Action.BLOCK, Reason.LIMITED),
    ("example-unfiled.cn", Action.BLOCK, Reason.UNFILED),
    ("example-filed.cn.evil.net", Action.BLOCK, Reason.UNFILED),
    ("evilexample-filed.cn", Action.BLOCK, Reason.UNFILED),
    ("203.0.113.5", Action.ALLOW, Reason.IP_LITERAL),
    ("[2001:db8::5]:443", Action.ALLOW, Reason.IP_LITERAL),
    ("", Action.BLOCK, Reason.NO_HOST),
    (None, Action.BLOCK, Reason.NO_HOST),
    ("bad host", Action.BLOCK, Reason.INVALID),
]


@pytest.mark.parametrize(("host", "action", "reason"), CASES)
def test_default_pack_decisions(policy: Policy, host: str | None, action: Action, reason: Reason) -> None:
    verdict = policy.decide(host, "203.0.113.10", 443, "tls")
    assert (verdict.action, verdict.reason) == (action, reason)


def test_every_reason_code_is_produced(policy: Policy) -> None:
    produced = {policy.decide(host, "203.0.113.10", 80, "http").reason for host, _, _ in CASES}
    narrow = with_pack(policy, enforce_ranges=(ipaddress.ip_network("203.0.113.0/24"),))
    produced.add(narrow.decide("example-unfiled.cn", "192.0.2.1", 80, "http").reason)
    exempt = with_pack(policy, exempt_domains=frozenset({"example-unfiled.cn"}))
    produced.add(exempt.decide("www.example-unfiled.cn", "203.0.113.10", 80, "http").reason)
    assert produced == set(Reason)


def test_the_matched_label_and_filing_are_reported(policy: Policy) -> None:
    verdict = policy.decide("a.b.www.example-filed.cn", None, None, "http")
    assert verdict.matched == "example-filed.cn"
    assert verdict.filing.licence == "京ICP备20240001号-1"
    assert verdict.host == "a.b.www.example-filed.cn"


def test_destination_ranges_ports_and_exemptions(policy: Policy) -> None:
    narrow = with_pack(
        policy,
        enforce_ranges=(ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/48")),
        exempt_ranges=(ipaddress.ip_network("203.0.113.128/25"),),
        enforce_ports=frozenset({80, 443}),
    )
    decide = narrow.decide
    assert decide("example-unfiled.cn", "203.0.113.10", 80, "http").reason is Reason.UNFILED
    assert decide("example-unfiled.cn", "::ffff:203.0.113.10", 80, "http").reason is Reason.UNFILED
    assert decide("example-unfiled.cn", "2001:db8::9", 443, "tls").reason is Reason.UNFILED
    assert decide("example-unfiled.cn", "198.51.100.1", 80, "http").rule == "enforce.ranges"
    assert decide("example-unfiled.cn", "203.0.113.200", 80, "http").rule == "enforce.exempt_ranges"
    assert decide("example-unfiled.cn", "203.0.113.10", 8080, "http").rule == "enforce.ports"
    assert decide("example-unfiled.cn", "not-an-ip", 80, "http").reason is Reason.UNFILED  # fail closed


def test_policy_switches(policy: Policy) -> None:
    strict = with_pack(policy, access_pending=Action.BLOCK, ip_literal=Action.BLOCK, no_host=Action.ALLOW)
    assert strict.decide("example-pending-access.cn", None, None, "http").action is Action.BLOCK
    assert strict.decide("203.0.113.5", None, None, "http").action is Action.BLOCK
    assert strict.decide(None, None, None, "http").action is Action.ALLOW


def test_acme_exception_is_off_by_default_and_only_for_http_challenges(policy: Policy) -> None:
    path = "/.well-known/acme-challenge/token123"
    assert policy.decide("example-pending.cn", None, 80, "http", path).action is Action.BLOCK
    acme = with_pack(policy, acme_http01=True)
    verdict = acme.decide("example-pending.cn", None, 80, "http", path)
    assert (verdict.action, verdict.reason, verdict.rule) == (Action.ALLOW, Reason.EXEMPT, "rules.acme_http01")
    assert acme.decide("example-pending.cn", None, 80, "http", "/index.html").action is Action.BLOCK
    assert acme.decide("example-pending.cn", None, 443, "tls", path).action is Action.BLOCK
    assert acme.decide("bad host", None, 80, "http", path).reason is Reason.INVALID


def test_require_access_ip(policy: Policy) -> None:
    strict = with_pack(policy, require_access_ip=True)
    inside = strict.decide("example-filed.cn", "203.0.113.44", 443, "tls")
    outside = strict.decide("example-filed.cn", "192.0.2.44", 443, "tls")
    assert inside.reason is Reason.FILED
    assert (outside.reason, outside.rule) == (Reason.FILED_ELSEWHERE, "rules.require_access_ip")
    # An access record without IPs covers every destination.
    assert strict.decide("example-tea.cn", "192.0.2.44", 443, "tls").reason is Reason.FILED
    assert policy.decide("example-filed.cn", "192.0.2.44", 443, "tls").reason is Reason.FILED


LABEL = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=12)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the policy is only read
@given(prefix=LABEL, suffix=st.lists(LABEL, min_size=1, max_size=3))
def test_suffix_attacks_never_match(policy: Policy, prefix: str, suffix: list[str]) -> None:
    for filed in ("example-filed.cn", "example-shop.com.cn"):
        glued = policy.decide(prefix + filed, None, None, "http")  # evilexample-filed.cn
        appended = policy.decide(filed + "." + ".".join(suffix), None, None, "http")  # example-filed.cn.evil.net
        assert glued.matched is None and glued.reason is Reason.UNFILED
        if appended.matched is not None:  # only when the random suffix itself is filed
            assert appended.matched != filed


def test_default_pack_file_loads(policy: Policy) -> None:
    pack = load_pack(REPO / "policies" / "default.toml")
    assert pack.policy == policy.pack
    assert (pack.block.http_status, pack.block.tls_action) == (403, "reset")
