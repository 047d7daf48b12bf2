"""A FastCGI responder that misbehaves on request, for httpd's failure tests.

    stub.py unix:/path/to.sock | tcp:HOST:PORT  MARKS-FILE

It reads BEGIN_REQUEST, PARAMS and STDIN, then acts on the last component
of DOCUMENT_URI:

    silent       never answers (reads until httpd closes; notes "closed silent")
    badversion   a record with FastCGI version 2
    badheader    a CGI header line without ':'
    noheaders    STDOUT that never ends the header block, then END_REQUEST
    nothing      END_REQUEST only
    eof          closes the connection without a word
    overloaded   END_REQUEST with protocol status FCGI_OVERLOADED
    truncated    headers and part of the body, then closes (no END_REQUEST)
    forever      STDOUT without end; notes "aborted" when httpd closes or
                 sends FCGI_ABORT_REQUEST
    split        a good answer cut into 1..7-byte records with padding, and
                 management records (id 0) in between
    weirdstatus  `Status: 299 Odd` (not a known code: httpd answers 200)
    lfonly       LF line ends, `Status: 404`, `Location`-less
    clshort      Content-Length: 100 but 5 body bytes
    stderr       STDERR lines, then a small answer
    (other)      200 with the params as `NAME=value` lines

It writes the records by hand (no shared codec), so it is an independent
check of httpd's reader.
"""

from __future__ import annotations

import os
import select
import socket
import socketserver
import struct
import sys
import threading
import time

HDR = struct.Struct("!BBHHBx")
MARKS = sys.argv[2] if len(sys.argv) > 2 else os.devnull
_lock = threading.Lock()

BEGIN, ABORT, END, PARAMS, STDIN, STDOUT, STDERR = 1, 2, 3, 4, 5, 6, 7


def mark(text: str) -> None:
    with _lock, open(MARKS, "a") as f:
        f.write(text + "\n")


def rec(rtype: int, content: bytes = b"", rid: int = 1, pad: int = 0, version: int = 1) -> bytes:
    return HDR.pack(version, rtype, rid, len(content), pad) + content + b"\0" * pad


def end(protocol_status: int = 0) -> bytes:
    return rec(END, struct.pack("!IB3x", 0, protocol_status))


def out(data: bytes) -> bytes:
    return b"".join(rec(STDOUT, data[i:i + 65535]) for i in range(0, len(data), 65535))


def read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            part = sock.recv(n - len(buf))
        except OSError:
            return None
        if not part:
            return None
        buf += part
    return buf


def read_record(sock: socket.socket):
    head = read_exact(sock, HDR.size)
    if head is None:
        return None
    _, rtype, rid, clen, plen = HDR.unpack(head)
    body = read_exact(sock, clen + plen) if clen + plen else b""
    if body is None:
        return None
    return rtype, rid, body[:clen]


def decode_params(data: bytes) -> dict[str, str]:
    params = {}
    pos = 0

    def length() -> int:
        nonlocal pos
        if data[pos] < 128:
            pos += 1
            return data[pos - 1]
        n = struct.unpack_from("!I", data, pos)[0] & 0x7FFFFFFF
        pos += 4
        return n
    while pos < len(data):
        nl = length()
        vl = length()
        name = data[pos:pos + nl]
        pos += nl
        params[name.decode("latin-1")] = data[pos:pos + vl].decode("latin-1")
        pos += vl
    return params


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        params = b""
        stdin_done = False
        while True:
            r = read_record(sock)
            if r is None:
                return
            rtype, _, body = r
            if rtype == PARAMS:
                if not body:
                    break
                params += body
        env = decode_params(params)
        mode = env.get("DOCUMENT_URI", "").rsplit("/", 1)[-1]
        if mode == "silent":
            while read_record(sock) is not None:
                pass
            mark("closed silent")
            return
        if mode == "forever":
            return self.forever(sock)
        while not stdin_done:
            r = read_record(sock)
            if r is None:
                return
            stdin_done = r[0] == STDIN and not r[2]
        answer = getattr(self, "m_" + mode, self.m_default)(env)
        if answer is not None:
            try:
                sock.sendall(answer)
            except OSError:
                pass

    def forever(self, sock: socket.socket) -> None:
        block = out(b"y" * 16384)
        try:
            sock.sendall(out(b"Content-Type: application/octet-stream\r\n\r\n"))
            while True:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    r = read_record(sock)
                    if r is None or r[0] == ABORT:
                        break
                    continue
                sock.sendall(block)
                time.sleep(0.001)
        except OSError:
            pass
        mark("aborted")

    @staticmethod
    def m_default(env):
        body = "".join(f"{k}={v}\n" for k, v in sorted(env.items())).encode("latin-1")
        return out(b"Content-Type: text/plain\r\n\r\n" + body) + rec(STDOUT) + end()

    @staticmethod
    def m_badversion(env):
        return rec(STDOUT, b"Content-Type: text/plain\r\n\r\nhi", version=2) + end()

    @staticmethod
    def m_badheader(env):
        return out(b"Content-Type: text/plain\r\nthis is not a header\r\n\r\nbody") + end()

    @staticmethod
    def m_noheaders(env):
        return out(b"Content-Type: text/plain\r\nno blank line follows") + rec(STDOUT) + end()

    @staticmethod
    def m_nothing(env):
        return end()

    @staticmethod
    def m_eof(env):
        return None     # handle() returns; the server closes the socket

    @staticmethod
    def m_overloaded(env):
        return end(2)

    @staticmethod
    def m_truncated(env):
        return out(b"Content-Type: text/plain\r\n\r\n" + b"z" * 5000)

    @staticmethod
    def m_split(env):
        data = b"Status: 201\r\nContent-Type: text/plain\r\nX-Split: yes\r\n\r\n" + b"0123456789" * 50
        parts = []
        pos = 0
        size = 1
        while pos < len(data):
            parts.append(rec(STDOUT, data[pos:pos + size], pad=(255 if size % 2 else 0)))
            parts.append(rec(10, b"\x00\x00", rid=0))      # GET_VALUES_RESULT-ish, id 0
            pos += size
            size = size % 7 + 1
        return b"".join(parts) + rec(STDERR, b"split done\n") + rec(STDOUT) + end()

    @staticmethod
    def m_weirdstatus(env):
        return out(b"Status: 299 Odd\r\nContent-Type: text/plain\r\n\r\nodd") + rec(STDOUT) + end()

    @staticmethod
    def m_lfonly(env):
        return out(b"Status: 404 Gone Fishing\nContent-Type: text/plain\n\nlf body") + end()

    @staticmethod
    def m_clshort(env):
        return out(b"Content-Length: 100\r\nContent-Type: text/plain\r\n\r\nshort") + end()

    @staticmethod
    def m_stderr(env):
        return (rec(STDERR, b"stub stderr line one\nstub stderr line two\n")
                + out(b"Content-Type: text/plain\r\n\r\nok") + end())


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    kind, _, rest = sys.argv[1].partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        server = TcpServer((host, int(port)), Handler)
    else:
        if os.path.exists(rest):
            os.unlink(rest)
        server = UnixServer(rest, Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
