"""relayd health checks, black-box: `python -m relayd -d -f CONF` with checked
tables in front of threaded loopback backends (127.0.0.x stand in for
different hosts on one port).

Covers R01-R03/R08/R09/R12-R23 as far as a TCP relay shows them: state
transitions and the documented log lines, a killed backend going down on
its (retry+1)th failed check (counted in `log host checks` lines, not
timed) and getting no traffic, coming back, backup
tables, http code/digest, send/expect, scripts, timeouts, icmp, parent
hosts, reload keeping states, and the metrics exporter.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for

# host <host>, check <check>[ use tls] (<ms>ms,<result>[,<code>]), state <old> -> <new>, availability <pct>
CHECK_RE = re.compile(r"^host (?P<host>\S+), check (?P<check>[a-z ]+?)(?P<tls> use tls)? "
                      r"\((?P<ms>\d+)ms,(?P<result>[a-z/ ]+)(?:,(?P<code>\d+))?\), "
                      r"state (?P<old>up|down|unknown) -> (?P<new>up|down|unknown), "
                      r"availability (?P<avail>(?:\d+\.\d\d%)?)$")


class Backend:
    """A threaded TCP server on addr:port; `handler(conn)` per connection.
    Counts connections that sent data (health checks only connect)."""

    def __init__(self, addr: str, port: int, handler=None, name: str = "") -> None:
        self.addr, self.port = addr, port
        self.handler = handler or self._hello
        self.name = name or addr
        self.sessions = 0
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.start()

    def start(self) -> None:
        s = socket.socket(socket.AF_INET6 if ":" in self.addr else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.addr, self.port))
        s.listen(128)
        self.sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            self.handler(self, conn)
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _hello(self, conn: socket.socket) -> None:
        data = conn.recv(1024)
        if data:
            with self.lock:
                self.sessions += 1
            conn.sendall(self.name.encode() + b":" + data)


def http_backend(status: int = 200, body: bytes = b"ok\n", delay: float = 0.0):
    def handler(self, conn):
        conn.recv(4096)
        if delay:
            time.sleep(delay)
        conn.sendall(b"HTTP/1.0 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body)
    return handler


def banner_backend(banner: bytes):
    def handler(self, conn):
        conn.sendall(banner)
        try:
            conn.recv(1024)
        except OSError:
            pass
    return handler


@pytest.fixture
def relayd(tmp_path, daemons):
    def start(text: str, ports=()):
        conf = tmp_path / "relayd.conf"
        # A control socket of its own: daemons of parallel tests never share one.
        conf.write_text(f'socket "{tmp_path}/relayd.sock"\n' + text)
        return daemons("relayd", conf, ports=list(ports))
    return start


def checks(d, host: str | None = None) -> list[re.Match]:
    out = []
    for line in d.output().splitlines():
        m = CHECK_RE.match(line)
        if m and (host is None or m["host"] == host):
            out.append(m)
    return out


def wait_check(d, host: str, new: str, result: str | None = None, old: str | None = None,
               timeout: float = 10.0) -> re.Match:
    def line():
        return next((m for m in checks(d, host) if m["new"] == new
                     and (result is None or m["result"] == result)
                     and (old is None or m["old"] == old)), None)
    return wait_for(line, timeout, f"a check line for {host} -> {new} ({result})", d.output)


def ask(port: int, data: bytes = b"hi", timeout: float = 3.0) -> bytes:
    """One relayed session: send data, read until close; b"" when refused/closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return b""      # the relay closed it already (no host up)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def wait_backends(port: int, want: set[bytes], n: int = 6, timeout: float = 10.0) -> list[bytes]:
    """hce logs a change before pfe and the relays hear of it: ask `n`
    sessions at a time until exactly the backends `want` (reply prefixes)
    answer them; their replies."""
    def replies():
        r = [ask(port) for _ in range(n)]
        return r if {x.split(b":")[0] for x in r} == want else None
    return wait_for(replies, timeout, f"exactly backends {sorted(want)} to answer", every=0.1)


