"""engine.conn -- the byte transports a connection handler talks to.

A handler never sees a trio socket or a stream directly: it gets a
Transport.  SocketTransport drives a socket by hand with recv/send and
os.sendfile (the hot path: perf-baseline.md measured trio.socket 20 % cheaper
than SocketStream, and the raw calls are cheaper still).  StreamTransport
wraps any trio Stream: TLS streams and the memory streams of unit tests.
Both raise only the exceptions listed in CLOSED, so handlers catch one
tuple.

This module parses nothing and knows no protocol.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from engine.trio_private import watched

# Exceptions meaning "the peer is gone" for any transport.
CLOSED = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
# recv size: large enough for a pipelined batch or a body chunk.
RECV_SIZE = 65536
# Fair share: a sendfile loop yields to other tasks after this many rounds.
SENDFILE_ROUNDS = 16
# ... and so do sends that never block, with no receive in between.
SEND_ROUNDS = 16
# Chunk size when a stream cannot sendfile and reads the file instead.
FILE_CHUNK = 262144
MSG_MORE = getattr(socket, "MSG_MORE", 0)


def close_socket(sock: socket.socket) -> None:
    """Close a socket trio may be watching.

    trio.lowlevel.notify_closing() (which wakes a task waiting on the fd) is
    needed only while trio's epoll manager tracks the fd, i.e. a task waits
    on it; otherwise it costs an epoll_ctl() that fails and an exception
    object, about 3 µs a connection.  The kernel drops a closed fd from the
    epoll set by itself.  The manager's table is trio's private state: when
    it cannot be read, notify_closing() is always called."""
    if watched(sock.fileno()):
        trio.lowlevel.notify_closing(sock)
    sock.close()


def _sockname(addr) -> tuple[str, int]:
    if isinstance(addr, tuple):
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return host, addr[1]
    return str(addr or ""), 0


class Transport:
    """Interface of both transports (documentation and isinstance checks)."""

    peer: tuple[str, int]
    local: tuple[str, int]
    tls: bool = False

    async def receive(self, n: int = RECV_SIZE) -> bytes:  # pragma: no cover
        raise NotImplementedError

    async def send_all(self, data) -> None:  # pragma: no cover
        raise NotImplementedError

    async def sendfile(self, fd: int, offset: int, count: int) -> None:  # pragma: no cover
        raise NotImplementedError

    async def send_more(self, data) -> None:
        """send_all() for data that more will follow at once (a response
        head before its file body): a socket holds it back to go out with
        the body rather than as a segment of its own."""
        await self.send_all(data)

    async def send_eof(self) -> None:  # pragma: no cover
        raise NotImplementedError

    async def aclose(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def fileno(self) -> int:
        return -1


class SocketTransport(Transport):
    """A plain socket, driven by hand: non-blocking send()/recv() on the
    stdlib socket, trio.lowlevel.wait_readable/wait_writable when they would
    block (what trio.socket does, without its per-call layers: about 8 µs a
    request, perf-baseline.md §5.2).

    Scheduling: a receive is a scheduling point, whether it waited or not
    (as trio's recv), and one only.  A send that completes at once is not
    (trio's send yields every time), but after SEND_ROUNDS of those in a row
    without a receive in between (pipelined requests) a send yields, so
    that no client holds the loop.

    `sock` is a stdlib socket; a trio socket given to the constructor is
    taken over (detached), so that only this transport closes it."""

    __slots__ = ("sock", "peer", "local", "bytes_in", "bytes_out", "_rounds", "_sent")

    def __init__(self, sock, peer=None, local=None) -> None:
        if not isinstance(sock, socket.socket):
            sock = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            sock.setblocking(False)
        self.sock = sock
        self.peer = _sockname(peer if peer is not None else sock.getpeername())
        self.local = _sockname(local if local is not None else sock.getsockname())
        self.bytes_in = 0
        self.bytes_out = 0
        self._rounds = 0         # sends in a row that did not yield
        self._sent = False       # the last call was a send

    async def receive(self, n: int = RECV_SIZE) -> bytes:
        sock = self.sock
        sent = self._sent
        if sent:
            # Just sent (say, a response): let the other tasks run first,
            # which gives the peer the time to answer, then try.  Under load
            # the answer is there by then, and the epoll registration of a
            # wait is saved (a wait right away cost 10-15 % more CPU per
            # request in the 1k keep-alive, HTTP relay and FastCGI cases).
            self._sent = False
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = sock.recv(n)
        except BlockingIOError:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(n)
                    break
                except BlockingIOError:
                    pass
        else:
            if not sent:
                await trio.lowlevel.cancel_shielded_checkpoint()
        self._rounds = 0
        self.bytes_in += len(data)
        return data

    async def send_all(self, data, flags: int = 0) -> None:
        sock = self.sock
        total = len(data)
        self._sent = True
        try:
            n = sock.send(data, flags)
        except BlockingIOError:
            n = 0
        if n < total:
            view = memoryview(data)
            while n < total:
                await trio.lowlevel.wait_writable(sock)
                try:
                    n += sock.send(view[n:], flags)
                except BlockingIOError:
                    pass
            self._rounds = 0
        else:
            self._rounds += 1
            if self._rounds >= SEND_ROUNDS:
                self._rounds = 0
                await trio.lowlevel.checkpoint()
        self.bytes_out += total

    async def send_more(self, data) -> None:
        await self.send_all(data, MSG_MORE)

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        fileno = self.sock.fileno()
        self._sent = True
        rounds = 0
        end = offset + count
        while offset < end:
            try:
                n = os.sendfile(fileno, fd, offset, end - offset)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                rounds = 0
                continue
            if n == 0:   # file shrank under us
                raise BrokenPipeError(errno.EPIPE, "file truncated during sendfile")
            offset += n
            self.bytes_out += n
            rounds += 1
            if rounds >= SENDFILE_ROUNDS:
                await trio.lowlevel.checkpoint()
                rounds = 0

    async def send_eof(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """aclose() without the await (it never blocks)."""
        sock = self.sock
        if sock.fileno() != -1:
            close_socket(sock)

    def fileno(self) -> int:
        return self.sock.fileno()


class StreamTransport(Transport):
    __slots__ = ("stream", "peer", "local", "tls", "bytes_in", "bytes_out", "raw_sock")

    def __init__(self, stream: trio.abc.Stream, peer=("", 0), local=("", 0),
                 tls: bool = False, raw_sock=None) -> None:
        self.stream = stream
        self.peer = _sockname(peer)
        self.local = _sockname(local)
        self.tls = tls
        self.raw_sock = raw_sock
        self.bytes_in = 0
        self.bytes_out = 0

    async def receive(self, n: int = RECV_SIZE) -> bytes:
        data = await self.stream.receive_some(n)
        self.bytes_in += len(data)
        return data

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)
        self.bytes_out += len(data)

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        end = offset + count
        while offset < end:
            chunk = os.pread(fd, min(FILE_CHUNK, end - offset), offset)
            if not chunk:
                raise BrokenPipeError(errno.EPIPE, "file truncated")
            await self.send_all(chunk)
            offset += len(chunk)

    async def send_eof(self) -> None:
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is not None:
            try:
                await send_eof()
            except (*CLOSED, NotImplementedError):
                pass

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    def fileno(self) -> int:
        return self.raw_sock.fileno() if self.raw_sock is not None else -1
