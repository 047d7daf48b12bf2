"""engine.http2 -- HTTP/2 server connections (RFC 9113) for both daemons.

H2ServerConn drives one connection: a read task feeds python-hyper h2 and
turns its events into streams, a task per stream runs the daemon's handler,
and a writer task sends what every stream queued in one write per
scheduling round.  Each stream is an H2Stream: `req` is an
engine.http1.Request (version "2.0", `host` taken from `:authority`) with
the reading API of engine.http1 (receive_body, read_body), plus a response
writer (send_head, send_data, send_file, send_interim, reset).

Flow control both ways never buffers beyond the windows: a stream sends no
more than its window allows and waits for WINDOW_UPDATE; a received DATA
chunk is acknowledged when the handler takes it, so a stream holds at most
its window.  Limits (H2Limits) and attack answers follow the design note
(../shared/spec/http2.md §5): streams past `max_streams` are refused
(REFUSED_STREAM, counted by running handlers so that resets free no slots),
and rapid resets, refused-stream storms, control-frame floods and header
blocks that never end get GOAWAY ENHANCE_YOUR_CALM, each with a log line.
`max_requests` streams end a connection with GOAWAY after they are
answered; shutdown() sends the two-step GOAWAY of a graceful stop.

Only engine.h2_private imports h2.  This module knows no daemon: what a
request means is the handler's business.
"""

from __future__ import annotations

import os
import re
import socket
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from engine import h2_private as hp
from engine.conn import CLOSED, Transport
from engine.http1 import BodyReader, HttpError, Request
from engine.serve import Timer
from shared import log

ev = hp.events
# The client connection preface (RFC 9113 §3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Bytes h2 may hold for the writer before a stream waits for it to drain.
HIGH_WATER = 65536
# Frame payload a stream sends at most before letting the others take turns.
SLICE = 16384
# File bytes read at once by send_file().
FILE_READ = 65536
# Control frames (PING, SETTINGS, PRIORITY, WINDOW_UPDATE, empty DATA) a
# connection may send beyond CTRL_PER_STREAM per stream and one per DATA
# frame we sent before it is taken for a flood (CVE-2019-9512/9515/9518).
CTRL_BASE = 1000
CTRL_PER_STREAM = 8
# nginx's rule: all bytes received / 8 > payload + FLOOD_SLACK is a flood.
FLOOD_SLACK = 1 << 20
# Time between the two GOAWAY frames of a graceful stop (no PING answer).
GOAWAY_WAIT = 1.0
# Longest wait for the client to close after our last GOAWAY.
LINGER = 2.0
# Timer phases.
IDLE = "h2 idle"
WRITE = "h2 write"
# Response fields that describe an HTTP/1 connection (RFC 9113 §8.2.2).
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                  b"transfer-encoding", b"upgrade"))
# Response field names as sent (daemons write "Content-Type"), and statuses.
_NAMES: dict[str, bytes] = {}
_STATUS = {n: b"%d" % n for n in (200, 204, 206, 301, 302, 304, 400, 401, 403, 404, 500)}
# Characters never allowed in :path (RFC 9113 §8.3.1 and RFC 3986).
_BAD_PATH = frozenset(b" \t#\x7f" + bytes(range(32)))
_BAD_AUTHORITY = frozenset(b" \t@/\\#?\x7f" + bytes(range(32)))
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# RFC 9113 §8.2: field names are lower-case tokens; values have no CR, LF
# or NUL and no whitespace at either end; §8.3.1: the request pseudo-headers.
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE = re.compile(rb"[\r\n\x00]|^[ \t]|[ \t]$")
_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
# §8.2.2: fields that describe an HTTP/1 connection (`te: trailers` aside).
_CONNECTION_FIELDS = frozenset(("connection", "keep-alive", "proxy-connection",
                                "transfer-encoding", "upgrade", "te"))


