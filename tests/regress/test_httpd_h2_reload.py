"""HTTP/2 across reload and stop (issue 14): GOAWAY(NO_ERROR), two steps.

A 1 MiB download and a slow FastCGI request in flight on one connection
both complete across SIGHUP; SIGTERM lets a slow request finish; and
clients that move to a new connection after GOAWAY (as browsers do: streams
above last_stream_id, or refused, were never processed) see no failure
during 10 reloads under load.  One daemon per test (signals end them).
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.regress.fcgi import servers
from tests.regress.h2_helpers import H2Client
from tests.regress.httpd_helpers import site_factory  # noqa: F401

REFUSED_STREAM = 7

CONF = """
prefork {prefork}
server "localhost" {
    listen on 127.0.0.1 port {port} http2
    root "/htdocs"
    connection { max requests 100000 }
    location "/fcgi/*" { fastcgi socket "/flup.sock" }
}
"""


@pytest.fixture
def h2site(site_factory, tmp_path):   # noqa: F811
    started = []

    def make(prefork: int = 1):
        def setup(s):
            (s.htdocs / "index.html").write_text("<h1>index</h1>\n")
            (s.htdocs / "1m.bin").write_bytes(bytes(range(256)) * 4096)
            started.append(servers.start_flup(str(s.dir / "flup.sock"), tmp_path))
        return site_factory(CONF, setup=setup, prefork=prefork)
    yield make
    for f in started:
        f.stop()


def reloaded(site, n: int) -> None:
    site.daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while site.daemon.output().count("configuration reloaded") < n:
        assert time.monotonic() < deadline, site.daemon.output()
        time.sleep(0.05)


def test_reload_during_download_and_slow_fastcgi(h2site) -> None:
    site = h2site()
    with H2Client(site.port) as c:
        slow = c.request("/fcgi/sleep?s=2")
        dl = c.request("/1m.bin")
        # Part of the download (the windows hold the rest back).
        c.wait(lambda: len(c.responses[dl].body) > 0)
        reloaded(site, 1)
        r = c.response(dl, timeout=20)
        assert r.status == 200 and r.body == (site.htdocs / "1m.bin").read_bytes()
        r = c.response(slow, timeout=20)
        assert r.status == 200 and r.body == b"late\n"
        assert c.goaway is not None and c.goaway.error_code == 0
        assert c.goaway.last_stream_id >= dl
        assert c.closed()
    with H2Client(site.port) as c:
        assert c.get("/index.html").status == 200


def test_sigterm_lets_streams_finish(h2site) -> None:
    site = h2site()
    with H2Client(site.port) as c:
        slow = c.request("/fcgi/sleep?s=1.5")
        assert c.ping()
        site.daemon.signal(signal.SIGTERM)
        r = c.response(slow, timeout=20)
        assert r.status == 200 and r.body == b"late\n"
        assert c.goaway is not None and c.goaway.error_code == 0
        assert c.closed()
    assert site.daemon.proc.wait(20) == 0


class Load(threading.Thread):
    """Requests on HTTP/2 connections, four in flight, until stopped; a
    stream the server did not process (refused, or above a GOAWAY's
    last_stream_id) is retried on a new connection."""

    def __init__(self, port: int, limit: int = 20000, seconds: float = 120) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.limit = limit
        self.until = time.monotonic() + seconds
        self.stop = threading.Event()
        self.done = 0
        self.retried = 0
        self.failures: list[str] = []

    def stopped(self) -> bool:
        return self.stop.is_set() or self.done >= self.limit or time.monotonic() > self.until

    def run(self) -> None:
        todo = 0
        while not self.stopped():
            try:
                with H2Client(self.port) as c:
                    todo = self._connection(c, todo)
            except OSError as e:
                self.failures.append(f"connect: {e!r}")
                return

    def _connection(self, c: H2Client, retry: int) -> int:
        inflight: list[int] = []
        while True:
            while len(inflight) < 4 and c.goaway is None and not self.stopped():
                inflight.append(c.request("/index.html"))
            if not inflight:
                return retry
            sid = inflight.pop(0)
            r = c.response(sid, timeout=20)
            last = c.goaway.last_stream_id if c.goaway is not None else None
            if r.status == 200 and r.ended:
                self.done += 1
            elif r.reset == REFUSED_STREAM or (last is not None and sid > last):
                self.retried += 1
            else:
                self.failures.append(f"stream {sid}: {r} goaway={c.goaway}")
            if c.eof and inflight and all(not c.responses[s].ended for s in inflight):
                lost = [s for s in inflight if last is None or s <= last]
                if lost:
                    self.failures.append(f"closed with streams {lost} <= {last}")
                self.retried += len(inflight) - len(lost)
                return retry


def test_ten_reloads_under_load(h2site) -> None:
    site = h2site(prefork=2)
    loads = [Load(site.port) for _ in range(3)]
    for t in loads:
        t.start()
    for n in range(1, 11):
        reloaded(site, n)
        time.sleep(0.2)
    for t in loads:
        t.stop.set()
    for t in loads:
        t.join(60)
    assert all(not t.is_alive() for t in loads)
    assert [f for t in loads for f in t.failures] == []
    assert sum(t.done for t in loads) > 0
