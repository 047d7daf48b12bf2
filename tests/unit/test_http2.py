"""engine.http2 over memory streams, and httpd's `http2` / `max streams`.

An h2 client (python-hyper h2, client side) talks to H2ServerConn through
a trio memory stream pair: requests and responses, flow control both
ways, refused streams, rapid reset, graceful shutdown.  No sockets.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing

from engine.conn import StreamTransport
from engine.http2 import H2Limits, H2ServerConn, is_preface
from httpd import parse
from tests.regress.h2_helpers import _TABLE

REQ = [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", "t")]


class Client:
    def __init__(self, stream) -> None:
        self.s = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.state_machine._transitions = _TABLE     # reads on after a GOAWAY
        self.h2.initiate_connection()
        self.events: list = []
        self.body: dict[int, bytes] = {}

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.s.send_all(data)

    async def until(self, cond) -> None:
        with trio.fail_after(5):
            while not cond():
                await self.flush()
                data = await self.s.receive_some(65536)
                if not data:
                    return
                for e in self.h2.receive_data(data):
                    self.events.append(e)
                    if isinstance(e, h2.events.DataReceived):
                        self.body[e.stream_id] = self.body.get(e.stream_id, b"") + e.data
                        self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            await self.flush()

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                   and e.stream_id == sid for e in self.events)

    def of(self, kind, sid: int | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind)
                and (sid is None or getattr(e, "stream_id", None) == sid)]


async def run(handler, client_fn, limits: H2Limits = H2Limits()) -> H2ServerConn:
    a, b = trio.testing.memory_stream_pair()
    conn = H2ServerConn(StreamTransport(b, peer=("p", 1)), limits, handler)
    async with trio.open_nursery() as n:
        n.start_soon(conn.run)
        await client_fn(Client(a), conn)
        await a.aclose()
    return conn


async def echo(s) -> None:
    body = await s.read_body(1 << 20)
    await s.send_head(200, [("Content-Type", "text/plain"), ("Connection", "close")])
    await s.send_data(s.req.method.encode() + b" " + s.req.target.encode() + b" " + body, True)


def test_preface() -> None:
    assert is_preface(b"PRI * HTTP/2.0\r\n") and not is_preface(b"GET / HTTP/1.1\r\n")


def test_request_response_and_connection_fields_dropped() -> None:
    trio.run(_test_request_response_and_connection_fields_dropped)


async def _test_request_response_and_connection_fields_dropped() -> None:
    async def client(c, conn):
        c.h2.send_headers(1, REQ, end_stream=True)
        await c.until(lambda: c.ended(1))
        head = c.of(h2.events.ResponseReceived, 1)[0].headers
        assert (b":status", b"200") in head and (b"content-type", b"text/plain") in head
        assert not any(k == b"connection" for k, _ in head)
        assert c.body[1] == b"GET /x "
        assert conn.streams == {} and conn.active == 0
    await run(echo, client)


def test_upload_larger_than_the_window_and_big_download() -> None:
    trio.run(_test_upload_larger_than_the_window_and_big_download)


async def _test_upload_larger_than_the_window_and_big_download() -> None:
    big = bytes(range(256)) * 1024                 # 256 KiB: 4 stream windows

    async def handler(s):
        body = await s.read_body(1 << 20)
        await s.send_head(200, [])
        await s.send_data(body, True)

    async def client(c, conn):
        c.h2.send_headers(1, REQ[:1] + [(":path", "/up")] + REQ[2:])
        sent = 0
        with trio.fail_after(5):
            while sent < len(big):
                room = min(c.h2.local_flow_control_window(1), 16384)
                if room == 0:
                    await c.until(lambda: c.h2.local_flow_control_window(1) > 0)
                    continue
                c.h2.send_data(1, big[sent:sent + room], end_stream=sent + room >= len(big))
                sent += room
                await c.flush()
        await c.until(lambda: c.ended(1))
        assert c.body[1] == big
    await run(handler, client)


def test_streams_past_the_limit_refused() -> None:
    trio.run(_test_streams_past_the_limit_refused)


async def _test_streams_past_the_limit_refused() -> None:
    gate = trio.Event()

    async def handler(s):
        await gate.wait()
        await s.send_head(204, [], end=True)

    async def client(c, conn):
        for sid in (1, 3, 5):
            c.h2.send_headers(sid, REQ, end_stream=True)
        await c.until(lambda: c.ended(5))
        assert c.of(h2.events.StreamReset, 5)[0].error_code == 7     # REFUSED_STREAM
        gate.set()
        await c.until(lambda: c.ended(1) and c.ended(3))
        assert sorted(e.stream_id for e in c.of(h2.events.StreamEnded)) == [1, 3]
    await run(handler, client, H2Limits(max_streams=2))


def test_rapid_reset_goaway() -> None:
    trio.run(_test_rapid_reset_goaway)


async def _test_rapid_reset_goaway() -> None:
    async def client(c, conn):
        for i in range(150):
            sid = 2 * i + 1
            c.h2.send_headers(sid, REQ, end_stream=True)
            c.h2.reset_stream(sid, 8)
        await c.until(lambda: c.of(h2.events.ConnectionTerminated))
        assert c.of(h2.events.ConnectionTerminated)[0].error_code == 11
    conn = await run(echo, client, H2Limits(max_requests=10000))
    assert conn.error == "rapid reset"


def test_max_requests_and_graceful_shutdown() -> None:
    trio.run(_test_max_requests_and_graceful_shutdown)


async def _test_max_requests_and_graceful_shutdown() -> None:
    gate = trio.Event()

    async def handler(s):
        await gate.wait()
        await s.send_head(200, [], end=True)

    async def client(c, conn):
        c.h2.send_headers(1, REQ, end_stream=True)
        await c.until(lambda: conn.active == 1 or c.events and conn.active == 1)
        conn.shutdown()
        await c.until(lambda: len(c.of(h2.events.ConnectionTerminated)) >= 1)
        gate.set()
        await c.until(lambda: c.ended(1))
        assert c.of(h2.events.StreamEnded, 1)
    await run(handler, client)


@pytest.mark.parametrize("text, http2, tls", [
    ("listen on 127.0.0.1 port 80 http2", True, False),
    ("listen on 127.0.0.1 tls port 443 http2", True, True),
    ("listen on 127.0.0.1 port 80", False, False),
])
def test_listen_http2_keyword(text, http2, tls) -> None:
    extra = 'tls { certificate "/c"\nkey "/k" }' if tls else ""
    conf = parse.load("t.conf", text=f'server "s" {{\n{text}\n{extra}\n}}\n')
    lis = conf.servers[0].listens[0]
    assert (lis.http2, lis.tls) == (http2, tls)


def test_max_streams_knob() -> None:
    conf = parse.load("t.conf", text='server "s" {\nlisten on 127.0.0.1 port 80 http2\n'
                                     'connection max streams 8\n}\n')
    assert conf.servers[0].connection.max_streams == 8
    with pytest.raises(Exception):
        parse.load("t.conf", text='server "s" {\nlisten on 127.0.0.1 port 80\n'
                                  'connection max streams 0\n}\n')


def test_limits_validated() -> None:
    with pytest.raises(ValueError):
        H2Limits(max_streams=0)
