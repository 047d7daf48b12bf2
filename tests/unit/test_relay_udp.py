"""relayd.relay_udp: DNS query validation, the ID shuffle and table, and
UdpRelay end to end against trio UDP backends on loopback (ID rewritten
towards the backend and restored towards the client, expiry, the
`log connection` line, backend choice)."""

from __future__ import annotations

import re
import socket
import struct

import pytest
import trio

from relayd import config as C
from relayd import relay_udp as U
from relayd.parse import load
from relayd.relay_session import RelayState
from relayd.stats import Stats
from shared import log

A_TYPE, OPT_TYPE = 1, 41


def qname(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def query(qid: int, name: str = "example.com", edns: bool = False, flags: int = 0x0100) -> bytes:
    ar = b"\0" + struct.pack("!HHIH", OPT_TYPE, 4096, 0, 0) if edns else b""
    return (struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0)
            + qname(name) + struct.pack("!HH", A_TYPE, 1) + ar)


def answer(q: bytes, ip: str) -> bytes:
    """The response to query `q` (same ID): one A record `ip`."""
    qid, = struct.unpack_from("!H", q)
    end = U._skip_name(q, 12) + 4
    return (struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + q[12:end]
            + struct.pack("!HHHIH", 0xC00C, A_TYPE, 1, 60, 4) + socket.inet_aton(ip))


def answer_ip(resp: bytes) -> str:
    return socket.inet_ntoa(resp[-4:])


def rid(buf: bytes) -> int:
    return struct.unpack_from("!H", buf)[0]


@pytest.fixture(autouse=True)
def stderr_log():
    log.init(debug=True, verbose=0)
    yield
    log.set_verbose(0)


# -- validation ------------------------------------------------------------------

def test_valid_queries():
    assert U.check_query(query(1)) is None
    assert U.check_query(query(0xFFFF, "a.b.c.example.org", edns=True)) is None
    assert U.check_query(query(7, ".")) is None                   # the root
    assert U.check_query(query(7) + b"\0\0") is None              # trailing bytes
    notify = struct.pack("!HHHHHH", 9, 4 << 11, 1, 0, 0, 0) + qname("zone") + b"\0\6\0\1"
    assert U.check_query(notify) is None
    cookie_only = struct.pack("!HHHHHH", 5, 0, 0, 0, 0, 1) + b"\0" + struct.pack(
        "!HHIH", OPT_TYPE, 1232, 0, 4) + b"\0\x0a\0\0"
    assert U.check_query(cookie_only) is None
    # A compressed name pointing back at the first question.
    two = struct.pack("!HHHHHH", 3, 0, 2, 0, 0, 0) + qname("x.org") + b"\0\1\0\1" + \
        b"\xc0\x0c\0\1\0\1"
    assert U.check_query(two) is None


@pytest.mark.parametrize("buf,why", [
    (b"", "short dns packet"),
    (b"hello", "short dns packet"),
    (query(1)[:11], "short dns packet"),
    (answer(query(1), "192.0.2.1"), "not a query"),
    (b"GET / HTTP/1.0\r\n\r\n", "invalid opcode 10"),
    (b"\0" * 12, "no question"),
    (b"hello world\n", "invalid opcode 13"),
    (b"\x12\x34\x01\x00" + b"hello world\n", "bad question"),
    (query(1)[:-1], "bad question"),
    (struct.pack("!HHHHHH", 1, 0x0100, 2, 0, 0, 0) + qname("a") + b"\0\1\0\1", "bad question"),
    (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x40a\0\0\1\0\1", "bad question"),
    (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\0\1\0\1", "bad question"),
    (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x3fa" * 5 + b"\0\0\1\0\1",
     "bad question"),
    (query(1)[:11] + b"\1" + query(1)[12:] + b"\0\0\x29", "bad record"),
    (query(1, edns=True)[:-1], "bad record"),
    (struct.pack("!HHHHHH", 1, 3 << 11, 1, 0, 0, 0) + qname("a") + b"\0\1\0\1",
     "invalid opcode 3"),
])
def test_invalid_datagrams(buf, why):
    assert U.check_query(buf) == why


def test_name_length_limit():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])                 # 255 bytes on the wire
    assert len(qname(name)) == 255 and U.check_query(query(1, name)) is None
    assert U.check_query(query(1, name + "c")) == "bad question"


