"""Unit tests for httpd.fcgi, the sans-I/O FastCGI client codec.

Everything is bytes in, records out, except test_flup_interop, which talks
to a real flup FastCGI server over a UNIX socket using only the codec.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from httpd import fcgi
from httpd.fcgi import CgiHead, CgiHeaderParser, FcgiError, Record, RecordReader


def header(rtype: int, clen: int, plen: int = 0, request_id: int = 1,
           version: int = 1) -> bytes:
    return struct.pack("!BBHHBx", version, rtype, request_id, clen, plen)


def split_records(data: bytes) -> list[tuple[int, int, int, bytes, bytes]]:
    """Independent decoder for checking the encoder: (type, id, clen, content, padding)."""
    out = []
    pos = 0
    while pos < len(data):
        version, rtype, rid, clen, plen = struct.unpack_from("!BBHHBx", data, pos)
        assert version == 1
        pos += 8
        out.append((rtype, rid, clen, data[pos:pos + clen], data[pos + clen:pos + clen + plen]))
        pos += clen + plen
    assert pos == len(data)
    return out


def feed_bytewise(reader: RecordReader, data: bytes) -> list[Record]:
    out = []
    for i in range(len(data)):
        out += reader.feed(data[i:i + 1])
    return out


def params_stream(records: list[Record]) -> bytes:
    """Join PARAMS contents up to the empty terminator, which must be last."""
    assert all(r.type == fcgi.PARAMS for r in records)
    assert records[-1].content == b""
    assert all(r.content for r in records[:-1])
    return b"".join(r.content for r in records)


# -- constants and fixed records -------------------------------------------

def test_constants() -> None:
    assert fcgi.FCGI_VERSION_1 == 1
    assert (fcgi.BEGIN_REQUEST, fcgi.ABORT_REQUEST, fcgi.END_REQUEST, fcgi.PARAMS,
            fcgi.STDIN, fcgi.STDOUT, fcgi.STDERR, fcgi.DATA, fcgi.GET_VALUES,
            fcgi.GET_VALUES_RESULT, fcgi.UNKNOWN_TYPE) == tuple(range(1, 12))
    assert fcgi.RESPONDER == 1 and fcgi.FCGI_KEEP_CONN == 1
    assert fcgi.MAX_CONTENT == 65535
    assert issubclass(FcgiError, ValueError)


def test_begin_request_bytes() -> None:
    assert fcgi.begin_request() == (b"\x01\x01\x00\x01\x00\x08\x00\x00"
                                    b"\x00\x01\x00\x00\x00\x00\x00\x00")
    assert fcgi.begin_request(258, keep_conn=True) == (b"\x01\x01\x01\x02\x00\x08\x00\x00"
                                                      b"\x00\x01\x01\x00\x00\x00\x00\x00")
    assert fcgi.begin_request(role=fcgi.AUTHORIZER)[8:10] == b"\x00\x02"


def test_abort_request_bytes() -> None:
    assert fcgi.abort_request() == b"\x01\x02\x00\x01\x00\x00\x00\x00"
    assert fcgi.abort_request(5) == b"\x01\x02\x00\x05\x00\x00\x00\x00"


def test_request_id_out_of_range() -> None:
    with pytest.raises(ValueError):
        fcgi.encode(fcgi.STDIN, b"x", request_id=65536)


# -- encode: padding and splitting -----------------------------------------

@pytest.mark.parametrize("n", range(0, 18))
def test_encode_pads_to_multiple_of_8(n: int) -> None:
    data = fcgi.encode(fcgi.STDIN, b"a" * n, request_id=3)
    assert len(data) % 8 == 0
    [(rtype, rid, clen, content, padding)] = split_records(data)
    assert (rtype, rid, clen, content) == (fcgi.STDIN, 3, n, b"a" * n)
    assert padding == bytes(-n & 7)


def test_empty_content_is_one_terminator_record() -> None:
    assert fcgi.encode(fcgi.STDOUT, b"") == b"\x01\x06\x00\x01\x00\x00\x00\x00"
    assert fcgi.stdin(b"") == b"\x01\x05\x00\x01\x00\x00\x00\x00"
    assert RecordReader().feed(fcgi.stdin(b"", 9)) == [Record(fcgi.STDIN, 9, b"")]


def test_record_exactly_max_content() -> None:
    data = fcgi.encode(fcgi.STDIN, b"x" * 65535)
    recs = split_records(data)
    assert [(r[2], len(r[4])) for r in recs] == [(65535, 1)]
    assert RecordReader().feed(data) == [Record(fcgi.STDIN, 1, b"x" * 65535)]


def test_record_one_over_max_content_splits() -> None:
    content = bytes(range(256)) * 256  # 65536 bytes, not all the same
    data = fcgi.encode(fcgi.STDIN, content)
    recs = split_records(data)
    assert [(r[2], len(r[4])) for r in recs] == [(65535, 1), (1, 7)]
    got = RecordReader().feed(data)
    assert [len(r.content) for r in got] == [65535, 1]
    assert b"".join(r.content for r in got) == content


def test_large_content_splits_into_full_records() -> None:
    content = os.urandom(65535 * 3 + 10)
    recs = split_records(fcgi.stdin(content))
    assert [r[2] for r in recs] == [65535, 65535, 65535, 10]
    assert b"".join(r[3] for r in recs) == content


# -- RecordReader ------------------------------------------------------------

def mixed_stream() -> tuple[bytes, list[Record]]:
    expect = [
        Record(fcgi.STDOUT, 1, b"Content-Type: text/plain\r\n\r\n"),
        Record(fcgi.STDERR, 1, b"warning: x\n"),
        Record(fcgi.STDOUT, 1, b"hello"),
        Record(fcgi.STDOUT, 1, b"y" * 65535),
        Record(fcgi.STDOUT, 1, b"z"),
        Record(fcgi.STDERR, 1, b""),
        Record(fcgi.STDOUT, 1, b""),
        Record(fcgi.END_REQUEST, 1, struct.pack("!IB3x", 0, fcgi.REQUEST_COMPLETE)),
    ]
    data = b"".join(fcgi.encode(r.type, r.content, r.request_id) for r in expect)
    return data, expect


def test_reader_round_trip_all_at_once() -> None:
    data, expect = mixed_stream()
    reader = RecordReader()
    assert reader.feed(data) == expect
    reader.eof()


def test_reader_round_trip_byte_by_byte() -> None:
    data, expect = mixed_stream()
    reader = RecordReader()
    assert feed_bytewise(reader, data) == expect
    reader.eof()


@pytest.mark.parametrize("chunk", [3, 7, 8, 9, 1000, 65543])
def test_reader_round_trip_odd_chunks(chunk: int) -> None:
    data, expect = mixed_stream()
    reader = RecordReader()
    got = []
    for i in range(0, len(data), chunk):
        got += reader.feed(data[i:i + chunk])
    assert got == expect


def test_reader_skips_padding_up_to_255() -> None:
    data = (header(fcgi.STDOUT, 3, 255, request_id=4) + b"abc" + b"\xff" * 255
            + header(fcgi.STDOUT, 0, 0, request_id=4))
    reader = RecordReader()
    assert reader.feed(data) == [Record(fcgi.STDOUT, 4, b"abc"), Record(fcgi.STDOUT, 4, b"")]
    # Byte by byte: nothing comes out while only padding is missing.
    reader = RecordReader()
    out = [reader.feed(data[i:i + 1]) for i in range(len(data))]
    last_pad = 8 + 3 + 255 - 1
    assert out[last_pad - 1] == []
    assert out[last_pad] == [Record(fcgi.STDOUT, 4, b"abc")]
    assert sum(out, []) == [Record(fcgi.STDOUT, 4, b"abc"), Record(fcgi.STDOUT, 4, b"")]


def test_reader_ignores_reserved_byte() -> None:
    data = bytearray(fcgi.encode(fcgi.STDOUT, b"ok"))
    data[7] = 0xAA
    assert RecordReader().feed(bytes(data)) == [Record(fcgi.STDOUT, 1, b"ok")]


def test_reader_returns_complete_records_and_keeps_partial() -> None:
    one = fcgi.encode(fcgi.STDOUT, b"first")
    two = fcgi.encode(fcgi.STDERR, b"second")
    reader = RecordReader()
    assert reader.feed(one + two[:5]) == [Record(fcgi.STDOUT, 1, b"first")]
    assert reader.feed(two[5:11]) == []
    assert reader.feed(two[11:]) == [Record(fcgi.STDERR, 1, b"second")]
    reader.eof()


def test_stdout_stderr_interleaving() -> None:
    data = b"".join([
        fcgi.encode(fcgi.STDOUT, b"Status: 200\r\n"),
        fcgi.encode(fcgi.STDERR, b"log 1"),
        fcgi.encode(fcgi.STDOUT, b"\r\nbody-1 "),
        fcgi.encode(fcgi.STDERR, b"log 2"),
        fcgi.encode(fcgi.STDOUT, b"body-2"),
        fcgi.encode(fcgi.STDERR, b""),
        fcgi.encode(fcgi.STDOUT, b""),
        fcgi.encode(fcgi.END_REQUEST, struct.pack("!IB3x", 0, 0)),
    ])
    recs = feed_bytewise(RecordReader(), data)
    assert [r.type for r in recs] == [6, 7, 6, 7, 6, 7, 6, 3]
    stdout = b"".join(r.content for r in recs if r.type == fcgi.STDOUT)
    stderr = [r.content for r in recs if r.type == fcgi.STDERR]
    assert stdout == b"Status: 200\r\n\r\nbody-1 body-2"
    assert stderr == [b"log 1", b"log 2", b""]
    head, body = CgiHeaderParser().feed(stdout)
    assert head == CgiHead(200, None, []) and body == b"body-1 body-2"


@pytest.mark.parametrize("version", [0, 2, 0x48])   # 0x48: 'H', an HTTP reply
def test_reader_bad_version(version: int) -> None:
    with pytest.raises(FcgiError, match="version"):
        RecordReader().feed(header(fcgi.STDOUT, 0, version=version))


def test_reader_bad_version_after_good_record() -> None:
    reader = RecordReader()
    with pytest.raises(FcgiError):
        reader.feed(fcgi.encode(fcgi.STDOUT, b"ok") + b"HTTP/1.1 200 OK\r\n")


def test_reader_bad_version_detected_before_whole_record() -> None:
    # The header alone is enough to know; do not wait for 65535 bytes.
    with pytest.raises(FcgiError):
        RecordReader().feed(header(fcgi.STDOUT, 65535, version=9))


@pytest.mark.parametrize("clen", [0, 7, 9, 100])
def test_reader_impossible_end_request_length(clen: int) -> None:
    with pytest.raises(FcgiError):
        RecordReader().feed(header(fcgi.END_REQUEST, clen) + bytes(clen))


def test_reader_truncated() -> None:
    data = fcgi.encode(fcgi.STDOUT, b"hello world")
    for cut in (1, 7, 8, 12, len(data) - 1):
        reader = RecordReader()
        assert reader.feed(data[:cut]) == []
        with pytest.raises(FcgiError, match="closed inside a record"):
            reader.eof()
    reader = RecordReader()
    reader.feed(data)
    reader.eof()                  # a clean boundary is fine
    RecordReader().eof()          # so is no data at all


# -- END_REQUEST -------------------------------------------------------------

def test_decode_end_request() -> None:
    body = struct.pack("!IB3x", 0x01020304, fcgi.OVERLOADED)
    [rec] = RecordReader().feed(fcgi.encode(fcgi.END_REQUEST, body, 2))
    assert rec.request_id == 2
    assert fcgi.decode_end_request(rec.content) == (0x01020304, fcgi.OVERLOADED)
    assert fcgi.decode_end_request(bytes(8)) == (0, fcgi.REQUEST_COMPLETE)


@pytest.mark.parametrize("n", [0, 7, 9])
def test_decode_end_request_wrong_size(n: int) -> None:
    with pytest.raises(FcgiError):
        fcgi.decode_end_request(bytes(n))


# -- PARAMS --------------------------------------------------------------------

def test_params_short_lengths_exact_bytes() -> None:
    data = fcgi.encode_params([("A", "bc")])
    assert data == (header(fcgi.PARAMS, 5, 3) + b"\x01\x02Abc" + bytes(3)
                    + header(fcgi.PARAMS, 0))


@pytest.mark.parametrize("nlen, prefix", [
    (127, b"\x7f"),
    (128, b"\x80\x00\x00\x80"),
    (300, b"\x80\x00\x01\x2c"),
])
def test_params_name_length_encoding(nlen: int, prefix: bytes) -> None:
    name = "N" * nlen
    data = fcgi.encode_params([(name, "v")])
    recs = RecordReader().feed(data)
    content = recs[0].content
    assert content.startswith(prefix + b"\x01" + name.encode())
    assert fcgi.decode_params(params_stream(recs)) == [(name.encode(), b"v")]


def test_params_value_length_encoding() -> None:
    recs = RecordReader().feed(fcgi.encode_params([("K", "v" * 128)]))
    assert recs[0].content[:6] == b"\x01\x80\x00\x00\x80K"


def test_params_huge_value_spans_records() -> None:
    big = os.urandom(70000)
    pairs = [(b"BEFORE", b"1"), (b"HUGE", big), (b"AFTER", b"2")]
    data = fcgi.encode_params(pairs, request_id=7)
    recs = RecordReader().feed(data)
    assert len(recs) >= 3 and all(r.request_id == 7 for r in recs)
    assert all(len(r.content) <= fcgi.MAX_CONTENT for r in recs)
    stream = params_stream(recs)
    assert b"\x04\x80\x01\x11\x70HUGE" in stream          # 70000 = 0x11170
    assert fcgi.decode_params(stream) == pairs
    assert feed_bytewise(RecordReader(), data) == recs


def test_params_many_pairs_packed_whole_into_records() -> None:
    pairs = [(f"HTTP_X_{i}", "v" * 1000) for i in range(200)]   # ~200 KB
    recs = RecordReader().feed(fcgi.encode_params(pairs))
    assert len(recs) >= 4
    assert all(len(r.content) <= fcgi.MAX_CONTENT for r in recs)
    # Every record decodes on its own: no pair is cut in two (flup needs that).
    per_record = [p for r in recs[:-1] for p in fcgi.decode_params(r.content)]
    expect = [(n.encode(), v.encode()) for n, v in pairs]
    assert per_record == expect
    assert fcgi.decode_params(params_stream(recs)) == expect


def test_params_record_filled_to_exactly_max() -> None:
    # One pair of exactly 65535 encoded bytes: 1 + 4 + 10 + 65520.
    pairs = [("X" * 10, "v" * 65520), ("Y", "z")]
    recs = RecordReader().feed(fcgi.encode_params(pairs))
    assert [len(r.content) for r in recs] == [65535, 4, 0]


def test_params_str_and_bytes_latin1() -> None:
    pairs = [("NAME", "caf\xe9"), (b"RAW", b"\xff\x00"), ("EMPTY", "")]
    recs = RecordReader().feed(fcgi.encode_params(pairs))
    assert fcgi.decode_params(params_stream(recs)) == [
        (b"NAME", b"caf\xe9"), (b"RAW", b"\xff\x00"), (b"EMPTY", b"")]


def test_params_empty_is_just_terminator() -> None:
    assert fcgi.encode_params([]) == header(fcgi.PARAMS, 0)
    assert fcgi.encode_params([], request_id=3) == header(fcgi.PARAMS, 0, request_id=3)


@pytest.mark.parametrize("content", [
    b"\x05",                       # value length missing
    b"\x80\x00\x01",               # 4-byte length cut short
    b"\x05\x05abc",                # name and value cut short
    b"\x01\x01ab\x01",             # second pair truncated
])
def test_decode_params_truncated(content: bytes) -> None:
    with pytest.raises(FcgiError):
        fcgi.decode_params(content)


# -- CGI headers -------------------------------------------------------------

def parse(data: bytes) -> tuple[CgiHead | None, bytes]:
    return CgiHeaderParser().feed(data)


def test_cgi_basic_headers_order_and_case() -> None:
    head, body = parse(b"Content-Type: text/html\r\nX-Mixed-CASE:  a b \t\r\n"
                       b"Set-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n<html>")
    assert head == CgiHead(200, None, [("Content-Type", "text/html"), ("X-Mixed-CASE", "a b"),
                                       ("Set-Cookie", "a=1"), ("set-cookie", "b=2")])
    assert body == b"<html>"


@pytest.mark.parametrize("line, status, reason", [
    (b"Status: 404 Not Found", 404, "Not Found"),
    (b"Status: 404", 404, None),
    (b"status:500 Internal  Server Error ", 500, "Internal  Server Error"),
    (b"STATUS: 302\tFound", 302, "Found"),
    (b"Status: 599 Custom", 599, "Custom"),
    (b"Status: abc", 200, None),
    (b"Status: 4040 Nope", 200, None),
    (b"Status: 99", 200, None),
    (b"Status: 600 Too High", 200, None),
    (b"Status: 100 Continue", 200, None),
    (b"Status: 404Nope", 200, None),
    (b"Status:", 200, None),
])
def test_cgi_status(line: bytes, status: int, reason: str | None) -> None:
    head, body = parse(line + b"\r\nContent-Type: text/plain\r\n\r\n")
    assert head is not None
    assert (head.status, head.reason) == (status, reason)
    assert head.headers == [("Content-Type", "text/plain")]     # Status removed
    assert body == b""


def test_cgi_lf_only() -> None:
    head, body = parse(b"Status: 201 Created\nContent-Type: a/b\n\nline1\nline2\n")
    assert head == CgiHead(201, "Created", [("Content-Type", "a/b")])
    assert body == b"line1\nline2\n"


@pytest.mark.parametrize("block", [
    b"A: 1\r\nB: 2\n\n",
    b"A: 1\nB: 2\r\n\r\n",
    b"A: 1\r\nB: 2\r\n\n",
    b"A: 1\nB: 2\n\r\n",
])
def test_cgi_mixed_line_endings(block: bytes) -> None:
    head, body = parse(block + b"\r\nbody")
    assert head == CgiHead(200, None, [("A", "1"), ("B", "2")])
    assert body == b"\r\nbody"


@pytest.mark.parametrize("start", [b"\r\n", b"\n"])
def test_cgi_empty_header_block(start: bytes) -> None:
    assert parse(start + b"data") == (CgiHead(200, None, []), b"data")


def test_cgi_header_split_across_feeds_byte_by_byte() -> None:
    data = b"Status: 403 Forbidden\r\nContent-Type: text/plain\r\n\r\nno"
    parser = CgiHeaderParser()
    for i in range(data.index(b"\r\n\r\n") + 3):
        assert parser.feed(data[i:i + 1]) == (None, b"")
    head, body = parser.feed(data[data.index(b"\r\n\r\n") + 3:])
    assert head == CgiHead(403, "Forbidden", [("Content-Type", "text/plain")])
    assert body == b"no"


@pytest.mark.parametrize("cut", range(1, 8))
def test_cgi_terminator_split_anywhere(cut: int) -> None:
    data = b"A: 1\r\n\r\nbody"          # the block ends at byte 8
    parser = CgiHeaderParser()
    assert parser.feed(data[:cut]) == (None, b"")
    head, body = parser.feed(data[cut:])
    assert head == CgiHead(200, None, [("A", "1")]) and body == b"body"


def test_cgi_body_after_headers_in_same_feed() -> None:
    body = b"\r\n\r\nbinary\x00\xff" * 100      # blank lines in the body are body
    head, rest = parse(b"Content-Type: application/octet-stream\r\n\r\n" + body)
    assert head is not None and rest == body


def test_cgi_location_gives_302() -> None:
    head, _ = parse(b"Location: http://example.com/x\r\n\r\n")
    assert head == CgiHead(302, None, [("Location", "http://example.com/x")])


def test_cgi_local_location_also_302() -> None:
    head, _ = parse(b"Location: /local/path\r\n\r\n")
    assert head is not None and head.status == 302


def test_cgi_location_with_status_keeps_status() -> None:
    head, _ = parse(b"Location: /moved\r\nStatus: 301 Moved Permanently\r\n\r\n")
    assert head == CgiHead(301, "Moved Permanently", [("Location", "/moved")])


@pytest.mark.parametrize("line", [
    b"NoColonHere",
    b" continued: folded",
    b": empty name",
    b"Bad Name: x",
    b"X-Evil: a\rInjected: b",
    b"X-Nul: a\x00b",
])
def test_cgi_malformed_line(line: bytes) -> None:
    with pytest.raises(FcgiError):
        parse(b"Content-Type: text/plain\r\n" + line + b"\r\n\r\n")


def test_cgi_missing_colon_message() -> None:
    with pytest.raises(FcgiError, match="without ':'"):
        parse(b"HTTP/1.1 200 OK\r\n\r\n")


def test_cgi_oversize_without_terminator() -> None:
    parser = CgiHeaderParser()
    line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    with pytest.raises(FcgiError, match="too large"):
        for _ in range(100):
            assert parser.feed(line) == (None, b"")


def test_cgi_oversize_with_terminator_in_one_feed() -> None:
    with pytest.raises(FcgiError, match="too large"):
        parse(b"X-Big: " + b"b" * 70000 + b"\r\n\r\nbody")


def test_cgi_block_just_under_limit() -> None:
    value = b"v" * (fcgi.CGI_HEADER_MAX - len(b"X: \r\n\r\n"))
    head, body = parse(b"X: " + value + b"\r\n\r\n" + b"b" * 100000)
    assert head is not None and head.headers == [("X", value.decode())]
    assert len(body) == 100000


def test_cgi_obs_text_value_is_latin1() -> None:
    head, _ = parse(b"X-Name: caf\xe9\r\n\r\n")
    assert head is not None and head.headers == [("X-Name", "caf\xe9")]


# -- interoperability with flup -------------------------------------------

FLUP_APP = textwrap.dedent("""
    import json, sys
    from flup.server.fcgi import WSGIServer

    def app(environ, start_response):
        n = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(n)
        environ["wsgi.errors"].write("echo: %d bytes\\n" % len(body))
        environ["wsgi.errors"].flush()
        cgi = {k: v for k, v in environ.items() if isinstance(v, str)}
        start_response("201 Created", [("Content-Type", "application/json"),
                                       ("X-Echo", "yes")])
        return [json.dumps({"environ": cgi}).encode(), b"\\n", body]

    WSGIServer(app, bindAddress=sys.argv[1]).run()
