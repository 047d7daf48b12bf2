"""engine.listen -- create listening sockets (the parent's job).

Binding happens before any child drops privileges and before trio starts,
so these are plain blocking calls on stdlib sockets.  `::` gets
IPV6_V6ONLY so that `*` can bind both 0.0.0.0 and :: on the same port.
Accepting is engine.serve's job, not this module's.
"""

from __future__ import annotations

import socket

# Pending connections we ask the kernel for when the config sets no
# `backlog`: nginx's default (NGX_LISTEN_BACKLOG), HAProxy's is of the same
# order.  OpenBSD's 10 (SERVER_BACKLOG, RELAY_BACKLOG) overflows on Linux
# under a burst of connects: SYNs are dropped and retried a second later.
DEFAULT_BACKLOG = 511
SOMAXCONN = "/proc/sys/net/core/somaxconn"


def default_backlog() -> int:
    """DEFAULT_BACKLOG capped by net.core.somaxconn, as the kernel caps it
    (so that what ss(8) shows is what we asked for)."""
    try:
        with open(SOMAXCONN) as f:
            return min(DEFAULT_BACKLOG, int(f.read()))
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


def listen(sock: socket.socket, backlog: int | None, inherited: bool = False) -> None:
    """listen(2) with the configured backlog, else the default.  A socket
    systemd passed (`inherited`) keeps the backlog systemd gave it unless
    the config names one; raises OSError."""
    if backlog is None:
        if inherited:
            return
        backlog = default_backlog()
    sock.listen(backlog)


def bind_tcp(addr: str, port: int, backlog: int | None = None,
             reuseport: bool = False, sndbuf: int | None = None,
             rcvbuf: int | None = None, ttl: int | None = None,
             minttl: int | None = None, freebind: bool = False,
             transparent: bool = False) -> socket.socket:
    """A listening TCP socket on addr:port (raises OSError); `backlog`
    None is default_backlog().

    `transparent`: IP_TRANSPARENT, so that connections a TPROXY rule sends
    here to other addresses are accepted (getsockname() then gives the
    address the client asked for); needs CAP_NET_RAW or CAP_NET_ADMIN."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if freebind:
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        if transparent:
            set_transparent(sock)
        set_options(sock, sndbuf=sndbuf, rcvbuf=rcvbuf, ttl=ttl, minttl=minttl)
        sock.bind((addr, port))
        listen(sock, backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT): bind or accept addresses that are
    not local (TPROXY, `transparent` relays); raises OSError."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75


def set_options(sock: socket.socket, sndbuf: int | None = None,
                rcvbuf: int | None = None, ttl: int | None = None,
                minttl: int | None = None, nodelay: bool | None = None) -> None:
    """Socket options of httpd's `tcp {}` and relayd's protocol `tcp {}`."""
    v6 = sock.family == socket.AF_INET6
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if ttl is not None:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    if minttl is not None:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_MINHOPCOUNT", 73), minttl)
        else:
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MINTTL", 21), minttl)
    if nodelay is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
