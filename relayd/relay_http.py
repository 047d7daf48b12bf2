"""relayd.relay_http -- HTTP relaying: one client session (relay_http.c).

serve(session) reads requests from the client (engine.http1 ServerConn),
runs the protocol's filter rules on each request and each response head
(relayd.rules), opens the backend lazily after the first request head (a
rule may pick the table with `forward to`, `hash` options feed mode hash)
and keeps it for the next requests while both sides keep alive.  A rule
picking another table gets a new backend connection.

Bodies are never buffered whole: they stream through as they come, in the
sender's framing -- Content-Length as is, a chunked body with the sender's
own chunk-size lines, extensions and trailer (engine.http1's passthrough
mode validates each) -- so both peers see the same message boundaries; only
an HTTP/1.0 client gets a chunked response unchunked, until the close.  A
bare LF ends a line as in OpenBSD (RFC 9112 2.2); heads are rebuilt and
every line written toward the other side ends in CRLF.  Hop-by-hop headers
are dropped and the Connection header is rebuilt for each side; folded
header lines are joined into one.  Anything a backend could read
differently from us -- Content-Length with Transfer-Encoding, repeated or
bad Content-Length, a coding other than plain chunked, bad chunk sizes, a CR
not before LF, NUL/CTL bytes, bad header names, folded framing headers,
repeated or mismatching Host -- is refused with 400; a head is refused
before anything of it is forwarded (requests parsed before it in the same
read are answered first), a bad chunk later in a body cuts the backend
connection before that request is complete.  A request without a length
has no body (RFC 9112 6.3): what follows its head is the next request.

A response without a length (neither Content-Length nor chunked) streams
until the backend closes, with `Connection: close` toward the client;
requests the client sends meanwhile are filtered and forwarded on the same
backend connection, as OpenBSD does.  Absolute-form targets are kept as
received for the rules, the log and the backend.

CONNECT and (with `http websockets`) a WebSocket upgrade answered by 101
become raw tunnels (engine.splice).  Errors a client sees go through
abort_http() (relay_abort_http): with `return error` an HTML page, else a
silent close; either way the session's close reason.

Does not accept, choose hosts or write the session log line: relayd.relay
does (Session.connect, Session.close_log).
"""

from __future__ import annotations

import math
import re

import jinja2
import trio

from engine.chunked import Framing
from engine.conn import CLOSED, SocketTransport, Transport
from engine.http1 import (BAD_CONTENT_LENGTH, REASONS, ClientConn, HttpError, Request,
                          Response, ServerConn, http_date)
from engine.splice import relay as splice_relay
from relayd import rules
from relayd.config import HTTP_METHODS, RELAYD_SERVERNAME
from relayd.errors import BackendError
from shared import log

# Headers about one connection: never forwarded as they came (RFC 9110 7.6.1);
# the framing headers are written anew for the outgoing body.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length"})
# Methods whose request body relayd drops, with its framing headers (relay_http.c 1.90).
NO_BODY_METHODS = frozenset({"GET", "HEAD", "COPY", "MOVE"})
# Response head limit toward backends.
RESPONSE_HEAD_MAX = 65536
# Bytes gathered into one send when more body is already at hand.
COALESCE = 262144
# After an error page: how long and how much to read before closing, so the
# client sees the page and not a reset.
LINGER_TIME = 1.0
LINGER_BYTES = 1 << 20
# Time an error page may take to go out.
ABORT_TIME = 5.0
# relay_abort_http()'s style when `return error` names none.
DEFAULT_STYLE = ("body { background-color: #a00000; color: white; font-family: "
                 "'Comic Sans MS', 'Chalkboard SE', 'Comic Neue', sans-serif; }\n"
                 "hr { border: 0; border-bottom: 1px dashed; }\n")

# Header field names: RFC 9110 tokens (relay_http_header_name_valid()).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Host header: RFC 3986 reg-name / IP-literal and port characters only.
_HOST_OK = re.compile(r"[A-Za-z0-9.\-_~!$&'()*+,;=:%\[\]]*")
# absolute-form request target: scheme, authority, path-and-query.
_ABSOLUTE = re.compile(r"(?i)(https?)://([^/?#]*)([^#]*)")

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("relayd", "templates"),
    autoescape=False, keep_trailing_newline=True)
