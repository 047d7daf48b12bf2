"""relayd over HTTP/2 (`http { http2 }`, issue 14), black-box.

One relayd (prefork 1) in front of a recording raw-socket backend
(test_relayd_http.Recorder: it keeps the exact bytes of every request).
Real clients (curl, nghttp, h2load, httpx) and the raw-frame H2Client of
h2_helpers check the translation h2 -> h1 (one Host, no pseudo-headers,
no connection-specific fields, Content-Length or chunked framing), the
filter rules, the session log line of each stream, the limits and attack
answers (frames, log lines, another connection served meanwhile), that
malformed requests never reach the backend, and GOAWAY on reload and stop.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest
import trustme

from tests.conftest import REPO, Daemon, free_port, wait_port
from tests.regress.h2_helpers import (CANCEL, ENHANCE_YOUR_CALM, HPACK_BOMB, MALFORMED_KINDS,
                                      PROTOCOL_ERROR, REFUSED_STREAM, SETTINGS, H2Client,
                                      H2Resp, continuation_flood, control_flood, goaway_code,
                                      make_you_reset, max_requests_answers, rapid_reset,
                                      send_malformed, tls_client_context)
from tests.regress.test_relayd_http import Client, Recorder, log_line
from tests.regress.test_relayd_tls import write_pair

CONF = """
prefork 1
log connection
table <main> {{ 127.0.0.1 }}

http protocol "h2" {{
	return error
	http http2
	match request header set "X-Seen" value "$HOST"
	match request header log "X-Log"
	block request path "/blocked*" label "no h2 here"
	block request cookie "session" value "evil*"
	match response header set "X-Resp" value "relayd"
}}
http protocol "h2tls" {{
	http http2
	tls keypair "127.0.0.1"
}}
http protocol "h1tls" {{
	tls keypair "127.0.0.1"
}}
http protocol "h1" {{
	return error
}}
http protocol "atk" {{
	http {{ http2 max-streams 4 max-requests 100000 }}
}}
http protocol "mr" {{
	http {{ http2 max-requests 5 }}
}}

relay "h2" {{
	listen on 127.0.0.1 port {p[h2]}
	protocol "h2"
	forward to <main> port {rec}
}}
relay "h2tls" {{
	listen on 127.0.0.1 port {p[h2tls]} tls
	protocol "h2tls"
	forward to <main> port {rec}
}}
relay "h1tls" {{
	listen on 127.0.0.1 port {p[h1tls]} tls
	protocol "h1tls"
	forward to <main> port {rec}
}}
relay "h1" {{
	listen on 127.0.0.1 port {p[h1]}
	protocol "h1"
	forward to <main> port {rec}
}}
relay "atk" {{
	listen on 127.0.0.1 port {p[atk]}
	protocol "atk"
	session timeout 3
	forward to <main> port {rec}
}}
relay "mr" {{
	listen on 127.0.0.1 port {p[mr]}
	protocol "mr"
	forward to <main> port {rec}
}}
"""
NAMES = ("h2", "h2tls", "h1tls", "h1", "atk", "mr")


def start(d, rec: Recorder, conf: str = CONF) -> tuple[Daemon, dict]:
    env = {**os.environ, "RELAYD_SSL_DIR": str(d), "PYTHONPATH": str(REPO)}
    for attempt in range(3):
        ports = {k: free_port() for k in NAMES}
        path = d / f"relayd{attempt}.conf"
        path.write_text(conf.format(p=ports, rec=rec.port))
        relayd = Daemon("relayd", path, env=env)
        try:
            for p in ports.values():
                wait_port(p, proc=relayd.proc)
            return relayd, ports
        except (RuntimeError, TimeoutError):
            relayd.stop()
    raise RuntimeError(f"relayd did not start:\n{relayd.output()}")


@contextlib.contextmanager
def relayd_env(tmp_path_factory, name: str):
    """A relayd with CONF in front of a Recorder; keypair and CA in its dir."""
    d = tmp_path_factory.mktemp(name)
    (d / "private").mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    write_pair(d, "127.0.0.1", ca.issue_cert("127.0.0.1"))
    rec = Recorder(name=name)
    relayd, ports = start(d, rec)
    try:
        yield SimpleNamespace(d=d, relayd=relayd, p=ports, rec=rec, ca=ca,
                              log_line=lambda pattern: log_line(relayd, pattern, 10.0))
    finally:
        relayd.stop()
        rec.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with relayd_env(tmp_path_factory, "relayd_h2") as e:
        yield e


@pytest.fixture
def own(tmp_path_factory):
    """A relayd of its own (the signal tests end it)."""
    with relayd_env(tmp_path_factory, "relayd_h2_sig") as e:
        yield e


def uniq(prefix: str = "/u") -> str:
    return f"{prefix}/{time.monotonic_ns()}"


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=20)


def served(port: int) -> bool:
    """Another connection gets an answer (the attacked one aside)."""
    with H2Client(port) as c:
        return c.get(uniq("/served")).status == 200


HOP = ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
       "trailer")


def assert_clean_h1(rec) -> None:
    """What a backend must never see from relayd's HTTP/2 side."""
    lines = rec.head.decode("latin-1").split("\r\n")
    assert re.fullmatch(r"[A-Z]+ /\S* HTTP/1\.1", lines[0]), lines[0]
    names = [k.lower() for k, _ in rec.headers]
    assert names.count("host") == 1, rec.head
    assert not any(n.startswith(":") for n in names), rec.head
    assert not set(names) & (set(HOP) - {"transfer-encoding"}), rec.head
    assert not ("transfer-encoding" in names and "content-length" in names), rec.head


