"""fcgi -- sans-I/O FastCGI client codec (the web-server side of FastCGI 1.0).

Encodes BEGIN_REQUEST, PARAMS, STDIN and ABORT_REQUEST records, decodes the
records an application sends back (RecordReader.feed), and parses the CGI
response header block at the start of the STDOUT stream (CgiHeaderParser).

It never touches a socket, never builds the CGI environment and never writes
an HTTP response: server_fcgi does the I/O and the HTTP side.  Malformed
input raises FcgiError, which server_fcgi maps to 502.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

FCGI_VERSION_1 = 1

# Record types (FastCGI 1.0 spec, section 8).
BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11

# Roles and BEGIN_REQUEST flags.
RESPONDER = 1
AUTHORIZER = 2
FILTER = 3
FCGI_KEEP_CONN = 1

# END_REQUEST protocol_status values.
REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3

MAX_CONTENT = 65535            # content_length is a 16-bit field
MAX_PAIR_LENGTH = 0x7FFFFFFF   # 4-byte name/value lengths lose their high bit
CGI_HEADER_MAX = 65536         # largest CGI header block we buffer

HEADER = struct.Struct("!BBHHBx")       # version, type, id, content_len, padding_len
_BEGIN_BODY = struct.Struct("!HB5x")    # role, flags
_END_BODY = struct.Struct("!IB3x")      # app_status, protocol_status
_LEN4 = struct.Struct("!I")

# Padding up to the next multiple of 8, by length.
_PAD = tuple(bytes(n) for n in range(8))
# Records whose body has a fixed size; any other length cannot be decoded.
_FIXED_CONTENT = {BEGIN_REQUEST: 8, END_REQUEST: 8, UNKNOWN_TYPE: 8}


class FcgiError(ValueError):
    """The application sent a malformed record or CGI header block."""


class Record(NamedTuple):
    """One decoded record, padding removed (a tuple: a few of them are made
    per response, and a frozen dataclass costs several times more)."""

    type: int
    request_id: int
    content: bytes


def _header(rtype: int, request_id: int, clen: int, plen: int) -> bytes:
    if not 0 <= request_id <= 0xFFFF:
        raise ValueError(f"request id out of range: {request_id}")
    return HEADER.pack(FCGI_VERSION_1, rtype, request_id, clen, plen)


def encode(rtype: int | Record, content: bytes = b"", request_id: int = 1) -> bytes:
    """Encode content as records of type rtype (or encode a Record as is).

    Content longer than MAX_CONTENT is split over several records.  Each
    record is padded to a multiple of 8 bytes, as nginx and flup do (the
    spec recommends it for alignment).  Empty content gives one empty
    record, which terminates a stream (PARAMS, STDIN, STDOUT, ...).
    """
    if type(rtype) is Record:
        rtype, content, request_id = rtype.type, rtype.content, rtype.request_id
    n = len(content)
    if n <= MAX_CONTENT:        # one record: the common case, kept cheap
        plen = -n & 7
        return _header(rtype, request_id, n, plen) + content + _PAD[plen]
    view = memoryview(content)
    out = bytearray()
    pos = 0
    while pos < n:
        chunk = view[pos:pos + MAX_CONTENT]
        plen = -len(chunk) & 7
        out += _header(rtype, request_id, len(chunk), plen)
        out += chunk
        out += _PAD[plen]
        pos += len(chunk)
    return bytes(out)


def begin_request(request_id: int = 1, role: int = RESPONDER,
                  keep_conn: bool = False) -> bytes:
    """BEGIN_REQUEST record; keep_conn asks the application not to close."""
    flags = FCGI_KEEP_CONN if keep_conn else 0
    return encode(BEGIN_REQUEST, _BEGIN_BODY.pack(role, flags), request_id)


def abort_request(request_id: int = 1) -> bytes:
    """ABORT_REQUEST record (the client went away)."""
    return encode(ABORT_REQUEST, b"", request_id)


def stdin(data: bytes, request_id: int = 1) -> bytes:
    """STDIN records carrying data; stdin(b"") is the end-of-stream record."""
    return encode(STDIN, data, request_id)


def _as_bytes(s: str | bytes) -> bytes:
    # Header values may carry obs-text; latin-1 maps every byte 1:1.
    return s.encode("latin-1") if isinstance(s, str) else bytes(s)


def _length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    if n > MAX_PAIR_LENGTH:
        raise ValueError(f"name or value too long: {n} bytes")
    return _LEN4.pack(n | 0x80000000)


def pair(name: bytes, value: bytes) -> bytes:
    """One encoded name-value pair."""
    nlen = len(name)
    vlen = len(value)
    if nlen < 128 and vlen < 128:
        return b"%c%c%s%s" % (nlen, vlen, name, value)
    return b"".join((_length(nlen), _length(vlen), name, value))


def encode_params(params: Iterable[tuple[str | bytes, str | bytes]],
                  request_id: int = 1) -> bytes:
    """Encode name-value pairs as PARAMS records, then the empty PARAMS record.

    str names and values are encoded as latin-1.
    """
    pairs = []
    for name, value in params:
        if type(name) is not bytes:
            name = _as_bytes(name)
        if type(value) is not bytes:
            value = _as_bytes(value)
        pairs.append(pair(name, value))
    return pack_params(pairs, request_id)


def pack_params(pairs: list[bytes], request_id: int = 1) -> bytes:
    """Encoded pairs (see pair()) as PARAMS records, then the empty one.

    Pairs are packed whole into records of at most MAX_CONTENT bytes; only
    a pair that is larger than one record by itself spans several records.
    """
    data = b"".join(pairs)
    if len(data) <= MAX_CONTENT:
        return (encode(PARAMS, data, request_id) if data else b"") \
            + encode(PARAMS, b"", request_id)
    # The spec makes PARAMS a byte stream, so any split would be legal, but
    # some applications (flup, for one) decode each record on its own and
    # silently mis-read a pair cut in two.  Keeping pairs whole costs nothing.
    out = bytearray()
    buf = bytearray()
    for p in pairs:
        if len(buf) + len(p) > MAX_CONTENT and buf:
            out += encode(PARAMS, bytes(buf), request_id)
            buf.clear()
        if len(p) > MAX_CONTENT:
            out += encode(PARAMS, p, request_id)
        else:
            buf += p
    if buf:
        out += encode(PARAMS, bytes(buf), request_id)
    out += encode(PARAMS, b"", request_id)
    return bytes(out)


def _decode_length(content: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(content):
        raise FcgiError("truncated name-value pair")
    n = content[pos]
    if n < 128:
        return n, pos + 1
    if pos + 4 > len(content):
        raise FcgiError("truncated name-value pair")
    return _LEN4.unpack_from(content, pos)[0] & MAX_PAIR_LENGTH, pos + 4


def decode_params(content: bytes) -> list[tuple[bytes, bytes]]:
    """Decode the name-value pairs of a whole PARAMS stream (records joined)."""
    pairs = []
    pos = 0
    while pos < len(content):
        nlen, pos = _decode_length(content, pos)
        vlen, pos = _decode_length(content, pos)
        if pos + nlen + vlen > len(content):
            raise FcgiError("truncated name-value pair")
        name = content[pos:pos + nlen]
        pos += nlen
        pairs.append((name, content[pos:pos + vlen]))
        pos += vlen
    return pairs


def decode_end_request(content: bytes) -> tuple[int, int]:
    """Return (app_status, protocol_status) from an END_REQUEST body."""
    if len(content) != _END_BODY.size:
        raise FcgiError(f"END_REQUEST body of {len(content)} bytes")
    app_status, protocol_status = _END_BODY.unpack(content)
    return app_status, protocol_status


class RecordReader:
    """Turns the byte stream from a FastCGI application into Records."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Record]:
        """Buffer data and return every record it completes (maybe none).

        Padding is dropped.  Raises FcgiError for a record that is not
        FastCGI 1 or whose length cannot be right for its type.
        """
        self._buf += data
        out = []
        pos = 0
        while (taken := self._take_record(pos)) is not None:
            rec, pos = taken
            out.append(rec)
        # Drop consumed bytes once per feed, not once per record.
        del self._buf[:pos]
        return out

    def eof(self) -> None:
        """The application closed the connection; fail if it left a partial record."""
        if self._buf:
            raise FcgiError(f"connection closed inside a record ({len(self._buf)} bytes)")

    def _take_record(self, pos: int) -> tuple[Record, int] | None:
        buf = self._buf
        if len(buf) - pos < HEADER.size:
            return None
        version, rtype, request_id, clen, plen = HEADER.unpack_from(buf, pos)
        # Anything but version 1 means we are not reading FastCGI (or lost
        # framing); resyncing is impossible, so fail the whole stream.
        if version != FCGI_VERSION_1:
            raise FcgiError(f"bad FastCGI version {version}")
        want = _FIXED_CONTENT.get(rtype)
        if want is not None and clen != want:
            raise FcgiError(f"record type {rtype} with {clen} content bytes")
        start = pos + HEADER.size
        end = start + clen + plen
        if len(buf) < end:
            return None
        return Record(rtype, request_id, bytes(buf[start:start + clen])), end