_page = _templates.get_template("error.html")


class _Abort(Exception):
    """A client-visible failure: error page (with `return error`), close."""

    def __init__(self, status: int, msg: str, label: bool = False) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.label = label       # show the session label (rule verdicts)


class _Close(Exception):
    """End the session quietly with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def error_body(code: int, msg: str, label: str | None, style: str | None,
               addr: str, port: int) -> bytes:
    """relay_abort_http()'s HTML page."""
    body = _page.render(code=f"{code:03d}", reason=REASONS.get(code, "Unknown Error"),
                        style=style if style is not None else DEFAULT_STYLE,
                        text="" if code == 500 else msg, label=label or "",
                        server=RELAYD_SERVERNAME, addr=addr, port=port)
    return body.encode("utf-8", "replace")


def error_page(code: int, msg: str, label: str | None, style: str | None,
               addr: str, port: int) -> bytes:
    """relay_abort_http()'s response: HTTP/1.0 head and HTML body."""
    reason = REASONS.get(code, "Unknown Error")
    data = error_body(code, msg, label, style, addr, port)
    head = (f"HTTP/1.0 {code:03d} {reason}\r\n"
            f"Date: {http_date()}\r\n"
            f"Server: {RELAYD_SERVERNAME}\r\n"
            "Connection: close\r\n"
            "Content-Type: text/html\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    return head.encode("latin-1") + data


def client_error(conn: ServerConn, e: HttpError) -> tuple[int, str]:
    """(status, close reason) for a malformed request, in relayd's words."""
    m = e.msg or ""
    low = m.lower()
    if e.status == 413:
        return 413, "request headers too large"
    if "chunk size overflow" in low or "chunk size too long" in low:
        return 400, "chunk size too long"
    if "chunk" in low:
        return 400, "invalid chunk size"
    if m == "malformed host":
        # http1 says "malformed host" for a repeated Host too; relayd calls a
        # repeated unique header "malformed header".
        if conn.hcount.get("host", 0) > 1:
            return 400, "malformed header"
        return 400, m
    if (m in ("malformed header", BAD_CONTENT_LENGTH) or "content-length" in low
            or "transfer-encoding" in low):
        return 400, "malformed header"
    return 400, "malformed"


_NO_TOKENS: frozenset[str] = frozenset()
_token_sets: dict[str, frozenset[str]] = {}


def _tokens(value: str | None) -> frozenset[str]:
    """Lower-case tokens of a comma-separated header value (memoised: the
    same few Connection values come on every exchange)."""
    if not value:
        return _NO_TOKENS
    toks = _token_sets.get(value)
    if toks is None:
        toks = frozenset(t.strip().lower() for t in value.split(","))
        if len(_token_sets) < 256:
            _token_sets[value] = toks
    return toks


def _keep_alive(version: str, conn_tokens: set[str]) -> bool:
    if "close" in conn_tokens:
        return False
    return version != "1.0" or "keep-alive" in conn_tokens


# Connection options that are not header names.
_CONN_WORDS = frozenset({"close", "keep-alive", "upgrade"})


def _build_head(first: str, items, conn_tokens: set[str], framing: tuple | None,
                connection: str | None, upgrade: bool, raw_length: bool) -> bytes:
    """A head for the other side: hop-by-hop headers (and those Connection
    names) dropped; the body framing written anew, `("length", n)` or
    `("chunked", codings)`, in place of the peer's framing header (keeping
    its name) or at the end; `connection` likewise.  `upgrade` keeps
    Connection and Upgrade as they are (WebSocket); `raw_length` keeps
    Content-Length as it came (responses to HEAD, 304)."""
    lines = [first]
    drop = HOP_BY_HOP
    listed = conn_tokens - _CONN_WORDS
    if listed:
        drop = drop | listed
    for name, value in items:
        low = name.lower()
        if low in drop:
            if upgrade and (low == "connection" or low == "upgrade"):
                lines.append(f"{name}: {value}\r\n")
            elif low == "content-length":
                if raw_length:
                    lines.append(f"{name}: {value}\r\n")
                elif framing is not None and framing[0] == "length":
                    lines.append(f"{name}: {framing[1]}\r\n")
                    framing = None
            elif low == "transfer-encoding":
                if framing is not None and framing[0] == "chunked":
                    lines.append(f"{name}: {framing[1]}\r\n")
                    framing = None
            elif low == "connection" and connection:
                lines.append(connection)
                connection = None
            continue
        lines.append(f"{name}: {value}\r\n")
    if framing is not None:
        if framing[0] == "length":
            lines.append(f"Content-Length: {framing[1]}\r\n")
        else:
            lines.append(f"Transfer-Encoding: {framing[1]}\r\n")
    if connection:
        lines.append(connection)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1", "replace")


class _Upload:
    __slots__ = ("done", "error", "finished")

    def __init__(self) -> None:
        self.done = False
        self.error: HttpError | None = None
        self.finished = trio.Event()


class RequestFilter:
    """What an HTTP/1 session (HttpRelay) and an HTTP/2 stream
    (relay_h2) share: the checks of a request head and the filter rules on
    request and response heads.  A subclass sets `s` (the session: tag,
    label, log items), `proto`, `rules` and `resp_rules` (None: no rules
    that way), `ctx`, `env` and `haslog`."""

    def _setup(self, session) -> None:
        """The per-connection part: compiled rules, rule context, macros."""
        self.s = session
        proto = session.proto
        self.proto = proto
        compiled = rules.compile_rules(proto.rules) if proto.rules else {}
        # None when a direction has no rules: its heads pass untouched.
        self.rules = compiled if compiled.get(rules.REQUEST) else None
        self.resp_rules = compiled if compiled.get(rules.RESPONSE) else None
        client = session.client
        listen = getattr(session, "listen", None)
        addr = listen.addr if listen is not None else client.local[0]
        if addr in ("0.0.0.0", "::", ""):
            addr = client.local[0]
        self.addr = addr
        self.port = listen.port if listen is not None else client.local[1]
        self.timeout = session.relay.session_timeout
        self.ctx = rules.Ctx(client.peer[0], client.local[0])
        self.env = rules.Env(client.peer[0], client.peer[1], addr, self.port, self.timeout)
        self.haslog = False

    def _filter_request(self, req: Request) -> tuple:
        """Check a request head and run the request rules on it: (headers
        to forward, their lookup by lower-case name, target, table, hash
        input).  Raises _Abort."""
        method = req.method
        hmap = req.hmap
        if method not in HTTP_METHODS:
            raise _Abort(400, "malformed")
        if req.headers and not _TOKEN.fullmatch("".join([k for k, _ in req.headers])):
            raise _Abort(400, "malformed")
        te = hmap.get("transfer-encoding")
        if te is not None and (te.strip().lower() != "chunked" or req.version == "1.0"):
            raise _Abort(400, "malformed")
        if method in ("CONNECT", "TRACE") and (req.content_length is not None or req.chunked):
            raise _Abort(400, "malformed")
        host = hmap.get("host")
        if host is not None and not _HOST_OK.fullmatch(host):
            raise _Abort(400, "malformed host")
        target = req.target
        headers = req.headers
        if not target.startswith("/") and method != "CONNECT" and target != "*":
            # absolute-form: rules, log and backend get it as received, as
            # OpenBSD's; its host has to be the Host header's.
            m = _ABSOLUTE.fullmatch(target)
            if m is None:
                raise _Abort(400, "malformed")
            if host is not None and m.group(2).lower() != host.lower():
                raise _Abort(400, "malformed host")

        s = self.s
        table, hash_input = None, b""
        if self.rules is not None:
            msg = rules.Message.request(method, target, headers)
            ctx = self.ctx
            ctx.tag, ctx.label = s.tag, s.label
            v = rules.evaluate(self.rules, rules.REQUEST, msg, ctx)
            if v.result in (rules.RES_BAD, rules.RES_INTERNAL):
                s.tag, s.label = v.tag, v.label
                if v.result == rules.RES_BAD:
                    raise _Abort(400, "Bad Request", label=True)
                raise _Abort(500, "Internal Server Error", label=True)
            applied = rules.apply_actions(v, msg, self.env)
            s.tag, s.label = v.tag, v.label
            if applied.log:
                s.log_items.extend(applied.log)
                self.haslog = True
            table = v.table
            hash_input = b"".join(applied.hash)
            s.log_items.append(" " + method)
            if v.result == rules.RES_DROP:
                raise _Abort(403, "Forbidden", label=True)
            items, joined, target = msg.items(), msg.joined, msg.target
        else:
            s.log_items.append(" " + method)
            items, joined = headers, hmap.get
        return items, joined, target, table, hash_input

    def _filter_response(self, resp: Response) -> tuple:
        """A response head after the response rules: (headers to send,
        their lookup by lower-case name).  Raises _Abort."""
        if self.resp_rules is not None:
            msg = rules.Message.response(resp.status, resp.headers)
            self._response_rules(msg)
            return msg.items(), msg.joined
        if self.haslog:
            self.s.log_items.append(";")
        return resp.headers, resp.hmap.get

    def _response_rules(self, msg: rules.Message) -> None:
        s = self.s
        ctx = self.ctx
        ctx.tag, ctx.label = s.tag, s.label
        v = rules.evaluate(self.resp_rules, rules.RESPONSE, msg, ctx)
        if v.result in (rules.RES_BAD, rules.RES_INTERNAL):
            s.tag, s.label = v.tag, v.label
            raise _Abort(400 if v.result == rules.RES_BAD else 500,
                         "Bad Request" if v.result == rules.RES_BAD
                         else "Internal Server Error", label=True)
        applied = rules.apply_actions(v, msg, self.env)
        s.tag, s.label = v.tag, v.label
        if applied.log:
            s.log_items.extend(applied.log)
            self.haslog = True
        if self.haslog:
            s.log_items.append(";")
        if v.result == rules.RES_DROP:
            raise _Abort(403, "Forbidden", label=True)

    async def _answer_during(self, upload, bc: ClientConn, req: Request, respond,
                             failure: list) -> None:
        """Run `upload(scope)` (which cancels `scope` when it fails) while
        the final response head comes from `bc` and `respond(resp)` passes
        it on: a backend may answer early, or first send 100 Continue.
        What the response side met goes to `failure`."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload, nursery.cancel_scope)
            try:
                resp = await self._response_head(bc, req)
                if resp is None:
                    raise _Abort(502, "Bad Gateway")
                await respond(resp)
            except (_Abort, _Close, *CLOSED) as e:
                failure.append(e)
            except HttpError:
                failure.append(_Close("done"))
            nursery.cancel_scope.cancel()

    async def _send_head(self, t: Transport, bc: ClientConn, req: Request,
                         head: bytes) -> Response | None:
        """Send a bodiless request to backend `t`; its response head, None
        if the backend closed first."""
        try:
            await t.send_all(head)
        except CLOSED:
            return None
        return await self._response_head(bc, req)

    async def _response_head(self, bc: ClientConn, req: Request) -> Response | None:
        """The final response head from `bc`, None if the backend closed
        first; 1xx interim responses go to the client (_interim(), not to
        HTTP/1.0 clients)."""
        bc.expect(req.method)
        while True:
            try:
                resp = await bc.read_response()
            except HttpError:
                raise _Abort(502, "Bad Gateway") from None
            except CLOSED:
                return None
            if resp is None:
                return None
            st = resp.status
            if 100 <= st < 200 and st != 101:
                if resp.content_length:
                    raise _Abort(502, "Bad Gateway")
                if req.version != "1.0":
                    await self._interim(resp)
                continue
            return resp


class HttpRelay(RequestFilter):
    """One HTTP session; see the module docstring."""

    def __init__(self, session) -> None:
        self._setup(session)
        client: Transport = session.client
        self.client = client
        # lenient: obs-fold continuation lines are joined (relayd.conf(5));
        # engine.http1 still refuses control characters in values, and
        # _exchange() checks the header names llhttp then lets through.
        self.conn = ServerConn(client, max_head=self.proto.http.headerlen, lenient=True,
                               passthrough=True)
        self.step = min(1.0, self.timeout / 10)
        self.backend: Transport | None = None
        self.bconn: ClientConn | None = None
        self.btable: str | None = None
        self.haslog = False
        self.sent = False        # response bytes of this exchange went out
        self.upload: _Upload | None = None     # a request body on its way
        self.scope: trio.CancelScope | None = None
        self.deadline = -math.inf

    def touch(self) -> None:
        """Some I/O happened: the idle timeout starts again.  Moving a
        deadline is not free in trio, so it moves only in steps of a tenth
        of the timeout (at most a second)."""
        deadline = trio.current_time() + self.timeout
        if deadline - self.deadline >= self.step:
            self.scope.deadline = self.deadline = deadline

    def no_deadline(self) -> None:
        self.scope.deadline = self.deadline = math.inf

    def restart_deadline(self, seconds: float) -> None:
        self.scope.deadline = self.deadline = trio.current_time() + seconds

    # -- the session -------------------------------------------------------------
    async def run(self) -> str:
        reason = "buffer event timeout"
        with trio.CancelScope() as scope:
            self.scope = scope
            self.touch()
            try:
                reason = await self._loop()
            except _Abort as a:
                self.restart_deadline(ABORT_TIME)
                reason = a.msg
                reason = await self._abort(a)
            except _Close as c:
                reason = c.reason
            except CLOSED:
                reason = "done"
        return reason

    async def _next_request(self) -> Request | None:
        conn = self.conn
        try:
            return await conn.next_request()
        except HttpError as e:
            raise _Abort(*client_error(conn, e)) from None

    async def _loop(self) -> str:
        conn = self.conn
        while True:
            # _next_request(), inline: one coroutine less per request.
            try:
                req = await conn.next_request()
            except HttpError as e:
                raise _Abort(*client_error(conn, e)) from None
            if req is None:
                return "done"
            self.touch()
            if not await self._exchange(req):
                return "done"
            self.sent = False

    async def _abort(self, a: _Abort) -> str:
        """relay_abort_http(): the error page if configured, the close reason."""
        if not self.proto.return_error or self.sent:
            return a.msg
        code = a.status
        label = self.s.label if a.label else None
        page = error_page(code, a.msg, label, self.proto.style, self.addr, self.port)
        try:
            await self.client.send_all(page)
            await self.client.send_eof()
            with trio.move_on_after(LINGER_TIME):
                got = 0
                while got < LINGER_BYTES:
                    data = await self.client.receive()
                    if not data:
                        break
                    got += len(data)
        except CLOSED:
            pass
        return f"{a.msg} ({code:03d} {REASONS.get(code, 'Unknown Error')})"

    # -- one request and its response -------------------------------------------------
    async def _exchange(self, req: Request) -> bool:
        """Relay one request and its response; True to keep the session."""
        self.sent = False
        head, body, ws, client_keep, table, hash_input = self._request_head(req)
        method = req.method
        if self.backend is not None and table != self.btable:
            await self._drop_backend()
        fresh = self.backend is None
        if fresh:
            await self._connect(table, hash_input)
        if method == "CONNECT":
            await self._connect_tunnel(req, head)      # raises _Close
        if body is None:
            resp = await self._send_head(self.backend, self.bconn, req, head)
            if resp is None and not fresh:
                # The kept-alive backend went away meanwhile: once more, anew.
                await self._drop_backend()
                await self._connect(table, hash_input)
                resp = await self._send_head(self.backend, self.bconn, req, head)
            if resp is None:
                raise _Abort(502, "Bad Gateway")
            return await self._response(req, resp, ws, client_keep)
        return await self._with_upload(req, head, body, ws, client_keep)

    def _request_head(self, req: Request) -> tuple:
        """Check a request head and run the rules on it: (head to forward,
        body (None, "chunked" or its length), WebSocket handshake, client
        keeps alive, table, hash input).  Raises _Abort."""
        method = req.method
        items, joined, target, table, hash_input = self._filter_request(req)

        # WebSocket handshakes (after the rules, on the head they produced).
        conn_tokens = _tokens(joined("connection"))
        ws = "websocket" in _tokens(joined("upgrade"))
        if ws:
            if not self.proto.http.websockets:
                raise _Abort(403, "Websocket Forbidden")
            if "upgrade" not in conn_tokens or not req.upgrade or req.has_body:
                raise _Abort(400, "Bad Websocket Request")
            if method != "GET":
                raise _Abort(405, "Websocket Method Not Allowed")
        # Another upgrade: relayed as a plain request; the parser stopped at
        # its head, so the session ends after the response.
        stopped = req.upgrade and not ws and method != "CONNECT"
        if stopped and req.has_body:
            raise _Abort(400, "malformed")

        if method in NO_BODY_METHODS:
            body = framing = None
        elif req.chunked:
            body, framing = "chunked", ("chunked", "chunked")
        elif req.content_length:
            body = req.content_length
            framing = ("length", body)
        else:
            body = framing = None
        version = req.version
        client_keep = (req.keep_alive and not req.upgrade and "close" not in conn_tokens
                       and not self.s.state.draining)   # stopping / old generation: close
        if ws or method == "CONNECT":
            connection = None
        elif not client_keep:
            connection = "Connection: close\r\n"
        elif version == "1.0":
            connection = "Connection: keep-alive\r\n"
        else:
            connection = None
        head = _build_head(f"{method} {target} HTTP/{version}\r\n", items, conn_tokens,
                           framing, connection, ws, False)
        return head, body, ws, client_keep, table, hash_input

    # -- backend connections --------------------------------------------------------------
    async def _connect(self, table: str | None, hash_input: bytes) -> None:
        self.no_deadline()                     # Session.connect has its own timeout
        try:
            backend = await self.s.connect(table, hash_input, ready=self._body_ok)
        except BackendError as e:
            bad = self.conn.pending_error()
            if bad is not None:
                # OpenBSD parses the whole read before its (non-blocking)
                # connect fails: the bad request later in it is the reason.
                raise _Abort(*client_error(self.conn, bad)) from None
            raise _Abort(e.status, e.msg) from None
        finally:
            self.restart_deadline(self.timeout)
        self.backend = backend
        self.bconn = ClientConn(backend, RESPONSE_HEAD_MAX, passthrough=True)
        self.btable = table

    def _body_ok(self) -> None:
        # A request whose body already failed to parse (later in the same
        # read) can never complete: the new backend connection gets no byte
        # of it, not even a TLS handshake (OpenBSD finds the error while
        # its connect is under way: args-https-chunked-callback).
        if self.conn.eof:
            bad = self.conn.pending_error(this_message=True)
            if bad is not None:
                raise _Abort(*client_error(self.conn, bad))

    async def _drop_backend(self) -> None:
        backend, self.backend, self.bconn = self.backend, None, None
        if backend is not None:
            backends = getattr(self.s, "backends", None)
            if backends is not None and backend in backends:
                backends.remove(backend)        # closed here, not by the dispatcher
            with trio.CancelScope(shield=True):
                try:
                    await backend.aclose()
                except Exception:
                    pass

    async def _interim(self, resp: Response) -> None:
        lines = [f"HTTP/{resp.version} {resp.status} {resp.reason}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in resp.headers if k.lower() not in HOP_BY_HOP]
        lines.append("\r\n")
        await self.client.send_all("".join(lines).encode("latin-1", "replace"))

    async def _with_upload(self, req: Request, head: bytes, body, ws: bool,
                           client_keep: bool) -> bool:
        """Send head and body while the response comes back (a backend may
        answer early, or first send 100 Continue)."""
        up = self.upload = _Upload()
        result: list = []
        failure: list[BaseException] = []

        async def upload(scope: trio.CancelScope) -> None:
            try:
                await self._pump(self.conn, self.backend, [head])
                up.done = True
            except HttpError as e:
                up.error = e
                scope.cancel()
            except CLOSED:
                pass        # the backend stopped reading; its response tells
            finally:
                up.finished.set()

        async def respond(resp: Response) -> None:
            result.append(await self._response(req, resp, ws, client_keep))

        await self._answer_during(upload, self.bconn, req, respond, failure)
        self.upload = None
        if up.error is not None:
            st, reason = client_error(self.conn, up.error)
            if up.error.msg == "body truncated":
                raise _Close("done")
            await self._drop_backend()
            raise _Abort(st, reason)
        if failure:
            raise failure[0]
        if not up.done:
            await self._drop_backend()         # the body was cut short
            return False
        return result[0]

    async def _pump(self, src, dst: Transport, pending: list[bytes],
                    unframe: bool = False) -> None:
        """Move src's current body to dst after `pending` as it came (a
        chunked one with the sender's chunk sizes); `unframe` drops the
        chunked framing.  Sends whatever is at hand in one piece."""
        events = src.events
        size = 0
        touch = self.touch
        while True:
            if pending and not events:
                await dst.send_all(b"".join(pending) if len(pending) > 1 else pending[0])
                pending = []
                size = 0
                touch()
            chunk = await src.receive_body()
            if not chunk:
                if pending:
                    await dst.send_all(b"".join(pending))
                    touch()
                return
            if unframe and type(chunk) is Framing:
                continue
            pending.append(chunk)
            size += len(chunk)
            if size >= COALESCE:
                await dst.send_all(b"".join(pending))
                pending = []
                size = 0
                touch()

    async def _response(self, req: Request, resp: Response, ws: bool,
                        client_keep: bool) -> bool:
        """Filter the response head, send it, stream its body; True when
        both sides keep the connection."""
        st = resp.status
        if st == 204 and resp.content_length:
            raise _Abort(502, "Bad Gateway")
        items, joined = self._filter_response(resp)
        conn_tokens = _tokens(joined("connection"))
        if st == 101 and not (ws and "websocket" in _tokens(joined("upgrade"))
                              and "upgrade" in conn_tokens):
            raise _Abort(502, "Bad Websocket Gateway")

        if st == 101:
            mode = "tunnel"
        elif req.method == "HEAD" or st in (204, 304) or 100 <= st < 200:
            mode = None
        elif resp.chunked:
            mode = "chunked" if req.version != "1.0" else "unchunk"
        elif resp.content_length is not None:
            mode = "length"
        else:
            mode = "eof"
        backend_keep = (mode != "eof" and mode != "unchunk" and mode != "tunnel"
                        and _keep_alive(resp.version, _tokens(resp.hmap.get("connection"))))
        keep = backend_keep and client_keep and "close" not in conn_tokens

        if mode == "chunked":
            # other codings stay announced (they are still applied)
            framing = ("chunked", resp.hmap.get("transfer-encoding") or "chunked")
        elif mode == "length":
            framing = ("length", resp.content_length)
        else:
            framing = None
        if mode == "tunnel":
            connection = None
        elif not keep:
            connection = "Connection: close\r\n"
        elif req.version == "1.0":
            connection = "Connection: keep-alive\r\n"
        else:
            connection = None
        head = _build_head(f"HTTP/{resp.version} {st} {resp.reason}\r\n", items, conn_tokens,
                           framing, connection, mode == "tunnel", mode is None)
        client = self.client
        if mode == "tunnel":
            await client.send_all(head)
            self.sent = True
            await self._tunnel(self.conn.rest, self.bconn.rest)     # raises _Close
        if mode is None:
            await client.send_all(head)
            self.sent = True
            self.touch()
        else:
            self.sent = True
            try:
                if mode == "eof":
                    await self._until_close(head)
                else:
                    await self._pump(self.bconn, client, [head], mode == "unchunk")
            except HttpError as e:
                raise _Close(client_error(self.conn, e)[1] if "chunk" in (e.msg or "").lower()
                             else "done") from None
        if not backend_keep:
            await self._drop_backend()
        return keep

    async def _until_close(self, head: bytes) -> None:
        """A response without a length: the backend's bytes go to the client
        until it closes.  The client's further requests meanwhile are read,
        filtered and forwarded on the same backend connection (as OpenBSD's
        relayd does); their answers are part of that stream."""
        failure: list[BaseException] = []

        async def forward() -> None:
            try:
                await self._forward_more()
            except (_Abort, _Close, HttpError) as e:
                failure.append(e)
                nursery.cancel_scope.cancel()
            except CLOSED:
                pass            # the backend stopped reading: its answer ends it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            try:
                await self._pump(self.bconn, self.client, [head])
            except (HttpError, *CLOSED) as e:      # raised below, not as a group
                failure.insert(0, e)
            nursery.cancel_scope.cancel()
        if failure:
            raise failure[0]

    async def _forward_more(self) -> None:
        up = self.upload
        if up is not None:
            await up.finished.wait()            # one reader of the client at a time
            if not up.done:
                return
        while True:
            req = await self._next_request()
            if req is None:
                # The client sent all it will: the backend learns it (the
                # half-close passed on, as for TCP) and may end the stream;
                # the response goes on until it does.
                try:
                    await self.backend.send_eof()
                except CLOSED:
                    pass
                return
            self.touch()
            head, body, ws, _keep, _table, _hash = self._request_head(req)
            if ws or req.upgrade or req.method == "CONNECT":
                raise _Close("done")            # no tunnel inside a stream
            await self.backend.send_all(head)
            if body is not None:
                await self._pump(self.conn, self.backend, [])

    # -- tunnels ----------------------------------------------------------------------
    async def _tunnel(self, client_pending: bytes, backend_pending: bytes) -> None:
        self.no_deadline()                      # the tunnel has its own idle timeout
        splice = self.proto.tcp.splice
        spliced = (splice and isinstance(self.client, SocketTransport)
                   and isinstance(self.backend, SocketTransport)
                   and not client_pending and not backend_pending)
        try:
            tun = await splice_relay(self.client, self.backend, idle=self.timeout,
                                     splice=splice, a_pending=client_pending,
                                     b_pending=backend_pending)
        except CLOSED:
            raise _Close("done") from None
        if tun.error == "timeout":
            raise _Close("splice timeout" if spliced else "buffer event timeout")
        raise _Close("done")

    async def _connect_tunnel(self, req: Request, head: bytes) -> None:
        """CONNECT: forward the head, relay the answer's head, then raw bytes."""
        backend = self.backend
        try:
            await backend.send_all(head)
            raw, rest = await _read_head(backend)
        except CLOSED:
            raw, rest = None, b""
        self.touch()
        if raw is None:
            raise _Abort(502, "Bad Gateway")
        parsed = _parse_response_head(raw)
        if parsed is None:
            raise _Abort(502, "Bad Gateway")
        version, status, reason, headers = parsed
        msg = rules.Message.response(status, headers)
        if self.resp_rules is not None:
            self._response_rules(msg)
        elif self.haslog:
            self.s.log_items.append(";")
        ok = 200 <= status < 300
        lines = [f"HTTP/{version} {status} {reason}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in msg.items()
                  if not (k.lower() == "connection" and not ok)]
        if not ok:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        await self.client.send_all("".join(lines).encode("latin-1", "replace"))
        self.sent = True
        if ok:
            await self._tunnel(self.conn.rest, rest)
        # A refusal: its body runs until the backend closes.
        try:
            if rest:
                await self.client.send_all(rest)
            while True:
                data = await backend.receive()
                if not data:
                    break
                self.touch()
                await self.client.send_all(data)
        except CLOSED:
            pass
        raise _Close("done")


async def _read_head(t: Transport) -> tuple[bytes | None, bytes]:
    """Read a response head raw: (head without the blank line, what followed)."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[:end], buf[end + 4:]
        if len(buf) > RESPONSE_HEAD_MAX:
            return None, b""
        data = await t.receive()
        if not data:
            return None, b""
        buf += data


def _parse_response_head(raw: bytes):
    lines = raw.decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/(1\.[01]) (\d{3})(?: (.*))?", lines[0])
    if m is None:
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or "\n" in line:
            return None
        headers.append((name, value.strip(" \t")))
    return m.group(1), int(m.group(2)), m.group(3) or "", headers


async def serve(session) -> str:
    """Serve one HTTP relay session on session.client; the close reason."""
    relay = HttpRelay(session)
    try:
        return await relay.run()
    except CLOSED:
        return "done"
    except Exception:
        log.warn_exc(f"relay_http: session {session.id}: internal error")
        return "internal error"
    finally:
        await relay._drop_backend()
