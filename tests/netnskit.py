"""Three network namespaces for inline (TPROXY) tests and benchmarks: client, gate router, server.

    with netnskit.topology() as net:            # every namespace is removed on leaving, even on error
        net.load_ruleset({"HTTP_LISTENER": "8080", ...})   # the shipped systemd/icpgate-inline.nft
        gate = net.popen(net.gate, [sys.executable, "-m", "icpgate", "run", "-c", path], stdout=log)
        net.run(net.client, "curl", "-s", "http://203.0.113.10/")
        sock = net.socket(net.client, socket.AF_INET6)  # a Python socket that lives in the client namespace

The client (198.51.100.2, 2001:db8:1::2) reaches the server (203.0.113.10, 2001:db8:2::10) only
through the gate namespace, which routes between the two links (ip_forward on, v4 and v6) and is
the server's default gateway, so replies come back through it as they do through an IDC's
router. Namespace names carry a random suffix; veth ends are created inside the namespaces, so
nothing is left in the root namespace. `down()` (the context manager calls it) ends every process
started in the namespaces through `popen` and deletes them, which removes their links and nftables
tables too.

Run as a script, it is the small servers the tests start inside the server namespace:
`python tests/netnskit.py banner PORT` (a server-first service: it sends a banner, then echoes,
naming the client address it sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RULESET = REPO / "systemd" / "icpgate-inline.nft"
NGINX = "/usr/sbin/nginx"

CLIENT4, CLIENT6 = "198.51.100.2", "2001:db8:1::2"
GATE_CLIENT_SIDE4, GATE_CLIENT_SIDE6 = "198.51.100.1", "2001:db8:1::1"
GATE_SERVER_SIDE4, GATE_SERVER_SIDE6 = "203.0.113.1", "2001:db8:2::1"
SERVER4, SERVER6 = "203.0.113.10", "2001:db8:2::10"
HOSTED4, HOSTED6 = "203.0.113.0/24", "2001:db8:2::/64"  # the server's link: the range the gate enforces
BANNER = b"SSH-2.0-netnskit-banner\r\n"

_CLONE_NEWNET = 0x40000000
_ROUTING_LINE = re.compile(r"^#\s+((?:ip|sysctl) .+?)\s*$")


def _sh(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), result.returncode, result.stderr.strip()))
    return result


@dataclass
class Topology:
    """The three namespaces by name (`client`, `gate`, `server`) and what runs in them."""

    client: str
    gate: str
    server: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    # --- running things in a namespace ------------------------------------------------------------
    def run(self, namespace: str, *argv: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a command in `namespace` to completion; `check` raises with its stderr on failure."""
        result = subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True,
                                timeout=timeout, input=input)  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError("%s in %s: exit %d: %s" % (" ".join(argv), namespace, result.returncode,
                                                          (result.stderr or result.stdout).strip()))  # fmt: skip
        return result

    def popen(self, namespace: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start a process in `namespace` (Popen keyword arguments pass through); `down()` ends it."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], **kwargs)
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """End one process started by `popen` (SIGKILL if it outlives `timeout`); its exit code."""
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def socket(self, namespace: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket created inside `namespace`: it connects, binds and routes there for its whole life.
        (A short-lived thread enters the namespace with setns(2) and creates it; the test's own
        threads never change namespace.)"""
        made: dict[str, object] = {}

        def create() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                with open("/run/netns/%s" % namespace, "rb") as handle:
                    if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns %s: %s" % (namespace, os.strerror(ctypes.get_errno())))
                made["socket"] = socket.socket(family, kind)
            except OSError as error:
                made["error"] = error

        thread = threading.Thread(target=create)
        thread.start()
        thread.join()
        if "error" in made:
            raise made["error"]  # type: ignore[misc]
        return made["socket"]  # type: ignore[return-value]

    def wait_for_port(self, namespace: str, address: str, port: int, timeout: float = 20,
                      process: subprocess.Popen | None = None) -> None:  # fmt: skip
        """Wait until something accepts TCP connections on address:port inside `namespace`."""
        deadline = time.monotonic() + timeout
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError("process exited with %s before listening on %s" % (process.returncode, port))
            with self.socket(namespace, socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
                sock.settimeout(0.5)
                try:
                    sock.connect((address, port))
                    return
                except OSError as error:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            "nothing listening on %s port %d in %s" % (address, port, namespace)
                        ) from error
            time.sleep(0.05)

    # --- the inline ruleset -----------------------------------------------------------------------
    def load_ruleset(self, defines: dict[str, str], path: Path = RULESET) -> str:
        """Load the shipped nftables ruleset into the gate namespace with some `define`s replaced,
        then apply the policy-routing commands its comments give (the `#   ip ...` lines), so a
        test proves the file an operator installs. Returns the ruleset as loaded."""
        text = path.read_text(encoding="utf-8")
        for name, value in defines.items():
            text, count = re.subn(r"(?m)^define %s = .*$" % re.escape(name), "define %s = %s" % (name, value), text)
            if count != 1:
                raise KeyError("%s has no `define %s`" % (path, name))
        self.run(self.gate, "nft", "-f", "-", input=text)
        for command in self.routing_commands(text):
            self.run(self.gate, *command.split())
        return text

    @staticmethod
    def routing_commands(ruleset: str) -> list[str]:
        """The `ip rule` / `ip route` / `sysctl` commands the ruleset's comments tell an operator to run."""
        return [match.group(1) for line in ruleset.splitlines() if (match := _ROUTING_LINE.match(line))]

    # --- lifecycle ----------------------------------------------------------------------------------
    def up(self) -> None:
        for namespace in (self.client, self.gate, self.server):
            _sh("ip", "netns", "add", namespace)
            self.run(namespace, "ip", "link", "set", "lo", "up")
        # veth ends are made inside the namespaces: no name in the root namespace to collide on
        _sh("ip", "link", "add", "c0", "netns", self.client, "type", "veth", "peer", "name", "gc", "netns", self.gate)
        _sh("ip", "link", "add", "s0", "netns", self.server, "type", "veth", "peer", "name", "gs", "netns", self.gate)
        links = (
            (self.client, "c0", CLIENT4 + "/24", CLIENT6 + "/64"),
            (self.gate, "gc", GATE_CLIENT_SIDE4 + "/24", GATE_CLIENT_SIDE6 + "/64"),
            (self.gate, "gs", GATE_SERVER_SIDE4 + "/24", GATE_SERVER_SIDE6 + "/64"),
            (self.server, "s0", SERVER4 + "/24", SERVER6 + "/64"),
        )
        for namespace, device, v4, v6 in links:
            self.run(namespace, "ip", "addr", "add", v4, "dev", device)
            self.run(namespace, "ip", "-6", "addr", "add", v6, "dev", device, "nodad")  # usable at once: no DAD wait
            self.run(namespace, "ip", "link", "set", device, "up")
        self.run(self.client, "ip", "route", "add", "default", "via", GATE_CLIENT_SIDE4)
        self.run(self.client, "ip", "-6", "route", "add", "default", "via", GATE_CLIENT_SIDE6)
        self.run(self.server, "ip", "route", "add", "default", "via", GATE_SERVER_SIDE4)
        self.run(self.server, "ip", "-6", "route", "add", "default", "via", GATE_SERVER_SIDE6)
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1"),
                           ("net.ipv4.conf.all.rp_filter", "2"), ("net.ipv4.conf.default.rp_filter", "2")):  # fmt: skip
            self.run(self.gate, "sysctl", "-qw", "%s=%s" % (key, value))

    def down(self) -> None:
        """End what `popen` started, then delete the namespaces (their links and nft tables go with them)."""
        for process in self.processes:
            with contextlib.suppress(Exception):
                self.stop(process, timeout=10)
        for namespace in (self.client, self.gate, self.server):
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:  # anything else still inside was started by this test (ip netns exec)
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@contextlib.contextmanager
def topology(prefix: str = "icpg") -> Iterator[Topology]:
    """Build the three namespaces; they are removed when the block ends, however it ends."""
    tag = secrets.token_hex(3)
    net = Topology("%s-c-%s" % (prefix, tag), "%s-g-%s" % (prefix, tag), "%s-s-%s" % (prefix, tag))
    try:
        net.up()
        yield net
    finally:
        net.down()


# --- the customer's servers ------------------------------------------------------------------------
@dataclass
class Nginx:
    """nginx in the server namespace: one server block per name on every port, logging `$remote_addr`."""

    process: subprocess.Popen
    directory: Path
    access_log: Path
    ca_pem: Path

    def log_lines(self) -> list[str]:
        """The access log: `remote_addr server_port host "request" status`, one line per request."""
        return self.access_log.read_text(errors="replace").splitlines() if self.access_log.exists() else []

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_nginx(net: Topology, directory: Path, names: list[str], http_ports: list[int],
                tls_ports: list[int]) -> Nginx:  # fmt: skip
    """Real nginx as the customer's server in the server namespace, on 0.0.0.0 and [::]: each name
    answers `served host=<host> server=<name> port=<port> remote=<client address>` on every port
    (TLS with its own certificate from a trustme CA), a default server `server=default`."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "certs"):
        (directory / temp).mkdir(exist_ok=True)
    ca = trustme.CA()
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(ca_pem)
    listens = "".join("        listen %s:%d%%(flag)s;\n" % (host, port) for port in http_ports
                      for host in ("0.0.0.0", "[::]"))  # fmt: skip
    listens += "".join("        listen %s:%d ssl%%(flag)s;\n" % (host, port) for port in tls_ports
                       for host in ("0.0.0.0", "[::]"))  # fmt: skip
    servers = ""
    for name in ["default.invalid", *names]:
        cert = ca.issue_cert(name)
        chain, key = directory / "certs" / ("%s.pem" % name), directory / "certs" / ("%s.key" % name)
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(key)
        default = name == "default.invalid"
        label = "default" if default else name
        servers += """
    server {
%(listens)s        server_name %(server_name)s;
        ssl_certificate %(chain)s;
        ssl_certificate_key %(key)s;
        location / {
            return 200 "served host=$host server=%(label)s port=$server_port remote=$remote_addr\\n";
        }
    }
""" % {"listens": listens % {"flag": " default_server" if default else ""}, "server_name": "_" if default else name,
       "chain": chain, "key": key, "label": label}  # fmt: skip
    access_log = directory / "access.log"
    conf = directory / "nginx.conf"
    conf.write_text(
        """
user root;
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log info;
events { worker_connections 512; }
http {
    log_format inline '$remote_addr $server_port $host "$request" $status';
    access_log %(access_log)s inline;
    client_body_temp_path %(dir)s/client_body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    default_type text/plain;
    server_names_hash_bucket_size 128;
    ssl_protocols TLSv1.2 TLSv1.3;
%(servers)s
}
"""
        % {"dir": directory, "access_log": access_log, "servers": servers},
        encoding="utf-8",
    )
    stderr = (directory / "stderr.log").open("w")
    argv = [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    process = net.popen(net.server, argv, stdout=stderr, stderr=stderr)
    nginx = Nginx(process, directory, access_log, ca_pem)
    for port in [*http_ports, *tls_ports]:
        net.wait_for_port(net.server, SERVER4, port, process=process)
        net.wait_for_port(net.server, SERVER6, port, process=process)
    return nginx


def start_banner(net: Topology, port: int) -> subprocess.Popen:
    """The server-first service in the server namespace, on 0.0.0.0 and [::] port `port`: it sends
    BANNER at once, then echoes each read prefixed with `echo from <the address it sees>: `."""
    process = net.popen(net.server, [sys.executable, str(Path(__file__)), "banner", str(port)])
    net.wait_for_port(net.server, SERVER4, port, process=process)
    net.wait_for_port(net.server, SERVER6, port, process=process)
    return process


class _Banner(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")[0].encode()
        transport.write(BANNER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"echo from %s: %s" % (self.peer, data))  # type: ignore[attr-defined]


async def _serve_banner(port: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(_Banner, host, port) for host in ("0.0.0.0", "::")]
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    if sys.argv[1:2] == ["banner"] and len(sys.argv) == 3:
        asyncio.run(_serve_banner(int(sys.argv[2])))
    else:
        sys.exit("usage: netnskit.py banner PORT")