def test_header_and_set_id():
    q = query(0x1234, edns=True)
    h = U.dns_header(q)
    assert (h.id, h.response, h.opcode, h.qdcount, h.arcount) == (0x1234, False, 0, 1, 1)
    assert U.dns_header(q[:11]) is None
    assert U.dns_header(answer(q, "10.0.0.1")).response
    r = U.set_id(q, 0xBEEF)
    assert rid(r) == 0xBEEF and r[2:] == q[2:] and U.set_id(r, 0x1234) == q


# -- IDs ---------------------------------------------------------------------------

def test_shuffle_is_a_permutation_without_zero_or_early_repeats():
    s = U.Shuffle()
    drawn = [s.generate16() for _ in range(3 * U.SHUFFLE_SIZE)]
    assert 0 not in drawn
    assert sorted(s._ids) == list(range(U.SHUFFLE_SIZE))
    last: dict[int, int] = {}
    gap = U.SHUFFLE_SIZE
    for i, v in enumerate(drawn):
        if v in last:
            gap = min(gap, i - last[v])
        last[v] = i
    assert gap >= 32767
    assert len(set(drawn[:32767])) == 32767


def test_shuffles_differ_and_a_seed_repeats():
    assert U.Shuffle()._ids != U.Shuffle()._ids
    seed = bytes(range(256)) * 1024
    assert U.Shuffle(seed)._ids == U.Shuffle(seed)._ids


def test_id_table_add_match_remove():
    t = U.IdTable(U.Shuffle())
    client, backend = ("127.0.0.9", 5000), ("127.0.0.1", 53)
    ps = [t.add(0x4242, client, backend, now=10.0) for _ in range(5000)]
    ids = {p.id for p in ps}
    assert len(ids) == 5000 and len(t) == 5000
    assert 0 not in ids and 0x4242 not in ids
    p = ps[0]
    assert (p.orig_id, p.client, p.backend) == (0x4242, client, backend)
    assert t.match(p.id, ("127.0.0.1", 53)) is p
    assert t.match(p.id, ("127.0.0.2", 53)) is None              # another source
    assert t.match(p.id, ("127.0.0.1", 54)) is None
    free = next(i for i in range(1, 65536) if i not in ids)
    assert t.match(free, backend) is None
    t.remove(p)
    assert t.match(p.id, backend) is None and len(t) == 4999
    t.remove(p)                                                   # twice: harmless
    assert len(t) == 4999


def test_id_table_ipv6_source_forms():
    t = U.IdTable()
    p = t.add(1, ("::1", 1), ("::1", 53))
    assert t.match(p.id, ("0:0::1", 53, 0, 0)) is p


# -- UdpRelay against trio backends ----------------------------------------------------

