"""engine.serve -- accept loops and connection tasks, with graceful stop.

One Server runs a task per listening socket and one task per accepted
connection, in a *separate* connection nursery (hypercorn's shape, style.md
§1.6): listeners can be removed or all stopped while connections in flight
finish under a drain deadline.  A handler that raises is logged and its
connection closed; it never takes the worker down.

Sockets are bound elsewhere (the parent, or engine.listen for tests): this
module only accepts on them.
"""

from __future__ import annotations

import errno
import heapq
import math
import select
import socket
from time import perf_counter
from typing import Any, Awaitable, Callable

import trio

from engine.conn import CLOSED, SocketTransport, Transport, close_socket
from engine.trio_private import fast_instruments
from shared import log

# accept() errors that mean "out of resources": pause and retry (trio's list).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# How long to pause accepting after one of those.
ACCEPT_PAUSE = 0.1
# Default time connections get to finish on stop or reload.
DRAIN_TIMEOUT = 30.0
# While a Server with an on_full hook is at max_clients and on_full() freed
# nothing: how often it looks again whether a client waits in the accept
# queue (see Server).
FULL_POLL = 0.5
# Connections accepted in one go before the accept loop yields.  Draining the
# kernel's accept queue at once matters with small backlogs (an explicit
# `tcp backlog 10`, OpenBSD's default): with one accept per scheduler pass,
# behind 50 busy connections, the queue overflows, Linux drops the SYN or the
# handshake's last ACK and the client retries after 1 s or more (the 0.5 to
# 1.4 s p99 of the first benchmarks).  A burst of connects that arrives at
# once (wrk opening its 50) still overflows a queue of 10: only a larger
# backlog helps there (engine.listen's default is 511).
ACCEPT_BURST = 64


class Listener:
    """A bound, listening socket plus whatever the daemon hangs on it."""

    def __init__(self, sock: socket.socket, ctx: Any = None,
                 wrap: Callable[[trio.socket.SocketType, Any], Awaitable[Transport]] | None = None,
                 nodelay: bool = True) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.tsock = trio.socket.from_stdlib_socket(sock)
        # Accepted sockets are made from the fd (socket.accept() converts
        # family and type to enums on every call).
        self.kind = (int(sock.family), int(sock.type), sock.proto)
        self.tcp = sock.family != socket.AF_UNIX
        self.ctx = ctx
        self.wrap = wrap          # e.g. TLS: turns the socket into a StreamTransport
        self.nodelay = nodelay
        self.scope: trio.CancelScope | None = None
        # Set once this listener's accept loop is over: nothing more is
        # accepted on it by this process (Server.quiesce waits for it).
        self.stopped = trio.Event()
        self.local = sock.getsockname()[:2]

    def key(self) -> tuple[str, int]:
        return (self.local[0], self.local[1])


Handler = Callable[[Transport, Listener], Awaitable[None]]


