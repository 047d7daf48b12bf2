"""httpd over HTTP/2 (extension `listen ... http2`, issue 14).

One httpd (prefork 1) serves:
  h2     clear text, h2 by prior knowledge and HTTP/1.1 on the same port
  h2tls  TLS with ALPN h2 for a.test and b.test (one certificate each: 421)
  h1     clear text without `http2`; h1tls TLS without `http2`
Static files (ranges, conditional, auto index, gzip-static), FastCGI (flup),
authentication, block/return/rewrite and error pages are checked with
curl, nghttp, h2load, httpx and the raw client of h2_helpers.  The attack
and malformed-request cases are in test_httpd_h2_attacks.py.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import bcrypt
import httpx
import pytest
import trustme

from tests.conftest import free_port
from tests.regress.fcgi import servers
from tests.regress.h2_helpers import H2Client, tls_client_context
from tests.regress.httpd_helpers import module_site

CURL = shutil.which("curl")
NGHTTP = shutil.which("nghttp")
H2LOAD = shutil.which("h2load")
need_nghttp = pytest.mark.skipif(NGHTTP is None, reason="nghttp2-client not installed")

CONF = """
prefork 1
server "localhost" {
    listen on 127.0.0.1 port {port} http2
    root "/htdocs"
    gzip-static
    connection { max requests 1000 }
    location "/fcgi/*" { fastcgi socket "/flup.sock" }
    location "/private/*" { authenticate "Secret Area" with "/htpasswd" }
    location "/blocked" { block return 403 }
    location "/gone" { block drop }
    location "/moved" { block return 301 "https://example.com$REQUEST_URI" }
    location "/rw" { request rewrite "/index.html" }
    location "/dir/*" { directory auto index }
}
server "a.test" {
    listen on 127.0.0.1 tls port {tlsport} http2
    root "/htdocs"
    errdocs "/errdocs"
    tls { certificate "{T}/a.crt"
          key "{T}/a.key" }
    location "/fcgi/*" { fastcgi socket "/flup.sock" }
}
server "b.test" {
    listen on 127.0.0.1 tls port {tlsport} http2
    root "/htdocs"
    tls { certificate "{T}/b.crt"
          key "{T}/b.key" }
}
server "plain" {
    listen on 127.0.0.1 port {h1port}
    root "/htdocs"
}
server "plaintls" {
    listen on 127.0.0.1 tls port {h1tlsport}
    root "/htdocs"
    tls { certificate "{T}/a.crt"
          key "{T}/a.key" }
}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    T = tmp_path_factory.mktemp("h2")
    ca = trustme.CA()
    for name in ("a", "b"):
        cert = ca.issue_cert(f"{name}.test")
        (T / f"{name}.crt").write_bytes(cert.cert_chain_pems[0].bytes())
        (T / f"{name}.key").write_bytes(cert.private_key_pem.bytes())
    marks = T / "flup.marks"
    started = []
    ports = {"tlsport": free_port(), "h1port": free_port(), "h1tlsport": free_port()}

    def setup(s):
        d = s.htdocs
        (d / "index.html").write_text("<h1>index</h1>\n")
        (d / "1k.bin").write_bytes(os.urandom(1024))
        (d / "1m.bin").write_bytes(os.urandom(1 << 20))
        (d / "text.txt").write_text("compress me " * 100)
        (d / "text.txt.gz").write_bytes(gzip.compress((d / "text.txt").read_bytes()))
        (d / "dir").mkdir()
        (d / "dir" / "one.txt").write_text("1")
        (d / "private").mkdir()
        (d / "private" / "secret.txt").write_text("secret\n")
        h = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=5)).decode()
        (s.dir / "htpasswd").write_text(f"alice:{h}\n")
        (s.dir / "errdocs").mkdir()
        (s.dir / "errdocs" / "404.html").write_text("custom $RESPONSE_CODE page\n")
        started.append(servers.start_flup(str(s.dir / "flup.sock"), T, marks=marks))

    try:
        for site in module_site(tmp_path_factory, CONF, setup=setup,
                                extra_ports=list(ports.values()), T=T, **ports):
            yield SimpleNamespace(site=site, T=T, ca=ca, marks=marks, **ports,
                                  port=site.port, htdocs=site.htdocs)
    finally:
        for f in started:
            f.stop()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CURL, "-s", "--max-time", "10", *args],
                          capture_output=True, timeout=30)


