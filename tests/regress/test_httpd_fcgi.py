"""httpd in front of real FastCGI servers (features.md §1.9; H32 H37 H55 H58-H65).

One httpd (chroot "/", absolute roots and sockets under a temp dir) fronts,
per virtual server:
  flup    flup_app.py over a UNIX socket, the same app over TCP, the stub
          (fcgi/stub.py) and the backends that fail (missing, refused, full);
  slow    the same with `connection timeout 1` and a 1000-byte body limit;
  php     php-fpm (Debian's, our own pool) with `directory index index.php`;
  cgi     fcgiwrap running shell CGI scripts.
A second httpd, chrooted to a temp dir, checks the default socket
/run/slowcgi.sock.  Every FastCGI server is started here on a socket in the
temp dir and stopped by PID.  Responses are read with a small raw HTTP
client so the framing (chunked, Content-Length, close) is visible.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import bcrypt
import pytest

from tests.conftest import Daemon, free_port, wait_port
from tests.regress.fcgi import servers

HERE = Path(__file__).resolve().parent / "fcgi"
MIB = 1 << 20

# php-fpm and fcgiwrap are installed by .ci/install-deps (`make deps`):
# a missing one is a failed test, never a skip.
def need_php(test):
    return test


need_fcgiwrap = need_php


# -- a raw HTTP/1.x client ------------------------------------------------------------

class Response:
    def __init__(self) -> None:
        self.version = ""
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.framing = ""          # "length", "chunked", "close" or "none"
        self.complete = True       # False: the connection closed inside the body

    def header(self, name: str) -> str | None:
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def json(self):
        return json.loads(self.body)


class Client:
    """One connection; request() can be called again while it stays open."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.local_port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, method: str, path: str, headers: dict | list | None = None,
             body: bytes | None = None, chunks=None, version: str = "1.1") -> None:
        hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        names = {k.lower() for k, _ in hdrs}
        if "host" not in names and version == "1.1":
            hdrs.insert(0, ("Host", "localhost"))
        if body is not None and "content-length" not in names:
            hdrs.append(("Content-Length", str(len(body))))
        if chunks is not None:
            hdrs.append(("Transfer-Encoding", "chunked"))
        head = f"{method} {path} HTTP/{version}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in hdrs) + "\r\n"
        self.sock.sendall(head.encode("latin-1"))
        if body:
            self.sock.sendall(body)
        if chunks is not None:
            for c in chunks:
                if c:
                    self.sock.sendall(b"%x\r\n" % len(c) + c + b"\r\n")
            self.sock.sendall(b"0\r\n\r\n")

    def read(self, method: str = "GET", on_body=None) -> Response:
        """One response; on_body() is called when the first chunk of a
        chunked body has arrived (before the rest is read)."""
        r = Response()
        line = self.file.readline()
        if not line:
            raise ConnectionError("connection closed before the status line")
        r.version, code, *_ = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        r.status = int(code)
        while True:
            line = self.file.readline().decode("latin-1").rstrip("\r\n")
            if not line:
                break
            k, _, v = line.partition(":")
            r.headers.append((k, v.strip()))
        te = (r.header("transfer-encoding") or "").lower()
        cl = r.header("content-length")
        if method == "HEAD" or r.status in (204, 304) or 100 <= r.status < 200:
            r.framing = "none"
        elif te.endswith("chunked"):
            r.framing = "chunked"
            parts = []
            while True:
                size_line = self.file.readline()
                if not size_line:
                    r.complete = False
                    break
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.file.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.file.read(size)
                parts.append(data)
                if len(data) < size or self.file.read(2) != b"\r\n":
                    r.complete = False
                    break
                if on_body is not None and len(parts) == 1:
                    on_body()
            r.body = b"".join(parts)
        elif cl is not None:
            r.framing = "length"
            r.body = self.file.read(int(cl))
            r.complete = len(r.body) == int(cl)
        else:
            r.framing = "close"
            r.body = self.file.read()
        return r

    def request(self, method: str, path: str, **kw) -> Response:
        self.send(method, path, **kw)
        return self.read(method)


def get(port: int, path: str, method: str = "GET", **kw) -> Response:
    with Client(port) as c:
        return c.request(method, path, **kw)


def env_lines(body: bytes) -> dict[str, str]:
    out = {}
    for line in body.decode("latin-1").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def wait_for(path: Path, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}:\n{content[-3000:]}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_pid(parent: int) -> int:
    """The one `server` child of httpd's parent (prefork 1)."""
    kids = []
    for task in os.listdir(f"/proc/{parent}/task"):     # a child is listed under
        with open(f"/proc/{parent}/task/{task}/children") as f:   # the thread that forked it
            kids += [int(p) for p in f.read().split()]
    for pid in kids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if b"-P" in argv and argv[argv.index(b"-P") + 1] == b"server":
            return pid
    return parent      # no privilege separation: the parent serves


# -- the site ---------------------------------------------------------------------------