""")


@pytest.fixture
def flup_socket(tmp_path):
    path = str(tmp_path / "flup.sock")
    proc = subprocess.Popen([sys.executable, "-c", FLUP_APP, path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flup exited: {proc.stderr.read().decode(errors='replace')}")
            if os.path.exists(path):
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(path)
                    break
                except OSError:
                    pass
                finally:
                    probe.close()
            if time.monotonic() > deadline:
                pytest.fail("flup did not start listening")
            time.sleep(0.05)
        yield path
    finally:
        proc.terminate()              # flup stops its accept loop on SIGTERM
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_flup_interop(flup_socket: str) -> None:
    body = b"a=1&b=" + bytes(range(256)) * 400          # > 65535: several STDIN records
    long_value = "L" * 300
    params = [
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("REQUEST_METHOD", "POST"),
        ("SCRIPT_NAME", "/echo"),
        ("PATH_INFO", "/extra"),
        ("QUERY_STRING", "q=1"),
        ("REQUEST_URI", "/echo/extra?q=1"),
        ("CONTENT_TYPE", "application/octet-stream"),
        ("CONTENT_LENGTH", str(len(body))),
        ("SERVER_NAME", "www.example.com"),
        ("SERVER_PORT", "80"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REMOTE_ADDR", "192.0.2.1"),
        ("HTTP_X_LONG", long_value),                     # 4-byte value length
        ("HTTP_" + "N" * 200, "long-name"),              # 4-byte name length
    ]
    # Enough filler to need several PARAMS records.
    params += [(f"HTTP_X_FILL_{i}", "f" * 5000) for i in range(30)]

    request = (fcgi.begin_request() + fcgi.encode_params(params)
               + fcgi.stdin(body) + fcgi.stdin(b""))

    reader = RecordReader()
    parser = CgiHeaderParser()
    head: CgiHead | None = None
    out = bytearray()
    stderr = bytearray()
    end: tuple[int, int] | None = None
    stdout_closed = False
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(flup_socket)
        s.sendall(request)
        while end is None:
            data = s.recv(65536)
            if not data:
                break
            for rec in reader.feed(data):
                assert rec.request_id == 1
                if rec.type == fcgi.STDOUT:
                    if not rec.content:
                        stdout_closed = True
                    elif head is None:
                        head, rest = parser.feed(rec.content)
                        out += rest
                    else:
                        out += rec.content
                elif rec.type == fcgi.STDERR:
                    stderr += rec.content
                elif rec.type == fcgi.END_REQUEST:
                    end = fcgi.decode_end_request(rec.content)
        reader.eof()

    assert end == (0, fcgi.REQUEST_COMPLETE)
    assert stdout_closed
    assert head is not None
    assert head.status == 201 and head.reason == "Created"
    assert ("Content-Type", "application/json") in head.headers
    assert ("X-Echo", "yes") in head.headers
    assert not any(k.lower() == "status" for k, _ in head.headers)
    assert stderr == b"echo: %d bytes\n" % len(body)

    first, _, echoed = bytes(out).partition(b"\n")
    assert echoed == body
    env = json.loads(first)["environ"]
    for name, value in params:
        assert env[name] == value


@pytest.mark.parametrize("content", [
    b"Content-Type: text/plain\r\n\r\nbody", b"\r\nbody", b"\nbody", b"X: 1\nY: 2\n\nbb",
    b"X: 1\r\n\nb", b"Status: 404 Nope\r\nX: y\r\n\r\n", b"\r\n", b"\n", b"X: 1",
    b"no colon\r\n\r\n", b"X: a\x01b\r\n\r\n", b"X: " + b"y" * 70000 + b"\r\n\r\n",
])
def test_split_head_answers_as_the_parser(content: bytes) -> None:
    """split_head() (whole STDOUT at once) agrees with CgiHeaderParser.feed."""
    def parser():
        try:
            return CgiHeaderParser().feed(content)
        except FcgiError as e:
            return str(e)

    def whole():
        try:
            return fcgi.split_head(content) or (None, b"")
        except FcgiError as e:
            return str(e)

    assert whole() == parser()