class DnsBackend:
    """A UDP DNS responder: records the queries, answers with its A record
    (or not at all with ip=None)."""

    def __init__(self, ip: str | None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.ip = ip
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.host, self.port = host, port
        self.seen: list[bytes] = []

    async def bind(self) -> "DnsBackend":
        await self.sock.bind((self.host, self.port))
        self.port = self.sock.getsockname()[1]
        return self

    async def serve(self) -> None:
        while True:
            data, addr = await self.sock.recvfrom(65535)
            self.seen.append(data)
            if self.ip is not None:
                await self.sock.sendto(answer(data, self.ip), addr)


async def client_query(port: int, q: bytes, timeout: float = 5.0,
                       src: str = "127.0.0.1") -> bytes | None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        await c.bind((src, 0))
        await c.sendto(q, ("127.0.0.1", port))
        with trio.move_on_after(timeout):
            data, _ = await c.recvfrom(65535)
            return data
    return None


def conf_for(forward: str, extra: str = "", glob: str = "log connection\n",
             tables: str = ""):
    return load("relayd.conf", text=(
        f"{glob}{tables}dns protocol \"dns\"\n"
        f'relay "dns" {{\n listen on 127.0.0.1 port 1\n protocol "dns"\n'
        f" {forward}\n{extra}}}\n"))


async def start_relay(nursery, conf, state=None, **kw) -> tuple[U.UdpRelay, int]:
    rl = conf.relays[0]
    sock = U.bind_udp("127.0.0.1", 0, conf.protocol_of(rl))
    state = state or RelayState(conf)
    r = U.UdpRelay(rl, conf.protocol_of(rl), sock, state, conf, listen=rl.listens[0], **kw)
    await nursery.start(r.run)
    return r, sock.getsockname()[1]


def run(fn):
    async def main():
        async with trio.open_nursery() as n:
            await fn(n)
            n.cancel_scope.cancel()
    trio.run(main)


def session_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("relay dns, session ")]


def test_query_id_rewritten_and_restored(capsys):
    stats = Stats()

    async def main(n):
        b = await DnsBackend("192.0.2.7").bind()
        n.start_soon(b.serve)
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}")
        r, port = await start_relay(n, conf, stats=stats)
        q = query(0x1234, edns=True)
        resp = await client_query(port, q)
        assert resp is not None and rid(resp) == 0x1234
        assert answer_ip(resp) == "192.0.2.7" and resp[2:] == answer(q, "192.0.2.7")[2:]
        assert len(b.seen) == 1 and rid(b.seen[0]) != 0x1234
        assert b.seen[0][2:] == q[2:]                         # only the ID changed
        await trio.sleep(0.05)
        assert len(r.ids) == 0 and r.active == 0 and r.state.active["dns"] == 0
        assert stats.sessions == {} and stats.relay("dns")["cnt"] == 1
    run(main)
    lines = session_lines(capsys.readouterr().err)
    assert len(lines) == 1
    assert re.fullmatch(r"relay dns, session 1 \(1 active\), 0, 127\.0\.0\.1 -> "
                        r"127\.0\.0\.1:\d+, done", lines[0]), lines


def test_same_id_from_two_clients(capsys):
    async def main(n):
        b = await DnsBackend("192.0.2.1").bind()
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}")
        r, port = await start_relay(n, conf)
        got: dict[str, bytes | None] = {}

        async def ask(src: str, name: str) -> None:
            got[name] = await client_query(port, query(77, name), src=src)
        # The backend answers only once both queries are in.
        async with trio.open_nursery() as m:
            m.start_soon(ask, "127.0.0.1", "one.example")
            m.start_soon(ask, "127.0.0.2", "two.example")
            while len(b.seen) < 2:
                data, addr = await b.sock.recvfrom(65535)
                b.seen.append((data, addr))
            (q1, a1), (q2, a2) = b.seen
            assert rid(q1) != rid(q2) and 77 not in (rid(q1), rid(q2))
            for q, a in reversed(b.seen):
                await b.sock.sendto(answer(q, "192.0.2.9"), a)
        for name in ("one.example", "two.example"):
            assert got[name] is not None and rid(got[name]) == 77
            assert qname(name) in got[name]
    run(main)


def test_invalid_datagrams_dropped_relay_keeps_working(capsys):
    async def main(n):
        b = await DnsBackend("192.0.2.3").bind()
        n.start_soon(b.serve)
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}")
        r, port = await start_relay(n, conf)
        for junk in (b"hello world\n", b"x", answer(query(5), "10.1.1.1"), b"\0" * 12):
            assert await client_query(port, junk, timeout=0.2) is None
        assert b.seen == [] and r.active == 0
        resp = await client_query(port, query(5))
        assert rid(resp) == 5 and answer_ip(resp) == "192.0.2.3"
    run(main)
    assert len(session_lines(capsys.readouterr().err)) == 1


