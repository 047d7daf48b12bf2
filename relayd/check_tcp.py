"""check_tcp -- TCP-style health checks: tcp, tls, send/expect, binary.

The common path of every check that opens a connection (OpenBSD's
check_tcp.c and check_tls.c): connect to host:port, optionally complete a
TLS handshake (no certificate or name verification, no SNI), send the
request, then read until a validator is satisfied, the peer closes, or the
check's deadline passes.  check_http builds on open_conn() and exchange().

A check returns a Result tuple (state, message, code): the raw state it
found (HOST_UP, HOST_DOWN or, rarely, HOST_UNKNOWN), OpenBSD's host_error()
text for relayctl and the log, and the HTTP status for `http code mismatch`
(else 0).  Retry bookkeeping is hce's business, not this module's.

Differences from OpenBSD, on purpose:
* a read timeout with data in the buffer validates what arrived, over TLS
  as well as plain TCP (OpenBSD does so for TCP only, and reports `tls read
  timeout` over TLS);
* a send/expect reply that does not match when the peer closes is `down`
  (OpenBSD leaves the host `unknown` in that case, but `down` on a timeout).
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
from functools import lru_cache
from typing import Callable, Optional

import trio

from engine.conn import CLOSED, SocketTransport, StreamTransport, Transport
from shared import glob

# Raw host states, OpenBSD's values (enum host_status).
HOST_DOWN = -1
HOST_UNKNOWN = 0
HOST_UP = 1

Result = tuple  # (state: int, message: str, http code: int)

# Bytes per read (OpenBSD: SMALL_READ_BUF_SIZE = 1024).
READ_SIZE = 4096
# Most bytes a send/expect or http code check buffers before judging.
MAX_BUFFER = 1 << 20

# Result texts (relayd util.c host_error()); relayctl prints the same ones.
TCP_SOCKET_ERROR = "tcp socket error"
TCP_SOCKET_LIMIT = "tcp socket limit"
TCP_SOCKET_OPTION = "tcp socket option"
TCP_CONNECT_FAIL = "tcp connect failed"
TCP_CONNECT_TIMEOUT = "tcp connect timeout"
TCP_CONNECT_OK = "tcp connect ok"
TLS_CONNECT_OK = "tls connect ok"
TLS_CONNECT_FAIL = "tls connect failed"
TLS_CONNECT_TIMEOUT = "tls connect timeout"
TLS_CONNECT_ERROR = "tls connect error"
SEND_EXPECT_OK = "send/expect ok"
SEND_EXPECT_FAIL = "send/expect failed"
# Per phase, indexed by `tls` (False: tcp, True: tls).
WRITE_TIMEOUT = ("tcp write timeout", "tls write timeout")
WRITE_FAIL = ("tcp write failed", "tls write error")
READ_TIMEOUT = ("tcp read timeout", "tls read timeout")
READ_FAIL = ("tcp read failed", "tls read error")

# A validator gets the bytes read so far and whether more can come; it
# returns a Result, or None to keep reading (only when `final` is False).
Validator = Callable[[bytes, bool], Optional[Result]]

_tls_ctx: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    """The client context of every TLS check: no verification (OpenBSD's
    tls_config_insecure_noverifycert + noverifyname)."""
    global _tls_ctx
    if _tls_ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _tls_ctx = ctx
    return _tls_ctx


async def connect(addr: str, port: int, ttl: int, deadline: float):
    """A connected trio socket, or (None, Result) on failure."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        he = TCP_SOCKET_LIMIT if e.errno in (errno.EMFILE, errno.ENFILE) else TCP_SOCKET_ERROR
        return None, (HOST_DOWN, he, 0)
    try:
        if ttl > 0:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    except OSError:
        sock.close()
        return None, (HOST_DOWN, TCP_SOCKET_OPTION, 0)
    with trio.move_on_at(deadline):
        try:
            await sock.connect((addr, port))
        except OSError:
            sock.close()
            return None, (HOST_DOWN, TCP_CONNECT_FAIL, 0)
        return sock, None
    sock.close()
    return None, (HOST_DOWN, TCP_CONNECT_TIMEOUT, 0)


