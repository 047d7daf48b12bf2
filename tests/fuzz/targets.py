"""tests.fuzz.targets -- every parser that sees untrusted input, as a fuzz target.

A target takes one bytes input and may raise only its parser's documented
error (ConfigError, HttpError, ChunkError, FcgiError, PatternError); the
properties checked beside "no other exception" are asserts:

- http1_*: the same input fed whole and cut at points drawn from it gives
  the same messages (heads, payload, framing, end markers); relayd's
  passthrough events, written back out, parse to the same events again.
- chunked: whole == split; every payload byte and framing byte comes out.
- fcgi: whole == split for records and CGI heads; PARAMS decode or FcgiError.
- patterns: check() accepting a pattern means find()/match() raise nothing
  but PatternError, and agree with each other.
- glob: shared.glob/relayd.rules.Glob agree with a reference fnmatch(3).
- *_conf: load() twice gives equal configs (acme: format/load round trip).
- dns: check_query() never raises; an accepted query keeps its shape under
  set_id().
- relayd_rules: rule evaluation and actions on arbitrary heads.
- h2: H2ServerConn over a fake transport ends, without an exception, on any
  bytes after the preface.
"""

from __future__ import annotations

import re
import socket
import struct

from tests.fuzz.engine import Target

# -- config parsers ---------------------------------------------------------------

_real_getaddrinfo = socket.getaddrinfo


def _fake_getaddrinfo(host, *a, **kw):
    # No DNS while fuzzing: only numeric hosts and localhost resolve.
    if host in ("localhost", "localhost.") or host is None:
        return _real_getaddrinfo("127.0.0.1", *a, **kw)
    try:
        import ipaddress
        ipaddress.ip_address(host)
    except ValueError:
        raise socket.gaierror(socket.EAI_NONAME, "fuzz: no DNS") from None
    return _real_getaddrinfo(host, *a, **kw)


def offline() -> None:
    """Config loads resolve names: keep the fuzzer off the network."""
    socket.getaddrinfo = _fake_getaddrinfo


HTTPD_CONF = br'''# httpd seed
ext = "127.0.0.1"
chroot "/tmp"
logdir "/tmp"
prefork 2
default type text/plain
types {
	text/html html htm
	image/png png
}
server "default" {
	listen on $ext port 8080
	listen on * tls port 8443
	alias "www.example.com"
	alias match "%w+%.example%.org"
	root "/htdocs"
	directory auto index
	directory index "index.html"
	log style combined
	log access "access.log"
	connection { max requests 100, timeout 30, request timeout 10 }
	tcp { nodelay, backlog 10, socket buffer 65536 }
	hsts max-age 31536000
	hsts subdomains
	gzip-static
	default type text/html
	errdocs "/err"
	location "/cgi-bin/*" {
		fastcgi socket "/run/slowcgi.sock"
		fastcgi param SCRIPT_FILENAME "/cgi-bin/x"
		root "/"
	}
	location match "/old/(%d+)" {
		block return 301 "https://$HTTP_HOST/new/%1?$QUERY_STRING"
	}
	location "/private/*" {
		authenticate "Realm" with "/htpasswd"
		request strip 1
		request rewrite "/x/$REQUEST_URI"
	}
	location not found "/missing/*" { block drop }
	location "/deny" { block }
	location "*.php" { fastcgi socket tcp 127.0.0.1 9000 }
}
server match "api%..*" {
	listen on 127.0.0.1 port 8081
	no log
	root "/api"
	connection max request body 1048576
	block return 403
}
'''

