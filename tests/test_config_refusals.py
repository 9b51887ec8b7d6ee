"""What `icpgate run` refuses at start, `icpgate config check` refuses too, with file, line and key.

Every case goes through both real commands; neither may start anything or print a traceback.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from gatekit import free_port, listener
from gatekit import gate_config as _gate_config

from conftest import copy_policies, run_icpgate


def gate_config(tmp: Path, listeners: dict[str, dict], **options: object) -> Path:
    """A gate config, without importing filings through it: most of these configs refuse every command."""
    (tmp / "registry.db").touch()
    return _gate_config(tmp, listeners, **options)


def refused_by_both(config: Path, *expected: str) -> str:
    """Run `config check` and `run` on `config`: both exit 3 naming every `expected` phrase."""
    outputs = []
    for command in (("config", "check"), ("run",)):
        result = run_icpgate(*command, "-c", str(config))
        assert result.returncode == 3, (command, result.returncode, result.stdout, result.stderr)
        for phrase in expected:
            assert phrase in result.stderr, (command, phrase, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        outputs.append(result.stderr)
    return outputs[0]


def accepted(config: Path) -> None:
    result = run_icpgate("config", "check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "%s: OK" % config


def line_of(config: Path, text: str) -> int:
    return next(number for number, line in enumerate(config.read_text().splitlines(), 1) if line.startswith(text))


# --- the feed: signatures by default ---------------------------------------------------------------


def test_feed_urls_without_public_keys_are_refused(tmp_path: Path) -> None:
    config = gate_config(tmp_path, {"http": listener(free_port(), "http")},
                         tables={"feed": {"urls": ["http://127.0.0.1:9/feed/v1"]}})  # fmt: skip
    stderr = refused_by_both(config, "%s:%d: feed.public_keys:" % (config, line_of(config, "[feed]")),
                             "feed.allow_unsigned = true")  # fmt: skip
    assert "no public key" in stderr
    file_source = gate_config(tmp_path, {"http": listener(free_port(), "http")},
                              tables={"feed": {"urls": ["file:" + str(tmp_path / "drop")]}})  # fmt: skip
    refused_by_both(file_source, "feed.public_keys")  # unsigned files are no better than unsigned HTTP


def test_allow_unsigned_is_an_explicit_waiver(tmp_path: Path) -> None:
    config = gate_config(tmp_path, {"http": listener(free_port(), "http")},
                         tables={"feed": {"urls": ["http://127.0.0.1:9/feed/v1"], "allow_unsigned": True}})  # fmt: skip
    accepted(config)


def test_unreadable_key_and_token_files_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pub"
    (tmp_path / "short.token").write_text("abc\n")
    config = gate_config(tmp_path, {"http": listener(free_port(), "http")}, tables={"feed": {
        "urls": ["http://127.0.0.1:9/feed/v1"], "public_keys": [str(missing)],
        "token_file": str(tmp_path / "short.token")}})  # fmt: skip
    refused_by_both(config, "feed.public_keys: %s: not a readable PEM public key" % missing,
                    "feed.token_file: %s: not a token" % (tmp_path / "short.token"))  # fmt: skip


# --- the TLS block page needs a certificate --------------------------------------------------------


def _page_pack(tmp_path: Path) -> Path:
    pack = copy_policies(tmp_path) / "default.toml"
    pack.write_text(pack.read_text().replace('tls_action = "reset"', 'tls_action = "page"'))
    return pack


def test_a_tls_page_without_a_certificate_is_refused(tmp_path: Path) -> None:
    pack = _page_pack(tmp_path)
    config = gate_config(tmp_path, {"tls": listener(free_port(), "tls")}, pack=pack)
    refused_by_both(config, "gate.tls_certificate", 'tls_action = "page"', str(pack))


def test_a_tls_page_certificate_that_does_not_load_is_refused(tmp_path: Path) -> None:
    pack = _page_pack(tmp_path)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, capture_output=True)
    config = gate_config(tmp_path, {"tls": listener(free_port(), "tls")}, pack=pack,
                         gate={"tls_certificate": str(cert), "tls_key": str(key)})  # fmt: skip
    refused_by_both(config, "%s:%d: gate.tls_certificate: cannot load %s" % (config, line_of(config, "tls_cert"),
                                                                              cert))  # fmt: skip


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    config = gate_config(tmp_path, {"http": listener(free_port(), "http")},
                         gate={"tls_certificate": str(tmp_path / "cert.pem")})  # fmt: skip
    refused_by_both(config, "gate.tls_key: gate.tls_certificate is set")


def test_block_page_texts_missing_a_reason_are_refused(tmp_path: Path) -> None:
    policies = copy_policies(tmp_path)
    messages = policies / "templates" / "messages.toml"
    text = messages.read_text()
    messages.write_text(text.replace("[pending]", "[pending_was_renamed]", 1))
    assert "[pending]" in text
    config = gate_config(tmp_path, {"http": listener(free_port(), "http")}, pack=policies / "default.toml")
    refused_by_both(config, "%s: pending: missing the texts for this reason" % messages)


# --- listeners that cannot all bind ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1", "127.0.0.1"),  # an exact duplicate (here one http, one tls)
        ("0.0.0.0", "127.0.0.1"),  # the wildcard takes the port on every IPv4 address
        ("127.0.0.1", "0.0.0.0"),
        ("::", "::1"),
    ],
)
def test_two_listeners_on_one_port_are_refused(tmp_path: Path, first: str, second: str) -> None:
    port = free_port()
    config = gate_config(tmp_path, {"a": listener(port, "http", address=first),
                                    "b": listener(port, "tls", address=second)})  # fmt: skip
    line = [number for number, text in enumerate(config.read_text().splitlines(), 1) if text == "port = %d" % port][1]
    refused_by_both(config, "%s:%d: listeners[1].port:" % (config, line), "collides with listeners[0]")


def test_a_listener_on_the_admin_port_is_refused(tmp_path: Path) -> None:
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", address="0.0.0.0")},
                         tables={"admin": {"enabled": True, "address": "127.0.0.1", "port": port}})  # fmt: skip
    refused_by_both(config, "admin.port:", "collides with listeners[0]")


def test_listeners_that_can_share_a_port_are_accepted(tmp_path: Path) -> None:
    port = free_port()
    accepted(gate_config(tmp_path, {
        "one": listener(port, "http"), "two": listener(port, "tls", address="127.0.0.2"),
        "v6": listener(port, "http", address="::1"), "other": listener(free_port(), "http", address="0.0.0.0"),
    }))  # fmt: skip


# --- timers that contradict each other ------------------------------------------------------------


def test_a_silent_client_budget_shorter_than_the_server_first_wait_is_refused(tmp_path: Path) -> None:
    config = gate_config(tmp_path, {"auto": listener(free_port(), "auto")},
                         gate={"server_first_wait": 5.0, "server_first_timeout": 5.0})  # fmt: skip
    refused_by_both(config, "%s:%d: gate.server_first_timeout:" % (config, line_of(config, "server_first_timeout")),
                    "longer than gate.server_first_wait (5 s)")  # fmt: skip
    accepted(gate_config(tmp_path, {"auto": listener(free_port(), "auto")},
                         gate={"server_first_wait": 5.0, "server_first_timeout": 6.0}))  # fmt: skip
