"""relayd.relay_h2 -- HTTP relays over HTTP/2 toward clients (extension:
`http { http2 }`); backends stay HTTP/1.1.

serve(session) chooses once per connection: ALPN h2 on a TLS listener, or
the client preface on a clear-text one (engine.http2.wants_h2), runs an
engine.http2 server connection; anything else goes to relay_http
unchanged.  Each stream is a session of its own (Session.child(): id, tag,
label, log items, one `log connection` line) relayed by a StreamRelay:

- The request is checked and filtered by relay_http's RequestFilter, the
  code HTTP/1 requests go through, on an HTTP/1 view of the stream's head
  (design note §6): `:method`, `:path` (path and query), a `host` built
  from `:authority` in first place, cookie crumbs joined with "; "
  (RFC 9113 §8.2.3).  engine.http2 has refused malformed heads (RFC 9113
  §8.2, §8.3) with RST_STREAM before any of this runs.
- The backend request is written here: the request line, exactly one
  Host, the other fields minus every connection-specific one (relay_http's
  _build_head), and a body framed by Content-Length when the client gave
  one (the DATA sum is held to it) or else chunked; a request that ended
  with its HEADERS has no body.  A body cut short or too long cuts the
  backend connection before the request is complete.
- The response head goes through the response rules; Connection, the
  fields it lists, Keep-Alive, Transfer-Encoding, Upgrade, TE and Trailer
  are dropped; the body goes out dechunked as DATA.

Backend connections come from a Pool that belongs to the client
connection: idle ones are reused per table, at most `http2 max-streams`
are open, and each beyond the first takes a connection slot of the relay
process (engine.serve Server.hold()), so HTTP/2 sessions count their
backends in the same limit as HTTP/1 ones.  Errors a stream meets get the
`return error` page on that stream, else RST_STREAM CANCEL; the other
streams go on.

Does not parse HTTP/2 (engine.http2 does) nor pick hosts (Session.connect).
"""

from __future__ import annotations

import math

import trio

from engine import http2
from engine.conn import CLOSED, Transport
from engine.http1 import REASONS, ClientConn, HttpError, Request, Response
from relayd import relay_http
from relayd.config import RELAYD_SERVERNAME
from relayd.errors import BackendError
from relayd.relay_http import (_CONN_WORDS, _NO_TOKENS, HOP_BY_HOP, NO_BODY_METHODS,
                               RESPONSE_HEAD_MAX, RequestFilter, _Abort, _build_head, _Close,
                               _keep_alive, _tokens, error_body)
from shared import log

# RST_STREAM codes (RFC 9113 §7).
PROTOCOL_ERROR = 1
CANCEL = 8
# Response fields never sent over HTTP/2 (RFC 9113 §8.2.2); Content-Length
# stays when it describes the body.
_RESPONSE_DROP = HOP_BY_HOP - {"content-length"}
# Bytes of HPACK overhead allowed per field beyond `http headerlen` (RFC
# 9113 §6.5.2 counts 32 per field), for about this many fields.
_HPACK_FIELDS = 100


def limits(proto, timeout: float) -> http2.H2Limits:
    """The HTTP/2 limits of a protocol's `http { }` options: `headerlen`
    for the head (413 beyond it), `http2 max-streams` and `max-requests`;
    the session timeout for an idle connection and a stalled send."""
    h = proto.http
    t = float(max(1, timeout))
    head = max(1, h.headerlen)
    return http2.H2Limits(max_streams=h.h2_max_streams, max_requests=h.h2_max_requests,
                          max_head=head, max_header_list=max(1024, head + 32 * _HPACK_FIELDS),
                          idle_timeout=t, send_timeout=t)


class _Backend:
    __slots__ = ("t", "bc", "table", "addr", "held")

    def __init__(self, t: Transport, table: str | None, addr, held: bool) -> None:
        self.t = t
        self.bc = ClientConn(t, RESPONSE_HEAD_MAX)
        self.table = table
        self.addr = addr
        self.held = held             # holds a Server slot (not the session's own)


