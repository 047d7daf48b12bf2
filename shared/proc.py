"""shared.proc -- privilege separation: spawn children, sandbox them.

OpenBSD's proc.c for Python.  The privileged parent starts each child by
re-executing the daemon's module with `-P title -I instance -S fd` (a fresh
interpreter, nothing of the parent's memory), the child's end of a
socketpair on fd `-S`.  A child imports everything it will ever need, takes
its configuration and descriptors from the parent, then sandboxes itself:
chroot, supplementary groups dropped, setresgid/setresuid to the
unprivileged user, PR_SET_NO_NEW_PRIVS.  As non-root nothing can be
dropped; the daemon still runs (for development) and says so once.

This module knows no daemon: the daemons' parent modules declare which
children exist and what they get.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import socket
import sys
import time
from dataclasses import dataclass, field

import trio

from shared import log
from shared.imsg import Channel

PR_SET_NO_NEW_PRIVS = 38
PR_SET_NAME = 15


def find_user(names: tuple[str, ...]) -> pwd.struct_passwd | None:
    """The first of `names` that exists (e.g. www, then www-data)."""
    for n in names:
        try:
            return pwd.getpwnam(n)
        except KeyError:
            continue
    return None


def set_title(title: str) -> None:
    """Name the process (`ps -o comm`, /proc/PID/comm), best effort."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(title.encode()[:15]), 0, 0, 0)
    except Exception:
        pass


def no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def drop_privileges(chroot: str | None, user: pwd.struct_passwd | None) -> bool:
    """chroot + setgroups + setresgid/setresuid + no_new_privs.

    Returns False (and changes nothing) when not running as root."""
    if os.geteuid() != 0:
        return False
    # Load what would otherwise be read from files after the chroot.
    time.localtime()
    if chroot:
        os.chroot(chroot)
        os.chdir("/")
    if user is not None:
        os.setgroups([user.pw_gid])
        os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
        os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
    no_new_privs()
    return True


@dataclass
class Child:
    """The parent's handle on one child process."""
    title: str
    instance: int
    generation: int
    process: trio.Process
    chan: Channel
    ready: trio.Event = field(default_factory=trio.Event)
    stopping: bool = False
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid


async def spawn(module: str, title: str, instance: int, generation: int,
                args: list[str]) -> Child:
    """Start `python -m module -P title -I instance -S fd args...`."""
    psock, csock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = csock.fileno()
    cmd = [sys.executable, "-m", module, "-P", title, "-I", str(instance),
           "-S", str(fd), *args]
    try:
        proc = await trio.lowlevel.open_process(cmd, pass_fds=(fd,))
    finally:
        csock.close()
    chan = Channel(psock, allow_pickle=False, trusted_send=True)
    return Child(title, instance, generation, proc, chan)


def child_channel(fd: int) -> Channel:
    """The child's end of its parent socket (call inside trio.run)."""
    sock = socket.socket(fileno=fd)
    return Channel(sock, allow_pickle=True, trusted_send=False)


def child_socket(fd: int) -> socket.socket:
    """The child's end as a blocking socket (before trio.run)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


def exit_status(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        return f"terminated; signal {-code}"
    return "exited abnormally" if code else "exited okay"


def warn_not_sandboxed(name: str) -> None:
    log.warn(f"{name}: not running as root: children are not chrooted and keep this user")
