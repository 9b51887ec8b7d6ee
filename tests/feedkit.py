"""A real publisher, edge configs and a fault-injecting HTTP proxy for the feed tests."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientSession, web
from cryptography.hazmat.primitives import serialization
from gatekit import child_output, free_port, wait_for_port

from conftest import REPO, SAMPLES, run_icpgate, sample_records, write_ndjson


def make_key(path: Path) -> tuple[Path, Path]:
    """An Ed25519 key pair made by openssl, as an operator would: (private PEM, public PEM)."""
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)], check=True, capture_output=True)
    public = path.with_suffix(".pub")
    subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout", "-out", str(public)], check=True,
                   capture_output=True)  # fmt: skip
    return path, public


def sign_with(private: Path, body: bytes) -> str:
    """The signature header value, made independently of icpgate's signing code."""
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519 %s %s" % (hashlib.sha256(raw).hexdigest()[:16], base64.b64encode(key.sign(body)).decode())


def bulk_records(start: int, count: int) -> list[dict]:
    """`count` distinct approved filings at IDC-EXAMPLE, numbered from `start`."""
    template = sample_records()[0]
    records = []
    for number in range(start, start + count):
        subject = "京ICP备2077%04d号" % number
        records.append(template | {"licence": subject + "-1", "subject_licence": subject,
                                   "domains": ["bulk-%d.example-feed.cn" % number]})  # fmt: skip
    return records


def config_text(tmp: Path, *, registry: Path, feed: dict | None = None, publish: dict | None = None) -> Path:
    lines = [
        "[provider]", 'id = "IDC-EXAMPLE"', "[registry]", 'path = "%s"' % registry, "reload_interval = 0.2",
        "[policy]", 'pack = "%s"' % (REPO / "policies" / "default.toml"),
        "[admin]", "enabled = false", "[dns]", "enabled = false",
    ]  # fmt: skip
    for table, values in (("feed", feed), ("publish", publish)):
        if values:
            lines.append("[%s]" % table)
            lines += ["%s = %s" % (key, json.dumps(value)) for key, value in values.items()]
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_tokens(folder: Path, *names: str) -> dict[str, Path]:
    """A publisher's tokens file (`name token` lines, tokens from openssl) and one token file per
    edge, as an operator would hand them out: {"tokens": the publisher's file, name: the edge's file}."""
    files, lines = {}, ["# the edges allowed to follow this publisher"]
    for name in names:
        token = subprocess.run(["openssl", "rand", "-hex", "32"], check=True, capture_output=True, text=True).stdout
        files[name] = folder / ("%s.token" % name)
        files[name].write_text(token)
        lines.append("%s %s" % (name, token.strip()))
    files["tokens"] = folder / "tokens"
    files["tokens"].write_text("\n".join(lines) + "\n")
    return files


@dataclass
class Publisher:
    config: Path
    port: int
    process: subprocess.Popen
    log: Path
    edge_token: Path  # the token file an edge of this publisher uses (feed.token_file)

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/feed/v1" % self.port

    @property
    def token(self) -> str:
        return self.edge_token.read_text().strip()

    def get(self, path: str, headers: dict | None = None, token: str | None = None):
        """urlopen on the publisher with the edge's token (or `token`); HTTPError for 4xx/5xx."""
        auth = {"Authorization": "Bearer " + (self.token if token is None else token)} if token != "" else {}
        request = urllib.request.Request(self.url + path, headers=auth | (headers or {}))
        return urllib.request.urlopen(request, timeout=30)

    def status(self) -> dict:
        with self.get("/") as response:
            return json.loads(response.read())

    def wait_for_snapshot(self, serial: int | None = None, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status["snapshot"] and status["snapshot"]["serial"] == (serial or status["serial"]):
                return
            time.sleep(0.05)
        raise TimeoutError("no snapshot of serial %s:\n%s" % (serial, self.log.read_text()))

    def import_records(self, records: list[dict], *extra: str) -> dict:
        path = write_ndjson(self.config.parent / "batch.ndjson", records)
        result = run_icpgate("import", str(path), "-c", str(self.config), "--json", *extra)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_publisher(tmp: Path, signing_key: Path | None, records: list[dict] | None = None, port: int | None = None,
                    **publish: object) -> Publisher:  # fmt: skip
    """A publisher on loopback over its own registry, holding the samples (or `records`)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "tokens").exists():
        write_tokens(tmp, "edge", "other-edge")
    options = {"signing_key": str(signing_key)} if signing_key else {}
    options["tokens_file"] = str(tmp / "tokens")
    config = config_text(tmp, registry=tmp / "registry.db", publish=options | publish)
    if not (tmp / "registry.db").exists():
        source = write_ndjson(tmp / "initial.ndjson", records) if records is not None else SAMPLES
        assert run_icpgate("import", str(source), "-c", str(config)).returncode == 0
    log = tmp / "publisher.log"
    # Without a port of its own, the publisher binds port 0 and its log says which port it got: a
    # port chosen free here could be taken by anything on the machine before the child binds it.
    process = subprocess.Popen([sys.executable, "-m", "icpgate", "feed", "serve", "--listen",
                                "127.0.0.1:%d" % (port or 0), "-c", str(config)], stdout=log.open("w"),
                               stderr=subprocess.STDOUT)  # fmt: skip
    port = port or listening_port(process, log)
    wait_for_port(port, process=process, log=log)
    publisher = Publisher(config, port, process, log, tmp / "edge.token")
    publisher.wait_for_snapshot()
    return publisher


def listening_port(process: subprocess.Popen, log: Path, timeout: float = 20.0) -> int:
    """The port a publisher started on port 0 listens on, from its start line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"feed publisher listening on http://127\.0\.0\.1:(\d+)/", log.read_text(errors="replace"))
        if found:
            return int(found[1])
        if process.poll() is not None:
            raise RuntimeError("%s exited with %s:\n%s" % (" ".join(map(str, process.args)), process.returncode,
                                                           child_output(process, log)))  # fmt: skip
        time.sleep(0.05)
    raise TimeoutError("the publisher did not start within %gs:\n%s" % (timeout, log.read_text(errors="replace")))


