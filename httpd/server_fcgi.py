"""httpd.server_fcgi -- hand a request to a FastCGI application.

One FastCGI connection per request, as OpenBSD's server_fcgi.c: a
BEGIN_REQUEST (responder, id 1), the CGI/1.1 environment as PARAMS, the
request body streamed as STDIN (Content-Length or de-chunked, never
buffered whole) while the STDOUT records stream back to the client.

The CGI header block becomes the response head (`Status:` sets the code,
`Location:` alone means 302, other headers are copied).  The head goes out
with the first body bytes or at the end, so an empty body is answered with
`Content-Length: 0`; otherwise the app's Content-Length is passed through
when it gives one, else the body is chunked for HTTP/1.1 and delimited by
the close for HTTP/1.0.  HEAD gets the head only.  STDERR lines go to the
server's error log.

Failures before the head is sent become error pages: backend missing or
refusing → 502, UNIX socket queue full → 503, silent past `connection
timeout` → 504, malformed records or headers, or no headers at all → 502;
each is logged with the backend's name.  Once the head is out a failure can
only close the connection.  A client that goes away aborts the FastCGI
request by closing the backend connection.

The record codec lives in httpd.fcgi; this module does the I/O and the HTTP
side, and never parses a request (server_http does).
"""

from __future__ import annotations

import _socket
import errno
import os
import socket

import trio

from engine.conn import CLOSED, close_socket
from engine.http1 import REASONS, HttpError, http_date
from engine.serve import Timer
from engine.trio_private import wait_readable_new
from httpd import fcgi, route, server_http
from httpd.config import ServerConfig
from httpd.http import SERVER_SOFTWARE
from httpd.logger import vis