@dataclass(frozen=True)
class H2Limits:
    """The per-connection limits of HTTP/2 (defaults: design note §5)."""
    max_streams: int = 100           # SETTINGS_MAX_CONCURRENT_STREAMS; running handlers
    max_header_list: int = 16384     # SETTINGS_MAX_HEADER_LIST_SIZE (HPACK-decoded)
    max_head: int = 8192             # name + value bytes of one request head -> 413
    stream_window: int = 65535       # SETTINGS_INITIAL_WINDOW_SIZE
    conn_window: int = 1 << 20       # connection receive window
    max_requests: int = 100          # streams per connection, then GOAWAY
    idle_timeout: float = 60.0       # no stream running (and header phase)
    send_timeout: float = 600.0      # a stream stalled on flow control -> RST CANCEL
    # Client resets of unanswered streams beyond which, once they are also
    # more than half of the streams opened, the connection gets GOAWAY.
    max_resets: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.max_streams <= 2**31 - 1:
            raise ValueError("max streams out of range")
        if not 65535 <= self.conn_window <= 2**31 - 1:
            raise ValueError("connection window out of range")
        if not 1 <= self.stream_window <= 2**31 - 1:
            raise ValueError("stream window out of range")
        if self.max_header_list < 1024 or self.max_head < 1:
            raise ValueError("header limit too small")
        if self.idle_timeout <= 0 or self.send_timeout <= 0:
            raise ValueError("timeouts must be positive")


class StreamClosed(trio.BrokenResourceError):
    """The stream was reset (by either side) or its connection is gone."""


Handler = Callable[["H2Stream"], Awaitable[None]]


def is_preface(data: bytes) -> bool:
    """Whether `data` (the first bytes of a connection) is, or begins, the
    HTTP/2 client preface."""
    n = min(len(data), len(PREFACE))
    return n > 0 and data[:n] == PREFACE[:n]


