"""check_http -- `check http|https "path" [host "name"] code N | digest "hex"`.

Sends CheckConfig.http_request() (HEAD for code checks, GET for digest
checks, HTTP/1.0 or HTTP/1.1 with Host when `host` is given) over the
connection check_tcp opens, then judges the reply:

* code: as OpenBSD's check_http_code(), on the raw status line: it must
  start with `HTTP/1.0 ` or `HTTP/1.1 ` followed by a three-digit code
  (100-999), else `http code malformed`; a different code is `http code
  mismatch` (and the code is reported).  We judge as soon as the status line
  is complete instead of waiting for the backend to close.
* digest: the response is read with engine.http1.ClientConn and the
  SHA1/MD5 of its body (headers excluded) compared with the configured hex
  string.  The body ends by Content-Length, chunked framing (decoded, unlike
  OpenBSD, which would hash the chunk framing) or the close.

Nothing here knows about retries or logging.
"""

from __future__ import annotations

import hashlib
import ssl

import trio

from engine.conn import CLOSED
from engine.http1 import ClientConn, HttpError
from relayd import check_tcp
from relayd.check_tcp import HOST_DOWN, HOST_UP, Result

HTTP_CODE_OK = "http code ok"
HTTP_CODE_FAIL = "http code mismatch"
HTTP_CODE_ERROR = "http code malformed"
HTTP_DIGEST_OK = "http digest ok"
HTTP_DIGEST_FAIL = "http digest mismatch"
HTTP_DIGEST_ERROR = "http digest malformed"

# A status line longer than this without a line end is judged as it is.
MAX_STATUS_LINE = 8192
# Most body bytes a digest check reads.
MAX_DIGEST_BODY = 64 << 20


def http_code(buf: bytes, want: int) -> Result:
    """OpenBSD's check_http_code() on the bytes received."""
    nul = buf.find(b"\0")
    if nul >= 0:
        buf = buf[:nul]
    if not (buf.startswith(b"HTTP/1.1 ") or buf.startswith(b"HTTP/1.0 ")):
        return (HOST_DOWN, HTTP_CODE_ERROR, 0)
    head = buf[9:]
    if len(head) < 5:                 # code + "\r\n"
        return (HOST_DOWN, HTTP_CODE_ERROR, 0)
    scode = head[:3]
    if not scode.isdigit() or int(scode) < 100:
        return (HOST_DOWN, HTTP_CODE_ERROR, 0)
    code = int(scode)
    if code != want:
        return (HOST_DOWN, HTTP_CODE_FAIL, code)
    return (HOST_UP, HTTP_CODE_OK, 0)


def code_validator(want: int) -> check_tcp.Validator:
    def validate(buf: bytes, final: bool) -> Result | None:
        if not final and b"\n" not in buf and len(buf) < MAX_STATUS_LINE:
            return None
        return http_code(buf, want)
    return validate


async def _digest(t, conf, deadline: float) -> Result:
    tls = conf.tls
    sent = False
    with trio.move_on_at(deadline):
        try:
            await t.send_all(conf.http_request())
        except (*CLOSED, ssl.SSLError):
            return (HOST_DOWN, check_tcp.WRITE_FAIL[tls], 0)
        sent = True
    if not sent:
        return (HOST_DOWN, check_tcp.WRITE_TIMEOUT[tls], 0)
    conn = ClientConn(t)
    conn.expect("GET")
    h = hashlib.new(conf.digest_type or "sha1")
    resp = None
    size = 0
    with trio.move_on_at(deadline):
        try:
            resp = await conn.read_response()
            if resp is None:          # closed before a complete head
                return (HOST_DOWN, HTTP_DIGEST_ERROR, 0)
            while True:
                chunk = await conn.receive_body()
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_DIGEST_BODY:
                    return (HOST_DOWN, HTTP_DIGEST_FAIL, 0)
                h.update(chunk)
        except HttpError:
            # Unparseable head, or a body cut short: hash what came.
            if resp is None:
                return (HOST_DOWN, HTTP_DIGEST_ERROR, 0)
        except (*CLOSED, ssl.SSLError):
            return (HOST_DOWN, check_tcp.READ_FAIL[tls], 0)
    if resp is None:                  # deadline
        if getattr(t, "bytes_in", 0) == 0:
            return (HOST_DOWN, check_tcp.READ_TIMEOUT[tls], 0)
        return (HOST_DOWN, HTTP_DIGEST_ERROR, 0)
    if h.hexdigest() != conf.digest:
        return (HOST_DOWN, HTTP_DIGEST_FAIL, 0)
    return (HOST_UP, HTTP_DIGEST_OK, 0)


async def check(inst, host, deadline: float) -> Result:
    """Run an http/https code or digest check of `host` in `inst`."""
    conf = inst.check
    t, res = await check_tcp.open_conn(host.conf.addr, inst.port, host.conf.ip_ttl,
                                       conf.tls, deadline)
    if t is None:
        return res
    try:
        if conf.digest is not None:
            return await _digest(t, conf, deadline)
        return await check_tcp.exchange(t, conf.http_request(),
                                        code_validator(conf.code or 0), deadline, conf.tls)
    finally:
        await check_tcp.close(t)