# Largest STDOUT read from the backend at once.
RECV_SIZE = 65536
# Token characters kept in HTTP_* names (RFC 7230 tchar); others become '_'.
_TCHAR = frozenset("!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Request header (lower case) → its CGI variable name, for the names seen so far.
_ENV_NAMES: dict[str, bytes] = {}
_ENV_NAMES_MAX = 1024
# Response headers of the app that describe its connection, not the message.
_HOP = frozenset(("connection", "keep-alive", "transfer-encoding"))
# errno of a failed connect → status: a full listen queue is "busy", the rest "bad".
_CONNECT_STATUS = {errno.EAGAIN: 503, errno.ETIMEDOUT: 504}


class BackendError(Exception):
    """The FastCGI application failed us; status is what the client gets."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


class _ClientGone(Exception):
    """The HTTP client closed, or stopped reading or sending for too long."""


# -- the CGI environment ------------------------------------------------------

def root_strip(path: str, n: int) -> str:
    """server_root_strip(): drop n leading components ("" if too few)."""
    while n > 0 and path:
        cut = path.find("/", 1)
        path = path[cut:] if cut >= 0 else ""
        n -= 1
    return path


def path_info_len(full: str, exists) -> int:
    """path_info(): length of the longest prefix of `full` that exists.

    Walks from the end towards the start and tries the whole path, then
    every prefix ending before a '/'; 0 if none exists."""
    p = len(full)
    end = p
    while p > 0:
        if p == end or full[p] == "/":
            if exists(full[:p]):
                break
        p -= 1
    return p


def _stat_ok(worker):
    def exists(path: str) -> bool:
        return _exists(worker.fs(path))
    return exists


def _exists(path: str) -> bool:
    """stat(path) == 0, as path_info() asks.  faccessat(F_OK, AT_EACCESS)
    fails the same way, with the same effective IDs and capabilities (a
    plain access() drops the capabilities a worker may keep to reach its
    root), and builds no stat result: 0.7 µs a request."""
    try:
        return os.access(path, os.F_OK, effective_ids=True)
    except ValueError:            # a NUL in the path
        return False


def _utf8(s: str) -> bytes:
    # Decoded paths keep undecodable bytes as surrogates.
    return s.encode("utf-8", "surrogateescape")


def _raw(s: str) -> bytes:
    # Text taken from the request line or headers is latin-1 of the bytes;
    # macro expansions may have added non-latin-1 config text.
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape")


def _request_uri(x) -> str:
    """The request target as sent: path before decoding, original query."""
    target = x.req.target
    if not target.startswith("/"):
        if "://" in target:
            rest = target.split("://", 1)[1]
            target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        else:
            target = x.log_path or x.path or "/"
    return target


def env_name(header: str) -> bytes:
    """HTTP_<NAME> for a request header (RFC 3875 4.1.18, OpenBSD's token rule).

    Upper case; characters outside the RFC 7230 token set become '_'.
    Content-Length and Content-Type become CONTENT_LENGTH/CONTENT_TYPE."""
    name = header.upper()
    if name not in ("CONTENT-LENGTH", "CONTENT-TYPE"):
        name = "HTTP_" + name
    out = "".join(c if c in _TCHAR else "_" for c in name).encode("latin-1")
    if len(_ENV_NAMES) < _ENV_NAMES_MAX:
        _ENV_NAMES[header] = out
    return out


def tls_peer_verify(conf: ServerConfig) -> str | None:
    """TLS_PEER_VERIFY: printb_flags() of the client-certificate options."""
    tls = conf.tls
    if tls is None or tls.client_ca is None:
        return None
    flags = ["ca"]
    if tls.crl:
        flags.append("crl")
    if tls.client_optional:
        flags.append("optional")
    return ", ".join(flags)


# Pairs that never change, encoded once.
_GATEWAY = fcgi.pair(b"GATEWAY_INTERFACE", b"CGI/1.1")
_SOFTWARE = fcgi.pair(b"SERVER_SOFTWARE", SERVER_SOFTWARE.encode())
_HTTPS = fcgi.pair(b"HTTPS", b"on")
# Pairs with short values (< 128 bytes: one length byte each), in one format.
_ENV_HEAD = b"\x09%cPATH_INFO%s\x0b%cSCRIPT_NAME%s\x0f%cSCRIPT_FILENAME%s\x0c%cQUERY_STRING%s"
_ENV_URI = b"\x0c%cDOCUMENT_URI%s"
# (peer, method) and (local, server name, protocol) -> their encoded pairs.
_REMOTE: dict[tuple, bytes] = {}
_LOCAL: dict[tuple, bytes] = {}
# (path, query, target, id(conf)) -> (_conf_env entry, the script on the
# file system, its pairs as in env_pairs(), REQUEST_URI's pair).
_PATHS: dict[tuple, tuple] = {}
_PAIRS_MAX = 4096
# id(conf) -> (conf, what env_pairs() needs of it, encoded where constant).
# Configs are frozen and live as long as their generation; the entry keeps
# its conf alive, so an id is never reused while its entry is here.
_CONF_ENV: dict[int, tuple] = {}
_CONF_ENV_MAX = 1024


def _conf_env(conf: ServerConfig) -> tuple:
    entry = _CONF_ENV.get(id(conf))
    if entry is not None and entry[0] is conf:
        return entry
    fc = conf.fastcgi
    root = conf.root.rstrip("/")
    params = []
    for name, value in fc.params:
        if "$" in value or "%" in value:
            params.append((_utf8(name), value))      # macros: per request
        else:
            params.append((fcgi.pair(_utf8(name), _utf8(value)), None))
    tls = [_HTTPS]
    verify = tls_peer_verify(conf)
    if verify is not None:
        tls.append(fcgi.pair(b"TLS_PEER_VERIFY", verify.encode()))
    entry = (conf, root, fcgi.pair(b"DOCUMENT_ROOT", _utf8(root_strip(root or "/", fc.strip))),
             params, tls)
    if len(_CONF_ENV) >= _CONF_ENV_MAX:
        _CONF_ENV.clear()
    _CONF_ENV[id(conf)] = entry
    return entry


def env_pairs(x, conf: ServerConfig) -> list[bytes]:
    """The variables OpenBSD httpd sends (features.md §1.9), in its order,
    each encoded as a FastCGI name-value pair."""
    entry = _conf_env(conf)
    params, tls = entry[3], entry[4]
    pair = fcgi.pair
    req = x.req
    t = x.t
    # The pairs made of the path, query and target: remembered for a
    # script that exists as named (no PATH_INFO), which one existence check
    # of it confirms, as path_info() would start with.
    key = (x.path, x.query, req.target, id(conf))
    known = _PATHS.get(key)
    if known is not None and known[0] is entry:
        if _exists(known[1]):
            env = [known[2]]
            uri = known[3]
        else:
            known = None
    if known is None:
        env, uri = _path_pairs(x, conf, entry, key)
    if conf.auth is not None:
        env.append(pair(b"REMOTE_USER", _utf8(x.user or "")))
    names = _ENV_NAMES
    for low, value in req.hmap.items():
        name = names.get(low)
        if name is None:
            name = env_name(low)
        env.append(pair(name, value.encode("latin-1")))
    if x.ctx.tls:
        env += tls
    for name, value in params:
        if value is None:
            env.append(name)                # encoded whole
            continue
        try:
            value = x.expand(value)         # the macros of `block return`
        except route.RouteError:            # unknown macro or capture: as written
            pass
        env.append(pair(name, _utf8(value)))
    # The pairs of the connection's addresses, the server and protocol
    # change rarely (not at all on a keep-alive connection): encoded once.
    key = (t.peer, req.method)
    remote = _REMOTE.get(key)
    if remote is None:
        remote = _remote_pairs(*key)
    key = (t.local, x.srv.name, x.version)
    local = _LOCAL.get(key)
    if local is None:
        local = _local_pairs(*key)
    env += (remote, uri, local)
    return env


def _path_pairs(x, conf: ServerConfig, entry: tuple, key: tuple) -> tuple[list[bytes], bytes]:
    """env_pairs()'s pairs of the path: PATH_INFO to GATEWAY_INTERFACE as
    a list, and REQUEST_URI.  Remembered in _PATHS when the script exists
    as named."""
    _, root, docroot, _, _ = entry
    pair = fcgi.pair
    alias = x.path                        # canonical, index appended
    stripped = root_strip(alias, conf.strip)
    full = root + stripped
    # No part of the root may show up in PATH_INFO.
    scriptlen = max(path_info_len(full, _stat_ok(x.worker)), len(root))
    script_name = alias[:scriptlen + (len(alias) - len(stripped)) - len(root)]
    enc = "utf-8"
    esc = "surrogateescape"
    pi = full[scriptlen:].encode(enc, esc)
    sn = script_name.encode(enc, esc)
    sf = root_strip(full[:scriptlen], conf.fastcgi.strip).encode(enc, esc)
    qs = _raw(x.query) if x.query else b""
    du = alias.encode(enc, esc)
    if len(pi) < 128 and len(sn) < 128 and len(sf) < 128 and len(du) < 128 and len(qs) < 128:
        # All one-byte lengths (the common case): one format, not 5 pairs.
        env = [_ENV_HEAD % (len(pi), pi, len(sn), sn, len(sf), sf, len(qs), qs),
               docroot, _ENV_URI % (len(du), du), _GATEWAY]
    else:
        env = [pair(b"PATH_INFO", pi), pair(b"SCRIPT_NAME", sn), pair(b"SCRIPT_FILENAME", sf),
               pair(b"QUERY_STRING", qs), docroot, pair(b"DOCUMENT_URI", du), _GATEWAY]
    uri = pair(b"REQUEST_URI", _raw(_request_uri(x)))
    if not pi and len(key[0]) + len(key[1] or "") + len(key[2]) <= route.MEMO_KEY_MAX:
        if len(_PATHS) >= _PAIRS_MAX:
            _PATHS.clear()
        _PATHS[key] = (entry, x.worker.fs(full), b"".join(env), uri)
    return env, uri


def _remote_pairs(peer: tuple, method: str) -> bytes:
    if len(_REMOTE) >= _PAIRS_MAX:
        _REMOTE.clear()
    pairs = _REMOTE[peer, method] = (
        fcgi.pair(b"REMOTE_ADDR", peer[0].encode()) + fcgi.pair(b"REMOTE_PORT", b"%d" % peer[1])
        + fcgi.pair(b"REQUEST_METHOD", method.encode("latin-1")))
    return pairs


def _local_pairs(local: tuple, name: str, version: str) -> bytes:
    if len(_LOCAL) >= _PAIRS_MAX:
        _LOCAL.clear()
    pairs = _LOCAL[local, name, version] = (
        fcgi.pair(b"SERVER_ADDR", local[0].encode()) + fcgi.pair(b"SERVER_PORT", b"%d" % local[1])
        + fcgi.pair(b"SERVER_NAME", _utf8(name))
        + fcgi.pair(b"SERVER_PROTOCOL", version.encode("latin-1")) + _SOFTWARE)
    return pairs


def cgi_env(x, conf: ServerConfig) -> list[tuple[bytes, bytes]]:
    """env_pairs() decoded: the environment as (name, value) pairs."""
    return fcgi.decode_params(b"".join(env_pairs(x, conf)))


# -- the backend connection ---------------------------------------------------

def backend_name(conf: ServerConfig) -> str:
    """How logs name the backend: the socket path, or host:port."""
    fc = conf.fastcgi
    if fc.host is not None:
        host = f"[{fc.host}]" if ":" in fc.host else fc.host
        return f"{host}:{fc.port}"
    return fc.socket or ""


async def connect(conf: ServerConfig, worker) -> socket.socket:
    """Open the backend connection (a non-blocking socket); raises BackendError."""
    fc = conf.fastcgi
    if fc.host is not None:
        fam = socket.AF_INET6 if ":" in fc.host else socket.AF_INET
        addr = (fc.host, fc.port)
    else:
        fam = socket.AF_UNIX
        addr = worker.fs(fc.socket)
    try:
        # The C type: socket.socket's Python __init__ and close() would add
        # about a microsecond to every request, for nothing used here.
        sock = _socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as e:
        raise BackendError(502, f"socket: {_why(e)}") from None
    try:
        # A UNIX connect never blocks on Linux: it succeeds, or fails with
        # EAGAIN when the listen queue is full (trio's connect would wait
        # for writability then and take the socket as connected).
        err = sock.connect_ex(addr)
        if err == errno.EINPROGRESS and fam != socket.AF_UNIX:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        if fam != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        close_socket(sock)
        raise BackendError(_CONNECT_STATUS.get(e.errno, 502),
                           f"connect failed: {_why(e)}") from None
    except BaseException:
        close_socket(sock)
        raise
    return sock


# The phase of the connection's Timer (engine.serve) while we wait.
FCGI = "fastcgi"
_BEGIN = fcgi.begin_request()
_STDIN_END = fcgi.stdin(b"")
# The END_REQUEST record header of request 1 as php-fpm, flup and fcgiwrap
# send it (8 content bytes, no padding): a read that ends with it and
# holds only STDOUT records before is a whole response (see _Job._whole).
_END_HEAD = fcgi.encode(fcgi.END_REQUEST, bytes(8))[:8]
_RECORD = fcgi.HEADER


class _Job:
    """One FastCGI request: the backend socket and the response state.

    An engine.serve.Timer, restarted by every step forward in either
    direction, cancels the exchange once `connection timeout` has passed
    without one: the connection's own Timer and scope for a request without
    a body, a scope and Timer of the job's for one with a body (two tasks).
    A deadline on a scope would cost more than the rest of a small
    request's bookkeeping.  When it fires, `phase` (what the main task
    waits for) and `waiting_client` (the STDIN pump waits for the client's
    body) tell whose silence it was.
    """

    # Defaults for the state a request may never change: a class attribute
    # is read until the first store, and __init__ runs on every request.
    timer: Timer | None = None             # the job's own (a request with a body)
    _progress = None                       # the timer's restart(), from run()
    sock: socket.socket | None = None      # non-blocking, driven by hand
    phase = "connect"                      # "connect" | "backend" | "client"
    waiting_client = False                 # the STDIN pump waits for the client
    head: fcgi.CgiHead | None = None
    hparser: fcgi.CgiHeaderParser | None = None
    head_queued = False                    # head built (in self.out)
    head_sent = False                      # head written to the client
    chunked = False
    length: int | None = None              # the app's Content-Length, if any
    failure: BaseException | None = None

    def __init__(self, x, conf: ServerConfig) -> None:
        self.x = x
        self.conf = conf
        self.no_body = x.req.method == "HEAD"
        self.out = bytearray()             # bytes for the client, this round
        self.body: list[bytes] = []        # body bytes for the client, this round

    # -- logging ---------------------------------------------------------------
    def log_error(self, msg: str) -> None:
        lc = self.conf.log
        if lc.enabled:
            self.x.worker.logs.write(
                lc.error, f"server {self.x.srv.name}, fastcgi {backend_name(self.conf)}: {msg}",
                lc.syslog)

    def _stderr(self, content: bytes) -> None:
        # OpenBSD logs STDERR as is; one line per line keeps the log greppable.
        lc = self.conf.log
        if not lc.enabled:
            return
        for line in content.decode("utf-8", "surrogateescape").splitlines():
            if line.strip():
                self.x.worker.logs.write(lc.error, vis(line.rstrip()), lc.syslog)

    # -- deadline ------------------------------------------------------------------
    def _expired(self) -> Exception:
        if self.waiting_client or self.phase == "client":
            return _ClientGone("client timeout")
        return BackendError(504, "connect timeout" if self.phase == "connect" else "timeout")

    # -- I/O ---------------------------------------------------------------------------
    async def _send_backend(self, data: bytes) -> None:
        sock = self.sock
        try:
            # A small request fits the socket buffer: one send, no view.
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            raise BackendError(502, f"write failed: {_why(e)}") from None
        if n == len(data):
            self._progress()
            return
        view = memoryview(data)[n:]
        try:
            while view:
                try:
                    n = sock.send(view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                view = view[n:]
                self._progress()
        except OSError as e:
            raise BackendError(502, f"write failed: {_why(e)}") from None

    async def _recv_backend(self, first: bool = False) -> bytes:
        self.phase = "backend"
        sock = self.sock
        try:
            if first:
                # The app cannot have answered yet: wait before reading
                # rather than fail a read with EAGAIN first.
                await wait_readable_new(sock)
            while True:
                try:
                    data = sock.recv(RECV_SIZE)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
        except OSError as e:
            raise BackendError(502, f"read failed: {_why(e)}") from None
        self._progress()
        return data

    async def _send_client(self, data) -> None:
        self.phase = "client"
        try:
            await self.x.t.send_all(data)
        except CLOSED:
            raise _ClientGone("client closed") from None
        self._progress()

    # -- the request -------------------------------------------------------------
    async def run(self) -> None:
        """The whole exchange; raises BackendError, FcgiError, _ClientGone, HttpError."""
        x = self.x
        timer = x.timer
        if timer is not None and not x.req.has_body:
            # No body: no second task, so the connection's own Timer and
            # cancel scope do (entering a scope and arming a Timer of our
            # own cost a fifth of a small request's CPU).  When it fires,
            # the cancellation is ours to turn into the error; the
            # connection's scope stays cancelled, and the error page goes
            # out if it needs no wait (the connection closes after it).
            self._progress = timer.restart
            timer.arm(self.conf.connection.timeout, FCGI)
            try:
                await self._exchange()
            except trio.Cancelled:
                if timer.fired is not FCGI:
                    raise
                timer.fired = None
                raise self._expired() from None
            finally:
                timer.disarm()
            return
        with trio.CancelScope() as scope:
            self.timer = timer = Timer(scope)
            self._progress = timer.restart
            timer.arm(self.conf.connection.timeout)
            try:
                await self._exchange()
            finally:
                timer.close()
        if self.failure is not None:
            raise self.failure
        if scope.cancelled_caught:
            raise self._expired()

    async def _exchange(self) -> None:
        x = self.x
        self.sock = await connect(self.conf, x.worker)
        self.phase = "backend"
        request = _BEGIN + fcgi.pack_params(env_pairs(x, self.conf))
        if not x.req.has_body:
            await self._send_backend(request + _STDIN_END)
            data = await self._recv_backend(first=True)
            if not await self._whole(data):
                await self._relay(data)
            return
        await self._send_backend(request)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_guarded, nursery.cancel_scope)
            try:
                await self._relay()
            except (BackendError, fcgi.FcgiError, _ClientGone, HttpError) as e:
                self.failure = self.failure or e
            nursery.cancel_scope.cancel()

    async def _pump_guarded(self, scope: trio.CancelScope) -> None:
        try:
            await self._pump()
        except (BackendError, _ClientGone, HttpError) as e:
            self.failure = self.failure or e
            scope.cancel()

    async def _pump(self) -> None:
        """Client body → STDIN records, chunk by chunk as it arrives."""
        x = self.x
        limit = self.conf.connection.max_request_body
        total = 0
        req = x.req
        if req.has_body and req.version == "1.1" and \
                req.hmap.get("expect", "").lower() == "100-continue":
            # RFC 9110 §10.1.1: the client waits for this before the body.
            try:
                await x.t.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            except CLOSED:
                raise _ClientGone("client closed") from None
        while True:
            self.waiting_client = True
            try:
                chunk = await x.conn.receive_body()
            except CLOSED:
                raise _ClientGone("client closed") from None
            except HttpError as e:
                raise _ClientGone(e.msg or "bad request body") from None
            finally:
                self.waiting_client = False
            self._progress()
            total += len(chunk)
            if total > limit:
                raise HttpError(413, "request body too large")
            try:
                await self._send_backend(fcgi.stdin(chunk))
            except BackendError:
                return   # the app stopped reading; its answer decides
            if not chunk:
                return

    async def _whole(self, data: bytes) -> bool:
        """Answer from one read that holds the whole response: STDOUT
        records, then END_REQUEST; False (nothing done) for anything else,
        which _relay() then takes record by record.  The common case of a
        small page, without a RecordReader and a Record per record."""
        end = len(data) - 16
        if end < 0 or data[end:end + 8] != _END_HEAD:
            return False
        unpack = _RECORD.unpack_from
        stdout = []
        pos = 0
        while pos < end:
            if pos + 8 > end:
                return False
            version, rtype, rid, clen, plen = unpack(data, pos)
            if version != fcgi.FCGI_VERSION_1 or rtype != fcgi.STDOUT or rid != 1:
                return False
            start = pos + 8
            pos = start + clen + plen
            if clen:
                stdout.append(data[start:start + clen])
        if pos != end:
            return False
        if stdout:
            content = stdout[0] if len(stdout) == 1 else b"".join(stdout)
            cut = fcgi.head_block(content)
            if cut is None:
                self._stdout(content)     # no blank line: fails in _end_request
            else:
                block, content = cut
                self._start(bool(content), block)
                if content and not self.no_body:
                    self.body.append(content)
        self._end_request(data[end + 8:])
        # As in _relay: php-fpm takes its next request after our close.
        close_socket(self.sock)
        self.sock = None
        await self._flush(final=True)
        return True

    async def _relay(self, data: bytes | None = None) -> None:
        """STDOUT records → the client, each read passed on as it arrives;
        `data`: what was read already."""
        reader = fcgi.RecordReader()
        ended = False
        while not ended:
            if data is None:
                data = await self._recv_backend()
            if not data:
                reader.eof()
                raise BackendError(502, "connection closed before the end of the request")
            for rec in reader.feed(data):
                if rec.request_id != 1:
                    continue   # management records (id 0) are not ours
                if rec.type == fcgi.STDOUT:
                    if rec.content:
                        self._stdout(rec.content)
                elif rec.type == fcgi.STDERR:
                    if rec.content:
                        self._stderr(rec.content)
                elif rec.type == fcgi.END_REQUEST:
                    self._end_request(rec.content)
                    ended = True
                    break
            if ended and self.x.req.has_body is False:
                # php-fpm's worker waits for our close before it takes the
                # next request: let it go before talking to the client.
                close_socket(self.sock)
                self.sock = None
            data = None
            await self._flush(final=ended)

    def _stdout(self, content: bytes) -> None:
        if self.head is None:
            if self.hparser is None:
                self.hparser = fcgi.CgiHeaderParser()
            self.head, content = self.hparser.feed(content)
            if self.head is None:
                return
        if content:
            if not self.head_queued:
                self._start(body=True)
            if not self.no_body:
                self.body.append(content)

    def _end_request(self, content: bytes) -> None:
        _, protocol_status = fcgi.decode_end_request(content)
        if self.head is None and not self.head_queued:
            if protocol_status in (fcgi.OVERLOADED, fcgi.CANT_MPX_CONN):
                raise BackendError(503, "application overloaded")
            if protocol_status != fcgi.REQUEST_COMPLETE:
                raise BackendError(502, f"request refused (protocol status {protocol_status})")
            raise BackendError(502, "no response headers")
        if not self.head_queued:
            self._start(body=False)

    async def _flush(self, final: bool) -> None:
        out = self.out
        if self.body:
            data = b"".join(self.body) if len(self.body) > 1 else self.body[0]
            self.body.clear()
            if self.length is not None:
                # Never send more than announced: the next response would
                # start inside this one.
                room = self.length - self.x.sent
                if len(data) > room:
                    data = data[:max(room, 0)]
                    self.x.keep = False
            if data:
                self.x.sent += len(data)
                if self.chunked:
                    out += b"%x\r\n" % len(data)
                    out += data
                    out += b"\r\n"
                else:
                    out += data
        if final:
            if self.chunked and not self.no_body:
                out += b"0\r\n\r\n"
            elif self.length is not None and not self.no_body and self.x.sent != self.length:
                self.x.keep = False
        if out:
            data = bytes(out)
            out.clear()
            self.head_sent = self.head_queued
            await self._send_client(data)

    def _start(self, body: bool, block: bytes | None = None) -> None:
        """Queue the response head; `body`: some body bytes are at hand.

        `block`: the CGI header block as received, when the response came
        whole (self.head is not parsed yet).  The head made of it is
        remembered: an application sends the same block to most requests
        (php-fpm: X-Powered-By and Content-type), and parsing, checking and
        building it again cost a tenth of a small request's CPU."""
        x = self.x
        conf = self.conf
        if block is None or len(block) > _HEAD_KEY_MAX:
            if block is not None:
                self.head = fcgi.parse_head(block)
            made = self._make_head(body)
        else:
            key = (block, id(conf), x.version, x.keep, x.ctx.tls, self.no_body, body,
                   x.worker.server_name)
            made = _HEADS.get(key)
            if made is None or made[0] is not conf:
                self.head = fcgi.parse_head(block)
                made = self._make_head(body)
                if len(_HEADS) >= _HEADS_MAX:
                    _HEADS.clear()
                _HEADS[key] = made
        _, x.status, head, self.length, self.chunked, self.no_body, x.keep, dated = made
        self.out += head
        self.out += b"\r\n" if dated else _date_line()
        self.head_queued = True

    def _make_head(self, body: bool) -> tuple:
        """What _start() queues for self.head, Date and the blank line left
        out: (conf, status, head bytes, length, chunked, no_body, keep, the
        app sent a Date).  Depends on the head, the conf, and x's version,
        keep, TLS and method (the key of _HEADS), nothing else."""
        x = self.x
        conf = self.conf
        head = self.head
        status = head.status if head.status in REASONS else 200
        keep = x.keep
        if x.version != "HTTP/1.1":
            keep = False            # HTTP/1.0: no chunking, so no persistence
        chunked = False
        no_body = self.no_body
        app, length, have_date, have_server = _app_headers(head)
        hdrs: list[tuple[str, str]] = []
        if conf.banner and not have_server:
            hdrs.append(("Server", x.worker.server_name))
        if status in (204, 304):
            # RFC 7230 3.3: no body and no framing headers for these.
            no_body = True
            if length is not None:
                app = [kv for kv in app if kv[0].lower() != "content-length"]
                length = None
        elif length is None:
            if not body:
                if x.req.method != "HEAD":
                    app.append(("Content-Length", "0"))
                    length = 0
            elif x.version == "HTTP/1.1":
                chunked = True
                app.append(("Transfer-Encoding", "chunked"))
            else:
                keep = False        # the close ends the body
        hdrs.append(("Connection", "keep-alive" if keep else "close"))
        hdrs += app
        if conf.hsts is not None:
            hdrs += server_http._hsts(x, conf)
        if conf.headers:
            hdrs = server_http._custom_headers(conf, hdrs, error=status >= 400)
        # build_head() without its blank line: Date or "\r\n" follow.
        head_bytes = server_http.build_head(status, x.version, hdrs)[:-2]
        return conf, status, head_bytes, length, chunked, no_body, keep, have_date


def _app_headers(head: fcgi.CgiHead) -> tuple[list[tuple[str, str]], int | None, bool, bool]:
    """The application's response headers without the HTTP/1 connection
    ones: (headers, its Content-Length, it sent Date, it sent Server)."""
    length: int | None = None
    app: list[tuple[str, str]] = []
    have_date = have_server = False
    for k, v in head.headers:
        low = k.lower()
        if low in _HOP:
            continue
        if low == "content-length":
            n = v.strip()
            if not n.isdigit() or (length is not None and int(n) != length):
                raise BackendError(502, "malformed Content-Length header")
            if length is not None:
                continue
            length = int(n)
        elif low == "date":
            have_date = True
        elif low == "server":
            have_server = True
        app.append((k, v))
    return app, length, have_date, have_server


class _H2Job(_Job):
    """A FastCGI request of an HTTP/2 stream: the body is read whole first
    (at most `max request body`), so a malformed or truncated upload never
    reaches the application and CONTENT_LENGTH is always exact; the head
    and body go out as HEADERS and DATA frames."""

    h2head: tuple | None = None

    async def _exchange(self) -> None:
        x = self.x
        s = x.h2
        req = x.req
        body = b""
        if not s.ended or s.body:
            if req.hmap.get("expect", "").lower() == "100-continue":
                await s.send_interim(100)
            self.waiting_client = True
            try:
                body = await s.read_body(self.conf.connection.max_request_body)
            except CLOSED:
                raise _ClientGone("client closed") from None
            self.waiting_client = False
            if body or "content-length" in req.hmap:
                req.hmap["content-length"] = str(len(body))
                req.content_length = len(body)
        self.sock = await connect(self.conf, x.worker)
        self.phase = "backend"
        request = _BEGIN + fcgi.pack_params(env_pairs(x, self.conf))
        if body:
            request += fcgi.stdin(body)
        await self._send_backend(request + _STDIN_END)
        data = await self._recv_backend(first=True)
        if not await self._whole(data):
            await self._relay(data)

    def _start(self, body: bool, block: bytes | None = None) -> None:
        x = self.x
        conf = self.conf
        if block is not None:
            self.head = fcgi.parse_head(block)
        head = self.head
        status = head.status if head.status in REASONS else 200
        app, length, have_date, have_server = _app_headers(head)
        hdrs: list[tuple[str, str]] = []
        if conf.banner and not have_server:
            hdrs.append(("Server", x.worker.server_name))
        if status in (204, 304):
            self.no_body = True
            app = [kv for kv in app if kv[0].lower() != "content-length"]
            length = None
        elif length is None and not body and x.req.method != "HEAD":
            app.append(("Content-Length", "0"))
            length = 0
        hdrs += app
        if conf.hsts is not None:
            hdrs += server_http._hsts(x, conf)
        if conf.headers:
            hdrs = server_http._custom_headers(conf, hdrs, error=status >= 400)
        if not have_date:
            hdrs.append(("Date", http_date()))
        x.status = status
        self.length = length
        self.h2head = (status, hdrs)
        self.head_queued = True

    async def _flush(self, final: bool) -> None:
        s = self.x.h2
        data = b""
        if self.body:
            data = b"".join(self.body)
            self.body.clear()
            if self.length is not None:
                room = self.length - self.x.sent
                data = data[:max(room, 0)]
            self.x.sent += len(data)
        try:
            if self.head_queued and not self.head_sent:
                self.head_sent = True
                await s.send_head(*self.h2head, end=final and not data)
                if final and not data:
                    return
            if data or final:
                await s.send_data(data, final)
        except CLOSED:
            raise _ClientGone("client closed") from None


# (CGI header block, conf, ...) -> what _Job._make_head() made of it.
_HEADS: dict[tuple, tuple] = {}
_HEADS_MAX = 256
_HEAD_KEY_MAX = 1024         # larger header blocks are parsed every time
_DATE = ["", b""]            # http_date() and its header line with the blank line


def _date_line() -> bytes:
    date = http_date()
    if date is not _DATE[0]:
        _DATE[0] = date
        _DATE[1] = b"Date: %s\r\n\r\n" % date.encode("latin-1")
    return _DATE[1]


def _why(e: BaseException) -> str:
    # trio words its connect errors itself; the errno text is what we log.
    code = getattr(e, "errno", None)
    if code:
        return os.strerror(code)
    return str(e) or type(e).__name__


async def serve(x, conf: ServerConfig) -> bool:
    """Answer the request through FastCGI; True to keep the connection.

    Raises HttpError for a failure before the response head went out (the
    caller sends the error page); afterwards failures close the connection.
    """
    job = (_Job if x.h2 is None else _H2Job)(x, conf)
    status = 0
    try:
        try:
            await job.run()
        finally:
            if job.sock is not None:
                # Closing the connection is how the app learns of an abort.
                close_socket(job.sock)
    except BackendError as e:
        job.log_error(e.msg)
        status = e.status
    except fcgi.FcgiError as e:
        job.log_error(f"malformed response: {e}")
        status = 502
    except _ClientGone:
        x.keep = False
        if not job.head_sent:
            x.status = 0
            return False
    except HttpError:
        if job.head_sent:
            x.keep = False
        else:
            raise
    if status:
        if not job.head_sent:
            raise HttpError(status, "fastcgi error")
        x.keep = False
    server_http.access_log(x)
    return x.keep
