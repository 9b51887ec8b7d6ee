"""Who may follow a publisher, and what an edge accepts: bearer tokens on `icpgate feed serve`,
signatures required unless waived. Real publisher, real edges, real gate, on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from feedkit import config_text, edge_config, feed_sync, make_key, start_publisher
from gatekit import free_port, start_gate, wait_for_port
from test_feed_daemon import edge_gate_config
from test_gate_process import http_get, status_of, wait_until

from conftest import SAMPLES, run_icpgate


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_key(tmp_path_factory.mktemp("keys") / "feed.pem")


@pytest.fixture
def publisher(tmp_path: Path, keys):
    publisher = start_publisher(tmp_path / "publisher", keys[0])
    yield publisher
    publisher.stop()


def answer_code(publisher, path: str, token: str | None) -> tuple[int, dict]:
    try:
        with publisher.get(path, token=token) as answer:
            return answer.status, dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


@pytest.mark.parametrize("path", ["/", "/snapshot", "/changes?since=0"])
def test_every_path_needs_a_valid_token(publisher, path: str) -> None:
    code, headers = answer_code(publisher, path, "")
    assert (code, headers["WWW-Authenticate"]) == (401, 'Bearer realm="icpgate-feed"')
    code, headers = answer_code(publisher, path, "f" * 64)  # well formed, but nobody's
    assert (code, headers["WWW-Authenticate"]) == (401, 'Bearer realm="icpgate-feed", error="invalid_token"')
    assert answer_code(publisher, path, publisher.token[:-1])[0] == 401  # one character short
    assert answer_code(publisher, path, "Basic " + publisher.token)[0] == 401
    other = (publisher.edge_token.parent / "other-edge.token").read_text().strip()
    assert answer_code(publisher, path, publisher.token)[0] == 200
    assert answer_code(publisher, path, other)[0] == 200  # each edge its own token


def test_an_edge_syncs_with_its_token_and_not_without(publisher, tmp_path: Path, keys) -> None:
    anonymous = edge_config(tmp_path / "anonymous", [publisher.url], [keys[1]])
    code, outcome = feed_sync(anonymous)
    assert (code, outcome["result"]) == (7, "error") and "401" in outcome["message"], outcome
    edge = edge_config(tmp_path / "edge", [publisher.url], [keys[1]], publisher.edge_token)
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"]) == (0, "applied"), outcome
    status = run_icpgate("feed", "status", "-c", str(edge))
    assert "signatures   required (1 public key in feed.public_keys)" in status.stdout
    log = publisher.log.read_text()
    listening = "feed publisher listening on http://127.0.0.1:%d/feed/v1" % publisher.port
    assert listening + " (bearer tokens for 2 edge(s)" in log
    assert "refused a request from 127.0.0.1: no token" in log
    for text in (log, status.stdout, status.stderr, json.dumps(outcome)):
        assert publisher.token not in text


def test_a_new_edge_is_let_in_without_a_restart_and_a_broken_file_changes_nothing(publisher) -> None:
    tokens = publisher.edge_token.parent / "tokens"
    newcomer = "n" * 40
    assert answer_code(publisher, "/", newcomer)[0] == 401
    tokens.write_text(tokens.read_text() + "newcomer %s\n" % newcomer)
    wait_until(lambda: answer_code(publisher, "/", newcomer)[0] == 200, timeout=10)
    tokens.write_text(tokens.read_text() + "broken line with three fields\n")
    wait_until(lambda: "tokens file changed but cannot be used" in publisher.log.read_text(), timeout=10)
    assert answer_code(publisher, "/", newcomer)[0] == 200  # the last good tokens stay in force
    assert "%s:5: expected `name token`, found 5 fields" % tokens in publisher.log.read_text()
    assert newcomer not in publisher.log.read_text()


def test_serve_refuses_to_start_without_tokens_unless_told(tmp_path: Path) -> None:
    config = config_text(tmp_path, registry=tmp_path / "registry.db")
    assert run_icpgate("import", str(SAMPLES), "-c", str(config)).returncode == 0
    port = free_port()
    refused = run_icpgate("feed", "serve", "--listen", "127.0.0.1:%d" % port, "-c", str(config))
    assert refused.returncode == 3
    assert "publish.tokens_file is not set in %s" % config in refused.stderr and "--no-auth" in refused.stderr
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "icpgate", "feed", "serve", "--no-auth", "--listen",
                                "127.0.0.1:%d" % port, "-c", str(config)], stderr=log.open("w"))  # fmt: skip
    try:
        wait_for_port(port, process=process, log=log)
        wait_until(lambda: "snapshot of serial 1 ready" in log.read_text(), timeout=20)
        with urllib.request.urlopen("http://127.0.0.1:%d/feed/v1/snapshot" % port, timeout=10) as answer:
            assert answer.status == 200 and answer.headers["Cache-Control"].startswith("public")
        assert "WARNING icpgate.publisher: feed publisher listening on http://127.0.0.1:%d/feed/v1 (NO AUTHENTICATION" \
               % port in log.read_text()  # fmt: skip
    finally:
        process.terminate()
        assert process.wait(10) == 0


def test_a_publisher_that_cannot_start_says_why(tmp_path: Path, keys) -> None:
    """The kit shows what the publisher said (here: a tokens file it refuses), not an error of its own."""
    folder = tmp_path / "publisher"
    folder.mkdir()
    (folder / "tokens").write_text("edge not-a-token\n")
    with pytest.raises(RuntimeError, match=r"exited with 3:\n.*publish\.tokens_file: .*tokens:1: the token for edge"):
        start_publisher(folder, keys[0])


def test_a_port_in_use_is_a_clear_error(publisher, tmp_path: Path) -> None:
    result = run_icpgate("feed", "serve", "--listen", "127.0.0.1:%d" % publisher.port, "-c", str(publisher.config))
    assert result.returncode == 6
    assert "cannot listen on 127.0.0.1:%d" % publisher.port in result.stderr and "Traceback" not in result.stderr


def test_unsigned_feeds_need_the_waiver_and_are_warned_about(tmp_path: Path, origin) -> None:
    publisher = start_publisher(tmp_path / "publisher", None)  # signs nothing
    try:
        feed = {"urls": [publisher.url], "token_file": str(publisher.edge_token), "start_delay": 0, "wait": 10}
        port = free_port()
        refused = edge_gate_config(tmp_path / "refused", port, origin.http, feed)
        result = run_icpgate("feed", "sync", "-c", str(refused))
        assert result.returncode == 3 and "feed.public_keys: feed.urls is set but no public key" in result.stderr
        config = edge_gate_config(tmp_path / "edge", port, origin.http, feed | {"allow_unsigned": True})
        gate = start_gate(config, {"http": port})
        try:
            wait_until(lambda: status_of(http_get(port, "example-filed.cn")) == 200, timeout=20)
            wait_until(lambda: "UNSIGNED data applied" in gate.log(), timeout=5)
            warned = re.search(r"WARNING \[worker=\S+ pid=\d+\] icpgate\.feed: feed: serial 0 -> 1", gate.log())
            assert warned, gate.log()
        finally:
            assert gate.stop() == 0
        status = run_icpgate("feed", "status", "-c", str(config))
        assert "signatures   NOT REQUIRED (feed.allow_unsigned = true)" in status.stdout
        assert json.loads(run_icpgate("feed", "status", "--json", "-c", str(config)).stdout)["signatures"] == {
            "required": False, "keys": 0, "allow_unsigned": True}  # fmt: skip
        assert publisher.token not in gate.log() + publisher.log.read_text()
    finally:
        publisher.stop()
