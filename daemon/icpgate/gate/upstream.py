"""Where an accepted connection goes: its original destination, a static map, or one backend.

Also the destination the policy sees (the hosted IP the client dialled, which under REDIRECT or
DNAT is not the socket's own address), and the PROXY protocol header towards the backend.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from ..config import ListenerConfig, UpstreamConfig, split_host_port

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
Address = tuple[str, int]


def original_destination(sock: socket.socket, family: int) -> Address | None:
    """The pre-NAT destination of a REDIRECTed/DNATed connection, or None when there was no NAT."""
    try:
        if family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            return str(ipaddress.IPv6Address(raw[8:24])), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntoa(raw[4:8]), port
    except OSError:
        return None


class UpstreamResolver:
    """Picks the backend for one listener's connections."""

    def __init__(self, config: UpstreamConfig, listener: ListenerConfig) -> None:
        self.fixed = split_host_port(listener.backend) if listener.backend else None
        self.mode = config.mode
        self.static = {_normalise_key(key): split_host_port(value) for key, value in config.static.items()}

    def backend_for(self, destination: Address) -> Address | None:
        """The backend for a connection to `destination` (the hosted IP and port), or None."""
        if self.fixed:
            return self.fixed
        if self.mode == "static":
            ip, port = destination
            return self.static.get("%s:%d" % (ip, port)) or self.static.get(ip)
        return destination


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