def ca_ctx(site):
    return tls_client_context(site.ca.cert_pem.bytes())


# -- protocol choice --------------------------------------------------------------

def test_prior_knowledge_and_http1_on_one_port(site) -> None:
    r = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
             f"http://127.0.0.1:{site.port}/1k.bin")
    assert r.stdout == b"2 200"
    r = curl("-o", "/dev/null", "-w", "%{http_version} %{http_code}",
             f"http://127.0.0.1:{site.port}/1k.bin")
    assert r.stdout == b"1.1 200"
    line = site.site.wait_log(r'"GET /1k\.bin HTTP/2\.0" 200 1024')
    assert line.startswith("localhost 127.0.0.1")


def test_alpn_h2_over_tls(site) -> None:
    ca = site.T / "ca.pem"
    site.ca.cert_pem.write_to_path(str(ca))
    r = curl("--http2", "--cacert", str(ca), "--resolve", f"a.test:{site.tlsport}:127.0.0.1",
             "-w", "%{http_version}", f"https://a.test:{site.tlsport}/index.html")
    assert r.stdout == b"<h1>index</h1>\n2"
    # Without `http2` the TLS socket offers http/1.1 only.
    r = curl("--http2", "-k", "-o", "/dev/null", "-w", "%{http_version}",
             f"https://127.0.0.1:{site.h1tlsport}/index.html")
    assert r.stdout == b"1.1"
    with H2Client(site.h1tlsport, tls=tls_client_context(alpn=("h2", "http/1.1"))) as c:
        assert c.alpn == "http/1.1"


def test_preface_without_http2_is_an_http1_error(site) -> None:
    with H2Client(site.h1port) as c:
        c.sock.settimeout(5)
        data = b""
        while True:
            part = c.sock.recv(65536)
            if not part:
                break
            data += part
    assert data.startswith(b"HTTP/1.0 400 ") or data.startswith(b"HTTP/1.1 505")


def test_httpx_http2(site) -> None:
    with httpx.Client(http1=False, http2=True) as cl:
        r = cl.get(f"http://127.0.0.1:{site.port}/index.html")
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert r.text == "<h1>index</h1>\n"
    with httpx.Client(http2=True, verify=ca_ctx(site)) as cl:
        r = cl.get(f"https://127.0.0.1:{site.tlsport}/1k.bin",
                   headers={"host": "a.test"}, extensions={"sni_hostname": "a.test"})
        assert r.http_version == "HTTP/2" and len(r.content) == 1024


@need_nghttp
def test_nghttp_frames(site) -> None:
    r = subprocess.run([NGHTTP, "-nv", f"http://127.0.0.1:{site.port}/index.html"],
                       capture_output=True, timeout=30, text=True)
    assert r.returncode == 0, r.stderr
    assert ":status: 200" in r.stdout
    assert "recv SETTINGS frame" in r.stdout
    assert "server: " in r.stdout and "connection:" not in r.stdout


@pytest.mark.skipif(H2LOAD is None, reason="h2load not installed")
def test_h2load_bounded(site) -> None:
    r = subprocess.run([H2LOAD, "-n", "600", "-c", "3", "-m", "10",
                        f"http://127.0.0.1:{site.port}/1k.bin"],
                       capture_output=True, timeout=60, text=True)
    assert "600 succeeded, 0 failed" in r.stdout, r.stdout


# -- static files --------------------------------------------------------------------

def test_static_large_file_and_head(site) -> None:
    with H2Client(site.port) as c:
        r = c.get("/1m.bin")
        assert r.status == 200 and r.body == (site.htdocs / "1m.bin").read_bytes()
        r = c.get("/1m.bin", method="HEAD")
        assert r.status == 200 and r.body == b"" and r.headers["content-length"] == str(1 << 20)


def test_static_range_conditional_index_gzip(site) -> None:
    with H2Client(site.port) as c:
        r = c.get("/1k.bin", headers=[("range", "bytes=10-19")])
        assert r.status == 206 and r.body == (site.htdocs / "1k.bin").read_bytes()[10:20]
        r = c.get("/1k.bin")
        lm = r.headers["last-modified"]
        r = c.get("/1k.bin", headers=[("if-modified-since", lm)])
        assert r.status == 304 and r.body == b""
        r = c.get("/dir/")
        assert r.status == 200 and b"one.txt" in r.body
        r = c.get("/text.txt", headers=[("accept-encoding", "gzip")])
        assert r.headers.get("content-encoding") == "gzip"
        assert gzip.decompress(r.body) == (site.htdocs / "text.txt").read_bytes()
        r = c.get("/dir")
        assert r.status == 301 and r.headers["location"].endswith("/dir/")


