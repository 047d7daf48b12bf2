"""shared.sd -- systemd integration: sd_notify(3) and socket activation.

notify("READY=1") tells a `Type=notify` service manager where the daemon
is (READY, RELOADING, STOPPING); it does nothing without $NOTIFY_SOCKET.

Socket activation (sd_listen_fds(3)): when systemd passes listening
sockets ($LISTEN_PID is our pid, $LISTEN_FDS of them from fd 3), the
parents take the one whose address matches a `listen on` address instead
of binding a new one (take()); sockets no listen address asks for stay
unused (a reload may ask for them later).  The variables are removed from
the environment on first use, so children never see them.

Both daemons' parents use this; nothing here knows a configuration.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import weakref

SD_LISTEN_FDS_START = 3

_inherited: list[socket.socket] | None = None
# Sockets take() handed out: they keep systemd's listen backlog.
_taken: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def notify(state: str) -> bool:
    """sd_notify(3) when started by systemd with Type=notify; True if sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed us and nobody took yet (sd_listen_fds)."""
    global _inherited
    if _inherited is not None:
        return _inherited
    _inherited = []
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    try:
        if int(pid) != os.getpid():
            return _inherited
        n = int(count)
    except ValueError:
        return _inherited
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        try:
            os.set_inheritable(fd, False)
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        _inherited.append(s)
    return _inherited


def was_inherited(sock: socket.socket) -> bool:
    """Whether take() returned `sock` (systemd made it, with its backlog)."""
    return sock in _taken


def _same_addr(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%")[0]) == ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return a == b


def take(addr: str, port: int) -> socket.socket | None:
    """The inherited listening TCP socket bound to addr:port (removed from
    the pool, non-blocking), else None."""
    for s in listen_fds():
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                continue
            if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            name = s.getsockname()
        except OSError:
            continue
        if name[1] == port and _same_addr(name[0], addr):
            _inherited.remove(s)
            _taken.add(s)
            s.setblocking(False)
            return s
    return None


def reset_for_tests(socks: list[socket.socket] | None = None) -> None:
    """Forget (or set) the inherited pool (unit tests)."""
    global _inherited
    _inherited = socks
