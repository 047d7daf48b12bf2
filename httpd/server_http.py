"""httpd.server_http -- one client connection: the keep-alive loop.

Reads requests (engine.http1), canonicalises the path, picks the virtual
server and location (httpd.route), applies rewrite, body limit, block and
authentication, then hands the request to server_file or server_fcgi and
writes the response head.  Every client-visible failure goes through
abort_http(), which writes the error page (built-in, or from errdocs),
logs, and closes, as OpenBSD's server_abort_http().

Does not bind, accept, or open log files: httpd.server gives it a Worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import jinja2
import trio

from engine import http2
from engine.conn import CLOSED, Transport
from engine.http1 import (MAX_HEAD, REASONS, HttpError, Request,
                          ServerConn, http_date)
from engine.serve import Timer
from httpd import auth, logger, route, server_file
from httpd.config import HttpdConfig, ServerConfig
from httpd.http import METHODS, SERVER_SOFTWARE
from shared import log

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("httpd", "templates"),
    autoescape=True, keep_trailing_newline=True)
_error_page = _templates.get_template("error.html")
_error_cache: dict[tuple[int, bool], bytes] = {}


@dataclass
class ListenCtx:
    """What a listening socket serves: its servers, in config order."""
    gconf: HttpdConfig
    servers: list[ServerConfig]
    port: int
    tls: bool = False
    # Host header -> server (route.find_server is pure): filled per request.
    hosts: dict = field(default_factory=dict, compare=False, repr=False)
    # `listen ... http2` (extension): the socket's HTTP/2 limits, else None.
    h2: http2.H2Limits | None = None
    # Server id -> the TLS context serving its names (421 over HTTP/2).
    tls_contexts: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Worker:
    """Per-process state shared by all connections of a server process."""
    prefix: str                        # chroot dir when not chrooted, else ""
    logs: logger.Logs
    fcgi: object = None                # httpd.server_fcgi module, when loaded
    active: int = 0
    next_id: int = 0
    server_name: str = SERVER_SOFTWARE
    extra: dict = field(default_factory=dict)
    draining: bool = False             # stopping: answer, then close (no reset)
    exists: object = None              # `location found` test (see _exists)
    h2conns: set = field(default_factory=set)   # HTTP/2 connections (GOAWAY on stop)
    # HTTP/1 connections waiting for a request head (idle keep-alive ones
    # too), longest waiting first: cid -> Timer.  evict_reader() closes
    # the first when the worker is full and a client waits.
    reading: dict = field(default_factory=dict)
    # Built-in ACME: http-01 answers the parent pushed, token -> (key
    # authorization, the domain's names); see acme_answer().
    acme_tokens: dict = field(default_factory=dict)

    def fs(self, path: str) -> str:
        """A config path (relative to the chroot) on the real file system."""
        return self.prefix + path if self.prefix else path

    def evict_reader(self) -> None:
        """The worker is at SERVER_MAX_CLIENTS and a client waits to be
        accepted: close the connection that has waited longest for its
        request head (a slow-header client, or an idle keep-alive one),
        as nginx reuses idle connections when it runs out of them.  The
        request timeout is an inactivity timeout (as OpenBSD's), so
        without this 1,024 slowloris clients would hold a worker."""
        if self.reading:
            cid = next(iter(self.reading))
            self.reading.pop(cid).fire(EVICTED)


class Exchange:
    """One request in flight: everything the loggers and macros need."""

    __slots__ = ("t", "req", "conn", "srv", "conf", "path", "query", "user",
                 "captures", "status", "sent", "keep", "host", "method",
                 "version", "ctx", "worker", "cid", "log_path", "close_msg",
                 "orig_query", "timer")

    def __init__(self, t: Transport, ctx: ListenCtx, worker: Worker,
                 conn: ServerConn | None = None, cid: int = 0,
                 timer: Timer | None = None) -> None:
        self.t = t
        self.ctx = ctx
        self.worker = worker
        self.conn = conn
        self.cid = cid
        self.timer = timer
        self.req: Request | None = None
        self.srv: ServerConfig = ctx.servers[0]
        self.conf: ServerConfig = self.srv
        self.path: str | None = None
        self.log_path: str | None = None   # as requested, before index/rewrite
        self.query: str | None = None
        self.user: str | None = None
        self.captures: list[str] | None = None
        self.status = 0
        self.sent = 0
        self.keep = False
        self.host: str | None = None
        self.method: str | None = None
        self.version: str | None = None
        self.close_msg: str | None = None  # why the connection closes, for the log
        self.orig_query: str | None = None  # query as requested (path: log_path)

    # The HTTP/2 stream answering the request (server_h2.H2Exchange, whose
    # h2_send_file() and h2_send_page() then answer); None over HTTP/1 (a
    # class attribute: no store per HTTP/1 request).
    h2: http2.H2Stream | None = None

    # -- macros (server_expand_http) -------------------------------------
    def log_failed_line(self, line: tuple[str, str, str | None] | None) -> None:
        """Log a request that failed to parse with what its request line
        gave (`"GET /" 400 0` for a line without a version, as OpenBSD)."""
        if line is None:
            return
        self.method, target, version = line
        self.version = "HTTP/" + version if version else None
        path, q, query = target.partition("?")
        self.path = path
        self.orig_query = query if q else None

    def macros(self) -> dict[str, str]:
        # Path and query as requested (http_path, http_query), not as a
        # `request rewrite` or an index file changed them (the aliases).
        enc = server_file.url_encode
        t = self.t
        path = self.log_path if self.log_path is not None else self.path
        query = self.orig_query
        vals = {
            "DOCUMENT_URI": enc(path or ""),
            "QUERY_STRING": query or "",
            "QUERY_STRING_ENC": enc(query or ""),
            "REMOTE_ADDR": t.peer[0],
            "REMOTE_PORT": str(t.peer[1]),
            "REMOTE_USER": enc(self.user) if self.user else "",
            "REQUEST_URI": enc(path or "") + ("?" + query if query is not None else ""),
            "REQUEST_SCHEME": "https" if self.ctx.tls else "http",
            "SERVER_ADDR": t.local[0],
            "SERVER_PORT": str(t.local[1]),
            "SERVER_NAME": enc(self.srv.name),
        }
        if self.host is not None:
            vals["HTTP_HOST"] = enc(self.host)
        return vals

    def expand(self, template: str) -> str:
        return route.expand(template, self.macros(), self.captures, server_file.url_encode)


# Timed phases of a connection (engine.serve.Timer): reading a request
# (`request timeout`, restarted by every read) and sending a file response
# (`connection timeout` for the whole send).
READING = "read"
SENDING = "send"
EVICTED = "evicted"     # closed to make room (Worker.evict_reader)


async def serve_client(t: Transport, ctx: ListenCtx, worker: Worker) -> None:
    """Serve one HTTP/1 connection until it closes (the engine's handler,
    through httpd.server, which hands HTTP/2 ones to server_h2)."""
    worker.next_id += 1
    worker.active += 1
    cid = worker.next_id
    primary = ctx.servers[0]
    conn = ServerConn(t, max_head=MAX_HEAD, lenient=True, httpd_rules=True)
    reason = "done"          # the close message of server_close()
    summary: list[str] = []
    srv_for_log = primary
    # Until a Host header picks a server, the first server's request timeout
    # applies; later the one of the server that answered the last request.
    timeout = primary.connection.request_timeout
    timer: Timer | None = None
    x: Exchange | None = None
    try:
        # One cancel scope for the whole connection, cancelled by the timer
        # of the phase that timed out (no scope per request: see Timer).
        with trio.CancelScope() as scope:
            timer = Timer(scope)
            # An inactivity timeout, as libevent's: every read restarts it.
            conn.on_data = timer.restart
            while True:
                x = Exchange(t, ctx, worker, conn, cid, timer)
                timer.arm(timeout, READING)
                worker.reading[cid] = timer
                try:
                    req = await conn.next_request()
                except HttpError as e:
                    worker.reading.pop(cid, None)
                    timer.disarm()
                    x.log_failed_line(conn.failed_line())
                    # An invalid Content-Length is 400 here; OpenBSD
                    # answers 500 (strtonum() failure), which is a bug.
                    await abort_http(x, e.status, e.msg or "malformed", log_req=True)
                    reason = x.close_msg
                    break
                worker.reading.pop(cid, None)
                timer.disarm()
                if req is None:
                    reason = "closed"
                    break
                x.req = req
                keep = await handle_request(x)
                srv_for_log = x.srv
                timeout = x.srv.connection.request_timeout
                if x.conf.log.style == "connection" and x.log_path is not None:
                    summary.append(f" [{server_file.url_encode(x.log_path)}]")
                if not keep:
                    reason = x.close_msg or "done"
                    break
        if scope.cancelled_caught:
            if timer.fired is EVICTED:
                reason = "server full"
            elif timer.fired is READING:
                # server_error(): 408 if a request was partly read, else
                # the idle connection is just closed.
                if conn.head_started():
                    await abort_http(x, 408, "timeout", log_req=True)
                    reason = x.close_msg
                else:
                    reason = "timeout"
            else:
                # The response did not go out in time (send_file).
                x.keep = False
                x.close_msg = "timeout"
                srv_for_log = x.srv
                if x.conf.log.style == "connection" and x.log_path is not None:
                    summary.append(f" [{server_file.url_encode(x.log_path)}]")
                reason = "timeout"
    except CLOSED:
        reason = "buffer event error"
    finally:
        worker.reading.pop(cid, None)
        if timer is not None:
            timer.close()
        worker.active -= 1
        _log_close(worker, srv_for_log, cid, t, reason, "".join(summary))


def _log_close(worker: Worker, srv: ServerConfig, cid: int, t: Transport,
               reason: str, summary: str) -> None:
    """server_log(): the per-connection line (access log in `connection`
    style, else the error log at -vv)."""
    lc = srv.log
    if not lc.enabled:
        return
    if lc.style == "connection":
        line = logger.format_conn(srv.name, cid, worker.active + 1, t.peer,
                                  local_host(t.local), reason, summary)
        worker.logs.write(lc.access, line, lc.syslog)
    elif log.get_verbose() > 1:
        line = logger.format_conn(srv.name, cid, worker.active + 1, t.peer,
                                  local_host(t.local), reason)
        worker.logs.write(lc.error, line, lc.syslog)


def _exists(worker: Worker):
    fn = worker.exists
    if fn is None:
        def fn(conf: ServerConfig, path: str) -> bool:
            full = worker.fs(conf.root) + server_file_strip(path, conf.strip)
            return os.access(full, os.R_OK, effective_ids=True)
        worker.exists = fn
    return fn


# Bounded memo caches of pure per-request functions (request paths and Host
# values come from clients: never let them grow without limit).
CACHE_MAX = 1024
_paths: dict[str, str] = {}


def _canonical(raw_path: str) -> str:
    """route.canonicalize_path(route.url_decode(raw_path)), memoised;
    raises route.RouteError (not memoised)."""
    path = _paths.get(raw_path)
    if path is None:
        path = route.canonicalize_path(route.url_decode(raw_path))
        if len(raw_path) <= route.MEMO_KEY_MAX:
            if len(_paths) >= CACHE_MAX:
                _paths.clear()
            _paths[raw_path] = path
    return path


_NO_SERVER = object()


def _find_server(ctx: ListenCtx, host: str | None) -> ServerConfig | None:
    """route.find_server() for this socket, memoised per Host value;
    raises route.RouteError (not memoised)."""
    hosts = ctx.hosts
    srv = hosts.get(host)
    if srv is None:
        srv = route.find_server(ctx.servers, host, ctx.port)
        if host is None or len(host) <= route.MEMO_KEY_MAX:
            if len(hosts) >= CACHE_MAX:
                hosts.clear()
            hosts[host] = srv if srv is not None else _NO_SERVER
        return srv
    return srv if srv is not _NO_SERVER else None


_local_hosts: dict[tuple[str, int], str] = {}


def local_host(local: tuple[str, int]) -> str:
    """`ip[:port]` of a local address, port 80 omitted, IPv6 in brackets."""
    s = _local_hosts.get(local)
    if s is None:
        ip, port = local
        if port == 80:
            s = ip
        else:
            s = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        if len(_local_hosts) < CACHE_MAX:   # our own addresses: a few
            _local_hosts[local] = s
    return s


def server_file_strip(path: str, n: int) -> str:
    if n <= 0:
        return path
    parts = path.split("/")
    # parts[0] is "" (path starts with '/')
    rest = parts[1 + n:] if len(parts) > n + 1 else [""]
    return "/" + "/".join(rest)


async def handle_request(x: Exchange) -> bool:
    """Answer one request; True to keep the connection for another one."""
    req = x.req
    ctx = x.ctx
    x.method = req.method
    x.version = "HTTP/" + req.version
    try:
        if req.method not in METHODS:
            raise HttpError(400, "invalid method")
        if req.method in ("TRACE", "CONNECT") and "content-length" in req.hmap:
            raise HttpError(400, "malformed")     # these never carry a body
        target = req.target
        if req.method == "CONNECT" or not target.startswith("/"):
            # absolute-form: take the path; authority-form is not for us
            if target.startswith(("http://", "https://")):
                rest = target.split("://", 1)[1]
                target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
            else:
                raise HttpError(400, "malformed")
        raw_path, sep, query = target.partition("?")
        x.query = x.orig_query = query if sep else None
        try:
            x.path = _canonical(raw_path)
        except route.RouteError as e:
            x.log_path = raw_path            # logged as received (encoded)
            raise HttpError(400, str(e)) from None
        x.log_path = x.path
        x.keep = req.keep_alive and not req.upgrade
        x.host = req.hmap.get("host")
        try:
            srv = _find_server(ctx, x.host)
        except route.RouteError as e:
            raise HttpError(400, str(e)) from None
        if srv is None:
            # No server matched (or no Host): the socket's first server, and
            # $HTTP_HOST becomes the local address (server_http_host()).
            srv = ctx.servers[0]
            x.host = local_host(x.t.local)
        x.srv = srv
        if x.conn.requests >= srv.connection.max_requests or x.worker.draining:
            x.keep = False
        if x.worker.acme_tokens and not ctx.tls:
            fr = acme_answer(x)
            if fr is not None:
                return await send_file(x, fr)
        if srv.locations:
            exists = _exists(x.worker)
            conf, loc, caps = route.find_location(srv, x.path, exists)
            x.conf, x.captures = conf, caps
        else:
            conf = x.conf = srv
        rewritten = bool(conf.rewrite)
        if rewritten:
            try:
                newpath = x.expand(conf.rewrite)
                newpath, sep, q = newpath.partition("?")
                x.query = q if sep else None
                x.path = route.canonicalize_path(newpath)
            except route.RouteError as e:
                raise HttpError(400, str(e)) from None
            log.debug(f"rewrote {raw_path} -> {x.path}")
            conf, loc, caps = route.find_location(srv, x.path, _exists(x.worker))
            x.conf = conf
            if caps is not None:
                x.captures = caps
        if req.content_length is not None and req.content_length > conf.connection.max_request_body:
            raise HttpError(413, "request body too large")
        # A rewritten path is an alias: a directory there is a 500, as in
        # server_file_access() (no redirect, no index).
        if conf.auth is None and (conf.block is None or conf.block.action == "pass"):
            # dispatch()'s file and FastCGI cases, without its coroutine.
            x.conf = conf
            if conf.fastcgi is not None and x.worker.fcgi is not None:
                return await x.worker.fcgi.serve(x, conf)
            if conf.fastcgi is None:
                result = server_file.serve(conf, ctx.gconf, x.worker.prefix, x.path, x.query,
                                           req.method, req.hmap, False, rewritten)
                if type(result) is server_file.FileResponse:
                    return await send_file(x, result)
                return await _file_result(x, conf, result, 0)
        return await dispatch(x, conf, False, 0, rewritten)
    except HttpError as e:
        await abort_http(x, e.status, e.msg, extra=e.headers)
        return False


ACME_PATH = "/.well-known/acme-challenge/"   # RFC 8555 section 8.3


def acme_answer(x: Exchange) -> server_file.FileResponse | None:
    """The key authorization for `GET /.well-known/acme-challenge/TOKEN`
    on a plain-HTTP socket, when the parent published TOKEN for a domain
    that has the Host's name; None: route the request as usual."""
    if not x.path.startswith(ACME_PATH) or x.req.method not in ("GET", "HEAD"):
        return None
    entry = x.worker.acme_tokens.get(x.path[len(ACME_PATH):])
    host = x.req.hmap.get("host")      # as sent: x.host may be the local address
    if entry is None or host is None:
        return None
    keyauth, names = entry
    host = host.lower()
    if not host.startswith("["):
        host = host.partition(":")[0]
    if host.rstrip(".") not in names:
        return None
    body = keyauth.encode()
    x.conf = x.srv
    return server_file.FileResponse(200, [("Content-Type", "text/plain")], len(body),
                                    [body] if x.req.method == "GET" else [])


async def dispatch(x: Exchange, conf: ServerConfig, index_dir: bool, depth: int = 0,
                   alias: bool = False) -> bool:
    """block / auth / FastCGI / file for the effective `conf`."""
    x.conf = conf
    blk = conf.block
    if blk is not None and blk.action != "pass":
        if blk.action == "drop":
            x.status = 0
            x.keep = False
            x.close_msg = "dropped"      # no page, no access log line
            return False
        await abort_http(x, blk.code, blk.uri)
        return False
    if conf.auth is not None:
        path = x.worker.fs(conf.auth.htpasswd)
        hdr = x.req.hmap.get("authorization")
        user = await trio.to_thread.run_sync(auth.check, path, hdr)
        if user is None:
            cred = auth.credentials(hdr)
            x.user = cred[0] if cred else None    # logged like OpenBSD
            await abort_http(x, 401, conf.auth.realm)
            return False
        x.user = user
    if conf.fastcgi is not None:
        fcgi = x.worker.fcgi
        if fcgi is None:
            raise HttpError(500, "fastcgi not available")
        return await fcgi.serve(x, conf)
    result = server_file.serve(conf, x.ctx.gconf, x.worker.prefix, x.path, x.query,
                               x.req.method, x.req.hmap, index_dir, alias)
    if type(result) is server_file.FileResponse:
        return await send_file(x, result)
    return await _file_result(x, conf, result, depth)


async def _file_result(x: Exchange, conf: ServerConfig, result, depth: int) -> bool:
    """dispatch()'s answer to what server_file.serve() returned, other
    than a FileResponse (the callers send those without this coroutine)."""
    if isinstance(result, server_file.Redirect):
        await abort_http(x, 301, result.location)
        return False
    if isinstance(result, server_file.InternalRedirect):
        if depth > 2:
            raise HttpError(500, "index loop")
        x.path = result.path
        newconf, loc, caps = route.find_location(x.srv, x.path, _exists(x.worker))
        if newconf is not conf:
            if caps is not None:
                x.captures = caps
            # Another location (e.g. `*.php` → FastCGI): its own rules, and
            # a missing index there is its 404, not this directory's index.
            return await dispatch(x, newconf, index_dir=False, depth=depth + 1, alias=True)
        return await dispatch(x, conf, index_dir=True, depth=depth + 1)
    return await send_file(x, result)


def _custom_headers(conf: ServerConfig, base: list[tuple[str, str]], error: bool
                    ) -> list[tuple[str, str]]:
    """Apply `header set|add|remove` to the built-in headers."""
    if not conf.headers:
        return base
    out = list(base)
    if error:
        # server_abort_http() only appends the `always` set/add headers
        # (get_always_custom_headers()): nothing is replaced or removed.
        out.extend((h.name, h.value) for h in conf.headers
                   if h.always and h.op != "remove")
        return out
    for h in conf.headers:
        low = h.name.lower()
        if h.op == "remove":
            out = [kv for kv in out if kv[0].lower() != low]
        elif h.op == "set":
            out = [kv for kv in out if kv[0].lower() != low]
            out.append((h.name, h.value))
        else:
            out.append((h.name, h.value))
    return out


def _hsts(x: Exchange, conf: ServerConfig) -> list[tuple[str, str]]:
    h = conf.hsts
    if h is None or not x.ctx.tls:
        return []
    val = f"max-age={h.max_age}"
    if h.subdomains:
        val += "; includeSubDomains"
    if h.preload:
        val += "; preload"
    return [("Strict-Transport-Security", val)]


def build_head(status: int, version: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{version} {status} {REASONS.get(status, 'Unknown')}\r\n"]
    for k, v in headers:
        lines.append(f"{k}: {v}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1", "replace")


_head_starts: dict[tuple, str] = {}
_date_line = ["", ""]       # http_date() and its last header line


def _file_head(x: Exchange, conf: ServerConfig, fr: server_file.FileResponse) -> bytes:
    """send_file()'s head when no `header` action and no HSTS applies: the
    bytes build_head() makes of the same list, in one string (status line,
    Server and Connection come from a cache, Date from a per-second one)."""
    status = fr.status
    server = x.worker.server_name if conf.banner else None
    key = (x.version, status, server, x.keep)
    start = _head_starts.get(key)
    if start is None:
        start = (f"{x.version} {status} {REASONS.get(status, 'Unknown')}\r\n"
                 + (f"Server: {server}\r\n" if server is not None else "")
                 + ("Connection: keep-alive\r\n" if x.keep else "Connection: close\r\n"))
        if len(_head_starts) < CACHE_MAX:
            _head_starts[key] = start
    ctype = None
    rest = ""
    for k, v in fr.headers:
        if k == "Content-Type":
            ctype = v
        else:
            rest += f"{k}: {v}\r\n"
    date = http_date()
    if date is not _date_line[0]:
        _date_line[0] = date
        _date_line[1] = f"Date: {date}\r\n\r\n"
    head = (start
            + (f"Content-Type: {ctype}\r\n" if ctype is not None else "")
            + (f"Content-Length: {fr.length}\r\n" if fr.length >= 0 else "")
            + rest + _date_line[1])
    return head.encode("latin-1", "replace")


def file_headers(x: Exchange, conf: ServerConfig, fr: server_file.FileResponse
                 ) -> list[tuple[str, str]]:
    """send_file()'s header list (`header` actions and HSTS applied)."""
    hdrs: list[tuple[str, str]] = []
    if conf.banner:
        hdrs.append(("Server", x.worker.server_name))
    hdrs.append(("Connection", "keep-alive" if x.keep else "close"))
    ctype = None
    rest = []
    for k, v in fr.headers:
        if k == "Content-Type":
            ctype = v
        else:
            rest.append((k, v))
    if ctype is not None:
        hdrs.append(("Content-Type", ctype))
    if fr.length >= 0:
        hdrs.append(("Content-Length", str(fr.length)))
    hdrs.extend(rest)
    hdrs.extend(_hsts(x, conf))
    hdrs.append(("Date", http_date()))
    return _custom_headers(conf, hdrs, error=False)


async def send_file(x: Exchange, fr: server_file.FileResponse) -> bool:
    if x.h2 is not None:
        return await x.h2_send_file(fr)          # server_h2.H2Exchange
    conf = x.conf
    t = x.t
    try:
        if not conf.headers and (conf.hsts is None or not x.ctx.tls):
            head = _file_head(x, conf, fr)
        else:
            head = build_head(fr.status, x.version, file_headers(x, conf, fr))
        x.status = fr.status
        # Logged before sending, with the Content-Length as the size (also
        # for HEAD), as server_response_http() does.
        x.sent = fr.length if fr.length > 0 else 0
        if conf.log.enabled:
            access_log(x)
        body = fr.segments if x.req.method != "HEAD" else []
        timer = x.timer
        if timer is None:
            with trio.fail_after(conf.connection.timeout):
                await _send_body(t, head, body, fr.fd)
        else:
            # The connection's timer, not a cancel scope per response: if it
            # fires, serve_client ends the connection as the except below.
            timer.arm(conf.connection.timeout, SENDING)
            if len(body) == 1 and type(body[0]) is bytes:
                await t.send_all(head + body[0])      # one send for small files
            else:
                await _send_body(t, head, body, fr.fd)
            timer.disarm()
    except trio.TooSlowError:
        x.keep = False
        x.close_msg = "timeout"
        return False
    finally:
        if fr.fd is not None:
            os.close(fr.fd)
    return x.keep


async def _send_body(t: Transport, head: bytes, body: list, fd: int | None) -> None:
    if not body:
        await t.send_all(head)
    elif len(body) == 1 and type(body[0]) is bytes:
        await t.send_all(head + body[0])          # one send for small files
    else:
        # The head waits for the body's first bytes (MSG_MORE) instead of
        # going out as a segment of its own.
        await t.send_more(head)
        for seg in body:
            if type(seg) is bytes:
                await t.send_all(seg)
            else:
                off, cnt = seg
                await t.sendfile(fd, off, cnt)


def access_log(x: Exchange) -> None:
    conf = x.conf
    lc = conf.log
    if not lc.enabled or lc.style == "connection":
        return
    hm = x.req.hmap if x.req is not None else {}
    line = logger.format_access(
        lc.style, x.srv.name, x.t.peer[0], x.user, x.method,
        x.log_path if x.log_path is not None else x.path, x.orig_query,
        x.version, x.status, x.sent, referer=hm.get("referer"),
        agent=hm.get("user-agent"), xff=hm.get("x-forwarded-for"),
        xfport=hm.get("x-forwarded-port"), encode=server_file.url_encode)
    x.worker.logs.write(lc.access, line, lc.syslog)


def _read_errdoc(x: Exchange, status: int) -> str | None:
    conf = x.conf
    if not conf.errdocs:
        return None
    base = x.worker.fs(conf.errdocs)
    for name in (f"{status}.html", "err.html"):
        try:
            with open(os.path.join(base, name), encoding="utf-8", errors="replace") as f:
                body = f.read()
        except OSError:
            continue
        body = body.replace("$HTTP_ERROR", REASONS.get(status, ""))
        body = body.replace("$RESPONSE_CODE", str(status))
        body = body.replace("$SERVER_SOFTWARE", x.worker.server_name if conf.banner else "")
        return body
    return None


def error_body(status: int, banner: bool, software: str = SERVER_SOFTWARE) -> bytes:
    key = (status, banner)
    body = _error_cache.get(key)
    if body is None:
        body = _error_page.render(code=status, reason=REASONS.get(status, ""),
                                  banner=software if banner else None).encode()
        _error_cache[key] = body
    return body


async def abort_http(x: Exchange, status: int, msg: str | None = "",
                     extra: list[tuple[str, str]] | None = None,
                     log_req: bool = False) -> None:
    """Send the error page for `status` and mark the connection to close."""
    conf = x.conf
    x.keep = False
    x.status = status
    hdrs: list[tuple[str, str]] = [("Date", http_date())]
    if conf.banner:
        hdrs.append(("Server", x.worker.server_name))
    hdrs.append(("Connection", "close"))
    hdrs.append(("Content-Type", "text/html"))
    body = b""
    extra_h: list[tuple[str, str]] = list(extra or [])
    reason = REASONS.get(status, "Unknown Error")
    x.close_msg = f"{msg or chr(34) * 2} ({status:03d} {reason})"
    if status in (301, 302, 303, 307, 308) and msg:
        try:
            msg = x.expand(msg)
        except route.RouteError:
            access_log_safe(x)
            return   # OpenBSD: expansion failure just closes
        extra_h.append(("Location", msg))
        x.close_msg = f"{msg} ({status:03d} {reason})"
    elif status == 401 and msg is not None:     # `block return 401`: none
        realm = msg.replace("\\", "\\\\").replace('"', '\\"')   # stravis(VIS_DQ)
        extra_h.append(("WWW-Authenticate", f'Basic realm="{realm}"'))
    if not (100 <= status < 200 or status == 204):
        doc = _read_errdoc(x, status)
        body = doc.encode("utf-8", "replace") if doc is not None else \
            error_body(status, conf.banner, x.worker.server_name)
        hdrs.append(("Content-Length", str(len(body))))
    hdrs.extend(extra_h)
    hdrs.extend(_hsts(x, conf))
    hdrs = _custom_headers(conf, hdrs, error=True)
    if x.req is not None and x.req.method == "HEAD":
        body = b""
    if x.h2 is not None:
        await x.h2_send_page(status, hdrs, body)   # server_h2.H2Exchange
        access_log_safe(x)
        return
    head = build_head(status, "HTTP/1.0", hdrs)
    try:
        with trio.move_on_after(conf.connection.timeout):
            await x.t.send_all(head + body)
    except CLOSED:
        pass
    access_log_safe(x)


def access_log_safe(x: Exchange) -> None:
    x.sent = 0
    try:
        access_log(x)
    except Exception as e:   # logging must never break a connection
        log.warn(f"access log: {e!r}")
