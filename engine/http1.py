"""engine.http1 -- HTTP/1.x message framing over httptools (llhttp).

ServerConn reads requests from a Transport: heads become Request values,
bodies come out chunk by chunk (Content-Length or chunked, already
de-chunked), pipelined requests queue up in order.  ClientConn does the same
for responses, toward backends (relayd) and in HTTP health checks.

llhttp is lenient in places a proxy cannot be (style.md, "From h11"), so
this module adds the checks it does not make: HTTP/1.1 without Host, more
than one Host, missing version, invalid or repeated Content-Length, a
Transfer-Encoding that does not end in chunked, and a limit on the size of
the head (413).  Every protocol error is raised as HttpError(status) once,
here; callers map nothing themselves.

passthrough=True (relayd only; httpd reads CRLF only) cuts each head out of
the input itself: a bare LF ends a line (made CRLF before llhttp sees it,
a CR not before LF is still refused), a chunked body comes out with its
framing as read (engine.chunked: Framing values between the payload
bytes), and an error is queued behind the messages parsed before it in the
same read, so those are served first.

This module builds no response heads beyond helpers (`http_date`,
`REASONS`): the daemons own their header sets.
"""

from __future__ import annotations

import re
import time
from collections import deque
from email.utils import formatdate

import httptools

from engine.chunked import ChunkedReader, ChunkError, Framing
from engine.conn import Transport

# Reason phrases, IANA registry (incl. 418, 420 and 451 as OpenBSD's http.h).
REASONS: dict[int, str] = {
    100: "Continue", 101: "Switching Protocols", 102: "Processing",
    103: "Early Hints",
    200: "OK", 201: "Created", 202: "Accepted",
    203: "Non-Authoritative Information", 204: "No Content",
    205: "Reset Content", 206: "Partial Content", 207: "Multi-Status",
    208: "Already Reported", 226: "IM Used",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 305: "Use Proxy",
    307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required",
    408: "Request Timeout", 409: "Conflict", 410: "Gone",
    411: "Length Required", 412: "Precondition Failed",
    413: "Payload Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 418: "I'm a teapot", 420: "Enhance Your Calm",
    421: "Misdirected Request", 422: "Unprocessable Entity", 423: "Locked",
    424: "Failed Dependency", 425: "Too Early", 426: "Upgrade Required",
    428: "Precondition Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    451: "Unavailable For Legal Reasons",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported", 506: "Variant Also Negotiates",
    507: "Insufficient Storage", 508: "Loop Detected", 510: "Not Extended",
    511: "Network Authentication Required",
}

# Request head limit (OpenBSD SERVER_MAXHEADERLENGTH).
MAX_HEAD = 8192
# Raw bytes of an unfinished head we accept before giving up, beyond the
# counted limit (llhttp buffers partial header lines in Python objects).
HEAD_SLACK = 16384
# HttpError message for a Content-Length that is not a decimal number (httpd
# answers it 500, as OpenBSD's strtonum() failure; relayd 400).
BAD_CONTENT_LENGTH = "invalid content length"
# A LF not preceded by CR (OpenBSD httpd reads lines with EVBUFFER_EOL_CRLF_STRICT).
_BARE_LF = re.compile(rb"(?<!\r)\n")
# The end of a head when a bare LF may end a line (passthrough mode).
_HEAD_END = re.compile(rb"\n\r?\n")
# Control characters never allowed in a header value (tab is allowed).
_CTL = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"
_CTL_BUT_LF = _CTL.replace(b"\n", b"")
# httpd: bare LFs of header lines through llhttp (ServerConn._escape_lf).
_LF_ESCAPE = re.compile(rb"\x01(.)", re.DOTALL)


def _lf_unescape(m: re.Match) -> bytes:
    return b"\n" if m[1] == b"n" else m[1]

_date_sec = -1
_date_str = ""
# Header name -> (name, lower-case name) memo of on_header(), request
# method memo of on_headers_complete(), and their bound.
_names: dict[bytes, tuple[str, str]] = {}
_methods: dict[bytes, str] = {}
NAMES_MAX = 512


