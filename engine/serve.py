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
import socket
from typing import Any, Awaitable, Callable

import trio

from engine.conn import CLOSED, SocketTransport, Transport
from shared import log

# accept() errors that mean "out of resources": pause and retry (trio's list).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# How long to pause accepting after one of those.
ACCEPT_PAUSE = 0.1
# Default time connections get to finish on stop or reload.
DRAIN_TIMEOUT = 30.0


class Listener:
    """A bound, listening socket plus whatever the daemon hangs on it."""

    def __init__(self, sock: socket.socket, ctx: Any = None,
                 wrap: Callable[[trio.socket.SocketType, Any], Awaitable[Transport]] | None = None,
                 nodelay: bool = True) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.tsock = trio.socket.from_stdlib_socket(sock)
        self.ctx = ctx
        self.wrap = wrap          # e.g. TLS: turns the socket into a StreamTransport
        self.nodelay = nodelay
        self.scope: trio.CancelScope | None = None
        self.local = sock.getsockname()[:2]

    def key(self) -> tuple[str, int]:
        return (self.local[0], self.local[1])


Handler = Callable[[Transport, Listener], Awaitable[None]]


class Server:
    """Accepts on a changing set of listeners; see the module docstring."""

    def __init__(self, handler: Handler, max_clients: int = 1024) -> None:
        self.handler = handler
        self.max_clients = max_clients
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

    async def _accept_loop(self, lis: Listener) -> None:
        with lis.scope:
            tsock = lis.tsock
            while True:
                while self.active >= self.max_clients:
                    self._slot = trio.Event()
                    await self._slot.wait()
                try:
                    sock, addr = await tsock.accept()
                except OSError as e:
                    if e.errno in CAPACITY_ERRNOS:
                        log.warn(f"accept: {e.strerror}, pausing")
                        await trio.sleep(ACCEPT_PAUSE)
                        continue
                    if e.errno in (errno.EBADF, errno.EINVAL):
                        return   # listener closed under us (reload)
                    log.warn(f"accept: {e.strerror}")
                    await trio.sleep(ACCEPT_PAUSE)
                    continue
                if lis.nodelay and sock.family != socket.AF_UNIX:
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    except OSError:
                        pass
                self.active += 1
                self._conn_nursery.start_soon(self._run_handler, sock, addr, lis)

    async def _run_handler(self, sock, addr, lis: Listener) -> None:
        transport: Transport | None = None
        try:
            if lis.wrap is not None:
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
            if transport is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await transport.aclose()
                    except Exception:
                        pass
            sock.close()
            self.active -= 1
            self._slot.set()
