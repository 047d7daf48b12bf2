"""httpd access control and response shaping: block / block drop / block
return with every macro, pass, authenticate (bcrypt htpasswd), custom
headers, errdocs, banner."""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess

import bcrypt
import pytest

from tests.regress.httpd_helpers import Conn, module_site, request, site_factory  # noqa: F401

MACRO_CONF = """
server "macros.test" {
    listen on 127.0.0.1 port {port}
    location "/m/docuri*" { block return 302 "/r$DOCUMENT_URI" }
    location "/m/qsenc" { block return 302 "/r?$QUERY_STRING_ENC" }
    location "/m/qs" { block return 302 "/r?$QUERY_STRING" }
    location "/m/raddr" { block return 302 "/r/$REMOTE_ADDR" }
    location "/m/rport" { block return 302 "/r/$REMOTE_PORT" }
    location "/m/ruser" { block return 302 "/r/[$REMOTE_USER]" }
    location "/m/ruri*" { block return 302 "/r$REQUEST_URI" }
    location "/m/scheme" { block return 302 "$REQUEST_SCHEME://x/" }
    location "/m/saddr" { block return 302 "/r/$SERVER_ADDR" }
    location "/m/sport" { block return 302 "/r/$SERVER_PORT" }
    location "/m/sname" { block return 302 "/r/$SERVER_NAME" }
    location "/m/host" { block return 302 "http://$HTTP_HOST/r" }
    location "/m/all*" { block return 301 "$REQUEST_SCHEME://$HTTP_HOST$REQUEST_URI" }
    location "/m/literal" { block return 302 "/r/$NOT_A_MACRO" }
    location "/c/301" { block return 301 "/to301" }
    location "/c/303" { block return 303 "/to303" }
    location "/c/307" { block return 307 "/to307" }
    location "/c/308" { block return 308 "/to308" }
    location "/c/302-no-uri" { block return 302 }
    location "/c/404" { block return 404 }
    location "/c/403" { block }
    location "/c/drop" { block drop }
    location "/c/410" { block return 410 }
    location "/c/401" { block return 401 }
}
server "blocked.test" {
    listen on 127.0.0.1 port {port}
    block return 451
    location "/open/*" { pass }
}
"""


def _macro_setup(site) -> None:
    (site.htdocs / "open").mkdir()
    (site.htdocs / "open/ok.txt").write_text("passed\n")
    (site.htdocs / "index.html").write_text("index\n")


@pytest.fixture(scope="module")
def macros(tmp_path_factory):
    yield from module_site(tmp_path_factory, MACRO_CONF, setup=_macro_setup)


def location_of(site, path, host="macros.test", status=302, **kw) -> str:
    r = request(site.port, path, host=host, **kw)
    assert r.status == status, (path, r.status)
    assert r.version == "HTTP/1.0"
    assert r.header("Connection") == "close"
    return r.header("Location")


def test_macro_document_uri(macros):
    assert location_of(macros, "/m/docuri%20x/y") == "/r/m/docuri%20x/y"
    assert location_of(macros, "/m/docuri/../docuri%3Fz") == "/r/m/docuri%3Fz"


def test_macro_query_string_raw(macros):
    assert location_of(macros, "/m/qs?a=1&b=%20c") == "/r?a=1&b=%20c"
    assert location_of(macros, "/m/qs") == "/r?"


def test_macro_query_string_enc(macros):
    assert location_of(macros, "/m/qsenc?a=1&b=%20c") == "/r?a=1%26b=%2520c"
    assert location_of(macros, "/m/qsenc") == "/r?"


def test_macro_remote_addr_and_port(macros):
    assert location_of(macros, "/m/raddr") == "/r/127.0.0.1"
    with Conn(macros.port) as c:
        local_port = c.sock.getsockname()[1]
        c.send(b"GET /m/rport HTTP/1.1\r\nHost: macros.test\r\n\r\n")
        assert c.response().header("Location") == f"/r/{local_port}"