def http_date(ts: float | None = None) -> str:
    """IMF-fixdate; the current time is formatted at most once a second."""
    global _date_sec, _date_str
    if ts is not None:
        return formatdate(ts, usegmt=True)
    now = int(time.time())
    if now != _date_sec:
        _date_sec = now
        _date_str = formatdate(now, usegmt=True)
    return _date_str


class HttpError(Exception):
    """A protocol-level failure with the status to answer it with."""

    def __init__(self, status: int, msg: str = "",
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(msg or REASONS.get(status, str(status)))
        self.status = status
        self.msg = msg
        self.headers = headers or []


class Request:
    """A request head.  Header names keep their case; `hmap` is lower-case."""

    __slots__ = ("method", "target", "version", "headers", "hmap", "keep_alive",
                 "content_length", "chunked", "upgrade", "head_size", "raw_head")

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.headers: list[tuple[str, str]] = []
        self.hmap: dict[str, str] = {}
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.upgrade = False
        self.head_size = 0

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: str) -> str | None:
        return self.hmap.get(name)


class Response:
    """A response head read from a backend."""

    __slots__ = ("status", "reason", "version", "headers", "hmap", "keep_alive",
                 "content_length", "chunked", "head_size")

    def __init__(self) -> None:
        self.status = 0
        self.reason = ""
        self.version = "1.1"
        self.headers: list[tuple[str, str]] = []
        self.hmap: dict[str, str] = {}
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.head_size = 0

    def header(self, name: str) -> str | None:
        return self.hmap.get(name)


_END = None   # event: end of the current message's body
# An absolute-form request target (RFC 9112 3.2.2).
_ABSOLUTE_FORM = re.compile(r"(?i)https?://")


class _Failed:
    """Event: the input broke here (passthrough mode).  What was parsed
    before it is still served; reaching it raises the error."""

    __slots__ = ("error",)

    def __init__(self, error: HttpError) -> None:
        self.error = error


class BodyReader:
    """read_body() on top of a receive_body() (HTTP/1 connections here,
    HTTP/2 streams in engine.http2: the same reading API)."""

    __slots__ = ()

    async def read_body(self, limit: int) -> bytes:
        """The whole current body (at most `limit` bytes, else 413)."""
        parts = []
        size = 0
        while True:
            chunk = await self.receive_body()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise HttpError(413, "request body too large")
            parts.append(chunk)


