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
from hyperframe.frame import HeadersFrame

from tests.conftest import free_port
from tests.regress.fcgi import servers
from tests.regress.h2_helpers import (CANCEL, ENHANCE_YOUR_CALM, HPACK_BOMB, MALFORMED_KINDS,
                                      PROTOCOL_ERROR, REFUSED_STREAM, SETTINGS, H2Client,
                                      continuation_flood, control_flood, goaway_code,
                                      make_you_reset, max_requests_answers, rapid_reset,
                                      send_malformed)
from tests.regress.httpd_helpers import module_site

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


# -- limits ---------------------------------------------------------------------------

def test_streams_beyond_max_refused_and_madeyoureset(site) -> None:
    with H2Client(site.port) as c:
        slow = [c.request("/fcgi/sleep?s=1.5") for _ in range(4)]
        assert c.ping()        # the handlers run (a reset in the same read: never started)
        # MadeYouReset: make the server reset those streams itself (window
        # overflow, a stream error): their handlers still hold the slots.
        assert make_you_reset(c, slow)
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
        statuses, resets = max_requests_answers(c, sids)
        assert statuses == [200] * 5 + [0] * 2          # 0: no response head
        # RFC 9113 6.8: streams above GOAWAY's last id are not processed (the
        # client retries them).  Those read before the answers are out also
        # get REFUSED_STREAM; those read while the connection closes do not.
        assert set(resets[5:]) <= {REFUSED_STREAM, None}, resets
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
        rapid_reset(c, "/index.html", "atk")
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    site.site.daemon.wait_output("rapid reset, GOAWAY ENHANCE_YOUR_CALM")
    assert served(site)


@pytest.mark.parametrize("kind", ["ping", "settings", "empty-data", "window-update"])
def test_control_frame_floods(site, kind) -> None:
    with H2Client(site.port) as c:
        sid = c.request("/fcgi/sleep?s=1", end=False) if kind == "empty-data" else 0
        c.send_raw(control_flood(kind, sid))
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    site.site.daemon.wait_output("control frame flood")
    assert served(site)


def test_continuation_flood(site) -> None:
    with H2Client(site.port) as c:
        c.send_raw(continuation_flood())
        assert goaway_code(c) in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM)
        assert c.closed()
    assert served(site)


def test_hpack_bomb(site) -> None:
    with H2Client(site.port) as c:
        sid = c.request("/index.html", headers=HPACK_BOMB)
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.responses[sid].status == 0
        assert c.closed()
    assert served(site)


# -- malformed requests (RFC 9113 §8.2, §8.3) ------------------------------------------

def _malformed(site, kind: str) -> tuple[int | None, int | None]:
    """Send the malformed request `kind`; (RST code, GOAWAY code)."""
    with H2Client(site.port) as c:
        return send_malformed(c, kind, "/fcgi/env", "atk", [("x-mark", f"bad-{kind}")])


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
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
