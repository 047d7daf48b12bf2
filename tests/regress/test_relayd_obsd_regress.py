"""relayd as OpenBSD's regress suite (regress/usr.sbin/relayd) expects it,
black-box: a real `python -m relayd -d -vv`, raw-socket clients and
backends, the bytes on both sides and relayd's log lines.

* Rules (args-http-append-header.pl, args-http-filter-cookie.pl): `header
  append` adds a line of its own, `header log` logs the header as it
  arrived, response `cookie` rules work on Set-Cookie, and `cookie log`
  logs the whole Cookie header.
* TLS file names (Relayd.pm's `tls ca cert ca.crt` / `tls ca key ca.key
  password ''`): relative names are opened from relayd's working
  directory, not from /etc/ssl (here RELAYD_SSL_DIR, which still holds the
  keypairs).
* The -vv dump of every relay: relay_protodebug()'s and relay_ruledebug()'s
  lines, e.g. "relay flags: tls, tls client, tls inspect".
The log regexes are the suite's own, letter for letter."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trustme
from cryptography import x509

from tests.conftest import REPO, Daemon, free_port, wait_port
from tests.regress.test_relayd_http import Client, Recorder
from tests.regress.test_relayd_tls import Backend, cert_and_reply, get, noverify, write_pair

pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")

HTTP_CONF = """
prefork 1
log connection
http protocol "append" {{
	tcp splice
	match request header append "X-Header-Client" value "abc"
	match response header append "X-Header-Server" value "xyz"
	match request header log "X-Header*"
	match response header log "X-Header*"
}}
http protocol "cookie" {{
	tcp no splice
	block request cookie log "med" value "thx"
	match response cookie append "a" value "b" tag "cookie"
	match response cookie log "a" value "1"
	pass tagged "cookie"
}}
http protocol "pattern" {{
	match request path pattern "^/api" tag PATLOWER
	match request path pattern "^/API" tag PATUPPER
	match request header "X-Test" tag VALGLOB
	match request header pattern "^X%-Test$" tagged VALGLOB tag VALPAT
}}
relay "pattern" {{
	listen on 127.0.0.1 port {p_pattern}
	protocol "pattern"
	forward to 127.0.0.1 port {rec}
}}
relay "append" {{
	listen on 127.0.0.1 port {p_append}
	protocol "append"
	forward to 127.0.0.1 port {rec}
}}
relay "cookie" {{
	listen on 127.0.0.1 port {p_cookie}
	protocol "cookie"
	forward to 127.0.0.1 port {rec}
}}
"""


def log_line(d: Daemon, pattern: str, timeout: float = 5.0) -> str:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for line in d.output().splitlines():
            if rx.search(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line /{pattern}/ in:\n{d.output()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obsd_http")
    rec = Recorder(name="rec")
    ports = {"p_append": free_port(), "p_cookie": free_port(), "p_pattern": free_port()}
    conf = tmp / "relayd.conf"
    conf.write_text(HTTP_CONF.format(rec=rec.port, **ports))
    d = Daemon("relayd", conf, ["-vv"])
    try:
        for p in ports.values():
            wait_port(p, proc=d.proc)
        yield d, rec, ports
    finally:
        d.stop()
        rec.close()


def _exchange(port: int, head: str):
    with Client(port) as c:
        c.send(head.encode())
        return c.response()


# -- 5. rules ---------------------------------------------------------------------------
def test_append_header_both_directions(http):
    d, rec, ports = http
    path = f"/append/{time.monotonic_ns()}/hdr/X-Header-Server/XYZ"
    r = _exchange(ports["p_append"], f"GET {path} HTTP/1.1\r\nHost: foo.bar\r\n"
                  "X-Header-Client: ABC\r\nConnection: close\r\n\r\n")
    # server side: the client's line, then relayd's own line
    head = rec.find(path).head
    assert b"\r\nX-Header-Client: ABC\r\nX-Header-Client: abc\r\n" in head + b"\r\n"
    # client side: the server's line and relayd's, each a line of its own
    assert r.status == 200
    assert b"\r\nX-Header-Server: XYZ\r\nX-Header-Server: xyz\r\n" in r.head
    assert r.header("x-header-server") == "XYZ"
    log_line(d, r" (?:done|last write \(done\)), \[X-Header-Client: ABC\] GET "
                r"\{X-Header-Server: XYZ\};")


def test_block_request_cookie_logs_the_cookie_header(http):
    d, rec, ports = http
    cookie = "med=thx; domain=.foo.bar; path=/; expires=Mon, 27-Oct-2014 04:11:56 GMT;"
    path = f"/cookie-blocked/{time.monotonic_ns()}"
    with Client(ports["p_cookie"]) as c:
        c.send(f"GET {path} HTTP/1.1\r\nHost: foo.bar\r\nCookie: {cookie}\r\n\r\n".encode())
        assert c.read_all() == b""                # no `return error`: closed
    assert not rec.has(path)
    line = log_line(d, r"Forbidden, \[Cookie: med=thx.*")
    assert line.endswith(f"Forbidden, [Cookie: {cookie}] GET")


def test_response_cookie_rules_on_set_cookie(http):
    d, rec, ports = http
    path = f"/cookie-ok/{time.monotonic_ns()}/setcookie"
    r = _exchange(ports["p_cookie"], f"GET {path} HTTP/1.1\r\nHost: foo.bar\r\n"
                  "Connection: close\r\n\r\n")
    assert r.status == 200
    # the backend's Set-Cookie stays, relayd's is a line of its own
    assert b"\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: a=b;\r\n" in r.head
    assert rec.find(path).header("cookie") is None
    # the tag of the response rule, and the whole Set-Cookie header logged
    line = log_line(d, r"relay cookie, session \d+ \(\d+ active\), cookie, .*\{Set-Cookie")
    assert line.endswith(", done, GET {Set-Cookie: a=1; Path=/};")


def test_path_pattern_is_case_sensitive(http):
    # args-http-pattern-case.pl: patterns(7) never fold case
    d, rec, ports = http
    r = _exchange(ports["p_pattern"], "GET /API/foo/bar HTTP/1.1\r\nHost: foo.bar\r\n"
                  "Connection: close\r\n\r\n")
    assert r.status == 200 and rec.find("/API/foo/bar") is not None
    line = log_line(d, r", PATUPPER,.*done")
    assert ", PATLOWER," not in d.output(), line


def test_pattern_key_value_defaults_to_any(http):
    # args-http-value-default.pl: an omitted value matches any value, with
    # a glob key and with a patterns(7) key
    d, rec, ports = http
    r = _exchange(ports["p_pattern"], "GET /valdef HTTP/1.1\r\nHost: foo.bar\r\n"
                  "X-Test: whatever\r\nConnection: close\r\n\r\n")
    assert r.status == 200
    log_line(d, r", VALPAT,.*done")


def test_vv_dump_of_http_relays(http):
    d, _, _ = http
    out = d.output()
    for text in ("relay_privinit: adding relay append\n",
                 "\tflags: used, relay flags: \n",
                 "\ttls session tickets: disabled\n\ttype: http\n",
                 '\t\tmatch request header append "X-Header-Client" value "abc" \n',
                 '\t\tmatch response header log "X-Header*" value "*" \n',
                 "\ttcp flags: no splice\n",
                 '\t\tblock request cookie log "med" value "thx" \n',
                 '\t\tmatch response cookie append "a" value "b" tag "cookie" \n',
                 '\t\tpass request tagged "cookie" \n'):
        assert text in out, text
    assert re.search(r"^protocol \d+: name append$", out, re.M)


# -- 7. relative TLS file names --------------------------------------------------------
TLS_CONF = """
prefork 1
log connection
tcp protocol "inspect" {
	tls ca cert ca.crt
	tls ca key ca.key password ''
}
tcp protocol "fwd" {
	tls ca file "certs/backend-ca.pem"
}
tcp protocol "cca" {
	tls client ca "client-ca.pem"
}
"""


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory):
    ssl_dir = tmp_path_factory.mktemp("obsd_ssl")       # keypairs only (RELAYD_SSL_DIR)
    run = tmp_path_factory.mktemp("obsd_run")           # relayd's working directory
    (ssl_dir / "private").mkdir()
    (run / "certs").mkdir()
    ca = trustme.CA()
    write_pair(ssl_dir, "127.0.0.1", ca.issue_cert("127.0.0.1"))
    lca = trustme.CA(organization_name="regress ca")
    lca.cert_pem.write_to_path(str(run / "ca.crt"))
    lca.private_key_pem.write_to_path(str(run / "ca.key"))    # unencrypted: password ''
    bca = trustme.CA()
    bca.cert_pem.write_to_path(str(run / "certs" / "backend-ca.pem"))
    cca = trustme.CA()
    cca.cert_pem.write_to_path(str(run / "client-ca.pem"))
    bctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bca.issue_cert("backend.test").configure_cert(bctx)
    plain, tlsb = Backend(b"plain-backend"), Backend(b"tls-backend", bctx)
    ports = {k: free_port() for k in ("inspect", "fwd", "cca")}
    conf = run / "relayd.conf"
    relays = [("inspect", " tls", f"with tls to 127.0.0.1 port {tlsb.port}"),
              ("fwd", "", f"with tls to 127.0.0.1 port {tlsb.port}"),
              ("cca", " tls", f"to 127.0.0.1 port {plain.port}")]
    conf.write_text(TLS_CONF + "".join(
        f'relay "{n}" {{\n\tlisten on 127.0.0.1 port {ports[n]}{tls}\n\tprotocol "{n}"\n'
        f'\tforward {fwd}\n}}\n' for n, tls, fwd in relays))
    d = Daemon("relayd", conf, ["-vv"], env={**os.environ, "RELAYD_SSL_DIR": str(ssl_dir)},
               cwd=run)
    try:
        for p in ports.values():
            wait_port(p, proc=d.proc)
        yield dict(d=d, ports=ports, lca=lca, cca=cca, run=run, ssl_dir=ssl_dir,
                   conf=conf)
    finally:
        d.stop()
        plain.close()
        tlsb.close()


def test_relative_ca_cert_and_key_inspect(tls_site):
    ctx = ssl.create_default_context(cafile=str(tls_site["run"] / "ca.crt"))
    c, out = cert_and_reply(tls_site["ports"]["inspect"], ctx, "backend.test")
    assert out.endswith(b"tls-backend")
    lca = x509.load_pem_x509_certificate(tls_site["lca"].cert_pem.bytes())
    assert c.issuer == lca.subject            # Issuer .../OU=ca/ in the suite


def test_relative_ca_file_verifies_backend(tls_site):
    with socket.create_connection(("127.0.0.1", tls_site["ports"]["fwd"]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    assert out.endswith(b"tls-backend")


def test_relative_client_ca(tls_site):
    ctx = noverify()
    tls_site["cca"].issue_cert("client.test").configure_cert(ctx)
    out, _ = get(tls_site["ports"]["cca"], ctx)
    assert out.endswith(b"plain-backend")
    try:
        out, _ = get(tls_site["ports"]["cca"], noverify())
    except (ssl.SSLError, OSError):
        out = b""
    assert b"plain-backend" not in out


def test_relative_name_is_not_taken_from_the_ssl_dir(tls_site, tmp_path):
    # The same file name, present only in the keypair directory: -n fails.
    (tls_site["ssl_dir"] / "only-here.pem").write_bytes((tls_site["run"] / "ca.crt").read_bytes())
    conf = tmp_path / "relayd.conf"
    conf.write_text(f'tcp protocol "p" {{\n\ttls ca file "only-here.pem"\n}}\n'
                    f'relay "r" {{\n\tlisten on 127.0.0.1 port {free_port()}\n'
                    f'\tprotocol "p"\n\tforward with tls to 127.0.0.1 port 9\n}}\n')
    env = {**os.environ, "RELAYD_SSL_DIR": str(tls_site["ssl_dir"]), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "relayd", "-n", "-f", str(conf)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert f"{conf}:4: cannot load certificates for relay r" in r.stderr
    # ... and found once it is in the working directory (an absolute name too).
    (tmp_path / "only-here.pem").write_bytes((tls_site["run"] / "ca.crt").read_bytes())
    r = subprocess.run([sys.executable, "-m", "relayd", "-n", "-f", str(conf)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    conf.write_text(conf.read_text().replace('"only-here.pem"',
                                             f'"{tls_site["ssl_dir"]}/only-here.pem"'))
    r = subprocess.run([sys.executable, "-m", "relayd", "-n", "-f", str(conf)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


# -- 8. the -vv dump --------------------------------------------------------------------
def test_vv_dump_relay_flags_tls(tls_site):
    out = tls_site["d"].output()
    inspect = out.split("relay_privinit: adding relay inspect\n", 1)[1]
    assert inspect.startswith(
        "protocol 1: name inspect\n"
        "\tflags: used, relay flags: tls, tls client, tls inspect\n"
        "\ttls flags: tlsv1.2, tlsv1.3, cipher-server-preference\n"
        "\ttls session tickets: disabled\n"
        "\ttype: tcp\n")
    fwd = out.split("relay_privinit: adding relay fwd\n", 1)[1]
    assert fwd.startswith("protocol 2: name fwd\n\tflags: used, relay flags: tls client\n")
    cca = out.split("relay_privinit: adding relay cca\n", 1)[1]
    assert cca.startswith("protocol 3: name cca\n\tflags: used, relay flags: tls\n")


def test_vv_dump_only_at_vv(tmp_path):
    conf = tmp_path / "relayd.conf"
    port = free_port()
    conf.write_text(f'relay "r" {{\n\tlisten on 127.0.0.1 port {port}\n'
                    f'\tforward to 127.0.0.1 port 9\n}}\n')
    d = Daemon("relayd", conf, ["-v"])
    try:
        wait_port(port, proc=d.proc)
        time.sleep(0.2)
        assert "relay flags" not in d.output()
    finally:
        d.stop()
    conf2 = tmp_path / "relayd2.conf"
    conf2.write_text(conf.read_text())
    d = Daemon("relayd", conf2, ["-vv"])
    try:
        wait_port(port, proc=d.proc)
        assert ("relay_privinit: adding relay r\nprotocol -1: name default\n"
                "\tflags: used, relay flags: \n\ttls session tickets: disabled\n"
                "\ttype: tcp\n") in d.wait_output("type: tcp")
    finally:
        d.stop()
