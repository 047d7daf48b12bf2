"""Every TLS listening socket of a server or relay serves TLS (issue 18).

A server's key is wiped once its contexts are built; it used to be wiped
after the first socket's, so `listen on * tls` answered TLS on IPv4 only
and a second `listen on ... tls port` line not at all.  Checked for httpd
(`*`, two explicit ports, an interface name that expands to 127.0.0.1 and
::1, SNI with two keypairs on shared sockets, prefork 2, before and after
SIGHUP, keys gone from worker memory) and relayd (two TLS listen lines and
`*`, before and after SIGHUP).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading

import pytest
import trustme
from cryptography import x509

from tests.conftest import Daemon, free_port, wait_port
from tests.regress.httpd_helpers import site_factory, wait_for  # noqa: F401
from tests.regress.test_httpd_tls import _memory_has, _workers

# One connection per try; several tries so both preforked workers answer.
TRIES = 6


def _port_free_on_both() -> int:
    """A port free on 127.0.0.1 and on ::1 (for `listen on *`)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")


def _pki(d, names=("a.test", "b.test")) -> trustme.CA:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for n in names:
        leaf = ca.issue_cert(n)
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{n}.crt"))
        leaf.private_key_pem.write_to_path(str(d / f"{n}.key"))
    return ca


def tls_get(addr: str, port: int, name: str, cafile, path: str = "/") -> tuple[str, bytes]:
    """(certificate DNS name, raw response) of one verified TLS GET."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.socket(fam) as raw:
        raw.settimeout(10)
        raw.connect((addr, port))
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                      .encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            cert = x509.load_der_x509_certificate(s.getpeercert(True))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.DNSName)[0], data


# -- httpd ---------------------------------------------------------------------------

HTTPD = """
prefork 2
server "a.test" {
    listen on * tls port {star}
    listen on 127.0.0.1 tls port {p1}
    listen on 127.0.0.1 tls port {p2}
    listen on lo tls port {lo}
    root "/htdocs-a"
    tls certificate "{dir}/a.test.crt"
    tls key "{dir}/a.test.key"
}
server "b.test" {
    listen on * tls port {star}
    listen on lo tls port {lo}
    root "/htdocs-b"
    tls {
        certificate "{dir}/b.test.crt"
        key "{dir}/b.test.key"
    }
}
"""


def _httpd_sockets(ports) -> list[tuple[str, int, str]]:
    """(address, port, server name) of every TLS socket x server."""
    out = []
    for addr in ("127.0.0.1", "::1"):
        for name in ("a.test", "b.test"):
            out += [(addr, ports["star"], name), (addr, ports["lo"], name)]
    out += [("127.0.0.1", ports["p1"], "a.test"), ("127.0.0.1", ports["p2"], "a.test")]
    return out


def _check_all(sockets, cafile) -> None:
    for addr, port, name in sockets:
        for _ in range(TRIES):
            cert, resp = tls_get(addr, port, name, cafile)
            assert cert == name, (addr, port, name)
            assert resp.startswith(b"HTTP/1.1 200 ") and resp.endswith(
                f"site {name}\n".encode()), (addr, port, name, resp[:200])


@pytest.fixture
def httpd_site(site_factory):  # noqa: F811
    ports = {"star": _port_free_on_both(), "p1": free_port(), "p2": free_port(),
             "lo": _port_free_on_both()}

    def setup(s):
        _pki(s.dir)
        for n in ("a", "b"):
            (s.dir / f"htdocs-{n}").mkdir()
            (s.dir / f"htdocs-{n}" / "index.html").write_text(f"site {n}.test\n")
    s = site_factory(HTTPD, setup=setup, wait_ports=list(ports.values()), **ports)
    s.p = ports
    return s


def test_httpd_every_tls_socket_serves(httpd_site):
    s = httpd_site
    _check_all(_httpd_sockets(s.p), s.dir / "ca.pem")
    assert "server_tls_init" not in s.daemon.output()
    # The keys are still wiped once every socket's contexts are built.
    pem = (s.dir / "a.test.key").read_bytes()
    body = b"".join(pem.split(b"\n")[1:-2])
    workers = _workers(s.daemon.pid)
    assert len(workers) == 2
    for pid in workers:
        assert not _memory_has(pid, body[8:40])


def test_httpd_every_tls_socket_serves_after_sighup(httpd_site):
    s = httpd_site
    done = "parent_reload: configuration reloaded"
    for n in (1, 2):
        s.daemon.signal(signal.SIGHUP)
        wait_for(lambda: s.daemon.output().count(done) == n, 20, f"reload {n}")
    wait_for(lambda: len(_workers(s.daemon.pid)) == 2, 15, "the new generation alone")
    _check_all(_httpd_sockets(s.p), s.dir / "ca.pem")
    assert "server_tls_init" not in s.daemon.output()


# -- relayd --------------------------------------------------------------------------

RELAYD = """
prefork 2
table <web> {{ 127.0.0.1 }}
http protocol "p" {{
    tls keypair "a.test"
    tls keypair "b.test"
}}
relay "r" {{
    listen on 127.0.0.1 port {p1} tls
    listen on 127.0.0.1 port {p2} tls
    listen on * port {star} tls
    protocol "p"
    forward to <web> port {backend}
}}
"""


class _Backend:
    """An HTTP/1.0 backend thread answering `backend <path>`."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := c.recv(4096)):
                    data += chunk
                path = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b"?"
                body = b"backend " + path + b"\n"
                c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_relayd_every_tls_listen_line_serves(tmp_path):
    (tmp_path / "private").mkdir()
    ca = _pki(tmp_path)
    for n in ("a.test", "b.test"):
        os.replace(tmp_path / f"{n}.key", tmp_path / "private" / f"{n}.key")
    backend = _Backend()
    ports = {"p1": free_port(), "p2": free_port(), "star": free_port()}
    conf = tmp_path / "relayd.conf"
    conf.write_text(RELAYD.format(backend=backend.port, **ports))
    d = Daemon("relayd", conf, ["-vv"], env={**os.environ, "RELAYD_SSL_DIR": str(tmp_path)})
    try:
        for p in ports.values():
            wait_port(p, proc=d.proc)

        def check() -> None:
            for port in ports.values():
                for name in ("a.test", "b.test"):       # SNI picks the keypair
                    for _ in range(TRIES):
                        cert, resp = tls_get("127.0.0.1", port, name, tmp_path / "ca.pem",
                                             f"/{port}")
                        assert cert == name
                        assert resp.endswith(f"backend /{port}\n".encode()), resp
        check()
        d.signal(signal.SIGHUP)
        d.wait_output("parent_reload: configuration reloaded")
        check()
        assert "cannot load" not in d.output() and "failed to load" not in d.output()
    finally:
        d.stop()
        backend.sock.close()
        del ca
