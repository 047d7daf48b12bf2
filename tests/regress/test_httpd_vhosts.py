"""httpd virtual servers (Host matching, aliases, fallback, ports) and
locations (first match, Lua captures, found/not found, rewrite, strip,
per-location overrides)."""

from __future__ import annotations

import pytest

from tests.regress.httpd_helpers import Conn, free_port, module_site, request, site_factory  # noqa: F401

VHOST_CONF = """
server "first.example" {
    listen on 127.0.0.1 port {port}
    root "/first"
}
server "*.example.com" {
    listen on 127.0.0.1 port {port}
    root "/wild"
}
server "aliased.test" {
    listen on 127.0.0.1 port {port}
    alias "other.test"
    alias match "^alias%d+%.test$"
    root "/aliased"
}
server match "^lua%-(%a+)%.test$" {
    listen on 127.0.0.1 port {port}
    root "/lua"
}
server "ported.test" {
    listen on 127.0.0.1 port {port}
    listen on 127.0.0.1 port {port2}
    root "/ported"
}
server "p2only.test" {
    listen on 127.0.0.1 port {port2}
    root "/p2"
}
"""
SITES = ("first", "wild", "aliased", "lua", "ported", "p2")


def _vhost_setup(site) -> None:
    for name in SITES:
        (site.dir / name).mkdir()
        (site.dir / name / "index.html").write_text(f"{name}\n")


@pytest.fixture(scope="module")
def vhosts(tmp_path_factory):
    port2 = free_port()
    yield from module_site(tmp_path_factory, VHOST_CONF, setup=_vhost_setup,
                           extra_ports=[port2], port2=port2)


def served_by(site, host, port=None, version="HTTP/1.1") -> str:
    r = request(port or site.port, "/", host=host, version=version)
    assert r.status == 200, (host, r.status)
    return r.body.decode().strip()


@pytest.mark.parametrize("host,expected", [
    ("first.example", "first"),
    ("www.example.com", "wild"),
    ("WWW.EXAMPLE.COM", "wild"),              # glob matching ignores case
    ("a.b.example.com", "wild"),              # '*' spans dots in a host glob
    ("example.com", "first"),                 # no match: first server on the socket
    ("aliased.test", "aliased"),
    ("other.test", "aliased"),                # alias
    ("OTHER.TEST", "aliased"),
    ("alias42.test", "aliased"),              # alias match (Lua pattern)
    ("aliasX.test", "first"),
    ("lua-abc.test", "lua"),                  # server match
    ("lua-123.test", "first"),
    ("unknown.invalid", "first"),
    ("127.0.0.1", "first"),
    ("ported.test", "ported"),
])
def test_host_selects_server(vhosts, host, expected):
    assert served_by(vhosts, host) == expected


def test_host_with_matching_port(vhosts):
    assert served_by(vhosts, f"ported.test:{vhosts.port}") == "ported"
    assert served_by(vhosts, f"www.example.com:{vhosts.port}") == "wild"


def test_host_with_other_port_falls_back(vhosts):
    assert served_by(vhosts, "ported.test:9999") == "first"
    assert served_by(vhosts, "www.example.com:1") == "first"


def test_no_host_http10_uses_first_server(vhosts):
    assert served_by(vhosts, None, version="HTTP/1.0") == "first"


def test_second_port_has_its_own_first_server(vhosts):
    port2 = vhosts.ports[0]
    assert served_by(vhosts, "unknown.invalid", port2) == "ported"
    assert served_by(vhosts, "p2only.test", port2) == "p2"
    assert served_by(vhosts, "ported.test", port2) == "ported"
    # a server not listening on this port is never chosen
    assert served_by(vhosts, "first.example", port2) == "ported"
    assert served_by(vhosts, "p2only.test") == "first"


def test_vhost_chosen_per_request_on_one_connection(vhosts):
    with Conn(vhosts.port) as c:
        for host, want in (("www.example.com", b"wild\n"), ("other.test", b"aliased\n"),
                           ("nope", b"first\n")):
            c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert c.response().body == want


