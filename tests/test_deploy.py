"""Deployment files: the systemd unit passes systemd-analyze, the Dockerfile matches the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

UNIT = REPO / "systemd" / "icpgate.service"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # The unit names /usr/local/bin/icpgate; point it at this install so verify can check it.
    installed = Path(sys.executable).with_name("icpgate")
    unit = tmp_path / "icpgate.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/icpgate", str(installed)))
    result = subprocess.run(
        [shutil.which("systemd-analyze") or "systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warned about


def test_systemd_unit_is_hardened_and_notifies() -> None:
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["DynamicUser"] == "yes"
    assert settings["StateDirectory"] == "icpgate"
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ExecStartPre"].endswith("icpgate config check -c /etc/icpgate/config.toml")
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "WatchdogSec" in settings


def test_dockerfile_copies_what_exists_and_runs_unprivileged() -> None:
    text = (REPO / "Dockerfile").read_text()
    sources = [
        part
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for part in line.split()[1:-1]
    ]
    assert sources and all((REPO / source).exists() for source in sources), sources
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert re.search(r"^USER icpgate$", text, re.M)
    assert "HEALTHCHECK" in text
    # Every stage on the one base, a build argument; the default is a Python >= 3.11 on Debian bookworm.
    assert re.search(r"^ARG BASE=docker\.io/library/python:3\.(1[1-9])-slim-bookworm$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE}", "${BASE}"]