async def wants_h2(t: Transport, tls: bool, timeout: float) -> bool:
    """HTTP/2 for a new connection: ALPN chose h2 (TLS), or (clear text)
    the first bytes are the client preface, peeked at so that HTTP/1.1
    reads them as ever (nginx's way); a preface cut short by the network
    is looked at again for up to `timeout` seconds."""
    if tls:
        return getattr(t, "alpn", None) == "h2"
    sock = getattr(t, "sock", None)
    if sock is None:
        return False
    waited = 0
    while True:
        try:
            data = sock.recv(len(PREFACE), socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError:
            return False
        if len(data) >= len(PREFACE) or not is_preface(data):
            return data == PREFACE
        waited += 1
        if waited > timeout * 100:
            return False
        await trio.sleep(0.01)


class H2Stream(BodyReader):
    """One request/response exchange; see the module docstring
    (read_body() comes from BodyReader, over receive_body() below)."""

    __slots__ = ("c", "id", "req", "error", "body", "ended", "closed", "answered",
                 "finished", "_wait", "requests")

    def __init__(self, c: "H2ServerConn", sid: int, req: Request) -> None:
        self.c = c
        self.id = sid
        self.req = req
        self.error: HttpError | None = None   # a request the handler must refuse
        self.body: deque = deque()             # (data, flow-controlled length)
        self.ended = False                     # END_STREAM received
        self.closed = False                    # reset, or the connection is gone
        self.answered = False                  # response head sent
        self.finished = False                  # END_STREAM sent
        self._wait: trio.Event | None = None
        self.requests = c.started              # streams opened so far (incl. this)

    # -- reading ---------------------------------------------------------------
    def _wake(self) -> None:
        w = self._wait
        if w is not None:
            self._wait = None
            w.set()

    async def receive_body(self) -> bytes:
        """The next chunk of the request body; b"" once it has ended."""
        while True:
            if self.body:
                data, flow = self.body.popleft()
                self.c._consumed(self, flow)
                if data:
                    return data
                continue
            if self.ended:
                return b""
            if self.closed:
                raise StreamClosed("stream reset")
            self._wait = trio.Event()
            await self._wait.wait()

    # -- writing ---------------------------------------------------------------
    def _check(self) -> None:
        if self.closed:
            raise StreamClosed("stream reset")

    async def send_interim(self, status: int = 100) -> None:
        """A 1xx response (100 Continue before the client sends its body)."""
        self._check()
        self.c.h2.send_headers(self.id, [(b":status", b"%d" % status)])
        await self.c._queued()

    async def send_head(self, status: int, headers, end: bool = False) -> None:
        """The response head: `headers` as (name, value) str or bytes pairs;
        names are lower-cased and HTTP/1 connection fields dropped here."""
        self._check()
        block = [(b":status", _STATUS.get(status) or b"%d" % status)]
        names = _NAMES
        for k, v in headers:
            if type(k) is str:
                n = names.get(k)
                if n is None:
                    n = k.lower().encode("latin-1")
                    if len(names) < 256:
                        names[k] = n
                k = n
                v = v.encode("latin-1", "replace")
            else:
                k = k.lower()
            if k in _HOP:
                continue
            block.append((k, v))
        try:
            self.c.h2.send_headers(self.id, block, end_stream=end)
        except hp.exceptions.StreamClosedError:
            self._gone()
        self.answered = True
        self.finished = end
        await self.c._queued()

    async def send_data(self, data, end: bool = False) -> None:
        """Body bytes, in frames the windows allow (waits for them)."""
        c = self.c
        h = c.h2
        sid = self.id
        total = len(data)
        if total == 0:
            if end:
                self._check()
                try:
                    h.end_stream(sid)
                except hp.exceptions.StreamClosedError:
                    self._gone()
                self.finished = True
                await c._queued()
            return
        off = 0
        deadline = None
        while off < total:
            self._check()
            room = min(h.local_flow_control_window(sid), h.max_outbound_frame_size, SLICE)
            if room <= 0:
                if deadline is None:
                    deadline = trio.current_time() + c.limits.send_timeout
                await self._wait_window(deadline)
                continue
            deadline = None
            chunk = data[off:off + room] if (off or room < total) else data
            off += len(chunk)
            last = end and off >= total
            try:
                h.send_data(sid, chunk, end_stream=last)
            except hp.exceptions.StreamClosedError:
                self._gone()
            c.data_frames += 1
            if last:
                self.finished = True
            await c._queued(yield_turn=off < total)

    async def send_file(self, fd: int, offset: int, count: int, end: bool = False) -> None:
        """`count` bytes of file `fd` from `offset`, as DATA (no sendfile
        under HTTP/2 framing: the bytes are read in FILE_READ pieces)."""
        stop = offset + count
        while offset < stop:
            n = min(FILE_READ, stop - offset)
            chunk = os.pread(fd, n, offset)
            if not chunk:
                raise StreamClosed("file truncated")
            offset += len(chunk)
            await self.send_data(chunk, end and offset >= stop)
        if count == 0 and end:
            await self.send_data(b"", True)

    def reset(self, code: int = 8) -> None:
        """Reset the stream (default CANCEL); later sends raise StreamClosed."""
        if self.closed:
            return
        self.closed = True
        try:
            self.c.h2.reset_stream(self.id, code)
        except (hp.exceptions.StreamClosedError, hp.exceptions.ProtocolError):
            pass
        self.c._wake_writer()

    def _gone(self) -> None:
        self.closed = True
        raise StreamClosed("stream closed")

    async def _wait_window(self, deadline: float) -> None:
        # A stream that cannot send until `deadline` (send_timeout after it
        # stalled: frames the client sends meanwhile do not move it) is
        # cancelled; one stalled by the connection window takes the
        # connection (CVE-2019-9511/9517: zero-window slow reads).
        c = self.c
        with trio.move_on_at(deadline):
            await c._room.park()
            return
        conn_stall = c.h2.outbound_flow_control_window <= 0
        log.info(f"h2 {c.who}: stream {self.id} stalled by the client's "
                 f"{'connection' if conn_stall else 'stream'} window, reset (CANCEL)")
        self.reset(hp.ErrorCodes.CANCEL)
        if conn_stall:
            c.fail(hp.ErrorCodes.NO_ERROR, "connection window stalled")
        raise StreamClosed("send timeout")


class H2ServerConn:
    """One HTTP/2 server connection; see the module docstring.

    `handler(stream)` answers a stream; `scheme` is what `:scheme` must say
    ("https" on TLS).  Call run() once; shutdown() from elsewhere starts a
    graceful stop."""

    def __init__(self, t: Transport, limits: H2Limits, handler: Handler,
                 scheme: str = "http") -> None:
        self.t = t
        self.limits = limits
        self.handler = handler
        self.scheme = scheme.encode()
        self.who = f"{t.peer[0]}:{t.peer[1]}"
        self.h2 = hp.new_server(limits.max_streams, limits.max_header_list,
                                limits.stream_window, limits.conn_window)
        hp.on_frame(self.h2, self._frame)
        self.streams: dict[int, H2Stream] = {}
        self.active = 0              # handlers running
        self.started = 0             # streams accepted
        self.refused = 0
        self.resets = 0              # client resets of unanswered streams
        self.ctrl = 0                # control frames received
        self.data_frames = 0         # DATA frames sent
        self.bytes_in = 0
        self.payload_in = 0
        self.last_id = hp.MAX_STREAM_ID  # streams above it are refused
        self.goaway_sent = False     # the final GOAWAY is out
        self._pending_new = 0        # streams of this read not spawned yet
        self.closing = False         # no new streams: end once idle
        self.peer_eof = False
        self.error: str | None = None
        self._room = trio.lowlevel.ParkingLot()     # streams waiting for a window
        self._drain = trio.lowlevel.ParkingLot()    # ... for the writer to catch up
        self._wake = trio.Event()
        self._writing = False
        self._done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._idle: Timer | None = None
        self._write_timer: Timer | None = None
        self._ping_ack: trio.Event | None = None

    # -- running -------------------------------------------------------------------
    async def run(self, initial: bytes = b"") -> None:
        """Serve until the client leaves, an error, or a finished stop;
        `initial`: bytes already read from the transport (the preface)."""
        with trio.CancelScope() as scope:
            self._idle = Timer(scope)
            self._write_timer = Timer(scope)
            self._idle.arm(self.limits.idle_timeout, IDLE)
            if self.closing:
                # Accepted while stopping: nothing will be processed.
                self._queue_goaway(0, final=True)
                self._finish()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._reader, initial)
                    nursery.start_soon(self._writer)
                    await self._done.wait()
                    if self._writing:
                        # Never cancel a write half done: the frames after
                        # it (a GOAWAY) would follow a torn frame.
                        with trio.move_on_after(LINGER):
                            await self._drain.park()
                    nursery.cancel_scope.cancel()
            finally:
                self._idle.close()
                self._write_timer.close()
        if scope.cancelled_caught and self._idle.fired is IDLE:
            self._queue_goaway(0, final=True)
        # What is left (a GOAWAY, the last frames): one try, bounded.
        data = self.h2.data_to_send()
        with trio.move_on_after(LINGER):
            try:
                if data:
                    await self.t.send_all(data)
                if self.goaway_sent and not self.peer_eof:
                    # Lingering close: a close with the client's frames
                    # unread would reset the connection, and the client
                    # could lose our GOAWAY (which says what to retry).
                    await self.t.send_eof()
                    while await self.t.receive():
                        pass
            except CLOSED:
                pass
        for s in self.streams.values():
            s.closed = True

    def _finish(self) -> None:
        self._done.set()

    async def _reader(self, initial: bytes) -> None:
        h = self.h2
        t = self.t
        data = initial
        try:
            while True:
                if not data:
                    data = await t.receive()
                    if not data:
                        self.peer_eof = True
                        break          # the client closed
                self.bytes_in += len(data)
                try:
                    events = h.receive_data(data)
                except hp.exceptions.ProtocolError as e:
                    # h2 queued GOAWAY; malformed requests land here too
                    # (RFC 9113 §8.1.1), so none reaches a handler.
                    self.error = f"{type(e).__name__}: {e}"
                    code = getattr(e, "error_code", hp.PROTOCOL_ERROR)
                    log.info(f"h2 {self.who}: {type(e).__name__}: {e}, GOAWAY "
                             f"{_code_name(code)}")
                    break
                data = b""
                if events:
                    self._dispatch(events)
                if self.bytes_in // 8 > self.payload_in + FLOOD_SLACK:
                    self.fail(hp.ErrorCodes.ENHANCE_YOUR_CALM, "flood (bytes without payload)")
                if self._done.is_set():
                    return
                # Flush before reading on: a flood of frames h2 answers
                # (PING, SETTINGS) queues at most one read's worth.
                self._wake_writer()
                if hp.pending(h) > HIGH_WATER:
                    await self._drained()
        except CLOSED:
            pass
        self._finish()

    async def _writer(self) -> None:
        h = self.h2
        t = self.t
        timer = self._write_timer
        limit = self.limits.send_timeout
        while True:
            if self._done.is_set():
                return               # run() sends what is left
            data = h.data_to_send()
            if not data:
                self._drain.unpark_all()
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            self._writing = True
            timer.arm(limit, WRITE)
            try:
                await t.send_all(data)
            except CLOSED:
                self._writing = False
                self._finish()
                self._drain.unpark_all()
                return
            timer.disarm()
            self._writing = False
            if self._done.is_set():
                self._drain.unpark_all()     # run() waits for this write
                return

    def _wake_writer(self) -> None:
        self._wake.set()

    async def _queued(self, yield_turn: bool = False) -> None:
        """A stream queued frames: wake the writer; wait when h2 holds more
        than HIGH_WATER (the socket is slower than the streams)."""
        self._wake.set()
        if hp.pending(self.h2) > HIGH_WATER:
            await self._drained()
        elif yield_turn:
            await trio.lowlevel.checkpoint()

    async def _drained(self) -> None:
        while hp.pending(self.h2) > HIGH_WATER and not self._done.is_set():
            self._wake.set()
            await self._drain.park()

    # -- events --------------------------------------------------------------------
    def _dispatch(self, events: list) -> None:
        new: dict[int, H2Stream] = {}
        for e in events:
            tp = type(e)
            if tp is ev.RequestReceived:
                self._pending_new = len(new)
                s = self._request(e)
                if s is not None:
                    new[e.stream_id] = s
                    if e.stream_ended is not None:
                        s.ended = True
            elif tp is ev.DataReceived:
                s = self.streams.get(e.stream_id) or new.get(e.stream_id)
                n = e.flow_controlled_length
                self.payload_in += n
                if s is not None and not s.closed:
                    s.body.append((e.data, n))
                    s._wake()
                else:
                    self._ack(e.stream_id, n)
            elif tp is ev.StreamEnded:
                s = self.streams.get(e.stream_id) or new.get(e.stream_id)
                if s is not None:
                    s.ended = True
                    s._wake()
            elif tp is ev.StreamReset:
                self._reset(e.stream_id, new, e.remote_reset)
            elif tp is ev.WindowUpdated or tp is ev.RemoteSettingsChanged:
                self._room.unpark_all()
            elif tp is ev.PingAckReceived:
                if self._ping_ack is not None:
                    self._ping_ack.set()
            elif tp is ev.ConnectionTerminated:
                # The client's GOAWAY: it opens nothing more; finish.
                self.closing = True
                if e.error_code:
                    log.info(f"h2 {self.who}: client GOAWAY {_code_name(e.error_code)}")
            if self._done.is_set():
                return
        for s in new.values():
            self._spawn(s)
        if self.closing and self.active == 0:
            self._finish()

    def _frame(self, frame) -> None:
        # Every frame but HEADERS, CONTINUATION and non-empty DATA is
        # control; a client that sends many more of those than its streams
        # and our DATA frames explain is flooding (h2 answers PING and
        # SETTINGS by itself, and DATA on a closed stream with RST_STREAM).
        if type(frame) in hp.PAYLOAD_FRAMES:
            if type(frame) is not hp.DataFrame:
                self.payload_in += len(frame.data)
                return
            if frame.data:
                return
        self.ctrl += 1
        if self.ctrl > CTRL_BASE + CTRL_PER_STREAM * self.started + self.data_frames:
            # h2 answers it with GOAWAY ENHANCE_YOUR_CALM (see _reader).
            raise hp.exceptions.DenialOfServiceError("control frame flood")

    def _ack(self, sid: int, n: int) -> None:
        if n:
            try:
                self.h2.acknowledge_received_data(n, sid)
            except (hp.exceptions.ProtocolError, ValueError):
                pass

    def _consumed(self, s: H2Stream, n: int) -> None:
        if n:
            self._ack(s.id, n)
            self._wake.set()

    def _request(self, e) -> H2Stream | None:
        sid = e.stream_id
        h = self.h2
        if self.closing or sid > self.last_id:
            self._refuse(sid)
            return None
        if self.active + self._pending_new >= self.limits.max_streams:
            self._refuse(sid)
            return None
        req, why = self._build(e.headers)
        if req is None:
            log.info(f"h2 {self.who}: stream {sid}: malformed request ({why}), "
                     "RST_STREAM PROTOCOL_ERROR")
            try:
                h.reset_stream(sid, hp.PROTOCOL_ERROR)
            except hp.exceptions.ProtocolError:
                pass
            return None
        self.started += 1
        s = H2Stream(self, sid, req)
        if why:
            s.error = HttpError(413, why)
        if self.started >= self.limits.max_requests:
            # connection { max requests }: answer this one, refuse later ones.
            self._queue_goaway(sid, final=True)
            self.closing = True
        return s

    def _refuse(self, sid: int) -> None:
        self.refused += 1
        try:
            self.h2.reset_stream(sid, hp.ErrorCodes.REFUSED_STREAM)
        except hp.exceptions.ProtocolError:
            pass
        if self.refused > max(self.limits.max_streams, 100):
            self.fail(hp.ErrorCodes.ENHANCE_YOUR_CALM, "too many refused streams")

    def _build(self, headers) -> tuple[Request | None, str]:
        """The request of a HEADERS block, or (None, why) for a malformed
        one (RFC 9113 §8.2, §8.3), checked here in one pass: h2's own
        inbound checks are off (a tenth of a request's CPU, and a malformed
        request is then a stream error, not the end of the connection)."""
        req = Request()
        req.version = "2.0"
        pseudo: dict[bytes, bytes] = {}
        out = []
        hmap: dict[str, str] = {}
        size = 0
        bad_name = _BAD_NAME.search
        bad_value = _BAD_VALUE.search
        for k, v in headers:
            if k[:1] == b":":
                if out or k not in _PSEUDO or k in pseudo:
                    return None, "misplaced, unknown or repeated pseudo-header"
                pseudo[k] = v
                continue
            if not k or bad_name(k) is not None:
                return None, "invalid field name"
            if bad_value(v) is not None:
                return None, "invalid field value"
            name = k.decode("latin-1")
            if name in _CONNECTION_FIELDS:
                if name != "te" or v != b"trailers":
                    return None, f"connection-specific field {name}"
            value = v.decode("latin-1")
            size += len(k) + len(v) + 2
            out.append((name, value))
            old = hmap.get(name)
            hmap[name] = value if old is None else \
                old + ("; " if name == "cookie" else ", ") + value
        method = pseudo.get(b":method")
        if not method or not all(c in _TCHAR for c in method):
            return None, "bad :method"
        if method == b"CONNECT":
            return None, "CONNECT"
        if pseudo.get(b":scheme") != self.scheme:
            return None, "bad :scheme"
        path = pseudo.get(b":path")
        if not path or not (path[0] == 47 or (path == b"*" and method == b"OPTIONS")) or \
                any(c in _BAD_PATH for c in path):
            return None, "bad :path"
        authority = pseudo.get(b":authority")
        if authority is not None:
            if not authority or any(c in _BAD_AUTHORITY for c in authority):
                return None, "bad :authority"
            a = authority.decode("latin-1")
            host = hmap.get("host")
            if host is not None and host != a:
                return None, "host differs from :authority"
            if host is None:
                hmap["host"] = a
        cl = hmap.get("content-length")
        if cl is not None:
            if not cl.isdigit():
                return None, "bad content-length"
            req.content_length = int(cl)
        req.method = method.decode("latin-1")
        req.target = path.decode("latin-1")
        req.headers = out
        req.hmap = hmap
        req.head_size = size + len(path)
        if req.head_size > self.limits.max_head:
            return req, "request headers too large"
        return req, ""

    def _reset(self, sid: int, new: dict[int, H2Stream], remote: bool) -> None:
        s = new.pop(sid, None)
        if s is None:
            s = self.streams.get(sid)
            if s is None:
                return
        unanswered = not s.answered
        s.closed = True
        s._wake()
        self._room.unpark_all()
        # Either way (the client's reset, or one h2 sent because of what
        # the client did: MadeYouReset, CVE-2025-8671) the handler keeps
        # its slot until it returns.
        if unanswered or not remote:
            self.resets += 1
            if self.resets > self.limits.max_resets and self.resets * 2 > self.started:
                self.fail(hp.ErrorCodes.ENHANCE_YOUR_CALM, "rapid reset")

    def _spawn(self, s: H2Stream) -> None:
        self.streams[s.id] = s
        self.active += 1
        self._idle.disarm()
        self._nursery.start_soon(self._run_stream, s)

    async def _run_stream(self, s: H2Stream) -> None:
        # No cancel scope per stream (about a tenth of a small request's
        # CPU): a reset stream wakes what its handler waits for in this
        # module (body, window) and fails its next send; a handler waiting
        # elsewhere (a FastCGI answer) keeps its slot until it returns.
        try:
            await self.handler(s)
        except CLOSED:
            pass
        except HttpError:
            pass
        except Exception as e:     # a bug must not take the connection down
            log.warn_exc(f"h2 stream handler failed: {e!r}")
            s.reset(hp.ErrorCodes.INTERNAL_ERROR)
        finally:
            self._end_stream(s)

    def _end_stream(self, s: H2Stream) -> None:
        self.active -= 1
        del self.streams[s.id]
        if not s.closed:
            if not s.finished:
                s.reset(hp.ErrorCodes.INTERNAL_ERROR if not s.answered
                        else hp.ErrorCodes.CANCEL)
            elif not s.ended:
                # Answered before the whole body came: stop the upload
                # (RFC 9113 §8.1).
                s.reset(hp.ErrorCodes.NO_ERROR)
        # Body bytes the handler never took still count on the connection.
        n = sum(flow for _, flow in s.body)
        s.body.clear()
        if n:
            self._ack(s.id, n)
        s.closed = True
        self._wake.set()
        if self.active == 0:
            if self.closing:
                self._finish()
            else:
                self._idle.arm(self.limits.idle_timeout, IDLE)

    # -- ending ----------------------------------------------------------------------
    def _queue_goaway(self, last_id: int, final: bool, code: int = 0) -> None:
        if self.goaway_sent:
            return
        hp.queue_raw(self.h2, hp.goaway(last_id, code))
        self.last_id = min(self.last_id, last_id)
        if final:
            self.goaway_sent = True
        self._wake.set()

    def fail(self, code, why: str) -> None:
        """End the connection at once with GOAWAY `code` (an attack, a stall)."""
        if self._done.is_set():
            return
        self.error = why
        log.info(f"h2 {self.who}: {why}, GOAWAY {_code_name(code)}")
        self._queue_goaway(self.h2.highest_inbound_stream_id, True, code)
        self._finish()

    def refuse(self) -> None:
        """Before run(): answer the connection with GOAWAY(NO_ERROR, 0) only
        (the server is stopping; the client may retry elsewhere)."""
        self.closing = True

    def shutdown(self) -> None:
        """Graceful stop (reload, SIGTERM): GOAWAY(NO_ERROR, 2^31-1), then
        after a PING round trip or GOAWAY_WAIT the final GOAWAY with the
        last stream id seen; streams in flight finish, later ones are
        refused, and the connection ends once idle."""
        if self.closing or self._nursery is None or self._done.is_set():
            return
        self._queue_goaway(hp.MAX_STREAM_ID, final=False)
        self._ping_ack = trio.Event()
        hp.queue_raw(self.h2, hp.ping(b"tandemgo"))
        self._nursery.start_soon(self._second_goaway)

    async def _second_goaway(self) -> None:
        with trio.move_on_after(GOAWAY_WAIT):
            await self._ping_ack.wait()
        self.closing = True
        self._queue_goaway(self.h2.highest_inbound_stream_id, final=True)
        if self.active == 0:
            self._finish()


def _code_name(code) -> str:
    try:
        return hp.ErrorCodes(int(code)).name
    except ValueError:
        return str(code)
