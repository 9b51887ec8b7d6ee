"""Where an accepted connection goes: its original destination, a static map, or one backend.

Also the destination the policy sees (the hosted IP the client dialled, which under REDIRECT or
DNAT is not the socket's own address, and under TPROXY is), the PROXY protocol header towards the
backend, and the socket of a transparent upstream connection (`upstream.source = "client"`).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import logging
import socket
import struct
from functools import lru_cache

from ..config.settings import ListenerConfig, UpstreamConfig, split_host_port
from .sockopts import set_transparent

log = logging.getLogger("icpgate.gate")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
# linux/in.h, for IPv4 and IPv6 sockets alike: bind() leaves the port to connect(), which picks one
# unique for the whole 4-tuple; a bound port 0 takes an ephemeral port for the address alone.
IP_BIND_ADDRESS_NO_PORT = 24
Address = tuple[str, int]


# getsockopt(2) straight on the accepted socket's descriptor. uvloop's `get_extra_info("socket")`
# wraps a new socket.socket around the descriptor for every getsockopt and raises an OSError when
# there was no NAT; this call does neither. One worker's connections are accepted on one thread,
# so the result buffers are shared.
_libc = ctypes.CDLL(None, use_errno=True)
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_getsockopt.restype = ctypes.c_int
_address = ctypes.create_string_buffer(28)  # a struct sockaddr_in6, the larger of the two
_length = ctypes.c_uint32()
_address_p = ctypes.addressof(_address)
_length_p = ctypes.addressof(_length)


def original_destination(fd: int, family: int) -> Address | None:
    """The pre-NAT destination of a REDIRECTed/DNATed connection on descriptor `fd`, or None when
    there was no NAT (or no connection tracking to ask)."""
    if family == socket.AF_INET6:
        _length.value = 28
        if _getsockopt(fd, socket.IPPROTO_IPV6, SO_ORIGINAL_DST, _address_p, _length_p) != 0:
            return None
        raw = _address.raw
        return str(ipaddress.IPv6Address(raw[8:24])), (raw[2] << 8) | raw[3]
    _length.value = 16
    if _getsockopt(fd, socket.SOL_IP, SO_ORIGINAL_DST, _address_p, _length_p) != 0:
        return None
    raw = _address.raw
    return socket.inet_ntoa(raw[4:8]), (raw[2] << 8) | raw[3]


class UpstreamResolver:
    """Picks the backend for one listener's connections."""

    def __init__(self, config: UpstreamConfig, listener: ListenerConfig) -> None:
        self.fixed = split_host_port(listener.backend) if listener.backend else None
        self.mode = config.mode
        self.source = config.source
        self.static = {_normalise_key(key): split_host_port(value) for key, value in config.static.items()}

    def backend_for(self, destination: Address) -> Address | None:
        """The backend for a connection to `destination` (the hosted IP and port), or None."""
        if self.fixed:
            return self.fixed
        if self.mode == "static":
            ip, port = destination
            return self.static.get("%s:%d" % (ip, port)) or self.static.get(ip)
        return destination


