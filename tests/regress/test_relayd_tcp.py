"""relayd TCP relays, black-box: `python -m relayd -d -f CONF` in front of
threaded raw-socket backends that record what they receive.

Covers the daemon core (flags, -n, signals, reload), TCP relaying (exact
bytes both ways, half-close, bulk data, session timeout, disable, retry),
the scheduling modes and backup tables, protocol tcp options and the
`log connection` session line.  Loopback only; source addresses 127.0.0.x
stand in for different clients.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from tests.conftest import free_port, run_cmd, wait_for

# relay <name>, session <id> (<n> active), <tag|0>, <client> -> <addr>:<port>, <reason>[,<log>]
SESSION_RE = re.compile(r"^relay (?P<relay>\S+), session (?P<id>\d+) \((?P<active>\d+) active\), "
                        r"(?P<tag>\S+), (?P<client>[0-9a-f.:]+) -> (?P<addr>[0-9a-f.:]*):"
                        r"(?P<port>\d+), (?P<reason>[^,]+)(?P<log>,.*)?$")
IP_MINTTL = getattr(socket, "IP_MINTTL", 21)


# -- backends ------------------------------------------------------------------

class Backend:
    """A threaded TCP server; `handler(backend, conn)` runs per connection.

    Counts connections, remembers each peer and the bytes each sent."""

    def __init__(self, handler=None, host: str = "127.0.0.1", port: int = 0,
                 name: str = "", minttl: int | None = None, ttl: int | None = None) -> None:
        self.handler = handler or echo
        self.name = name.encode()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if minttl is not None:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_MINTTL, minttl)
        if ttl is not None:
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.conns = 0
        self.peers: list[str] = []
        self.received: list[bytes] = []
        self.digests: list[str] = []
        self._open: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns += 1
                self.peers.append(peer[0])
                self._open.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(self, conn)
        except OSError:
            pass
        finally:
            conn.close()

    def record(self, data: bytes) -> None:
        with self.lock:
            self.received.append(data)

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            for c in self._open:
                try:
                    c.close()
                except OSError:
                    pass


def echo(b: Backend, conn: socket.socket) -> None:
    got = bytearray()
    while data := conn.recv(262144):
        got += data
        conn.sendall(data)
    b.record(bytes(got))


def hello_echo(b: Backend, conn: socket.socket) -> None:
    """Say the backend's name, then echo."""
    conn.sendall(b.name + b"\n")
    echo(b, conn)


def name_only(b: Backend, conn: socket.socket) -> None:
    conn.sendall(b.name)


def reply_after_eof(b: Backend, conn: socket.socket) -> None:
    got = bytearray()
    while data := conn.recv(65536):
        got += data
    b.record(bytes(got))
    conn.sendall(b"got %d bytes: " % len(got) + hashlib.md5(got).hexdigest().encode())


def md5_echo(b: Backend, conn: socket.socket) -> None:
    h = hashlib.md5()
    while data := conn.recv(1 << 20):
        h.update(data)
        conn.sendall(data)
    with b.lock:
        b.digests.append(h.hexdigest())


def sink(b: Backend, conn: socket.socket) -> None:
    while data := conn.recv(65536):
        b.record(data)