def test_wrong_answers_ignored_until_the_right_one(capsys):
    async def main(n):
        b = await DnsBackend(None).bind()
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}")
        r, port = await start_relay(n, conf)
        async with trio.open_nursery() as m:
            got = []

            async def ask():
                got.append(await client_query(port, query(9)))
            m.start_soon(ask)
            data, addr = await b.sock.recvfrom(65535)
            await b.sock.sendto(U.set_id(answer(data, "10.0.0.1"), rid(data) ^ 1), addr)
            await b.sock.sendto(data, addr)                      # not a response
            await b.sock.sendto(answer(data, "10.0.0.2"), addr)
        assert rid(got[0]) == 9 and answer_ip(got[0]) == "10.0.0.2"
    run(main)


def test_expiry_after_session_timeout(capsys):
    async def main(n):
        b = await DnsBackend(None).bind()
        n.start_soon(b.serve)
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}", extra=" session timeout 1\n")
        r, port = await start_relay(n, conf)
        assert await client_query(port, query(3), timeout=0.5) is None
        assert len(r.ids) == 1 and r.active == 1
        await trio.sleep(0.8)
        assert len(r.ids) == 0 and r.active == 0
        assert len(b.seen) == 1
    run(main)
    lines = session_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].endswith(", udp timeout")


def test_log_connection_errors_only(capsys):
    async def main(n):
        b = await DnsBackend("192.0.2.3").bind()
        n.start_soon(b.serve)
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}", glob="log connection errors\n")
        r, port = await start_relay(n, conf)
        assert await client_query(port, query(3)) is not None
    run(main)
    assert session_lines(capsys.readouterr().err) == []


def test_roundrobin_table_and_down_hosts(capsys):
    async def main(n):
        for _ in range(20):
            b1 = DnsBackend("192.0.2.1", "127.0.0.1")
            await b1.bind()
            b2 = DnsBackend("192.0.2.2", "127.0.0.2", b1.port)
            try:
                await b2.bind()
                break
            except OSError:
                b1.sock.close()
        n.start_soon(b1.serve)
        n.start_soon(b2.serve)
        conf = conf_for(f"forward to <dns> port {b1.port} mode roundrobin",
                        tables="table <dns> { 127.0.0.1, 127.0.0.2 }\n")
        state = RelayState(conf)
        r, port = await start_relay(n, conf, state=state)
        answers = [answer_ip(await client_query(port, query(i))) for i in range(1, 5)]
        assert answers == ["192.0.2.1", "192.0.2.2"] * 2
        hosts = conf.relays[0].tables[0].table.hosts
        state.disabled_hosts.add(hosts[0].id)                   # relayctl host disable
        answers = [answer_ip(await client_query(port, query(i))) for i in range(3)]
        assert answers == ["192.0.2.2"] * 3
        state.disabled_hosts.add(hosts[1].id)
        assert await client_query(port, query(1), timeout=0.3) is None
    run(main)
    lines = session_lines(capsys.readouterr().err)
    assert len(lines) == 8
    assert lines[-1].endswith(", session failed") and " -> :" in lines[-1]


def test_backup_table_and_address_fallback(capsys):
    async def main(n):
        b = await DnsBackend("192.0.2.5").bind()
        n.start_soon(b.serve)
        conf = conf_for(f"forward to <main> port {b.port}\n forward to <backup> port {b.port}",
                        tables="table <main> { 127.0.0.1 }\ntable <backup> { 127.0.0.1 }\n")
        state = RelayState(conf)
        state.checks = True
        main_t, backup_t = conf.relays[0].tables
        state.set_host(backup_t.table.hosts[0].id, True)
        r, port = await start_relay(n, conf, state=state)
        assert answer_ip(await client_query(port, query(1))) == "192.0.2.5"
        assert rid(b.seen[0]) != 1
    run(main)


