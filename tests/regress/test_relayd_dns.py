"""relayd `dns protocol` relays, black-box (R49): `python -m relayd -d -f
CONF` in front of threaded UDP DNS responders that record the queries
(and their IDs) they get and answer with a fixed A record.

Covers the ID rewriting (the backend sees another ID, the client gets its
own back), two clients using the same ID at once, non-DNS datagrams
dropped while the relay keeps working, roundrobin over a table, the
session timeout, the `log connection` line, -n and a reload.  Loopback
only; 127.0.0.x source addresses stand in for different clients.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import threading

import pytest

from tests.conftest import run_cmd, wait_for

SESSION_RE = re.compile(r"^relay (?P<relay>\S+), session (?P<id>\d+) \((?P<active>\d+) active\), "
                        r"(?P<tag>\S+), (?P<client>[0-9a-f.:]+) -> (?P<addr>[0-9a-f.:]*):"
                        r"(?P<port>\d+), (?P<reason>[^,]+)(?P<log>,.*)?$")


# -- DNS messages -------------------------------------------------------------------

def qname(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def query(qid: int, name: str = "www.example.com") -> bytes:
    """A recursive A query with an EDNS OPT record, as resolvers send."""
    return (struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1) + qname(name)
            + struct.pack("!HH", 1, 1) + b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0))


def answer(q: bytes, ip: str) -> bytes:
    """The answer to `q` (same ID and question): one A record `ip`."""
    qid, = struct.unpack_from("!H", q)
    end = 12 + q[12:].index(b"\0") + 1 + 4
    return (struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + q[12:end]
            + struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + socket.inet_aton(ip))


def msg_id(buf: bytes) -> int:
    return struct.unpack_from("!H", buf)[0]


def a_record(resp: bytes) -> str:
    return socket.inet_ntoa(resp[-4:])


# -- backends and clients --------------------------------------------------------------

class DnsServer:
    """A UDP DNS responder thread.  `hold`: answer only once that many
    queries are in, the last one first; `ip=None`: never answer."""

    def __init__(self, ip: str | None, host: str = "127.0.0.1", port: int = 0,
                 hold: int = 0) -> None:
        self.ip, self.hold = ip, hold
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.1)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.seen: list[tuple[bytes, tuple]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        queue: list[tuple[bytes, tuple]] = []
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.seen.append((data, peer))
            if self.ip is None:
                continue
            queue.append((data, peer))
            if len(queue) >= self.hold:
                for q, p in reversed(queue):
                    self.sock.sendto(answer(q, self.ip), p)
                queue = []

    def ids(self) -> list[int]:
        with self.lock:
            return [msg_id(d) for d, _ in self.seen]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def dns_servers():
    made: list[DnsServer] = []

    def make(*args, **kw) -> DnsServer:
        s = DnsServer(*args, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP (a dns relay gets both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def ask(port: int, q: bytes, src: str = "127.0.0.1", timeout: float = 5.0) -> bytes | None:
    """Send `q` to the relay; its reply or None after `timeout`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.bind((src, 0))
        c.settimeout(timeout)
        c.sendto(q, ("127.0.0.1", port))
        try:
            data, peer = c.recvfrom(65535)
        except socket.timeout:
            return None
        assert peer == ("127.0.0.1", port)        # from the relay's own address
        return data


# -- the daemon ---------------------------------------------------------------------------

@pytest.fixture
def relayd(daemons, tmp_path):
    """start(text_for_port) -> (Daemon, port): relayd on a free port, once
    its sockets are bound; a port taken meanwhile (tests run in parallel)
    means another try on another port."""
    def start(make, args: list[str] | None = None):
        for _ in range(5):
            port = free_udp_tcp_port()
            conf = tmp_path / "relayd.conf"
            conf.write_text(make(port))
            d = daemons("relayd", conf, args=args)
            d.path = conf
            wait_for(lambda: "startup" in d.output() or d.proc.poll() is not None,
                     what="relayd startup")
            if d.proc.poll() is not None and "failed to bind" in d.output():
                continue
            assert d.proc.poll() is None, d.output()
            return d, port
        raise AssertionError(f"no port to bind:\n{d.output()}")
    return start


def dns_relay(listen: int, forward: str, extra: str = "", glob: str = "log connection\n",
              tables: str = "") -> str:
    return (f"{glob}{tables}dns protocol \"dnsproto\"\n"
            f'relay "dns" {{\n\tlisten on 127.0.0.1 port {listen}\n\tprotocol "dnsproto"\n'
            f"\t{forward}\n{extra}}}\n")


def session_lines(d) -> list[re.Match]:
    return [m for line in d.output().splitlines() if (m := SESSION_RE.match(line))]


def wait_sessions(d, n: int) -> list[re.Match]:
    return wait_for(lambda: (lambda ls: ls if len(ls) >= n else None)(session_lines(d)),
                    what=f"{n} session lines in:\n{d.output()}")


# -- tests ----------------------------------------------------------------------------------