# -- state transitions and traffic ----------------------------------------------------

def test_killed_backend_goes_down_gets_no_traffic_and_comes_back(relayd):
    port, rport = free_port(), free_port()
    b1 = Backend("127.0.0.1", port, name="one")
    b2 = Backend("127.0.0.2", port, name="two")
    interval, retry, timeout = 1, 1, 200
    d = relayd(f"""
interval {interval}
timeout {timeout}
log host checks
table <web> {{ 127.0.0.1, 127.0.0.2 retry {retry} }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <web> port {port} mode roundrobin check tcp
}}
""", ports=[rport])
    try:
        m = wait_check(d, "127.0.0.2", "up", "tcp connect ok", old="unknown")
        assert m["check"] == "tcp" and m["avail"] == "100.00%"
        wait_check(d, "127.0.0.1", "up", "tcp connect ok")
        replies = [ask(rport) for _ in range(6)]
        assert {r.split(b":")[0] for r in replies} == {b"one", b"two"}

        b2.stop()
        wait_check(d, "127.0.0.2", "down", "tcp connect failed", old="up", timeout=15)
        # `retry 1`: one failed check is tolerated (state stays up), the
        # second takes the host down -- counted in checks, not seconds.
        seen = [(m["result"], m["old"], m["new"]) for m in checks(d, "127.0.0.2")]
        down = seen.index(("tcp connect failed", "up", "down"))
        last_ok = max(i for i, c in enumerate(seen[:down]) if c[0] == "tcp connect ok")
        assert seen[last_ok + 1:down + 1] == \
            [("tcp connect failed", "up", "up")] * retry + [("tcp connect failed", "up", "down")]
        wait_backends(rport, {b"one"})
        before = b1.sessions
        replies = [ask(rport) for _ in range(6)]
        assert all(r.startswith(b"one:") for r in replies), replies
        assert b1.sessions == before + 6

        b2.start()
        wait_check(d, "127.0.0.2", "up", "tcp connect ok", old="down", timeout=5)
        wait_backends(rport, {b"one", b"two"})         # both serve again
    finally:
        b1.stop()
        b2.stop()


def test_log_host_checks_every_check(relayd):
    port, rport = free_port(), free_port()
    b = Backend("127.0.0.1", port)
    d = relayd(f"""
interval 1
timeout 200
log host checks
table <web> {{ 127.0.0.1 }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <web> port {port} check tcp
}}
""", ports=[rport])
    try:
        wait_check(d, "127.0.0.1", "up", old="up", timeout=5)
        lines = checks(d, "127.0.0.1")
        assert lines[0]["old"] == "unknown" and lines[0]["new"] == "up"
        assert all(m["result"] == "tcp connect ok" and m["avail"] == "100.00%" for m in lines)
        assert all(int(m["ms"]) < 200 for m in lines)
    finally:
        b.stop()


def test_backup_table_then_nothing_left(relayd):
    port, bport, rport = free_port(), free_port(), free_port()
    main = Backend("127.0.0.1", port, name="main")
    backup = Backend("127.0.0.3", bport, name="backup")
    d = relayd(f"""
interval 1
timeout 200
table <main> {{ 127.0.0.1 }}
table <spare> {{ 127.0.0.3 }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <main> port {port} check tcp
	forward to <spare> port {bport} check tcp
}}
""", ports=[rport])
    try:
        wait_check(d, "127.0.0.1", "up")
        wait_check(d, "127.0.0.3", "up")
        assert ask(rport).startswith(b"main:")
        main.stop()
        wait_check(d, "127.0.0.1", "down", "tcp connect failed")
        wait_backends(rport, {b"backup"})
        backup.stop()
        wait_check(d, "127.0.0.3", "down", "tcp connect failed")
        assert ask(rport) == b""        # no host up anywhere: closed
    finally:
        main.stop()
        backup.stop()


