"""bench/robust.py's parsing and its HTTP client, without daemons: the
slowhttptest CSV and summary, wrk's error counts as the section reads
them (bench.parse_wrk), one keep-alive GET against a tiny server.  The
section itself runs in `make bench` / `bench.py --smoke --robust-only`
(about 45 s: too long for the test suite)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench  # noqa: E402
import robust  # noqa: E402

# As slowhttptest 1.8.2 writes it (-g -o PREFIX): "Service Available" is
# 0 while its own probe gets no answer.
CSV = """Seconds,Closed,Pending,Connected,Service Available
0,0,1,0,1000
1,0,1,195,1000
2,3,10,990,0
3,3,0,997,1000
"""


def test_slowhttptest_csv():
    r = robust.parse_slowhttptest_csv(CSV)
    assert r["max_connected"] == 997 and r["samples"] == 4 and r["unavailable_s"] == 1
    assert r["last"]["closed"] == "3"
    assert robust.parse_slowhttptest_csv("")["max_connected"] == 0


def test_slowhttptest_exit_status_without_colours():
    out = "\x1b[0;32mExit status: \x1b[1;32mHit test time limit\x1b[0m\n"
    assert robust.parse_slowhttptest_out(out)["exit_status"] == "Hit test time limit"


WRK = """Running 14s test @ http://127.0.0.1:28001/1k.bin
  1 threads and 50 connections
  649235 requests in 14.02s, 707.31MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:  46307.41
Transfer/sec:     50.45MB
"""


def test_wrk_errors_as_the_reload_test_counts_them():
    r = bench.parse_wrk(WRK)
    assert r["requests"] == 649235 and sum(r["errors"].values()) == 3 and r["non2xx"] == 3


def test_keep_alive_get_keeps_the_socket():
    srv = socket.create_server(("127.0.0.1", 0))
    body = b"x" * 10

    def serve():
        c, _ = srv.accept()
        with c:
            for _ in range(2):
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += c.recv(1024)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + body)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    addr = srv.getsockname()
    status, s = robust.http_get(addr, "/", 5, keep=True)
    assert status == 200 and s is not None
    status, s2 = robust.http_get(addr, "/", 5, sock=s)      # same connection again
    assert status == 200 and s2 is None
    t.join(5)
    srv.close()
