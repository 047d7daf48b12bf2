"""shared.proc -- privilege separation: spawn children, sandbox them.

OpenBSD's proc.c for Python.  The privileged parent starts each child by
re-executing the daemon's module with `-P title -I instance -S fd` (a fresh
interpreter, nothing of the parent's memory), the child's end of a
socketpair on fd `-S`.  A child imports everything it will ever need, takes
its configuration and descriptors from the parent, then sandboxes itself:
chroot, supplementary groups dropped, setresgid/setresuid to the
unprivileged user, PR_SET_NO_NEW_PRIVS; then it pledges (shared.pledge).
As non-root nothing can be dropped; the daemon still runs (for
development) and says so once.

This module knows no daemon: the daemons' parent modules declare which
children exist and what they get.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import socket
import stat
import sys
import time
from dataclasses import dataclass, field

import trio

from shared import log
from shared.imsg import Channel
from shared.seccomp import no_new_privs

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


# Capabilities kept when the unprivileged user cannot reach configured
# files (see drop_privileges): read and write past file modes, nothing else.
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
PR_SET_KEEPCAPS = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _set_caps(caps: list[int]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    mask = 0
    for c in caps:
        mask |= 1 << c
    data[0].effective = data[0].permitted = mask
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _capget(which: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        return 0
    return getattr(data[0], which) | (getattr(data[1], which) << 32)


def _get_caps() -> int:
    """The permitted capability set of this process (bit mask)."""
    return _capget("permitted")


def effective_caps() -> int:
    """The effective capability set of this process (bit mask)."""
    return _capget("effective")


def can_reach(path: str, user: pwd.struct_passwd, write: bool = False) -> bool:
    """Could `user` open `path` (search every directory on the way)?

    Judged from the mode bits, as the kernel would for that uid and its
    primary group; a missing file counts as reachable (nothing to judge)."""
    parts = [p for p in path.split("/") if p]
    cur = "/"
    for i, part in enumerate(parts + [None]):
        try:
            st = os.stat(cur)
        except OSError:
            return True
        last = part is None
        if stat.S_ISDIR(st.st_mode) and not last:
            need = 1
        else:
            need = 2 if write else 4
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & (need << 6)
        elif st.st_gid == user.pw_gid:
            ok = st.st_mode & (need << 3)
        else:
            ok = st.st_mode & need
        if not ok:
            return False
        if last:
            return True
        cur = os.path.join(cur, part)
    return True


CAP_NET_RAW = 13
CAP_NET_ADMIN = 12


def drop_privileges(chroot: str | None, user: pwd.struct_passwd | None,
                    keep_dac: bool = False, keep_caps: tuple[int, ...] = ()) -> bool:
    """chroot + setgroups + setresgid/setresuid + no_new_privs.

    `keep_dac` keeps CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (only those)
    across the uid change: for files the configuration names that the
    unprivileged user's modes do not reach.  `keep_caps` keeps other
    capabilities the same way (relayd's pfe: CAP_NET_ADMIN).  Returns
    False (and changes nothing) when not running as root."""
    if os.geteuid() != 0:
        return False
    # Load what would otherwise be read from files after the chroot.
    time.localtime()
    if chroot:
        os.chroot(chroot)
        os.chdir("/")
    caps = ([CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH] if keep_dac else []) + list(keep_caps)
    have = _get_caps()
    caps = [c for c in caps if have >> c & 1]     # e.g. a bounding set without it
    if user is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if caps:
            libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([user.pw_gid])
        os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
        os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
        _set_caps(caps)
    no_new_privs()
    return True


def make_empty_dir(path: str = "/var/empty") -> None:
    """The chroot of relayd's children: created when missing, root-owned,
    mode 0755 (as OpenBSD's /var/empty)."""
    if os.geteuid() != 0:
        return
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        st = os.stat(path)
        if st.st_uid != 0 or st.st_mode & 0o022:
            os.chown(path, 0, 0)
            os.chmod(path, 0o755)
    except OSError as e:
        log.warn_errno(f"cannot make {path}", e)


@dataclass
class Child:
    """The parent's handle on one child process."""
    title: str
    instance: int
    generation: int
    process: trio.Process
    chan: Channel
    ready: trio.Event = field(default_factory=trio.Event)
    quiesced: trio.Event = field(default_factory=trio.Event)   # CTL_QUIESCED came
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
    from shared import pledge
    cmd = [sys.executable, "-m", module, "-P", title, "-I", str(instance),
           "-S", str(fd), *(["-U"] if not pledge.enabled else []), *args]
    try:
        proc = await trio.lowlevel.open_process(cmd, pass_fds=(fd,))
    finally:
        csock.close()
    chan = Channel(psock, allow_pickle=False, trusted_send=True, accept_fds=False)
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


# A child that dies sooner than this after its start is restarted only
# after a pause (no busy restart loop for a child that cannot start).
RESTART_PAUSE = 1.0
# Seconds an old generation gets to say it no longer accepts (a worker
# bounds its own wait at engine.serve's 2 s).
QUIESCE_TIMEOUT = 5.0


class Supervisor:
    """The parent's children: start, read, watch, restart, stop.

    `setup(child)` sends a freshly started child its configuration; the
    same function restarts a child that died.  `on_message(child, msg)`
    gets every message other than CTL_READY and CTL_QUIESCED."""

    def __init__(self, module: str, args: list[str], nursery: trio.Nursery,
                 on_message=None, on_exit=None) -> None:
        self.module = module
        self.args = args
        self.nursery = nursery
        self.on_message = on_message
        # on_exit(child, returncode): called once a child is gone (before
        # a restart), e.g. to release what the parent kept for it.
        self.on_exit = on_exit
        self.children: list[Child] = []
        self.stopping = False

    def of(self, title: str, generation: int | None = None) -> list[Child]:
        return [c for c in self.children if c.title == title and not c.stopping
                and (generation is None or c.generation == generation)]

    async def start(self, title: str, instance: int, generation: int, setup) -> Child:
        child = await spawn(self.module, title, instance, generation, self.args)
        child.info["setup"] = setup
        child.info["started"] = trio.current_time()
        self.children.append(child)
        self.nursery.start_soon(self._watch, child)
        self.nursery.start_soon(self._read, child)
        try:
            await setup(child)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass   # it died during set-up: _watch reports and restarts it
        return child

    async def _read(self, child: Child) -> None:
        from shared.imsg import Imsg, ImsgError
        while True:
            try:
                msg = await child.chan.recv()
            except ImsgError as e:
                log.warn(f"{child.title}: {e}: killing pid {child.pid}")
                child.process.kill()
                return
            except (OSError, trio.ClosedResourceError):
                return
            if msg is None:
                return
            if msg.type == Imsg.CTL_READY:
                child.ready.set()
            elif msg.type == Imsg.CTL_QUIESCED:
                child.quiesced.set()
            elif self.on_message is not None:
                try:
                    await self.on_message(child, msg)
                except (ImsgError, KeyError, TypeError, ValueError, AttributeError) as e:
                    # Unknown type or malformed payload: fatal for the child.
                    log.warn(f"{child.title}: bad message {msg.type} ({e!r}): "
                             f"killing pid {child.pid}")
                    child.process.kill()
                    return
                except Exception as e:
                    log.warn_exc(f"{child.title}: message {msg.type}: {e!r}")
            else:
                log.warn(f"{child.title}: unexpected message {msg.type}: killing pid {child.pid}")
                child.process.kill()
                return

    async def _watch(self, child: Child) -> None:
        code = await child.process.wait()
        if child in self.children:
            self.children.remove(child)
        if self.on_exit is not None:
            try:
                self.on_exit(child, code)
            except Exception as e:
                log.warn_exc(f"{child.title}: exit hook: {e!r}")
        if self.stopping or child.stopping:
            child.chan.close()
            return
        log.warn(f"lost child: pid {child.pid} {exit_status(code)}")
        child.chan.close()
        if trio.current_time() - child.info.get("started", 0) < RESTART_PAUSE:
            await trio.sleep(RESTART_PAUSE)
        if self.stopping:
            return
        await self.start(child.title, child.instance, child.generation, child.info["setup"])

    async def wait_ready(self, children: list[Child], timeout: float) -> bool:
        with trio.move_on_after(timeout):
            for c in children:
                await c.ready.wait()
            return True
        return False

    async def send(self, child: Child, mtype: int, payload=None, fd: int = -1) -> bool:
        try:
            await child.chan.send(mtype, payload, fd)
            return True
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def broadcast(self, mtype: int, payload=None, title: str | None = None) -> None:
        for c in list(self.children):
            if not c.stopping and (title is None or c.title == title):
                await self.send(c, mtype, payload)

    async def quiesce(self, children: list[Child], timeout: float = QUIESCE_TIMEOUT) -> None:
        """Reload: `children` (the old generation) stop accepting, and say
        so (CTL_QUIESCE, CTL_QUIESCED), before the parent says "reloaded":
        from that line on every new connection is the new generation's.
        They are not restarted if they die now; one that does not answer
        within `timeout` is not waited for."""
        from shared.imsg import Imsg
        asked = []
        for c in children:
            c.stopping = True
            if await self.send(c, Imsg.CTL_QUIESCE):
                asked.append(c)
        with trio.move_on_after(timeout):
            for c in asked:
                await c.quiesced.wait()

    async def stop(self, children: list[Child], drain: float) -> None:
        """Ask `children` to drain and exit; kill what is left after `drain`."""
        from shared.imsg import Imsg
        for c in children:
            c.stopping = True
            await self.send(c, Imsg.CTL_STOP, {"drain": drain})
        with trio.move_on_after(drain + 2):
            for c in children:
                await c.process.wait()
        for c in children:
            if c.process.returncode is None:
                c.process.kill()
                with trio.move_on_after(2):
                    await c.process.wait()


@dataclass
class Setup:
    """What a child received from the parent before CFG_DONE."""
    config: object
    msgs: list
    reader: object

    def fds(self, mtype: int) -> list:
        return [m for m in self.msgs if m.type == mtype]


def recv_setup(sock: socket.socket) -> Setup:
    """Blocking: read messages until CFG_DONE (before the sandbox, before trio)."""
    from shared.imsg import Imsg, Reader, _recv_fds, _wants_fd
    reader = Reader(allow_pickle=True)
    msgs = []
    config = None
    done = False
    while not done:
        data, fds = _recv_fds(sock)
        if not data:
            raise SystemExit(1)      # the parent went away during set-up
        for m in reader.feed(data, fds):
            m.fd = reader.fds.pop(0) if reader.fds and _wants_fd(m) else -1
            if done:
                # Read along with CFG_DONE: the Channel made with this
                # reader delivers them first.
                reader.leftover.append(m)
            elif m.type == Imsg.CFG_CONFIG:
                config = m.payload
            elif m.type == Imsg.CFG_DONE:
                done = True
            else:
                msgs.append(m)
    return Setup(config, msgs, reader)


def parent_message(msg, name: str, handle) -> int | None:
    """One message from a child's parent (None: the parent is gone).
    CTL_VERBOSE is applied here, any other message but CTL_STOP goes to
    handle(msg), which raises ValueError (or KeyError, TypeError,
    AttributeError, OSError) on an unknown or malformed one (logged).
    Returns None to go on, else the child's exit status: 0 (CTL_STOP, no
    parent) or 1 (a bad message)."""
    from shared.imsg import Imsg
    if msg is None or msg.type == Imsg.CTL_STOP:
        return 0
    try:
        if msg.type == Imsg.CTL_VERBOSE:
            log.set_verbose(int(msg.payload.get("verbose", 0)))
        else:
            handle(msg)
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:
        log.warn(f"{name}: bad message from the parent: {e!r}")
        return 1
    return None


async def parent_messages(chan: Channel, name: str, handle) -> int:
    """A trio child's loop over what its parent sends (parent_message()
    for each), until it ends; returns the exit status."""
    while True:
        status = parent_message(await chan.recv(), name, handle)
        if status is not None:
            return status


def recv_nowait(sock: socket.socket, reader) -> list:
    """Blocking-socket helper: the messages already waiting on `sock` (the
    reader's leftovers first), without waiting for more.  Returned
    messages are consumed; partial ones stay in the reader."""
    from shared.imsg import _recv_fds, _wants_fd
    out = list(reader.leftover)
    reader.leftover.clear()
    sock.setblocking(False)
    try:
        while True:
            try:
                data, fds = _recv_fds(sock)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            for m in reader.feed(data, fds):
                m.fd = reader.fds.pop(0) if reader.fds and _wants_fd(m) else -1
                out.append(m)
    finally:
        sock.setblocking(True)
    return out


class Pending:
    """Requests awaiting their answer, by sequence number: a process sends
    {"seq": n, ...} and the peer's reply {"seq": n, "result": r} wakes it.

        seq, wait = pending.new(peer)
        await chan.send(TYPE, {"seq": seq, ...})
        result = await wait(timeout)        # None on timeout
        ...
        pending.answer(reply, peer)         # from the reading task

    `peer` (e.g. the child's pid) guards against one peer answering
    another's request."""

    def __init__(self) -> None:
        self._seq = 0
        self._waiting: dict[int, list] = {}

    def new(self, peer=None):
        self._seq += 1
        seq = self._seq
        slot = [trio.Event(), None, peer]
        self._waiting[seq] = slot

        async def wait(timeout: float):
            try:
                with trio.move_on_after(timeout):
                    await slot[0].wait()
                return slot[1]
            finally:
                self._waiting.pop(seq, None)
        return seq, wait

    def cancel(self, seq: int) -> None:
        slot = self._waiting.pop(seq, None)
        if slot is not None:
            slot[0].set()

    def answer(self, payload, peer=None) -> bool:
        """Deliver a reply; False when nobody waits for it (late, unknown)."""
        if not isinstance(payload, dict) or not isinstance(payload.get("seq"), int):
            raise ValueError("reply without a sequence number")
        slot = self._waiting.get(payload["seq"])
        if slot is None or slot[2] != peer:
            return False
        slot[1] = payload.get("result")
        slot[0].set()
        return True

    def fail_peer(self, peer) -> None:
        """Wake the waiters of `peer` with None (it went away)."""
        for slot in self._waiting.values():
            if slot[2] == peer:
                slot[0].set()

    def fail_all(self) -> None:
        """Wake every waiter with None (the peer went away)."""
        for slot in self._waiting.values():
            slot[0].set()


def daemonize() -> None:
    """daemon(3): detach from the terminal, as both daemons do without -d."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)
    if fd > 2:
        os.close(fd)


# -- the two ends of a daemon's command line -----------------------------------------

def child_entry(daemon: str, args, mains: dict[str, str], ignore: tuple[int, ...]) -> int:
    """`DAEMON -P NAME -S fd`: a child process.  `mains` maps NAME to
    "module:function" (imported only in that child); `ignore`: signals a
    terminal sends the whole process group, which the parent passes on
    its own way."""
    import importlib
    import signal
    for sig in ignore:
        signal.signal(sig, signal.SIG_IGN)
    log.init(debug=args.d, verbose=args.v, ident=daemon)
    log.procinit(args.P)
    set_title(f"{daemon}: {args.P}")
    target = mains.get(args.P)
    if target is None:
        sys.stderr.write(f"{daemon}: unknown process {args.P}\n")
        return 1
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(args.S)


def run_parent(parent) -> int:
    """trio.run() the parent's run(); Ctrl-C in the foreground is a stop."""
    try:
        return trio.run(parent.run)
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stderr.flush()