RELAYD_CONF = br'''# relayd seed
ext = "127.0.0.1"
rport = "8080"
interval 10
timeout 200
prefork 2
log state changes
log connection errors
table <web> { 127.0.0.1 retry 2, 127.0.0.2 priority 1 }
table <fallback> disable { 127.0.0.1 }
table <spare> { localhost ip ttl 5 }
http protocol "web" {
	match request header append "X-Forwarded-For" value "$REMOTE_ADDR"
	match request header set "Connection" value "close"
	match response header remove "Server"
	match request header "Host" value "*.example.com" tag "ex"
	block request quick url "example.com/private/"
	block request path "/admin*" label "no admin"
	pass request quick tagged "ex" forward to <fallback>
	match request query "debug" value "1" tag "dbg"
	match request cookie "session" value "?*"
	match request method POST path "/upload/*"
	match request path strip 2
	block response quick header "Content-Type" value "application/x-*"
	match request header log "User-Agent"
	match request from 10.0.0.0/8 to 127.0.0.1 tag "local"
	pass request header pattern "X%-Pat" value "^%a+%d*$"
	return error style "body { color: red }"
	tcp { nodelay, sack, socket buffer 65536 }
	http { headerlen 8192, websockets }
}
tcp protocol "raw" { tcp { nodelay } }
dns protocol "dnsp" { }
relay "www" {
	listen on $ext port $rport
	protocol "web"
	session timeout 30
	forward to <web> port 8081 mode loadbalance check http "/" code 200
	forward to <fallback> port 8082 check tcp
}
relay "dns" {
	listen on 127.0.0.1 port 5353
	protocol "dnsp"
	forward to <web> port 53 check icmp
}
redirect "rdr" {
	listen on 127.0.0.1 port 80 interface lo
	forward to <spare> check send "HEAD / HTTP/1.0\r\n\r\n" expect "HTTP/1.?*"
	sticky-address
}
relay "ssh" {
	listen on $ext port 2222
	forward to 127.0.0.1 port 22
}
'''

ACME_CONF = br'''# acme seed
apiurl = "https://acme-v02.api.letsencrypt.org/directory"
authority letsencrypt {
	api url $apiurl
	account key "/etc/acme/le.pem" ecdsa
	contact "mailto:me@example.com"
}
authority other {
	api url "https://ca.example/dir"
	account key "/etc/acme/o.pem"
}
domain example.com {
	alternative names { www.example.com, "m.example.com" }
	domain key "/etc/ssl/private/example.com.key" ecdsa
	domain certificate "/etc/ssl/example.com.crt"
	domain full chain certificate "/etc/ssl/example.com.fullchain.pem"
	domain chain certificate "/etc/ssl/chain.pem"
	sign with letsencrypt
	challengedir "/var/www/acme"
}
'''

CONF_TOKENS = [b"{", b"}", b'"', b"$", b"\\\n", b"\n", b"#", b",", b"=", b" ", b"\t",
               b"include ", b"server ", b"location ", b"listen on ", b"port ", b"tls ",
               b"match ", b"block ", b"pass ", b"table <", b">", b"relay ", b"forward to ",
               b"protocol ", b"header ", b"value ", b"request ", b"response ", b"domain ",
               b"authority ", b"127.0.0.1", b"::1", b"*", b"%", b"65536", b"0", b"-1",
               b"4294967296", b"<x>", b'"x"', b"\x00", b"\xff", b"$ext", b"$undefined",
               b"macro = \"v\"\n"]


def _text(data: bytes) -> str:
    # Files are read as UTF-8 with surrogateescape (shared.lexer.push_file).
    return data.decode("utf-8", "surrogateescape")


def _conf_target(name: str, loader, seed: bytes, weight: float,
                 roundtrip=None) -> Target:
    from shared.lexer import ConfigError

    def fn(data: bytes) -> None:
        text = _text(data)
        try:
            a = loader(text)
        except ConfigError:
            b = None
            try:
                loader(text)
            except ConfigError:
                return
            raise AssertionError("second load of a failing config succeeded") from None
        b = loader(text)
        assert a == b, "the same text loads to different configs"
        if roundtrip is not None:
            roundtrip(a)

    return Target(name, fn, [seed, b"", b"x", b"{\n}\n"], (ConfigError,), CONF_TOKENS,
                  weight=weight)


def httpd_conf() -> Target:
    from httpd import parse
    offline()
    return _conf_target("httpd_conf", lambda t: parse.load("fuzz.conf", text=t),
                        HTTPD_CONF, 0.3)


def relayd_conf() -> Target:
    from relayd import parse
    offline()

    def load(text: str):
        # A hash key left out is random (os.urandom): fixed here so that
        # two loads compare equal.
        real = parse.os.urandom
        parse.os.urandom = lambda n: bytes(n)
        try:
            return parse.load("fuzz.conf", text=text)
        finally:
            parse.os.urandom = real

    return _conf_target("relayd_conf", load, RELAYD_CONF, 0.3)


