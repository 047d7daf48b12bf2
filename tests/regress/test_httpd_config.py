"""httpd command line and configuration: -n results and exit codes,
`file:line: message` errors, continuation lines and comments, macros,
-D, include, listen addresses (v4, v6, `*`, names, interfaces), ports."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO
from tests.regress.httpd_helpers import (free_port, request, run_cmd,  # noqa: F401
                                         site_factory, wait_port)


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_v6 = pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")


def write_conf(tmp_path: Path, text: str, name: str = "httpd.conf") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def check(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cmd("httpd", "-n", "-f", str(conf), *args)


GOOD = """
# a comment line
chroot "{tmp}"
server "example.com" {
    listen on 127.0.0.1 port 8080   # trailing comment
    root "/htdocs"
}
"""


# -- -n -----------------------------------------------------------------------------

def test_configtest_ok(tmp_path):
    r = check(write_conf(tmp_path, GOOD.replace("{tmp}", str(tmp_path))))
    assert r.returncode == 0
    assert "configuration OK" in r.stderr + r.stdout


def test_configtest_syntax_error(tmp_path):
    conf = write_conf(tmp_path, 'server "x" {\n listen on 127.0.0.1 port 8080\n'
                                   ' bogus directive\n}\n')
    r = check(conf)
    assert r.returncode != 0
    assert "configuration OK" not in r.stderr + r.stdout
    assert f"{conf}:3: " in r.stderr


def test_configtest_reports_file_as_given(tmp_path):
    conf = write_conf(tmp_path, 'server "x" {\n listen on 127.0.0.1 port 8080\n'
                                   ' root\n}\n')
    rel = os.path.relpath(conf, REPO)
    r = run_cmd("httpd", "-n", "-f", rel)
    assert r.returncode != 0
    assert any(line.startswith(f"{rel}:3: ") for line in r.stderr.splitlines()), r.stderr


def test_configtest_every_error_reported(tmp_path):
    conf = write_conf(tmp_path, 'server "x" {\n'
                                   ' listen on 127.0.0.1 port 8080\n'
                                   ' bogus one\n'
                                   ' root "/htdocs"\n'
                                   ' bogus two\n'
                                   '}\n')
    r = check(conf)
    assert r.returncode != 0
    assert f"{conf}:3: " in r.stderr and f"{conf}:5: " in r.stderr, r.stderr


def test_configtest_missing_listen(tmp_path):
    conf = write_conf(tmp_path, 'server "x" {\n root "/htdocs"\n}\n')
    r = check(conf)
    assert r.returncode != 0
    assert str(conf) in r.stderr


def test_configtest_no_servers(tmp_path):
    r = check(write_conf(tmp_path, "# nothing\n"))
    assert r.returncode != 0


def test_configtest_missing_file(tmp_path):
    r = check(tmp_path / "does-not-exist.conf")
    assert r.returncode != 0
    assert "does-not-exist.conf" in r.stderr


@pytest.mark.parametrize("bad", [
    'server "x" {\n listen on 127.0.0.1 port 70000\n}\n',          # port out of range
    'server "x" {\n listen on 127.0.0.1 port nosuchservice\n}\n',
    'server "x" {\n listen on 127.0.0.1 port 8080\n block return 999\n}\n',
    'server "x" {\n listen on 127.0.0.1 port 8080\n block return 404 "/uri"\n}\n',
    'server "x" {\n listen on 127.0.0.1 port 8080\n'
    ' location "/a" {\n  listen on 127.0.0.1 port 8081\n }\n}\n',   # not inside location
    'server "x" {\n listen on 127.0.0.1 port 8080\n log style fancy\n}\n',
    'prefork 99\nserver "x" {\n listen on 127.0.0.1 port 8080\n}\n',
    'server "x" {\n listen on 127.0.0.1 port 8080\n}\nserver "x" {\n'
    ' listen on 127.0.0.1 port 8080\n}\n',                           # defined twice
    'server "x" {\n listen on 127.0.0.1 port 8080\n',               # unterminated block
], ids=["port-range", "port-name", "return-code", "uri-non-3xx", "listen-in-location",
        "log-style", "prefork", "duplicate", "unterminated"])
def test_configtest_semantic_errors(tmp_path, bad):
    r = check(write_conf(tmp_path, bad))
    assert r.returncode != 0, bad
    assert "configuration OK" not in r.stderr + r.stdout
    assert f"{tmp_path}/httpd.conf:" in r.stderr


def test_port_by_service_name(tmp_path):
    r = check(write_conf(tmp_path, 'server "x" {\n listen on 127.0.0.1 port www\n}\n'))
    assert r.returncode == 0, r.stderr


def test_usage(tmp_path):
    r = run_cmd("httpd", "-x")
    assert r.returncode == 1
    assert "usage: httpd [-dnUv] [-D macro=value] [-f file]" in r.stderr


def test_bad_cmdline_macro(tmp_path):
    conf = write_conf(tmp_path, GOOD.replace("{tmp}", str(tmp_path)))
    r = check(conf, "-D", "novalue")
    assert r.returncode != 0


# -- lexical rules ------------------------------------------------------------------

def test_continuation_and_comments(site_factory):
    site = site_factory(
        '# comment at the top\n'
        'server \\\n'
        '   "cont.test" {\n'
        '    listen on 127.0.0.1 \\\n'
        '        port {port}   # a comment after a continued line\n'
        '    # root "/wrong" \\\n'
        '    root "/also-wrong"\n'                # swallowed by the comment above
        '    location "/x" { block return 302 \'/single quoted\' }\n'
        '}\n',
        setup=lambda s: (s.htdocs / "index.html").write_text("right root\n"))
    r = site.get("/")
    assert r.status == 200 and r.body == b"right root\n"
    assert site.get("/x").header("Location") == "/single quoted"


def test_macros(site_factory):
    site = site_factory(
        'listen_both = "127.0.0.1 port {port}"\n'
        'name = "m.test"\n'
        'code = 307\n'
        'server $name {\n'
        '    listen on $listen_both\n'              # one macro, several tokens
        '    root "/docroot"\n'
        '    location "/lit" { block return $code "/$name" }\n'   # not expanded in quotes
        '}\n',
        setup=lambda s: ((s.dir / "docroot").mkdir(),
                         (s.dir / "docroot/index.html").write_text("macro root\n")))
    r = site.get("/", host="m.test")
    assert r.status == 200 and r.body == b"macro root\n"
    r = site.get("/lit")
    assert r.status == 307 and r.header("Location") == "/$name"


def test_undefined_macro_is_an_error(tmp_path):
    conf = write_conf(tmp_path, 'server "x" {\n listen on 127.0.0.1 port $nope\n}\n')
    r = check(conf)
    assert r.returncode != 0
    assert f"{conf}:2: " in r.stderr


def test_cmdline_macro_overrides_file(site_factory, tmp_path):
    port = free_port()
    site = site_factory(
        'p = "{port}"\n'
        'server "d.test" {\n listen on 127.0.0.1 port $p\n}\n',
        args=["-D", f"p={port}"], wait_ports=[port],
        setup=lambda s: (s.htdocs / "index.html").write_text("via -D\n"))
    r = request(port, "/")
    assert r.status == 200 and r.body == b"via -D\n"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", site.port), timeout=2).close()


def test_cmdline_macro_without_file_definition(tmp_path):
    conf = write_conf(tmp_path, 'server "x" {\n listen on 127.0.0.1 port $p\n}\n')
    assert check(conf).returncode != 0
    assert check(conf, "-D", "p=8080").returncode == 0


def test_include(site_factory):
    def setup(site):
        (site.dir / "conf.d").mkdir()
        (site.dir / "conf.d/inner.conf").write_text(
            '    location "/inner" { block return 302 "/from-inner" }\n')
        (site.dir / "conf.d/server.conf").write_text(
            'server "inc.test" {\n'
            '    listen on 127.0.0.1 port {port}\n'.replace("{port}", str(site.port)) +
            f'    include "{site.dir}/conf.d/inner.conf"\n'
            '}\n')
        (site.htdocs / "index.html").write_text("included server\n")
    site = site_factory('include "{dir}/conf.d/server.conf"\n', setup=setup)
    assert site.get("/").body == b"included server\n"
    assert site.get("/inner").header("Location") == "/from-inner"


def test_include_missing_file(tmp_path):
    conf = write_conf(tmp_path, f'include "{tmp_path}/nope.conf"\n'
                                   'server "x" {\n listen on 127.0.0.1 port 8080\n}\n')
    r = check(conf)
    assert r.returncode != 0
    assert "nope.conf" in r.stderr


# -- listen addresses ---------------------------------------------------------------

def _index(site):
    (site.htdocs / "index.html").write_text("hello\n")


@needs_v6
def test_listen_ipv6(site_factory):
    site = site_factory('server "v6" {\n listen on ::1 port {port}\n}\n',
                        setup=_index, wait_host="::1")
    r = request(site.port, "/", addr="::1")
    assert r.status == 200 and r.body == b"hello\n"


@needs_v6
def test_listen_star_is_both_families(site_factory):
    site = site_factory('server "star" {\n listen on * port {port}\n}\n', setup=_index)
    wait_port(site.port, "::1")
    assert request(site.port, "/", addr="127.0.0.1").body == b"hello\n"
    assert request(site.port, "/", addr="::1").body == b"hello\n"


def test_listen_all_ipv4(site_factory):
    site = site_factory('server "any4" {\n listen on 0.0.0.0 port {port}\n}\n', setup=_index)
    assert request(site.port, "/", addr="127.0.0.1").body == b"hello\n"


@needs_v6
def test_listen_all_ipv6(site_factory):
    site = site_factory('server "any6" {\n listen on :: port {port}\n}\n', setup=_index,
                        wait_host="::1")
    assert request(site.port, "/", addr="::1").body == b"hello\n"


def test_listen_localhost(site_factory):
    site = site_factory('server "lh" {\n listen on localhost port {port}\n}\n', setup=_index)
    assert request(site.port, "/", addr="127.0.0.1").body == b"hello\n"


def test_listen_interface_name(site_factory):
    site = site_factory('server "lo" {\n listen on lo port {port}\n}\n', setup=_index)
    assert request(site.port, "/", addr="127.0.0.1").body == b"hello\n"


def test_listen_on_two_ports(site_factory):
    port2 = free_port()
    site = site_factory('server "two" {\n listen on 127.0.0.1 port {port}\n'
                        ' listen on 127.0.0.1 port {port2}\n}\n',
                        setup=_index, extra_ports=[port2], port2=port2)
    assert request(site.port, "/").body == b"hello\n"
    assert request(port2, "/").body == b"hello\n"


def test_bind_failure_exits_nonzero(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = write_conf(tmp_path, f'server "x" {{\n listen on 127.0.0.1 port {port}\n}}\n',
                             name="busy.conf")
        p = subprocess.run([PYTHON, "-m", "httpd", "-d", "-f", str(conf)],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0


def test_start_with_bad_config_fails(tmp_path):
    conf = write_conf(tmp_path, 'server "x" {\n listen on 127.0.0.1 port 8080\n nonsense\n}\n')
    p = subprocess.run([PYTHON, "-m", "httpd", "-d", "-f", str(conf)], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert f"{conf}:3: " in p.stderr


def test_listen_on_egress_group(tmp_path):
    from shared.addr import egress_interface
    r = check(write_conf(tmp_path, 'server "x" {\n listen on egress port 8080\n}\n'))
    if egress_interface() is None:      # no default route: egress names nothing
        assert r.returncode != 0 and "egress" in r.stderr
        return
    assert r.returncode == 0, r.stderr
