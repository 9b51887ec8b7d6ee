"""The admin API against its own OpenAPI document: schemathesis drives the running server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from adminkit import TOKEN, start_observed_gate
from test_gate_process import http_get

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_schemathesis_finds_no_server_errors_and_no_schema_violations(tmp_path: Path, origin) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls)
    try:
        for host in ("one.example-unfiled.cn", "two.example-unfiled.cn", "bad_host!"):
            http_get(observed.http, host)  # some records, so the listings have items to check
        seed = ["--seed", "20261122"] if os.environ.get("CI") else []  # CI lands on a fixed draw
        result = subprocess.run(
            [str(SCHEMATHESIS), "run", "http://127.0.0.1:%d/openapi.json" % observed.admin, "--checks", "all",
             "--max-examples", "60", "--generation-database", "none", "-H", "Authorization: Bearer " + TOKEN,
             *seed],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
        assert " passed" in result.stdout and "Tested: 11" in result.stdout
    finally:
        assert observed.gate.stop() == 0
    assert "Traceback" not in observed.gate.log()