def acme_conf() -> Target:
    from shared import acme_conf as ac
    from shared.lexer import ConfigError

    def roundtrip(conf) -> None:
        text = ac.format_config(conf)
        try:
            again = ac.load("formatted.conf", text=text)
        except ConfigError as e:
            raise AssertionError(f"format_config() output does not load: {e}\n{text}") from None
        assert ac.format_config(again) == text, "format/load/format is not stable"

    return _conf_target("acme_conf", lambda t: ac.load("fuzz.conf", text=t), ACME_CONF,
                        0.5, roundtrip)


def lexer() -> Target:
    from shared.lexer import EOF, ConfigError, Errors, Lexer, Macros

    def fn(data: bytes) -> None:
        errs = Errors()
        lex = Lexer(errs, Macros({"cmd": "v"}))
        lex.push_text(_text(data), "fuzz.conf")
        for _ in range(16 * len(data) + 16):
            if lex.next().kind == EOF:
                break
        else:
            raise AssertionError("lexer gave 16 tokens an input byte")

    return Target("lexer", fn, [HTTPD_CONF, RELAYD_CONF, ACME_CONF, b'a = "b"\nc $a'],
                  (ConfigError,), CONF_TOKENS, weight=1.0)


# -- HTTP/1 -----------------------------------------------------------------------

HTTP_SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x?y=1 HTTP/1.0\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
    b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET http://h/p HTTP/1.1\r\nUser-Agent: a\nb\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\nX: y\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
]
RESPONSE_SEEDS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nuntil the close",
    b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\nContent-Length: 1\n\nx",
]
HTTP_TOKENS = [b"\r\n", b"\n", b"\r", b": ", b":", b" ", b"\t", b"Host: a\r\n",
               b"Content-Length: ", b"Transfer-Encoding: chunked\r\n", b"chunked",
               b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"HTTP/1.1",
               b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"\r\n\r\n", b"\n\n", b"0\r\n\r\n",
               b"ffffffffffffffff", b"GET ", b"POST ", b"HEAD ", b"OPTIONS * ", b";",
               b"Expect: 100-continue\r\n", b"Upgrade: h2c\r\n", b"\x00", b"\x7f", b"\x80"]


class _NoTransport:
    peer = ("fuzz", 1)
    local = ("fuzz", 2)
    tls = False


def _cuts(data: bytes) -> list[int]:
    # Cut points drawn from the input itself (deterministic per input).
    n = len(data)
    if n < 2:
        return []
    h = int.from_bytes(data[:4].ljust(4, b"\x01"), "big") ^ n
    out = set()
    for i in range(1 + h % 6):
        h = (h * 1103515245 + 12345) & 0x7FFFFFFF
        out.add(1 + h % (n - 1))
    return sorted(out)


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    out, prev = [], 0
    for c in cuts:
        out.append(data[prev:c])
        prev = c
    out.append(data[prev:])
    return [p for p in out if p]


def http1_events(mode: str, pieces: list[bytes]) -> list[tuple]:
    """Normalised events of `pieces` fed one read each, then EOF."""
    from engine import http1
    from engine.chunked import Framing
    from engine.http1 import ClientConn, HttpError, Request, Response, ServerConn

    t = _NoTransport()
    if mode == "httpd":
        c = ServerConn(t, lenient=True, httpd_rules=True)
    elif mode == "relayd":
        c = ServerConn(t, lenient=True, passthrough=True)
    elif mode == "strict":
        c = ServerConn(t)
    else:
        c = ClientConn(t, passthrough=mode == "client_pass")
        c.expect("GET")
    out: list[tuple] = []
    err = None
    try:
        for p in pieces + [b""]:
            if not c._take(p):
                break
            if c.upgraded:
                break
    except HttpError as e:
        err = e
    for ev in c.events:
        tp = type(ev)
        if ev is http1._END:
            out.append(("end",))
        elif tp is Request:
            out.append(("req", ev.method, ev.target, ev.version, tuple(ev.headers),
                        ev.content_length, ev.chunked, ev.keep_alive))
        elif tp is Response:
            out.append(("resp", ev.status, ev.reason, ev.version, tuple(ev.headers),
                        ev.content_length, ev.chunked, ev.keep_alive))
        elif tp is bytes or tp is Framing:
            kind = "frame" if tp is Framing else "data"
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + bytes(ev))
            else:
                out.append((kind, bytes(ev)))
        elif tp is http1._Failed:
            out.append(("error",))
        else:
            raise AssertionError(f"unknown event {ev!r}")
    if err is not None:
        if not isinstance(err.status, int) or not 400 <= err.status < 600:
            raise AssertionError(f"HttpError with status {err.status!r}")
        out.append(("error",))
    if c.upgraded:
        out.append(("upgraded", c.rest))
    return out


