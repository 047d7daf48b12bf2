"""httpd.server_fcgi -- hand a request to a FastCGI application.

One FastCGI connection per request (as OpenBSD httpd): BEGIN_REQUEST, the
CGI/1.1 environment as PARAMS, the request body streamed as STDIN while the
STDOUT records stream back.  The CGI header block becomes the response head
(`Status:`, `Location:`, app headers); the body is passed through with the
app's Content-Length when it gives one, otherwise chunked for HTTP/1.1 and
close-delimited for HTTP/1.0.  STDERR lines go to the server's error log.

Failures before the head is sent: backend missing or refusing → 502, socket
queue full → 503, silent past `connection timeout` → 504, malformed records
or headers → 502; each logged with the backend's name.  Once the head is
out, a failure can only close the connection.

The record codec lives in httpd.fcgi; this module only does the I/O.
"""

from __future__ import annotations

import errno
import os

import trio

from engine.conn import CLOSED
from engine.http1 import HttpError, http_date
from httpd import fcgi, server_file
from httpd.config import ServerConfig
from httpd.http import SERVER_SOFTWARE

# Body chunk size for STDIN records (one record holds at most 65535 bytes).
STDIN_CHUNK = 65535
# STDOUT bytes gathered before one send to the client.
SEND_CHUNK = 65536
# Token characters kept in HTTP_* names; everything else becomes '_'.
_TOKEN_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class _Backend(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def _strip(path: str, n: int) -> str:
    if n <= 0:
        return path
    parts = path.split("/")
    rest = parts[1 + n:] if len(parts) > n + 1 else [""]
    return "/" + "/".join(rest)


def split_script(fsroot: str, path: str) -> tuple[str, str]:
    """(script path under root, PATH_INFO): the longest existing prefix."""
    cand = path
    while True:
        try:
            os.stat(fsroot + cand)
            return cand, path[len(cand):]
        except OSError:
            pass
        cut = cand.rfind("/")
        if cut <= 0:
            return path, ""
        cand = cand[:cut]


def backend_name(conf: ServerConfig) -> str:
    fc = conf.fastcgi
    if fc.host is not None:
        return f"{fc.host}:{fc.port}"
    return fc.socket or ""


def cgi_env(x, conf: ServerConfig, script: str, path_info: str) -> list[tuple[str, str]]:
    """The CGI/1.1 variables OpenBSD httpd sends (features.md §1.9)."""
    fc = conf.fastcgi
    req = x.req
    t = x.t
    root = conf.root.rstrip("/") or ""
    env: list[tuple[str, str]] = []
    docroot = _strip(root or "/", fc.strip) if fc.strip else (root or "/")
    scriptfile = _strip(root + script, fc.strip) if fc.strip else root + script
    env.append(("DOCUMENT_ROOT", docroot))
    env.append(("DOCUMENT_URI", x.path))
    env.append(("GATEWAY_INTERFACE", "CGI/1.1"))
    for name, value in req.headers:
        low = name.lower()
        if low == "content-length":
            env.append(("CONTENT_LENGTH", value))
            continue
        if low == "content-type":
            env.append(("CONTENT_TYPE", value))
            continue
        key = "".join(c if c in _TOKEN_OK else "_" for c in name.upper())
        env.append(("HTTP_" + key, value))
    if req.chunked and req.content_length is None:
        pass  # length unknown: apps read STDIN to its end
    if x.ctx.tls:
        env.append(("HTTPS", "on"))
    env.append(("PATH_INFO", path_info))
    env.append(("QUERY_STRING", x.query or ""))
    env.append(("REMOTE_ADDR", t.peer[0]))
    env.append(("REMOTE_PORT", str(t.peer[1])))
    if x.user is not None:
        env.append(("REMOTE_USER", x.user))
    env.append(("REQUEST_METHOD", req.method))
    raw_path = req.target.split("?", 1)[0] if req.target.startswith("/") else \
        server_file.url_encode(x.log_path or x.path)
    env.append(("REQUEST_URI", raw_path + ("?" + x.query if x.query else "")))
    env.append(("SCRIPT_FILENAME", scriptfile))
    env.append(("SCRIPT_NAME", script))
    env.append(("SERVER_ADDR", t.local[0]))
    env.append(("SERVER_NAME", x.srv.name))
    env.append(("SERVER_PORT", str(t.local[1])))
    env.append(("SERVER_PROTOCOL", x.version))
    env.append(("SERVER_SOFTWARE", SERVER_SOFTWARE))
    verify = x.worker.extra.get("tls_peer_verify")
    if verify is not None:
        env.append(("TLS_PEER_VERIFY", verify(x.t)))
    for name, value in fc.params:
        try:
            env.append((name, x.expand(value)))
        except Exception:
            env.append((name, value))
    return env


async def _connect(x, conf: ServerConfig) -> trio.abc.Stream:
    fc = conf.fastcgi
    try:
        if fc.host is not None:
            return await trio.open_tcp_stream(fc.host, fc.port)
        return await trio.open_unix_socket(x.worker.fs(fc.socket))
    except OSError as e:
        if e.errno == errno.EAGAIN:
            raise _Backend(503, f"connect: {e.strerror}") from None
        raise _Backend(502, f"connect: {e.strerror or e}") from None


def _error_log(x, conf: ServerConfig, msg: str) -> None:
    lc = conf.log
    if lc.enabled:
        x.worker.logs.write(lc.error, f"server {x.srv.name}, fastcgi {backend_name(conf)}: {msg}",
                            lc.syslog)


async def serve(x, conf: ServerConfig) -> bool:
    """Answer the request through FastCGI; True to keep the connection."""
    from httpd import server_http   # the caller's module: head building, logs
    fsroot = x.worker.fs(conf.root.rstrip("/"))
    stripped = _strip(x.path, conf.strip)
    script, path_info = split_script(fsroot, stripped)
    env = cgi_env(x, conf, script, path_info)
    timeout = conf.connection.timeout
    head_sent = False
    stream = None
    try:
        with trio.fail_after(timeout):
            stream = await _connect(x, conf)
            await stream.send_all(fcgi.begin_request() + fcgi.encode_params(env))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_stdin, x, conf, stream, timeout)
            head_sent = await _relay_stdout(x, conf, stream, timeout, server_http)
            nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        _error_log(x, conf, "timeout")
        if not head_sent:
            raise HttpError(504, "fastcgi timeout") from None
        x.keep = False
    except _Backend as e:
        _error_log(x, conf, e.msg)
        if not head_sent:
            raise HttpError(e.status, e.msg) from None
        x.keep = False
    except fcgi.FcgiError as e:
        _error_log(x, conf, f"malformed response: {e}")
        if not head_sent:
            raise HttpError(502, "malformed fastcgi response") from None
        x.keep = False
    except CLOSED:
        # The client went away: closing the backend connection aborts the
        # request there (slowcgi, php-fpm and flup all stop on EOF).
        x.keep = False
        if not head_sent:
            raise
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
    server_http.access_log(x)
    return x.keep