CONF = """\
chroot "/"
logdir "{T}/logs"
prefork 1

server "flup" {{
    listen on 127.0.0.1 port {flup}
    connection max request body 33554432
    root "{T}/htdocs"
    fastcgi socket "{T}/flup.sock"
    location "/tcp/*" {{
        fastcgi socket tcp 127.0.0.1 {fluptcp}
    }}
    location "/params/*" {{
        fastcgi {{
            param TANDEM_LITERAL "plain value"
            param TANDEM_MACRO "$REMOTE_ADDR $SERVER_NAME $DOCUMENT_URI"
        }}
        fastcgi param TANDEM_SECOND "two"
    }}
    location "/strip/*" {{
        fastcgi strip 2
    }}
    location "/rstrip/*" {{
        request strip 1
    }}
    location "/rw/*" {{
        request rewrite "/cgi/app.cgi/rewritten?was=$QUERY_STRING"
    }}
    location "/auth/*" {{
        authenticate "fcgi" with "{T}/htpasswd"
    }}
    location "/missing/*" {{
        fastcgi socket "{T}/missing.sock"
    }}
    location "/refused/*" {{
        fastcgi socket "{T}/stale.sock"
    }}
    location "/full/*" {{
        fastcgi socket "{T}/full.sock"
    }}
    location "/tcprefused/*" {{
        fastcgi socket tcp 127.0.0.1 {closed}
    }}
    location "/stub/*" {{
        fastcgi socket "{T}/stub.sock"
    }}
}}

server "slow" {{
    listen on 127.0.0.1 port {slow}
    root "{T}/htdocs"
    connection {{ timeout 1, max request body 1000 }}
    fastcgi socket "{T}/stub.sock"
    location "/flup/*" {{
        fastcgi socket "{T}/flup.sock"
    }}
}}

server "php" {{
    listen on 127.0.0.1 port {php}
    connection max request body 33554432
    root "{T}/php"
    directory index index.php
    location "*.php*" {{
        fastcgi socket "{T}/php.sock"
    }}
}}

server "cgi" {{
    listen on 127.0.0.1 port {cgi}
    connection max request body 33554432
    root "{T}/cgi"
    fastcgi socket "{T}/fcgiwrap.sock"
}}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    T = tmp_path_factory.mktemp("fcgi")
    (T / "logs").mkdir()
    (T / "htdocs" / "cgi").mkdir(parents=True)
    (T / "htdocs" / "cgi" / "app.cgi").write_text("not run: flup answers\n")
    (T / "htdocs" / "dir").mkdir()
    (T / "htdocs" / "strip").mkdir()
    (T / "htdocs" / "strip" / "app.cgi").write_text("")
    shutil.copytree(HERE / "php", T / "php")
    shutil.copytree(HERE / "cgi", T / "cgi")
    for f in (T / "cgi").iterdir():
        f.chmod(0o755)
    pw = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    (T / "htpasswd").write_text(f"alice:{pw}\n")

    # Backends that fail: a socket file nobody listens on, and a full queue.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(T / "stale.sock"))
    stale.close()
    full = socket.socket(socket.AF_UNIX)
    full.bind(str(T / "full.sock"))
    full.listen(0)
    fillers = []
    while True:
        c = socket.socket(socket.AF_UNIX)
        c.setblocking(False)
        fillers.append(c)
        try:
            c.connect(str(T / "full.sock"))
        except BlockingIOError:
            break

    ports = {name: free_port() for name in ("flup", "fluptcp", "slow", "php", "cgi", "closed")}
    started: list = []
    try:
        started.append(servers.start_flup(str(T / "flup.sock"), T, marks=T / "flup.marks"))
        started.append(servers.start_flup(("127.0.0.1", ports["fluptcp"]), T))
        started.append(servers.start_stub(str(T / "stub.sock"), T, T / "stub.marks"))
        php = fcgiwrap = None
        if servers.php_fpm_binary():
            conf = servers.php_fpm_config(T, listen=str(T / "php.sock"), children=3)
            php = servers.start_php_fpm(T, conf)
            started.append(php)
        if servers.fcgiwrap_binary():
            fcgiwrap = servers.start_fcgiwrap(T / "fcgiwrap.sock", T)
            started.append(fcgiwrap)
        conf_path = T / "httpd.conf"
        conf_path.write_text(CONF.format(T=T, **ports))
        httpd = Daemon("httpd", conf_path)
        started.append(httpd)
        for name in ("flup", "slow", "php", "cgi"):
            try:
                wait_port(ports[name], proc=httpd.proc)
            except Exception:
                raise RuntimeError(f"httpd did not start:\n{httpd.output()}")
        yield SimpleNamespace(T=T, httpd=httpd, php_fpm=php, fcgiwrap=fcgiwrap,
                              error_log=T / "logs" / "error.log",
                              access_log=T / "logs" / "access.log", **ports)
    finally:
        for s in reversed(started):
            s.stop()
        for c in fillers:
            c.close()
        full.close()


# -- CGI environment (H58-H63) --------------------------------------------------------------

def test_flup_unix_environment(site) -> None:
    """H58/H60/H61: every CGI variable, HTTP_* mangling, the script split."""
    with Client(site.flup) as c:
        r = c.request("GET", "/cgi/app.cgi/extra%20path/x?x=1&y=%20", headers=[
            ("Host", "www.example.com"), ("User-Agent", "tandem-test/1"),
            ("X-Foo-Bar", "dash"), ("X.Dot", "dot"), ("x_under", "under"),
            ("Accept", "*/*")])
        port = c.local_port
    assert r.status == 200 and r.header("X-App") == "flup"
    env = r.json()["env"]
    T = str(site.T)
    expected = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "OpenBSD httpd",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": "/cgi/app.cgi/extra%20path/x?x=1&y=%20",
        "QUERY_STRING": "x=1&y=%20",
        "SCRIPT_NAME": "/cgi/app.cgi",
        "PATH_INFO": "/extra path/x",
        "SCRIPT_FILENAME": f"{T}/htdocs/cgi/app.cgi",
        "DOCUMENT_ROOT": f"{T}/htdocs",
        "DOCUMENT_URI": "/cgi/app.cgi/extra path/x",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(port),
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": str(site.flup),
        "SERVER_NAME": "flup",
        "HTTP_HOST": "www.example.com",
        "HTTP_USER_AGENT": "tandem-test/1",
        "HTTP_X_FOO_BAR": "dash",
        "HTTP_X.DOT": "dot",
        "HTTP_X_UNDER": "under",
        "HTTP_ACCEPT": "*/*",
    }
    assert {k: env.get(k) for k in expected} == expected
    for absent in ("HTTPS", "TLS_PEER_VERIFY", "REMOTE_USER", "CONTENT_LENGTH",
                   "CONTENT_TYPE", "HTTP_CONTENT_LENGTH", "HTTP_CONTENT_TYPE"):
        assert absent not in env


def test_flup_tcp_environment_and_post(site) -> None:
    """H59/H65: TCP backend; CONTENT_* are not duplicated as HTTP_*."""
    body = b"a=1&b=2"
    r = get(site.flup, "/tcp/echo.py?q", method="POST", body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 200
    data = r.json()
    env = data["env"]
    assert env["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert env["CONTENT_LENGTH"] == str(len(body))
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["REQUEST_METHOD"] == "POST" and env["QUERY_STRING"] == "q"
    assert env["SCRIPT_NAME"] == "" and env["PATH_INFO"] == "/tcp/echo.py"
    assert env["SCRIPT_FILENAME"] == f"{site.T}/htdocs"
    assert data["len"] == len(body) and data["md5"] == hashlib.md5(body).hexdigest()


def test_http10_protocol_and_no_host(site) -> None:
    with Client(site.flup) as c:
        r = c.request("GET", "/cgi/app.cgi", version="1.0")
    env = r.json()["env"]
    assert env["SERVER_PROTOCOL"] == "HTTP/1.0" and "HTTP_HOST" not in env
    assert env["PATH_INFO"] == "" and env["QUERY_STRING"] == ""


def test_script_split_directory_and_missing(site) -> None:
    """H61: the longest existing prefix is the script, a directory too."""
    env = get(site.flup, "/dir/a/b").json()["env"]
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/dir", "/a/b")
    env = get(site.flup, "/nothing/here").json()["env"]
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/nothing/here")
    assert env["SCRIPT_FILENAME"] == f"{site.T}/htdocs"


def test_fastcgi_param(site) -> None:
    """H62: `fastcgi param`, repeated, with macros; inherits the server's socket."""
    env = get(site.flup, "/params/x").json()["env"]
    assert env["TANDEM_LITERAL"] == "plain value"
    assert env["TANDEM_MACRO"] == "127.0.0.1 flup /params/x"
    assert env["TANDEM_SECOND"] == "two"


