"""httpd HTTP/1.x handling: persistence, pipelining, request bodies,
connection limits and timeouts, malformed input (always an answer or a
silent close, and the server keeps serving)."""

from __future__ import annotations

import socket
import time

import pytest

from tests.regress.httpd_helpers import Conn, module_site, raw_exchange, site_factory  # noqa: F401

PROTO_CONF = """
server "proto" {
    listen on 127.0.0.1 port {port}
    root "/htdocs"
    connection { max requests 3, max request body 100 }
}
"""
BODY = b"hello, world\n"


def _setup(site) -> None:
    (site.htdocs / "index.html").write_bytes(BODY)
    (site.htdocs / "a.txt").write_text("AAA")
    (site.htdocs / "b.txt").write_text("BBB")


@pytest.fixture(scope="module")
def proto(tmp_path_factory):
    yield from module_site(tmp_path_factory, PROTO_CONF, setup=_setup)


def status_of(data: bytes) -> int:
    assert data.startswith(b"HTTP/"), data[:200]
    return int(data.split(b" ", 2)[1])


def exchange(site, data: bytes) -> bytes:
    return raw_exchange(site.port, data)


def assert_still_serving(site) -> None:
    r = site.get("/index.html")
    assert r.status == 200 and r.body == BODY


# -- persistence ----------------------------------------------------------------

def test_http11_keep_alive_by_default(proto):
    with Conn(proto.port) as c:
        for _ in range(2):
            c.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            r = c.response()
            assert r.status == 200 and r.body == b"AAA"
            assert r.header("Connection") == "keep-alive"


def test_http11_connection_close(proto):
    with Conn(proto.port) as c:
        c.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = c.response()
        assert r.status == 200 and r.header("Connection") == "close"
        assert c.read_all() == b"" and c.eof


def test_http10_closes_by_default(proto):
    with Conn(proto.port) as c:
        c.send(b"GET /a.txt HTTP/1.0\r\n\r\n")
        r = c.response()
        assert r.version == "HTTP/1.0" and r.status == 200
        assert r.header("Connection") == "close"
        assert c.read_all() == b"" and c.eof


