"""shared.seccomp -- syscall allow-lists over libseccomp, grouped like pledge(2).

A process names the OpenBSD promises it keeps ("stdio", "rpath", "inet",
...) and install() loads a seccomp filter allowing the system calls of
those groups only; anything else ends the whole process (SIGSYS, which
the parent logs as `lost child: pid N terminated; signal 31`).  A few
calls fail with an errno instead, where a library is known to probe them
and cope (clone3 -> ENOSYS so glibc falls back to clone, whose flags can
be checked; a read-only open without rpath -> EACCES).

ctypes over libseccomp.so.2 (in every Debian: systemd and apt need it),
loaded when this module is imported;
the names are resolved for the running architecture and those it lacks
(e.g. `open` on arm64) are skipped, so whole families are listed.

Not here: which process gets which promises (their child_main, through
shared.pledge), file and port rules (shared.landlock).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

PR_SET_NO_NEW_PRIVS = 38


def no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: what a filter needs without CAP_SYS_ADMIN (and
    what shared.proc.drop_privileges sets for every child anyway)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


# Actions (seccomp.h).
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000


def ACT_ERRNO(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


# Filter attributes and comparison operators (seccomp.h enums).
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
_CMP_EQ = 4
_CMP_MASKED_EQ = 7

_O_ACCMODE = 0o3
_O_CREAT = 0o100
_O_TRUNC = 0o1000
_O_TMPFILE_BIT = 0o20000000          # __O_TMPFILE (O_TMPFILE also sets O_DIRECTORY)
# openat flags that write or create: none may be set for a read-only open.
_WRITE_FLAGS = _O_ACCMODE | _O_CREAT | _O_TRUNC | _O_TMPFILE_BIT
_CLONE_THREAD = 0x00010000
_SOCK_TYPE_MASK = 0xF


class Arg(ctypes.Structure):
    """struct scmp_arg_cmp: argument `arg` compared with `op`."""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def eq(arg: int, value: int) -> Arg:
    return Arg(arg, _CMP_EQ, value & 0xFFFFFFFFFFFFFFFF, 0)


def masked_eq(arg: int, mask: int, value: int) -> Arg:
    return Arg(arg, _CMP_MASKED_EQ, mask, value)


# A rule: (syscall name, action, argument comparisons ANDed).  Several
# rules for one call are ORed.
Rule = tuple[str, int, tuple[Arg, ...]]


def _allow(*names: str) -> list[Rule]:
    return [(n, ACT_ALLOW, ()) for n in names]


def _socket(*domains: int) -> list[Rule]:
    return [("socket", ACT_ALLOW, (eq(0, d),)) for d in domains]


# The ioctls a server's event loop and Python's I/O make: FIONBIO
# (setblocking), FIONREAD, FIOCLEX/FIONCLEX, TCGETS and TIOCGWINSZ (isatty
# on stdio), TIOCOUTQ (SIOCOUTQ).  Others end the process, as under pledge.
# (An unconditional errno rule beside these would win over them in
# libseccomp, so there is no soft catch-all.)
_IOCTLS = (0x5421, 0x541B, 0x5451, 0x5450, 0x5401, 0x5413, 0x5411)
# prctl: the thread's name only.
_PRCTLS = (15, 16)


def _stdio(pid: int) -> list[Rule]:
    return _allow(
        # descriptors and memory
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
        "preadv2", "pwritev2", "close", "close_range", "dup", "dup2", "dup3", "fcntl",
        "fstat", "newfstatat", "statx", "lseek", "ftruncate",
        "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "brk",
        "pipe", "pipe2", "eventfd", "eventfd2",
        # threads, time, signals, identity
        "futex", "futex_waitv", "set_robust_list", "get_robust_list", "rseq",
        "set_tid_address", "sched_yield", "sched_getaffinity",
        "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
        "time", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait",
        "sigaltstack", "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid",
        "getegid", "getgroups", "getresuid", "getresgid", "capget", "getrandom", "uname",
        "sysinfo",
        "getrusage", "getrlimit", "restart_syscall", "exit", "exit_group",
        # event loop and sockets already open
        "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
        "epoll_pwait2", "poll", "ppoll", "select", "pselect6",
        "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "sendto", "recvfrom", "shutdown",
        "getsockopt", "setsockopt", "getsockname", "getpeername",
    ) + [
        # socketpair is local; prlimit64 only reads (new limit NULL)
        ("socketpair", ACT_ALLOW, (eq(0, socket.AF_UNIX),)),
        ("prlimit64", ACT_ALLOW, (eq(2, 0),)),
        # raise() and abort() signal this process only
        ("tgkill", ACT_ALLOW, (eq(0, pid),)),
        # threads yes (trio.to_thread), processes no
        ("clone", ACT_ALLOW, (masked_eq(0, _CLONE_THREAD, _CLONE_THREAD),)),
        ("clone3", ACT_ERRNO(errno.ENOSYS), ()),
        # a read-only open elsewhere than rpath: fails, as in an empty chroot
        # (traceback printing and import probing try files and cope)
        ("openat", ACT_ERRNO(errno.EACCES), (masked_eq(2, _WRITE_FLAGS, 0),)),
        ("openat2", ACT_ERRNO(errno.ENOSYS), ()),
        # OpenBSD's sendsyslog(2) is in stdio; glibc's syslog() reconnects to
        # /dev/log (a datagram socket) when a send fails.
        ("socket", ACT_ALLOW, (eq(0, socket.AF_UNIX),
                               masked_eq(1, _SOCK_TYPE_MASK, socket.SOCK_DGRAM))),
        ("connect", ACT_ALLOW, ()),
    ] + [("ioctl", ACT_ALLOW, (eq(1, r),)) for r in _IOCTLS] + [
        ("prctl", ACT_ALLOW, (eq(0, o),)) for o in _PRCTLS]


# The rest of the groups: promise -> rules.
GROUPS = {
    "rpath": _allow("getdents64", "readlink", "readlinkat", "faccessat", "faccessat2",
                    "access", "getcwd", "fadvise64", "statfs", "fstatfs")
    + [("openat", ACT_ALLOW, (masked_eq(2, _WRITE_FLAGS, 0),))],
    "inet": _socket(socket.AF_INET, socket.AF_INET6) + _allow("connect", "accept", "accept4"),
    "unix": _socket(socket.AF_UNIX) + _allow("connect", "accept", "accept4"),
    # a relay's zero-copy pumps, a server's files
    "splice": _allow("splice", "tee", "sendfile"),
    "sendfile": _allow("sendfile"),
    # sockets bound here (relay: `transparent forward`; pfe: netlink)
    "bind": _allow("bind"),
    # relayd's pfe: netlink for routes (pyroute2) and nftables (libnftables);
    # other netlink families (audit, ...) stay closed.
    "route": [("socket", ACT_ALLOW, (eq(0, socket.AF_NETLINK), eq(2, proto)))
              for proto in (0, 12)] + _allow("bind", "connect"),
}


class SeccompError(OSError):
    """libseccomp is missing or refused the filter."""


def _load():
    # By its soname, now: this module is imported at start-up, before the
    # chroot hides the library (find_library would run ldconfig).
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(Arg)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


_lib = _load()


def _libseccomp():
    if _lib is None:
        raise SeccompError(errno.ENOENT, "libseccomp.so.2 not found")
    return _lib


def available() -> bool:
    try:
        _libseccomp()
        return True
    except SeccompError:
        return False


def rules(promises: tuple[str, ...], pid: int | None = None) -> list[Rule]:
    """The rules for `promises` ("stdio" always included)."""
    out = _stdio(os.getpid() if pid is None else pid)
    if "rpath" in promises:     # read-only opens succeed instead
        out = [r for r in out if r[0] != "openat"]
    for p in promises:
        if p == "stdio":
            continue
        if p not in GROUPS:
            raise ValueError(f"unknown promise {p!r}")
        out += GROUPS[p]
    return out


def install(promises: tuple[str, ...], default: int = ACT_KILL_PROCESS) -> None:
    """Load the filter for `promises` into this process (all threads)."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise SeccompError(errno.EINVAL, "seccomp_init failed")
    try:
        lib.seccomp_attr_set(ctx, _ATTR_CTL_NNP, 1)
        if lib.seccomp_attr_set(ctx, _ATTR_CTL_TSYNC, 1) != 0:
            raise SeccompError(errno.EINVAL, "seccomp: no thread synchronisation")
        seen: set[tuple] = set()
        for name, action, args in rules(promises):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue            # not a call of this architecture
            key = (nr, action, tuple((a.arg, a.op, a.datum_a, a.datum_b) for a in args))
            if key in seen:
                continue
            seen.add(key)
            arr = (Arg * len(args))(*args) if args else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(args), arr)
            if rc < 0:
                raise SeccompError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SeccompError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