def _messages(evs: list[tuple]) -> list[tuple]:
    # Complete messages only: what a reader is served whatever the reads.
    done, cur = [], []
    for e in evs:
        if e[0] in ("error", "upgraded"):
            break
        cur.append(e)
        if e[0] == "end":
            done.extend(cur)
            cur = []
    return done


_OBS_FOLD = re.compile(rb"\n[ \t]")


def _no_keep_alive(evs: list[tuple]) -> list[tuple]:
    return [e[:7] if e[0] == "req" else e for e in evs]


def _reframe(evs: list[tuple]) -> bytes:
    # relayd writes a head and the body as read (framing included) onwards.
    out = []
    for e in evs:
        if e[0] == "req":
            _, method, target, version, headers = e[:5]
            out.append(f"{method} {target} HTTP/{version}\r\n".encode("latin-1"))
            out += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
            out.append(b"\r\n")
        elif e[0] in ("data", "frame"):
            out.append(e[1])
        elif e[0] in ("error", "upgraded"):
            break
    return b"".join(out)


def _http1_target(name: str, mode: str, seeds: list[bytes], weight: float) -> Target:
    def fn(data: bytes) -> None:
        whole = http1_events(mode, [data])
        split = http1_events(mode, _pieces(data, _cuts(data)))
        if not any(e[0] in ("error", "upgraded") for e in whole + split):
            assert whole == split, f"whole {whole!r} != split {split!r}"
        else:
            # An error ends a read; the messages complete before it match.
            a, b = _messages(whole), _messages(split)
            n = min(len(a), len(b))
            assert a[:n] == b[:n], f"whole {a!r} != split {b!r}"
        if mode == "relayd":
            msgs = _messages(whole)
            if msgs:
                again = _messages(http1_events(mode, [_reframe(msgs)]))
                if _OBS_FOLD.search(data):
                    # llhttp reads Connection tokens before unfolding: a
                    # folded "close" is not seen (the value keeps it).
                    msgs, again = _no_keep_alive(msgs), _no_keep_alive(again)
                assert again == msgs, f"re-framed {again!r} != {msgs!r}"

    return Target(name, fn, seeds, (), HTTP_TOKENS, weight=weight)


def http1_httpd() -> Target:
    return _http1_target("http1_httpd", "httpd", HTTP_SEEDS, 1.0)


def http1_relayd() -> Target:
    return _http1_target("http1_relayd", "relayd", HTTP_SEEDS, 1.0)


def http1_client() -> Target:
    return _http1_target("http1_client", "client_pass", RESPONSE_SEEDS, 1.0)


# -- chunked ----------------------------------------------------------------------

CHUNKED_SEEDS = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"3;a=b;c=\"d e\"\r\nabc\r\n10\nabcdefghijklmnop\n0\r\nX-T: 1\r\nY:\r\n\r\nNEXT",
    b"0\r\n\r\n",
    b"A\r\n0123456789\r\n00000001\r\nx\r\n0\n\n",
]


def chunked_run(pieces: list[bytes]) -> tuple:
    from engine.chunked import ChunkedReader, ChunkError, Framing
    r = ChunkedReader()
    payload, framing, rest = [], [], b""
    err = False
    try:
        for p in pieces:
            if r.done:
                rest += p
                continue
            evs, left = r.feed(p)
            for ev in evs:
                (framing if type(ev) is Framing else payload).append(bytes(ev))
            if r.done:
                rest += left
            else:
                assert not left, "bytes left over before the body ended"
    except ChunkError:
        err = True
    return b"".join(payload), b"".join(framing), rest, r.done, err


def chunked() -> Target:
    def fn(data: bytes) -> None:
        whole = chunked_run([data])
        split = chunked_run(_pieces(data, _cuts(data)))
        bytewise = chunked_run([data[i:i + 1] for i in range(len(data))])
        if whole[4] or split[4] or bytewise[4]:
            assert whole[4] == split[4] == bytewise[4], (whole, split, bytewise)
        else:
            assert whole == split == bytewise, (whole, split, bytewise)
        payload, framing, rest, done, err = whole
        if done and not err:
            # Nothing is lost: payload + framing (+ rest) are every byte read,
            # bare LFs made CRLF.
            assert len(payload) + len(framing) + len(rest) >= len(data)

    return Target("chunked", fn, CHUNKED_SEEDS, (), [b"\r\n", b"\n", b";", b"=", b'"',
                  b"0\r\n\r\n", b"ffffffffffffffff", b"7fffffffffffffff", b"X: y\r\n"],
                  weight=2.0)


