"""Test kit for the gate: real processes on loopback, real ClientHellos, and a hello builder.

The gate runs as `icpgate run` in a subprocess, the origin as tests/origin.py in another, both
on free loopback ports. ClientHellos come from Python's own TLS stack (memory BIOs), or from
`build_hello` for the shapes real stacks do not produce on demand (post-quantum sizes, split
records, duplicate SNI, GREASE, ECH).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO, SAMPLES

ORIGIN = Path(__file__).with_name("origin.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen | None = None,
                  log: Path | None = None) -> None:  # fmt: skip
    """Wait until something listens on `port`; if `process` exits first, raise with what it said:
    `log`, the file its output went to, or its stderr pipe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError("%s exited with %s:\n%s" % (" ".join(map(str, process.args)), process.returncode,
                                                           child_output(process, log)))  # fmt: skip
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("nothing listening on port %d" % port)


def child_output(process: subprocess.Popen, log: Path | None) -> str:
    """What an exited child wrote: its log file, or its stderr when that is a pipe."""
    if log is not None:
        return log.read_text(errors="replace")
    if process.stderr is not None:
        output = process.stderr.read()
        return output.decode(errors="replace") if isinstance(output, bytes) else output
    return "(its output went elsewhere)"


@dataclass
class Origin:
    http: int
    tls: int
    tls_echo: int
    record_port: int
    hold: int
    record_dir: Path
    process: subprocess.Popen

    def recorded(self) -> list[bytes]:
        files = sorted(self.record_dir.glob("*.bin"), key=lambda p: int(p.stem))
        return [p.read_bytes() for p in files]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_origin(tmp: Path, cert_pem: Path) -> Origin:
    record_dir = tmp / "recorded"
    record_dir.mkdir(exist_ok=True)
    ports = {name: free_port() for name in ("http", "tls", "tls_echo", "record", "hold")}
    errors = (tmp / "origin.log").open("w")  # a file, not a pipe nobody reads: a full pipe stalls it
    process = subprocess.Popen(
        [
            sys.executable,
            str(ORIGIN),
            "--http",
            str(ports["http"]),
            "--tls",
            str(ports["tls"]),
            "--tls-echo",
            str(ports["tls_echo"]),
            "--cert",
            str(cert_pem),
            "--record",
            str(record_dir),
            "--record-port",
            str(ports["record"]),
            "--hold",
            str(ports["hold"]),
        ],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    json.loads(process.stdout.readline())
    return Origin(ports["http"], ports["tls"], ports["tls_echo"], ports["record"], ports["hold"], record_dir, process)


@dataclass
class Gate:
    """A running `icpgate run` with its config; ports by listener name."""

    config: Path
    ports: dict[str, int]
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def listener(port: int, kind: str, backend_port: int | None = None, **extra: str) -> dict[str, object]:
    """A `[[listeners]]` table on loopback; `backend_port` sends allowed traffic to 127.0.0.1:that."""
    table: dict[str, object] = {"address": "127.0.0.1", "port": port, "kind": kind}
    if backend_port is not None:
        table["backend"] = "127.0.0.1:%d" % backend_port
    return table | extra


# Off unless a test turns them on: no admin port to collide on, no DNS query leaves the machine.
QUIET_TABLES = {"admin": {"enabled": False}, "dns": {"enabled": False}}


def gate_config(
    tmp: Path,
    listeners: dict[str, dict],
    *,
    gate: dict | None = None,
    upstream: str = "",
    pack: Path | None = None,
    tables: dict[str, dict] | None = None,
) -> Path:
    """Write a config with the sample registry imported; `listeners` maps a name to its table;
    `tables` adds or overrides keys of other tables (admin, dns, violations, log...)."""
    lines = [
        "[provider]",
        'id = "IDC-EXAMPLE"',
        'name = "Example IDC"',
        'contact = "noc@idc.example"',
        "[registry]",
        'path = "%s"' % (tmp / "registry.db"),
        "reload_interval = 0.2",
        "[policy]",
        'pack = "%s"' % (pack or REPO / "policies" / "default.toml"),
        "[gate]",
    ]
    lines += ["%s = %s" % (key, json.dumps(value)) for key, value in ({"inspect_timeout": 2.0} | (gate or {})).items()]
    lines.append(upstream)
    for name in sorted({*QUIET_TABLES, *(tables or {})}):
        lines.append("[%s]" % name)
        values = QUIET_TABLES.get(name, {}) | (tables or {}).get(name, {})
        lines += ["%s = %s" % (key, json.dumps(value)) for key, value in values.items()]
    for table in listeners.values():
        lines.append("[[listeners]]")
        lines += ["%s = %s" % (key, json.dumps(value)) for key, value in table.items()]
    path = tmp / "gate.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if not (tmp / "registry.db").exists():
        subprocess.run(
            [sys.executable, "-m", "icpgate", "import", str(SAMPLES), "-c", str(path)], check=True, capture_output=True
        )
    return path


def start_gate(config: Path, ports: dict[str, int], env: dict[str, str] | None = None) -> Gate:
    log_path = config.with_suffix(".log")
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "icpgate", "run", "-c", str(config)],
        stdout=log,
        stderr=log,
        env={**os.environ, **(env or {})},
    )
    gate = Gate(config, ports, process, log_path, env or {})
    for port in ports.values():
        try:
            wait_for_port(port, process=None)
        except TimeoutError:
            gate.stop()
            raise RuntimeError("gate did not start:\n" + gate.log()) from None
    return gate


