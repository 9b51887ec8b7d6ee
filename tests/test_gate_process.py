"""The gate as a process: reload, readiness, workers, drain, limits, upstream modes, block actions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gatekit import (
    closed_by_peer,
    free_port,
    gate_config,
    listener,
    python_hello,
    send_in_pieces,
    start_gate,
    wait_for_port,
)

from conftest import copy_policies, sample_records, write_ndjson


def http_get(port: int, host: str, path: str = "/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path.encode(), host.encode()))
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response else 0


def one_http_listener(port: int, backend_port: int) -> dict[str, dict]:
    return {"http": listener(port, "http", backend_port)}


def edit_pack(policies: Path, old: str, new: str) -> Path:
    pack = policies / "default.toml"
    text = pack.read_text()
    assert old in text
    pack.write_text(text.replace(old, new))
    return pack


def wait_until(condition, timeout: float = 10.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(step)


def all_get(port: int, host: str, status: int, count: int = 10) -> bool:
    """`count` requests in a row answered `status`: with several workers, each has its turn."""
    return all(status_of(http_get(port, host)) == status for _ in range(count))


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_and_a_bad_reload_keeps_the_old_state(tmp_path: Path, origin, workers: int) -> None:
    policies = copy_policies(tmp_path)
    port = free_port()
    config = gate_config(tmp_path, one_http_listener(port, origin.http), pack=policies / "default.toml",
                         gate={"workers": workers})  # fmt: skip
    gate = start_gate(config, {"http": port})
    try:
        assert all_get(port, "example-unfiled.cn", 403)
        edit_pack(policies, "http_status = 403", "http_status = 451")
        gate.signal(signal.SIGHUP)
        wait_until(lambda: all_get(port, "example-unfiled.cn", 451))
        edit_pack(policies, 'no_host = "block"', 'no_host = "sometimes"')
        gate.signal(signal.SIGHUP)
        wait_until(lambda: gate.log().count("reload refused") >= workers)
        assert "rules.no_host" in gate.log()
        assert all_get(port, "example-unfiled.cn", 451)  # the last good pack stays in force
        assert all_get(port, "example-filed.cn", 200)
    finally:
        assert gate.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_an_approval_imported_while_running_is_served_within_seconds(tmp_path: Path, origin, workers: int) -> None:
    port = free_port()
    config = gate_config(tmp_path, one_http_listener(port, origin.http), gate={"workers": workers})
    gate = start_gate(config, {"http": port})
    try:
        assert b"reason=unfiled" in http_get(port, "www.example-newly-approved.cn")
        record = sample_records()[0] | {
            "licence": "京ICP备20249999号-1",
            "subject_licence": "京ICP备20249999号",
            "domains": ["example-newly-approved.cn"],
        }
        imported = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "icpgate",
                "import",
                str(write_ndjson(tmp_path / "new.ndjson", [record])),
                "-c",
                str(config),
            ],
            check=True,
            capture_output=True,
        )
        wait_until(lambda: all_get(port, "www.example-newly-approved.cn", 200, 4), timeout=5)
        assert time.monotonic() - imported < 5
    finally:
        gate.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_is_notified_after_the_listeners_are_bound(tmp_path: Path, origin, workers: int) -> None:
    notify_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(30)
    port = free_port()
    config = gate_config(tmp_path, one_http_listener(port, origin.http), gate={"workers": workers})
    process = subprocess.Popen(
        [sys.executable, "-m", "icpgate", "run", "-c", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"},
        stderr=subprocess.DEVNULL,
    )
    try:
        message = receiver.recv(256).decode()
        assert message == "READY=1"
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # bound by then
        assert receiver.recv(256).decode() == "WATCHDOG=1"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        messages = []
        receiver.settimeout(1)
        while True:
            try:
                messages.append(receiver.recv(256).decode())
            except TimeoutError:
                break
        assert "STOPPING=1" in messages
    finally:
        process.kill()
        receiver.close()


def test_workers_share_the_port_and_a_dead_worker_is_restarted(tmp_path: Path, origin) -> None:
    port = free_port()
    config = gate_config(tmp_path, one_http_listener(port, origin.http), gate={"workers": 2})
    gate = start_gate(config, {"http": port})
    pid = gate.process.pid

    def children() -> list[int]:  # two workers and the service process
        return [int(child) for child in Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split()]

    try:
        wait_until(lambda: len(children()) == 3)
        assert all(status_of(http_get(port, "example-filed.cn")) == 200 for _ in range(20))
        victim = min(children())  # the first worker forked
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(children()) == 3 and victim not in children(), timeout=15)
        wait_until(lambda: status_of(http_get(port, "example-filed.cn")) == 200)
        assert "restarting" in gate.log()
    finally:
        assert gate.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_open_relays(tmp_path: Path, origin, certs, workers: int) -> None:
    import ssl

    port = free_port()
    listeners = {"tls": listener(port, "tls", origin.tls_echo)}
    gate = start_gate(gate_config(tmp_path, listeners, gate={"drain_timeout": 2.0, "workers": workers}),
                      {"tls": port})  # fmt: skip
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    tls = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="example-filed.cn"
    )
    tls.sendall(b"before")
    assert tls.recv(100) == b"before"
    stopped = time.monotonic()
    gate.signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)  # no longer accepting
    tls.sendall(b"during")
    assert tls.recv(100) == b"during"  # the open relay still works while draining
    assert gate.process.wait(20) == 0
    assert 1.5 < time.monotonic() - stopped < 10
    tls.close()


def test_a_half_closed_relay_is_closed_after_the_half_close_timeout(tmp_path: Path, origin) -> None:
    """The client finishes sending; the backend never closes its side. The gate passes the EOF on,
    keeps the relay for half_close_timeout, then closes it."""
    port = free_port()
    listeners = {"tls": listener(port, "tls", origin.hold)}
    gate = start_gate(gate_config(tmp_path, listeners, gate={"half_close_timeout": 1.0}), {"tls": port})
    try:
        hello = python_hello("example-filed.cn")
        sock = send_in_pieces(port, hello, [])
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=15) in ("closed", "reset")
        assert 0.5 < time.monotonic() - started < 5
    finally:
        assert gate.stop() == 0


def test_backend_down_gives_502_on_http_and_a_close_on_tls(tmp_path: Path) -> None:
    dead = free_port()
    http_port, tls_port = free_port(), free_port()
    listeners = {"http": listener(http_port, "http", dead), "tls": listener(tls_port, "tls", dead)}
    gate = start_gate(gate_config(tmp_path, listeners), {"http": http_port, "tls": tls_port})
    try:
        answer = http_get(http_port, "example-filed.cn")
        assert status_of(answer) == 502 and b"X-ICP-Gate: error; id=" in answer
        sock = send_in_pieces(tls_port, python_hello("example-filed.cn"), [])
        assert closed_by_peer(sock) == "closed"
    finally:
        assert gate.stop() == 0
    assert "Traceback" not in gate.log()


def test_connection_limit_refuses_cleanly(tmp_path: Path, origin) -> None:
    port = free_port()
    gate = start_gate(
        gate_config(tmp_path, one_http_listener(port, origin.http), gate={"max_connections": 5}), {"http": port}
    )
    try:
        # Five relays, kept alive: decided traffic, which a newcomer never pushes out (a client
        # that has said nothing would give way to it: test_gate_auto.py).
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert status_of(http_get(port, "example-filed.cn")) == 503
        for sock in held:
            sock.close()
        wait_until(lambda: status_of(http_get(port, "example-filed.cn")) == 200)
    finally:
        gate.stop()


def test_a_thousand_concurrent_connections(tmp_path: Path, origin) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    port = free_port()
    gate = start_gate(gate_config(tmp_path, one_http_listener(port, origin.http)), {"http": port})

    async def one(number: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.5)  # hold every connection open at once
        host = b"example-filed.cn" if number % 2 else b"example-unfiled.cn"
        writer.write(b"GET /%d HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (number, host))
        answer = await reader.read()
        writer.close()
        return answer

    async def all_of_them() -> list[bytes]:
        return await asyncio.gather(*(one(n) for n in range(1000)))

    try:
        answers = asyncio.run(all_of_them())
        assert [status_of(a) for a in answers] == [200 if n % 2 else 403 for n in range(1000)]
        assert all(b'"path": "/%d"' % n in answers[n] for n in range(1, 1000, 2))
    finally:
        assert gate.stop() == 0
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Traceback" not in gate.log()


def test_the_gate_raises_its_open_file_limit(tmp_path: Path, origin) -> None:
    """Started with a soft limit of 256 descriptors, the gate still holds 300 relays (600 sockets)."""
    import resource

    port = free_port()
    config = gate_config(tmp_path, one_http_listener(port, origin.http))
    log = (tmp_path / "gate.log").open("w")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    process = subprocess.Popen([sys.executable, "-m", "icpgate", "run", "-c", str(config)], stdout=log, stderr=log,
                               preexec_fn=low_soft_limit)  # fmt: skip
    wait_for_port(port)

    async def hold_open(count: int) -> list[bytes]:
        async def one(number: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /%d HTTP/1.1\r\nHost: example-filed.cn\r\n\r\n" % number)
            head = await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(1.0)  # every relay is open at once
            writer.close()
            return head

        return await asyncio.gather(*(one(n) for n in range(count)))

    try:
        answers = asyncio.run(hold_open(300))
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
    finally:
        process.terminate()
        assert process.wait(30) == 0
    assert "Too many open files" not in (tmp_path / "gate.log").read_text()


def test_tls_alert_action(tmp_path: Path, origin) -> None:
    policies = copy_policies(tmp_path)
    edit_pack(policies, 'tls_action = "reset"', 'tls_action = "alert"')
    port = free_port()
    listeners = {"tls": listener(port, "tls", origin.tls)}
    gate = start_gate(gate_config(tmp_path, listeners, pack=policies / "default.toml"), {"tls": port})
    try:
        sock = send_in_pieces(port, python_hello("example-unfiled.cn"), [])
        assert closed_by_peer(sock) == "\x15\x03\x03\x00\x02\x02\x70"  # fatal unrecognized_name
    finally:
        gate.stop()


@pytest.mark.parametrize("source", ["operator_certificate", "ca_dir"])
def test_tls_page_action(tmp_path: Path, origin, certs, source: str) -> None:
    policies = copy_policies(tmp_path)
    edit_pack(policies, 'tls_action = "reset"', 'tls_action = "page"')
    port = free_port()
    listeners = {"tls": listener(port, "tls", origin.tls)}
    if source == "operator_certificate":
        gate_keys, ca = {"tls_certificate": str(certs["cert"]), "tls_key": str(certs["key"])}, certs["ca"]
    else:
        gate_keys, ca = {"tls_ca_dir": str(tmp_path / "ca")}, tmp_path / "ca" / "icpgate-ca-cert.pem"
    gate = start_gate(gate_config(tmp_path, listeners, gate=gate_keys, pack=policies / "default.toml"), {"tls": port})
    try:
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "-i",
                "--max-time",
                "10",
                "--cacert",
                str(ca),
                "--resolve",
                "www.example-unfiled.cn:%d:127.0.0.1" % port,
                "-H",
                "Accept: application/json",
                "https://www.example-unfiled.cn:%d/" % port,
            ],
            capture_output=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403")
        assert json.loads(body)["reason"] == "unfiled" and json.loads(body)["domain"] == "www.example-unfiled.cn"
        filed = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                str(certs["ca"]),
                "--resolve",
                "example-filed.cn:%d:127.0.0.1" % port,
                "https://example-filed.cn:%d/" % port,
            ],
            capture_output=True,
            timeout=20,
        )
        assert b'"host": "example-filed.cn' in filed.stdout  # allowed TLS is still not terminated
    finally:
        assert gate.stop() == 0


def test_static_upstream_map(tmp_path: Path, origin) -> None:
    port = free_port()
    listeners = {"http": listener(port, "http")}
    upstream = '[upstream]\nmode = "static"\nstatic = { "127.0.0.1:%d" = "127.0.0.1:%d" }' % (port, origin.http)
    gate = start_gate(gate_config(tmp_path, listeners, upstream=upstream), {"http": port})
    try:
        assert status_of(http_get(port, "example-filed.cn")) == 200
    finally:
        gate.stop()


def test_original_dst_without_nat_does_not_loop(tmp_path: Path) -> None:
    port = free_port()
    listeners = {"http": listener(port, "http")}
    gate = start_gate(gate_config(tmp_path, listeners), {"http": port})
    try:
        answer = http_get(port, "example-filed.cn")  # the original destination is the gate itself
        assert status_of(answer) in (0, 502)
        time.sleep(0.5)
        assert status_of(http_get(port, "example-unfiled.cn")) == 403  # and it still serves
    finally:
        assert gate.stop() == 0


def test_acme_exception(tmp_path: Path, origin) -> None:
    policies = copy_policies(tmp_path)
    edit_pack(policies, "acme_http01 = false", "acme_http01 = true")
    port = free_port()
    gate = start_gate(
        gate_config(tmp_path, one_http_listener(port, origin.http), pack=policies / "default.toml"), {"http": port}
    )
    try:
        assert status_of(http_get(port, "example-pending.cn", "/.well-known/acme-challenge/tok")) == 200
        assert status_of(http_get(port, "example-pending.cn", "/index.html")) == 403
    finally:
        gate.stop()


def test_an_invalid_config_binds_nothing(tmp_path: Path, origin) -> None:
    port = free_port()
    config = gate_config(tmp_path, one_http_listener(port, origin.http))
    config.write_text(config.read_text().replace('kind = "http"', 'kind = "udp"'))
    result = subprocess.run(
        [sys.executable, "-m", "icpgate", "run", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3
    assert "listeners[0].kind: must be one of 'http', 'tls'" in result.stderr
    with pytest.raises(OSError):
        wait_for_port(port, timeout=0.5)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_a_clear_error(tmp_path: Path, origin, workers: int) -> None:
    port = free_port()
    config = gate_config(tmp_path, one_http_listener(port, origin.http), gate={"workers": workers})
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = subprocess.run(
            [sys.executable, "-m", "icpgate", "run", "-c", str(config)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 6, result.stderr
    assert "cannot listen on 127.0.0.1:%d/http" % port in result.stderr
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_registry_is_refused(tmp_path: Path, origin, workers: int) -> None:
    port = free_port()
    config = gate_config(tmp_path, one_http_listener(port, origin.http), gate={"workers": workers})
    (tmp_path / "registry.db").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "icpgate", "run", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 5 and "import filings first" in result.stderr
    assert "Traceback" not in result.stderr