# -- FastCGI ----------------------------------------------------------------------

def _fcgi_seeds() -> list[bytes]:
    from httpd import fcgi
    params = fcgi.encode_params([("SCRIPT_NAME", "/x"), ("Q", "a" * 200), ("", "")])
    out = (fcgi.encode(fcgi.STDOUT, b"Status: 200 OK\r\nContent-Type: text/html\r\n\r\n<p>")
           + fcgi.encode(fcgi.STDERR, b"warning")
           + fcgi.encode(fcgi.STDOUT, b"") + struct.pack("!BBHHBx", 1, fcgi.END_REQUEST, 1, 8, 0)
           + struct.pack("!IB3x", 0, 0))
    return [out, params, fcgi.begin_request() + fcgi.stdin(b"body") + fcgi.stdin(b""),
            fcgi.encode(fcgi.STDOUT, b"Location: /x\n\nrest")]


def fcgi() -> Target:
    from httpd import fcgi
    from httpd.fcgi import FcgiError

    def run(pieces: list[bytes]) -> tuple:
        r = fcgi.RecordReader()
        recs, err = [], False
        head, stdout = None, b""
        hp = fcgi.CgiHeaderParser()
        try:
            for p in pieces:
                recs += r.feed(p)
            r.eof()
        except FcgiError:
            err = True
        try:
            for rec in recs:
                if rec.type == fcgi.PARAMS:
                    fcgi.decode_params(rec.content)
                elif rec.type == fcgi.END_REQUEST:
                    fcgi.decode_end_request(rec.content)
                elif rec.type == fcgi.STDOUT and rec.content:
                    if head is None:
                        head, body = hp.feed(rec.content)
                        stdout += body
                    else:
                        stdout += rec.content
        except FcgiError:
            err = True
        return recs, err, head, stdout

    def fn(data: bytes) -> None:
        whole = run([data])
        split = run(_pieces(data, _cuts(data)))
        # An error fails the stream (records completed in the same read
        # with it are not served): compare only error-free streams.
        assert whole[1] == split[1], (whole, split)
        if not whole[1]:
            assert whole == split, (whole, split)
        # The CGI head parser alone, on the raw bytes, whole and split.
        heads = []
        for pieces in ([data], _pieces(data, _cuts(data))):
            hp = fcgi.CgiHeaderParser()
            got = None
            try:
                for p in pieces:
                    if got is None:
                        h, body = hp.feed(p)
                        if h is not None:
                            got = (h, body)
                    else:
                        got = (got[0], got[1] + p)
            except FcgiError:
                got = "error"
            heads.append(got)
        assert heads[0] == heads[1], heads

    return Target("fcgi", fn, _fcgi_seeds() + [b"Status: 404\r\nX: y\r\n\r\nbody"], (),
                  [b"\x01\x06\x00\x01", b"\x01\x03\x00\x01\x00\x08\x00\x00", b"\r\n",
                   b"\n\n", b"Status: ", b": ", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"],
                  weight=2.0)


# -- Lua patterns -------------------------------------------------------------------

PATTERN_SEEDS = [b"^/old/(%d+)$\x00/old/123", b"%w+%.example%.org\x00www.example.org",
                 b"(a*(.)%w(%s*))\x00aaab  c", b"%b()\x00f(a(b)c)", b"%f[%w]%w+\x00  word",
                 b"[^%a%d_-]\x00abc!", b"(h)(.)%2%1\x00hxxh", b"()a()\x00ba",
                 b"[%]]\x00]", b".-b\x00aaab", b"x*$\x00xxx"]


def patterns() -> Target:
    from shared import patterns as P

    def fn(data: bytes) -> None:
        pat_b, _, subj_b = data.partition(b"\x00")
        pat = pat_b.decode("latin-1")
        subj = subj_b.decode("latin-1")
        try:
            P.check(pat)
        except P.PatternError:
            return
        try:
            found = P.find(subj, pat)
            m = P.match(subj, pat)
        except P.PatternError:
            return
        assert (found is None) == (m is None), (found, m)
        if found is not None:
            s, e = found
            assert 0 <= s <= e <= len(subj) and m[0] == subj[s:e], (found, m)

    return Target("patterns", fn, PATTERN_SEEDS, (),
                  [bytes([c]) for c in b"%^$()[].*+-?"] + [b"%b", b"%f[", b"%1", b"%a", b"%z",
                                                          b"\x00"], weight=2.0,
                  # A search may take MAXREPETITION (2**20) steps, as OpenBSD:
                  # up to about a second here on a loaded machine.
                  per_input=6.0)


# -- relayd globs -------------------------------------------------------------------

def ref_fnmatch(pat: str, s: str) -> bool:
    """fnmatch(3) with flags 0, written from the manual page (the oracle)."""
    def bracket(p: int, c: str) -> tuple[bool, int] | None:
        # p is just after '['; (matched, index after ']') or None: no ']'.
        neg = p < len(pat) and pat[p] in "!^"
        if neg:
            p += 1
        ok = False
        first = True
        while True:
            if p >= len(pat):
                return None
            ch = pat[p]
            if ch == "]" and not first:
                return ok != neg, p + 1
            first = False
            if ch == "\\" and p + 1 < len(pat):
                p += 1
                ch = pat[p]
            p += 1
            if p + 1 < len(pat) and pat[p] == "-" and pat[p + 1] != "]":
                hi = pat[p + 1]
                p += 2
                if hi == "\\" and p < len(pat):
                    hi = pat[p]
                    p += 1
                if ch <= c <= hi:
                    ok = True
            elif ch == c:
                ok = True

    memo: dict[tuple[int, int], bool] = {}

    def m(p: int, i: int) -> bool:
        key = (p, i)
        if key in memo:
            return memo[key]
        if p == len(pat):
            r = i == len(s)
        elif pat[p] == "*":
            r = m(p + 1, i) or (i < len(s) and m(p, i + 1))
        elif i == len(s):
            r = False
        elif pat[p] == "?":
            r = m(p + 1, i + 1)
        elif pat[p] == "[":
            b = bracket(p + 1, s[i])
            if b is None:
                r = s[i] == "[" and m(p + 1, i + 1)
            else:
                r = b[0] and m(b[1], i + 1)
        elif pat[p] == "\\" and p + 1 < len(pat):
            r = s[i] == pat[p + 1] and m(p + 2, i + 1)
        else:
            r = s[i] == pat[p] and m(p + 1, i + 1)
        memo[key] = r
        return r

    return m(0, 0)


def glob() -> Target:
    from relayd.rules import Glob

    def fn(data: bytes) -> None:
        pat_b, _, subj_b = data.partition(b"\x00")
        pat = pat_b.decode("latin-1")[:64]
        subj = subj_b.decode("latin-1")[:128]
        got = Glob(pat)(subj)
        want = ref_fnmatch(pat, subj)
        assert got == want, f"Glob({pat!r})({subj!r}) = {got}, fnmatch(3) says {want}"

    return Target("glob", fn, [b"*.example.com\x00www.example.com", b"/admin*\x00/admin/x",
                               b"[!a-c]?\\*\x00dx*", b"[]a]\x00]", b"[^-]x\x00-x",
                               b"a[\x00a[", b"\\\x00\\", b"[a-\\]]\x00]", b"*[*\x00x[y"], (),
                  [bytes([c]) for c in b"*?[]!^-\\"] + [b"\x00"], weight=2.0)


# -- relayd filter rules on arbitrary heads -----------------------------------------

def relayd_rules() -> Target:
    from relayd import parse, rules
    offline()
    conf = parse.load("rules.conf", text=RELAYD_CONF.decode())
    proto = next(p for p in conf.protocols if p.name == "web")
    compiled = rules.compile_rules(proto.rules)
    env = rules.Env("10.1.2.3", 1234, "127.0.0.1", 8080, 30)
    ctx = rules.Ctx("10.1.2.3", "127.0.0.1")

    def fn(data: bytes) -> None:
        text = data.decode("latin-1")
        first, _, rest = text.partition("\n")
        method, _, target = first.partition(" ")
        headers = []
        for line in rest.split("\n"):
            k, _, v = line.partition(":")
            headers.append((k, v.strip()))
        for msg in (rules.Message.request(method, target, headers),
                    rules.Message.response(len(text) % 600, headers)):
            v = rules.evaluate(compiled, msg.direction, msg, ctx)
            rules.apply_actions(v, msg, env)
            msg.items()
            if msg.method is not None:
                msg.target

    return Target("relayd_rules", fn,
                  [b"GET /admin/x?debug=1\nHost: www.example.com\nCookie: session=abc; a=b\n"
                   b"User-Agent: x\nX-Pat: abc12",
                   b"POST /upload/a/b/c\nContent-Type: application/x-foo\nHost: EXAMPLE.com.",
                   b"GET http://example.com/private/x\nhost: example.com:80"], (),
                  [b"\n", b":", b"Host: ", b"Cookie: ", b"; ", b"=", b"?", b"/", b"..",
                   b"example.com", b"$HOST", b"%"], weight=1.0)


# -- DNS relay ------------------------------------------------------------------------

def _dns_query(qid: int, name: str = "example.com", qtype: int = 1) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1) + q + struct.pack("!HH", qtype, 1) \
        + b"\0" + struct.pack("!HHIH", 41, 4096, 0, 0)


