"""Helpers for the httpd black-box regress tests (imported by test_httpd_*).

A Site is a temporary chroot directory (htdocs/, logs/) with an httpd.conf
and a running `python -m httpd -d -f CONF`.  Clients talk raw HTTP over
loopback sockets so every byte of the response can be checked; Conn keeps
one connection open for keep-alive and pipelining tests.

Nothing here asserts: the tests do.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Daemon, free_port, run_cmd, wait_for, wait_port  # noqa: F401  (wait_for: for the httpd tests)

__all__ = ["Resp", "Conn", "Site", "request", "raw_exchange", "wait_for",
           "make_site", "free_port", "run_cmd", "wait_port", "Daemon",
           "LOG_TS", "site_factory", "module_site"]

# [21/Nov/2026:13:46:42 +0000]
LOG_TS = r"\[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\]"


@dataclass
class Resp:
    """One parsed HTTP response."""
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes = b""

    def header(self, name: str) -> str | None:
        """The first header called `name` (case-insensitive), else None."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]


class Conn:
    """A client connection that reads responses one by one."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def response(self, method: str = "GET") -> Resp | None:
        """The next response; None if the server closed before sending one."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                if self.buf:
                    raise AssertionError(f"truncated response head: {self.buf[:300]!r}")
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k, v.strip()))
        resp = Resp(version, int(code), reason, headers, b"", head)
        cl = resp.header("content-length")
        if method == "HEAD" or resp.status == 304 or 100 <= resp.status < 200 \
                or resp.status == 204:
            return resp
        if cl is not None:
            n = int(cl)
            while len(self.buf) < n:
                if not self._fill():
                    raise AssertionError(f"body truncated: {len(self.buf)} < {n}")
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def read_all(self) -> bytes:
        """Everything until the server closes."""
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def closed(self) -> bool:
        """True once the server has closed (waits up to the socket timeout)."""
        try:
            return not self._fill() and self.eof
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request(port: int, path: str = "/", method: str = "GET", host: str | None = "localhost",
            headers: dict[str, str] | list[tuple[str, str]] | None = None,
            body: bytes = b"", version: str = "HTTP/1.1", addr: str = "127.0.0.1",
            close: bool = True) -> Resp:
    """Send one request on a new connection and read the response."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    for k, v in items:
        lines.append(f"{k}: {v}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with Conn(port, addr) as c:
        c.send(data)
        resp = c.response(method)
    assert resp is not None, f"no response to {method} {path}"
    return resp


def raw_exchange(port: int, data: bytes, addr: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    with Conn(port, addr, timeout) as c:
        c.send(data)
        return c.read_all()


@dataclass
class Site:
    """A chroot directory, its config and (once started) the daemon."""
    dir: Path
    port: int
    daemon: Daemon | None = None
    ports: list[int] = field(default_factory=list)

    @property
    def htdocs(self) -> Path:
        return self.dir / "htdocs"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def conf(self) -> Path:
        return self.dir / "httpd.conf"

    def write_conf(self, body: str, **fmt) -> Path:
        """httpd.conf = chroot line + `body`; {port}, {dir} and {key} of
        `fmt` are replaced (plain replacement: config braces stay)."""
        values = {"port": self.port, "dir": self.dir, **fmt}
        for k, v in values.items():
            body = body.replace("{" + k + "}", str(v))
        text = f'chroot "{self.dir}"\n' + body
        self.conf.write_text(text)
        return self.conf

    def get(self, path: str = "/", **kw) -> Resp:
        return request(self.port, path, **kw)

    def log_lines(self, name: str = "access.log") -> list[str]:
        p = self.logs / name
        return p.read_text().splitlines() if p.exists() else []

    def wait_log(self, pattern: str, name: str = "access.log", timeout: float = 10.0) -> str:
        """The first line of log `name` that matches regex `pattern`."""
        rx = re.compile(pattern)

        def find():
            for line in self.log_lines(name):
                if rx.search(line):
                    return line
            return None
        return wait_for(find, timeout, f"{pattern!r} in {name}: {self.log_lines(name)}")


def make_site(tmp: Path, port: int | None = None) -> Site:
    (tmp / "htdocs").mkdir(parents=True, exist_ok=True)
    (tmp / "logs").mkdir(exist_ok=True)
    return Site(dir=tmp, port=port or free_port())


def start_site(site: Site, body: str, extra_ports: list[int] = (), args: list[str] | None = None,
               wait_host: str = "127.0.0.1", wait_ports: list[int] | None = None,
               **fmt) -> Site:
    """Write the config and start httpd; wait until `wait_ports` (default:
    site.port and `extra_ports`) accept connections."""
    site.write_conf(body, **fmt)
    site.daemon = Daemon("httpd", site.conf, args)
    for p in wait_ports if wait_ports is not None else [site.port, *extra_ports]:
        try:
            wait_port(p, wait_host, proc=site.daemon.proc)
        except Exception:
            out = site.daemon.output()
            site.daemon.stop()
            raise RuntimeError(f"httpd did not start:\n{out}")
    return site


@pytest.fixture
def site_factory(tmp_path):
    """site_factory(conf_body, setup=fn(site)) -> started Site; stopped at the end."""
    started: list[Site] = []
    count = [0]

    def make(body: str, setup=None, args: list[str] | None = None,
             extra_ports: list[int] = (), wait_host: str = "127.0.0.1",
             wait_ports: list[int] | None = None, **fmt) -> Site:
        count[0] += 1
        site = make_site(tmp_path / f"site{count[0]}")
        site.ports = list(extra_ports)
        if setup is not None:
            setup(site)
        started.append(site)
        return start_site(site, body, extra_ports, args, wait_host, wait_ports, **fmt)

    yield make
    for s in started:
        if s.daemon is not None:
            s.daemon.stop()


def module_site(tmp_path_factory, body: str, setup=None, args: list[str] | None = None,
                extra_ports: list[int] = (), **fmt):
    """Generator for module-scoped site fixtures (one daemon per module)."""
    site = make_site(tmp_path_factory.mktemp("site"))
    site.ports = list(extra_ports)
    if setup is not None:
        setup(site)
    start_site(site, body, extra_ports, args=args, **fmt)
    try:
        yield site
    finally:
        site.daemon.stop()