def test_macro_remote_user_empty_without_auth(macros):
    assert location_of(macros, "/m/ruser") == "/r/[]"


def test_macro_request_uri(macros):
    assert location_of(macros, "/m/ruri%20x?q=1&z=%41") == "/r/m/ruri%20x?q=1&z=%41"
    assert location_of(macros, "/m/ruri") == "/r/m/ruri"
    assert location_of(macros, "/m/ruri?") == "/r/m/ruri?"     # empty query is kept


def test_macro_request_scheme(macros):
    assert location_of(macros, "/m/scheme") == "http://x/"


def test_macro_server_addr_port_name(macros):
    assert location_of(macros, "/m/saddr") == "/r/127.0.0.1"
    assert location_of(macros, "/m/sport") == f"/r/{macros.port}"
    assert location_of(macros, "/m/sname") == "/r/macros.test"


def test_macro_http_host(macros):
    assert location_of(macros, "/m/host") == "http://macros.test/r"
    assert location_of(macros, "/m/host", host=f"macros.test:{macros.port}") == \
        f"http://macros.test:{macros.port}/r"
    # Host matching no server: the first server answers and $HTTP_HOST is
    # the local address (ip:port) instead of the client's Host
    assert location_of(macros, "/m/host", host="nobody.invalid") == \
        f"http://127.0.0.1:{macros.port}/r"


def test_macro_http_host_without_host_header(macros):
    assert location_of(macros, "/m/host", host=None, version="HTTP/1.0") == \
        f"http://127.0.0.1:{macros.port}/r"


def test_macro_combination(macros):
    assert location_of(macros, "/m/all/p?x=1", status=301) == \
        "http://macros.test/m/all/p?x=1"


def test_unknown_dollar_word_kept(macros):
    assert location_of(macros, "/m/literal") == "/r/$NOT_A_MACRO"


@pytest.mark.parametrize("code,reason", [(301, "Moved Permanently"), (303, "See Other"),
                                         (307, "Temporary Redirect"),
                                         (308, "Permanent Redirect")])
def test_block_return_redirect_codes(macros, code, reason):
    r = request(macros.port, f"/c/{code}", host="macros.test")
    assert (r.status, r.reason) == (code, reason)
    assert r.header("Location") == f"/to{code}"
    assert f"<h1>{code} {reason}</h1>" in r.body.decode()


def test_block_return_redirect_without_uri(macros):
    r = request(macros.port, "/c/302-no-uri", host="macros.test")
    assert r.status == 302 and r.header("Location") is None


def test_block_return_error_codes(macros):
    r = request(macros.port, "/c/404", host="macros.test")
    assert r.status == 404
    r = request(macros.port, "/c/410", host="macros.test")
    assert (r.status, r.reason) == (410, "Gone")
    assert r.header("Location") is None               # only 3xx get a Location


def test_block_return_401_has_no_challenge(macros):
    r = request(macros.port, "/c/401", host="macros.test")
    assert r.status == 401 and r.header("WWW-Authenticate") is None


def test_block_default_403(macros):
    r = request(macros.port, "/c/403", host="macros.test")
    assert (r.status, r.reason) == (403, "Forbidden")
    assert "<h1>403 Forbidden</h1>" in r.body.decode()


def test_block_drop_sends_nothing(macros):
    with Conn(macros.port) as c:
        c.send(b"GET /c/drop HTTP/1.1\r\nHost: macros.test\r\n\r\n")
        assert c.read_all() == b""
        assert c.eof


def test_block_drop_after_keep_alive_response(macros):
    with Conn(macros.port) as c:
        c.send(b"GET /index.html HTTP/1.1\r\nHost: macros.test\r\n\r\n")
        assert c.response().status == 200
        c.send(b"GET /c/drop HTTP/1.1\r\nHost: macros.test\r\n\r\n")
        assert c.read_all() == b""


