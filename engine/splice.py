"""engine.splice -- move bytes both ways between two connections.

For two plain sockets the data never enters Python: os.splice() moves it
socket → pipe → socket inside the kernel (relayd's SO_SPLICE; perf-baseline
§5: 371 µs/MiB against 996 for recv/send).  Anything else (TLS streams,
`no splice`) is copied through userland in large chunks.  Each direction is
its own task; EOF on one side half-closes the other; the pair ends when
both directions have ended, or when nothing moved for `idle` seconds.

It does not parse anything: HTTP relaying hands its connections over to this
module only for raw tunnels (CONNECT, WebSocket).
"""

from __future__ import annotations

import fcntl
import os
import socket

import trio

from engine.conn import CLOSED, SocketTransport, Transport

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Bytes asked of one splice() call (the pipe holds 64 KiB by default).
SPLICE_LEN = 1 << 20
# Pipe size asked for with F_SETPIPE_SZ.
PIPE_SIZE = 1 << 20
# Userland copy buffer (256 KiB halves the CPU of 64 KiB for bulk data).
COPY_SIZE = 262144
# Yield to other tasks after this many rounds without blocking.
FAIR_ROUNDS = 16


class Tunnel:
    """Counters and the activity clock of one bidirectional relay."""

    __slots__ = ("last", "bytes", "eof", "error")

    def __init__(self) -> None:
        self.last = trio.current_time()
        self.bytes = [0, 0]          # a→b, b→a
        self.eof = [False, False]
        self.error: str | None = None


def _half_close(t: Transport) -> None:
    if isinstance(t, SocketTransport):
        try:
            t.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


async def _pump_splice(src: SocketTransport, dst: SocketTransport, tun: Tunnel, d: int) -> None:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        sfd, dfd = src.sock.fileno(), dst.sock.fileno()
        rounds = 0
        while True:
            try:
                n = os.splice(sfd, w, SPLICE_LEN, flags=SPLICE_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src.sock)
                rounds = 0
                continue
            if n == 0:
                break
            tun.last = trio.current_time()
            tun.bytes[d] += n
            while n:
                try:
                    m = os.splice(r, dfd, n, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst.sock)
                    rounds = 0
                    continue
                n -= m
            tun.last = trio.current_time()
            rounds += 1
            if rounds >= FAIR_ROUNDS:
                await trio.lowlevel.checkpoint()
                rounds = 0
    except OSError as e:
        tun.error = tun.error or (e.strerror or str(e))
    finally:
        os.close(r)
        os.close(w)
    tun.eof[d] = True
    _half_close(dst)


async def _pump_copy(src: Transport, dst: Transport, tun: Tunnel, d: int,
                     first: bytes = b"") -> None:
    try:
        if first:
            await dst.send_all(first)
            tun.bytes[d] += len(first)
        while True:
            data = await src.receive(COPY_SIZE)
            if not data:
                break
            tun.last = trio.current_time()
            tun.bytes[d] += len(data)
            await dst.send_all(data)
            tun.last = trio.current_time()
    except CLOSED as e:
        tun.error = tun.error or str(e) or type(e).__name__
    tun.eof[d] = True
    if isinstance(dst, SocketTransport):
        _half_close(dst)
    else:
        try:
            await dst.send_eof()
        except Exception:
            pass


async def _watchdog(tun: Tunnel, idle: float, scope: trio.CancelScope) -> None:
    while True:
        wake = tun.last + idle
        now = trio.current_time()
        if now >= wake:
            tun.error = "timeout"
            scope.cancel()
            return
        await trio.sleep(wake - now)


async def relay(a: Transport, b: Transport, idle: float | None = None,
                splice: bool = True, a_pending: bytes = b"", b_pending: bytes = b"") -> Tunnel:
    """Pump a↔b until both sides ended (or `idle` seconds passed quietly).

    `a_pending`/`b_pending`: bytes already read from a (resp. b) that must
    reach the other side first (e.g. what followed a CONNECT head)."""
    tun = Tunnel()
    use_splice = (splice and isinstance(a, SocketTransport) and isinstance(b, SocketTransport))
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            if idle:
                n.start_soon(_watchdog, tun, idle, n.cancel_scope)
            async with trio.open_nursery() as pumps:
                if use_splice and not a_pending and not b_pending:
                    pumps.start_soon(_pump_splice, a, b, tun, 0)
                    pumps.start_soon(_pump_splice, b, a, tun, 1)
                else:
                    pumps.start_soon(_pump_copy, a, b, tun, 0, a_pending)
                    pumps.start_soon(_pump_copy, b, a, tun, 1, b_pending)
            n.cancel_scope.cancel()
    del scope
    return tun