class _Conn(BodyReader):
    """What ServerConn and ClientConn share: feeding and the event queue."""

    def __init__(self, transport: Transport, max_head: int, passthrough: bool = False) -> None:
        self.t = transport
        self.max_head = max_head
        self.events: deque = deque()
        # passthrough (relayd): bare LF ends lines, chunked bodies come out
        # with their framing (engine.chunked), errors queue behind the
        # messages parsed before them.  Heads are cut out of the input here
        # so llhttp never sees a chunked body or a bare LF.
        self.passthrough = passthrough
        self._body = None          # passthrough: None (a head next), bytes left, -1, reader
        self._tail = b""           # passthrough: last bytes of an unfinished head
        self._head_done = None
        self.eof = False
        self.cur = None            # head being parsed
        self.in_head = False
        self.raw_head = 0
        self.error: HttpError | None = None
        self.upgraded = False      # parser stopped: the rest is raw bytes
        self.rest = b""            # raw bytes after an upgrade/CONNECT head
        self.hcount: dict[str, int] = {}

    # -- httptools callbacks ------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head = True
        self.raw_head = 0
        self.hcount = {}
        self.cur = self._new_head()
        self._line_seen = False

    def on_header(self, name: bytes, value: bytes) -> None:
        cur = self.cur
        if not self.in_head:
            return   # trailer fields of a chunked body: dropped
        if self.lenient and value.translate(None, _CTL) != value:
            if self._lf_escaped:         # bare LFs of an httpd head, restored
                value = _LF_ESCAPE.sub(_lf_unescape, value)
            if not self._lf_escaped or value.translate(None, _CTL_BUT_LF) != value:
                self.error = HttpError(400, "malformed header")
                raise self.error
        size = cur.head_size + len(name) + len(value) + 2
        cur.head_size = size
        if size > self.max_head:
            self.error = HttpError(413, "request headers too large")
            raise self.error
        # Header names repeat from one message to the next: decoded and
        # lower-cased once (bounded: names come from the peer).
        names = _names.get(name)
        if names is None:
            if self.lenient and name[-1:] in (b" ", b"\t"):
                # llhttp's lenient mode takes "Transfer-Encoding :" as a
                # header it frames by, under a name the checks here do not
                # know: a smuggling vector.  RFC 9112 5.1: 400.
                self.error = HttpError(400, "malformed header")
                raise self.error
            n = name.decode("latin-1")
            names = (n, n.lower())
            if len(_names) < NAMES_MAX:
                _names[name] = names
        n, low = names
        v = value.decode("latin-1")
        cur.headers.append((n, v))
        hmap = cur.hmap
        if low in hmap:
            self.hcount[low] = self.hcount.get(low, 1) + 1
            hmap[low] = hmap[low] + ", " + v
        else:
            hmap[low] = v

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(_END)
        self.cur = None

    # -- checks shared by both directions -------------------------------------
    def _check_framing(self, head) -> None:
        count = self.hcount
        cl = head.hmap.get("content-length")
        if cl is not None:
            if count.get("content-length", 1) > 1:
                raise HttpError(400, "malformed header")
            if not cl.isdigit():
                raise HttpError(400, BAD_CONTENT_LENGTH)
            head.content_length = int(cl)
        te = head.hmap.get("transfer-encoding")
        if te is not None:
            if cl is not None:
                raise HttpError(400, "malformed header")
            last = te.rsplit(",", 1)[-1].strip().lower()
            if last != "chunked":
                raise HttpError(400, "malformed header")
            if self._direct:
                # _split(): a chunked body comes out through ChunkedReader
                raise HttpError(400, "chunked")
            head.chunked = True

    crlf_wait = False     # see ServerConn(httpd_rules=True)
    _lf_escaped = False   # the head being fed carries escaped bare LFs (httpd)
    _replace = False      # see ClientConn.expect()
    stalled = -1          # bytes seen since the head stalled on a bare LF
    _direct = False       # _split(): this read goes to llhttp in one call
    head_request = False  # see ClientConn.expect()

    def _parse(self, data: bytes) -> None:
        if self.stalled >= 0:
            self._stall(data)
            return
        if self.in_head:
            self.raw_head += len(data)
            if self.raw_head > self.max_head + HEAD_SLACK:
                raise HttpError(413, "request headers too large")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            off = e.args[0] if e.args else len(data)
            self.rest = data[off:]
        except httptools.HttpParserError as e:
            err = self.error or (e.__context__ if isinstance(e.__context__, HttpError)
                                 else None)
            if err is not None:
                raise err from None
            if self.crlf_wait and _BARE_LF.search(data) and \
                    not isinstance(e, httptools.HttpParserInvalidMethodError):
                # No CRLF-terminated line yet: wait for one, as OpenBSD.
                self.stalled = 0
                self._stall(data)
                return
            raise HttpError(400, _parser_reason(e)) from None

    def _split(self, data: bytes) -> None:
        # Passthrough: llhttp gets each head up to its blank line (bare LFs
        # made CRLF) and Content-Length bodies; a chunked body goes to a
        # ChunkedReader, and llhttp (still expecting chunks) is replaced.
        if self._body is None and self.cur is None and not self._tail \
                and not self.head_request:
            # The common read, at a message boundary: whole CRLF-only
            # messages (or a head and the start of its Content-Length body)
            # go to llhttp in one call, as in the strict mode.  What llhttp
            # cannot do here raises (a bare LF: llhttp refuses it without
            # lenient_optional_cr_before_lf; a chunked head: _check_framing)
            # and the read is done again the exact way, from this boundary.
            events = self.events
            n = len(events)
            self._direct = True
            try:
                self.parser.feed_data(data)       # (_parse(), inline)
            except httptools.HttpParserUpgrade as e:
                self.upgraded = True
                self.rest = data[e.args[0] if e.args else len(data):]
            except httptools.HttpParserError:
                while len(events) > n:
                    events.pop()
                self.error = self.cur = None
                self.in_head = False
                self._new_parser()
                self._direct = False
                self._split_loop(data)
                return
            self._direct = False
            cur = self.cur
            if cur is not None and not self.upgraded:
                if self.in_head:                   # a head across reads
                    self._tail = data[-2:]
                else:                              # a Content-Length body
                    cl = cur.content_length
                    if cl is None:
                        self._body = -1            # until the close
                    else:
                        for ev in reversed(events):
                            if ev is cur:
                                break
                            cl -= len(ev)
                        self._body = cl
            return
        self._split_loop(data)

    def _after_head(self, head) -> None:
        # What follows the head just parsed (None: it did not end).
        if head is not None:
            if self._replace:
                self._new_parser()
            elif self.cur is not None:             # a body follows
                if head.chunked:
                    self._body = ChunkedReader()
                else:
                    self._body = head.content_length or -1

    def _split_loop(self, data: bytes) -> None:
        while data:
            body = self._body
            if body is None:
                tail = self._tail
                clean = False            # no bare LF up to `end`
                if tail:                 # a head across reads: its end may straddle
                    self._tail = b""
                    m = _HEAD_END.search(tail + data)
                    end = m.end() - len(tail) if m is not None else -1
                else:
                    # Fast path, a CRLF-only head: its first CRLFCRLF ends it.
                    end = data.find(b"\r\n\r\n") + 4
                    if end > 3 and data.count(b"\n", 0, end) == data.count(b"\r\n", 0, end):
                        clean = True
                    else:
                        m = _HEAD_END.search(data)
                        end = m.end() if m is not None else -1
                if end < 0:
                    piece, data = data, b""
                    self._tail = (tail + piece)[-2:]
                elif end == len(data):
                    piece, data = data, b""
                else:
                    piece, data = data[:end], data[end:]
                if not piece:
                    continue
                if not clean and piece.count(b"\n") != (crlf := piece.count(b"\r\n")):
                    # RFC 9112 2.2: a bare LF ends a line too.
                    # (an LF after the CR that ended the last read is no bare LF)
                    split = piece[:1] == b"\n" and tail[-1:] == b"\r"
                    if not split or piece.count(b"\n") != crlf + 1:
                        piece = _BARE_LF.sub(b"\r\n", piece)
                        if split:
                            piece = piece[1:]
                self._head_done = None
                self._parse(piece)
                if self.upgraded:
                    self.rest += data
                    return
                self._after_head(self._head_done)
            elif type(body) is int:
                if body < 0:                                # until the close
                    self._parse(data)
                    return
                n = len(data)
                if n <= body:
                    self._parse(data)
                    data = b""
                    body -= n
                else:
                    self._parse(data[:body])
                    data = data[body:]
                    body = 0
                self._body = body or None
            else:
                try:
                    events, data = body.feed(data)
                except ChunkError as e:
                    self.error = HttpError(400, str(e))
                    raise self.error from None
                self.events.extend(events)
                if body.done:
                    self.events.append(_END)
                    self.cur = None
                    self._body = None
                    self._new_parser()

    _feed = _parse        # a passthrough connection feeds through _split()

    def _stall(self, data: bytes) -> None:
        # A head that used bare LFs: OpenBSD keeps reading until a line ends in
        # CRLF (then the line is garbage: 400) or more than the head limit came
        # without one (413); the request timeout ends the wait.
        self.stalled += len(data)
        if b"\r\n" in data:
            raise HttpError(400, "malformed")
        if self.stalled > self.max_head:
            raise HttpError(413, "request line too long")

    async def _fill(self) -> bool:
        """Receive and feed once; False at end of input."""
        if self.eof or self.upgraded:
            return False
        return self._take(await self.t.receive())

    def _take(self, data: bytes) -> bool:
        """Feed what one receive returned; False at end of input."""
        if not data:
            self.eof = True
            self._at_eof()
            return False
        if self.on_data is not None:
            self.on_data()
        try:
            self._feed(data)
        except HttpError as e:
            if not self.passthrough or not self.events:
                raise
            # Serve what came before the error first (pipelined requests).
            self.events.append(_Failed(e))
            self.eof = True
        return True

    # Called after each received chunk (e.g. to push an inactivity deadline).
    on_data = None

    def pending_error(self, this_message: bool = False) -> HttpError | None:
        """The error queued behind the messages parsed before it in the
        same read (passthrough mode), if any: what a reader reaches later.
        `this_message`: only one inside the body being read (that message
        can never complete)."""
        if not self.eof or not self.events or type(self.events[-1]) is not _Failed:
            return None
        if this_message:
            for ev in self.events:
                if ev is _END or type(ev) is not bytes and type(ev) is not Framing:
                    break
            if type(ev) is not _Failed:
                return None
        return self.events[-1].error

    def _at_eof(self) -> None:
        pass

    async def receive_body(self) -> bytes:
        """The next chunk of the current body; b"" once it has ended."""
        events = self.events
        while True:
            if events:
                ev = events[0]
                if ev is _END:
                    events.popleft()
                    return b""
                t = type(ev)
                if t is bytes or t is Framing:
                    events.popleft()
                    return ev
                if t is _Failed:
                    raise ev.error
                return b""     # the next message's head: this body ended
            if not await self._fill():
                if events:
                    continue        # the close ended a body (_at_eof)
                if self.upgraded:
                    return b""
                raise HttpError(400, "body truncated")


