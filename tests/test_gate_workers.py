"""The multi-worker daemon as an operator meets it: reloads, gauges, start-up, logs, ports.

Real `icpgate run` processes, real signals, real sockets; pids are read from the supervisor's log
("started worker 0 (pid 4711)").
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adminkit import admin_request, by_worker, start_observed_gate
from gatekit import free_port, gate_config, listener, start_gate, wait_for_port
from test_gate_process import edit_pack, http_get, status_of, wait_until

from conftest import copy_policies
from icpgate.gate.http.engine import ENGINE

STARTED = re.compile(r"started (worker \d+|the service process) \(pid (\d+)\)")


def started(log: str) -> dict[str, int]:
    """The pid of each child by name ("worker 0", "the service process"), the latest one started."""
    return {name: int(pid) for name, pid in STARTED.findall(log)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path("/proc/%d/stat" % pid).read_text().split()[2] != "Z"


def registry_serial(config: Path) -> int:
    status = subprocess.run([sys.executable, "-m", "icpgate", "feed", "status", "--json", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(status.stdout)["serial"]


def all_answer(port: int, host: str, status: int, count: int = 20) -> bool:
    return all(status_of(http_get(port, host)) == status for _ in range(count))


def test_a_bad_reload_keeps_the_service_process_and_a_good_one_is_taken(tmp_path: Path, origin) -> None:
    policies = copy_policies(tmp_path)
    http, tls, admin = free_port(), free_port(), free_port()
    listeners = {"http": listener(http, "http", origin.http), "tls": listener(tls, "tls", origin.tls)}
    config = gate_config(tmp_path, listeners, gate={"workers": 2}, pack=policies / "default.toml",
                         tables={"admin": {"enabled": True, "port": admin}})  # fmt: skip
    gate = start_gate(config, {"http": http, "tls": tls})
    try:
        wait_for_port(admin)
        wait_until(lambda: "2 workers ready" in gate.log(), timeout=30)
        service = started(gate.log())["the service process"]
        good = config.read_text()
        config.write_text(good.replace("inspect_timeout = 2.0", 'inspect_timeout = "soon"'))
        gate.signal(signal.SIGHUP)
        wait_until(lambda: gate.log().count("reload refused") >= 3)  # two workers and the service process
        time.sleep(2.0)  # the old daemon restarted the service process five times a second here
        log = gate.log()
        refused = [line for line in log.splitlines() if "reload refused" in line]
        assert len([line for line in refused if "worker=service" in line]) == 1, refused
        assert all("gate.toml" in line and "gate.inspect_timeout" in line for line in refused), refused
        assert alive(service) and started(log)["the service process"] == service
        assert "restarting" not in log and "Traceback" not in log
        assert admin_request(admin, "/healthz")[0] == 200
        assert admin_request(admin, "/readyz")[0] == 200
        assert all_answer(http, "example-unfiled.cn", 403) and all_answer(http, "example-filed.cn", 200)

        config.write_text(good)
        edit_pack(policies, "http_status = 403", "http_status = 451")
        gate.signal(signal.SIGHUP)
        wait_until(lambda: "services restarted with the new config" in gate.log())
        wait_until(lambda: all_answer(http, "example-unfiled.cn", 451))
        assert alive(service) and started(gate.log())["the service process"] == service
        assert admin_request(admin, "/healthz")[0] == 200  # the admin API serves again, on the same socket
    finally:
        assert gate.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_index_serial_and_reload_gauges_are_right_from_the_start(tmp_path: Path, origin, workers: int) -> None:
    observed = start_observed_gate(tmp_path, origin.http, origin.tls, workers=workers)
    try:
        serial = registry_serial(observed.config)
        assert serial > 0
        metrics = observed.metrics()
        assert by_worker(metrics, "icpgate_index_serial") == {str(number): serial for number in range(workers)}
        reloads = [value for (name, _), value in metrics.items() if name == "icpgate_config_last_reload_successful"]
        assert reloads == [1.0] * workers
        engines = {dict(labels)["http_engine"] for (name, labels) in metrics if name == "icpgate_build_info"}
        assert engines == {ENGINE}, "build_info says which HTTP engine the workers run"
        assert observed.json("/readyz")["checks"]["registry"] == {"ok": True, "serial": serial}
    finally:
        assert observed.gate.stop() == 0


def test_a_worker_killed_during_start_up_is_restarted_and_the_daemon_starts(tmp_path: Path, origin) -> None:
    """The old supervisor gave up ("the workers did not become ready") when any worker exited before
    every worker had reported ready, and a worker killed by a signal logged nothing."""
    notify_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(60)
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", origin.http)}, gate={"workers": 2})
    log_path = tmp_path / "gate.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "icpgate", "run", "-c", str(config)], stdout=log,
                                   stderr=log, env={**os.environ, "NOTIFY_SOCKET": str(notify_path)})  # fmt: skip
    try:
        wait_until(lambda: "worker 1" in started(log_path.read_text()), timeout=30, step=0.005)
        victim = started(log_path.read_text())["worker 1"]
        os.kill(victim, signal.SIGKILL)  # before it can have loaded the index and reported ready
        assert receiver.recv(256) == b"READY=1"
        log = log_path.read_text()
        assert "worker 1 (pid %d) was killed by signal 9 (SIGKILL); restarting it" % victim in log
        assert all_answer(port, "example-filed.cn", 200)
    finally:
        process.terminate()
        assert process.wait(30) == 0
        receiver.close()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_log_line_names_its_process_and_a_killed_worker_is_logged(tmp_path: Path, origin, fmt: str) -> None:
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", origin.http)}, gate={"workers": 2},
                         tables={"log": {"format": fmt}})  # fmt: skip
    gate = start_gate(config, {"http": port})
    try:
        wait_until(lambda: "2 workers ready" in gate.log(), timeout=30)
        assert all_answer(port, "example-unfiled.cn", 403, 4)
        victim = started(gate.log())["worker 0"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: started(gate.log())["worker 0"] != victim, timeout=15)
        wait_until(lambda: "worker 0 ready" in gate.log().split("(pid %d) was killed" % victim)[-1], timeout=30)
    finally:
        assert gate.stop() == 0
    pids = {gate.process.pid} | {int(pid) for _, pid in STARTED.findall(gate.log())}
    lines = gate.log().splitlines()
    assert len(lines) > 10
    seen = set()
    for line in lines:
        if fmt == "json":
            entry = json.loads(line)
            worker, pid = entry["worker"], entry["pid"]
        else:
            worker, pid = re.search(r" \[worker=(\S+) pid=(\d+)\] ", line).groups()
        seen.add((worker, int(pid)))
    assert {worker for worker, _ in seen} == {"supervisor", "service", "0", "1"}
    assert seen >= {("supervisor", gate.process.pid), ("0", victim)}
    assert {pid for _, pid in seen} <= pids
    killed = "worker 0 (pid %d) was killed by signal 9 (SIGKILL); restarting it in" % victim
    assert killed in gate.log()
    assert re.search(r"worker 1 \(pid \d+\) exited with status 0", gate.log())  # and on the way out


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_daemon_on_the_same_ports_is_refused(tmp_path: Path, origin, workers: int) -> None:
    port = free_port()
    config = gate_config(tmp_path, {"http": listener(port, "http", origin.http)}, gate={"workers": workers})
    first = start_gate(config, {"http": port})
    try:
        wait_until(lambda: all_answer(port, "example-unfiled.cn", 403, 4), timeout=30)
        other = tmp_path / "b"
        other.mkdir()
        policies = copy_policies(other)
        edit_pack(policies, "http_status = 403", "http_status = 451")  # so its answers would show
        config = gate_config(other, {"http": listener(port, "http", origin.http)}, gate={"workers": 2},
                             pack=policies / "default.toml")  # fmt: skip
        second = subprocess.run([sys.executable, "-m", "icpgate", "run", "-c", str(config)], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert second.returncode == 6, second.stderr
        assert "cannot listen on 127.0.0.1:%d/http: Address already in use" % port in second.stderr
        assert "Traceback" not in second.stderr
        assert [status_of(http_get(port, "example-unfiled.cn")) for _ in range(50)] == [403] * 50
    finally:
        assert first.stop() == 0


def test_a_new_daemon_can_start_while_the_old_one_drains(tmp_path: Path, origin, certs) -> None:
    """A restart: the old daemon closes its listening sockets as it starts to drain, so the new one
    binds at once while the old one's relays run on."""
    import ssl

    port = free_port()
    listeners = {"tls": listener(port, "tls", origin.tls_echo)}
    old = start_gate(gate_config(tmp_path, listeners, gate={"workers": 2, "drain_timeout": 10.0}), {"tls": port})
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    relay = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                server_hostname="example-filed.cn")  # fmt: skip
    relay.sendall(b"before")
    assert relay.recv(100) == b"before"
    old.signal(signal.SIGTERM)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    new_config = gate_config(new_dir, listeners, gate={"workers": 2})
    deadline = time.monotonic() + 5
    new = None
    try:
        while new is None:
            try:
                with socket.socket() as probe:  # the port is free once the old listeners are closed
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
            except OSError:
                assert time.monotonic() < deadline, "the old daemon kept its listening socket"
                time.sleep(0.05)
                continue
            new = start_gate(new_config, {"tls": port})
        assert old.process.poll() is None  # still draining
        relay.sendall(b"during")
        assert relay.recv(100) == b"during"
        fresh = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                    server_hostname="example-filed.cn")  # fmt: skip
        fresh.sendall(b"new")
        assert fresh.recv(100) == b"new"
        fresh.close()
    finally:
        relay.close()
        assert old.process.wait(30) == 0
        if new is not None:
            assert new.stop() == 0