@pytest.fixture
def backends():
    made: list[Backend] = []

    def make(*args, **kw) -> Backend:
        b = Backend(*args, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def backends_on_one_port(make, n: int, handler=name_only) -> list[Backend]:
    """n backends on 127.0.0.1..n, all on the same port (a table's hosts)."""
    for _ in range(20):
        port = free_port()
        made: list[Backend] = []
        try:
            for i in range(1, n + 1):
                made.append(make(handler, host=f"127.0.0.{i}", port=port, name=f"b{i}"))
            return made
        except OSError:
            for b in made:
                b.close()
    raise RuntimeError("no common free port")


# -- clients -------------------------------------------------------------------

def connect(port: int, host: str = "127.0.0.1", src: str | None = None,
            timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(timeout)
    if src:
        s.bind((src, 0))
    s.connect((host, port))
    return s


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    try:
        while data := s.recv(65536):
            out += data
    except ConnectionResetError:
        pass
    return bytes(out)


def read_line(s: socket.socket) -> bytes:
    out = bytearray()
    while not out.endswith(b"\n"):
        data = s.recv(1)
        if not data:
            break
        out += data
    return bytes(out)


def which(port: int, src: str | None = None) -> str:
    """The name the backend behind the relay answers with."""
    with connect(port, src=src) as s:
        return read_all(s).decode()


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = s.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


# -- the daemon ------------------------------------------------------------------

@pytest.fixture
def relayd(daemons, tmp_path):
    """start(conf_text, args=[]) -> Daemon, once its sockets are bound."""
    def start(text: str, args: list[str] | None = None, name: str = "relayd.conf"):
        conf = tmp_path / name
        conf.write_text(text)
        d = daemons("relayd", conf, args=args)
        d.path = conf
        # "startup" comes after every listening socket is bound: connecting
        # now queues in the backlog.  (Probing the port would be a session.)
        wait_for(lambda: "startup" in d.output() or d.proc.poll() is not None,
                 what="relayd startup")
        assert d.proc.poll() is None, d.output()
        return d
    return start


def session_lines(d) -> list[re.Match]:
    return [m for line in d.output().splitlines() if (m := SESSION_RE.match(line))]


def wait_sessions(d, n: int, timeout: float = 10.0) -> list[re.Match]:
    return wait_for(lambda: (lambda ls: ls if len(ls) >= n else None)(session_lines(d)),
                    timeout, f"{n} session log lines in:\n{d.output()}")


def simple_relay(listen: int, target: int, extra: str = "", glob: str = "log connection\n",
                 proto: str = "") -> str:
    return (f"{glob}{proto}relay \"tcp\" {{\n\tlisten on 127.0.0.1 port {listen}\n"
            f"\tforward to 127.0.0.1 port {target}\n{extra}}}\n")


# -- relaying bytes ---------------------------------------------------------------

def test_echo_bytes_exact_both_ways(relayd, backends):
    b = backends(echo)
    rp = free_port()
    d = relayd(simple_relay(rp, b.port))
    payload = bytes(range(256)) * 4096 + os.urandom(100_003)   # binary, odd length
    with connect(rp) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = read_all(s)
        sender.join()
    assert got == payload
    wait_for(lambda: b.received, what="backend record")
    assert b.received == [payload]
    m = wait_sessions(d, 1)[0]
    assert m["relay"] == "tcp" and m["id"] == "1" and m["tag"] == "0"
    assert (m["client"], m["addr"], int(m["port"])) == ("127.0.0.1", "127.0.0.1", b.port)
    assert m["reason"] == "done" and m["log"] is None


def test_half_close_client_still_gets_reply(relayd, backends):
    b = backends(reply_after_eof)
    rp = free_port()
    relayd(simple_relay(rp, b.port))
    data = os.urandom(300_000)
    with connect(rp) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = read_all(s)
    assert reply == b"got 300000 bytes: " + hashlib.md5(data).hexdigest().encode()


def test_half_close_backend_first(relayd, backends):
    """The backend closes its side first; the client can still send."""
    def greet_then_read(b, conn):
        conn.sendall(b"hi")
        conn.shutdown(socket.SHUT_WR)
        sink(b, conn)
    b = backends(greet_then_read)
    rp = free_port()
    relayd(simple_relay(rp, b.port))
    with connect(rp) as s:
        assert recv_exact(s, 2) == b"hi"
        assert s.recv(10) == b""          # EOF passed on
        s.sendall(b"still here")
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.2)
    wait_for(lambda: b"".join(b.received) == b"still here", what="data after half-close")


def stream_chunks(size: int, block: bytes):
    """`size` bytes made of rotations of `block` (cheap, yet not periodic
    in a way a dropped or repeated chunk could hide)."""
    for i in range(size // len(block)):
        k = (i * 4099) % len(block)
        yield block[k:] + block[:k]


def md5_sink_reply(b: Backend, conn: socket.socket) -> None:
    h = hashlib.md5()
    n = 0
    while data := conn.recv(1 << 20):
        h.update(data)
        n += len(data)
    conn.sendall(b"%d %s" % (n, h.hexdigest().encode()))


def md5_source(size: int):
    def handler(b: Backend, conn: socket.socket) -> None:
        h = hashlib.md5()
        for chunk in stream_chunks(size, os.urandom(1 << 20)):
            h.update(chunk)
            conn.sendall(chunk)
        with b.lock:
            b.digests.append(h.hexdigest())
    return handler


def test_one_gib_upload_md5(relayd, backends):
    size = 1 << 30
    b = backends(md5_sink_reply)
    rp = free_port()
    relayd(simple_relay(rp, b.port))
    sent = hashlib.md5()
    with connect(rp, timeout=60) as s:
        for chunk in stream_chunks(size, os.urandom(1 << 20)):
            sent.update(chunk)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = read_all(s)
    assert reply == b"%d %s" % (size, sent.hexdigest().encode())


def test_one_gib_download_md5(relayd, backends):
    size = 1 << 30
    b = backends(md5_source(size))
    rp = free_port()
    relayd(simple_relay(rp, b.port))
    got = hashlib.md5()
    n = 0
    with connect(rp, timeout=60) as s:
        while data := s.recv(1 << 20):
            got.update(data)
            n += len(data)
    assert n == size
    wait_for(lambda: b.digests, what="backend digest")
    assert b.digests == [got.hexdigest()]


def test_bulk_both_ways_no_splice(relayd, backends):
    size = 1 << 27
    b = backends(md5_echo)
    rp = free_port()
    relayd(simple_relay(rp, b.port, extra='\tprotocol "copy"\n',
                        proto='tcp protocol "copy" { tcp no splice }\n'))
    sent, got = hashlib.md5(), hashlib.md5()
    n = 0
    with connect(rp, timeout=60) as s:
        def send() -> None:
            for chunk in stream_chunks(size, os.urandom(1 << 20)):
                sent.update(chunk)
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        while data := s.recv(1 << 20):
            got.update(data)
            n += len(data)
        t.join()
    assert n == size
    wait_for(lambda: b.digests, what="backend digest")
    assert b.digests == [sent.hexdigest()] and got.hexdigest() == sent.hexdigest()


def test_session_timeout_splice(relayd, backends):
    b = backends(echo)
    rp = free_port()
    d = relayd(simple_relay(rp, b.port, extra="\tsession timeout 1\n"))
    with connect(rp) as s:
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
        t0 = time.monotonic()
        assert read_all(s) == b""
        assert time.monotonic() - t0 > 0.8      # not before `session timeout 1`
    assert wait_sessions(d, 1)[0]["reason"] == "splice timeout"


def test_session_timeout_no_splice(relayd, backends):
    b = backends(echo)
    rp = free_port()
    d = relayd(simple_relay(rp, b.port, extra='\tsession timeout 1\n\tprotocol "ns"\n',
                            proto='protocol "ns" { tcp { nodelay, no splice } }\n'))
    with connect(rp) as s:
        t0 = time.monotonic()
        assert read_all(s) == b""
        assert time.monotonic() - t0 > 0.8      # not before `session timeout 1`
    assert wait_sessions(d, 1)[0]["reason"] == "buffer event timeout"


def test_active_sessions_counted(relayd, backends):
    b = backends(echo)
    rp = free_port()
    d = relayd(simple_relay(rp, b.port))
    held = [connect(rp) for _ in range(3)]
    for s in held:
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
    held[0].close()
    m = wait_sessions(d, 1)[0]
    assert m["active"] == "3"
    for s in held[1:]:
        s.close()
    lines = wait_sessions(d, 3)
    assert sorted(int(m["active"]) for m in lines) == [1, 2, 3]
    assert sorted(int(m["id"]) for m in lines) == [1, 2, 3]


def test_disabled_relay_closes_at_once(relayd, backends):
    b = backends(echo)
    rp = free_port()
    d = relayd(simple_relay(rp, b.port, extra="\tdisable\n"))
    with connect(rp) as s:
        try:
            s.sendall(b"hello")
        except OSError:
            pass
        assert read_all(s) == b""           # closed, not the socket timeout
    time.sleep(0.3)
    assert b.conns == 0
    assert session_lines(d) == []      # OpenBSD drops it before a session exists


# -- connecting to backends -----------------------------------------------------

def test_backend_refused_closes_client_and_logs(relayd):
    rp, dead = free_port(), free_port()
    d = relayd(simple_relay(rp, dead))
    with connect(rp) as s:
        assert read_all(s) == b""
    m = wait_sessions(d, 1)[0]
    assert m["reason"] == "session failed"
    assert (m["addr"], int(m["port"])) == ("127.0.0.1", dead)


def test_retry_on_direct_forward(relayd, backends):
    rp, port = free_port(), free_port()
    d = relayd(simple_relay(rp, port).replace(f"port {port}\n", f"port {port} retry 3\n"),
               args=["-vv"])
    with connect(rp) as s:
        time.sleep(0.4)                 # first attempt already refused
        b = backends(echo, port=port)
        s.sendall(b"late")
        assert recv_exact(s, 4) == b"late"
    assert b.conns == 1
    assert "forward failed" in d.output() and "next retry" in d.output()
    assert wait_sessions(d, 1)[0]["reason"] == "done"


def test_retry_exhausted(relayd):
    rp, dead = free_port(), free_port()
    d = relayd(simple_relay(rp, dead).replace(f"port {dead}\n", f"port {dead} retry 1\n"),
               args=["-vv"])
    t0 = time.monotonic()
    with connect(rp) as s:
        assert read_all(s) == b""
    assert time.monotonic() - t0 >= 0.9        # one pause between the two attempts
    assert wait_sessions(d, 1)[0]["reason"] == "session failed"
    assert "last retry" in d.output()


def test_backup_table_when_main_refuses(relayd, backends):
    """Extension: a table whose host cannot be connected to (after the host's
    retries) falls over to the next `forward to <table>` (see relay.py)."""
    b = backends(name_only, name="backup")
    rp, dead = free_port(), free_port()
    d = relayd(f"""log connection
table <main> {{ 127.0.0.1 retry 1 }}
table <spare> {{ 127.0.0.1 }}
relay "fo" {{
\tlisten on 127.0.0.1 port {rp}
\tforward to <main> port {dead}
\tforward to <spare> port {b.port}
}}
""")
    assert which(rp) == "backup"
    m = wait_sessions(d, 1)[0]
    assert (m["addr"], int(m["port"]), m["reason"]) == ("127.0.0.1", b.port, "done")


def test_disabled_table_uses_backup(relayd, backends):
    main = backends(name_only, name="main")
    spare = backends(name_only, name="spare")
    rp = free_port()
    relayd(f"""table <main> disable {{ 127.0.0.1 }}
table <spare> {{ 127.0.0.1 }}
relay "fo" {{
\tlisten on 127.0.0.1 port {rp}
\tforward to <main> port {main.port}
\tforward to <spare> port {spare.port}
}}
""")
    assert [which(rp) for _ in range(3)] == ["spare"] * 3
    assert main.conns == 0


# -- scheduling modes -------------------------------------------------------------

def table_relay(rp: int, port: int, mode: str, n: int = 3) -> str:
    hosts = ", ".join(f"127.0.0.{i}" for i in range(1, n + 1))
    return (f"table <web> {{ {hosts} }}\nrelay \"lb\" {{\n\tlisten on 127.0.0.1 port {rp}\n"
            f"\tforward to <web> port {port} mode {mode}\n}}\n")


def test_roundrobin_even_and_in_order(relayd, backends):
    bs = backends_on_one_port(backends, 3)
    rp = free_port()
    relayd(table_relay(rp, bs[0].port, "roundrobin"))
    seen = [which(rp) for _ in range(300)]
    assert seen[:6] == ["b1", "b2", "b3", "b1", "b2", "b3"]
    assert Counter(seen) == {"b1": 100, "b2": 100, "b3": 100}
    assert [b.conns for b in bs] == [100, 100, 100]


def test_random_touches_all(relayd, backends):
    bs = backends_on_one_port(backends, 3)
    rp = free_port()
    relayd(table_relay(rp, bs[0].port, "random"))
    seen = Counter(which(rp) for _ in range(150))
    assert set(seen) == {"b1", "b2", "b3"}
    assert min(seen.values()) >= 15


@pytest.mark.parametrize("mode", ["source-hash", 'source-hash "a key"', "loadbalance",
                                  "loadbalance 0x00112233445566778899aabbccddeeff"])
def test_client_hash_stable_and_spread(relayd, backends, mode):
    bs = backends_on_one_port(backends, 3)
    rp = free_port()
    relayd(table_relay(rp, bs[0].port, mode))
    srcs = [f"127.0.0.{i}" for i in range(10, 40)]
    first = {src: which(rp, src) for src in srcs}
    again = {src: which(rp, src) for src in srcs}
    assert first == again
    assert len(set(first.values())) >= 2


def test_hash_without_inputs_is_one_backend(relayd, backends):
    """A TCP relay has no hash inputs: `mode hash` maps everyone alike."""
    bs = backends_on_one_port(backends, 3)
    rp = free_port()
    relayd(table_relay(rp, bs[0].port, "hash"))
    seen = {which(rp, f"127.0.0.{i}") for i in range(10, 20)}
    assert len(seen) == 1


# -- protocol tcp options ------------------------------------------------------------

def test_tcp_backlog_and_socket_buffer(relayd, backends):
    b = backends(echo)
    rp = free_port()
    relayd(simple_relay(rp, b.port, extra='\tprotocol "opts"\n',
                        proto='protocol "opts" { tcp { backlog 42, socket buffer 65536, '
                              'nodelay, sack } }\n'))
    import subprocess
    out = subprocess.run(["ss", "-ltnmH", f"sport = :{rp}"], capture_output=True,
                         text=True).stdout
    fields = out.split()
    assert fields[0] == "LISTEN" and fields[2] == "42", out     # Send-Q = backlog
    assert re.search(r"rb131072\b", out) and re.search(r"tb131072\b", out), out
    with connect(rp) as s:
        s.sendall(b"ok")
        assert recv_exact(s, 2) == b"ok"


def test_ip_minttl_on_listen(relayd, backends):
    # The option applies to the relay's backend connections too (relay_socket),
    # so the backend's answers need TTL 255 as well.
    b = backends(echo, ttl=255)
    rp = free_port()
    relayd(simple_relay(rp, b.port, extra='\tprotocol "gtsm"\n',
                        proto='protocol "gtsm" { tcp { ip minttl 255 } }\n'))
    with pytest.raises(OSError):        # loopback TTL 64 < 255: SYN dropped
        connect(rp, timeout=1.0)
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
    s.settimeout(5)
    s.connect(("127.0.0.1", rp))
    s.sendall(b"gtsm")
    assert recv_exact(s, 4) == b"gtsm"
    s.close()


def test_ip_ttl_on_backend_connections(relayd, backends):
    b = backends(echo, minttl=200)       # accepts only TTL >= 200
    rp, rp2 = free_port(), free_port()
    relayd(simple_relay(rp, b.port, extra='\tprotocol "ttl"\n',
                        proto='protocol "ttl" { tcp { ip ttl 255 } }\n')
           + f'relay "plain" {{\n\tlisten on 127.0.0.1 port {rp2}\n'
             f'\tforward to 127.0.0.1 port {b.port}\n\tsession timeout 2\n}}\n')
    with connect(rp) as s:
        s.sendall(b"ttl")
        assert recv_exact(s, 3) == b"ttl"
    with connect(rp2) as s:          # default TTL: the backend never sees it
        s.sendall(b"ttl")
        assert read_all(s) == b""
    assert b.conns == 1


# -- listeners ---------------------------------------------------------------------

def test_multi_address_listen(relayd, backends):
    if not socket.has_ipv6:
        pytest.fail("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.fail("no ::1")
    b = backends(echo)
    rp = free_port()
    d = relayd(f'log connection\nrelay "multi" {{\n\tlisten on lo port {rp}\n'
               f'\tforward to 127.0.0.1 port {b.port}\n}}\n', args=["-vv"])
    for host in ("127.0.0.1", "::1"):
        with connect(rp, host=host) as s:
            s.sendall(b"m")
            assert recv_exact(s, 1) == b"m"
    out = d.output()
    launched = re.findall(r"^relay_launch: running relay (\S+)$", out, re.M)
    assert launched[0] == "multi" and len(launched) == 2
    assert re.fullmatch(rf"multi\d+:{rp}", launched[1])
    names = {m["relay"] for m in wait_sessions(d, 2)}
    assert names == set(launched)


def test_prefork_accepted(relayd, backends):
    b = backends(echo)
    rp = free_port()
    relayd("prefork 3\n" + simple_relay(rp, b.port))
    with connect(rp) as s:
        s.sendall(b"p")
        assert recv_exact(s, 1) == b"p"


# -- logging ---------------------------------------------------------------------------

def test_no_session_lines_without_log_connection(relayd, backends):
    b = backends(echo)
    rp, rp2, dead = free_port(), free_port(), free_port()
    d = relayd(simple_relay(rp, b.port, glob="")
               + f'relay "dead" {{\n\tlisten on 127.0.0.1 port {rp2}\n'
                 f"\tforward to 127.0.0.1 port {dead}\n}}\n")
    with connect(rp) as s:
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
    with connect(rp2) as s:
        assert read_all(s) == b""
    time.sleep(0.5)
    assert session_lines(d) == []


def test_log_connection_errors_only(relayd, backends):
    b = backends(echo)
    rp, rp2, dead = free_port(), free_port(), free_port()
    d = relayd(simple_relay(rp, b.port, glob="log connection errors\n")
               + f'relay "dead" {{\n\tlisten on 127.0.0.1 port {rp2}\n'
                 f"\tforward to 127.0.0.1 port {dead}\n}}\n")
    with connect(rp) as s:
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
    with connect(rp2) as s:
        assert read_all(s) == b""
    m = wait_sessions(d, 1)[0]
    time.sleep(0.5)
    assert len(session_lines(d)) == 1
    assert (m["relay"], m["reason"], int(m["port"])) == ("dead", "session failed", dead)


def test_session_ids_count_from_one(relayd, backends):
    b = backends(echo)
    rp = free_port()
    d = relayd(simple_relay(rp, b.port))
    for i in range(3):
        with connect(rp) as s:
            s.sendall(b"%d" % i)
            assert recv_exact(s, 1) == b"%d" % i
        wait_sessions(d, i + 1)
    lines = session_lines(d)
    assert [m["id"] for m in lines] == ["1", "2", "3"]
    assert all(m["active"] == "1" for m in lines)
    full = [l for l in d.output().splitlines() if l.startswith("relay tcp, session")]
    assert full[0] == f"relay tcp, session 1 (1 active), 0, 127.0.0.1 -> 127.0.0.1:{b.port}, done"


# -- command line -----------------------------------------------------------------------

def test_configtest_ok(tmp_path):
    conf = tmp_path / "relayd.conf"
    conf.write_text(simple_relay(free_port(), free_port()))
    r = run_cmd("relayd", "-n", "-f", str(conf))
    assert r.returncode == 0 and r.stderr.strip().endswith("configuration OK"), r.stderr


def test_configtest_macro_from_command_line(tmp_path):
    conf = tmp_path / "relayd.conf"
    conf.write_text('relay "m" {\n\tlisten on 127.0.0.1 port $p\n\tforward to 127.0.0.1 port 9\n}\n')
    assert run_cmd("relayd", "-n", "-f", str(conf)).returncode == 1
    r = run_cmd("relayd", "-n", "-D", "p=8080", "-f", str(conf))
    assert r.returncode == 0 and "configuration OK" in r.stderr


def test_configtest_errors_with_file_and_line(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text('relay "x" {\n\tlisten on 127.0.0.1 port 80\n\tfrobnicate\n}\n')
    r = run_cmd("relayd", "-n", "-f", str(conf))
    assert r.returncode == 1
    assert re.search(rf"^{re.escape(str(conf))}:3: ", r.stderr, re.M), r.stderr
    assert "configuration OK" not in r.stderr


def test_configtest_unimplemented_feature(tmp_path):
    conf = tmp_path / "dsr.conf"     # (TLS, `destination`, `transparent`: they work now)
    conf.write_text('table <t> { 127.0.0.1 }\nredirect "x" {\n\tlisten on 127.0.0.1 port 80\n'
                    '\troute to <t> port 8080 check tcp interface lo\n}\n')
    r = run_cmd("relayd", "-n", "-f", str(conf))
    assert r.returncode == 1
    assert re.search(rf"^{re.escape(str(conf))}:4: .* is not implemented yet$", r.stderr,
                     re.M), r.stderr


def test_usage(tmp_path):
    r = run_cmd("relayd", "-x")
    assert r.returncode == 1
    assert r.stderr == "usage: relayd [-dnUv] [-D macro=value] [-f file]\n"
    assert run_cmd("relayd", "-n", "extra").returncode == 1


def test_missing_default_config_fails():
    r = run_cmd("relayd", "-n", "-f", "/nonexistent/relayd.conf")
    assert r.returncode == 1 and "configuration OK" not in r.stderr


# -- signals -------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_terminate(relayd, backends, sig):
    b = backends(echo)
    rp = free_port()
    d = relayd(simple_relay(rp, b.port))
    d.signal(sig)
    assert d.proc.wait(10) == 0
    assert re.search(rf"^parent terminating, pid {d.pid}$", d.output(), re.M), d.output()
    with pytest.raises(OSError):
        connect(rp, timeout=1)


def test_sighup_reload_changes_forward(relayd, backends):
    a = backends(hello_echo, name="A")
    b = backends(hello_echo, name="B")
    rp = free_port()
    d = relayd(simple_relay(rp, a.port))
    old = connect(rp)
    assert read_line(old) == b"A\n"
    old.sendall(b"one")
    assert recv_exact(old, 3) == b"one"

    d.path.write_text(simple_relay(rp, b.port))
    d.signal(signal.SIGHUP)
    d.wait_output("parent_reload: configuration reloaded")
    with connect(rp) as s:
        assert read_line(s) == b"B\n"
    old.sendall(b"two")                 # the established session goes on
    assert recv_exact(old, 3) == b"two"
    old.close()
    assert a.conns == 1 and b.conns == 1
    assert "parent_sig_handler: reload requested with SIGHUP" in d.output()


def test_reloaded_line_means_new_connections_see_new_config(relayd, backends):
    """The old relays stop accepting (quiesce, acknowledged) before the
    parent logs `configuration reloaded`: every connection opened after
    that line goes to the new configuration's backend."""
    ends = {"A": backends(hello_echo, name="A"), "B": backends(hello_echo, name="B")}
    rp = free_port()
    d = relayd("prefork 3\n" + simple_relay(rp, ends["A"].port))
    for i in range(6):
        name = "BA"[i % 2]
        d.path.write_text("prefork 3\n" + simple_relay(rp, ends[name].port))
        d.signal(signal.SIGHUP)
        # Looked for every millisecond: the connections follow the line closely.
        wait_for(lambda: d.output().count("configuration reloaded") > i, 60, "the reload",
                 every=0.001)
        got = set()
        for _ in range(20):
            with connect(rp) as s:
                got.add(read_line(s))
        assert got == {f"{name}\n".encode()}, (i, got)


def test_sighup_bad_config_keeps_running(relayd, backends):
    a = backends(hello_echo, name="A")
    rp = free_port()
    d = relayd(simple_relay(rp, a.port))
    d.path.write_text("relay broken {\n")
    d.signal(signal.SIGHUP)
    out = d.wait_output("configuration failed")
    assert re.search(rf"^{re.escape(str(d.path))}:\d+: ", out, re.M), out
    with connect(rp) as s:
        assert read_line(s) == b"A\n"
    assert d.proc.poll() is None


def test_sighup_adds_and_removes_relays(relayd, backends):
    a = backends(hello_echo, name="A")
    rp, rp2 = free_port(), free_port()
    d = relayd(simple_relay(rp, a.port))
    d.path.write_text(f'relay "new" {{\n\tlisten on 127.0.0.1 port {rp2}\n'
                      f'\tforward to 127.0.0.1 port {a.port}\n}}\n')
    d.signal(signal.SIGHUP)
    d.wait_output("parent_reload: configuration reloaded")
    with connect(rp2) as s:
        assert read_line(s) == b"A\n"
    with pytest.raises(OSError):
        connect(rp, timeout=1)