def test_http10_keep_alive(proto):
    with Conn(proto.port) as c:
        c.send(b"GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        r = c.response()
        assert r.header("Connection") == "keep-alive" and r.body == b"AAA"
        c.send(b"GET /b.txt HTTP/1.0\r\n\r\n")
        r = c.response()
        assert r.body == b"BBB" and r.header("Connection") == "close"


def test_pipelined_requests_answered_in_order(proto):
    with Conn(proto.port) as c:
        c.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /b.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        r1 = c.response()
        r2 = c.response()
        assert (r1.status, r1.body) == (200, b"AAA")
        assert (r2.status, r2.body) == (200, b"BBB")


def test_pipelined_head_and_get(proto):
    with Conn(proto.port) as c:
        c.send(b"HEAD /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /b.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r1 = c.response("HEAD")
        r2 = c.response()
        assert r1.status == 200 and r1.header("Content-Length") == "3"
        assert r2.body == b"BBB"


def test_max_requests(proto):
    with Conn(proto.port) as c:
        conns = []
        for _ in range(3):
            c.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            r = c.response()
            assert r.status == 200
            conns.append(r.header("Connection"))
        assert conns == ["keep-alive", "keep-alive", "close"]
        assert c.read_all() == b"" and c.eof


def test_request_body_too_large_413(proto):
    r = proto.get("/index.html", method="POST", body=b"x" * 101)
    assert (r.status, r.reason) == (413, "Payload Too Large")


def test_request_body_limit_announced_only(proto):
    # the limit applies to the announced Content-Length, before any body byte
    with Conn(proto.port) as c:
        c.send(b"POST /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        r = c.response()
        assert r.status == 413


def test_body_within_limit_then_next_request(proto):
    with Conn(proto.port) as c:
        c.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
               b"GET /b.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r1 = c.response()
        assert r1.status == 200 and r1.body == b"AAA"
        r2 = c.response()
        assert r2 is None or r2.body == b"BBB" or r2.status == 400


def test_chunked_request_body_to_static_file(proto):
    with Conn(proto.port) as c:
        c.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\n\r\n"
               b"GET /b.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r1 = c.response()
        assert r1.status == 200 and r1.body == b"AAA"
        r2 = c.response()
        assert r2 is None or r2.body == b"BBB"


def test_chunked_post_to_static_file_405(proto):
    data = exchange(proto, b"POST /a.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"5\r\nhello\r\n0\r\n\r\n")
    assert status_of(data) == 405


def test_request_timeout_closes_idle_connection(site_factory):
    site = site_factory('server "t" {\n listen on 127.0.0.1 port {port}\n'
                        ' connection request timeout 1\n}\n',
                        setup=lambda s: (s.htdocs / "index.html").write_text("x"))
    with Conn(site.port, timeout=15) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.response().status == 200
        # idle keep-alive connection: closed without another byte
        assert c.read_all() == b"" and c.eof
    with Conn(site.port, timeout=15) as c:
        c.send(b"GET / HT")                          # not even a request line
        assert c.read_all() == b"" and c.eof


def test_request_timeout_is_an_inactivity_timeout(site_factory):
    # libevent's read timeout restarts with every read: a slow but steady
    # client is not cut off after `request timeout` seconds in total
    site = site_factory('server "t" {\n listen on 127.0.0.1 port {port}\n'
                        ' connection request timeout 2\n}\n',
                        setup=lambda s: (s.htdocs / "index.html").write_text("x"))
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 12 + b"\r\n\r\n"
    with Conn(site.port, timeout=15) as c:
        for i in range(0, len(head), 3):
            c.send(head[i:i + 3])
            time.sleep(0.25)                     # ~3.5 s in total
        r = c.response()
        assert r.status == 200 and r.body == b"x"


def test_full_worker_closes_the_longest_waiting_slow_header_client(site_factory):
    # 1,024 clients a worker (SERVER_MAX_CLIENTS) and an inactivity-only
    # request timeout: slowloris clients would hold every slot.  A worker
    # at its limit with a client in the accept queue closes the connection
    # that has waited longest for its request head.
    site = site_factory('prefork 1\nserver "t" {\n listen on 127.0.0.1 port {port}\n}\n',
                        setup=lambda s: (s.htdocs / "index.html").write_text("x"))
    slow: list[socket.socket] = []
    try:
        for _ in range(1100):                    # more than one worker takes
            c = socket.create_connection(("127.0.0.1", site.port), timeout=10)
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a\r\n")
            slow.append(c)
        # served although every slot was taken by a slow client
        with Conn(site.port, timeout=20) as c:
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            r = c.response()
            assert r.status == 200 and r.body == b"x"
        # and the one that waited longest was the one closed
        slow[0].settimeout(10)
        assert slow[0].recv(100) == b""
    finally:
        for c in slow:
            c.close()
    assert site.daemon.proc.poll() is None


def test_request_timeout_in_unfinished_head_408(site_factory):
    # server_error(): a timeout after a request line was read answers 408
    site = site_factory('server "t" {\n listen on 127.0.0.1 port {port}\n'
                        ' connection request timeout 1\n}\n')
    for partial in (b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b"):
        with Conn(site.port, timeout=15) as c:
            c.send(partial)
            r = c.response()
            assert (r.status, r.reason) == (408, "Request Timeout")
            assert r.version == "HTTP/1.0" and r.header("Connection") == "close"
            assert c.read_all() == b""


# -- malformed input: 400 and friends -------------------------------------------

@pytest.mark.parametrize("name,data,status", [
    ("no host 1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("cl and te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("two content-lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                            b"Content-Length: 4\r\n\r\nabcd", 400),
    ("unknown method", b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("lower-case method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("first byte not a letter", b"/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("missing version", b"GET /\r\n\r\n", 400),
    ("garbage version", b"GET / HTTP/x.y\r\nHost: a\r\n\r\n", 400),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n", 400),
    ("bad percent", b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("short percent", b"GET /a% HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("nul", b"GET /index.html%00.txt HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("bad host port", b"GET / HTTP/1.1\r\nHost: a:port\r\n\r\n", 400),
    ("trace with body", b"TRACE / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", 400),
    ("propfind on file", b"PROPFIND /index.html HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    ("header too large", b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 9216 + b"\r\n\r\n", 413),
    ("many headers", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-H: 0123456789\r\n" * 700 + b"\r\n",
     413),
    ("request line too long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 413),
    ("unsupported major version", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_request(proto, name, data, status):
    resp = exchange(proto, data)
    assert status_of(resp) == status, name
    head = resp.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.0 ")
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    assert_still_serving(proto)


def test_non_numeric_content_length_400(proto):
    # OpenBSD answers 500 here (strtonum() failure); an invalid length is
    # the client's error: 400.
    for cl in (b"abc", b"-1", b"1x", b"", b"99999999999999999999999"):
        resp = exchange(proto, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + cl + b"\r\n\r\n")
        assert status_of(resp) == 400, cl
    assert_still_serving(proto)


def test_http10_without_host_is_fine(proto):
    r = proto.get("/index.html", version="HTTP/1.0", host=None)
    assert r.status == 200 and r.body == BODY


def test_minor_version_above_1_is_1_1(proto):
    with Conn(proto.port) as c:
        c.send(b"GET /a.txt HTTP/1.5\r\nHost: x\r\n\r\n")
        r = c.response()
        assert r.status == 200 and r.version == "HTTP/1.1" and r.body == b"AAA"


def test_obs_fold_header_accepted(proto):
    resp = exchange(proto, b"GET /index.html HTTP/1.1\r\nHost: x\r\nX-Folded: one\r\n"
                           b" two\r\n\ttwo-b\r\nConnection: close\r\n\r\n")
    assert status_of(resp) == 200 and resp.endswith(BODY)


def test_bare_lf_gets_no_response(site_factory):
    # Lines must end in CRLF; a head with bare LFs is never complete, so
    # OpenBSD waits (features.md H49) until the request timeout closes it.
    site = site_factory('server "t" {\n listen on 127.0.0.1 port {port}\n'
                        ' connection request timeout 1\n}\n',
                        setup=lambda s: (s.htdocs / "index.html").write_bytes(BODY))
    with Conn(site.port, timeout=15) as c:
        c.send(b"GET /index.html HTTP/1.1\nHost: x\n\n")
        assert c.read_all() == b"" and c.eof
    assert_still_serving(site)


def test_bare_lf_flood_413(proto):
    resp = exchange(proto, b"GET /index.html HTTP/1.1\nHost: x\n" + b"X: y\n" * 3000)
    assert status_of(resp) == 413


def test_garbage_bytes(proto):
    resp = exchange(proto, bytes(range(256)) * 4)
    assert resp == b"" or status_of(resp) in (400, 413)
    assert_still_serving(proto)


def test_client_disconnect_mid_request(proto):
    for data in (b"GET /index.html HTTP/1.1\r\nHo", b"POST /a.txt HTTP/1.1\r\nHost: x\r\n"
                                                     b"Content-Length: 50\r\n\r\nabc"):
        with socket.create_connection(("127.0.0.1", proto.port)) as s:
            s.sendall(data)
    assert_still_serving(proto)


def test_bad_request_does_not_disturb_other_connection(proto):
    with Conn(proto.port) as good:
        good.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert good.response().body == b"AAA"
        resp = exchange(proto, b"BOGUS\x01 / HTTP/1.1\r\n\r\n")
        assert status_of(resp) == 400
        good.send(b"GET /b.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        r = good.response()
        assert r.status == 200 and r.body == b"BBB"


def test_bad_request_after_good_one_on_same_connection(proto):
    with Conn(proto.port) as c:
        c.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\nGET /%zz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.response().body == b"AAA"
        r = c.response()
        assert r.status == 400 and r.version == "HTTP/1.0"
        assert c.read_all() == b""


def test_many_connections_in_parallel(proto):
    conns = [Conn(proto.port) for _ in range(50)]
    try:
        for c in conns:
            c.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        for c in conns:
            assert c.response().body == b"AAA"
    finally:
        for c in conns:
            c.close()