class Pool:
    """The backend connections of one client connection: see the module
    docstring.  get() waits when `limit` are busy (or no process slot is
    free and the connection has one of its own)."""

    def __init__(self, session, limit: int) -> None:
        self.s = session
        self.limit = limit
        self.idle: list[_Backend] = []
        self.open = 0
        self._free = trio.lowlevel.ParkingLot()
        if session.preconnected is not None:     # tls hook: inspection's backend
            t, session.preconnected = session.preconnected, None
            self.open = 1
            self.idle.append(_Backend(t, None, session.backend, False))

    async def get(self, ss, table: str | None, hash_input: bytes) -> tuple[_Backend, bool]:
        """A backend for stream session `ss`: (backend, reused)."""
        while True:
            for i in range(len(self.idle) - 1, -1, -1):
                b = self.idle[i]
                if b.table == table:
                    del self.idle[i]
                    return b, True
            server = self.s.server
            if self.open < self.limit:
                held = self.open > 0
                if not held or server is None or server.hold():
                    self.open += 1
                    try:
                        t = await ss.connect(table, hash_input)
                    except BaseException:
                        self._closed(held)
                        raise
                    ss.backends.remove(t)            # the pool closes it
                    return _Backend(t, table, ss.backend, held and server is not None), False
            if self.idle:
                await self.drop(self.idle.pop(0))     # another table's: make room
                continue
            await self._free.park()

    def put(self, b: _Backend) -> None:
        """A backend done with its exchange, kept alive for the next."""
        self.idle.append(b)
        self._free.unpark()

    async def drop(self, b: _Backend) -> None:
        """Close a backend connection (done with, or in an unknown state)."""
        self._closed(b.held)
        with trio.CancelScope(shield=True):
            try:
                await b.t.aclose()
            except Exception:
                pass

    def _closed(self, held: bool) -> None:
        self.open -= 1
        if held and self.s.server is not None:
            self.s.server.release()
        self._free.unpark()

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for b in idle:
            await self.drop(b)


