"""The house's rules: the layers and the absence of import cycles (import-linter's contracts in
pyproject.toml), and docs/architecture.md naming only modules that exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "daemon" / "icpgate"
ARCHITECTURE = REPO / "docs" / "architecture.md"
MODULE_PATH = re.compile(r"`((?:[a-z_]+/)+[a-z_]+\.pyx?)`|\(`?((?:[a-z_]+/)+[a-z_]+\.pyx?)`?")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([command, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout, result.stdout


def test_a_cycle_breaks_the_contract(tmp_path: Path) -> None:
    """The check can fail: a copy of the package with one back-edge inside the gate is refused."""
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "daemon" / "icpgate", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    sniff = copy / "daemon" / "icpgate" / "gate" / "sniff.py"
    sniff.write_text(sniff.read_text() + "\nfrom . import auto  # noqa: E402\n")
    env = {**os.environ, "PYTHONPATH": str(copy / "daemon")}
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([command, "--no-cache"], cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout
    assert ".sniff -> .auto" in result.stdout


def test_every_module_the_architecture_names_exists() -> None:
    text = ARCHITECTURE.read_text()
    named = {first or second for first, second in MODULE_PATH.findall(text)}
    assert len(named) > 40, "the architecture document names the modules it describes"
    missing = sorted(path for path in named if not (PACKAGE / path).is_file() and not (REPO / path).is_file())
    assert not missing, "docs/architecture.md names modules that do not exist: %s" % missing


def test_every_package_says_what_it_owns() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        text = init.read_text()
        assert text.startswith('"""') and len(text.split('"""')[1].split()) >= 12, init
