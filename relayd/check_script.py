"""check_script -- `check script "path"`: run `path <hostname>`, judge by exit status.

OpenBSD's check_script.c + script_exec(): the program gets the host name
(as written in the table) as its only argument and runs as the unprivileged
relayd user (`_relayd`, else `nobody`) when relayd runs as root, in `/`,
with no file descriptors beyond stdin/stdout/stderr.  It is killed
(SIGKILL, its whole process group) when the table's timeout passes.
Exit status > 0 means up; 0, a signal or a program that cannot be run
means down (`script failed`); failing to fork leaves the host unknown.

run() is the part that needs privileges to change user: under privilege
separation the parent runs it on hce's behalf (SCRIPT_RUN / SCRIPT_RESULT,
only paths the configuration names) and hce's check() gets the status
back through its `runner`; in one process hce calls run() itself.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess

import trio

from relayd.check_tcp import HOST_DOWN, HOST_UNKNOWN, HOST_UP, Result

SCRIPT_OK = "script ok"
SCRIPT_FAIL = "script failed"
# Users tried, in order, for running scripts as root (RELAYD_USER first).
SCRIPT_USERS = ("_relayd", "nobody")

_user: tuple[int, int] | None = None


def script_user() -> tuple[int, int] | None:
    """(uid, gid) scripts run as, or None to run them as ourselves."""
    global _user
    if os.geteuid() != 0:
        return None
    if _user is None:
        for name in SCRIPT_USERS:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            _user = (pw.pw_uid, pw.pw_gid)
            break
        else:
            _user = (65534, 65534)
    return _user


async def _spawn(path: str, name: str) -> trio.Process:
    user = script_user()
    opts: dict = dict(cwd="/", stdin=subprocess.DEVNULL, close_fds=True,
                      start_new_session=True)
    fd = -1
    if user is not None:
        uid, gid = user
        opts.update(user=uid, group=gid, extra_groups=[gid])
        # Open the program while we are still root and execute it through
        # the descriptor: the unprivileged user then needs execute (and, for
        # a #! script, read) permission on the file only, not on every
        # directory above it.  Falls back to the path if that fails.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
    try:
        if fd >= 0:
            try:
                return await trio.lowlevel.open_process(
                    [path, name], executable=f"/proc/self/fd/{fd}", pass_fds=(fd,), **opts)
            except OSError:
                pass
        return await trio.lowlevel.open_process([path, name], **opts)
    finally:
        if fd >= 0:
            os.close(fd)


def _kill(proc: trio.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        try:
            proc.kill()
        except OSError:
            pass


async def run(path: str, name: str, deadline: float) -> int:
    """Run the script; its exit status, 0 when killed or not runnable,
    -1 when no process could be created."""
    try:
        proc = await _spawn(path, name)
    except (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError):
        return 0                      # OpenBSD: the child's execlp failed, _exit(0)
    except OSError:
        return -1                     # fork failed
    try:
        with trio.move_on_at(deadline):
            status = await proc.wait()
            return status if status > 0 else 0
        return 0
    finally:
        if proc.returncode is None:
            _kill(proc)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await proc.wait()


async def check(inst, host, deadline: float, runner=None) -> Result:
    """Run the table's script for `host`; `runner` replaces run() (the
    parent round trip under privilege separation)."""
    status = await (runner or run)(inst.check.path or "", host.conf.name, deadline)
    if status < 0:
        return (HOST_UNKNOWN, SCRIPT_FAIL, 0)
    if status == 0:
        return (HOST_DOWN, SCRIPT_FAIL, 0)
    return (HOST_UP, SCRIPT_OK, 0)