def test_query_through_relay_id_rewritten_and_restored(relayd, dns_servers):
    b = dns_servers("192.0.2.53")
    d, rp = relayd(lambda p: dns_relay(p, f"forward to 127.0.0.1 port {b.port}"))
    q = query(0x1234)
    resp = ask(rp, q)
    assert resp is not None, d.output()
    assert msg_id(resp) == 0x1234
    assert a_record(resp) == "192.0.2.53" and resp[2:] == answer(q, "192.0.2.53")[2:]
    (got, peer), = b.seen
    assert msg_id(got) != 0x1234                   # the backend saw another ID
    assert got[2:] == q[2:]                        # and nothing else changed
    assert peer[0] == "127.0.0.1"
    m = wait_sessions(d, 1)[0]
    assert (m["relay"], m["tag"], m["client"], m["addr"], int(m["port"]), m["reason"]) == (
        "dns", "0", "127.0.0.1", "127.0.0.1", b.port, "done")


def test_every_query_gets_a_fresh_id(relayd, dns_servers):
    b = dns_servers("192.0.2.1")
    d, rp = relayd(lambda p: dns_relay(p, f"forward to 127.0.0.1 port {b.port}", glob=""))
    for _ in range(20):
        resp = ask(rp, query(7))
        assert msg_id(resp) == 7
    ids = b.ids()
    assert len(ids) == 20 and 7 not in ids and len(set(ids)) == 20


def test_two_clients_same_id_each_get_their_answer(relayd, dns_servers):
    b = dns_servers("192.0.2.2", hold=2)           # answers when both are in, reversed
    d, rp = relayd(lambda p: dns_relay(p, f"forward to 127.0.0.1 port {b.port}"))
    got: dict[str, bytes | None] = {}

    def client(src: str, name: str) -> None:
        got[name] = ask(rp, query(0x4242, name), src=src)
    ts = [threading.Thread(target=client, args=a) for a in
          (("127.0.0.1", "one.example.org"), ("127.0.0.2", "two.example.org"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for name in ("one.example.org", "two.example.org"):
        assert got[name] is not None and msg_id(got[name]) == 0x4242
        assert qname(name) in got[name]             # its own question answered
    ids = b.ids()
    assert len(ids) == 2 and ids[0] != ids[1] and 0x4242 not in ids


def test_non_dns_datagram_dropped_relay_keeps_working(relayd, dns_servers):
    b = dns_servers("192.0.2.3")
    d, rp = relayd(lambda p: dns_relay(p, f"forward to 127.0.0.1 port {b.port}"))
    for junk in (b"hello, this is not DNS\n", b"\x01\x02", b"\0" * 12,
                 answer(query(9), "10.0.0.1")):
        assert ask(rp, junk, timeout=0.5) is None
    assert b.seen == []
    resp = ask(rp, query(9))
    assert msg_id(resp) == 9 and a_record(resp) == "192.0.2.3"
    assert len(wait_sessions(d, 1)) == 1 and d.proc.poll() is None


def test_roundrobin_over_two_backends(relayd, dns_servers):
    for _ in range(20):
        b1 = dns_servers("192.0.2.1", "127.0.0.1")
        try:
            b2 = dns_servers("192.0.2.2", "127.0.0.2", b1.port)
            break
        except OSError:
            continue
    d, rp = relayd(lambda p: dns_relay(
        p, f"forward to <dnsservers> port {b1.port} mode roundrobin",
        tables="table <dnsservers> { 127.0.0.1, 127.0.0.2 }\n"))
    answers = [a_record(ask(rp, query(100 + i))) for i in range(6)]
    assert sorted(answers) == ["192.0.2.1"] * 3 + ["192.0.2.2"] * 3
    assert all(answers[i] != answers[i + 1] for i in range(5)), answers
    assert len(b1.seen) == 3 and len(b2.seen) == 3
    lines = wait_sessions(d, 6)
    assert {m["addr"] for m in lines} == {"127.0.0.1", "127.0.0.2"}


def test_unanswered_query_times_out(relayd, dns_servers):
    b = dns_servers(None)
    d, rp = relayd(lambda p: dns_relay(p, f"forward to 127.0.0.1 port {b.port}",
                                       extra="\tsession timeout 1\n"))
    assert ask(rp, query(5), timeout=0.3) is None
    m = wait_sessions(d, 1)[0]
    assert m["reason"] == "udp timeout" and int(m["port"]) == b.port
    assert len(b.seen) == 1


def test_configtest_and_reload(relayd, dns_servers, tmp_path):
    b = dns_servers("192.0.2.4")
    conf = tmp_path / "check.conf"
    conf.write_text(dns_relay(5300, f"forward to 127.0.0.1 port {b.port}"))
    r = run_cmd("relayd", "-n", "-f", str(conf))
    assert r.returncode == 0 and "configuration OK" in r.stderr, r.stderr
    d, rp = relayd(lambda p: dns_relay(p, f"forward to 127.0.0.1 port {b.port}"))
    assert msg_id(ask(rp, query(1))) == 1
    d.signal(signal.SIGHUP)
    d.wait_output("configuration reloaded")
    resp = ask(rp, query(2))
    assert resp is not None and msg_id(resp) == 2 and a_record(resp) == "192.0.2.4"


def test_udp_port_in_use_is_a_bind_error(daemons, tmp_path, dns_servers):
    b = dns_servers("192.0.2.4")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        conf = tmp_path / "busy.conf"
        conf.write_text(dns_relay(port, f"forward to 127.0.0.1 port {b.port}"))
        d = daemons("relayd", conf)
        assert d.proc.wait(15) == 1
    assert f"relay_privinit: failed to bind 127.0.0.1:{port}: Address already in use" \
        in d.output()
