"""engine.chunked and engine.http1's passthrough mode (relayd): chunk sizes
as received, bare LF line ends, strictness, and errors queued behind the
requests parsed before them."""

from __future__ import annotations

import pytest
import trio

from engine.chunked import ChunkedReader, ChunkError, Framing
from engine.http1 import ClientConn, HttpError, Response, ServerConn


def feed_all(data: bytes, step: int | None = None) -> tuple[list[bytes], bytes]:
    r = ChunkedReader()
    out: list[bytes] = []
    rest = b""
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for p in pieces:
        ev, rest = r.feed(p)
        out += ev
        if r.done:
            break
    return out, rest


def wire(events: list[bytes]) -> bytes:
    return b"".join(events)


def payload(events: list[bytes]) -> bytes:
    return b"".join(e for e in events if type(e) is not Framing)


BODY = b"5\r\nhello\r\n7;ext=1;q=\"a b\"\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\nNEXT"


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_sizes_extensions_trailer_as_received(step):
    ev, rest = feed_all(BODY, step)
    assert wire(ev) == BODY[:-4]
    assert payload(ev) == b"hello, world"
    if step is None:
        assert rest == b"NEXT"


def test_bare_lf_lines_written_with_crlf():
    ev, rest = feed_all(b"3\nabc\n0\nX: y\n\nrest")
    assert wire(ev) == b"3\r\nabc\r\n0\r\nX: y\r\n\r\n"
    assert rest == b"rest"


def test_data_streams_a_byte_at_a_time():
    r = ChunkedReader()
    ev, _ = r.feed(b"4\r\n")
    assert ev == [b"4\r\n"] and type(ev[0]) is Framing
    for c in b"abcd":
        ev, _ = r.feed(bytes([c]))
        assert ev == [bytes([c])] and type(ev[0]) is bytes