class StreamRelay(RequestFilter):
    """One stream relayed to one backend exchange."""

    __slots__ = ("r", "st", "s", "proto", "rules", "resp_rules", "ctx", "env", "haslog",
                 "scope", "deadline")

    def __init__(self, r: "H2Relay", st: http2.H2Stream, ss) -> None:
        self.r = r
        self.st = st
        self.s = ss
        self.proto = r.proto
        self.rules = r.rules
        self.resp_rules = r.resp_rules
        self.ctx = r.ctx
        self.env = r.env
        self.haslog = False
        self.scope: trio.CancelScope | None = None
        self.deadline = -math.inf

    def touch(self) -> None:
        """I/O happened or is next: the session timeout starts again.  As in
        HttpRelay.touch(), the deadline moves in steps (moving one costs);
        it lies 2 steps beyond the timeout so that a send stalled by the
        client's window meets engine.http2's own send timeout first (RST
        CANCEL with its log line)."""
        r = self.r
        deadline = trio.current_time() + r.timeout + 2 * r.step
        if deadline - self.deadline >= r.step:
            self.scope.deadline = self.deadline = deadline

    async def run(self) -> str:
        st = self.st
        with trio.CancelScope() as scope:
            self.scope = scope
            self.touch()
            try:
                return await self._relay()
            except _Abort as a:
                return await self._abort(a)
            except _Close as c:
                return c.reason
            except http2.StreamClosed:
                return "stream reset"
            except CLOSED:
                return "done"          # the backend went away mid-response
        st.reset(CANCEL)
        return "buffer event timeout"

    async def _abort(self, a: _Abort) -> str:
        """relay_abort_http() on a stream: the `return error` page, else
        RST_STREAM CANCEL (what a silent close is on HTTP/1)."""
        st = self.st
        r = self.r
        if not self.proto.return_error or st.answered or st.closed:
            st.reset(CANCEL)
            return a.msg
        code = a.status
        label = self.s.label if a.label else None
        body = error_body(code, a.msg, label, self.proto.style, r.addr, r.port)
        try:
            await st.send_head(code, [("server", RELAYD_SERVERNAME),
                                      ("content-type", "text/html"),
                                      ("content-length", str(len(body)))])
            await st.send_data(body, True)
        except http2.StreamClosed:
            pass
        return f"{a.msg} ({code:03d} {REASONS.get(code, 'Unknown Error')})"

    async def _relay(self) -> str:
        st = self.st
        req = st.req
        if st.error is not None:
            raise _Abort(st.error.status, "request headers too large")
        _h1_view(req)
        method = req.method
        items, joined, target, table, hash_input = self._filter_request(req)
        host = self._host(items)
        if host is None:
            raise _Abort(400, "malformed host")
        if method in NO_BODY_METHODS:
            body = framing = None
        elif req.content_length is not None:
            body = req.content_length
            framing = ("length", body)
        elif st.ended and not st.body:
            body = framing = None
        else:
            body, framing = "chunked", ("chunked", "chunked")
        fields = [("Host", host)]
        fields += [(k, v) for k, v in items if k.lower() != "host"]
        head = _build_head(f"{method} {target} HTTP/1.1\r\n", fields, _NO_TOKENS, framing,
                           None, False, False)
        pool = self.r.pool
        b, reused = await self._backend(table, hash_input)
        keep = False
        try:
            if body is None:
                resp = await self._send_head(b.t, b.bc, req, head)
                if resp is None and reused:
                    # The kept-alive backend went away meanwhile: once more, anew.
                    await pool.drop(b)
                    b = None
                    b, _ = await self._backend(table, hash_input)
                    resp = await self._send_head(b.t, b.bc, req, head)
                if resp is None:
                    raise _Abort(502, "Bad Gateway")
                keep = await self._response(b, resp, method)
            else:
                keep = await self._with_upload(b, head, body, req)
        finally:
            if b is not None:
                if keep:
                    pool.put(b)
                else:
                    await pool.drop(b)
        return "done"

    async def _backend(self, table: str | None, hash_input: bytes) -> tuple[_Backend, bool]:
        try:
            b, reused = await self.r.pool.get(self.s, table, hash_input)
        except BackendError as e:
            raise _Abort(e.status, e.msg) from None
        self.s.backend = b.addr
        self.touch()
        return b, reused

    @staticmethod
    def _host(items) -> str | None:
        # Exactly one Host toward the backend: the first one left after the
        # rules (a rule may have set or appended one).
        for k, v in items:
            if k.lower() == "host":
                return v
        return None

    async def _interim(self, resp: Response) -> None:
        # 100 Continue as an interim HEADERS; other 1xx are not passed on.
        if resp.status == 100:
            await self.st.send_interim(100)

    async def _with_upload(self, b: _Backend, head: bytes, body, req: Request) -> bool:
        """Send head and body while the response comes back (a backend may
        answer early, or first send 100 Continue)."""
        done: list[bool] = []
        keep: list[bool] = []
        failure: list[BaseException] = []

        async def upload(scope: trio.CancelScope) -> None:
            try:
                await self._upload(b.t, head, body)
                done.append(True)
            except (_Abort, _Close) as e:
                failure.append(e)
                scope.cancel()
            except CLOSED:
                pass        # the client reset, or the backend stopped reading

        async def respond(resp: Response) -> None:
            keep.append(await self._response(b, resp, req.method))

        await self._answer_during(upload, b.bc, req, respond, failure)
        if failure:
            raise failure[0]
        return bool(keep and keep[0] and done)

    async def _upload(self, t: Transport, head: bytes, body) -> None:
        """The request body as DATA came: raw under Content-Length (held
        to it: RFC 9113 §8.1.1), else in chunks."""
        st = self.st
        chunked = body == "chunked"
        left = 0 if chunked else body
        pending = head
        while True:
            data = await st.receive_body()
            if not data:
                break
            if chunked:
                pending += b"%x\r\n" % len(data) + data + b"\r\n"
            else:
                left -= len(data)
                if left < 0:
                    break
                pending += data
            await t.send_all(pending)
            pending = b""
            self.touch()
        if left != 0:
            # The backend never gets a complete request: its connection is
            # dropped with what it has (the caller does not keep it).
            log.info(f"relay {self.s.name}, session {self.s.id}: "
                     "h2 body does not match content-length, RST_STREAM PROTOCOL_ERROR")
            st.reset(PROTOCOL_ERROR)
            raise _Close("malformed (content-length mismatch)")
        if chunked:
            pending += b"0\r\n\r\n"
        if pending:
            await t.send_all(pending)

    async def _response(self, b: _Backend, resp: Response, method: str) -> bool:
        """Filter the response head, send it as HEADERS, its body as DATA;
        True when the backend connection can serve another stream."""
        st = self.st
        status = resp.status
        if status == 101 or (status == 204 and resp.content_length):
            raise _Abort(502, "Bad Gateway")
        items, joined = self._filter_response(resp)
        drop = _RESPONSE_DROP
        listed = _tokens(joined("connection")) - _CONN_WORDS
        if listed:
            drop = drop | listed
        bodiless = method == "HEAD" or status in (204, 304)
        if resp.content_length is None and not bodiless:
            drop = drop | {"content-length"}
        fields = [(k.lower(), v) for k, v in items if k.lower() not in drop]
        eof = not bodiless and not resp.chunked and resp.content_length is None
        backend_keep = not eof and _keep_alive(resp.version, _tokens(resp.hmap.get("connection")))
        if bodiless:
            await st.send_head(status, fields, end=True)
            return backend_keep
        await st.send_head(status, fields)
        bc = b.bc
        while True:
            try:
                data = await bc.receive_body()
            except HttpError:
                st.reset(CANCEL)
                raise _Close("done") from None
            except CLOSED:
                if not eof:
                    st.reset(CANCEL)
                    raise _Close("done") from None
                data = b""
            if not data:
                break
            self.touch()
            await st.send_data(data)
        await st.send_data(b"", True)
        return backend_keep