# --- ClientHellos ---------------------------------------------------------------------------------
def python_hello(sni: str | None) -> bytes:
    """The ClientHello Python's TLS stack sends (one or more records)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _vector(data: bytes, length_bytes: int) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def server_name_extension(*names: str, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + _vector(n.encode(), 2) for n in names)
    return 0, _vector(entries, 2)


def _filler(size: int) -> bytes:
    """Deterministic bytes, so a generated hello is the same every time hypothesis replays it."""
    return bytes((7 * i + 3) % 256 for i in range(size))


def build_hello(
    extensions: list[tuple[int, bytes]],
    *,
    key_share_size: int = 32,
    record_sizes: list[int] | None = None,
    session_id: bytes = b"\x11" * 32,
    tls13: bool = True,
) -> bytes:
    """A ClientHello with the given extensions plus (tls13) supported_versions and an X25519MLKEM768
    key_share of `key_share_size` bytes, framed into TLS records of `record_sizes` (the last
    record takes the rest)."""
    key_share = _vector(struct.pack("!HH", 0x11EC, key_share_size) + _filler(key_share_size), 2)
    tls13_extensions = [(0x002B, b"\x04\x03\x04\x03\x03"), (0x0033, key_share)] if tls13 else []
    all_extensions = [*extensions, *tls13_extensions]
    body = (
        b"\x03\x03"
        + _filler(32)
        + _vector(session_id, 1)
        + _vector(b"\x13\x01\x13\x02\x13\x03", 2)
        + b"\x01\x00"
        + _vector(b"".join(struct.pack("!H", t) + _vector(d, 2) for t, d in all_extensions), 2)
    )
    return handshake_records(b"\x01" + len(body).to_bytes(3, "big") + body, record_sizes or [])


def handshake_records(handshake: bytes, record_sizes: list[int]) -> bytes:
    """Handshake bytes framed in TLS records of the given sizes (the last record takes the rest)."""
    sizes = list(record_sizes)
    records, offset = [], 0
    while offset < len(handshake):
        size = sizes.pop(0) if sizes else len(handshake) - offset
        fragment = handshake[offset : offset + size]
        records.append(b"\x16\x03\x01" + struct.pack("!H", len(fragment)) + fragment)
        offset += size
    return b"".join(records)


def send_in_pieces(port: int, data: bytes, sizes: list[int], pause: float = 0.0) -> socket.socket:
    """Connect and send `data` in pieces of the given sizes (the rest in one), Nagle off."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    offset = 0
    for size in sizes:
        sock.sendall(data[offset : offset + size])
        offset += size
        if pause:
            time.sleep(pause)
    if offset < len(data):
        sock.sendall(data[offset:])
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> str:
    """Wait for the gate to end the connection: 'reset', 'closed' (FIN), or the bytes it sent."""
    sock.settimeout(timeout)
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return "closed" if not received else received.decode("latin-1")
            received += chunk
    except ConnectionResetError:
        return "reset" if not received else received.decode("latin-1")
    finally:
        sock.close()