async def _pump_stdin(x, conf: ServerConfig, stream, timeout: float) -> None:
    limit = conf.connection.max_request_body
    total = 0
    req = x.req
    if req.has_body:
        while True:
            with trio.fail_after(timeout):
                chunk = await x.conn.receive_body()
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise HttpError(413, "request body too large")
            try:
                await stream.send_all(fcgi.stdin(chunk))
            except CLOSED:
                return   # the app stopped reading; its answer decides
    try:
        await stream.send_all(fcgi.stdin(b""))
    except CLOSED:
        pass


async def _relay_stdout(x, conf: ServerConfig, stream, timeout: float, server_http) -> bool:
    """Read records until END_REQUEST; returns True once the head was sent."""
    reader = fcgi.RecordReader()
    hparser = fcgi.CgiHeaderParser()
    head = None
    chunked = False
    close_delim = False
    remaining = None
    out = bytearray()
    head_sent = False
    t = x.t
    is_head = x.req.method == "HEAD"
    ended = False
    while not ended:
        with trio.fail_after(timeout):
            try:
                data = await stream.receive_some(65536)
            except CLOSED as e:
                raise _Backend(502, f"read: {e}") from None
        if not data:
            reader.eof()
            if head is None:
                raise _Backend(502, "connection closed before the response headers")
            break
        for rec in reader.feed(data):
            if rec.type == fcgi.STDOUT and rec.content:
                body = rec.content
                if head is None:
                    head, body = hparser.feed(body)
                    if head is None:
                        continue
                    hdr_bytes, chunked, close_delim, remaining = _response_head(x, conf, head, server_http)
                    out += hdr_bytes
                    if is_head:
                        await t.send_all(bytes(out))
                        out.clear()
                        head_sent = True
                if body and not is_head:
                    x.sent += len(body)
                    if chunked:
                        out += b"%x\r\n" % len(body) + body + b"\r\n"
                    else:
                        out += body
                if len(out) >= SEND_CHUNK or (head is not None and not head_sent):
                    await t.send_all(bytes(out))
                    out.clear()
                    head_sent = True
            elif rec.type == fcgi.STDERR and rec.content:
                for line in rec.content.decode("utf-8", "replace").splitlines():
                    if line.strip():
                        _error_log(x, conf, line)
            elif rec.type == fcgi.END_REQUEST:
                ended = True
                break
    if head is None:
        raise _Backend(502, "no response headers")
    if chunked and not is_head:
        out += b"0\r\n\r\n"
    if out:
        await t.send_all(bytes(out))
    if close_delim:
        x.keep = False
    return True


def _response_head(x, conf: ServerConfig, head: fcgi.CgiHead, server_http):
    status = head.status
    x.status = status
    app = head.headers
    names = {k.lower() for k, _ in app}
    no_body = status in (204, 304) or 100 <= status < 200
    has_cl = "content-length" in names
    chunked = False
    close_delim = False
    if not no_body and not has_cl:
        if x.version == "HTTP/1.1" and x.req.method != "HEAD":
            chunked = True
        elif x.req.method != "HEAD":
            close_delim = True
            x.keep = False
    hdrs: list[tuple[str, str]] = []
    if conf.banner:
        hdrs.append(("Server", x.worker.server_name))
    hdrs.append(("Connection", "keep-alive" if x.keep else "close"))
    for k, v in app:
        low = k.lower()
        if low in ("connection", "transfer-encoding", "keep-alive"):
            continue
        hdrs.append((k, v))
    if chunked:
        hdrs.append(("Transfer-Encoding", "chunked"))
    hdrs.extend(server_http._hsts(x, conf))
    if "date" not in names:
        hdrs.append(("Date", http_date()))
    hdrs = server_http._custom_headers(conf, hdrs, error=status >= 400)
    return server_http.build_head(status, x.version, hdrs), chunked, close_delim, None