def _h1_view(req: Request) -> None:
    """The stream's head as the rules see an HTTP/1 one: `host` first
    (from `:authority`, RFC 9113 §8.3.1) and the cookie crumbs joined into
    one field (RFC 9113 §8.2.3)."""
    headers = req.headers
    host = req.hmap.get("host")
    out = [("host", host)] if host is not None else []
    cookie = -1
    for k, v in headers:
        if k == "host":
            continue
        if k == "cookie":
            if cookie >= 0:
                out[cookie] = ("cookie", out[cookie][1] + "; " + v)
                continue
            cookie = len(out)
        out.append((k, v))
    req.headers = out


class H2Relay(RequestFilter):
    """One HTTP/2 client connection of an HTTP relay (its RequestFilter
    part is what the streams share: compiled rules, context, macros)."""

    def __init__(self, session) -> None:
        self._setup(session)
        self.limits = limits(self.proto, self.timeout)
        self.step = min(1.0, self.timeout / 10)
        self.pool = Pool(session, self.limits.max_streams)
        self.streams = 0

    async def handle(self, st: http2.H2Stream) -> None:
        ss = self.s.child()
        self.streams += 1
        # What stays if the connection ends meanwhile (its tasks cancelled).
        reason = "done"
        try:
            reason = await StreamRelay(self, st, ss).run()
        except Exception:      # a bug ends this stream only (engine.http2 resets it)
            reason = "internal error"
            log.warn_exc(f"relay_h2: session {ss.id}: internal error")
        finally:
            ss.close_log(reason)

    async def run(self) -> str:
        s = self.s
        tls = bool(getattr(s.client, "tls", False))
        conn = http2.H2ServerConn(s.client, self.limits, self.handle,
                                  "https" if tls else "http")
        s.state.h2conns.add(conn)
        try:
            if s.state.draining:
                conn.refuse()
            await conn.run()
        finally:
            s.state.h2conns.discard(conn)
            await self.pool.close()
        reason = conn.error or "done"
        if reason == "done" and self.streams:
            s.log_close = False       # each stream had its line
        return reason


async def serve(session) -> str:
    """Serve one connection of a relay with `http { http2 }`: HTTP/2 when
    the client chose it, else relay_http; the close reason."""
    client = session.client
    if not await http2.wants_h2(client, bool(getattr(client, "tls", False)),
                                float(session.relay.session_timeout)):
        return await relay_http.serve(session)
    try:
        return await H2Relay(session).run()
    except CLOSED:
        return "done"
    except Exception:
        log.warn_exc(f"relay_h2: session {session.id}: internal error")
        return "internal error"