def test_retry_counts_consecutive_failures(relayd):
    port, rport = free_port(), free_port()
    b = Backend("127.0.0.1", port)
    d = relayd(f"""
interval 1
timeout 200
log host checks
table <web> {{ 127.0.0.1 retry 2 }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <web> port {port} check tcp
}}
""", ports=[rport])
    try:
        wait_check(d, "127.0.0.1", "up", old="unknown")
        b.stop()
        wait_check(d, "127.0.0.1", "down", old="up", timeout=10)
        failed = [m for m in checks(d, "127.0.0.1") if m["result"] == "tcp connect failed"]
        # Two tolerated failures (state stays up), the third marks it down.
        assert [(m["old"], m["new"]) for m in failed[:3]] == \
            [("up", "up"), ("up", "up"), ("up", "down")]
    finally:
        b.stop()


# -- check types ------------------------------------------------------------------------

def test_http_code_and_exact_request(relayd):
    port, rport = free_port(), free_port()
    seen: list[bytes] = []

    def handler(self, conn):
        seen.append(conn.recv(4096))
        status = 200 if self.addr == "127.0.0.1" else 404
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % status)
    b1 = Backend("127.0.0.1", port, handler)
    b2 = Backend("127.0.0.2", port, handler)
    d = relayd(f"""
interval 1
timeout 500
log state changes
table <web> {{ 127.0.0.1, 127.0.0.2 }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <web> port {port} check http "/health" host "www.example.com" code 200
}}
""", ports=[rport])
    try:
        m = wait_check(d, "127.0.0.1", "up", "http code ok")
        assert m["check"] == "http code" and m["code"] is None
        m = wait_check(d, "127.0.0.2", "down", "http code mismatch")
        assert m["code"] == "404"
        assert seen[0] == (b"HEAD /health HTTP/1.1\r\nHost: www.example.com\r\n"
                           b"Connection: close\r\n\r\n")
    finally:
        b1.stop()
        b2.stop()


def test_http_digest(relayd):
    port, rport = free_port(), free_port()
    body = b"<html>healthy</html>\n"
    good = hashlib.sha1(body).hexdigest()
    b1 = Backend("127.0.0.1", port, http_backend(body=body))
    b2 = Backend("127.0.0.2", port, http_backend(body=b"changed\n"))
    d = relayd(f"""
interval 1
timeout 500
log state changes
table <web> {{ 127.0.0.1, 127.0.0.2 }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <web> port {port} check http "/" digest "{good}"
}}
""", ports=[rport])
    try:
        m = wait_check(d, "127.0.0.1", "up", "http digest ok")
        assert m["check"] == "http digest"
        wait_check(d, "127.0.0.2", "down", "http digest mismatch")
    finally:
        b1.stop()
        b2.stop()


def test_slow_backend_past_timeout(relayd):
    port, rport = free_port(), free_port()
    b = Backend("127.0.0.1", port, http_backend(delay=1.0))
    d = relayd(f"""
interval 2
log state changes
table <web> {{ 127.0.0.1 }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <web> port {port} timeout 300 check http "/" code 200
}}
""", ports=[rport])
    try:
        m = wait_check(d, "127.0.0.1", "down", "tcp read timeout")
        assert int(m["ms"]) >= 250          # not before `timeout 300` (the answer: 1 s)
    finally:
        b.stop()


def test_send_expect_banner(relayd):
    port, rport = free_port(), free_port()
    b1 = Backend("127.0.0.1", port, banner_backend(b"220 mail.example.com ESMTP\r\n"))
    b2 = Backend("127.0.0.2", port, banner_backend(b"554 go away\r\n"))
    d = relayd(f"""
interval 1
timeout 300
log state changes
table <smtp> {{ 127.0.0.1, 127.0.0.2 }}
relay "mx" {{
	listen on 127.0.0.1 port {rport}
	forward to <smtp> port {port} check send "" expect "220 *"
}}
""", ports=[rport])
    try:
        m = wait_check(d, "127.0.0.1", "up", "send/expect ok")
        assert m["check"] == "send expect"
        wait_check(d, "127.0.0.2", "down", "send/expect failed")
    finally:
        b1.stop()
        b2.stop()