def test_refused_backend_ends_session(capsys):
    async def main(n):
        dead = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await dead.bind(("127.0.0.1", 0))
        dport = dead.getsockname()[1]
        dead.close()
        conf = conf_for(f"forward to 127.0.0.1 port {dport}")
        r, port = await start_relay(n, conf)
        assert await client_query(port, query(1), timeout=0.3) is None
        await trio.sleep(0.1)
        assert r.active == 0
    run(main)
    lines = session_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].endswith(", session failed")


def test_forward_to_itself_is_aborted(capsys):
    async def main(n):
        conf = conf_for("forward to 127.0.0.1 port 1")
        r, port = await start_relay(n, conf)
        assert await client_query(port, query(1), timeout=0.2) is None
    run(main)
    assert session_lines(capsys.readouterr().err)[0].endswith(", session aborted")


def test_disabled_relay_drops_everything(capsys):
    async def main(n):
        b = await DnsBackend("192.0.2.3").bind()
        n.start_soon(b.serve)
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}", extra=" disable\n")
        r, port = await start_relay(n, conf)
        assert await client_query(port, query(1), timeout=0.2) is None
        assert b.seen == []
    run(main)


def test_stop_drains_then_returns():
    async def main():
        b = await DnsBackend(None).bind()
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}")
        async with trio.open_nursery() as n:
            n.start_soon(b.serve)
            r, port = await start_relay(n, conf)
            assert await client_query(port, query(1), timeout=0.2) is None
            assert r.active == 1
            r.stop(0.2)
            with trio.fail_after(2):
                await r.wait_stopped()
            assert r.active == 0 and len(r.ids) == 0
            # Not reading any more: a query stays unanswered.
            b.ip = "192.0.2.1"
            assert await client_query(port, query(2), timeout=0.2) is None
            n.cancel_scope.cancel()
    trio.run(main)


def test_dns_debug_lines(capsys):
    log.set_verbose(2)

    async def main(n):
        b = await DnsBackend("192.0.2.3").bind()
        n.start_soon(b.serve)
        conf = conf_for(f"forward to 127.0.0.1 port {b.port}", glob="")
        r, port = await start_relay(n, conf)
        await client_query(port, b"junk", timeout=0.2)
        await client_query(port, query(0x55))
    run(main)
    err = capsys.readouterr().err
    assert "relay_udp_server: relay dns: 127.0.0.1: dropped: short dns packet" in err
    assert "relay_dns_request: session 1: request id 0x55 flags 0x1:0x0 qd 1 an 0 ns 0 ar 0" \
        in err
    assert "relay_dns_result: session 1: response id " in err


# -- sockets and config ---------------------------------------------------------------

def test_udp_listens_only_dns_relays():
    conf = load("relayd.conf", text=(
        'dns protocol "d"\nrelay "a" {\n listen on 127.0.0.1 port 5300\n'
        ' listen on ::1 port 5300\n protocol "d"\n forward to 127.0.0.1 port 53\n}\n'
        'relay "b" {\n listen on 127.0.0.1 port 5301\n forward to 127.0.0.1 port 53\n}\n'))
    assert conf.unimplemented == ()
    keys = list(U.udp_listens(conf))
    assert keys == [("udp", "127.0.0.1", 5300), ("udp", "::1", 5300)]


def test_bind_udp():
    # (relayd.conf allows no tcp options in a dns protocol: defaults here.)
    proto = C.ProtocolConfig(id=1, name="d", type="dns",
                             tcp=C.TcpOptions(socket_buffer=65536, ip_ttl=7))
    s = U.bind_udp("127.0.0.1", 0, proto)
    port = s.getsockname()[1]
    assert s.type == socket.SOCK_DGRAM and not s.getblocking()
    assert s.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 7
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 65536
    with pytest.raises(OSError):                # taken: no SO_REUSEADDR sharing
        U.bind_udp("127.0.0.1", port)
    s.close()
    s6 = U.bind_udp("::1", 0)
    assert s6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    s6.close()