def test_fastcgi_strip(site) -> None:
    """H63: `fastcgi strip 2` shortens DOCUMENT_ROOT and SCRIPT_FILENAME."""
    T = str(site.T)
    first_two = "/".join(T.split("/")[:3])       # "/tmp/pytest-..."
    env = get(site.flup, "/strip/app.cgi/info").json()["env"]
    assert env["DOCUMENT_ROOT"] == f"{T}/htdocs"[len(first_two):]
    assert env["SCRIPT_FILENAME"] == f"{T}/htdocs/strip/app.cgi"[len(first_two):]
    assert env["SCRIPT_NAME"] == "/strip/app.cgi" and env["PATH_INFO"] == "/info"


def test_request_strip_keeps_prefix_in_script_name(site) -> None:
    env = get(site.flup, "/rstrip/cgi/app.cgi/more").json()["env"]
    assert env["SCRIPT_FILENAME"] == f"{site.T}/htdocs/cgi/app.cgi"
    assert env["SCRIPT_NAME"] == "/rstrip/cgi/app.cgi"
    assert env["PATH_INFO"] == "/more"
    assert env["DOCUMENT_URI"] == "/rstrip/cgi/app.cgi/more"


def test_rewrite_changes_path_and_query_not_request_uri(site) -> None:
    env = get(site.flup, "/rw/orig?q=1").json()["env"]
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/cgi/app.cgi", "/rewritten")
    assert env["DOCUMENT_URI"] == "/cgi/app.cgi/rewritten"
    assert env["QUERY_STRING"] == "was=q=1"
    assert env["REQUEST_URI"] == "/rw/orig?q=1"