def test_binary_send_expect(relayd):
    port, rport = free_port(), free_port()
    got: list[bytes] = []

    def handler(self, conn):
        got.append(conn.recv(64))
        conn.sendall(b"\x00\x01\xca\xfe")
    b = Backend("127.0.0.1", port, handler)
    d = relayd(f"""
interval 1
timeout 300
log state changes
table <bin> {{ 127.0.0.1 }}
relay "b" {{
	listen on 127.0.0.1 port {rport}
	forward to <bin> port {port} check binary send "DEADBEEF" expect "0001CA"
}}
""", ports=[rport])
    try:
        wait_check(d, "127.0.0.1", "up", "send/expect ok")
        assert got[0] == b"\xde\xad\xbe\xef"
    finally:
        b.stop()


@pytest.fixture
def script_dir():
    d = tempfile.mkdtemp(prefix="relayd-checks-")
    os.chmod(d, 0o777)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_script_exit_codes_and_user(relayd, script_dir):
    rport = free_port()
    out = script_dir / "uids"
    script = script_dir / "check.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $(id -u)" >> {out}\n'
                      '[ "$1" = 127.0.0.1 ] && exit 1\nexit 0\n')
    script.chmod(0o755)
    slow = script_dir / "slow.sh"
    slow.write_text("#!/bin/sh\nsleep 5\nexit 1\n")
    slow.chmod(0o755)
    d = relayd(f"""
interval 1
timeout 400
log state changes
table <s> {{ 127.0.0.1, 127.0.0.2 }}
table <z> {{ 127.0.0.9 }}
relay "r" {{
	listen on 127.0.0.1 port {rport}
	forward to <s> port 80 check script "{script}"
	forward to <z> port 80 check script "{slow}"
}}
""", ports=[rport])
    m = wait_check(d, "127.0.0.1", "up", "script ok")
    assert m["check"] == "script"
    wait_check(d, "127.0.0.2", "down", "script failed")
    m = wait_check(d, "127.0.0.9", "down", "script failed")
    # killed at the timeout: "script failed" (its exit 1 after 5 s would be
    # "script ok"), not before it
    assert int(m["ms"]) >= 350
    lines = out.read_text().split("\n")
    uid = int(lines[0].split()[1])
    assert (uid != 0) if os.geteuid() == 0 else (uid == os.geteuid())


def test_icmp(relayd):
    rport = free_port()
    d = relayd(f"""
interval 1
timeout 300
log state changes
table <gw> {{ 127.0.0.1, ::1, 100::1 }}
relay "r" {{
	listen on 127.0.0.1 port {rport}
	forward to <gw> port 80 check icmp
}}
""", ports=[rport])
    out = d.output()
    if "cannot open an ICMP socket" in out:
        pytest.fail("no ICMP socket here")
    wait_check(d, "127.0.0.1", "up", "icmp ok")
    wait_check(d, "::1", "up", "icmp ok")
    m = wait_check(d, "100::1", "down")
    assert m["result"] in ("icmp read timeout", "icmp write timeout")


