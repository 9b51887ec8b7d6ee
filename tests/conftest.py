"""Shared fixtures: the repository's own example config and samples, in a temporary registry."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "daemon" / "icpgate" / "samples" / "filings.ndjson"
SAMPLE_CSV = REPO / "daemon" / "icpgate" / "samples" / "filings.csv"
EXAMPLE_CONFIG = REPO / "config.example.toml"
ICPGATE = [sys.executable, "-m", "icpgate"]


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The example config with its registry in a temporary folder (policies from the repo)."""
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    text = text.replace('path = "var/registry.db"', 'path = "%s"' % (tmp_path / "registry.db"))
    text = text.replace('pack = "policies/default.toml"', 'pack = "%s"' % (REPO / "policies" / "default.toml"))
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_icpgate(*args: str, check: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `icpgate` command in a subprocess."""
    return subprocess.run([*ICPGATE, *args], capture_output=True, text=True, check=check, timeout=120, cwd=cwd)


@pytest.fixture
def sample_registry(config_path: Path) -> Path:
    """The example config with the bundled sample filings imported."""
    result = run_icpgate("import", str(SAMPLES), "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    return config_path


def check_json(config: Path, host: str, *extra: str) -> dict:
    result = run_icpgate("check", host, "--json", "-c", str(config), *extra)
    assert result.returncode in (0, 1), result.stderr
    facts = json.loads(result.stdout)
    assert (result.returncode == 0) == (facts["action"] == "allow")
    return facts


def write_ndjson(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def sample_records() -> list[dict]:
    return [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]


def run(coro):
    return asyncio.run(coro)


def copy_policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target)
    return target
