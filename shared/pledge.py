"""shared.pledge -- the last step of a child's start-up: pledge(2), Linux style.

A child that has taken its configuration and descriptors from the parent,
opened what it needs in advance and dropped its privileges (shared.proc)
calls pledge(name, promises, read=..., connect=...) before it serves:

  * Landlock (shared.landlock): read-only beneath `read`, no other file
    access; TCP connects only to `connect` ports (None: any port).  What
    the kernel cannot enforce is logged in one line and skipped.
  * seccomp (shared.seccomp): the system calls of `promises` only; any
    other ends the process with SIGSYS.

`-U` on the daemon's command line (passed on to every child) turns both
off for debugging; chroot, user change and no_new_privs stay.

Test hook: with TANDEM_PLEDGE_PROBE=ACTION in the environment (the tests
set it; nothing else reads it), a pledged process does ACTION when it gets
SIGUSR2 -- `execve`, `write` (open a file for writing), `netlink` (open an
AF_NETLINK socket), `read` (open "/" read-only) or `connect:PORT` (a TCP
connect to 127.0.0.1:PORT: Landlock refuses a port not allowed with
"Permission denied", an allowed one with nothing listening gets
"Connection refused") -- and logs `pledge probe ACTION: survived (...)`
if it is still alive.  The filter is
the production one; only the trigger is test-only.

Not here: the syscall groups (shared.seccomp), the Landlock calls
(shared.landlock), which process keeps which promises (each child_main).
"""

from __future__ import annotations

import os
import signal
import socket

from shared import landlock, log, seccomp

# False with -U (set by shared.cli before the daemon's main runs).
enabled = True

PROBE_ENV = "TANDEM_PLEDGE_PROBE"


def pledge(name: str, promises: tuple[str, ...], *, read: tuple[str, ...] = (),
           connect: tuple[int, ...] | None = None) -> bool:
    """Sandbox this process for good; False when switched off (-U)."""
    if not enabled:
        log.debug(f"{name}: -U: no syscall filter, no landlock")
        _arm_probe()
        return False
    seccomp.no_new_privs()      # already set when root; needed for both as non-root
    skipped = landlock.restrict(read, connect)
    if skipped:
        log.info(f"{name}: {'; '.join(skipped)}")
    try:
        seccomp.install(promises)
    except seccomp.SeccompError as e:
        log.warn(f"{name}: no syscall filter: {e.strerror}")
    _arm_probe()
    return True


# -- the test hook ---------------------------------------------------------------------

def _probe(action: str) -> str:
    if action == "execve":
        os.execv("/nonexistent-pledge-probe", ["probe"])
    if action == "write":
        os.close(os.open("/pledge-probe", os.O_WRONLY | os.O_CREAT, 0o600))
        return "opened for writing"
    if action == "netlink":
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
        return "netlink socket"
    if action == "read":
        os.close(os.open("/", os.O_RDONLY | os.O_DIRECTORY))
        return "opened / read-only"
    if action.startswith("connect:"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)     # loopback: refused or accepted at once
            s.connect(("127.0.0.1", int(action.split(":", 1)[1])))
        return "connected"
    return "unknown action"


def _arm_probe() -> None:
    action = os.environ.get(PROBE_ENV)
    if not action:
        return

    def handler(signum, frame) -> None:
        try:
            result = _probe(action)
        except (OSError, ValueError) as e:
            result = getattr(e, "strerror", None) or str(e)
        log.warn(f"pledge probe {action}: survived ({result})")
    signal.signal(signal.SIGUSR2, handler)
