"""Which host nginx and Apache route a request to, by target scheme, Host header and version, and
what the gate does with each: a request is relayed only when both would serve the host decided on.

nginx routes an absolute-form target of any scheme on its authority. Apache reads the target's host
only when the scheme is its own (`http` on a plain port) and otherwise routes on Host, or, without
one, to its default virtual host, which on a shared server may be an unfiled site. Neither reads a
header of an HTTP/0.9 request (a request line without a version). Every combination below is sent
to both servers directly, to record where each routes it, and through the gate on `http` and `auto`
listeners in front of each. The default pack blocks requests without a host (`rules.no_host`), so
the default virtual host must never be served through the gate.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product

import pytest
import trustme
from backends import start_apache, start_nginx
from gatekit import Gate, free_port, gate_config, listener, start_gate

from conftest import check_json

FILED = "example-filed.cn"
UNFILED = "unfiled-example.com"
SCHEMES = [b"http", b"HTTP", b"hTtP", b"https", b"HTTPS", b"hTtPs", b"ftp", b"x", None]  # None: origin-form
HOSTS = ["absent", "same", "upper", "other", "empty"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"", b"HTTP/0.9"]  # b"": the HTTP/0.9 form, no version at all
SERVED = re.compile(rb"served host=[^\n]*? server=([a-z0-9.-]+)")
LISTENERS = ["http_nginx", "http_apache", "auto_nginx", "auto_apache"]
DEADLINE = 5.0


@dataclass(frozen=True)
class Shape:
    scheme: bytes | None
    host: str
    version: bytes
    authority: str

    @property
    def raw(self) -> bytes:
        target = b"/" if self.scheme is None else self.scheme + b"://" + self.authority.encode() + b"/"
        line = b"GET " + target + (b" " + self.version if self.version else b"")
        other = UNFILED if self.authority == FILED else FILED
        value = {"same": self.authority, "upper": self.authority.upper(), "other": other, "empty": ""}.get(self.host)
        return line + b"\r\n" + (b"" if value is None else b"Host: %s\r\n" % value.encode()) + b"\r\n"

    @property
    def name(self) -> str | None:
        """The name in the request: the target's authority, else the Host's."""
        if self.scheme is not None or self.host in ("same", "upper"):
            return self.authority
        if self.host == "other":
            return UNFILED if self.authority == FILED else FILED
        return None

    @property
    def must_pass(self) -> bool:
        """A plain filed request as real clients send it: refusing it is a failure too."""
        return (
            self.authority == FILED
            and self.version in (b"HTTP/1.1", b"HTTP/1.0")
            and self.host in ("same", "upper")
            and (self.scheme is None or self.scheme.lower() == b"http")
        )


SHAPES = [Shape(*values) for values in product(SCHEMES, HOSTS, VERSIONS, [FILED, UNFILED])]


@dataclass
class Answer:
    data: bytes
    ended: str

    @property
    def served_by(self) -> str | None:
        """The virtual host that served it (HTTP/0.9 answers have no status line, only the body)."""
        found = SERVED.search(self.data)
        return found.group(1).decode() if found else None

    @property
    def gate_blocked(self) -> bool:
        head = self.data.split(b"\r\n\r\n", 1)[0].lower()
        return b"\r\nx-icp-gate: blocked" in head

    def __str__(self) -> str:
        return "%s, %r" % (self.ended, self.data[:160])


def ask(port: int, raw: bytes) -> Answer:
    """Send one request, end the sending side, read until the peer closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    data, ended = b"", "closed"
    try:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        ended = "timeout"
    except ConnectionResetError:
        ended = "reset"
    finally:
        sock.close()
    return Answer(data, ended)


def ask_all(port: int) -> dict[Shape, Answer]:
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(SHAPES, pool.map(lambda shape: ask(port, shape.raw), SHAPES), strict=True))


