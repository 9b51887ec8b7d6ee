"""The listening sockets, bound once per daemon before any worker starts.

They are bound without SO_REUSEPORT: a second `icpgate run` on the same address and port then gets
EADDRINUSE instead of silently taking half the connections (SO_REUSEPORT lets any process of the
same user join the port group). The workers of one daemon share them by inheriting them across
fork(), so they all accept from one queue. SO_REUSEADDR lets a new daemon bind while the
connections of an old one are still draining or in TIME_WAIT; the old one closes its listening
sockets as it starts to drain.

A `transparent` listener sets IP_TRANSPARENT (IPV6_TRANSPARENT): it then accepts connections, and
receives datagrams, that nftables TPROXY steers to it for any destination address, and the accepted
socket's local address is the destination the client dialled. It needs CAP_NET_ADMIN. A `quic`
listener is a UDP socket; a transparent one also asks for each datagram's original destination
(IP_RECVORIGDSTADDR), which TPROXY keeps out of the socket's own address.
"""

from __future__ import annotations

import errno
import socket

from ..config.settings import ListenerConfig
from ..gate.sockopts import IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR, set_transparent

BACKLOG = 4096


class GateStartError(RuntimeError):
    """The gate cannot start serving (a listener cannot bind, workers do not come up)."""


def bind_listeners(listeners: tuple[ListenerConfig, ...]) -> dict[str, socket.socket]:
    """One listening socket per listener, by listener name; GateStartError names the one that failed."""
    bound: dict[str, socket.socket] = {}
    try:
        for listener in listeners:
            bound[listener.name] = _bind(listener)
    except OSError as error:
        close_all(bound)
        raise GateStartError(
            "cannot listen on %s: %s%s" % (listener.name, error.strerror or error, _missing_capability(listener, error))
        ) from None
    return bound


def _missing_capability(listener: ListenerConfig, error: OSError) -> str:
    """The capability a refused bind lacks, named for the operator (docs/deployment.md, "Capabilities")."""
    if error.errno == errno.EPERM and listener.transparent:
        return " (a transparent listener needs CAP_NET_ADMIN)"
    if error.errno == errno.EACCES and 0 < listener.port < 1024:
        return " (a port below 1024 needs CAP_NET_BIND_SERVICE)"
    return ""


def _bind(listener: ListenerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    udp = listener.kind == "quic"
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if listener.transparent:
            set_transparent(sock)
            if udp:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((listener.address, listener.port))
        if not udp:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def close_all(sockets: dict[str, socket.socket]) -> None:
    for sock in sockets.values():
        sock.close()
    sockets.clear()