def test_parent_host_mirrors_without_being_checked(relayd):
    port, port2, rport = free_port(), free_port(), free_port()
    hits: list[str] = []

    def handler(self, conn):
        hits.append(self.addr)
    b = Backend("127.0.0.1", port, handler)
    b2 = Backend("127.0.0.2", port2, handler)
    d = relayd(f"""
interval 1
timeout 200
log state changes
table <a> {{ 127.0.0.1 }}
table <b> {{ 127.0.0.2 parent 1 }}
relay "r" {{
	listen on 127.0.0.1 port {rport}
	forward to <a> port {port} check tcp
	forward to <b> port {port2} check tcp
}}
""", ports=[rport])
    try:
        wait_check(d, "127.0.0.2", "up", "tcp connect ok")
        time.sleep(1.5)
        assert "127.0.0.2" not in hits     # never probed itself
        b.stop()
        wait_check(d, "127.0.0.2", "down", "tcp connect failed")
    finally:
        b.stop()
        b2.stop()


# -- reload and metrics -----------------------------------------------------------------

def test_reload_keeps_host_state(relayd):
    port, rport = free_port(), free_port()
    b = Backend("127.0.0.1", port, name="one")
    d = relayd(f"""
interval 5
timeout 200
log state changes
table <web> {{ 127.0.0.1 }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <web> port {port} check tcp
}}
""", ports=[rport])
    try:
        wait_check(d, "127.0.0.1", "up")
        d.signal(signal.SIGHUP)
        d.wait_output("configuration reloaded")
        # Served at once: the host did not go back to unknown.
        assert ask(rport).startswith(b"one:")
        time.sleep(0.5)
        assert len([m for m in checks(d, "127.0.0.1") if m["old"] == "unknown"]) == 1
    finally:
        b.stop()


def test_metrics_endpoint(relayd):
    port, rport, mport = free_port(), free_port(), free_port()
    b = Backend("127.0.0.1", port, name="one")
    d = relayd(f"""
interval 1
timeout 200
metrics listen on 127.0.0.1 port {mport}
table <web> {{ 127.0.0.1, 127.0.0.2 }}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	forward to <web> port {port} check tcp
}}
""", ports=[rport, mport])
    try:
        wait_check(d, "127.0.0.1", "up")
        wait_check(d, "127.0.0.2", "down")
        wait_backends(rport, {b"one"})

        def scrape() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                text = r.read().decode()
            return text if 'relayd_relay_sessions_total{relay="www"}' in text else None
        # The session is counted once the relay has closed it, which may be
        # a moment after the client saw the end of the reply.
        text = wait_for(scrape, 5, "the session counter", every=0.1)
        assert f'relayd_host_state{{host="127.0.0.1",id="1",table="web:{port}"}} 1.0' in text
        assert f'relayd_host_state{{host="127.0.0.2",id="2",table="web:{port}"}} -1.0' in text
        assert "relayd_host_check_latency_seconds{" in text
        assert re.search(r"relayd_relay_sessions_total{relay=\"www\"} [1-9]", text), text
    finally:
        b.stop()


def test_http_relay_503_when_no_host_is_up(relayd):
    port, rport = free_port(), free_port()
    b = Backend("127.0.0.1", port, http_backend(body=b"hello\n"))
    d = relayd(f"""
interval 1
timeout 300
log connection
table <web> {{ 127.0.0.1 }}
http protocol "p" {{
	return error
}}
relay "www" {{
	listen on 127.0.0.1 port {rport}
	protocol "p"
	forward to <web> port {port} check http "/" code 200
}}
""", ports=[rport])
    try:
        wait_check(d, "127.0.0.1", "up", "http code ok")
        with urllib.request.urlopen(f"http://127.0.0.1:{rport}/", timeout=5) as r:
            assert r.status == 200 and r.read() == b"hello\n"
        b.stop()
        wait_check(d, "127.0.0.1", "down", "tcp connect failed")

        def status() -> int:
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(f"http://127.0.0.1:{rport}/", timeout=5)
            return exc.value.code
        # hce logs the change before the relays hear of it: until then a
        # request still goes to the dead host (502), then none is up (503).
        wait_for(lambda: status() == 503, what="503 once the relay knows no host is up")
        d.wait_output("session failed")
    finally:
        b.stop()
