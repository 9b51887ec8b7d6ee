"""Host normalisation: canonical spellings, refusals with reasons, and properties that hold for any input."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icpgate.names.hostname import HostKind, normalize_host, parent_names


@pytest.mark.parametrize(
    ("raw", "kind", "value"),
    [
        ("Example-Filed.CN", HostKind.NAME, "example-filed.cn"),
        ("example-filed.cn.", HostKind.NAME, "example-filed.cn"),
        ("example-filed.cn:8080", HostKind.NAME, "example-filed.cn"),
        ("example-filed.cn.:443", HostKind.NAME, "example-filed.cn"),
        ("www.中文示例.cn", HostKind.NAME, "www.xn--fiq26an69bm6r.cn"),
        ("www。中文示例。cn", HostKind.NAME, "www.xn--fiq26an69bm6r.cn"),
        ("ＥＸＡＭＰＬＥ.cn", HostKind.NAME, "example.cn"),
        ("www.xn--fiq26an69bm6r.cn", HostKind.NAME, "www.xn--fiq26an69bm6r.cn"),
        ("_acme-challenge.example.cn", HostKind.NAME, "_acme-challenge.example.cn"),
        ("203.0.113.5", HostKind.IPV4, "203.0.113.5"),
        ("203.0.113.5:80", HostKind.IPV4, "203.0.113.5"),
        ("[2001:DB8::1]", HostKind.IPV6, "2001:db8::1"),
        ("[2001:db8:0:0::1]:8443", HostKind.IPV6, "2001:db8::1"),
        ("localhost", HostKind.NAME, "localhost"),
    ],
)
def test_normalises(raw: str, kind: HostKind, value: str) -> None:
    host = normalize_host(raw)
    assert (host.kind, host.value) == (kind, value), host.error


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("example..cn", "empty label"),
        (".example.cn", "empty label"),
        ("-bad.example.cn", "hyphen"),
        ("bad-.example.cn", "hyphen"),
        ("a" * 64 + ".cn", "label longer than 63"),
        (".".join(["a" * 60] * 5), "name longer than 253"),
        ("exa mple.cn", "not allowed"),
        (" example.cn", "not allowed"),
        ("example.cn\t", "not allowed"),
        ("user@example.cn", "not allowed"),
        ("example.cn:99999", "port"),
        ("example.cn:", "port"),
        ("example.cn:80x", "port"),
        ("[2001:db8::1", "unclosed"),
        ("[2001:db8::1]x", "port"),
        ("[fe80::1%eth0]", "zone"),
        ("2001:db8::1", "brackets"),
        ("cafe::1", "brackets"),
        ("1:2:3", "IPv6"),
        ("127.1", "numeric top-level"),
        ("256.1.1.1", "numeric top-level"),
        ("0x7f.0.0.1", "numeric top-level"),
        ("xn--zz.cn", "A-label"),
        ("exa%2emple.cn", "not allowed"),
        ("a" * 2000, "longer than"),
        ("例子\u200d.cn", "internationalised"),
    ],
)
def test_refuses_with_reason(raw: str, reason: str) -> None:
    host = normalize_host(raw)
    assert host.kind is HostKind.INVALID
    assert reason in host.error


def test_parent_names_walks_every_label() -> None:
    assert list(parent_names("a.b.example.com.cn")) == [
        "a.b.example.com.cn",
        "b.example.com.cn",
        "example.com.cn",
        "com.cn",
        "cn",
    ]


@given(st.text(max_size=300))
def test_never_raises_and_is_idempotent(raw: str) -> None:
    host = normalize_host(raw)
    if host.kind is HostKind.INVALID:
        assert host.value == "" and host.error
    else:
        again = normalize_host(host.value)
        assert (again.kind, again.value) == (host.kind, host.value)


DNS_LABEL = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=63).filter(
    lambda s: not s.startswith("-") and not s.endswith("-") and not s.startswith("xn--")
)


@given(st.lists(DNS_LABEL, min_size=1, max_size=6), st.sampled_from(["cn", "com", "net", "com.cn"]))
def test_accepts_what_dns_accepts(labels: list[str], tld: str) -> None:
    name = ".".join([*labels, tld])
    host = normalize_host(name.upper())
    if len(name) <= 253:
        assert (host.kind, host.value) == (HostKind.NAME, name)
    else:
        assert host.kind is HostKind.INVALID


@given(st.text(alphabet=string.printable, min_size=1, max_size=80))
def test_valid_names_obey_dns_rules(raw: str) -> None:
    host = normalize_host(raw)
    if host.kind is HostKind.NAME:
        assert len(host.value) <= 253
        for label in host.value.split("."):
            assert 1 <= len(label) <= 63
            assert set(label) <= set(string.ascii_lowercase + string.digits + "-_")
            assert not label.startswith("-") and not label.endswith("-")
