"""Config checking and the CLI, through the real `icpgate` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import EXAMPLE_CONFIG, REPO, check_json, copy_policies, run_icpgate, sample_records


def test_example_config_is_valid() -> None:
    result = run_icpgate("config", "check", "-c", str(EXAMPLE_CONFIG))
    assert result.returncode == 0, result.stderr


def test_unknown_and_missing_keys_are_reported_with_file_key_and_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[provider]\nname = "x"\nbogus = 1\n\n[registry]\npath = 5\n', encoding="utf-8")
    result = run_icpgate("config", "check", "-c", str(config))
    assert result.returncode == 3
    assert "%s:3: provider.bogus: unknown key" % config in result.stderr
    assert "%s:1: provider.id: required key is missing" % config in result.stderr
    assert "%s:6: registry.path: must be a string" % config in result.stderr


def test_toml_syntax_error_has_its_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[provider]\nid = "a"\nname = \n', encoding="utf-8")
    result = run_icpgate("config", "check", "-c", str(config))
    assert result.returncode == 3
    assert "%s:3:" % config in result.stderr


def test_policy_pack_problems_are_reported(tmp_path: Path) -> None:
    policies = copy_policies(tmp_path)
    pack = policies / "default.toml"
    pack.write_text(
        pack.read_text()
        .replace('no_host = "block"', 'no_host = "maybe"')
        .replace("exempt_domains = []", 'exempt_domains = ["com.cn"]'),
        encoding="utf-8",
    )
    lines = pack.read_text().splitlines()
    result = run_icpgate("config", "check", "-c", str(EXAMPLE_CONFIG), "--set", 'policy.pack="%s"' % pack)
    assert result.returncode == 3
    assert "%s:%d: rules.no_host:" % (pack, lines.index('no_host = "maybe"') + 1) in result.stderr
    assert "public suffix" in result.stderr


def test_set_overrides_any_key_and_is_checked(sample_registry: Path, tmp_path: Path) -> None:
    # Another provider id turns our filed site into one filed elsewhere, and vice versa.
    assert check_json(sample_registry, "example-elsewhere.cn")["reason"] == "filed_elsewhere"
    other = check_json(sample_registry, "example-elsewhere.cn", "--set", 'provider.id="IDC-OTHER"')
    assert other["reason"] == "filed"
    bad = run_icpgate("config", "check", "-c", str(sample_registry), "--set", "provider.id=5")
    assert bad.returncode == 3 and "provider.id: must be a string" in bad.stderr
    unquoted = run_icpgate("check", "x.cn", "-c", str(sample_registry), "--set", "registry.path=/tmp/r.db")
    assert unquoted.returncode == 3 and "strings need quotes" in unquoted.stderr


def test_relative_paths_resolve_from_the_config_file(tmp_path: Path) -> None:
    copy_policies(tmp_path)
    config = tmp_path / "icpgate.toml"
    config.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "state/r.db"\n', encoding="utf-8")
    records = tmp_path / "f.ndjson"
    records.write_text(json.dumps(sample_records()[0], ensure_ascii=False) + "\n", encoding="utf-8")
    result = run_icpgate("import", str(records), "-c", str(config), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "state" / "r.db").is_file()


EXPECTED = {
    "example-filed.cn": ("allow", "filed"),
    "example-pending-access.cn": ("allow", "access_pending"),
    "example-pending.cn": ("block", "pending"),
    "example-elsewhere.cn": ("block", "filed_elsewhere"),
    "example-cancelled.cn": ("block", "access_cancelled"),
    "example-deregistered.cn": ("block", "deregistered"),
    "example-limited.cn": ("block", "limited"),
    "example-unfiled.cn": ("block", "unfiled"),
    "203.0.113.5": ("allow", "ip_literal"),
    "bad_host!": ("block", "invalid"),
}


@pytest.mark.parametrize(("host", "expected"), EXPECTED.items())
def test_check_gives_action_and_reason_for_every_status(sample_registry: Path, host: str, expected: tuple) -> None:
    facts = check_json(sample_registry, "www." + host if host[0].isalpha() and "!" not in host else host)
    assert (facts["action"], facts["reason"]) == expected
    for key in ("host", "normalized", "registrable_domain", "action", "reason", "filing", "rule"):
        assert key in facts


def test_check_explains_the_match(sample_registry: Path) -> None:
    facts = check_json(sample_registry, "Shop.Example-Shop.COM.CN", "--ip", "203.0.113.9", "--port", "443")
    assert facts["normalized"] == "shop.example-shop.com.cn"
    assert facts["registrable_domain"] == "example-shop.com.cn"
    assert facts["matched"] == "example-shop.com.cn"
    assert facts["filing"]["licence"] == "沪ICP备20240002号-1"
    assert facts["filing"]["domains"] == ["example-shop.cn", "example-shop.com.cn"]
    assert facts["rule"] == "access.status"
    human = run_icpgate("check", "shop.example-shop.com.cn", "-c", str(sample_registry))
    assert "parent of shop.example-shop.com.cn" in human.stdout
    assert "IDC-EXAMPLE active 203.0.113.0/24 2001:db8::/48  ← ours" in human.stdout
    assert human.stdout.rstrip().endswith("ALLOW (filed)")


def test_check_without_a_registry_says_so(config_path: Path) -> None:
    result = run_icpgate("check", "example.cn", "-c", str(config_path))
    assert result.returncode == 5
    assert "import filings first" in result.stderr