def test_server_block_and_location_pass(macros):
    r = request(macros.port, "/index.html", host="blocked.test")
    assert (r.status, r.reason) == (451, "Unavailable For Legal Reasons")
    r = request(macros.port, "/open/ok.txt", host="blocked.test")
    assert r.status == 200 and r.body == b"passed\n"


# -- authenticate -----------------------------------------------------------------

def _hash(pw: str, prefix: bytes = b"$2y$") -> str:
    h = bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=5))
    return (prefix + h[4:]).decode()


AUTH_CONF = """
server "auth.test" {
    listen on 127.0.0.1 port {port}
    location "/private/*" { authenticate "Secret Area" with "/conf/htpasswd" }
    location "/norealm/*" { authenticate with "/conf/htpasswd" }
}
server "all.test" {
    listen on 127.0.0.1 port {port}
    authenticate "Everything" with "/conf/htpasswd"
    location "/public/*" { no authenticate }
}
"""


def _auth_setup(site) -> None:
    (site.dir / "conf").mkdir()
    (site.dir / "conf/htpasswd").write_text(
        f"alice:{_hash('wonderland')}\n"
        f"bob:{_hash('builder', b'$2b$')}\n"
        "broken-line-without-colon\n")
    for d in ("private", "norealm", "public"):
        (site.htdocs / d).mkdir()
        (site.htdocs / d / "f.txt").write_text(f"{d} content\n")
    (site.htdocs / "index.html").write_text("index\n")


@pytest.fixture(scope="module")
def auth(tmp_path_factory):
    yield from module_site(tmp_path_factory, AUTH_CONF, setup=_auth_setup)


