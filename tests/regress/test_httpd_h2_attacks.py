"""HTTP/2 limits, attacks and malformed requests (issue 14), raw frames.

One httpd (prefork 1) with two clear-text http2 sockets:
  atk  `max streams 4`, `timeout 2`, `request timeout 3` (the attack cases)
  mr   `max requests 5` (GOAWAY after five streams)
and a flup FastCGI application that notes every request carrying X-Mark,
so that the malformed cases can show that none reached it.  Each case
checks the frames the server answers with, the log line, and that another
connection is served meanwhile.
"""

from __future__ import annotations

from types import SimpleNamespace

import hpack
import pytest
from hyperframe.frame import (ContinuationFrame, DataFrame, HeadersFrame,
                              PingFrame, SettingsFrame, WindowUpdateFrame)

from tests.conftest import free_port
from tests.regress.fcgi import servers
from tests.regress.h2_helpers import SETTINGS, H2Client, H2Resp
from tests.regress.httpd_helpers import module_site

PROTOCOL_ERROR, FLOW_CONTROL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 1, 3, 7, 8, 11

CONF = """
prefork 1
server "atk" {
    listen on 127.0.0.1 port {port} http2
    root "/htdocs"
    connection { max streams 4, timeout 2, request timeout 3, max requests 100000 }
    location "/fcgi/*" { fastcgi socket "/flup.sock" }
}
server "mr" {
    listen on 127.0.0.1 port {mrport} http2
    root "/htdocs"
    connection { max requests 5 }
}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    T = tmp_path_factory.mktemp("h2atk")
    marks = T / "flup.marks"
    marks.write_text("")
    started = []
    ports = {"mrport": free_port()}

    def setup(s):
        (s.htdocs / "index.html").write_text("<h1>index</h1>\n")
        (s.htdocs / "1m.bin").write_bytes(b"m" * (1 << 20))
        started.append(servers.start_flup(str(s.dir / "flup.sock"), T, marks=marks))

    try:
        for site in module_site(tmp_path_factory, CONF, setup=setup,
                                extra_ports=list(ports.values()), **ports):
            yield SimpleNamespace(site=site, port=site.port, marks=marks, **ports)
    finally:
        for f in started:
            f.stop()


def served(site) -> bool:
    """Another connection gets an answer (the attacked one aside)."""
    with H2Client(site.port) as c:
        return c.get("/index.html").status == 200


def goaway_code(c: H2Client) -> int | None:
    c.wait(lambda: c.goaway is not None, 15)
    return c.goaway.error_code if c.goaway is not None else None


# -- limits ---------------------------------------------------------------------------

def test_streams_beyond_max_refused_and_madeyoureset(site) -> None:
    with H2Client(site.port) as c:
        slow = [c.request("/fcgi/sleep?s=1.5") for _ in range(4)]
        assert c.ping()        # the handlers run (a reset in the same read: never started)
        # MadeYouReset: make the server reset those streams itself (window
        # overflow, a stream error): their handlers still hold the slots.
        for sid in slow:
            f = WindowUpdateFrame(sid)
            f.window_increment = 2**31 - 1
            c.send_raw(f.serialize())
        assert c.wait(lambda: all(c.responses[s].reset == FLOW_CONTROL_ERROR for s in slow))
        extra = c.request("/index.html")
        r = c.response(extra)
        assert r.reset == REFUSED_STREAM
        assert served(site)
        # Once the handlers are done, the slots are free again.
        c.wait(lambda: False, 2.5)
        assert c.get("/index.html").status == 200


def test_max_requests_goaway(site) -> None:
    with H2Client(site.mrport) as c:
        sids = [c.request("/index.html") for _ in range(7)]
        c.wait(lambda: all(c.responses[s].ended or c.responses[s].reset for s in sids))
        assert [c.responses[s].status for s in sids[:5]] == [200] * 5
        assert [c.responses[s].reset for s in sids[5:]] == [REFUSED_STREAM] * 2
        assert c.goaway is not None and c.goaway.error_code == 0
        assert c.goaway.last_stream_id == sids[4]
        assert c.closed()


def test_zero_window_slow_read(site) -> None:
    with H2Client(site.port, settings={SETTINGS.INITIAL_WINDOW_SIZE: 0}) as c:
        sid = c.request("/1m.bin")
        r = c.response(sid, timeout=15)
        assert r.status == 200 and r.reset == CANCEL and r.body == b""
        assert served(site)
    site.site.daemon.wait_output("stalled by the client's stream window, reset (CANCEL)")


def test_idle_and_header_phase_timeout(site) -> None:
    with H2Client(site.port) as c:
        assert c.ping()                    # SETTINGS exchanged: the client is quiet now
        enc = hpack.Encoder()
        block = enc.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                            (":authority", "atk")])
        f = HeadersFrame(1)
        f.data = block[:5]
        c.send_raw(f.serialize())          # no END_HEADERS: the head never ends
        assert goaway_code(c) == 0
        assert c.closed(15)


# -- attacks ---------------------------------------------------------------------------

def test_rapid_reset(site) -> None:
    with H2Client(site.port) as c:
        for _ in range(300):
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, [(":method", "GET"), (":path", "/index.html"),
                                    (":scheme", "http"), (":authority", "atk")],
                              end_stream=True)
            c.h2.reset_stream(sid, CANCEL)
        c.flush()
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    site.site.daemon.wait_output("rapid reset, GOAWAY ENHANCE_YOUR_CALM")
    assert served(site)


@pytest.mark.parametrize("kind", ["ping", "settings", "empty-data", "window-update"])
def test_control_frame_floods(site, kind) -> None:
    with H2Client(site.port) as c:
        sid = c.request("/fcgi/sleep?s=1", end=False) if kind == "empty-data" else 0
        frames = []
        for i in range(3000):
            if kind == "ping":
                f = PingFrame(0)
                f.opaque_data = i.to_bytes(8, "big")
            elif kind == "settings":
                f = SettingsFrame(0)
            elif kind == "window-update":
                f = WindowUpdateFrame(0)
                f.window_increment = 1
            else:
                f = DataFrame(sid)
            frames.append(f.serialize())
        c.send_raw(b"".join(frames))
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    site.site.daemon.wait_output("control frame flood")
    assert served(site)


def test_continuation_flood(site) -> None:
    with H2Client(site.port) as c:
        f = HeadersFrame(1)
        f.data = hpack.Encoder().encode([(":method", "GET")])
        data = [f.serialize()]
        for _ in range(200):
            cf = ContinuationFrame(1)
            cf.data = b"\x40\x01a\x01b"        # literal x: y, never ending
            data.append(cf.serialize())
        c.send_raw(b"".join(data))
        assert goaway_code(c) in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM)
        assert c.closed()
    assert served(site)


def test_hpack_bomb(site) -> None:
    with H2Client(site.port) as c:
        # 4 KB once into the dynamic table, then referenced by index:
        # about 4 KB on the wire, 400 KB decoded.
        sid = c.request("/index.html", headers=[("x-bomb", "a" * 4000)] * 100)
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.responses[sid].status == 0
        assert c.closed()
    assert served(site)


# -- malformed requests (RFC 9113 §8.2, §8.3) ------------------------------------------

MALFORMED = {
    "connection-header": [("connection", "keep-alive")],
    "upper-case-name": [("X-Upper", "1")],
    "cr-in-value": [("x-v", "a\rb")],
    "lf-in-value": [("x-v", "a\nb")],
    "nul-in-value": [("x-v", "a\x00b")],
    "te-gzip": [("te", "gzip")],
    "transfer-encoding": [("transfer-encoding", "chunked")],
    "host-differs": [("host", "evil.example")],
}


def _malformed(site, kind: str) -> tuple[int | None, int | None]:
    """Send the malformed request `kind`; (RST code, GOAWAY code)."""
    with H2Client(site.port) as c:
        mark = [("x-mark", f"bad-{kind}")]
        if kind in MALFORMED:
            sid = c.request("/fcgi/env", headers=mark + MALFORMED[kind])
        elif kind == "content-length-mismatch":
            sid = c.request("/fcgi/env", method="POST", body=b"12345",
                            headers=mark + [("content-length", "10")])
        elif kind == "content-length-short":
            sid = c.request("/fcgi/env", method="POST", body=b"x" * 20,
                            headers=mark + [("content-length", "10")])
        else:
            hdrs = {"no-path": [(":method", "GET"), (":scheme", "http")],
                    "relative-path": [(":method", "GET"), (":path", "fcgi/env"),
                                      (":scheme", "http")],
                    "unknown-pseudo": [(":method", "GET"), (":path", "/fcgi/env"),
                                       (":scheme", "http"), (":foo", "x")],
                    "double-method": [(":method", "GET"), (":method", "POST"),
                                      (":path", "/fcgi/env"), (":scheme", "http")],
                    "pseudo-after-regular": [(":method", "GET"), ("x-a", "1"),
                                             (":path", "/fcgi/env"), (":scheme", "http")],
                    "scheme-https-on-clear": [(":method", "GET"), (":path", "/fcgi/env"),
                                              (":scheme", "https")],
                    "space-in-path": [(":method", "GET"), (":path", "/fcgi/env x"),
                                      (":scheme", "http")],
                    "authority-userinfo": [(":method", "GET"), (":path", "/fcgi/env"),
                                           (":scheme", "http"), (":authority", "u@atk")],
                    "bad-method": [(":method", "G T"), (":path", "/fcgi/env"),
                                   (":scheme", "http")],
                    }[kind]
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, hdrs + [(":authority", "atk")] * (kind not in (
                "authority-userinfo",)) + mark, end_stream=True)
            c.responses[sid] = H2Resp()
            c.flush()
        r = c.responses[sid]
        c.wait(lambda: r.reset is not None or c.goaway is not None or r.ended, 10)
        assert r.status == 0, f"{kind}: answered {r.status}"
        return r.reset, (c.goaway.error_code if c.goaway is not None else None)


KINDS = list(MALFORMED) + ["content-length-mismatch", "content-length-short", "no-path",
                           "relative-path", "unknown-pseudo", "double-method",
                           "pseudo-after-regular", "scheme-https-on-clear",
                           "space-in-path", "authority-userinfo", "bad-method"]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_never_reaches_fastcgi(site, kind) -> None:
    rst, goaway = _malformed(site, kind)
    assert rst == PROTOCOL_ERROR or goaway == PROTOCOL_ERROR, (rst, goaway)
    assert served(site)
    # A well-formed request through the same path is seen (the control) ...
    with H2Client(site.port) as c:
        assert c.get("/fcgi/env", headers=[("x-mark", f"good-{kind}")]).status == 200
    seen = site.marks.read_text()
    assert f"seen good-{kind}\n" in seen
    # ... the malformed one never was.
    assert f"seen bad-{kind}\n" not in seen