class Server:
    """Accepts on a changing set of listeners; see the module docstring.

    At `max_clients` connections accepting pauses.  With `on_full`, the
    paused loop looks whether a client waits in the listener's accept
    queue (again each time a slot frees, else every FULL_POLL s) and then
    calls on_full(), which may end a connection of its choice to make room
    (httpd: the one waiting longest for a request head, so slow-header
    clients cannot hold every slot)."""

    def __init__(self, handler: Handler, max_clients: int = 1024,
                 on_full: Callable[[], Any] | None = None) -> None:
        self.handler = handler
        self.max_clients = max_clients
        self.on_full = on_full
        self.active = 0
        self.listeners: list[Listener] = []
        self._slot = trio.Event()
        self._stop = trio.Event()
        self._listen_nursery: trio.Nursery | None = None
        self._conn_nursery: trio.Nursery | None = None
        self.drain_timeout = DRAIN_TIMEOUT
        self._done = trio.Event()

    async def run(self, listeners: list[Listener],
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); returns once the last connection is gone."""
        fast_instruments()
        async with trio.open_nursery() as conns:
            self._conn_nursery = conns
            async with trio.open_nursery() as lst:
                self._listen_nursery = lst
                for lis in listeners:
                    self.add_listener(lis)
                task_status.started()
                await self._stop.wait()
                lst.cancel_scope.cancel()
            for lis in self.listeners:
                lis.tsock.close()
            self.listeners = []
            conns.cancel_scope.deadline = trio.current_time() + self.drain_timeout
        self._done.set()

    async def wait_stopped(self) -> None:
        """Return once run() has finished (every connection is gone)."""
        await self._done.wait()

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting; connections get `drain_timeout` seconds to end."""
        if drain_timeout is not None:
            self.drain_timeout = drain_timeout
        self._stop.set()

    def hold(self) -> bool:
        """Take one more connection slot for a running handler (one that
        opens extra outgoing connections, as relayd's HTTP/2 sessions do);
        False when none is free.  Give it back with release()."""
        if self.active >= self.max_clients:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by hold()."""
        self.active -= 1
        self._slot.set()

    def add_listener(self, lis: Listener) -> None:
        assert self._listen_nursery is not None
        lis.scope = trio.CancelScope()
        self.listeners.append(lis)
        self._listen_nursery.start_soon(self._accept_loop, lis)

    def remove_listener(self, lis: Listener) -> None:
        """Stop accepting on `lis`; its connections go on."""
        if lis in self.listeners:
            self.listeners.remove(lis)
        if lis.scope is not None:
            lis.scope.cancel()

    async def quiesce(self, listeners: list[Listener], timeout: float = 2.0) -> None:
        """Stop accepting on `listeners` for good and close them here; their
        connections go on.  On return (unless `timeout` ran out) nothing
        more is accepted by this process: a reload's old generation says
        so before the parent says the new one serves every new connection."""
        for lis in listeners:
            self.remove_listener(lis)
        with trio.move_on_after(timeout):
            for lis in listeners:
                if lis.scope is not None:
                    await lis.stopped.wait()
        for lis in listeners:
            lis.tsock.close()

    async def _accept_loop(self, lis: Listener) -> None:
        try:
            await self._accept(lis)
        finally:
            lis.stopped.set()

    async def _accept(self, lis: Listener) -> None:
        with lis.scope:
            raw = lis.sock
            family, type_, proto = lis.kind
            while True:
                while self.active >= self.max_clients:
                    self._slot = trio.Event()
                    if self.on_full is None:
                        await self._slot.wait()
                        continue
                    # One connection ended per client waiting: a queue of
                    # them gets through at the pace connections close.
                    if _waiting(raw):
                        self.on_full()
                    with trio.move_on_after(FULL_POLL):
                        await self._slot.wait()
                # Accept what is queued (up to ACCEPT_BURST), then yield
                # once; wait only when nothing was there.
                got = 0
                while got < ACCEPT_BURST and self.active < self.max_clients:
                    try:
                        fd, addr = raw._accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in CAPACITY_ERRNOS:
                            log.warn(f"accept: {e.strerror}, pausing")
                        elif e.errno in (errno.EBADF, errno.EINVAL):
                            return   # listener closed under us (reload)
                        else:
                            log.warn(f"accept: {e.strerror}")
                        await trio.sleep(ACCEPT_PAUSE)
                        got = -1
                        break
                    got += 1
                    self._start(socket.socket(family, type_, proto, fd), addr, lis)
                if got > 0:
                    await trio.lowlevel.checkpoint()
                elif got == 0:
                    await trio.lowlevel.wait_readable(raw)

    def _start(self, sock: socket.socket, addr, lis: Listener) -> None:
        try:
            sock.setblocking(False)
            if lis.nodelay and lis.tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.active += 1
        self._conn_nursery.start_soon(self._run_handler, sock, addr, lis)

    async def _run_handler(self, sock: socket.socket, addr, lis: Listener) -> None:
        transport: Transport | None = None
        try:
            if lis.wrap is not None:
                sock = trio.socket.from_stdlib_socket(sock)
                transport = await lis.wrap(sock, lis)
                if transport is None:
                    return
            else:
                transport = SocketTransport(sock, peer=addr, local=lis.local)
            await self.handler(transport, lis)
        except CLOSED:
            pass
        except trio.TooSlowError:
            pass
        except Exception as e:   # a bug must not take the worker down
            log.warn_exc(f"connection handler failed: {e!r}")
        finally:
            if type(transport) is SocketTransport:
                transport.close()     # no await: no shielded scope needed
            elif transport is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await transport.aclose()
                    except Exception:
                        pass
            if sock.fileno() != -1:
                if isinstance(sock, socket.socket):
                    close_socket(sock)
                else:
                    sock.close()
            self.active -= 1
            self._slot.set()


def _waiting(sock: socket.socket) -> bool:
    """A connection waits in `sock`'s accept queue (poll: fds above 1023)."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(0))


# -- connection timeouts without a cancel scope per request --------------------

