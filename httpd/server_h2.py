"""httpd.server_h2 -- httpd over HTTP/2 (extension: `listen ... http2`).

serve_h2() runs an engine.http2 connection whose streams go through the
same handle_request() as HTTP/1 requests: every stream is an H2Exchange,
whose `h2` attribute makes send_file(), abort_http() and the FastCGI job
write HEADERS and DATA frames instead of HTTP/1 bytes (send_file() and
send_page() below).  Before that, a stream whose `:authority` names a
server that the connection's TLS certificate was not chosen for gets 421
(RFC 9110 §15.5.20).

The HTTP/1 loop of server_http is untouched: the choice between the two is
made once per connection.  Does not parse HTTP/2 (engine.http2 does).
"""

from __future__ import annotations

import os

from engine import http2
from engine.conn import Transport
from httpd import server_file, server_http
from httpd.config import Connection, ServerConfig
from httpd.server_http import Exchange, ListenCtx, Worker


class H2Exchange(Exchange):
    """An Exchange answered on an HTTP/2 stream (`conn` is the stream too:
    it has the reading API and `requests` of engine.http1.ServerConn).
    server_http's send_file() and abort_http() call its h2_ methods when
    `h2` is set, so server_http never imports this module."""

    __slots__ = ("h2",)

    async def h2_send_file(self, fr: server_file.FileResponse) -> bool:
        return await send_file(self, fr)

    async def h2_send_page(self, status: int, hdrs: list[tuple[str, str]], body: bytes) -> None:
        await send_page(self, status, hdrs, body)


async def wants_h2(t: Transport, ctx: ListenCtx) -> bool:
    """HTTP/2 for this connection (engine.http2.wants_h2: ALPN, or the
    client preface on clear text within the request timeout)."""
    return await http2.wants_h2(t, ctx.tls, ctx.servers[0].connection.request_timeout)


def limits(conn: Connection) -> http2.H2Limits:
    """The HTTP/2 limits of a socket from its first server's `connection`
    settings: `max streams` at once, `max requests` streams per connection, `request timeout` for
    an idle connection, `timeout` for a stalled send."""
    return http2.H2Limits(max_streams=conn.max_streams,
                          max_requests=max(1, conn.max_requests),
                          idle_timeout=float(conn.request_timeout),
                          send_timeout=float(conn.timeout))


async def serve_h2(t: Transport, ctx: ListenCtx, worker: Worker) -> None:
    """Serve one HTTP/2 connection until it ends (server_http.serve_client's
    other half; httpd.server chooses with wants_h2())."""
    worker.next_id += 1
    worker.active += 1
    cid = worker.next_id

    async def handle(stream: http2.H2Stream) -> None:
        x = H2Exchange(t, ctx, worker, stream, cid, None)
        x.h2 = stream
        x.req = stream.req
        if stream.error is not None:
            x.method = stream.req.method
            x.version = "HTTP/2.0"
            x.path = x.log_path = stream.req.target.partition("?")[0]
            await server_http.abort_http(x, stream.error.status, stream.error.msg)
        elif not await _misdirected(x):
            await server_http.handle_request(x)
        if not stream.finished and not stream.closed:
            stream.reset(8)      # `block drop`, or a client gone mid-way: CANCEL

    conn = http2.H2ServerConn(t, ctx.h2, handle, "https" if ctx.tls else "http")
    worker.h2conns.add(conn)
    try:
        if worker.draining:
            conn.refuse()
        await conn.run()
    finally:
        worker.h2conns.discard(conn)
        worker.active -= 1
        server_http._log_close(worker, ctx.servers[0], cid, t,
                               conn.error or "done", "")


async def _misdirected(x: H2Exchange) -> bool:
    """421 for a request whose server the TLS handshake did not pick a
    certificate for (connection reuse across names, RFC 9113 §9.1.1)."""
    ctx = x.ctx
    if not ctx.tls or len(set(map(id, ctx.tls_contexts.values()))) < 2:
        return False
    host = x.req.hmap.get("host")
    try:
        srv = server_http._find_server(ctx, host)
    except Exception:
        return False          # handle_request answers the bad name
    if srv is None or ctx.tls_contexts.get(srv.id) is getattr(x.t, "context", None):
        return False
    x.method = x.req.method
    x.version = "HTTP/2.0"
    x.srv = x.conf = srv
    x.host = host
    x.path = x.log_path = x.req.target.partition("?")[0]
    await server_http.abort_http(x, 421, "misdirected request")
    return True


async def send_file(x: H2Exchange, fr: server_file.FileResponse) -> bool:
    """server_http.send_file() over HTTP/2: HEADERS, then the segments as
    DATA (read from the file: no sendfile under framing)."""
    conf: ServerConfig = x.conf
    s = x.h2
    try:
        hdrs = server_http.file_headers(x, conf, fr)
        x.status = fr.status
        x.sent = fr.length if fr.length > 0 else 0
        if conf.log.enabled:
            server_http.access_log(x)
        body = fr.segments if x.req.method != "HEAD" else []
        await s.send_head(fr.status, hdrs, end=not body)
        last = len(body) - 1
        for i, seg in enumerate(body):
            if type(seg) is bytes:
                await s.send_data(seg, i == last)
            else:
                await s.send_file(fr.fd, seg[0], seg[1], i == last)
    finally:
        if fr.fd is not None:
            os.close(fr.fd)
    return True


async def send_page(x: H2Exchange, status: int, hdrs: list[tuple[str, str]],
                    body: bytes) -> None:
    """abort_http()'s page over HTTP/2 (the connection stays)."""
    s = x.h2
    try:
        await s.send_head(status, hdrs, end=not body)
        if body:
            await s.send_data(body, True)
    except http2.StreamClosed:
        pass
