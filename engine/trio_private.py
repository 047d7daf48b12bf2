"""engine.trio_private -- the places Tandem reaches into trio's private state.

trio's public API costs a few microseconds here and there that a small
request pays several times; each function below saves one of them by
reading or changing trio internals of the pinned version (pyproject.toml).
Each one checks what it touches and, when trio does not look as expected,
does nothing special: the public path then runs, slower but correct.

This module holds no policy and no I/O of its own.
"""

from __future__ import annotations

import select

import trio

try:
    from trio._core._instrumentation import Instruments as _Instruments
except ImportError:            # another trio: fast_instruments() does nothing
    _Instruments = None

_EPOLLIN_ONESHOT = select.EPOLLIN | select.EPOLLONESHOT


def _io_manager():
    return trio._core._run.GLOBAL_RUN_CONTEXT.runner.io_manager


def watched(fd: int) -> bool:
    """Whether trio's epoll manager tracks `fd` (a task waits on it, or
    did and the fd has no event since); True when that cannot be read."""
    try:
        return fd in _io_manager()._registered
    except (AttributeError, TypeError):
        return True


async def wait_readable_new(sock) -> None:
    """trio.lowlevel.wait_readable() for a socket just opened, which trio's
    epoll manager has never watched.

    trio registers an fd with EPOLL_CTL_MOD first and falls back to ADD
    when that fails, which it always does for a new fd: a syscall and an
    OSError, about 2 µs (a FastCGI request opens a socket every time).  So
    the fd is ADDed here, and trio's table says so.  Anything unexpected in
    trio's private state leaves it to trio: a registration trio does not
    know of is one its MOD then finds.  Close the socket with
    engine.conn.close_socket()."""
    try:
        io = _io_manager()
        fd = sock.fileno()
        if fd not in io._registered:
            io._epoll.register(fd, _EPOLLIN_ONESHOT)
            io._registered[fd].current_flags = select.EPOLLIN
    except (AttributeError, TypeError, OSError):
        pass
    await trio.lowlevel.wait_readable(sock)


if _Instruments is not None:
    class _DictInstruments(dict):
        """trio's Instruments as a dict subclass: `hook in instruments`,
        which trio's run loop asks before and after every task step, every
        wake-up and every I/O wait, is then dict's own C lookup.  trio's is
        a UserDict, whose `in` runs a Python method each time: about 5 %
        of the instructions of a small FastCGI request.  The methods are
        trio's, reading `data` (here: the dict itself)."""

        __slots__ = ()
        data = property(lambda self: self)
        add_instrument = _Instruments.add_instrument
        remove_instrument = _Instruments.remove_instrument
        call = _Instruments.call


def fast_instruments() -> None:
    """Swap the current run's Instruments for _DictInstruments (same hooks,
    same instruments).  Call it inside trio.run(), before serving."""
    try:
        runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
        old = runner.instruments
        if _Instruments is None or type(old) is not _Instruments:
            return
        runner.instruments = _DictInstruments(old.data)
    except (AttributeError, TypeError):
        pass