def test_ipv6_literal_host(vhosts):
    assert served_by(vhosts, f"[::1]:{vhosts.port}") == "first"
    r = request(vhosts.port, "/", host="[::1")
    assert r.status == 400


# -- locations ----------------------------------------------------------------

LOC_CONF = """
server "loc" {
    listen on 127.0.0.1 port {port}
    root "/htdocs"
    location "/docs/*" { root "/other" }
    location "/docs/hidden*" { block }
    location "/strip/*" {
        root "/other"
        request strip 1
    }
    location "/deep/*" { request strip 2 }
    location "*.secret" { block return 418 }
    location "/CASE/*" { block return 302 "/case-folded" }
    location match "^/user/(%w+)/(%d+)$" { block return 302 "/x/%1?id=%2" }
    location match "/cap/(.*)" { block return 302 "/x/%1" }
    location match "/zero/%d+" { block return 302 "/whole%0" }
    location match "/bad/(%d)" { block return 302 "/x/%2" }
    location found "/f/*" { block return 302 "/was-found" }
    location not found "/f/*" { block return 302 "/was-missing" }
    location not found match "^/nf/(.*)$" { request rewrite "/fallback.txt" }
    location match "^/old/(.*)$" { request rewrite "/new/%1" }
    location "/qrw" { request rewrite "/new/$QUERY_STRING.txt" }
    location "/rwq" { request rewrite "/q.txt?rewritten=1" }
    location "/q.txt" { block return 302 "/got$DOCUMENT_URI?$QUERY_STRING" }
    location "/new/blocked*" { block return 302 "/relooked" }
    location "/auto/*" { directory auto index }
    location "/to-dir" { request rewrite "/new" }
}
"""


def _loc_setup(site) -> None:
    h = site.htdocs
    (h / "index.html").write_text("main\n")
    (h / "docs").mkdir()
    (h / "docs/a.txt").write_text("from htdocs\n")
    other = site.dir / "other"
    (other / "docs").mkdir(parents=True)
    (other / "docs/a.txt").write_text("from other/docs\n")
    (other / "a.txt").write_text("from other, stripped\n")
    (h / "b").mkdir()
    (h / "b/c.txt").write_text("deep stripped\n")
    (h / "f").mkdir()
    (h / "f/here.txt").write_text("here")
    (h / "nf").mkdir()
    (h / "nf/exists.txt").write_text("nf exists\n")
    (h / "fallback.txt").write_text("fallback\n")
    (h / "new").mkdir()
    (h / "new/x.txt").write_text("new x\n")
    (h / "new/page.txt").write_text("new page\n")
    (h / "auto").mkdir()
    (h / "auto/listed.txt").write_text("l")


@pytest.fixture(scope="module")
def loc(tmp_path_factory):
    yield from module_site(tmp_path_factory, LOC_CONF, setup=_loc_setup)


def test_location_root_override(loc):
    r = loc.get("/docs/a.txt")
    assert r.status == 200 and r.body == b"from other/docs\n"
    assert loc.get("/index.html").body == b"main\n"


def test_first_matching_location_wins(loc):
    # "/docs/*" comes before "/docs/hidden*": the later block never applies
    r = loc.get("/docs/hiddenfile")
    assert r.status == 404


def test_location_with_request_strip(loc):
    r = loc.get("/strip/a.txt")
    assert r.status == 200 and r.body == b"from other, stripped\n"
    r = loc.get("/deep/x/b/c.txt")        # "/deep/x" stripped
    assert r.status == 200 and r.body == b"deep stripped\n"


def test_location_glob_suffix(loc):
    r = loc.get("/any/where/file.secret")
    assert r.status == 418 and r.reason == "I'm a teapot"


def test_location_glob_is_case_insensitive(loc):
    r = loc.get("/case/x")
    assert r.status == 302 and r.header("Location") == "/case-folded"


def test_location_match_captures(loc):
    r = loc.get("/user/bob/42")
    assert r.status == 302
    assert r.header("Location") == "/x/bob?id=42"
    assert loc.get("/user/bob/x42").status == 404      # pattern did not match