def test_remote_user(site) -> None:
    auth = "Basic " + base64.b64encode(b"alice:secret").decode()
    assert get(site.flup, "/auth/x").status == 401
    env = get(site.flup, "/auth/x", headers={"Authorization": auth}).json()["env"]
    assert env["REMOTE_USER"] == "alice"
    assert env["HTTP_AUTHORIZATION"] == auth


@need_php
def test_php_environment(site) -> None:
    with Client(site.php) as c:
        r = c.request("GET", "/env.php/extra?a=b", headers={"X-Custom-Header": "php"})
        port = c.local_port
    assert r.status == 200 and r.header("X-App") == "php"
    env = r.json()["env"]
    T = str(site.T)
    expected = {
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_SOFTWARE": "OpenBSD httpd",
        "SERVER_PROTOCOL": "HTTP/1.1", "REQUEST_METHOD": "GET",
        "REQUEST_URI": "/env.php/extra?a=b", "QUERY_STRING": "a=b",
        "SCRIPT_NAME": "/env.php", "PATH_INFO": "/extra",
        "SCRIPT_FILENAME": f"{T}/php/env.php", "DOCUMENT_ROOT": f"{T}/php",
        "DOCUMENT_URI": "/env.php/extra", "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(port), "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": str(site.php), "SERVER_NAME": "php",
        "HTTP_HOST": "localhost", "HTTP_X_CUSTOM_HEADER": "php",
    }
    assert {k: str(env.get(k)) for k in expected} == expected


@need_fcgiwrap
def test_fcgiwrap_environment(site) -> None:
    with Client(site.cgi) as c:
        r = c.request("POST", "/env.cgi/p/i?k=v", body=b"ignored",
                      headers={"Content-Type": "text/plain", "X-Shell": "sh"})
        port = c.local_port
    assert r.status == 200 and r.header("X-App") == "fcgiwrap"
    env = env_lines(r.body)
    T = str(site.T)
    expected = {
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_SOFTWARE": "OpenBSD httpd",
        "SERVER_PROTOCOL": "HTTP/1.1", "REQUEST_METHOD": "POST",
        "REQUEST_URI": "/env.cgi/p/i?k=v", "QUERY_STRING": "k=v",
        "SCRIPT_NAME": "/env.cgi", "PATH_INFO": "/p/i",
        "SCRIPT_FILENAME": f"{T}/cgi/env.cgi", "DOCUMENT_ROOT": f"{T}/cgi",
        "DOCUMENT_URI": "/env.cgi/p/i", "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(port), "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": str(site.cgi), "SERVER_NAME": "cgi",
        "CONTENT_TYPE": "text/plain", "CONTENT_LENGTH": "7",
        "HTTP_HOST": "localhost", "HTTP_X_SHELL": "sh",
    }
    assert {k: env.get(k) for k in expected} == expected


# -- request bodies (H55, H65) ------------------------------------------------------------------

BIG = os.urandom(MIB) * 10     # 10 MiB; repeated random so md5 still checks order


@pytest.mark.parametrize("backend", ["flup", "flup-tcp", "php", "fcgiwrap"])
def test_post_10mib(site, backend: str) -> None:
    port, path = {"flup": (site.flup, "/md5"), "flup-tcp": (site.flup, "/tcp/md5"),
                  "php": (site.php, "/env.php"), "fcgiwrap": (site.cgi, "/md5.cgi")}[backend]
    if backend == "php" and site.php_fpm is None or backend == "fcgiwrap" and site.fcgiwrap is None:
        pytest.fail(f"{backend} not installed")
    r = get(port, path, method="POST", body=BIG,
            headers={"Content-Type": "application/octet-stream"})
    assert r.status == 200
    want = hashlib.md5(BIG).hexdigest()
    if backend == "fcgiwrap":
        assert r.body.decode().strip() == want
    else:
        data = r.json()
        assert (data["len"], data["md5"]) == (len(BIG), want)


@pytest.mark.parametrize("backend", ["flup", "fcgiwrap"])
def test_chunked_upload(site, backend: str) -> None:
    """H55: a chunked body is de-chunked into STDIN, without CONTENT_LENGTH."""
    if backend == "fcgiwrap" and site.fcgiwrap is None:
        pytest.fail("fcgiwrap not installed")
    pieces = [os.urandom(n) for n in (1, 100, 65536, 70000, 3, 1 << 20)]
    whole = b"".join(pieces)
    port, path = (site.flup, "/md5") if backend == "flup" else (site.cgi, "/md5.cgi")
    r = get(port, path, method="POST", chunks=pieces)
    assert r.status == 200
    if backend == "flup":
        data = r.json()
        assert (data["len"], data["md5"]) == (len(whole), hashlib.md5(whole).hexdigest())
        assert "CONTENT_LENGTH" not in data["env"]
    else:
        assert r.body.decode().strip() == hashlib.md5(whole).hexdigest()