@pytest.mark.parametrize("body,reason", [
    (b"3x\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"-3\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"+3\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"0x3\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b" 3\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"3 \r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"3; a=b\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"3;a=\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"3;=b\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"3;a=\"\x01\"\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"3\rabc\r\n0\r\n\r\n", "invalid chunk size"),            # lone CR
    (b"3\r\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
    (b"3\r\nabcdef\r\n0\r\n\r\n", "invalid chunk size"),       # data longer than its size
    (b"3\nabcd\n0\n\n", "invalid chunk size"),                 # LF-only, wrong size
    (b"5\nabc\n0\n\n", "invalid chunk size"),                  # LF-only, size too big
    (b"3\r\nabc\r\r\n0\r\n\r\n", "invalid chunk size"),
    (b"fffffffffffffffff\r\nabc\r\n", "chunk size too long"),
    (b"8000000000000000\r\nabc\r\n", "chunk size too long"),
    (b"1;" + b"x" * 5000, "chunk size too long"),             # unterminated line
    (b"0\r\nX : y\r\n\r\n", "invalid chunk trailer"),
    (b"0\r\nX: y\r\n z\r\n\r\n", "invalid chunk trailer"),     # obs-fold
    (b"0\r\nX: a\x00b\r\n\r\n", "invalid chunk trailer"),
    (b"0\r\nX: a\rb\r\n\r\n", "invalid chunk size"),
    (b"0\r\nnocolon\r\n\r\n", "invalid chunk trailer"),
])
def test_refused(body, reason):
    with pytest.raises(ChunkError, match=reason):
        feed_all(body)


def test_leading_zeros_and_max_size():
    ev, _ = feed_all(b"0003\r\nabc\r\n0\r\n\r\n")
    assert payload(ev) == b"abc"
    r = ChunkedReader()
    ev, _ = r.feed(b"7fffffffffffffff\r\n")
    assert ev == [b"7fffffffffffffff\r\n"]


# -- engine.http1 passthrough -----------------------------------------------------------
class Feed:
    """A Transport that returns the given pieces, then EOF."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    async def receive(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


async def requests_of(pieces: list[bytes]) -> list:
    conn = ServerConn(Feed(pieces), lenient=True, passthrough=True)
    out: list = []
    try:
        while True:
            req = await conn.next_request()
            if req is None:
                return out
            body = []
            while chunk := await conn.receive_body():
                body.append(chunk)
            out.append((req, b"".join(body)))
    except HttpError as e:
        out.append(e)
        return out


def run(pieces: list[bytes]) -> list:
    return trio.run(requests_of, pieces)


def test_bare_lf_head_and_pipelining():
    got = run([b"GET /a HTTP/1.1\nHost: h\nX: 1\n\nPOST /b HTTP/1.1\r\nHost: h\n"
               b"Content-Length: 3\n\nabcGET /c HTTP/1.1\nHost: h\n\n"])
    assert [(r.method, r.target, b) for r, b in got] == [
        ("GET", "/a", b""), ("POST", "/b", b"abc"), ("GET", "/c", b"")]
    assert got[0][0].headers == [("Host", "h"), ("X", "1")]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_chunked_request_split_anywhere(step):
    raw = (b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;x=y\r\nabc\n0\nT: 1\n\n"
           b"GET /b HTTP/1.1\nHost: h\n\n")
    got = run([raw[i:i + step] for i in range(0, len(raw), step)])
    assert [(r.target) for r, _ in got] == ["/a", "/b"]
    assert got[0][1] == b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"


def test_error_after_good_requests_is_queued():
    got = run([b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
               b"GET /c HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"])
    assert [r.target for r, _ in got[:2]] == ["/a", "/b"]
    assert isinstance(got[2], HttpError) and got[2].status == 400


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
    b"GET / HTTP/1.1\rHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\r\n",
    b"GET / HTTP/1.1\nHost: h\nContent-Length: 1\nTransfer-Encoding: chunked\n\n0\n\n",
    b"POST / HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n3\nabcd\n0\n\n",
])
def test_smuggling_stays_refused(raw):
    got = run([raw])
    assert len(got) == 1 and isinstance(got[0], HttpError) and got[0].status == 400


def test_bodiless_request_bytes_are_the_next_request():
    got = run([b"POST /a HTTP/1.1\nHost: h\n\nGET /b HTTP/1.1\nHost: h\n\n"])
    assert [(r.target, b) for r, b in got] == [("/a", b""), ("/b", b"")]


async def responses_of(pieces: list[bytes], method: str = "GET") -> list:
    conn = ClientConn(Feed(pieces), passthrough=True)
    conn.expect(method)
    resp = await conn.read_response()
    body = []
    try:
        while chunk := await conn.receive_body():
            body.append(chunk)
    except HttpError as e:
        return [resp, body, e]
    return [resp, body]


def test_response_bare_lf_chunked_byte_at_a_time():
    raw = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n4\nwxyz\n0\n\n"
    resp, body = trio.run(responses_of, [raw[i:i + 1] for i in range(len(raw))])
    assert isinstance(resp, Response) and resp.chunked
    assert b"".join(body) == b"4\r\nwxyz\r\n0\r\n\r\n"
    assert [b for b in body if type(b) is bytes] == [b"w", b"x", b"y", b"z"]


def test_response_until_close_and_truncated_chunked():
    resp, body = trio.run(responses_of, [b"HTTP/1.0 200 OK\n\nabc", b"def"])
    assert resp.content_length is None and b"".join(body) == b"abcdef"
    resp, body, err = trio.run(responses_of, [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
                                              b"\r\n\r\n5\r\nab"])
    assert err.msg == "body truncated"


def test_head_response_then_next_parser():
    resp, body = trio.run(responses_of, [b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"], "HEAD")
    assert resp.content_length == 9 and body == []


def test_httpd_mode_is_unchanged():
    async def main():
        conn = ServerConn(Feed([b"GET / HTTP/1.1\nHost: h\n\n"]), lenient=True)
        with pytest.raises(HttpError):
            await conn.next_request()
    trio.run(main)


def test_crlf_split_across_reads_is_no_bare_lf():
    got = run([b"GET /a HTTP/1.1\r", b"\nHost: h\r", b"\n\r", b"\n"])
    assert [r.target for r, _ in got] == ["/a"]
    got = run([b"GET /a HTTP/1.1\r\nHost: h\r", b"X: y\r\n\r\n"])
    assert len(got) == 1 and isinstance(got[0], HttpError)


def test_many_pipelined_requests_in_one_read():
    got = run([b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n" * 3000 + b"GET /y HTTP/1.1\nHost: h\n\n" * 10])
    assert len(got) == 3010 and got[-1][0].target == "/y"


# -- engine.http1, httpd's reading: lines end at CRLF only --------------------------------
async def httpd_request(pieces: list[bytes]):
    conn = ServerConn(Feed(pieces), lenient=True, httpd_rules=True)
    try:
        return await conn.next_request()
    except HttpError as e:
        return e


@pytest.mark.parametrize("step", [None, 1, 2, 3, 5, 7])
def test_httpd_bare_lf_in_a_header_value_is_part_of_it(step):
    raw = (b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: regress\t\n\nGET / HTTP/1.0\r\n"
           b"X-B: b\r\n\r\n")
    pieces = [raw] if step is None else [raw[i:i + step] for i in range(0, len(raw), step)]
    req = trio.run(httpd_request, pieces)
    if step is None:
        assert not isinstance(req, HttpError)
        assert req.hmap["user-agent"] == "regress\t\n\nGET / HTTP/1.0"
        assert req.hmap["x-b"] == "b"
    # split reads: never another value; at worst refused or waiting for a
    # CRLF (a bare LF alone at the start of a read is taken for a CRLF's end)
    elif req is not None and not isinstance(req, HttpError):
        assert req.hmap["user-agent"] == "regress\t\n\nGET / HTTP/1.0"


def test_httpd_escaped_control_characters_still_refused():
    for raw in (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\nc\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01nb\nc\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7f\nc\r\n\r\n"):
        assert isinstance(trio.run(httpd_request, [raw]), HttpError)
