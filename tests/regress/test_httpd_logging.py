"""httpd access and error logs: the common, combined, forwarded and
connection line formats of log-formats.md, `no log`, per-server and
per-location files, logdir, the -vv error log."""

from __future__ import annotations

import re

import pytest

from tests.regress.httpd_helpers import (LOG_TS, Conn, free_port, module_site, raw_exchange,
                                         request, site_factory, wait_for)  # noqa: F401

LOG_CONF = """
logdir "{dir}/mylogs"
server "common.test" {
    listen on 127.0.0.1 port {port}
}
server "combined.test" {
    listen on 127.0.0.1 port {port}
    log { access "combined.log", style combined }
}
server "fwd.test" {
    listen on 127.0.0.1 port {port}
    log {
        access "fwd.log"
        style forwarded
    }
}
server "nolog.test" {
    listen on 127.0.0.1 port {port}
    no log
}
server "perloc.test" {
    listen on 127.0.0.1 port {port}
    log access "perloc.log"
    location "/special/*" { log access "special.log" }
    location "/quiet/*" { no log }
}
server "rw.test" {
    listen on 127.0.0.1 port {port}
    log access "rw.log"
    location "/old" { request rewrite "/f.txt?new=1" }
}
server "conn.test" {
    listen on 127.0.0.1 port {port2}
    log { access "conn.log", style connection }
}
"""


def _setup(site) -> None:
    (site.dir / "mylogs").mkdir()
    h = site.htdocs
    (h / "index.html").write_text("index\n")
    (h / "a b.txt").write_text("12345")
    (h / "f.txt").write_text("abc")
    for d in ("special", "quiet"):
        (h / d).mkdir()
        (h / d / "f.txt").write_text(d)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    port2 = free_port()
    yield from module_site(tmp_path_factory, LOG_CONF, setup=_setup,
                           extra_ports=[port2], port2=port2, args=["-vv"])


def lines(site, name):
    p = site.dir / "mylogs" / name
    return p.read_text().splitlines() if p.exists() else []


def wait_line(site, name, pattern):
    rx = re.compile(pattern)
    return wait_for(lambda: next((ln for ln in lines(site, name) if rx.search(ln)), None),
                    what=f"{pattern!r} in {name}: {lines(site, name)}")


def test_log_files_created_in_logdir(logs):
    for name in ("access.log", "error.log", "combined.log", "fwd.log", "perloc.log",
                 "special.log", "conn.log"):
        wait_for((logs.dir / "mylogs" / name).exists, what=name)
    assert not (logs.dir / "logs" / "access.log").exists()


def test_common_format(logs):
    r = request(logs.port, "/a%20b.txt?x=1", host="common.test")
    assert r.status == 200
    line = wait_line(logs, "access.log", r"a%20b")
    assert re.fullmatch(r'common\.test 127\.0\.0\.1 - - ' + LOG_TS +
                        r' "GET /a%20b\.txt\?x=1 HTTP/1\.1" 200 5', line), line


def test_common_format_error_and_version(logs):
    request(logs.port, "/missing-common", host="common.test", version="HTTP/1.0")
    line = wait_line(logs, "access.log", r"missing-common")
    assert re.fullmatch(r'common\.test 127\.0\.0\.1 - - ' + LOG_TS +
                        r' "GET /missing-common HTTP/1\.0" 404 0', line), line


def test_common_format_head_logs_content_length(logs):
    with Conn(logs.port) as c:
        c.send(b"HEAD /f.txt?head HTTP/1.1\r\nHost: common.test\r\nConnection: close\r\n\r\n")
        assert c.response("HEAD").status == 200
    line = wait_line(logs, "access.log", r"HEAD /f\.txt\?head ")
    assert line.endswith('"HEAD /f.txt?head HTTP/1.1" 200 3'), line


def test_unknown_host_logged_under_first_server(logs):
    request(logs.port, "/f.txt?unknown-host", host="nobody.invalid")
    line = wait_line(logs, "access.log", r"unknown-host")
    assert line.startswith("common.test 127.0.0.1 - - [")


def test_malformed_request_logged_400(logs):
    raw_exchange(logs.port, b"GET /bad%zzpath HTTP/1.1\r\nHost: common.test\r\n\r\n")
    line = wait_line(logs, "access.log", r"bad%25zzpath")
    assert re.fullmatch(r'common\.test 127\.0\.0\.1 - - ' + LOG_TS +
                        r' "GET /bad%25zzpath HTTP/1\.1" 400 0', line), line


@pytest.mark.parametrize("raw", [b"GET /\r\n\r\n", b"GET /\r\n"],
                         ids=["blank-line", "line-only"])