def dns() -> Target:
    from relayd import relay_udp as U

    def fn(data: bytes) -> None:
        why = U.check_query(data)
        assert why is None or isinstance(why, str)
        if why is None:
            hdr = U.dns_header(data)
            assert hdr is not None and not hdr.response
            new = U.set_id(data, 0xBEEF)
            assert len(new) == len(data) and U.check_query(new) is None
            assert U.dns_header(new).id == 0xBEEF
            # The answer path: the client's ID back in place.
            assert U.set_id(new, hdr.id) == data

    return Target("dns", fn, [_dns_query(1), _dns_query(0xFFFF, "a.b.c.d.e", 28),
                              _dns_query(7)[:-11] + b"\xc0\x0c" + _dns_query(7)[-10:]], (),
                  [b"\xc0\x0c", b"\x00", b"\x3f", b"\x40", b"\xff\xff", b"\x00\x01"],
                  weight=3.0)


# -- HTTP/2 (engine.http2 over a fake transport) ------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _h2_seeds() -> list[bytes]:
    import h2.config
    import h2.connection
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"),
                       (":authority", "t"), ("content-length", "3")])
    c.send_data(1, b"abc", end_stream=True)
    c.send_headers(3, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                       (":authority", "t")], end_stream=True)
    c.ping(b"12345678")
    c.reset_stream(3)
    c.increment_flow_control_window(1000)
    a = c.data_to_send()
    c.close_connection()
    return [a, a + c.data_to_send(), PREFACE]