def test_echo_streams_both_ways(site) -> None:
    """A 10 MiB body echoed back: streamed in and out, chunked to the client."""
    with Client(site.flup) as c:
        # Like any real client, send and read at the same time: the app
        # echoes as it reads, so the response flows before the upload ends.
        sender = threading.Thread(target=c.send, args=("POST", "/echo"), kwargs={"body": BIG})
        sender.start()
        try:
            r = c.read()
        finally:
            sender.join()
    assert r.status == 200 and r.framing == "chunked" and r.complete
    assert len(r.body) == len(BIG) and hashlib.md5(r.body).digest() == hashlib.md5(BIG).digest()


@pytest.mark.parametrize("chunked", [False, True])
def test_body_reaches_app_before_upload_ends(site, chunked: bool) -> None:
    """Never buffered whole: the app echoes the first half while the client
    still holds back the second."""
    half = os.urandom(MIB)
    with Client(site.flup) as c:
        if chunked:
            c.sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"%x\r\n" % len(half) + half + b"\r\n")
        else:
            c.sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                           % (2 * len(half)) + half)
        assert c.file.readline().startswith(b"HTTP/1.1 200")
        while c.file.readline() not in (b"\r\n", b""):
            pass
        got = b""
        while len(got) < 65536:                     # echoed bytes of the first half
            size = int(c.file.readline(), 16)
            got += c.file.read(size)
            c.file.read(2)
        assert got == half[:len(got)]
        second = os.urandom(MIB)
        if chunked:
            c.sock.sendall(b"%x\r\n" % len(second) + second + b"\r\n0\r\n\r\n")
        else:
            c.sock.sendall(second)
        while True:
            size = int(c.file.readline(), 16)
            if size == 0:
                break
            got += c.file.read(size)
            c.file.read(2)
    assert got == half + second


def test_chunked_body_over_limit_is_413(site) -> None:
    r = get(site.slow, "/flup/md5", method="POST", chunks=[b"x" * 600, b"y" * 600])
    assert r.status == 413
    r = get(site.slow, "/flup/md5", method="POST", chunks=[b"x" * 600])
    assert r.status == 200 and r.json()["len"] == 600


# -- responses (H64) --------------------------------------------------------------------------

def test_no_length_is_chunked_for_http11(site) -> None:
    with Client(site.flup) as c:
        r = c.request("GET", "/chunks")
        assert r.status == 200 and r.framing == "chunked" and r.body == b"one\ntwo\nthree\n"
        assert r.header("Content-Length") is None and r.header("Connection") == "keep-alive"
        assert r.header("Server") == "OpenBSD httpd" and r.header("Date")
        # keep-alive: the same connection serves the next request
        r2 = c.request("GET", "/length")
        assert r2.status == 200 and r2.body == b"exactly this\n"


def test_no_length_is_close_delimited_for_http10(site) -> None:
    with Client(site.flup) as c:
        r = c.request("GET", "/chunks", version="1.0", headers={"Connection": "keep-alive"})
    assert r.status == 200 and r.version == "HTTP/1.0"
    assert r.framing == "close" and r.body == b"one\ntwo\nthree\n"
    assert r.header("Connection") == "close" and r.header("Transfer-Encoding") is None


def test_app_content_length_passed_through(site) -> None:
    r = get(site.flup, "/length")
    assert r.framing == "length" and r.header("Content-Length") == "13"
    assert r.header("Transfer-Encoding") is None and r.body == b"exactly this\n"


def test_empty_body_gets_content_length_zero(site) -> None:
    with Client(site.flup) as c:
        r = c.request("GET", "/empty")
        assert r.status == 200 and r.header("Content-Length") == "0" and r.body == b""
        assert r.header("X-Empty") == "yes"
        assert c.request("GET", "/length").status == 200


def test_head_has_no_body(site) -> None:
    with Client(site.flup) as c:
        r = c.request("HEAD", "/chunks")
        assert r.status == 200 and r.header("Content-Type") == "text/plain"
        r = c.request("HEAD", "/length")
        assert r.status == 200 and r.header("Content-Length") == "13"
        # nothing was left on the wire: the next answer parses
        r = c.request("GET", "/length")
        assert r.body == b"exactly this\n"


def test_same_app_head_under_every_request_shape(site) -> None:
    """php-fpm sends the same CGI header block every time, whole in one
    read: httpd remembers the head it made of it (server_fcgi._HEADS).
    Each shape of request must still get its own framing and Connection."""
    with Client(site.php) as c:
        for _ in range(2):
            r = c.request("GET", "/hello.php")
            assert r.status == 200 and r.framing == "chunked" and r.body == b"Hello from PHP\n"
            assert r.header("Connection") == "keep-alive" and r.header("Date")
            r = c.request("HEAD", "/hello.php")
            assert r.status == 200 and r.header("Transfer-Encoding") is None
            assert r.header("Content-Type") and r.header("Connection") == "keep-alive"
            r = c.request("GET", "/status.php")
            assert r.status == 404 and r.body == b"php not found\n"
            assert r.header("Content-Type").startswith("text/plain")
        r = c.request("GET", "/hello.php", headers={"Connection": "close"})
        assert r.framing == "chunked" and r.header("Connection") == "close"
        assert r.body == b"Hello from PHP\n"
    for _ in range(2):
        r = get(site.php, "/hello.php", version="1.0")
        assert r.version == "HTTP/1.0" and r.framing == "close"
        assert r.header("Connection") == "close" and r.body == b"Hello from PHP\n"
    r = get(site.php, "/hello.php")
    assert r.framing == "chunked" and r.header("Connection") == "keep-alive"