def test_request_line_without_version(logs, raw):
    # OpenBSD's args-get-slash: `GET /` is answered 400 at once (not
    # taken for HTTP/0.9, not left waiting for more) and logged "GET /".
    before = len(lines(logs, "access.log"))
    resp = raw_exchange(logs.port, raw, timeout=5)
    assert resp.startswith(b"HTTP/1.0 400 Bad Request\r\n"), resp[:80]
    new = wait_for(lambda: lines(logs, "access.log")[before:], what="a new line")
    assert len(new) == 1 and re.fullmatch(
        r'common\.test 127\.0\.0\.1 - - ' + LOG_TS + r' "GET /" 400 0', new[0]), new


def test_bad_head_logged_with_its_request_line(logs):
    before = len(lines(logs, "access.log"))
    resp = raw_exchange(logs.port, b"GET /two-hosts?q HTTP/1.1\r\nHost: common.test\r\n"
                        b"Host: other.test\r\n\r\n")
    assert resp.startswith(b"HTTP/1.0 400 "), resp[:80]
    new = wait_for(lambda: lines(logs, "access.log")[before:], what="a new line")
    assert new[-1].endswith('"GET /two-hosts?q HTTP/1.1" 400 0'), new


def test_bare_lf_inside_a_header_value_is_part_of_it(logs):
    # args-log-user-agent: OpenBSD httpd ends lines at CRLF only, so the
    # bare LFs (and the "request" after them) are the User-Agent's value
    resp = raw_exchange(logs.port, b"GET /f.txt?ua HTTP/1.0\r\nHost: combined.test\r\n"
                        b"User-Agent: regress\t\n\nGET / HTTP/1.0\r\n\r\n")
    assert resp.startswith(b"HTTP/1.0 200 OK\r\n") and resp.endswith(b"abc"), resp[:200]
    line = wait_line(logs, "combined.log", r"f\.txt\?ua")
    assert line.endswith(r'"GET /f.txt?ua HTTP/1.0" 200 3 "" "regress\t\n\nGET / HTTP/1.0"'), line
    # other control characters in it are still refused
    resp = raw_exchange(logs.port, b"GET /f.txt HTTP/1.0\r\nHost: combined.test\r\n"
                        b"User-Agent: a\x01\nb\r\n\r\n")
    assert resp.startswith(b"HTTP/1.0 400 "), resp[:80]


def test_access_lines_echoed_at_vv(logs):
    # logger_log()'s log_debug("%s", logline): OpenBSD's regress greps them
    request(logs.port, "/f.txt?echoed", host="common.test")
    line = wait_line(logs, "access.log", r"echoed")
    wait_for(lambda: line in logs.daemon.output(), what="the line on stderr")


def test_unparsable_request_still_logged(logs):
    before = len(lines(logs, "access.log"))
    raw_exchange(logs.port, b"\x01\x02garbage\r\n\r\n")
    new = wait_for(lambda: lines(logs, "access.log")[before:], what="a new line")
    assert any(re.search(r'" 400 0$', ln) for ln in new), new


def test_combined_format(logs):
    request(logs.port, "/f.txt?comb", host="combined.test",
            headers={"Referer": "http://ref.example/a b", "User-Agent": "tester/1.0 (x)"})
    line = wait_line(logs, "combined.log", r"\?comb ")
    assert re.fullmatch(r'combined\.test 127\.0\.0\.1 - - ' + LOG_TS +
                        r' "GET /f\.txt\?comb HTTP/1\.1" 200 3'
                        r' "http://ref\.example/a%20b" "tester/1\.0 \(x\)"', line), line


def test_combined_format_absent_headers(logs):
    request(logs.port, "/f.txt?noheaders", host="combined.test")
    line = wait_line(logs, "combined.log", r"noheaders")
    assert line.endswith('"GET /f.txt?noheaders HTTP/1.1" 200 3 "" ""'), line


def test_combined_user_agent_escaped(logs):
    raw_exchange(logs.port, b"GET /f.txt?vis HTTP/1.1\r\nHost: combined.test\r\n"
                            b"User-Agent: a\tb\xe9c\r\nConnection: close\r\n\r\n")
    line = wait_line(logs, "combined.log", r"\?vis ")
    assert line.endswith(' "" "a\\tb\\351c"'), line
    assert len(lines(logs, "combined.log")) == len(set(lines(logs, "combined.log")))


def test_forwarded_format(logs):
    request(logs.port, "/f.txt?fwd", host="fwd.test",
            headers={"User-Agent": "ua", "X-Forwarded-For": "192.0.2.7, 10.0.0.1",
                     "X-Forwarded-Port": "443"})
    line = wait_line(logs, "fwd.log", r"\?fwd ")
    assert re.fullmatch(r'fwd\.test 127\.0\.0\.1 - - ' + LOG_TS +
                        r' "GET /f\.txt\?fwd HTTP/1\.1" 200 3 "" "ua"'
                        r' "192\.0\.2\.7, 10\.0\.0\.1" "443"', line), line