def h2() -> Target:
    import trio
    import trio.testing

    from engine.http2 import H2Limits, H2ServerConn

    class Fake:
        peer = ("fuzz", 1)
        local = ("fuzz", 2)
        tls = False

        def __init__(self, pieces: list[bytes]) -> None:
            self.pieces = pieces

        async def receive(self, n: int = 65536) -> bytes:
            await trio.lowlevel.checkpoint()
            return self.pieces.pop(0) if self.pieces else b""

        async def send_all(self, data) -> None:
            await trio.lowlevel.checkpoint()

        async def send_eof(self) -> None:
            pass

        async def aclose(self) -> None:
            pass

    async def handler(s) -> None:
        body = await s.read_body(1 << 16)
        await s.send_head(200, [("content-type", "text/plain")])
        await s.send_data(body or b"x", True)

    limits = H2Limits()

    def fn(data: bytes) -> None:
        pieces = _pieces(data, _cuts(data))

        async def main() -> None:
            conn = H2ServerConn(Fake(pieces), limits, handler)
            with trio.fail_after(60):          # virtual time: a stuck connection
                await conn.run()

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    seeds = _h2_seeds()
    return Target("h2", fn, seeds, (), [PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
                                         b"\x00\x00\x08\x06\x00\x00\x00\x00\x00",
                                         b"\x00\x00\x04\x08\x00\x00\x00\x00\x01",
                                         b"\xff\xff\xff", b"\x00\x00\x00\x01", b"\x80"],
                  weight=0.2, per_input=5.0)


ALL = [lexer, httpd_conf, relayd_conf, acme_conf, http1_httpd, http1_relayd, http1_client,
       chunked, fcgi, patterns, glob, relayd_rules, dns, h2]


def build(names: list[str] | None = None) -> list[Target]:
    """The targets named (all when None), built (imports happen here)."""
    out = []
    for make in ALL:
        if names and make.__name__ not in names:
            continue
        out.append(make())
    return out
