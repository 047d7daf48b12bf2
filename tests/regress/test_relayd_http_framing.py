"""relayd HTTP framing as OpenBSD's regress suite expects (issue 13), black-box:
raw bytes to a real `python -m relayd -d`, raw-socket backends recording the
exact bytes they get.

Bare LF line ends in (relayd writes CRLF out), chunk sizes identical on both
sides (also when the backend writes a chunk a byte at a time), pipelined
requests before a bad one answered, responses without a length with more
requests forwarded on the same backend connection, absolute-form targets as
received; and the smuggling cases these leniencies must not open."""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.conftest import free_port
from tests.regress.test_relayd_http import Client, Rec, Recorder, exchange, start_relayd, uniq
from tests.regress.test_relayd_http import Env as HttpEnv

CONF = """
prefork 1
log connection
table <main> {{ 127.0.0.1 }}

http protocol "basic" {{
	return error
}}
http protocol "filters" {{
	return error
	match request header remove "X-Remove-Me"
	block request path "/blocked*"
	block request path "http://www.example.com/abs-blocked*"
}}
http protocol "pathlog" {{
	match request path log "*"
}}
http protocol "plain" {{
}}

relay "basic" {{
	listen on 127.0.0.1 port {p_basic}
	protocol "basic"
	forward to <main> port {rec}
}}
relay "filters" {{
	listen on 127.0.0.1 port {p_filters}
	protocol "filters"
	forward to <main> port {rec}
}}
relay "pathlog" {{
	listen on 127.0.0.1 port {p_pathlog}
	protocol "pathlog"
	forward to <main> port {rec}
}}
relay "tlsfwd" {{
	listen on 127.0.0.1 port {p_tlsfwd}
	protocol "plain"
	forward with tls to 127.0.0.1 port {mute}
}}
relay "dead" {{
	listen on 127.0.0.1 port {p_dead}
	protocol "plain"
	forward to 127.0.0.1 port {dead}
}}
"""