def _parser_reason(e: Exception) -> str:
    msg = str(e) or "malformed"
    if isinstance(e, httptools.HttpParserInvalidMethodError):
        return "invalid method"
    if msg in ("Invalid character in Content-Length", "Content-Length overflow",
               "Empty Content-Length"):
        return BAD_CONTENT_LENGTH
    return msg


class ServerConn(_Conn):
    """The server side of one connection: requests in."""

    def __init__(self, transport: Transport, max_head: int = MAX_HEAD,
                 lenient: bool = False, httpd_rules: bool = False,
                 passthrough: bool = False) -> None:
        super().__init__(transport, max_head, passthrough)
        self.lenient = lenient
        # httpd_rules: OpenBSD httpd's reading of versions and line ends:
        # HTTP/1.x with x > 1 is read as 1.1, a major version above 1 is
        # answered 505, and a head with bare LFs waits for a CRLF.
        self.httpd_rules = httpd_rules
        self.crlf_wait = httpd_rules
        self._new_parser()
        if passthrough:
            self._feed = self._split      # no request-line tracking (httpd's 408)
        self.requests = 0

    def _new_parser(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        if self.lenient or self.httpd_rules:
            # httpd accepts obs-fold continuation lines (httpd.conf(5) era
            # behaviour); the control-character check above stays on.
            self.parser.set_dangerous_leniencies(lenient_headers=self.lenient,
                                                 lenient_version=self.httpd_rules)

    def _new_head(self) -> Request:
        return Request()

    def on_url(self, url: bytes) -> None:
        cur = self.cur
        cur.target += url.decode("latin-1")
        cur.head_size = len(cur.target) + 16
        self._url_chunk = True
        if cur.head_size > self.max_head:
            raise HttpError(413, "request too large")

    _url_chunk = False      # the URL ended in the chunk being fed
    _line_seen = False      # the current head has a complete request line

    def _feed(self, data: bytes) -> None:
        self._url_chunk = False
        in_head = self.in_head and self.cur is not None
        if self._head_escaped and not in_head:
            self._head_escaped = False
        if self.httpd_rules and (self.cur is None or self.in_head) and \
                (data.count(b"\n") != data.count(b"\r\n") or self._head_escaped):
            escaped = self._escape_lf(data)
            if escaped is not None:
                self._lf_escaped = True
                try:
                    _Conn._parse(self, escaped)
                    self._last = data
                finally:
                    # llhttp hands a header line over once the next line
                    # starts (obs-fold): later reads of this head are
                    # escaped too, and restored.
                    self._head_escaped = self._lf_escaped = \
                        self.in_head and self.cur is not None
                    # _escape_lf() found the request line's CRLF (after
                    # on_message_begin() reset this); failed_line() needs it
                    self._line_seen = True
                return
        _Conn._parse(self, data)      # (no super(): called per read)
        if self.httpd_rules:
            self._last = data         # _escape_lf(): a blank line across reads
        cur = self.cur
        if self.in_head and cur is not None and cur.target and not self._line_seen:
            # A CRLF after the URL ends the request line.
            target = cur.target.encode("latin-1")
            i = data.rfind(target) if self._url_chunk else 0
            if b"\r\n" in data[max(i, 0):]:
                self._line_seen = True
                if self.httpd_rules and self.parser.get_http_version() in ("0.0", "0.9"):
                    # `GET /` without a version: OpenBSD httpd answers 400
                    # at once (llhttp would take it for HTTP/0.9 and wait
                    # for the end of a head).  llhttp's version, not the
                    # bytes after `target`: those may be a header value's.
                    self.no_version = True
                    self.error = HttpError(400, "malformed")
                    raise self.error

    no_version = False      # the failed request line had no HTTP version
    _last = b""             # httpd_rules: the previous read
    _head_escaped = False   # httpd_rules: this head's earlier reads were escaped

    def _escape_lf(self, data: bytes) -> bytes | None:
        # OpenBSD httpd ends a line at CRLF only: a bare LF in a header line
        # is part of the value (args-log-user-agent).  llhttp would end the
        # line there, so the header lines of this head go through it with
        # each bare LF as "\x01n" (and "\x01" as "\x01\x01"); on_header
        # restores them.  A request line with a bare LF keeps OpenBSD's
        # wait for a CRLF (_stall).
        if self.in_head and self._line_seen:
            # A leading LF ends the CR the last read ended with (llhttp
            # has that CR); taking it for bare would break the line.
            start = 1 if data[:1] == b"\n" and self._last[-1:] == b"\r" else 0
            # The blank line ending the head may have begun in the last
            # read: the body after it is not escaped.
            tail = self._last[-3:]
            end = (tail + data).find(b"\r\n\r\n")
            end = len(data) if end < 0 else max(end + 2 - len(tail), start)
        else:
            start = data.find(b"\r\n") + 2
            if start < 2:
                return None
            end = data.find(b"\r\n\r\n", max(start - 2, 0))
            end = len(data) if end < 0 else end + 2
        region = data[start:end]
        if region.count(b"\n") == region.count(b"\r\n") and not self._head_escaped:
            return None
        region = _BARE_LF.sub(b"\x01n", region.replace(b"\x01", b"\x01\x01"))
        return data[:start] + region + data[end:]

    def failed_line(self) -> tuple[str, str, str | None] | None:
        """(method, target, version or None) of the request line of a head
        that failed, as far as it was read (OpenBSD logs a bad request with
        what its first line gave); None when no target was read."""
        cur = self.cur
        if cur is None or not cur.target:
            return None
        method = cur.method or self.parser.get_method().decode("ascii", "replace")
        version = None
        if cur.method:                # the whole head was read
            version = cur.version
        elif self._line_seen and not self.no_version:
            version = self.parser.get_http_version()
        if version == "0.9":          # llhttp's reading of a line without one
            version = None
        return method, cur.target, version

    def head_started(self) -> bool:
        """A request head is partly read (at least its request line): on a
        timeout OpenBSD answers 408 then, and closes an idle connection
        silently otherwise."""
        return self.in_head and self.cur is not None and \
            (self._line_seen or bool(self.cur.headers))

    def on_headers_complete(self) -> None:
        cur = self.cur
        p = self.parser
        self.in_head = False
        m = p.get_method()
        method = _methods.get(m)
        if method is None:
            method = m.decode("ascii", "replace")
            if len(_methods) < NAMES_MAX:
                _methods[m] = method
        cur.method = method
        version = cur.version = p.get_http_version()
        cur.keep_alive = p.should_keep_alive()
        if version != "1.1" and version != "1.0":
            if self.httpd_rules:
                major, _, minor = version.partition(".")
                if major == "1":
                    cur.version = "1.1"          # 1.2 .. 1.9 downgraded
                elif major != "0":
                    self.error = HttpError(505, "bad http version")
                    raise self.error
            if cur.version not in ("1.1", "1.0"):
                self.error = HttpError(400, "malformed")
                raise self.error
        hmap = cur.hmap
        hosts = self.hcount.get("host", 1 if "host" in hmap else 0)
        if hosts > 1 or (cur.version == "1.1" and hosts == 0 and not (
                # a proxy's absolute-form target names the host (RFC 9112
                # 3.2.2); relayd takes it without Host, as OpenBSD's does
                self.passthrough and _ABSOLUTE_FORM.match(cur.target))):
            self.error = HttpError(400, "malformed host")
            raise self.error
        if "content-length" in hmap or "transfer-encoding" in hmap:
            try:
                self._check_framing(cur)
            except HttpError as e:
                self.error = e
                raise
        cur.upgrade = p.should_upgrade()
        self._head_done = cur
        self.events.append(cur)

    async def next_request(self, discard_limit: int = 1 << 20) -> Request | None:
        """The next request head, or None when the client is done.

        The unread rest of the previous body is discarded first (up to
        `discard_limit` bytes, else None: not worth keeping the connection).
        """
        events = self.events
        discarded = 0
        while True:
            while events:
                ev = events.popleft()
                if type(ev) is Request:
                    self.requests += 1
                    return ev
                if ev is not _END:
                    if type(ev) is _Failed:
                        raise ev.error
                    discarded += len(ev)
                    if discarded > discard_limit:
                        return None
            # _fill(), inline: one coroutine less per request.
            if self.eof or self.upgraded or not self._take(await self.t.receive()):
                return None


class ClientConn(_Conn):
    """The client side of a backend connection: responses in.

    Call expect(method) before reading each response: the parser cannot know
    that a response to HEAD has no body, so after a HEAD response head the
    parser is replaced (nothing is pipelined to a backend, so no bytes are
    lost)."""

    def __init__(self, transport: Transport, max_head: int = 65536,
                 passthrough: bool = False) -> None:
        super().__init__(transport, max_head, passthrough)
        self.lenient = False
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = False

    def _new_parser(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.in_head = False
        self._replace = False

    def _new_head(self) -> Response:
        return Response()

    def on_status(self, status: bytes) -> None:
        self.cur.reason += status.decode("latin-1")

    def on_headers_complete(self) -> None:
        cur = self.cur
        p = self.parser
        self.in_head = False
        cur.status = p.get_status_code()
        cur.version = p.get_http_version()
        cur.keep_alive = p.should_keep_alive()
        try:
            self._check_framing(cur)
        except HttpError as e:
            self.error = HttpError(502, e.msg)
            raise self.error
        self._head_done = cur
        self.events.append(cur)
        if self.head_request:
            # No body follows a response to HEAD whatever its headers say.
            self.events.append(_END)
            self.cur = None
            self._replace = True

    def expect(self, method: str) -> None:
        self.head_request = method == "HEAD"

    def _feed(self, data: bytes) -> None:
        try:
            if self.passthrough:
                self._split(data)
            else:
                _Conn._parse(self, data)
        except HttpError as e:
            if not self._replace:
                raise HttpError(502, e.msg) from None
        if self._replace:
            self._new_parser()

    def on_message_complete(self) -> None:
        if self._replace:
            return
        super().on_message_complete()

    def _at_eof(self) -> None:
        # A body delimited by the connection close ends here (and only such
        # a body: in passthrough mode a short one stays unfinished).
        if self.cur is not None and not self.in_head and \
                (not self.passthrough or self._body == -1):
            self.events.append(_END)
            self.cur = None

    async def read_response(self) -> Response | None:
        """The next response head (skipping nothing); None at end of input."""
        events = self.events
        while True:
            while events:
                ev = events.popleft()
                if type(ev) is Response:
                    return ev
                if type(ev) is _Failed:
                    raise ev.error
            if not await self._fill():
                return None