def edge_config(tmp: Path, urls: list[str], public_keys: list[Path] = (), token: Path | None = None,
                **feed: object) -> Path:  # fmt: skip
    """An edge's config: its feed sources, the publisher's public keys and its token file."""
    options = {"urls": urls, "public_keys": [str(key) for key in public_keys], "start_delay": 0,
               "connect_timeout": 2, "read_timeout": 2, "wait": 0} | feed  # fmt: skip
    if token:
        options["token_file"] = str(token)
    return config_text(tmp, registry=tmp / "registry.db", feed=options)


def feed_sync(config: Path, *extra: str) -> tuple[int, dict]:
    result = run_icpgate("feed", "sync", "--json", "-c", str(config), *extra)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def feed_status(config: Path) -> dict:
    result = run_icpgate("feed", "status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- bodies ---------------------------------------------------------------------------------------


def body_lines(body: bytes) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(body).splitlines() if line.strip()]


def make_body(lines: list[dict], fix_count: bool = True) -> bytes:
    if fix_count:
        lines[0]["records"] = len(lines) - 1
    return gzip.compress(b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines))


# --- the fault proxy ------------------------------------------------------------------------------

# A fault gets (path, status, headers, body) from the publisher and returns what to do instead:
# a (status, headers, body) triple, or one of the strings "stall" and "cut" (both send half the body).
Fault = Callable[[str, int, dict, bytes], "tuple[int, dict, bytes] | str"]


def re_signed(private: Path, edit: Callable[[list[bytes]], list[bytes]]) -> Fault:
    """A fault: the body's lines (JSON, ASCII-escaped) changed by `edit` and signed again with the
    publisher's key, as a buggy or hostile publisher would send them: only the content is wrong."""

    def fault(_path: str, status: int, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        lines = edit([json.dumps(line).encode() for line in body_lines(body)])
        edited = gzip.compress(b"".join(line + b"\n" for line in lines))
        return status, headers | {"Icpgate-Signature": sign_with(private, edited)}, edited

    return fault


class FaultProxy:
    """Forwards to the publisher, letting a test rewrite or break answers at the HTTP layer."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.fault: Fault | None = None
        self.paths: tuple[str, ...] = ("/feed/v1/changes", "/feed/v1/snapshot")
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/feed/v1" % self.port

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        url = self.upstream + request.path.removeprefix("/feed/v1") + ("?" + request.query_string
                                                                       if request.query_string else "")  # fmt: skip
        forwarded = {k: v for k, v in request.headers.items() if k.lower() in ("if-none-match", "authorization")}
        async with ClientSession(auto_decompress=False) as session, session.get(url, headers=forwarded) as upstream:
            status, body = upstream.status, await upstream.read()
            headers = {k: v for k, v in upstream.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "date", "server")}  # fmt: skip
        fault = self.fault
        action = fault(request.path, status, headers, body) if fault and request.path in self.paths else None
        if action is None:
            return web.Response(status=status, headers=headers, body=body)
        if isinstance(action, str):
            response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(body))})
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            if action == "stall":
                await asyncio.sleep(30)
            request.transport.abort()
            return response
        status, headers, body = action
        return web.Response(status=status, headers=headers, body=body)