def test_script_split_follows_the_file_system(site) -> None:
    """The pairs of a script that exists as named are remembered, but each
    request stats it again: once it is gone, the split walks back, and a
    file that appears is found."""
    script = site.T / "htdocs" / "dir" / "come-and-go"
    split = lambda: (lambda e: (e["SCRIPT_NAME"], e["PATH_INFO"], e["SCRIPT_FILENAME"]))(
        get(site.flup, "/dir/come-and-go").json()["env"])
    assert split() == ("/dir", "/come-and-go", f"{site.T}/htdocs/dir")
    script.write_text("")
    try:
        for _ in range(2):
            assert split() == ("/dir/come-and-go", "", f"{site.T}/htdocs/dir/come-and-go")
    finally:
        script.unlink()
    for _ in range(2):
        assert split() == ("/dir", "/come-and-go", f"{site.T}/htdocs/dir")


@pytest.mark.parametrize("backend", ["flup", "php", "fcgiwrap"])
def test_status_404(site, backend: str) -> None:
    port, path, text = {"flup": (site.flup, "/notfound", b"no such thing\n"),
                        "php": (site.php, "/status.php", b"php not found\n"),
                        "fcgiwrap": (site.cgi, "/status.cgi", b"cgi not found\n")}[backend]
    if backend == "php" and site.php_fpm is None or backend == "fcgiwrap" and site.fcgiwrap is None:
        pytest.fail(f"{backend} not installed")
    r = get(port, path)
    assert r.status == 404 and r.body == text
    assert r.header("Status") is None


@pytest.mark.parametrize("backend", ["flup", "php", "fcgiwrap"])
def test_redirect_location(site, backend: str) -> None:
    port, path, where = {"flup": (site.flup, "/redirect", "http://example.com/elsewhere"),
                         "php": (site.php, "/redirect.php", "http://example.com/from-php"),
                         "fcgiwrap": (site.cgi, "/redirect.cgi", "http://example.com/from-cgi"),
                         }[backend]
    if backend == "php" and site.php_fpm is None or backend == "fcgiwrap" and site.fcgiwrap is None:
        pytest.fail(f"{backend} not installed")
    r = get(port, path)
    assert r.status == 302 and r.header("Location") == where


# fcgiwrap is left out: it buffers the script's output until the script ends
# (libfcgi stream), so there is nothing to stream.
@pytest.mark.parametrize("backend", ["flup", "php"])
def test_streamed_response(site, backend: str) -> None:
    """The first part reaches the client while the app is still running:
    the app writes the rest only once the client has created the gate file
    it waits for (10 s at most, then it writes "no gate")."""
    gates = Path(tempfile.mkdtemp(prefix="fcgi-gate-"))   # php-fpm's user reads it
    gates.chmod(0o755)
    gate = gates / "go"
    try:
        port, path = {"flup": (site.flup, f"/stream?n=4&delay=0&gate={gate}"),
                      "php": (site.php, f"/stream.php?gate={gate}")}[backend]
        if backend == "php" and site.php_fpm is None:
            pytest.fail("php-fpm not installed")
        with Client(port) as c:
            c.send("GET", path)
            r = c.read(on_body=lambda: gate.write_text("go\n"))
        assert r.status == 200 and r.framing == "chunked"
        assert r.body.count(b"part ") == 4 and b"no gate" not in r.body, r.body
    finally:
        shutil.rmtree(gates, ignore_errors=True)


def test_stub_split_records_and_management_records(site) -> None:
    r = get(site.flup, "/stub/split")
    assert r.status == 201 and r.header("X-Split") == "yes"
    assert r.body == b"0123456789" * 50
    wait_for(site.error_log, "split done")


def test_invalid_status_is_200_and_lf_only_headers(site) -> None:
    r = get(site.flup, "/stub/weirdstatus")
    assert r.status == 200 and r.body == b"odd"
    r = get(site.flup, "/stub/lfonly")
    assert r.status == 404 and r.body == b"lf body"


def test_short_body_against_content_length_closes(site) -> None:
    with Client(site.flup) as c:
        c.send("GET", "/stub/clshort")
        r = c.read()
        assert r.status == 200 and r.header("Content-Length") == "100"
        assert not r.complete and r.body == b"short"


@pytest.mark.parametrize("backend,path,text", [
    ("flup", "/stderr", "flup says hello on stderr"),
    ("flup", "/stub/stderr", "stub stderr line two"),
    ("php", "/stderr.php", "php says hello on stderr"),
    ("fcgiwrap", "/stderr.cgi", "cgi says hello on stderr"),
])
def test_stderr_goes_to_error_log(site, backend: str, path: str, text: str) -> None:
    if backend == "php" and site.php_fpm is None or backend == "fcgiwrap" and site.fcgiwrap is None:
        pytest.fail(f"{backend} not installed")
    port = {"flup": site.flup, "php": site.php, "fcgiwrap": site.cgi}[backend]
    r = get(port, path)
    assert r.status == 200 and r.body.startswith(b"ok")
    wait_for(site.error_log, text)