def test_block_return_rewrite_auth(site) -> None:
    with H2Client(site.port) as c:
        assert c.get("/blocked").status == 403
        r = c.get("/moved")
        assert r.status == 301 and r.headers["location"] == "https://example.com/moved"
        assert c.get("/rw").body == b"<h1>index</h1>\n"
        r = c.get("/private/secret.txt")
        assert r.status == 401 and "Secret Area" in r.headers["www-authenticate"]
        r = c.get("/private/secret.txt", headers=[("authorization", "Basic YWxpY2U6cHc=")])
        assert r.status == 200 and r.body == b"secret\n"
        r = c.get("/gone")                    # `block drop`: the stream, not the connection
        assert r.reset is not None and r.status == 0
        assert c.get("/index.html").status == 200
        r = c.get("/nothere")
        assert r.status == 404 and b"404" in r.body


def test_errdocs_and_misdirected_421(site) -> None:
    with H2Client(site.tlsport, tls=ca_ctx(site), server_hostname="a.test") as c:
        assert c.alpn == "h2"
        r = c.get("/nothere", authority="a.test")
        assert r.status == 404 and r.body == b"custom 404 page\n"
        assert c.get("/index.html", authority="a.test").status == 200
        r = c.get("/index.html", authority="b.test")     # b.test has its own certificate
        assert r.status == 421
        assert c.get("/index.html", authority="a.test").status == 200
    with H2Client(site.tlsport, tls=ca_ctx(site), server_hostname="b.test") as c:
        assert c.get("/index.html", authority="b.test").status == 200


# -- FastCGI -------------------------------------------------------------------------

def test_fastcgi_environment(site) -> None:
    with H2Client(site.port) as c:
        r = c.get("/fcgi/env?x=1", authority="localhost:8080", headers=[("x-thing", "yes")])
        assert r.status == 200, r
        env = json.loads(r.body)["env"]
        assert env["SERVER_PROTOCOL"] == "HTTP/2.0"
        assert env["HTTP_HOST"] == "localhost:8080"
        assert env["HTTP_X_THING"] == "yes"
        assert env["REQUEST_URI"] == "/fcgi/env?x=1"
        assert env["QUERY_STRING"] == "x=1"
        assert "CONTENT_LENGTH" not in env
    site.site.wait_log(r'"GET /fcgi/env\?x=1 HTTP/2\.0" 200')


def test_fastcgi_body_without_content_length(site) -> None:
    body = os.urandom(200000)
    with H2Client(site.port) as c:
        r = c.get("/fcgi/env", method="POST", body=body)
        got = json.loads(r.body)
        assert got["len"] == len(body) and got["env"]["CONTENT_LENGTH"] == str(len(body))
        r = c.get("/fcgi/echo", method="POST", body=b"hello",
                  headers=[("content-length", "5"), ("content-type", "text/x-echo")])
        assert r.status == 200 and r.body == b"hello"
        assert r.headers["content-type"] == "text/x-echo"
        assert "transfer-encoding" not in r.headers and "connection" not in r.headers
        r = c.get("/fcgi/chunks")
        assert r.body == b"one\ntwo\nthree\n"
        r = c.get("/fcgi/notfound")
        assert r.status == 404
        r = c.get("/fcgi/env", method="POST", body=b"x" * 100,
                  headers=[("expect", "100-continue")])
        assert r.status == 200


def test_fastcgi_over_tls(site) -> None:
    with H2Client(site.tlsport, tls=ca_ctx(site), server_hostname="a.test") as c:
        env = json.loads(c.get("/fcgi/env", authority="a.test").body)["env"]
        assert env["HTTPS"] == "on" and env["SERVER_PROTOCOL"] == "HTTP/2.0"
        assert env["HTTP_HOST"] == "a.test"


def test_concurrent_streams_one_connection(site) -> None:
    with H2Client(site.port) as c:
        sids = [c.request("/fcgi/stream?n=2&delay=0.2") for _ in range(5)]
        sids += [c.request("/1k.bin") for _ in range(20)]
        for sid in sids:
            r = c.response(sid)
            assert r.status == 200 and r.ended