def basic(user: str, pw: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def test_auth_required(auth):
    r = request(auth.port, "/private/f.txt", host="auth.test")
    assert (r.status, r.reason) == (401, "Unauthorized")
    assert r.header("WWW-Authenticate") == 'Basic realm="Secret Area"'
    assert b"private content" not in r.body


def test_auth_wrong_credentials(auth):
    for hdr in (basic("alice", "nope"), basic("mallory", "wonderland"), basic("alice", ""),
                {"Authorization": "Bearer abc"}, {"Authorization": "Basic !!!notbase64"},
                {"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()}):
        r = request(auth.port, "/private/f.txt", host="auth.test", headers=hdr)
        assert r.status == 401, hdr


def test_auth_good_credentials(auth):
    r = request(auth.port, "/private/f.txt", host="auth.test", headers=basic("alice", "wonderland"))
    assert r.status == 200 and r.body == b"private content\n"
    r = request(auth.port, "/private/f.txt", host="auth.test", headers=basic("bob", "builder"))
    assert r.status == 200


def test_auth_user_in_access_log(auth):
    request(auth.port, "/private/f.txt?who", host="auth.test",
            headers=basic("alice", "wonderland"))
    line = auth.wait_log(r'"GET /private/f\.txt\?who HTTP/1\.1" 200 ')
    assert line.startswith("auth.test 127.0.0.1 - alice [")


def test_auth_failure_logged_with_attempted_user(auth):
    r = request(auth.port, "/private/f.txt?failed", host="auth.test",
                headers=basic("mallory", "guess"))
    assert r.status == 401
    line = auth.wait_log(r'"GET /private/f\.txt\?failed HTTP/1\.1" 401 0$')
    assert line.startswith("auth.test 127.0.0.1 - mallory [")


def test_auth_with_curl(auth):
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl not installed")
    url = f"http://127.0.0.1:{auth.port}/private/f.txt"
    args = [curl, "-sS", "--max-time", "20", "-H", "Host: auth.test"]
    r = subprocess.run(args + ["-u", "alice:wonderland", url], capture_output=True, timeout=30)
    assert r.stdout == b"private content\n"
    r = subprocess.run(args + ["-o", "/dev/null", "-w", "%{http_code}", url],
                       capture_output=True, timeout=30)
    assert r.stdout == b"401"


def test_auth_not_needed_outside_location(auth):
    assert request(auth.port, "/index.html", host="auth.test").status == 200


def test_auth_realm_omitted(auth):
    r = request(auth.port, "/norealm/f.txt", host="auth.test")
    assert r.status == 401
    assert r.header("WWW-Authenticate", ).startswith("Basic realm=")


def test_no_authenticate_in_location(auth):
    r = request(auth.port, "/index.html", host="all.test")
    assert r.status == 401
    assert r.header("WWW-Authenticate") == 'Basic realm="Everything"'
    r = request(auth.port, "/public/f.txt", host="all.test")
    assert r.status == 200 and r.body == b"public content\n"
    r = request(auth.port, "/index.html", host="all.test", headers=basic("bob", "builder"))
    assert r.status == 200


def test_htpasswd_change_picked_up(auth):
    p = auth.dir / "conf/htpasswd"
    old = p.read_text()
    try:
        p.write_text(old + f"carol:{_hash('c4rol')}\n")
        r = request(auth.port, "/private/f.txt", host="auth.test", headers=basic("carol", "c4rol"))
        assert r.status == 200
    finally:
        p.write_text(old)


# -- custom headers ---------------------------------------------------------------

HDR_CONF = """
server "hdr.test" {
    listen on 127.0.0.1 port {port}
    header set "X-Set" "one"
    header add "X-Add" "a"
    header add "X-Add" "b"
    header set "X-Always" "yes" always
    header add "X-Always-Add" "too" always
    header remove "Last-Modified"
    location "/loc/*" {
        header set "X-Set" "two"
        header remove "X-Add"
        header add "X-Loc" "here"
    }
    location "/redir" { block return 302 "/elsewhere" }
}
"""


def _hdr_setup(site) -> None:
    (site.htdocs / "f.txt").write_text("f")
    (site.htdocs / "loc").mkdir()
    (site.htdocs / "loc/f.txt").write_text("lf")


@pytest.fixture(scope="module")
def hdrs(tmp_path_factory):
    yield from module_site(tmp_path_factory, HDR_CONF, setup=_hdr_setup)


def test_headers_on_success(hdrs):
    r = hdrs.get("/f.txt")
    assert r.status == 200
    assert r.all("X-Set") == ["one"]
    assert r.all("X-Add") == ["a", "b"]
    assert r.all("X-Always") == ["yes"]
    assert r.all("X-Always-Add") == ["too"]
    assert r.header("Last-Modified") is None
    assert r.header("Content-Length") == "1"


def test_headers_location_inherits_and_overrides(hdrs):
    r = hdrs.get("/loc/f.txt")
    assert r.status == 200 and r.body == b"lf"
    assert r.all("X-Set") == ["two"]
    assert r.all("X-Add") == []
    assert r.all("X-Loc") == ["here"]
    assert r.all("X-Always") == ["yes"]
    assert r.header("Last-Modified") is None


def test_headers_on_error_only_always(hdrs):
    r = hdrs.get("/missing")
    assert r.status == 404
    assert r.all("X-Always") == ["yes"]
    assert r.all("X-Always-Add") == ["too"]
    assert r.all("X-Set") == [] and r.all("X-Add") == []


def test_headers_on_not_modified(hdrs):
    r = hdrs.get("/f.txt", headers={"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
    assert r.status == 304
    assert r.all("X-Set") == ["one"]


# -- errdocs, banner ----------------------------------------------------------------

ERRDOC_CONF = """
errdocs "/errdocs"
server "err.test" {
    listen on 127.0.0.1 port {port}
    location "/forbidden" { block }
    location "/teapot" { block return 418 }
}
server "noerr.test" {
    listen on 127.0.0.1 port {port}
    no errdocs
}
server "own.test" {
    listen on 127.0.0.1 port {port}
    errdocs "/errdocs-empty"
}
"""


def _errdoc_setup(site) -> None:
    d = site.dir / "errdocs"
    d.mkdir()
    (d / "404.html").write_text("<p>custom $RESPONSE_CODE $HTTP_ERROR by [$SERVER_SOFTWARE]</p>\n")
    (d / "err.html").write_text("<p>generic $RESPONSE_CODE ($HTTP_ERROR)</p>\n")
    (site.dir / "errdocs-empty").mkdir()


@pytest.fixture(scope="module")
def errdocs(tmp_path_factory):
    yield from module_site(tmp_path_factory, ERRDOC_CONF, setup=_errdoc_setup)


def test_errdocs_specific_file(errdocs):
    r = request(errdocs.port, "/missing", host="err.test")
    assert r.status == 404
    assert r.body == b"<p>custom 404 Not Found by [OpenBSD httpd]</p>\n"
    assert r.header("Content-Length") == str(len(r.body))
    assert r.header("Content-Type") == "text/html"


def test_errdocs_generic_template(errdocs):
    r = request(errdocs.port, "/forbidden", host="err.test")
    assert r.status == 403 and r.body == b"<p>generic 403 (Forbidden)</p>\n"
    r = request(errdocs.port, "/teapot", host="err.test")
    assert r.status == 418 and r.body == b"<p>generic 418 (I'm a teapot)</p>\n"


def test_errdocs_disabled_per_server(errdocs):
    r = request(errdocs.port, "/missing", host="noerr.test")
    assert r.status == 404 and b"<h1>404 Not Found</h1>" in r.body


def test_errdocs_dir_without_files_falls_back_to_builtin(errdocs):
    r = request(errdocs.port, "/missing", host="own.test")
    assert r.status == 404 and b"<h1>404 Not Found</h1>" in r.body


BANNER_CONF = """
no banner
errdocs "/errdocs"
server "quiet.test" {
    listen on 127.0.0.1 port {port}
}
server "loud.test" {
    listen on 127.0.0.1 port {port}
    banner
    no errdocs
}
"""


def test_no_banner(site_factory):
    def setup(site):
        (site.htdocs / "f.txt").write_text("f")
        (site.dir / "errdocs").mkdir()
        (site.dir / "errdocs/err.html").write_text("[$SERVER_SOFTWARE]")
    site = site_factory(BANNER_CONF, setup=setup)
    r = request(site.port, "/f.txt", host="quiet.test")
    assert r.status == 200 and r.header("Server") is None
    r = request(site.port, "/missing", host="quiet.test")
    assert r.status == 404 and r.header("Server") is None
    assert r.body == b"[]"                          # $SERVER_SOFTWARE empty
    r = request(site.port, "/f.txt", host="loud.test")
    assert r.header("Server") == "OpenBSD httpd"
    r = request(site.port, "/missing", host="loud.test")
    assert b"<address>OpenBSD httpd</address>" in r.body


def test_no_banner_builtin_error_page(site_factory):
    site = site_factory('server "q" {\n listen on 127.0.0.1 port {port}\n no banner\n}\n')
    r = site.get("/missing")
    assert r.status == 404
    assert r.header("Server") is None
    body = r.body.decode()
    assert "<h1>404 Not Found</h1>" in body
    assert "<address>" not in body and "OpenBSD" not in body


def test_server_survives_unreadable_htpasswd(site_factory):
    site = site_factory('server "a" {\n listen on 127.0.0.1 port {port}\n'
                        ' authenticate "R" with "/nonexistent"\n}\n')
    r = site.get("/", headers=basic("alice", "x"))
    assert r.status == 401
    with socket.create_connection(("127.0.0.1", site.port)):
        pass


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_macros_over_ipv6(site_factory):
    site = site_factory('server "v6.test" {\n listen on ::1 port {port}\n'
                        ' block return 302 "/$REMOTE_ADDR/$SERVER_ADDR/$HTTP_HOST"\n}\n',
                        wait_host="::1")
    r = request(site.port, "/", host="elsewhere.invalid", addr="::1")
    assert r.status == 302
    assert r.header("Location") == f"/::1/::1/[::1]:{site.port}"