@dataclass
class CgiHead:
    """The CGI response header block: status, reason and the other headers."""

    status: int
    reason: str | None
    headers: list[tuple[str, str]]


# RFC 7230 token: a header name we would forward must be one.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Control characters other than HTAB would let the app split our response.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS = re.compile(r"([0-9]{3})(?:[ \t]+(.*))?")
# End of the header block: an empty line ending in LF or CRLF, after LF.
_BLANK = re.compile(rb"\n\r?\n")


class CgiHeaderParser:
    """Parses the CGI response header block that starts the STDOUT stream."""

    def __init__(self) -> None:
        # A leading LF lets a block with no headers at all (STDOUT starting
        # with a blank line) match the same pattern as the others.
        self._buf = bytearray(b"\n")
        self._scan = 0

    def feed(self, data: bytes) -> tuple[CgiHead | None, bytes]:
        """Feed STDOUT content; return (None, b"") until the blank line.

        Then return (CgiHead, body bytes that followed the blank line); do
        not call feed again after that.  Lines may end in CRLF or LF, mixed.
        Raises FcgiError for a line without ':', a bad name or value, or a
        block larger than CGI_HEADER_MAX.
        """
        self._buf += data
        m = _BLANK.search(self._buf, self._scan)
        if m is None:
            if len(self._buf) - 1 > CGI_HEADER_MAX:
                raise FcgiError("CGI header block too large")
            # The terminator is at most 3 bytes, so it can only start in the
            # last 2 bytes seen so far; do not rescan the rest.
            self._scan = max(0, len(self._buf) - 2)
            return None, b""
        if m.end() - 1 > CGI_HEADER_MAX:
            raise FcgiError("CGI header block too large")
        head = parse_head(bytes(self._buf[1:m.start()]))
        return head, bytes(self._buf[m.end():])