def test_a_child_that_keeps_dying_is_restarted_with_back_off(tmp_path: Path, origin) -> None:
    port = free_port()
    gate = start_gate(gate_config(tmp_path, {"http": listener(port, "http", origin.http)}, gate={"workers": 2}),
                      {"http": port})  # fmt: skip
    try:
        wait_until(lambda: "2 workers ready" in gate.log(), timeout=30)
        delays = []
        for _ in range(3):
            victim = started(gate.log())["the service process"]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda victim=victim: started(gate.log())["the service process"] != victim, timeout=20)
            delays.append(re.search(r"the service process \(pid %d\) was killed by signal 9 \(SIGKILL\); "
                                    r"restarting it in (\S+)s" % victim, gate.log()).group(1))  # fmt: skip
        assert delays == ["0.5", "1", "2"]
        assert all_answer(port, "example-filed.cn", 200)  # the workers never noticed
    finally:
        assert gate.stop() == 0


def test_a_worker_restarted_after_a_bad_edit_serves_with_the_last_good_config(tmp_path: Path, origin) -> None:
    http = free_port()
    config = gate_config(tmp_path, {"http": listener(http, "http", origin.http)}, gate={"workers": 2})
    gate = start_gate(config, {"http": http})
    try:
        wait_until(lambda: "2 workers ready" in gate.log(), timeout=30)
        config.write_text(config.read_text().replace("inspect_timeout = 2.0", 'inspect_timeout = "soon"'))
        worker = started(gate.log())["worker 1"]
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: started(gate.log())["worker 1"] != worker, timeout=30)
        wait_until(lambda: gate.log().count("worker 1 ready") >= 2, timeout=30)
        log = gate.log()
        assert "cannot start with this config" not in log and "Traceback" not in log
        assert all_answer(http, "example-unfiled.cn", 403) and all_answer(http, "example-filed.cn", 200)
    finally:
        assert gate.stop() == 0