def test_location_match_capture_is_url_encoded(loc):
    r = loc.get("/cap/a%20b%22c")
    assert r.status == 302
    assert r.header("Location") == "/x/a%20b%22c"
    r = loc.get("/cap/sub/dir")
    assert r.header("Location") == "/x/sub/dir"


def test_location_match_whole_match(loc):
    # OpenBSD's str_match(): %0 is the whole path, not the matched part.
    r = loc.get("/pre/zero/123")
    assert r.status == 302 and r.header("Location") == "/whole/pre/zero/123"


def test_location_match_bad_capture_index(loc):
    # %2 with one capture: expansion fails, no Location is ever sent
    with Conn(loc.port) as c:
        c.send(b"GET /bad/7 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = c.read_all()
    assert b"Location:" not in data
    assert b"/x/" not in data


def test_location_found(loc):
    r = loc.get("/f/here.txt")
    assert r.status == 302 and r.header("Location") == "/was-found"
    r = loc.get("/f/missing.txt")
    assert r.status == 302 and r.header("Location") == "/was-missing"


def test_location_not_found_rewrite(loc):
    r = loc.get("/nf/exists.txt")
    assert r.status == 200 and r.body == b"nf exists\n"
    r = loc.get("/nf/missing.txt")
    assert r.status == 200 and r.body == b"fallback\n"


def test_request_rewrite(loc):
    r = loc.get("/old/x.txt")
    assert r.status == 200 and r.body == b"new x\n"     # internal: no redirect


def test_request_rewrite_with_macro(loc):
    r = loc.get("/qrw?page")
    assert r.status == 200 and r.body == b"new page\n"


def test_request_rewrite_relooks_up_location(loc):
    r = loc.get("/old/blocked1")
    assert r.status == 302 and r.header("Location") == "/relooked"


def test_macros_after_rewrite_see_the_request(loc):
    # server_expand_http() uses http_path/http_query, never the rewritten
    # aliases: the relooked location's block sees the original request
    r = loc.get("/rwq?orig=1")
    assert r.status == 302 and r.header("Location") == "/got/rwq?orig=1"


def test_request_rewrite_to_directory_is_500(loc):
    # server_file_access(): with a path alias a directory is an error, no
    # redirect and no index lookup
    r = loc.get("/to-dir")
    assert r.status == 500


def test_location_directory_auto_index(loc):
    r = loc.get("/auto/")
    assert r.status == 200 and b"listed.txt" in r.body
    assert loc.get("/b/").status == 403          # outside the location: no listing


def test_legacy_root_strip(site_factory):
    # 2017 syntax `root { dir, strip n }`: same as `request strip n`
    def setup(site):
        (site.htdocs / "c.txt").write_text("legacy strip\n")
    site = site_factory('server "l" {\n listen on 127.0.0.1 port {port}\n'
                        ' root { "/htdocs", strip 2 }\n}\n', setup=setup)
    r = site.get("/a/b/c.txt")
    assert r.status == 200 and r.body == b"legacy strip\n"


# -- per-location overrides of server settings -------------------------------------

OVR_CONF = """
server "ovr" {
    listen on 127.0.0.1 port {port}
    root "/htdocs"
    default type text/x-server
    directory index "start.html"
    header set "X-Scope" "server"
    location "/loc/*" {
        default type text/x-location
        directory index "other.html"
        header set "X-Scope" "location"
        root "/htdocs2"
    }
}
"""


def _ovr_setup(site) -> None:
    for root, idx in (("htdocs", "start.html"), ("htdocs2", "other.html")):
        d = site.dir / root
        (d / "loc").mkdir(parents=True, exist_ok=True)
        (d / "thing").write_text(f"{root} thing")
        (d / "loc/thing").write_text(f"{root} loc thing")
        (d / idx).write_text(f"{root} index")
        (d / "loc" / idx).write_text(f"{root} loc index")


@pytest.fixture(scope="module")
def ovr(tmp_path_factory):
    yield from module_site(tmp_path_factory, OVR_CONF, setup=_ovr_setup)


def test_override_outside_location(ovr):
    r = ovr.get("/thing")
    assert r.body == b"htdocs thing"
    assert r.header("Content-Type") == "text/x-server"
    assert r.header("X-Scope") == "server"
    assert ovr.get("/").body == b"htdocs index"


def test_override_inside_location(ovr):
    r = ovr.get("/loc/thing")
    assert r.body == b"htdocs2 loc thing"
    assert r.header("Content-Type") == "text/x-location"
    assert r.all("X-Scope") == ["location"]
    assert ovr.get("/loc/").body == b"htdocs2 loc index"


# -- Lua patterns through `location match` (patterns(7)) ----------------------------

PAT_CONF = """
server "pat" {
    listen on 127.0.0.1 port {port}
    location match "^/p1/(%a+)(%d+)$" { block return 302 "/r/%1/%2" }
    location match "^/p2/(%S+)%s(%S+)$" { block return 302 "/r/%1/%2" }
    location match "^/p3/([%l%-]+)([^/]*)$" { block return 302 "/r/%1/%2" }
    location match "^/p4/(.-)/(.*)$" { block return 302 "/r/%1|%2" }
    location match "^/p5/(.*)/(.*)$" { block return 302 "/r/%1|%2" }
    location match "^/p6/colou?r$" { block return 302 "/r/color" }
    location match "^/p7/(%b())" { block return 302 "/r/%1" }
    location match "^/p8/.-%f[%w](%w+)$" { block return 302 "/r/%1" }
    location match "^/p9/(%a)%1$" { block return 302 "/r/double-%1" }
    location match "^/p11$" { block return 302 "/r/anchored" }
    location match "p12/(%d+)" { block return 302 "/r/%1" }
    location match "^/p14/(%x+)$" { block return 302 "/r/%1" }
    location match "^/p15/([^%w/]+)$" { block return 302 "/r/punct" }
    location match "^/CS/x$" { block return 302 "/r/case" }
    location match "^/p16/(a*)(b+)(c?)$" { block return 302 "/r/[%1][%2][%3]" }
    location match "^/p17/%.html$" { block return 302 "/r/dot" }
}
"""


@pytest.fixture(scope="module")
def pat(tmp_path_factory):
    yield from module_site(tmp_path_factory, PAT_CONF)


@pytest.mark.parametrize("path,location", [
    ("/p1/abc123", "/r/abc/123"),
    ("/p2/foo%20bar", "/r/foo/bar"),
    ("/p3/ab-c_X9", "/r/ab-c/_X9"),
    ("/p4/a/b/c", "/r/a|b/c"),                  # '-' is lazy
    ("/p5/a/b/c", "/r/a/b|c"),                  # '*' is greedy
    ("/p6/color", "/r/color"),
    ("/p6/colour", "/r/color"),
    ("/p7/(a(b)c)d", "/r/(a(b)c)"),             # balanced match
    ("/p8/--word", "/r/word"),                  # frontier
    ("/p9/aa", "/r/double-a"),                  # back-reference
    ("/p11", "/r/anchored"),
    ("/x/y/p12/77", "/r/77"),                   # unanchored: a search
    ("/p14/deadBEEF", "/r/deadBEEF"),
    ("/p15/!-~", "/r/punct"),
    ("/p16/bb", "/r/[][bb][]"),                 # empty captures
    ("/p16/aabbc", "/r/[aa][bb][c]"),
    ("/p17/.html", "/r/dot"),
])
def test_lua_pattern_matches(pat, path, location):
    r = pat.get(path)
    assert r.status == 302, (path, r.status)
    assert r.header("Location") == location


@pytest.mark.parametrize("path", [
    "/p1/123abc", "/p6/colouur", "/p7/(ab", "/p9/ab", "/p11x", "/p14/xyz",
    "/cs/x",                                     # Lua patterns are case-sensitive
    "/p17/xhtml",                                # '%.' is a literal dot
])
def test_lua_pattern_non_matches(pat, path):
    assert pat.get(path).status == 404