async def open_conn(addr: str, port: int, ttl: int, tls: bool, deadline: float):
    """(Transport, None) once connected (and TLS-established), else
    (None, Result).  The caller closes the transport with close()."""
    sock, res = await connect(addr, port, ttl, deadline)
    if sock is None:
        return None, res
    if not tls:
        return SocketTransport(sock, peer=(addr, port), local=("", 0)), None
    try:
        stream = trio.SSLStream(trio.SocketStream(sock), tls_context())
    except (ssl.SSLError, OSError, ValueError):
        sock.close()
        return None, (HOST_UNKNOWN, TLS_CONNECT_ERROR, 0)
    with trio.move_on_at(deadline):
        try:
            await stream.do_handshake()
        except (*CLOSED, ssl.SSLError):
            await trio.aclose_forcefully(stream)
            return None, (HOST_DOWN, TLS_CONNECT_FAIL, 0)
        return StreamTransport(stream, peer=(addr, port), tls=True), None
    await trio.aclose_forcefully(stream)
    return None, (HOST_DOWN, TLS_CONNECT_TIMEOUT, 0)


async def close(t: Transport) -> None:
    """Close a check connection at once (no TLS close_notify wait)."""
    if isinstance(t, SocketTransport):
        t.sock.close()
    else:
        await trio.aclose_forcefully(t.stream)


async def exchange(t: Transport, send: bytes | None, validate: Validator,
                   deadline: float, tls: bool) -> Result:
    """Send `send` (if any), then read until `validate` decides, the peer
    closes (validate(buf, final=True)) or the deadline passes (validate
    what arrived, else `read timeout`)."""
    if send:
        sent = False
        with trio.move_on_at(deadline):
            try:
                await t.send_all(send)
            except (*CLOSED, ssl.SSLError):
                return (HOST_DOWN, WRITE_FAIL[tls], 0)
            sent = True
        if not sent:
            return (HOST_DOWN, WRITE_TIMEOUT[tls], 0)
    buf = b""
    with trio.move_on_at(deadline):
        while True:
            try:
                data = await t.receive(READ_SIZE)
            except (*CLOSED, ssl.SSLError):
                return (HOST_DOWN, READ_FAIL[tls], 0)
            if not data:
                return validate(buf, True)
            buf += data
            if len(buf) >= MAX_BUFFER:
                return validate(buf, True)
            res = validate(buf, False)
            if res is not None:
                return res
    if buf:
        return validate(buf, True)
    return (HOST_DOWN, READ_TIMEOUT[tls], 0)


# -- send/expect ------------------------------------------------------------
@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern:
    """fnmatch(3) with flags 0 as a compiled regex over latin-1 text.

    See shared.glob.translate()."""
    pat = pattern.encode("utf-8", "surrogateescape").decode("latin-1")
    return re.compile(glob.translate(pat) + r"\Z", re.S)


def fnmatch(pattern: str, data: bytes) -> bool:
    """fnmatch(pattern, data, 0) == 0 for received bytes (up to a NUL,
    as the C string OpenBSD matches)."""
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]
    return glob_regex(pattern).match(data.decode("latin-1")) is not None


def expect_glob(pattern: str) -> Validator:
    rx = glob_regex(pattern)

    def validate(buf: bytes, final: bool) -> Result | None:
        nul = buf.find(b"\0")
        text = (buf if nul < 0 else buf[:nul]).decode("latin-1")
        if rx.match(text) is not None:
            return (HOST_UP, SEND_EXPECT_OK, 0)
        return (HOST_DOWN, SEND_EXPECT_FAIL, 0) if final else None
    return validate


def expect_binary(want: bytes) -> Validator:
    n = len(want)

    def validate(buf: bytes, final: bool) -> Result | None:
        if len(buf) >= n and buf[:n] == want:
            return (HOST_UP, SEND_EXPECT_OK, 0)
        return (HOST_DOWN, SEND_EXPECT_FAIL, 0) if final else None
    return validate


# -- entry point --------------------------------------------------------------
async def check(inst, host, deadline: float) -> Result:
    """Run a tcp, tls, send/expect or binary check of `host` (InstanceHost)
    in table instance `inst` (TableInstance), finished by `deadline`."""
    conf = inst.check
    tls = conf.tls
    if conf.type == "tcp" and not tls:
        # The hot path: connect and close, no transport object.
        sock, res = await connect(host.conf.addr, inst.port, host.conf.ip_ttl, deadline)
        if sock is None:
            return res
        sock.close()
        return (HOST_UP, TCP_CONNECT_OK, 0)
    t, res = await open_conn(host.conf.addr, inst.port, host.conf.ip_ttl, tls, deadline)
    if t is None:
        return res
    try:
        if conf.type in ("tcp", "tls"):
            return (HOST_UP, TLS_CONNECT_OK, 0)
        if conf.type == "binary":
            validate = expect_binary(conf.expect_binary or b"")
        else:
            validate = expect_glob(conf.expect or "")
        return await exchange(t, conf.send, validate, deadline, tls)
    finally:
        await close(t)