class SourceError(OSError):
    """A transparent upstream connection that cannot be made; `cause` names why, for the counters."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


_reported: set[str] = set()


def report_once(error: SourceError) -> None:
    """Log a transparent-upstream failure the first time its cause occurs in this process: a
    missing capability or a backend of the wrong family fails every connection alike, and one
    clear line says so without flooding the log."""
    if error.cause not in _reported:
        _reported.add(error.cause)
        log.error("upstream.source = \"client\": %s (counted as upstream_errors/%s, logged once)",
                  error, error.cause)  # fmt: skip


async def connect_from_client(loop: asyncio.AbstractEventLoop, client: Address, backend: Address) -> socket.socket:
    """A TCP socket connected to `backend` from the client's own address (HAProxy's `usesrc
    clientip`): IP_TRANSPARENT lets it bind an address that is not this host's, port 0 lets the
    kernel pick the port. The backend's replies reach this socket only if the gate is on their
    path (docs/deployment.md, "Inline"). An IPv4 client seen as ::ffff:a.b.c.d connects as IPv4.
    Raises SourceError when it cannot be done, OSError when the connect fails; the caller bounds
    the time."""
    client_ip = ipaddress.ip_address(client[0].partition("%")[0])
    if client_ip.version == 6 and client_ip.ipv4_mapped is not None:
        client_ip = client_ip.ipv4_mapped
    family = socket.AF_INET6 if client_ip.version == 6 else socket.AF_INET
    target = await _backend_address(loop, backend, family)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            set_transparent(sock)
        except PermissionError:
            raise SourceError("no_capability", "IP_TRANSPARENT needs CAP_NET_ADMIN (or CAP_NET_RAW), which the gate "
                              "lacks") from None  # fmt: skip
        # One client address (a NAT, a proxy) may hold more upstreams than there are ephemeral ports.
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((str(client_ip), 0))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                raise SourceError("source_bind", "cannot bind the client's address %s: %s"
                                  % (client_ip, error.strerror)) from None  # fmt: skip
            raise
        await loop.sock_connect(sock, target)
    except BaseException:
        sock.close()
        raise
    return sock


@lru_cache(maxsize=4096)
def is_local_address(ip: str) -> bool:
    """Whether `ip` is one of this host's addresses: a plain socket (no IP_TRANSPARENT) can bind it.
    Remembered per address: the probe (a socket, a bind, a close) cost 11 µs per upstream connection.

    The loop guard needs it with `upstream.source = "client"`: the upstream's local end is then
    the client's address and a port this host picked, and the client may open a connection of
    its own from that same port to the same service (its kernel, or a NAT in front of it, knows
    nothing of ours). That is the gate dialling itself only when the backend is on this host."""
    address = ipaddress.ip_address(ip.partition("%")[0])
    try:
        probe = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    except OSError:  # no descriptor to spare (EMFILE): keep the guard, as if local
        return True
    with probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


async def _backend_address(loop: asyncio.AbstractEventLoop, backend: Address, family: int) -> Address:
    """The backend as an address of the client's family; a backend only of the other family cannot
    be reached from the client's address (SourceError)."""
    host = backend[0].strip("[]")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = await loop.getaddrinfo(host, backend[1], family=family, type=socket.SOCK_STREAM)
        except socket.gaierror:
            infos = []
        if not infos:
            raise SourceError("family", "backend %s has no %s address to reach from the client's"
                              % (host, "IPv6" if family == socket.AF_INET6 else "IPv4")) from None  # fmt: skip
        return infos[0][4][:2]
    if literal.version == 6 and literal.ipv4_mapped is not None:
        literal = literal.ipv4_mapped
    if (literal.version == 6) != (family == socket.AF_INET6):
        raise SourceError("family", "backend %s cannot be reached from an IPv%d client's address"
                          % (literal, 6 if family == socket.AF_INET6 else 4))  # fmt: skip
    return str(literal), backend[1]


def _normalise_key(key: str) -> str:
    if key.startswith("["):
        host, _, port = key[1:].partition("]:")
        return "%s:%s" % (ipaddress.ip_address(host), port) if port else str(ipaddress.ip_address(host.rstrip("]")))
    if key.count(":") == 1:
        host, port = key.split(":")
        return "%s:%s" % (ipaddress.ip_address(host), port)
    return str(ipaddress.ip_address(key))


_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, client: Address, destination: Address) -> bytes:
    """A PROXY protocol v1 or v2 header telling the backend the real client and destination."""
    client_ip = ipaddress.ip_address(client[0])
    dest_ip = ipaddress.ip_address(destination[0])
    if client_ip.version != dest_ip.version:  # v4 client on a dual-stack v6 socket: send it as v6
        client_ip = ipaddress.IPv6Address("::ffff:%s" % client_ip) if client_ip.version == 4 else client_ip
        dest_ip = ipaddress.IPv6Address("::ffff:%s" % dest_ip) if dest_ip.version == 4 else dest_ip
    if version == "v1":
        family = "TCP4" if client_ip.version == 4 else "TCP6"
        return ("PROXY %s %s %s %d %d\r\n" % (family, client_ip, dest_ip, client[1], destination[1])).encode()
    if client_ip.version == 4:
        addresses = client_ip.packed + dest_ip.packed + struct.pack("!HH", client[1], destination[1])
        return _V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses
    addresses = client_ip.packed + dest_ip.packed + struct.pack("!HH", client[1], destination[1])
    return _V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(addresses)) + addresses