class Timer:
    """An inactivity timeout of one connection, for handlers that switch
    between timed phases on every request (read the request, send the
    response).

    Entering a cancel scope with a deadline costs about 9 µs in trio and
    moving a deadline 2.5 µs, several times per request; arm() and disarm()
    are a clock read and a few attribute stores.  One watchdog task per trio
    run (see _Watchdog) cancels `scope` once the armed time has passed;
    `fired` then holds the `phase` that was armed.  The handler owns `scope`
    (one per connection) and reads `fired` after it."""

    __slots__ = ("scope", "expiry", "queued", "phase", "fired", "period", "_wd")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope: trio.CancelScope | None = scope
        self.expiry = math.inf       # when the armed phase times out
        self.queued = math.inf       # the watchdog's key for us (<= expiry)
        self.phase: object = None
        self.fired: object = None
        self.period = 0.0            # restart()'s timeout
        self._wd = _watchdog()

    def arm(self, seconds: float, phase: object = None) -> None:
        """Time out `seconds` from now (replaces what was armed)."""
        offset = self._wd.offset
        exp = (perf_counter() + offset if offset is not None else trio.current_time()) + seconds
        self.expiry = exp
        self.phase = phase
        self.period = seconds
        if exp < self.queued:
            self._wd.push(exp, self)

    def restart(self) -> None:
        """Some input came: the armed phase starts its time anew (nothing
        when disarmed: e.g. a request body read while the handler runs)."""
        if self.expiry == math.inf:
            return
        offset = self._wd.offset
        self.expiry = (perf_counter() + offset if offset is not None
                       else trio.current_time()) + self.period

    def disarm(self) -> None:
        self.expiry = math.inf

    def fire(self, phase: object) -> None:
        """End the connection now, as if `phase` had timed out (what the
        watchdog does when the armed time has passed)."""
        self.expiry = math.inf
        self.fired = phase
        if self.scope is not None:
            self.scope.cancel()

    def close(self) -> None:
        """The connection is gone: never fire, let the watchdog forget us."""
        self.expiry = math.inf
        self.scope = None
        if self.queued != math.inf:
            self._wd.dead += 1


class _Watchdog:
    """Fires the Timers of one trio run.  A heap keyed by each timer's
    `queued` time, which is never later than its expiry: arm() pushes an
    earlier key when needed, and a timer whose key comes up before its
    (meanwhile moved) expiry is queued again.  Keys of closed timers and
    superseded keys stay in the heap until they come up or a prune."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Timer]] = []
        # trio's clock without its call layers: the default SystemClock is
        # perf_counter() plus a constant (the same trick as server_fcgi).
        # A run with another clock (tests' MockClock) gets the real thing.
        self.offset: float | None = None
        if type(trio.lowlevel.current_clock()).__name__ == "SystemClock":
            self.offset = trio.current_time() - perf_counter()
        self.seq = 0
        self.dead = 0                # dead keys in the heap (about)
        self.scope: trio.CancelScope | None = None   # the sleep, while sleeping

    def push(self, when: float, timer: Timer) -> None:
        if timer.queued != math.inf:
            self.dead += 1           # its older key is superseded
        timer.queued = when
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, timer))
        scope = self.scope
        if scope is not None and when < scope.deadline:
            scope.deadline = when
        if self.dead > 1024 and self.dead * 2 > len(self.heap):
            self._prune()

    def _prune(self) -> None:
        keep = []
        for e in self.heap:
            t = e[2]
            if t.queued != e[0]:
                continue             # superseded key
            if t.expiry == math.inf:
                t.queued = math.inf  # closed or disarmed: unqueued
                continue
            keep.append(e)
        heapq.heapify(keep)
        self.heap = keep
        self.dead = 0

    async def run(self) -> None:
        while True:
            heap = self.heap
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                when, _, t = heapq.heappop(heap)
                if t.queued != when:
                    self.dead -= 1
                    continue         # superseded by an earlier key
                t.queued = math.inf
                if t.expiry <= now:
                    t.fire(t.phase)
                elif t.expiry != math.inf:
                    t.queued = t.expiry
                    self.seq += 1
                    heapq.heappush(heap, (t.expiry, self.seq, t))
                elif t.scope is None:
                    self.dead -= 1   # a closed timer's last key
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self.scope = scope
                await trio.sleep_forever()
            self.scope = None


_WATCHDOG: trio.lowlevel.RunVar = trio.lowlevel.RunVar("engine_watchdog")


def _watchdog() -> _Watchdog:
    try:
        return _WATCHDOG.get()
    except LookupError:
        wd = _Watchdog()
        _WATCHDOG.set(wd)
        trio.lowlevel.spawn_system_task(wd.run, name="engine.serve watchdog")
        return wd
