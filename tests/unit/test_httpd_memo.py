"""httpd's per-request memo caches keep short client-given keys only."""

from __future__ import annotations

from httpd import parse, route, server_http

CONF = '''server "a" {
    listen on 127.0.0.1 port 8080
    root "/htdocs"
    location "/x/*" { block }
}
'''


def _never(conf, path) -> bool:
    raise AssertionError("no `found` location: the file system is not asked")


def test_location_memo_keeps_short_paths_only() -> None:
    srv = parse.load("t.conf", text=CONF).servers[0]
    short = "/x/" + "s" * 10
    long = "/x/" + "l" * route.MEMO_KEY_MAX
    for path in (short, long):
        conf, loc, _ = route.find_location(srv, path, _never)
        assert loc is not None and loc.pattern == "/x/*"
        assert route.find_location(srv, path, _never)[1] is loc     # same answer again
    assert (id(srv), short) in route._LOCATIONS
    assert (id(srv), long) not in route._LOCATIONS


def test_path_memo_keeps_short_paths_only() -> None:
    long = "/" + "a" * route.MEMO_KEY_MAX
    assert server_http._canonical("/a%20b") == "/a b"
    assert server_http._canonical(long) == long
    assert "/a%20b" in server_http._paths and long not in server_http._paths