# -- translation and real clients --------------------------------------------------------

def test_curl_prior_knowledge_translation_and_log(env) -> None:
    path = uniq("/pk")
    r = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
             "-H", "Cookie: a=1", "-H", "Cookie: b=2", "-H", "X-Log: logged",
             f"http://127.0.0.1:{env.p['h2']}{path}?q=1")
    assert r.stdout == "2 200", r.stderr
    rec = env.rec.find(path)
    assert_clean_h1(rec)
    assert rec.head.startswith(f"GET {path}?q=1 HTTP/1.1\r\nHost: 127.0.0.1:{env.p['h2']}\r\n"
                               .encode())
    assert rec.header("cookie") == "a=1; b=2"          # crumbs joined (RFC 9113 §8.2.3)
    assert rec.header("x-seen") == f"127.0.0.1:{env.p['h2']}"   # rules saw Host
    assert rec.body == b""
    env.log_line(r"relay h2, session \d+ \(\d+ active\), 0, 127\.0\.0\.1 -> "
                 rf"127\.0\.0\.1:{env.rec.port}, done, \[x-log: logged\] GET;")


def test_http1_still_served_on_h2_port(env) -> None:
    path = uniq("/h1")
    with Client(env.p["h2"]) as c:
        c.send(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        r = c.response()
    assert r.status == 200 and r.body == b"ok"
    assert env.rec.find(path).head == f"GET {path} HTTP/1.1\r\nHost: h\r\nX-Seen: h".encode()


def test_preface_without_http2_is_an_http1_error(env) -> None:
    with Client(env.p["h1"]) as c:
        c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        r = c.response()
        assert r.status == 400 and r.header("connection") == "close"
        assert c.closed()


def test_tls_alpn(env) -> None:
    ctx = tls_client_context(env.ca.cert_pem.bytes())
    for name, want in (("h2tls", "h2"), ("h1tls", "http/1.1")):
        with socket.create_connection(("127.0.0.1", env.p[name]), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                assert t.selected_alpn_protocol() == want, name
    path = uniq("/tls")
    r = curl("--http2", "--cacert", str(env.d / "ca.pem"), "-o", "/dev/null", "-w",
             "%{http_version} %{http_code}", f"https://127.0.0.1:{env.p['h2tls']}{path}")
    assert r.stdout == "2 200", r.stderr
    assert_clean_h1(env.rec.find(path))
    with H2Client(env.p["h2tls"], tls=ctx, server_hostname="127.0.0.1") as c:
        assert c.alpn == "h2"
        assert c.get(uniq("/tls2"), authority="127.0.0.1").status == 200


def test_bodies_content_length_and_chunked(env) -> None:
    with H2Client(env.p["h2"]) as c:
        a, b = uniq("/echo/cl"), uniq("/echo/ch")
        body = os.urandom(100_000)
        ra = c.response(c.request(a, method="POST", body=body,
                                  headers=[("content-length", str(len(body)))]))
        rb = c.response(c.request(b, method="PUT", body=b"chunk me"))
    assert ra.status == 200 and ra.body == body
    assert rb.status == 200 and rb.body == b"chunk me"
    reca, recb = env.rec.find(a), env.rec.find(b)
    assert_clean_h1(reca)
    assert_clean_h1(recb)
    assert reca.header("content-length") == str(len(body)) and reca.body == body
    assert reca.header("transfer-encoding") is None
    assert recb.header("transfer-encoding") == "chunked" and recb.header("content-length") is None
    assert recb.body.endswith(b"0\r\n\r\n")


def test_httpx_http2(env) -> None:
    path = uniq("/httpx")
    with httpx.Client(http1=False, http2=True) as c:
        r = c.post(f"http://127.0.0.1:{env.p['h2']}{path}/echo", content=b"from httpx")
    assert r.http_version == "HTTP/2" and r.status_code == 200 and r.content == b"from httpx"
    assert r.headers["x-resp"] == "relayd"
    assert_clean_h1(env.rec.find(path))


def test_response_connection_fields_dropped(env) -> None:
    path = uniq("/resp") + "/hdr/Connection/x-foo/hdr/X-Foo/1/hdr/Keep-Alive/timeout=5" \
        "/hdr/Upgrade/h2c/hdr/X-Kept/yes"
    with H2Client(env.p["h2"]) as c:
        r = c.get(path)
    assert r.status == 200 and r.body == b"ok"
    names = set(r.headers)
    assert not names & {"connection", "keep-alive", "upgrade", "x-foo", "transfer-encoding"}
    assert r.headers["x-kept"] == "yes" and r.headers["x-resp"] == "relayd"
    with H2Client(env.p["h2"]) as c:
        r = c.get(uniq("/chunked"))
    assert r.status == 200 and r.body == b"hello, world"
    assert "transfer-encoding" not in r.headers


def test_rules_block_on_a_stream_others_go_on(env) -> None:
    with H2Client(env.p["h2"]) as c:
        blocked = c.request("/blocked/x")
        crumbs = c.request(uniq("/cookie"), headers=[("cookie", "a=1"),
                                                      ("cookie", "session=evil1")])
        ok = c.request(uniq("/fine"))
        rb, rc, ro = c.response(blocked), c.response(crumbs), c.response(ok)
    assert rb.status == 403 and b"no h2 here" in rb.body
    assert rc.status == 403
    assert ro.status == 200 and ro.body == b"ok"
    assert not env.rec.has("/cookie/")
    env.log_line(r"relay h2, session \d+ .*, Forbidden \(403 Forbidden\), GET")


def test_nghttp_and_h2load(env) -> None:
    urls = [f"http://127.0.0.1:{env.p['h2']}{uniq('/ng')}/{i}" for i in range(5)]
    r = subprocess.run(["nghttp", "-n", "-s", *urls], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" 200 ") == 5
    before = env.rec.nconn
    r = subprocess.run(["h2load", "-n", "400", "-c", "2", "-m", "20",
                        f"http://127.0.0.1:{env.p['h2']}/load"],
                       capture_output=True, text=True, timeout=60)
    assert "400 succeeded" in r.stdout, r.stdout
    # Backend connections are pooled per client connection: at most
    # max-streams (100) each, here far fewer than requests.
    assert env.rec.nconn - before <= 2 * 20


# -- limits and attacks ---------------------------------------------------------------------

def test_streams_beyond_max_refused_and_madeyoureset(env) -> None:
    with H2Client(env.p["atk"]) as c:
        slow = [c.request(uniq("/slowhead")) for _ in range(4)]
        assert c.ping()
        assert make_you_reset(c, slow)
        extra = c.request(uniq("/extra"))
        assert c.response(extra).reset == REFUSED_STREAM
        assert served(env.p["h2"])


def test_max_requests_goaway(env) -> None:
    with H2Client(env.p["mr"]) as c:
        sids = [c.request(uniq("/mr")) for _ in range(7)]
        statuses, resets = max_requests_answers(c, sids)
        assert statuses == [200] * 5 + [0] * 2          # 0: no response head
        # RFC 9113 6.8: streams above GOAWAY's last id are not processed (the
        # client retries them).  Those read before the answers are out also
        # get REFUSED_STREAM; those read while the connection closes do not.
        assert set(resets[5:]) <= {REFUSED_STREAM, None}, resets
        assert c.goaway is not None and c.goaway.error_code == 0
        assert c.goaway.last_stream_id == sids[4]
        assert c.closed()


def test_zero_window_slow_read(env) -> None:
    with H2Client(env.p["atk"], settings={SETTINGS.INITIAL_WINDOW_SIZE: 0}) as c:
        r = c.response(c.request(uniq("/big/1000000")), timeout=15)
        assert r.status == 200 and r.reset == CANCEL and r.body == b""
        assert served(env.p["atk"])
    env.log_line("stalled by the client's stream window, reset \\(CANCEL\\)")


def test_rapid_reset(env) -> None:
    with H2Client(env.p["atk"]) as c:
        rapid_reset(c, "/rr", "atk")
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    env.log_line("rapid reset, GOAWAY ENHANCE_YOUR_CALM")
    env.log_line(r"relay atk, session \d+ .*, rapid reset")
    assert served(env.p["atk"])


@pytest.mark.parametrize("kind", ["ping", "settings", "window-update", "empty-data"])
def test_control_frame_floods(env, kind) -> None:
    with H2Client(env.p["atk"]) as c:
        sid = c.request(uniq("/slowhead"), method="POST", end=False) if kind == "empty-data" \
            else 0
        c.send_raw(control_flood(kind, sid))
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    env.log_line("control frame flood")
    assert served(env.p["atk"])


def test_continuation_flood(env) -> None:
    with H2Client(env.p["atk"]) as c:
        c.send_raw(continuation_flood())
        assert goaway_code(c) in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM)
        assert c.closed()
    assert served(env.p["atk"])


def test_hpack_bomb(env) -> None:
    with H2Client(env.p["atk"]) as c:
        sid = c.request("/bomb", headers=HPACK_BOMB)
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.responses[sid].status == 0
        assert c.closed()
    assert not env.rec.has("/bomb")
    assert served(env.p["atk"])


def test_head_too_large_413(env) -> None:
    with H2Client(env.p["h2"]) as c:
        r = c.get("/toolarge", headers=[("x-big", "b" * 9000)])
    assert r.status == 413
    assert not env.rec.has("/toolarge")


# -- malformed requests never reach the backend (RFC 9113 §8.2, §8.3) ----------------------

# relayd's own: an Upgrade (h2c) field, CONNECT (501 in the design note:
# refused as malformed here, RST PROTOCOL_ERROR).
EXTRA = {"upgrade": [("upgrade", "h2c")]}


@pytest.mark.parametrize("kind", MALFORMED_KINDS + ["upgrade", "connect"])
def test_malformed_never_reaches_backend(env, kind) -> None:
    mark = uniq(f"/bad-{kind}")
    with H2Client(env.p["h2"]) as c:
        if kind in MALFORMED_KINDS:
            rst, goaway = send_malformed(c, kind, mark, "h", [("x-mark", mark)])
        else:
            sid = c.h2.get_next_available_stream_id()
            hdrs = ([(":method", "GET"), (":path", mark), (":scheme", "http"),
                     (":authority", "h")] + EXTRA["upgrade"] if kind == "upgrade" else
                    [(":method", "CONNECT"), (":authority", "h:443")])
            c.h2.send_headers(sid, hdrs + [("x-mark", mark)], end_stream=True)
            r = c.responses[sid] = H2Resp()
            c.flush()
            c.wait(lambda: r.reset is not None or r.ended, 10)
            assert r.status == 0
            rst, goaway = r.reset, None
        assert rst == PROTOCOL_ERROR or goaway == PROTOCOL_ERROR, (rst, goaway)
    assert served(env.p["h2"])
    time.sleep(0.2)
    # A backend may have seen the head of a body that then broke its
    # Content-Length: never the whole request (its connection was cut).
    with env.rec.lock:
        recs = list(env.rec.requests)
    for rec in recs:
        assert mark not in rec.target and mark.encode() not in rec.head, (kind, rec.head)


# -- reload and stop -------------------------------------------------------------------------

def _goaways(c: H2Client) -> list:
    import h2.events
    return [e for e in c.events if isinstance(e, h2.events.ConnectionTerminated)]


def _in_flight_then(own, c: H2Client, sig: int) -> int:
    """A slow request the backend has begun; then signal `sig`; its stream id."""
    mark = uniq("/slowhead")
    sid = c.request(mark)
    own.rec.find(mark)
    own.relayd.signal(sig)
    return sid


def test_reload_two_step_goaway_in_flight_finishes(own) -> None:
    with H2Client(own.p["h2"]) as c:
        slow = _in_flight_then(own, c, signal.SIGHUP)
        # the first step may come more than once (RFC 9113 6.8 allows it);
        # the final GOAWAY names the stream in flight
        assert c.wait(lambda: any(g.last_stream_id == slow for g in _goaways(c)), 15), c.events
        goaways = _goaways(c)
        first = goaways[0]
        last = next(g for g in goaways if g.last_stream_id == slow)
        assert first.error_code == 0 and first.last_stream_id == 2**31 - 1
        assert last.error_code == 0
        later = c.request(uniq("/later"))
        r = c.response(slow, timeout=15)
        assert r.status == 200 and r.body == b"ok"
        assert c.response(later).reset == REFUSED_STREAM or c.responses[later].status == 0
    assert not own.rec.has("/later/")
    own.relayd.wait_output("configuration reloaded")
    assert served(own.p["h2"])


def test_stop_goaway_in_flight_finishes(own) -> None:
    with H2Client(own.p["h2"]) as c:
        slow = _in_flight_then(own, c, signal.SIGTERM)
        assert c.wait(lambda: len(_goaways(c)) >= 1, 15)
        assert _goaways(c)[0].error_code == 0
        r = c.response(slow, timeout=15)
        assert r.status == 200 and r.body == b"ok"
        assert c.closed()
    assert own.relayd.proc.wait(20) == 0