@dataclass
class Stack:
    gate: Gate
    direct: dict[str, dict[Shape, Answer]]  # backend kind -> what it answers without the gate


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("schemes")
    ca = trustme.CA()
    with contextlib.ExitStack() as cleanup:
        nginx = start_nginx(tmp, [FILED, UNFILED], ca)
        cleanup.callback(nginx.stop)
        apache = start_apache(tmp, [FILED, UNFILED], ca)
        cleanup.callback(apache.stop)
        backends = {"nginx": nginx.http, "apache": apache.http}
        ports = {name: free_port() for name in LISTENERS}
        listeners = {
            name: listener(ports[name], name.split("_")[0], backends[name.split("_")[1]]) for name in LISTENERS
        }
        config = gate_config(tmp, listeners)
        assert check_json(config, FILED)["action"] == "allow"
        assert check_json(config, UNFILED)["action"] == "block"
        gate = start_gate(config, ports)
        cleanup.callback(gate.stop)
        yield Stack(gate, {kind: ask_all(port) for kind, port in backends.items()})
        assert "Traceback" not in gate.log(), gate.log()


def test_the_backends_route_an_https_target_without_host_apart(stack: Stack) -> None:
    """Without the gate: what makes the checks below test a real bypass."""
    https = Shape(b"https", "absent", b"HTTP/1.0", FILED)
    assert stack.direct["nginx"][https].served_by == FILED, stack.direct["nginx"][https]
    assert stack.direct["apache"][https].served_by == "default", stack.direct["apache"][https]
    for kind in ("nginx", "apache"):
        nine = stack.direct[kind][Shape(None, "same", b"", FILED)]  # `GET /` + a Host nobody reads
        assert nine.served_by == "default", (kind, str(nine))
        nine_https = stack.direct[kind][Shape(b"https", "same", b"", FILED)]
        assert nine_https.served_by == (FILED if kind == "nginx" else "default"), (kind, str(nine_https))


@pytest.mark.parametrize("name", LISTENERS)
def test_relayed_only_when_both_backends_serve_the_decided_host(stack: Stack, name: str) -> None:
    backend = name.split("_")[1]
    port = stack.gate.ports[name]
    through = ask_all(port)
    failures = []
    for shape, answer in through.items():
        served = answer.served_by
        label = "%r: through the gate %s; nginx %s; apache %s" % (
            shape.raw,
            answer,
            stack.direct["nginx"][shape],
            stack.direct["apache"][shape],
        )
        if answer.ended == "timeout":
            failures.append("no answer within %gs: %s" % (DEADLINE, label))
        elif served is not None:
            elsewhere = {stack.direct[kind][shape].served_by for kind in ("nginx", "apache")} - {None}
            if served != shape.name or served != FILED:
                failures.append("served by %r, decided on %r: %s" % (served, shape.name, label))
            elif elsewhere != {served}:
                failures.append("relayed, but the backends route it to %s: %s" % (sorted(elsewhere), label))
        if shape.must_pass and (answer.gate_blocked or served != FILED):
            failures.append("a filed request was not served: %s" % label)
        if served is None and not answer.gate_blocked and stack.direct[backend][shape].served_by is not None:
            failures.append("neither blocked nor served, where %s serves it: %s" % (backend, label))
    assert not failures, "%d of %d shapes:\n%s" % (len(failures), len(SHAPES), "\n".join(failures))


def test_every_shape_is_judged_by_both_listener_kinds_alike(stack: Stack) -> None:
    """An `auto` listener hands HTTP to the same inspector: the same shapes pass and are blocked."""
    outcomes = {}
    for name in ("http_nginx", "auto_nginx"):
        answers = ask_all(stack.gate.ports[name])
        outcomes[name] = {shape: answers[shape].gate_blocked for shape in SHAPES}
    differ = [shape.raw for shape in SHAPES if outcomes["http_nginx"][shape] != outcomes["auto_nginx"][shape]]
    assert not differ, differ
