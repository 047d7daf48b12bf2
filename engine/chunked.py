"""engine.chunked -- the chunked transfer coding read as it came (sans-I/O).

ChunkedReader.feed(bytes) splits a chunked body (RFC 9112 §7.1) into the
payload bytes and the framing around them: each chunk-size line (with its
extensions), the line end after each chunk's data, the last chunk and the
trailer section.  Framing comes out as Framing values holding the line as
received but always ending in CRLF, so a relay can write the sender's own
chunk sizes to the other side and both peers see one framing.

Lines may end in CRLF or a bare LF (RFC 9112 §2.2), as OpenBSD's relayd
reads them; everything else is as strict as llhttp: hex digits only, no
whitespace around the size, no size above 2**63 - 1, extensions and trailer
fields well-formed, no CR but right before LF, no control characters.

No sockets, no HTTP heads: engine.http1 hands it the bytes after a chunked
head and gets back events and whatever followed the body.
"""

from __future__ import annotations

import re

# Longest chunk-size line (with extensions) and trailer section we hold.
LINE_MAX = 4096
TRAILER_MAX = 8192

# chunk-size [ chunk-ext ], RFC 9112 §7.1.1 (no BWS: llhttp refuses it too).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|"
                        + _QUOTED + rb"))?)*")
# A trailer field line: name ":" OWS value, no control character but HTAB.
_FIELD = re.compile(_TOKEN + rb":[\t -~\x80-\xff]*")
# Significant hex digits of the largest size accepted (2**63 - 1).
_SIZE_DIGITS = 16
_SIZE_MAX = (1 << 63) - 1

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class Framing(bytes):
    """Chunked-coding bytes (size line, data end, trailer section) that are
    not payload: forwarded as they are, dropped when a body is unframed."""

    __slots__ = ()


class ChunkError(ValueError):
    """The body breaks the chunked coding; str() is relayd's reason."""


class ChunkedReader:
    """One chunked body; see the module docstring."""

    __slots__ = ("state", "left", "line", "trailer", "line_max", "trailer_max")

    def __init__(self, line_max: int = LINE_MAX, trailer_max: int = TRAILER_MAX) -> None:
        self.state = _SIZE
        self.left = 0                 # data bytes still to come in this chunk
        self.line = b""               # unfinished line
        self.trailer: list[bytes] = []
        self.line_max = line_max
        self.trailer_max = trailer_max

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """(events, rest): payload as bytes and framing as Framing, in wire
        order; `rest` holds what followed the body (b"" until it ended).
        Raises ChunkError."""
        out: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n and self.state != _DONE:
            state = self.state
            if state == _DATA:
                k = min(self.left, n - pos)
                out.append(data if k == n else data[pos:pos + k])
                pos += k
                self.left -= k
                if not self.left:
                    self.state = _DATA_END
                continue
            line, pos = self._line(data, pos)
            if line is None:
                break
            if state == _SIZE:
                self._size(line, out)
            elif state == _DATA_END:
                if line:
                    raise ChunkError("invalid chunk size")
                out.append(Framing(b"\r\n"))
                self.state = _SIZE
            else:
                self._trailer(line, out)
        return out, (data[pos:] if self.state == _DONE else b"")

    def _line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        """The next whole line without its end, or None (kept for later)."""
        limit = self.line_max if self.state != _TRAILER else self.trailer_max
        nl = data.find(b"\n", pos)
        if nl < 0:
            self.line += data[pos:]
            if len(self.line) > limit:
                raise ChunkError("chunk size too long" if self.state == _SIZE
                                 else "invalid chunk trailer")
            return None, len(data)
        line = self.line + data[pos:nl] if self.line else data[pos:nl]
        self.line = b""
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise ChunkError("invalid chunk size")      # a CR not before LF
        if len(line) > limit:
            raise ChunkError("chunk size too long" if self.state == _SIZE
                             else "invalid chunk trailer")
        return line, nl + 1

    def _size(self, line: bytes, out: list[bytes]) -> None:
        m = _SIZE_LINE.fullmatch(line)
        if m is None:
            raise ChunkError("invalid chunk size")
        digits = m.group(1).lstrip(b"0")
        if len(digits) > _SIZE_DIGITS or int(digits or b"0", 16) > _SIZE_MAX:
            raise ChunkError("chunk size too long")
        size = int(digits or b"0", 16)
        out.append(Framing(line + b"\r\n"))
        if size:
            self.left = size
            self.state = _DATA
        else:
            self.state = _TRAILER

    def _trailer(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            self.trailer.append(b"\r\n")
            out.append(Framing(b"".join(self.trailer)))
            self.trailer = []
            self.state = _DONE
            return
        if _FIELD.fullmatch(line) is None:
            # obs-fold, a missing colon, control characters: refused
            raise ChunkError("invalid chunk trailer")
        self.trailer.append(line + b"\r\n")
        if sum(map(len, self.trailer)) > self.trailer_max:
            raise ChunkError("invalid chunk trailer")