# -- index re-entry (H37) -------------------------------------------------------------------------

@need_php
def test_index_php_reenters_location(site) -> None:
    r = get(site.php, "/app/")
    assert r.status == 200
    data = r.json()
    assert data["index"] is True
    assert data["DOCUMENT_URI"] == "/app/index.php"
    assert data["SCRIPT_NAME"] == "/app/index.php"
    assert data["REQUEST_URI"] == "/app/"
    assert data["SCRIPT_FILENAME"] == f"{site.T}/php/app/index.php"


# -- failures ---------------------------------------------------------------------------------------

def _error_page(r: Response, status: int) -> None:
    assert r.status == status
    assert r.version == "HTTP/1.0" and r.header("Connection") == "close"
    assert r.header("Content-Type") == "text/html"
    assert f"{status} ".encode() in r.body and b"<html" in r.body


def _still_serving(site) -> None:
    r = get(site.flup, "/length")
    assert r.status == 200 and r.body == b"exactly this\n"


@pytest.mark.parametrize("path,status,logged", [
    ("/missing/x", 502, "{T}/missing.sock: connect failed"),
    ("/refused/x", 502, "{T}/stale.sock: connect failed"),
    ("/full/x", 503, "{T}/full.sock: connect failed"),
    ("/tcprefused/x", 502, "127.0.0.1:{closed}: connect failed"),
    ("/stub/badversion", 502, "stub.sock: malformed response"),
    ("/stub/badheader", 502, "stub.sock: malformed response"),
    ("/stub/noheaders", 502, "stub.sock: no response headers"),
    ("/stub/nothing", 502, "stub.sock: no response headers"),
    ("/stub/eof", 502, "stub.sock: connection closed before the end of the request"),
    ("/stub/overloaded", 503, "stub.sock: application overloaded"),
])
def test_backend_failures(site, path: str, status: int, logged: str) -> None:
    r = get(site.flup, path)
    _error_page(r, status)
    wait_for(site.error_log, logged.format(T=site.T, closed=site.closed))
    _still_serving(site)


def test_failure_line_names_server_and_backend(site) -> None:
    get(site.flup, "/missing/y")
    wait_for(site.error_log, f"server flup, fastcgi {site.T}/missing.sock: connect failed")


def test_head_on_failure_has_no_body(site) -> None:
    with Client(site.flup) as c:
        c.send("HEAD", "/missing/x")
        r = c.read("HEAD")
        assert r.status == 502 and c.file.read() == b""


def test_silent_backend_is_504(site) -> None:
    """H32: `connection timeout 1` and a backend that never answers."""
    t0 = time.monotonic()
    r = get(site.slow, "/silent")
    elapsed = time.monotonic() - t0
    _error_page(r, 504)
    assert elapsed >= 0.8                   # not before `connection timeout 1`
    wait_for(site.error_log, f"server slow, fastcgi {site.T}/stub.sock: timeout")
    wait_for(site.T / "stub.marks", "closed silent")    # the backend connection was closed


def test_slow_app_is_504_then_fine(site) -> None:
    r = get(site.slow, "/flup/sleep?s=2.5")
    _error_page(r, 504)
    r = get(site.slow, "/flup/length")
    assert r.status == 200


def test_truncated_response_closes_connection(site) -> None:
    with Client(site.flup) as c:
        c.send("GET", "/stub/truncated")
        r = c.read()
        assert r.status == 200 and r.framing == "chunked"
        assert not r.complete and r.body == b"z" * 5000
    wait_for(site.error_log, "stub.sock: connection closed before the end of the request")
    _still_serving(site)


@pytest.mark.parametrize("path,marks", [("/stub/forever", "stub.marks"),
                                        ("/forever", "flup.marks")])
def test_client_disconnect_aborts_request(site, path: str, marks: str) -> None:
    """The backend connection is closed and nothing leaks."""
    markfile = site.T / marks
    before_marks = markfile.read_text().count("aborted") if markfile.exists() else 0
    _still_serving(site)
    time.sleep(0.2)
    server = server_pid(site.httpd.pid)
    fds_before = open_fds(server)
    c = Client(site.flup)
    c.send("GET", path)
    assert c.file.readline().startswith(b"HTTP/1.1 200")
    got = 0
    while got < 300_000:
        got += len(c.file.read1(65536))
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()      # RST: httpd's next send fails
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = markfile.read_text() if markfile.exists() else ""
        if text.count("aborted") > before_marks:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the backend never saw the abort ({markfile})")
    _still_serving(site)
    deadline = time.monotonic() + 5
    while open_fds(server) > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(server) <= fds_before


def test_access_log_line(site) -> None:
    get(site.flup, "/length?z=1")
    wait_for(site.access_log, '"GET /length?z=1 HTTP/1.1" 200 13')


# -- the default socket, inside a real chroot directory (H58) -------------------------------------