def head_block(data: bytes) -> tuple[bytes, bytes] | None:
    """STDOUT content given whole, cut at the blank line: (the header
    block, the body), or None when it holds no blank line.  The block is
    what parse_head() takes; raises FcgiError when it is too large."""
    if data[:1] == b"\n":                          # no headers at all
        return b"", data[1:]
    if data[:2] == b"\r\n":
        return b"", data[2:]
    m = _BLANK.search(data)
    if m is None:
        return None
    if m.end() > CGI_HEADER_MAX:
        raise FcgiError("CGI header block too large")
    return data[:m.start()], data[m.end():]


def split_head(data: bytes) -> tuple[CgiHead, bytes] | None:
    """CgiHeaderParser's answer for STDOUT content given whole: (CgiHead,
    body) when it holds the blank line, else None (nothing consumed)."""
    cut = head_block(data)
    if cut is None:
        return None
    return parse_head(cut[0]), cut[1]


def parse_head(block: bytes) -> CgiHead:
    """The header block (lines ending in LF or CRLF, no blank line) as a
    CgiHead; raises FcgiError for a line without ':', a bad name or value."""
    status: int | None = None
    reason: str | None = None
    location = False
    headers: list[tuple[str, str]] = []
    for line in block.split(b"\n") if block else ():
        if line.endswith(b"\r"):
            line = line[:-1]
        name, sep, value = line.partition(b":")
        if not sep:
            raise FcgiError(f"CGI header line without ':': {line[:80]!r}")
        if not _TOKEN.fullmatch(name):
            raise FcgiError(f"bad CGI header name: {name[:80]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise FcgiError(f"control character in CGI header {name.decode()}")
        key = name.decode("ascii")
        text = value.decode("latin-1")
        lower = key.lower()
        if lower == "status":
            status, reason = _parse_status(text)
            continue
        if lower == "location":
            location = True
        headers.append((key, text))
    if status is None:
        # RFC 3875 6.2.3/6.3.3: Location without Status is a client
        # redirect, 302.  XXX A local path ("/x") is a local redirect in
        # 6.2.2 that the server should follow itself; like nginx we answer
        # 302 and let the client do it.
        status = 302 if location else 200
    return CgiHead(status, reason, headers)


def _parse_status(value: str) -> tuple[int, str | None]:
    # OpenBSD falls back to 200 for a Status it cannot use.  1xx is never a
    # valid final response from a CGI script, so it falls back too.
    m = _STATUS.fullmatch(value)
    if m is None or not 200 <= int(m.group(1)) <= 599:
        return 200, None
    return int(m.group(1)), (m.group(2) or None)
