"""Socket options of transparent mode that the socket module does not name: the listeners, the QUIC
reply sockets and the transparent upstream all set them."""

from __future__ import annotations

import socket

# linux/in.h and linux/in6.h; the socket module does not name them all
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IPV6_TRANSPARENT = 75


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT: bind and accept for addresses that are not this host's own (TPROXY, and the
    client's address as the source of an upstream connection). OSError (EPERM) without CAP_NET_ADMIN."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
