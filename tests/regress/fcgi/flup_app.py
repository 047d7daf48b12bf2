"""A flup WSGI app that shows what httpd sent it.

    flup_app.py unix:/path/to.sock | tcp:HOST:PORT  [MARKS-FILE]

What it does depends on the last component of DOCUMENT_URI:

    (default)   JSON {"env": CGI variables as sent, "len": body length, "md5": ...}
    chunks      three pieces, no Content-Length (httpd must frame the body)
    length      one piece; flup adds Content-Length
    echo        the request body, streamed back as read, no Content-Length
    stream      N (?n=) lines, 0.25 s (?delay=) apart, flushed one by one;
                with ?gate=PATH the second waits for PATH to exist (10 s)
    notfound    Status 404 with a small body
    redirect    Status 302 with Location
    empty       200 with no body and no Content-Length
    stderr      two lines on wsgi.errors (FCGI_STDERR), then "ok"
    sleep       answers after ?s= seconds (default 3)
    forever     64 KiB blocks without end; notes "aborted <n>" in MARKS-FILE
                when the write fails or the generator is closed

A request with an X-Mark header is noted as "seen <value>" in MARKS-FILE.

flup's _sanitizeEnv() is disabled so SCRIPT_NAME/PATH_INFO/QUERY_STRING are
reported exactly as httpd sent them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from urllib.parse import parse_qs

from flup.server.fcgi import WSGIServer

MARKS = sys.argv[2] if len(sys.argv) > 2 else None


class RawServer(WSGIServer):
    def _sanitizeEnv(self, environ):   # report the CGI variables as received
        pass


def _read_all(environ) -> tuple[int, str]:
    stream = environ["wsgi.input"]
    md5 = hashlib.md5()
    n = 0
    while True:
        block = stream.read(65536)
        if not block:
            return n, md5.hexdigest()
        n += len(block)
        md5.update(block)


def _q(environ, name: str, default: str) -> str:
    return parse_qs(environ.get("QUERY_STRING", "")).get(name, [default])[0]


def env(environ, start_response):
    n, digest = _read_all(environ)
    cgi = {k: v for k, v in environ.items() if isinstance(v, str) and not k.startswith("wsgi.")}
    body = json.dumps({"env": cgi, "len": n, "md5": digest}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("X-App", "flup")])
    return [body]


def chunks(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"one\n", b"two\n", b"three\n"]


def length(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"exactly this\n"]


def echo(environ, start_response):
    start_response("200 OK", [("Content-Type", environ.get("CONTENT_TYPE", "application/octet-stream"))])
    stream = environ["wsgi.input"]

    def gen():
        while True:
            block = stream.read(65536)
            if not block:
                return
            yield block
    return gen()


def stream(environ, start_response):
    n = int(_q(environ, "n", "4"))
    delay = float(_q(environ, "delay", "0.25"))
    gate = _q(environ, "gate", "")
    start_response("200 OK", [("Content-Type", "text/plain")])

    def gen():
        for i in range(n):
            if i:
                time.sleep(delay)
            if i == 1 and gate and not _wait_file(gate, 10.0):
                yield b"no gate\n"
                return
            yield f"part {i} {time.time():.3f}\n".encode()
    return gen()


def _wait_file(path: str, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def notfound(environ, start_response):
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"no such thing\n"]


def redirect(environ, start_response):
    start_response("302 Found", [("Location", "http://example.com/elsewhere"),
                                 ("Content-Type", "text/plain")])
    return [b"moved\n"]


def empty(environ, start_response):
    start_response("200 OK", [("X-Empty", "yes")])
    return []


def stderr(environ, start_response):
    err = environ["wsgi.errors"]
    err.write("flup says hello on stderr\nand a second line\n")
    err.flush()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


def sleep(environ, start_response):
    time.sleep(float(_q(environ, "s", "3")))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"late\n"]


def forever(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    block = b"x" * 65536

    def gen():
        sent = 0
        try:
            while True:
                yield block
                sent += 1
        finally:
            if MARKS:
                with open(MARKS, "a") as f:
                    f.write(f"aborted {sent}\n")
    return gen()


ROUTES = {f.__name__: f for f in (chunks, length, echo, stream, notfound, redirect,
                                  empty, stderr, sleep, forever)}


def app(environ, start_response):
    name = environ.get("DOCUMENT_URI", "").rsplit("/", 1)[-1]
    if MARKS and "HTTP_X_MARK" in environ:
        # What reached the application (the HTTP/2 malformed-request tests).
        with open(MARKS, "a") as f:
            f.write(f"seen {environ['HTTP_X_MARK']}\n")
    return ROUTES.get(name, env)(environ, start_response)


def main() -> None:
    kind, _, rest = sys.argv[1].partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        bind = (host, int(port))
    else:
        bind = rest
    RawServer(app, bindAddress=bind).run()


if __name__ == "__main__":
    main()
