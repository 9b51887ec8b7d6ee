"""UDP plumbing for `quic` listeners: datagrams with the address they were sent to, and sockets that
answer from that address.

asyncio's DatagramProtocol hands over a datagram and its sender but no ancillary data, and under
TPROXY the address a client sent to is only in the ancillary data (IP_ORIGDSTADDR): the socket's
own address is the gate's. So the gate reads with `recvmsg_into` from `loop.add_reader`. The same
option on a wildcard-bound listener gives the local address each datagram came in on, which is what
the policy sees as the destination. A listener bound to one address, not transparent, has only that
one: it reads with the cheaper `recvfrom_into` and asks for nothing (gate/quic/listener.py `_read_fixed`).

A reply must come from the address the client sent to, or its QUIC stack drops it. Under TPROXY
`ReplySockets` keeps one IP_TRANSPARENT socket bound to each such address, a bounded number of them.
A listener bound to a wildcard address names the source of each reply with IP_PKTINFO
(`source_option`), or the kernel would pick one by route, which on a host with several addresses
need not be the one the client used.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Callable

from ..sockopts import IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR, set_transparent
from ..upstream import Address

# The control message types equal the options that ask for them (linux/in.h, linux/in6.h).
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR
IP_PKTINFO = 8  # linux/in.h; the socket module names only IPV6_PKTINFO
ANCILLARY_SPACE = socket.CMSG_SPACE(28)  # one sockaddr_in6
MAX_DATAGRAM = 65536  # a UDP payload is at most 65,527 bytes: nothing is ever truncated
MAX_REPLY_SOCKETS = 4096  # distinct original destinations answered from at once (hosted IP:port pairs)


def ask_destination(sock: socket.socket) -> None:
    """Have every datagram carry the address it was sent to (the original one under TPROXY)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)


def destination_of(ancdata: list[tuple[int, int, bytes]]) -> Address | None:
    """The (address, port) a datagram was sent to, from its IP_ORIGDSTADDR control message."""
    for level, kind, data in ancdata:
        address = _original_destination(level, kind, data)
        if address is not None:
            return address
    return None


@functools.lru_cache(maxsize=MAX_REPLY_SOCKETS)
def _original_destination(level: int, kind: int, data: bytes) -> Address | None:
    """One control message's address, remembered: a listener's datagrams go to a few hosted
    addresses, and formatting one with inet_ntop costs more than finding it again."""
    if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:  # sockaddr_in
        return socket.inet_ntop(socket.AF_INET, data[4:8]), int.from_bytes(data[2:4], "big")
    if level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:  # sockaddr_in6
        return socket.inet_ntop(socket.AF_INET6, data[8:24]), int.from_bytes(data[2:4], "big")
    return None


def source_option(destination: Address) -> list[tuple[int, int, bytes]]:
    """The control message that makes a reply leave from `destination`'s address (IP_PKTINFO's
    spec_dst, IPV6_PKTINFO's address), for `sendmsg` on a wildcard-bound socket."""
    if ":" in destination[0]:  # struct in6_pktinfo: address, interface 0
        address = socket.inet_pton(socket.AF_INET6, destination[0])
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, address + bytes(4))]
    # struct in_pktinfo: interface 0, spec_dst (the source to use), addr (unused when sending)
    return [(socket.IPPROTO_IP, IP_PKTINFO, bytes(4) + socket.inet_aton(destination[0]) + bytes(4))]


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def open_upstream(backend: Address, source: Address | None) -> socket.socket:
    """A connected, non-blocking UDP socket to an IP literal `backend`; from `source` (the client's own
    address, IP_TRANSPARENT) when given. OSError when the kernel refuses any of it."""
    family = socket.AF_INET6 if ":" in backend[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)  # one system call fewer than setblocking
    try:
        if source is not None:
            set_transparent(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(source)
        sock.connect(backend)
    except OSError:
        sock.close()
        raise
    return sock


class ReplySockets:
    """IP_TRANSPARENT sockets bound to original destinations, to answer TPROXYed clients from them.

    Bound to a hosted address and port, such a socket is also the most specific match for datagrams
    sent there, so the kernel may deliver clients' datagrams to it instead of the listener: each
    one is read too, and what it receives is handed to `deliver` as if the listener had read it.
    Flows take and release them; at `limit` (MAX_REPLY_SOCKETS, or less: the listener's share of
    descriptors) the oldest one no flow uses is closed, and when every one is in use a new
    destination is refused (ReplySocketsFull).
    """

    __slots__ = ("_deliver", "_loop", "_sockets", "_users", "limit")

    def __init__(self, loop, deliver: Callable[[socket.socket, Address], None], limit: int | None = None) -> None:
        self._loop = loop
        self._deliver = deliver
        self.limit = limit or MAX_REPLY_SOCKETS
        self._sockets: dict[Address, socket.socket] = {}  # in order of creation
        self._users: dict[Address, int] = {}

    def take(self, destination: Address) -> socket.socket:
        """The socket answering from `destination`, for one more flow; OSError when it cannot be had."""
        sock = self._sockets.get(destination)
        if sock is None:
            if len(self._sockets) >= self.limit:
                idle = next((kept for kept in self._sockets if not self._users[kept]), None)
                if idle is None:
                    raise ReplySocketsFull("%d reply sockets, all in use" % self.limit)
                self._close(idle)
            sock = self._open(destination)
        self._users[destination] += 1
        return sock

    def release(self, destination: Address) -> None:
        """A flow that took the socket for `destination` has ended; the socket stays for the next one."""
        self._users[destination] -= 1

    def _open(self, destination: Address) -> socket.socket:
        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            set_transparent(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ask_destination(sock)
            sock.bind(destination)
        except OSError:
            sock.close()
            raise
        self._sockets[destination] = sock
        self._users[destination] = 0
        self._loop.add_reader(sock.fileno(), self._deliver, sock, destination)
        return sock

    def _close(self, destination: Address) -> None:
        sock = self._sockets.pop(destination)
        del self._users[destination]
        self._loop.remove_reader(sock.fileno())
        sock.close()

    def close(self) -> None:
        for destination in list(self._sockets):
            self._close(destination)


class ReplySocketsFull(OSError):
    """Every reply socket is answering for a live flow: a flow to yet another destination must wait."""