class Backend(Recorder):
    """Recorder plus answers that test framing: bare-LF heads, a chunk written
    a byte at a time, and a response without a length that goes on answering
    the requests it gets on the same connection."""

    def respond(self, c: socket.socket, rec: Rec, rd) -> bool:
        path = rec.target
        if "/lfresp" in path:
            c.sendall(b"HTTP/1.1 200 OK\nContent-Length: 2\nX-Lf: yes\n\nok")
            return True
        if "/lfchunk" in path:
            c.sendall(b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n"
                      b"3\nabc\n2;e=1\nde\n0\nX-T: 1\n\n")
            return True
        if "/slowchunk" in path:
            c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"a\r\n", *[bytes([b]) for b in b"0123456789"], b"\r\n",
                          b"3;x=1\r\n", b"abc\r\n", b"0\r\n", b"X-Trailer: t\r\n", b"\r\n"):
                c.sendall(piece)
                time.sleep(0.02)
            return True
        if "/nolength" in path:
            c.sendall(b"HTTP/1.1 200 OK\r\nServer: rec\r\n\r\nfirst\n")
            while True:
                head = rd.until(b"\r\n\r\n")
                if head is None:
                    return False
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = [(k, v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
                with self.lock:
                    self.requests.append(Rec(rec.conn, head, b"", method, target, headers))
                c.sendall(f"seen {target}\n".encode())
                if "end" in target:
                    return False
        return super().respond(c, rec, rd)


class Env(HttpEnv):
    """test_relayd_http's environment with this module's relays and backend."""

    def start(self) -> None:
        self.rec = Backend(name="main")
        # `dead` forwards to a port nobody listens on, `tlsfwd` with TLS to
        # one that accepts and never answers
        self.mute = socket.create_server(("127.0.0.1", 0))
        self.relayd, self.ports = start_relayd(
            self.tmp, CONF, ("basic", "filters", "pathlog", "dead", "tlsfwd"),
            rec=self.rec.port, dead=free_port(), mute=self.mute.getsockname()[1])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("relayd_framing"))
    try:
        e.start()
        yield e
    finally:
        e.stop()


# -- 1. line ends ----------------------------------------------------------------------------
def test_bare_lf_request_forwarded_with_crlf(env):
    path = uniq("/lfreq")
    with Client(env.port("basic")) as c:
        c.send(f"GET {path} HTTP/1.1\nHost: h\nX-A: 1\n\n".encode())
        r = c.response()
    assert r.status == 200 and r.body == b"ok"
    assert env.rec.find(path).head == f"GET {path} HTTP/1.1\r\nHost: h\r\nX-A: 1".encode()


def test_bare_lf_chunked_request_forwarded_with_crlf(env):
    path = uniq("/lfbody") + "/echo"
    with Client(env.port("basic")) as c:
        c.send(f"POST {path} HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n"
               "3;a=b\nabc\n0\nX-T: 1\n\n".encode())
        r = c.response()
    assert r.status == 200 and r.body == b"abc"
    rec = env.rec.find(path)
    assert rec.head.endswith(b"\r\nTransfer-Encoding: chunked")
    assert rec.body == b"3;a=b\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"


def test_bare_lf_response_written_with_crlf(env):
    with Client(env.port("basic")) as c:
        c.send(f"GET {uniq()}/lfresp HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        r = c.response()
        c.send(f"GET {uniq()}/lfchunk HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        r2 = c.response()
    assert r.head == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Lf: yes" and r.body == b"ok"
    assert r2.head == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
    assert r2.raw_body == b"3\r\nabc\r\n2;e=1\r\nde\r\n0\r\nX-T: 1\r\n\r\n"


def test_bare_lf_inside_header_value_is_a_line_end(env):
    # Both sides see the same two fields: relayd writes CRLF between them.
    path = uniq("/lfvalue")
    with Client(env.port("basic")) as c:
        c.send(f"GET {path} HTTP/1.1\r\nHost: h\r\nX-A: one\nX-B: two\r\n\r\n".encode())
        assert c.response().status == 200
    assert env.rec.find(path).head.endswith(b"\r\nX-A: one\r\nX-B: two")


# -- 2. chunk sizes -----------------------------------------------------------------------------
def test_chunk_sizes_identical_when_backend_writes_a_byte_at_a_time(env):
    with Client(env.port("basic")) as c:
        c.send(f"GET {uniq()}/slowchunk HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        r = c.response()
        c.send(f"GET {uniq()} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert c.response().status == 200          # the session goes on
    assert r.raw_body == b"a\r\n0123456789\r\n3;x=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"


def test_chunk_sizes_identical_from_client(env):
    path = uniq("/chunkreq") + "/echo"
    body = [b"a\r\n", b"01234", b"56789\r\n", b"1;e=\"f g\"\r\nx\r\n", b"0\r\n\r\n"]
    with Client(env.port("basic")) as c:
        c.send(f"POST {path} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for piece in body:
            time.sleep(0.05)
            c.send(piece)
        r = c.response()
    assert r.body == b"0123456789x"
    assert env.rec.find(path).body == b"".join(body)


# -- 3. responses without a length ---------------------------------------------------------------
def test_no_length_response_closes_and_forwards_further_requests(env):
    a = uniq("/nolength")
    with Client(env.port("filters")) as c:
        c.send(f"GET {a} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        head = c.rd.until(b"\r\n\r\n")
        assert head == b"HTTP/1.1 200 OK\r\nServer: rec\r\nConnection: close"
        assert c.rd.until(b"\n") == b"first"
        c.send(f"GET {a}/more HTTP/1.1\r\nHost: h\r\nX-Remove-Me: 1\r\n\r\n"
               f"GET {a}/end HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        rest = c.read_all()
    assert rest == f"seen {a}/more\nseen {a}/end\n".encode()
    more = env.rec.find(f"{a}/more")
    assert more.header("x-remove-me") is None              # filtered as any request
    assert more.conn == env.rec.find(f"{a}/end").conn == env.rec.find(a).conn
    env.log_line(r"relay filters, .*, done, GET GET GET$")


def test_no_length_response_client_eof_reaches_backend(env):
    # args-http-chunked-put: the client is done and half-closes; the backend,
    # waiting for a next request, must learn it (else both wait forever).
    a = uniq("/nolength")
    with Client(env.port("filters")) as c:
        c.send(f"GET {a} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert c.rd.until(b"first\n") is not None
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_all() == b""                 # the backend closed: so do we
    env.log_line(r"relay filters, .*, done, GET$")


def test_no_length_response_then_blocked_request_never_forwarded(env):
    a = uniq("/nolength")
    with Client(env.port("filters")) as c:
        c.send(f"GET {a} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert c.rd.until(b"first\n") is not None
        c.send(f"GET /blocked-{a[1:]} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        c.read_all()
    time.sleep(0.1)
    assert not env.rec.has(f"/blocked-{a[1:]}")


def test_bodiless_post_then_blocked_request(env):
    path = uniq("/nobody")
    with Client(env.port("filters")) as c:
        c.send(f"POST {path} HTTP/1.1\r\nHost: h\r\n\r\n"
               f"GET /blocked{path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        r1 = c.response()
        r2 = c.response()
    assert r1.status == 200 and r2.status == 403
    rec = env.rec.find(path)
    assert rec.method == "POST" and rec.body == b""
    time.sleep(0.1)
    assert not env.rec.has(f"/blocked{path}")


# -- 4. pipelined input with a bad request later -----------------------------------------------------
def test_pipelined_good_requests_answered_before_bad_one(env):
    a, b, bad = uniq("/pg1"), uniq("/pg2"), uniq("/pgbad")
    with Client(env.port("basic")) as c:
        c.send(f"GET {a} HTTP/1.1\r\nHost: h\r\n\r\n"
               f"GET {b} HTTP/1.1\nHost: h\n\n"
               f"POST {bad} HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
               .encode())
        r1, r2, r3 = c.response(), c.response(), c.response()
        assert c.closed()
    assert (r1.status, r2.status, r3.status) == (200, 200, 400)
    assert r3.version == "HTTP/1.0"
    assert env.rec.has(a) and env.rec.has(b) and not env.rec.has(bad)
    env.log_line(r"relay basic, .*, malformed header \(400 Bad Request\), GET GET$")


def test_bad_request_later_in_the_read_is_the_reason_when_the_backend_is_down(env):
    # args-http-callback, args-http-headline-callback: OpenBSD has parsed
    # the whole read (a good PUT, then garbage) before its connect fails
    for bad in (b"XXX\n", b"PUT /3 HTTP/1.1\nXXX\n"):
        with Client(env.port("dead")) as c:
            c.send(b"PUT /4 HTTP/1.1\nHost: foo.bar\nContent-Length: 4\n\n123\n" + bad +
                   b"Host: foo.bar\nContent-Length: 3\n\n12\n")
            c.read_all()
    rx = re.compile(r"relay dead, .*, malformed, PUT$", re.M)
    deadline = time.monotonic() + 10
    while len(rx.findall(env.relayd.output())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rx.findall(env.relayd.output())) == 2, env.relayd.output()[-2000:]


def test_request_with_a_bad_chunk_gets_no_backend_handshake(env):
    # args-https-chunked-callback: the bad chunk comes in the same read as
    # the head; the backend connection opens and closes without a byte
    with Client(env.port("tlsfwd")) as c:
        c.send(b"PUT /4/3 HTTP/1.1\nHost: foo.bar\nTransfer-Encoding: chunked\n\n"
               b"4\n123\n\nXXX\n3\n12\n\n0\n\n")
        env.mute.settimeout(10)
        conn, _ = env.mute.accept()
        with conn:
            conn.settimeout(10)
            assert conn.recv(100) == b""           # closed: no ClientHello
        c.read_all()
    env.log_line(r"relay tlsfwd, .*, invalid chunk size, PUT$")


# -- 6. absolute-form targets ---------------------------------------------------------------------
def test_absolute_form_without_host(env):
    # args-http-host2: a proxy request names its host in the target alone
    path = uniq("/abshost")
    with Client(env.port("pathlog")) as c:
        c.send(f"GET http://www.foo.com{path} HTTP/1.1\n\n".encode())
        assert c.response().status == 200
    rec = env.rec.find(path)
    assert rec.head.split(b"\r\n")[0] == f"GET http://www.foo.com{path} HTTP/1.1".encode()
    assert rec.header("host") is None
    env.log_line(rf"relay pathlog, .*\[http://www\.foo\.com{path}\] GET")
    # an origin-form HTTP/1.1 request still needs its Host
    assert exchange(env.port("basic"), b"GET /x HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 400")

def test_absolute_form_kept_for_rules_and_log(env):
    path = uniq("/absrule")
    url = f"http://www.example.com{path}?q=1"
    with Client(env.port("pathlog")) as c:
        c.send(f"GET {url} HTTP/1.1\r\nHost: www.example.com\r\n\r\n".encode())
        assert c.response().status == 200
    assert env.rec.find(path).head.startswith(f"GET {url} HTTP/1.1\r\n".encode())
    env.log_line(rf"relay pathlog, .*\[http://www\.example\.com{path}: q=1\] GET")
    r = exchange(env.port("filters"), b"GET http://www.example.com/abs-blocked/x HTTP/1.1\r\n"
                 b"Host: www.example.com\r\n\r\n")
    assert r.startswith(b"HTTP/1.0 403 Forbidden")
    ok = uniq("/abs-blocked")          # the origin form does not match that rule
    with Client(env.port("filters")) as c:
        c.send(f"GET {ok} HTTP/1.1\r\nHost: www.example.com\r\n\r\n".encode())
        assert c.response().status == 200


# -- smuggling the leniencies must not open ----------------------------------------------------------
SMUGGLE = [
    ("lf-value-cl-te", "POST {p} HTTP/1.1\r\nHost: h\r\nX: a\nContent-Length: 3\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("lf-value-dup-cl", "POST {p} HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX: a\n"
                        "Content-Length: 5\r\n\r\nabcde"),
    ("cr-line-end", "GET {p} HTTP/1.1\rHost: h\r\r\n"),
    ("cr-header-end", "GET {p} HTTP/1.1\r\nHost: h\r\nX: y\r\r\n\r\n"),
    ("cr-blank-line", "GET {p} HTTP/1.1\r\nHost: h\r\n\r\r\n"),
    ("lf-chunk-wrong-size", "POST {p} HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n"
                            "3\nabcd\n0\n\n"),
    ("lf-chunk-short-size", "POST {p} HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n"
                            "5\nabc\n0\n\nGET /SMUGGLED HTTP/1.1\nHost: h\n\n"),
    ("lf-chunk-cr-size", "POST {p} HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n"
                         "3\rabc\n0\n\n"),
    ("lf-chunk-space-size", "POST {p} HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n"
                            "3 \nabc\n0\n\n"),
    ("lf-trailer-fold", "POST {p} HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n"
                        "0\nX: a\n b\n\n"),
    ("lf-te-cl", "POST {p} HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\nContent-Length: 3\n\n"
                 "0\n\n"),
]


@pytest.mark.parametrize("name,raw", SMUGGLE, ids=[n for n, _ in SMUGGLE])
def test_smuggling_still_rejected(env, name, raw):
    marker = f"/smuggle-{name}-{time.monotonic_ns()}"
    out = exchange(env.port("basic"), raw.format(p=marker).encode("latin-1"))
    assert out.startswith(b"HTTP/1.0 400 Bad Request\r\n"), out[:200]
    assert out.count(b"HTTP/1.") == 1
    time.sleep(0.05)
    assert not env.rec.has(marker)
    assert not env.rec.has("SMUGGLED")