def test_default_socket_in_chroot(tmp_path, daemons) -> None:
    chroot = tmp_path / "chroot"
    (chroot / "run").mkdir(parents=True)
    (chroot / "htdocs").mkdir()
    (chroot / "logs").mkdir()
    flup = servers.start_flup(str(chroot / "run" / "slowcgi.sock"), tmp_path)
    try:
        port = free_port()
        conf = tmp_path / "httpd.conf"
        conf.write_text(f'chroot "{chroot}"\nprefork 1\n'
                        f'server "default" {{\n  listen on 127.0.0.1 port {port}\n'
                        f'  root "/htdocs"\n  fastcgi\n}}\n')
        daemons("httpd", conf, ports=[port])
        env = get(port, "/x/y?q=1").json()["env"]
        # Paths are as seen inside the chroot.
        assert env["DOCUMENT_ROOT"] == "/htdocs" and env["SCRIPT_FILENAME"] == "/htdocs"
        assert env["PATH_INFO"] == "/x/y" and env["QUERY_STRING"] == "q=1"
    finally:
        flup.stop()


# -- HTTPS and TLS_PEER_VERIFY (the TLS listener is not built yet: cgi_env directly) -------------

def test_cgi_env_tls_variables(tmp_path) -> None:
    from engine.http1 import Request
    from httpd import server_fcgi
    from httpd.config import FastcgiConfig, ServerConfig, TlsConfig

    req = Request()
    req.method, req.target, req.version = "GET", "/a?b", "1.1"
    req.headers = [("Host", "h"), ("Content-Type", "x/y")]
    req.hmap = {"host": "h", "content-type": "x/y"}
    tls = TlsConfig(client_ca="/ca.pem", crl="/crl.pem", client_optional=True)
    conf = ServerConfig(id=1, name="s", where="-", root=str(tmp_path),
                        fastcgi=FastcgiConfig(), tls=tls)
    worker = SimpleNamespace(fs=lambda p: p)
    x = SimpleNamespace(req=req, t=SimpleNamespace(peer=("10.0.0.1", 4000), local=("10.0.0.2", 443)),
                        path="/a", query="b", user=None, worker=worker, srv=conf,
                        ctx=SimpleNamespace(tls=True), version="HTTP/1.1", log_path="/a",
                        expand=lambda v: v)
    env = dict(server_fcgi.cgi_env(x, conf))
    assert env[b"HTTPS"] == b"on"
    assert env[b"TLS_PEER_VERIFY"] == b"ca, crl, optional"
    assert env[b"CONTENT_TYPE"] == b"x/y" and b"HTTP_CONTENT_TYPE" not in env
    conf2 = ServerConfig(id=1, name="s", where="-", root=str(tmp_path), fastcgi=FastcgiConfig(),
                         tls=TlsConfig())
    env = dict(server_fcgi.cgi_env(x, conf2))
    assert env[b"HTTPS"] == b"on" and b"TLS_PEER_VERIFY" not in env
    x.ctx.tls = False
    env = dict(server_fcgi.cgi_env(x, conf))
    assert b"HTTPS" not in env and b"TLS_PEER_VERIFY" not in env


# -- helpers of server_fcgi, without a daemon ---------------------------------------------------

def test_root_strip_like_openbsd() -> None:
    from httpd.server_fcgi import root_strip
    assert root_strip("/a/b/c", 0) == "/a/b/c"
    assert root_strip("/a/b/c", 1) == "/b/c"
    assert root_strip("/a/b/c", 2) == "/c"
    assert root_strip("/a/b/c", 3) == ""
    assert root_strip("/a/b/c", 9) == ""


def test_path_info_len_walks_back_to_existing_prefix() -> None:
    from httpd.server_fcgi import path_info_len
    have = {"/r", "/r/app.php", "/r/d"}
    assert path_info_len("/r/app.php/x/y", have.__contains__) == len("/r/app.php")
    assert path_info_len("/r/app.php", have.__contains__) == len("/r/app.php")
    assert path_info_len("/r/d/e", have.__contains__) == len("/r/d")
    assert path_info_len("/r/nope/x", have.__contains__) == len("/r")
    assert path_info_len("/elsewhere/x", have.__contains__) == 0


@pytest.mark.parametrize("header,name", [
    ("x-foo-bar", b"HTTP_X_FOO_BAR"), ("x.dot", b"HTTP_X.DOT"), ("a~b|c", b"HTTP_A~B|C"),
    ("content-length", b"CONTENT_LENGTH"), ("content-type", b"CONTENT_TYPE"),
    ("host", b"HTTP_HOST"), ("x_under", b"HTTP_X_UNDER"),
])
def test_env_name(header: str, name: bytes) -> None:
    from httpd.server_fcgi import env_name
    assert env_name(header) == name


def test_codec_encode_record_round_trip() -> None:
    """The sans-I/O codec: encode(record) → bytes, feed(bytes) → records."""
    from httpd import fcgi
    recs = [fcgi.Record(fcgi.STDOUT, 1, b"x" * n) for n in (0, 1, 7, 8, 65535)]
    recs.append(fcgi.Record(fcgi.END_REQUEST, 1, bytes(8)))
    wire = b"".join(fcgi.encode(r) for r in recs)
    assert len(wire) % 8 == 0
    reader = fcgi.RecordReader()
    out = []
    for i in range(0, len(wire), 1000):
        out += reader.feed(wire[i:i + 1000])
    assert out == recs
