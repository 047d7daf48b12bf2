"""shared.landlock -- file and TCP-port rules through Landlock (ctypes, three syscalls).

restrict(read, connect) limits this thread (and the threads it starts
later) to reading beneath the `read` paths -- no writing, creating,
removing or executing anywhere -- and, when `connect` is not None and the
kernel's Landlock ABI is 4 or later, to TCP connects to those ports only.
From ABI 6 on, signals to and abstract unix sockets of processes outside
the sandbox are refused as well.

A kernel without Landlock (or with an older ABI) gets what it supports;
restrict() says what was skipped in its return value, the caller logs it.
Call it before any thread exists: below ABI 8 a restriction covers the
calling thread only.

Not here: syscall filtering (shared.seccomp), which process gets which
rules (shared.pledge).
"""

from __future__ import annotations

import ctypes
import os
import platform

# Syscall numbers: the same on every architecture (asm-generic), x86_64 included.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2

_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
# All file-system rights by ABI: 1 has bits 0-12, 2 adds REFER, 3
# TRUNCATE, 5 IOCTL_DEV.
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ALL = (1 << 0) | (1 << 1)      # abstract unix sockets, signals (ABI 6)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(nr: int, *args) -> int:
    rc = _libc.syscall(ctypes.c_long(nr), *args)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none."""
    if platform.system() != "Linux":
        return 0
    try:
        return _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError:
        return 0           # ENOSYS: not built in; EOPNOTSUPP: not enabled at boot


def _fs_rights(version: int) -> int:
    return _FS_BY_ABI[max(v for v in _FS_BY_ABI if v <= version)]


def restrict(read: tuple[str, ...] = (), connect: tuple[int, ...] | None = None) -> list[str]:
    """Apply the rules; returns what this kernel could not enforce (empty
    when everything asked for is in force)."""
    version = abi()
    if version == 0:
        return ["landlock unavailable: no file or port rules"]
    skipped = []
    attr = _RulesetAttr(handled_access_fs=_fs_rights(version))
    # The struct grew by one field at ABI 4 and at ABI 6; an older kernel
    # takes the shorter one.
    size = 8 if version < 4 else 16 if version < 6 else 24
    if version >= 6:
        attr.scoped = _SCOPE_ALL
    if connect is not None:
        if version >= 4:
            attr.handled_access_net = _NET_CONNECT_TCP
        else:
            skipped.append(f"landlock ABI {version} < 4: no TCP connect rules")
    fd = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                  ctypes.c_uint32(0))
    try:
        for path in read:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                skipped.append(f"landlock: {path}: {e.strerror}")
                continue
            try:
                rule = _PathBeneath(_READ_FILE | _READ_DIR, pfd)
                _syscall(_SYS_ADD_RULE, fd, _RULE_PATH_BENEATH, ctypes.byref(rule),
                         ctypes.c_uint32(0))
            finally:
                os.close(pfd)
        if attr.handled_access_net:
            for port in sorted(set(connect or ())):
                rule = _NetPort(_NET_CONNECT_TCP, port)
                _syscall(_SYS_ADD_RULE, fd, _RULE_NET_PORT, ctypes.byref(rule),
                         ctypes.c_uint32(0))
        _syscall(_SYS_RESTRICT_SELF, fd, ctypes.c_uint32(0))
    finally:
        os.close(fd)
    return skipped
