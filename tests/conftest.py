"""Shared fixtures: the repository's own example config and samples, in a temporary registry."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# CI runs the same examples every time (a landing must not hinge on a random draw); developers'
# runs keep drawing new ones, which is where the property tests find things.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
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


# --- the gate stack: certificates, origin and a gate, shared by the gate tests -------------------
SAMPLE_NAMES = [
    "example-filed.cn",
    "*.example-filed.cn",
    "example-unfiled.cn",
    "*.example-unfiled.cn",
    "example-pending.cn",
    "example-shop.com.cn",
    "localhost",
]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import trustme

    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert(*SAMPLE_NAMES)
    paths = {
        "ca": directory / "ca.pem",
        "server": directory / "server.pem",
        "key": directory / "key.pem",
        "cert": directory / "cert.pem",
    }
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_and_cert_chain_pem.write_to_path(paths["server"])
    cert.private_key_pem.write_to_path(paths["key"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    return paths


@pytest.fixture(scope="session")
def origin(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]):
    from gatekit import start_origin

    running = start_origin(tmp_path_factory.mktemp("origin"), certs["server"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A feed signing key pair, and another one a publisher does not sign with (files that want
    the pair as a tuple define their own)."""
    from feedkit import make_key

    folder = tmp_path_factory.mktemp("keys")
    private, public = make_key(folder / "feed.pem")
    other_private, other_public = make_key(folder / "other.pem")
    return {"private": private, "public": public, "other_private": other_private, "other_public": other_public}


@pytest.fixture
def publisher(tmp_path: Path, keys: dict[str, Path]):
    """A real publisher signing with `keys["private"]`, stopped after the test."""
    from feedkit import start_publisher

    running = start_publisher(tmp_path / "publisher", keys["private"])
    yield running
    running.stop()


def standard_listeners(origin) -> tuple[dict[str, dict], dict[str, int]]:
    from gatekit import free_port, listener

    ports = {
        name: free_port() for name in ("http", "tls", "tls_echo", "tls_record", "http_record", "proxy_v1", "proxy_v2")
    }
    listeners = {
        "http": listener(ports["http"], "http", origin.http),
        "tls": listener(ports["tls"], "tls", origin.tls),
        "tls_echo": listener(ports["tls_echo"], "tls", origin.tls_echo),
        "tls_record": listener(ports["tls_record"], "tls", origin.record_port),
        "http_record": listener(ports["http_record"], "http", origin.record_port),
        "proxy_v1": listener(ports["proxy_v1"], "tls", origin.record_port, proxy_protocol="v1"),
        "proxy_v2": listener(ports["proxy_v2"], "http", origin.record_port, proxy_protocol="v2"),
    }
    return listeners, ports


@pytest.fixture(scope="session")
def gate(tmp_path_factory: pytest.TempPathFactory, origin):
    """One gate for the many tests that only need the default pack."""
    from gatekit import gate_config, start_gate

    listeners, ports = standard_listeners(origin)
    running = start_gate(gate_config(tmp_path_factory.mktemp("gate"), listeners), ports)
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log(), running.log()


def import_json(config: Path, path: Path, *extra: str) -> tuple[int, dict]:
    """`icpgate import PATH --json`: the exit code and the report; never a traceback."""
    result = run_icpgate("import", str(path), "-c", str(config), "--json", *extra)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)