def test_forwarded_format_absent_headers(logs):
    request(logs.port, "/f.txt?fwd-none", host="fwd.test")
    line = wait_line(logs, "fwd.log", r"fwd-none")
    assert line.endswith(' 200 3 "" "" "-" "-"'), line


def test_no_log(logs):
    request(logs.port, "/f.txt?nolog-marker", host="nolog.test")
    request(logs.port, "/f.txt?after-nolog", host="common.test")
    wait_line(logs, "access.log", r"after-nolog")
    for name in ("access.log", "error.log", "combined.log", "fwd.log", "perloc.log"):
        assert not any("nolog-marker" in ln for ln in lines(logs, name)), name


def test_per_location_log_file(logs):
    request(logs.port, "/special/f.txt?sp", host="perloc.test")
    request(logs.port, "/f.txt?plain", host="perloc.test")
    request(logs.port, "/quiet/f.txt?hush", host="perloc.test")
    request(logs.port, "/f.txt?after-quiet", host="perloc.test")
    line = wait_line(logs, "special.log", r"\?sp ")
    assert line.startswith("perloc.test 127.0.0.1 - - [")
    wait_line(logs, "perloc.log", r"\?plain ")
    wait_line(logs, "perloc.log", r"after-quiet")
    assert not any("?sp " in ln for ln in lines(logs, "perloc.log"))
    assert not any("plain" in ln for ln in lines(logs, "special.log"))
    for name in ("perloc.log", "special.log", "access.log"):
        assert not any("hush" in ln for ln in lines(logs, name))


def test_connection_format(logs):
    port2 = logs.ports[0]
    with Conn(port2) as c:
        cport = c.sock.getsockname()[1]
        c.send(b"GET /f.txt HTTP/1.1\r\nHost: conn.test\r\n\r\n"
               b"GET /a%20b.txt HTTP/1.1\r\nHost: conn.test\r\n\r\n")
        assert c.response().status == 200
        assert c.response().status == 200
    line = wait_line(logs, "conn.log", rf"127\.0\.0\.1:{cport} ")
    assert re.fullmatch(rf"server conn\.test, client \d+ \(\d+ active\), 127\.0\.0\.1:{cport}"
                        rf" -> 127\.0\.0\.1:{port2}, closed, \[/f\.txt\] \[/a%20b\.txt\]",
                        line), line


def test_connection_format_error_close(logs):
    port2 = logs.ports[0]
    with Conn(port2) as c:
        cport = c.sock.getsockname()[1]
        c.send(b"GET /nothing-here HTTP/1.1\r\nHost: conn.test\r\n\r\n")
        assert c.response().status == 404
    line = wait_line(logs, "conn.log", rf"127\.0\.0\.1:{cport} ")
    assert re.fullmatch(rf"server conn\.test, client \d+ \(\d+ active\), 127\.0\.0\.1:{cport}"
                        rf" -> 127\.0\.0\.1:{port2}, /nothing-here \(404 Not Found\),"
                        rf" \[/nothing-here\]", line), line
    # one line per connection, not per request: no common-style lines there
    assert all(ln.startswith("server conn.test, client ") for ln in lines(logs, "conn.log"))


def test_error_log_verbose(site_factory):
    site = site_factory('server "v.test" {\n listen on 127.0.0.1 port {port}\n}\n',
                        args=["-vv"])
    with Conn(site.port) as c:
        cport = c.sock.getsockname()[1]
        c.send(b"GET /missing HTTP/1.1\r\nHost: v.test\r\n\r\n")
        assert c.response().status == 404
    line = site.wait_log(rf"127\.0\.0\.1:{cport} ", name="error.log")
    assert re.fullmatch(rf"server v\.test, client \d+ \(\d+ active\), 127\.0\.0\.1:{cport}"
                        rf" -> 127\.0\.0\.1:{site.port}, /missing \(404 Not Found\)", line), line
    site.wait_log(r'"GET /missing HTTP/1\.1" 404 0$')
    assert "server_launch: running server v.test" in site.daemon.output()


def test_error_log_quiet_without_verbose(site_factory):
    site = site_factory('server "q.test" {\n listen on 127.0.0.1 port {port}\n}\n')
    request(site.port, "/missing", host="q.test")
    site.wait_log(r'"GET /missing HTTP/1\.1" 404 0$')
    assert site.log_lines("error.log") == []
    assert (site.logs / "error.log").exists()


def test_rewritten_request_logged_as_requested(logs):
    r = request(logs.port, "/old?orig=1", host="rw.test")
    assert r.status == 200 and r.body == b"abc"
    line = wait_line(logs, "rw.log", r"orig")
    assert line.endswith('"GET /old?orig=1 HTTP/1.1" 200 3'), line
