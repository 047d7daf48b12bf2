"""relayd.hce and the checks: state machine, retry, parent, availability, log
lines, rounds (with a fake clock and scripted check results), and each check
type against small in-process trio backends on loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import ssl
import tempfile
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from relayd import check_http, check_icmp, check_script, check_tcp, hce, metrics
from relayd.config import (CheckConfig, HostConfig, InstanceHost, MetricsConfig,
                           RelaydConfig, TableInstance)
from relayd.hce import Hce, HostState, HostStatus, TableState
from relayd.parse import load
from shared import log
from tests.conftest import proc_state, wait_for

UP, DOWN, UNKNOWN = HostStatus.UP, HostStatus.DOWN, HostStatus.UNKNOWN


# -- helpers -----------------------------------------------------------------

def make_conf(*tables, interval=2, timeout=200, log_changes=False, log_checks=False):
    """RelaydConfig from (name, check, [(host name, retry, parent)...], kwargs)."""
    insts = []
    hid = 0
    for tid, (name, check, hosts, kw) in enumerate(tables, 1):
        ihosts = []
        for hname, retry, parent in hosts:
            hid += 1
            ihosts.append(InstanceHost(id=hid, table_id=tid, parent=parent,
                                       conf=HostConfig(id=hid, name=hname, addr=hname,
                                                       retry=retry)))
        insts.append(TableInstance(id=tid, name=f"{name}:80", table=name, port=80,
                                   check=check, interval=kw.get("interval", interval),
                                   timeout=kw.get("timeout", timeout), hosts=tuple(ihosts),
                                   disabled=kw.get("disabled", False)))
    return RelaydConfig(path="test.conf", interval=interval, timeout=timeout,
                        log_state_changes=log_changes, log_host_checks=log_checks,
                        instances=tuple(insts))


TCP = CheckConfig(type="tcp")


class Scripted:
    """A fake check: results per host name, popped per call (last one sticks)."""

    def __init__(self, results: dict[str, list]) -> None:
        self.results = results
        self.calls: list[str] = []

    async def __call__(self, inst, host, deadline):
        self.calls.append(host.conf.name)
        seq = self.results[host.conf.name]
        res = seq.pop(0) if len(seq) > 1 else seq[0]
        if res == "hang":
            await trio.sleep_until(deadline + 10)
        return res


OK = (check_tcp.HOST_UP, "tcp connect ok", 0)
FAIL = (check_tcp.HOST_DOWN, "tcp connect failed", 0)


@pytest.fixture
def lines(monkeypatch):
    out: list[str] = []
    monkeypatch.setattr(log, "info", out.append)
    return out


def run_engine(conf, fake, body, **kw):
    """Run an Hce with check type tcp replaced by `fake`; body(engine, changes)."""
    changes: list[tuple[int, HostStatus]] = []

    async def main():
        e = Hce(conf, lambda i, s: changes.append((i, s)), debug=False, **kw)
        e.checks["tcp"] = fake
        async with trio.open_nursery() as n:
            await n.start(e.run)
            await body(e, changes)
            n.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return changes


def per_host(changes):
    out: dict = {}
    for i, st in changes:
        out.setdefault(i, []).append(st)
    return out


# -- formatting -----------------------------------------------------------------

def test_availability():
    assert hce.availability(0, 0) == ""
    assert hce.availability(3, 2) == "66.67%"
    assert hce.availability(1, 1) == "100.00%"
    assert hce.availability(8, 0) == "0.00%"


@pytest.mark.parametrize("check,name", [
    (CheckConfig(type="icmp"), "icmp"),
    (CheckConfig(type="tcp"), "tcp"),
    (CheckConfig(type="tls", tls=True), "tcp"),
    (CheckConfig(type="http", path="/", code=200), "http code"),
    (CheckConfig(type="https", tls=True, path="/", code=200), "http code"),
    (CheckConfig(type="http", path="/", digest="a" * 40, digest_type="sha1"), "http digest"),
    (CheckConfig(type="send-expect", expect="x"), "send expect"),
    (CheckConfig(type="binary", expect_binary=b"x"), "send expect"),
    (CheckConfig(type="script", path="/bin/true"), "script"),
])
def test_check_names(check, name):
    assert hce.check_name(check) == name


def test_log_line_format():
    assert hce.format_check("10.0.0.1", "tcp", False, 3, "tcp connect ok", 0,
                            UNKNOWN, UP, 1, 1) == \
        "host 10.0.0.1, check tcp (3ms,tcp connect ok), state unknown -> up, availability 100.00%"
    assert hce.format_check("www", "http code", True, 12, "http code mismatch", 404,
                            UP, DOWN, 3, 2) == \
        ("host www, check http code use tls (12ms,http code mismatch,404), "
         "state up -> down, availability 66.67%")
    # No availability before the first counted check.
    assert hce.format_check("h", "send expect", False, 0, "send/expect failed", 0,
                            UNKNOWN, UNKNOWN, 0, 0) == \
        "host h, check send expect (0ms,send/expect failed), state unknown -> unknown, availability "


# -- HostState -----------------------------------------------------------------

def host_state(retry=0):
    conf = make_conf(("t", TCP, [("h", retry, 0)], {}))
    tbl = TableState(conf.instances[0], conf.interval)
    return HostState(conf.instances[0].hosts[0], tbl, 1)


def test_first_failure_marks_down_despite_retry():
    h = host_state(retry=2)
    assert h.update(*FAIL) == UNKNOWN
    assert h.up == DOWN and h.retry_cnt == 2
    assert (h.check_cnt, h.up_cnt) == (1, 0)


def test_retry_tolerates_n_failures_then_down():
    h = host_state(retry=2)
    h.update(*OK)
    assert h.up == UP and h.retry_cnt == 2
    h.update(*FAIL)
    assert h.up == UP and h.retry_cnt == 1 and h.he == "tcp connect failed"
    h.update(*FAIL)
    assert h.up == UP and h.retry_cnt == 0
    assert h.update(*FAIL) == UP
    assert h.up == DOWN and h.retry_cnt == 2
    # A tolerated failure counts as an up check (OpenBSD keeps the old state).
    assert (h.check_cnt, h.up_cnt) == (4, 3)


def test_success_refills_retries():
    h = host_state(retry=1)
    h.update(*OK)
    h.update(*FAIL)
    assert h.retry_cnt == 0
    h.update(*OK)
    assert h.retry_cnt == 1
    h.update(*FAIL)
    assert h.up == UP


def test_unknown_result_is_not_counted():
    h = host_state()
    h.update(check_tcp.HOST_UNKNOWN, "tls connect error")
    assert h.up == UNKNOWN and h.check_cnt == 0


# -- rounds ------------------------------------------------------------------------

def test_rounds_run_every_interval_and_report_only_flips(lines):
    conf = make_conf(("t", TCP, [("a", 0, 0), ("b", 0, 0)], {}), interval=2)
    fake = Scripted({"a": [OK, OK, FAIL, FAIL, OK], "b": [OK]})

    async def body(e, changes):
        await trio.sleep(9)        # rounds at 0, 2, 4, 6, 8
    changes = run_engine(conf, fake, body)
    assert fake.calls.count("a") == 5
    assert per_host(changes) == {1: [UP, DOWN, UP], 2: [UP]}


def test_retry_in_rounds_goes_down_after_n_plus_1_failures():
    conf = make_conf(("t", TCP, [("a", 2, 0)], {}), interval=1)
    fake = Scripted({"a": [OK, FAIL, FAIL, FAIL, FAIL]})
    seen = []

    async def body(e, changes):
        await trio.sleep(0.5)
        for _ in range(5):
            seen.append(e.state(1))
            await trio.sleep(1)
    run_engine(conf, fake, body)
    assert seen == [UP, UP, UP, DOWN, DOWN]


def test_parent_host_is_not_checked_and_mirrors(lines):
    conf = make_conf(("t", TCP, [("a", 0, 0)], {}),
                     ("u", TCP, [("c", 0, 1)], {}), log_checks=True)
    fake = Scripted({"a": [OK, FAIL]})

    async def body(e, changes):
        await trio.sleep(3)
        assert e.state(2) == DOWN
    changes = run_engine(conf, fake, body)
    assert "c" not in fake.calls
    assert changes == [(1, UP), (2, UP), (1, DOWN), (2, DOWN)]   # parent first, then child
    assert any(line.startswith("host c, check tcp (") and "state up -> down" in line
               for line in lines)


def test_timeout_backstop_aborts_a_hung_check():
    conf = make_conf(("t", TCP, [("a", 0, 0)], {}), interval=5, timeout=100)
    fake = Scripted({"a": ["hang"]})

    async def body(e, changes):
        await trio.sleep(3)
        assert e.hosts[1].he == hce.HCE_ABORT
    assert run_engine(conf, fake, body) == [(1, DOWN)]


def test_table_interval_multiple_of_global():
    conf = make_conf(("t", TCP, [("a", 0, 0)], {"interval": 3}),
                     ("u", TCP, [("b", 0, 0)], {}), interval=1)
    fake = Scripted({"a": [OK], "b": [OK]})

    async def body(e, changes):
        await trio.sleep(5.5)      # rounds 0..5
    run_engine(conf, fake, body)
    assert fake.calls.count("b") == 6
    assert fake.calls.count("a") == 2


def test_poll_checks_now():
    conf = make_conf(("t", TCP, [("a", 0, 0)], {}), interval=60)
    fake = Scripted({"a": [OK]})

    async def body(e, changes):
        await trio.sleep(1)
        assert len(fake.calls) == 1
        e.poll()
        await trio.sleep(1)
        assert len(fake.calls) == 2
    run_engine(conf, fake, body)


def test_logging_state_changes_and_host_checks(lines):
    conf = make_conf(("t", TCP, [("a", 0, 0)], {}), interval=1, log_changes=True)
    fake = Scripted({"a": [OK, OK, FAIL]})

    async def body(e, changes):
        await trio.sleep(2.5)
    run_engine(conf, fake, body)
    assert len(lines) == 2
    assert lines[0].startswith("host a, check tcp (") and \
        lines[0].endswith("ms,tcp connect ok), state unknown -> up, availability 100.00%")
    assert lines[1].endswith("ms,tcp connect failed), state up -> down, availability 66.67%")
    lines.clear()
    conf = make_conf(("t", TCP, [("a", 0, 0)], {}), interval=1, log_checks=True)
    fake = Scripted({"a": [OK]})
    run_engine(conf, fake, body)
    assert len(lines) == 3
    assert lines[1].endswith("state up -> up, availability 100.00%")


def test_debug_logs_state_changes(lines):
    conf = make_conf(("t", TCP, [("a", 0, 0)], {}), interval=1)
    e = Hce(conf, debug=True)
    assert e.log_changes and not e.log_checks


def test_disable_host_and_table():
    conf = make_conf(("t", TCP, [("a", 0, 0), ("b", 0, 0)], {}), interval=1)
    fake = Scripted({"a": [OK], "b": [OK]})

    async def body(e, changes):
        await trio.sleep(0.5)
        assert e.set_disabled(host="a")
        assert e.state(1) == UNKNOWN and e.hosts[1].check_cnt == 0
        n = fake.calls.count("a")
        await trio.sleep(2)
        assert fake.calls.count("a") == n          # not checked while disabled
        assert e.set_disabled(host=1, disabled=False)
        await trio.sleep(1)
        assert e.state(1) == UP
        assert e.set_disabled(table="t:80")
        assert e.state(1) == UNKNOWN and e.state(2) == UNKNOWN
        assert not e.set_disabled(table="nope:1")
        assert not e.set_disabled(host=99)
        snap = e.snapshot()
        assert snap[0]["disabled"] and snap[0]["up"] == 0
    changes = run_engine(conf, fake, body)
    assert per_host(changes) == {1: [UP, UNKNOWN, UP, UNKNOWN], 2: [UP, UNKNOWN]}


def test_config_disabled_table_and_unchecked_table():
    conf = make_conf(("t", TCP, [("a", 0, 0)], {"disabled": True}),
                     ("n", CheckConfig(), [("b", 0, 0)], {}))
    fake = Scripted({"a": [OK]})

    async def body(e, changes):
        await trio.sleep(3)
    changes = run_engine(conf, fake, body)
    assert fake.calls == []
    assert changes == [(2, UP)]          # unchecked tables: hosts are up


def test_reload_carries_state_by_table_and_host_name():
    conf1 = make_conf(("t", TCP, [("a", 0, 0), ("b", 0, 0)], {}), interval=10)
    # New config: another table first (ids shift), b removed, c added.
    conf2 = make_conf(("x", TCP, [("z", 0, 0)], {}),
                      ("t", TCP, [("a", 0, 0), ("c", 0, 0)], {}), interval=10)
    fake = Scripted({"a": [OK, "hang"], "b": [OK], "c": ["hang"], "z": ["hang"]})

    async def body(e, changes):
        await trio.sleep(1)
        assert e.state(1) == UP
        changes.clear()
        e.reload(conf2)
        assert e.state(2) == UP and e.hosts[2].name == "a"
        assert e.hosts[2].check_cnt == 1
        assert e.state(3) == UNKNOWN and e.state(1) == UNKNOWN
        assert changes == [(2, UP)]      # resync by the new id
        await trio.sleep(0.05)
        assert fake.calls.count("a") == 2  # a round started at once
    run_engine(conf1, fake, body)


def test_snapshot_fields():
    conf = make_conf(("t", TCP, [("a", 1, 0)], {}))
    fake = Scripted({"a": [(check_tcp.HOST_DOWN, "http code mismatch", 404)]})

    async def body(e, changes):
        await trio.sleep(1)
        (t,) = e.snapshot()
        assert (t["id"], t["name"], t["check"], t["tls"], t["checked"]) == \
            (1, "t:80", "tcp", False, True)
        (h,) = t["hosts"]
        assert h["state"] == "down" and h["error"] == "http code mismatch"
        assert h["code"] == 404 and h["check_cnt"] == 1 and h["up_cnt"] == 0
        assert h["retry"] == 1 and h["retry_cnt"] == 1
        assert h["availability"] == "0.00%" and h["latency_ms"] >= 0
        assert e.states() == {1: DOWN}
    run_engine(conf, fake, body)


def test_relay_notify_maps_states():
    class S:
        def __init__(self):
            self.seen = []

        def set_host(self, i, up):
            self.seen.append((i, up))
    s = S()
    f = hce.relay_notify(s)
    f(1, UP), f(2, DOWN), f(3, UNKNOWN)
    assert s.seen == [(1, True), (2, False), (3, None)]


# -- fnmatch and parsers -------------------------------------------------------------

@pytest.mark.parametrize("pat,data,ok", [
    ("220 *", b"220 mail ESMTP\r\n", True),
    ("220 *", b"221 bye\r\n", False),
    ("*OK*", b"+OK ready\r\n", True),
    ("?", b"a", True),
    ("?", b"ab", False),
    ("[0-9][0-9]", b"42", True),
    ("[!0-9]", b"4", False),
    ("[^0-9]", b"x", True),
    ("a\\*", b"a*", True),
    ("a\\*", b"ab", False),
    ("*/*", b"a/b", True),           # flags 0: `*` crosses slashes
    (".*", b".hidden", True),
    ("[]]", b"]", True),
    ("[", b"[", True),
    ("abc", b"abc\0junk", True),     # the C string ends at NUL
])
def test_fnmatch(pat, data, ok):
    assert check_tcp.fnmatch(pat, data) is ok


@pytest.mark.parametrize("buf,want,res", [
    (b"HTTP/1.1 200 OK\r\n", 200, (1, "http code ok", 0)),
    (b"HTTP/1.0 200 OK\r\n\r\n", 200, (1, "http code ok", 0)),
    (b"HTTP/1.1 404 Not Found\r\n", 200, (-1, "http code mismatch", 404)),
    (b"HTTP/2 200\r\n", 200, (-1, "http code malformed", 0)),
    (b"SSH-2.0-OpenSSH\r\n", 200, (-1, "http code malformed", 0)),
    (b"HTTP/1.1 20", 200, (-1, "http code malformed", 0)),
    (b"HTTP/1.1 abc OK\r\n", 200, (-1, "http code malformed", 0)),
    (b"HTTP/1.1 099 x\r\n", 99, (-1, "http code malformed", 0)),
])
def test_http_code(buf, want, res):
    assert check_http.http_code(buf, want) == res


def test_icmp_packets():
    pkt = check_icmp.echo_request(socket.AF_INET, 0x1234, 7, b"cookie" + bytes(50), raw=True)
    assert pkt[0] == 8 and check_icmp.checksum(pkt) == 0
    reply = bytes([0]) + pkt[1:]
    iphdr = bytes([0x45]) + bytes(19)
    assert check_icmp.parse_reply(socket.AF_INET, iphdr + reply, raw=True) == \
        (0x1234, 7, b"cookie" + bytes(50))
    assert check_icmp.parse_reply(socket.AF_INET, reply, raw=False)[:2] == (0x1234, 7)
    assert check_icmp.parse_reply(socket.AF_INET, iphdr + pkt, raw=True) is None  # request
    six = check_icmp.echo_request(socket.AF_INET6, 1, 2, b"x", raw=True)
    assert six[0] == 128
    assert check_icmp.parse_reply(socket.AF_INET6, bytes([129]) + six[1:], raw=True) == \
        (1, 2, b"x")


# -- checks against loopback backends -------------------------------------------------

def inst_for(port: int, check: CheckConfig, addr="127.0.0.1", timeout=500):
    host = InstanceHost(id=1, table_id=1, conf=HostConfig(id=1, name=addr, addr=addr))
    return TableInstance(id=1, name=f"t:{port}", table="t", port=port, check=check,
                         interval=10, timeout=timeout, hosts=(host,)), host


def run_check(handler, check: CheckConfig, fn=None, timeout=0.5, tls_ctx=None):
    """Serve `handler(stream)` on loopback and run one check against it."""
    result = []

    async def main():
        async with trio.open_nursery() as n:
            port = 0
            if handler is not None:
                async def wrapped(stream):
                    if tls_ctx is not None:
                        stream = trio.SSLStream(stream, tls_ctx, server_side=True)
                    try:
                        await handler(stream)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                lst = await n.start(partial(trio.serve_tcp, wrapped, 0, host="127.0.0.1"))
                port = lst[0].socket.getsockname()[1]
            else:
                port = closed_port()
            inst, host = inst_for(port, check)
            f = fn or (check_http.check if check.type in ("http", "https") else check_tcp.check)
            result.append(await f(inst, host, trio.current_time() + timeout))
            n.cancel_scope.cancel()
    trio.run(main)
    return result[0]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def reply(data: bytes, read=True, close=True):
    async def handler(stream):
        if read:
            await stream.receive_some(4096)
        if data:
            await stream.send_all(data)
        if close:
            await stream.aclose()
        else:
            await trio.sleep_forever()
    return handler


def test_tcp_ok_and_failed():
    assert run_check(reply(b"", read=False), TCP) == (1, "tcp connect ok", 0)
    assert run_check(None, TCP) == (-1, "tcp connect failed", 0)


def test_tcp_connect_timeout():
    # A listener with a full accept queue drops SYNs: connect hangs.
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    try:
        async def main():
            inst, host = inst_for(port, TCP)
            return await check_tcp.check(inst, host, trio.current_time() + 0.3)
        assert trio.run(main) == (-1, "tcp connect timeout", 0)
    finally:
        for s in fillers:
            s.close()
        lst.close()


def test_send_expect():
    chk = CheckConfig(type="send-expect", send=b"HELO x\r\n", expect="250 *")
    got = []

    async def smtp(stream):
        got.append(await stream.receive_some(100))
        await stream.send_all(b"250 hello\r\n")
        await trio.sleep_forever()      # keeps the connection: decided on read
    assert run_check(smtp, chk) == (1, "send/expect ok", 0)
    assert got == [b"HELO x\r\n"]
    banner = CheckConfig(type="send-expect", send=None, expect="220 *")
    assert run_check(reply(b"220 mail\r\n", read=False, close=False), banner) == \
        (1, "send/expect ok", 0)
    # Mismatch: decided at the close, or with what came at the deadline.
    assert run_check(reply(b"554 go away\r\n", read=False), banner) == \
        (-1, "send/expect failed", 0)
    assert run_check(reply(b"554 go away\r\n", read=False, close=False), banner,
                     timeout=0.2) == (-1, "send/expect failed", 0)
    assert run_check(reply(b"", read=False, close=False), banner, timeout=0.2) == \
        (-1, "tcp read timeout", 0)


def test_binary_send_expect():
    chk = CheckConfig(type="binary", send=b"\x01\x02", expect_binary=b"\xca\xfe")
    assert run_check(reply(b"\xca\xfe\x00rest"), chk) == (1, "send/expect ok", 0)
    assert run_check(reply(b"\xca\xfd"), chk) == (-1, "send/expect failed", 0)


def test_http_code_checks():
    got = []

    async def server(stream):
        got.append(await stream.receive_some(4096))
        await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()
    chk = CheckConfig(type="http", path="/health", code=200)
    assert run_check(server, chk) == (1, "http code ok", 0)
    assert got == [b"HEAD /health HTTP/1.0\r\n\r\n"]
    chk11 = CheckConfig(type="http", path="/", host="www.example.com", code=200)
    assert run_check(server, chk11) == (1, "http code ok", 0)
    assert got[1] == b"HEAD / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n"
    assert run_check(reply(b"HTTP/1.1 404 Not Found\r\n\r\n"), chk) == \
        (-1, "http code mismatch", 404)
    assert run_check(reply(b"garbage\r\n"), chk) == (-1, "http code malformed", 0)
    # Status line complete but the server keeps the connection: no need to wait.
    assert run_check(reply(b"HTTP/1.1 200 OK\r\n", close=False), chk, timeout=5) == \
        (1, "http code ok", 0)
    # A backend slower than the timeout.
    async def slow(stream):
        await stream.receive_some(4096)
        await trio.sleep(1)
        await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\n")
    assert run_check(slow, chk, timeout=0.2) == (-1, "tcp read timeout", 0)


def test_http_digest_checks():
    body = b"hello world\n"
    sha1 = hashlib.sha1(body).hexdigest()
    md5 = hashlib.md5(body).hexdigest()
    got = []

    async def server(stream):
        got.append(await stream.receive_some(4096))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                              + body)
        await trio.sleep_forever()      # keep-alive server: Content-Length ends it
    chk = CheckConfig(type="http", path="/d", digest=sha1, digest_type="sha1")
    assert run_check(server, chk, timeout=5) == (1, "http digest ok", 0)
    assert got == [b"GET /d HTTP/1.0\r\n\r\n"]
    chk5 = CheckConfig(type="http", path="/d", digest=md5, digest_type="md5")
    assert run_check(server, chk5, timeout=5) == (1, "http digest ok", 0)
    bad = CheckConfig(type="http", path="/d", digest="0" * 40, digest_type="sha1")
    assert run_check(server, bad, timeout=5) == (-1, "http digest mismatch", 0)
    # Close-delimited body.
    assert run_check(reply(b"HTTP/1.0 200 OK\r\n\r\n" + body), chk) == (1, "http digest ok", 0)
    assert run_check(reply(b"junk\r\n\r\n"), chk) == (-1, "http digest malformed", 0)


@pytest.fixture(scope="module")
def tls_server_ctx():
    import trustme
    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(ctx)
    return ctx


def test_tls_and_https(tls_server_ctx):
    async def hello(stream):
        await stream.do_handshake()
        await stream.aclose()
    tls = CheckConfig(type="tls", tls=True)
    assert run_check(hello, tls, tls_ctx=tls_server_ctx) == (1, "tls connect ok", 0)
    # A plain server that answers the ClientHello with text and closes.
    assert run_check(reply(b"HTTP/1.0 400 Bad\r\n\r\n"), tls) == (-1, "tls connect failed", 0)
    assert run_check(reply(b"", read=False, close=False), tls, timeout=0.2) == \
        (-1, "tls connect timeout", 0)

    async def https(stream):
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 302 Found\r\n\r\n")
        await stream.aclose()
    chk = CheckConfig(type="https", tls=True, path="/", code=302)
    assert run_check(https, chk, tls_ctx=tls_server_ctx) == (1, "http code ok", 0)


def test_ttl_is_applied():
    # ip ttl 1 still reaches loopback; an invalid TTL is a socket option error.
    async def main():
        lst = trio.socket.socket()
        await lst.bind(("127.0.0.1", 0))
        lst.listen(5)
        port = lst.getsockname()[1]
        host = InstanceHost(id=1, table_id=1,
                            conf=HostConfig(id=1, name="h", addr="127.0.0.1", ip_ttl=1))
        inst = TableInstance(id=1, name="t", table="t", port=port, check=TCP,
                             interval=10, timeout=500, hosts=(host,))
        ok = await check_tcp.check(inst, host, trio.current_time() + 1)
        host2 = InstanceHost(id=1, table_id=1,
                             conf=HostConfig(id=1, name="h", addr="127.0.0.1", ip_ttl=999))
        bad = await check_tcp.check(inst, host2, trio.current_time() + 1)
        lst.close()
        return ok, bad
    assert trio.run(main) == ((1, "tcp connect ok", 0), (-1, "tcp socket option", 0))


# -- scripts -----------------------------------------------------------------------

@pytest.fixture
def script_dir():
    # World-accessible (pytest's tmp_path is not): scripts may run as nobody
    # and write there.
    d = tempfile.mkdtemp(prefix="hce-scripts-")
    os.chmod(d, 0o777)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def write_script(d, name, text):
    p = d / name
    p.write_text("#!/bin/sh\n" + text)
    p.chmod(0o755)
    return str(p)


def script_result(path, name="host1", timeout=1.0):
    async def main():
        host = InstanceHost(id=1, table_id=1, conf=HostConfig(id=1, name=name, addr="127.0.0.1"))
        inst = TableInstance(id=1, name="t:1", table="t", port=1,
                             check=CheckConfig(type="script", path=path),
                             interval=10, timeout=int(timeout * 1000), hosts=(host,))
        t0 = trio.current_time()
        res = await check_script.check(inst, host, t0 + timeout)
        return res, trio.current_time() - t0
    return trio.run(main)


def test_script_exit_status(script_dir):
    assert script_result(write_script(script_dir, "up", "exit 1\n"))[0] == (1, "script ok", 0)
    assert script_result(write_script(script_dir, "up3", "exit 3\n"))[0] == (1, "script ok", 0)
    assert script_result(write_script(script_dir, "down", "exit 0\n"))[0] == \
        (-1, "script failed", 0)
    assert script_result(str(script_dir / "missing"))[0] == (-1, "script failed", 0)


def test_script_gets_host_name_and_runs_unprivileged(script_dir):
    out = script_dir / "out"
    path = write_script(script_dir, "who", f'echo "$1 $(id -u)" > {out}\nexit 1\n')
    assert script_result(path, name="www.example.com")[0] == (1, "script ok", 0)
    name, uid = out.read_text().split()
    assert name == "www.example.com"
    if os.geteuid() == 0:
        assert int(uid) != 0
    else:
        assert int(uid) == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_script_in_root_only_directory_still_runs(tmp_path):
    d = tmp_path / "private"
    d.mkdir()
    d.chmod(0o700)
    path = write_script(d, "s", "exit 1\n")
    assert script_result(path)[0] == (1, "script ok", 0)


def test_script_killed_at_timeout(script_dir):
    """Killed with its process group: the script's own child is gone too
    when the check answers (a wait for the script would answer "script ok"
    after 30 s instead)."""
    pidfile = script_dir / "sleep.pid"
    path = write_script(script_dir, "slow",
                        f"sleep 30 &\necho $! > {pidfile}\nwait\nexit 1\n")
    res, _ = script_result(path, timeout=1.0)     # time enough to write the pid
    assert res == (-1, "script failed", 0)
    pid = int(pidfile.read_text())
    wait_for(lambda: not alive(pid), what=f"sleep {pid} killed")


def alive(pid: int) -> bool:
    """pid exists and is not a zombie."""
    st = proc_state(pid)
    return st is not None and st[0] != "Z"


# -- icmp --------------------------------------------------------------------------

def test_icmp_loopback():
    p = check_icmp.Pinger(socket.AF_INET)
    # Root (CI) has raw sockets; others need net.ipv4.ping_group_range.
    assert p.open(), f"no ICMP socket: {p.failed}"
    got = {}

    async def main():
        now = trio.current_time()
        await p.ping_all([("lo", "127.0.0.1", 0, now + 1), ("ttl", "127.0.0.1", 5, now + 1)],
                         lambda k, r: got.setdefault(k, r))
    try:
        trio.run(main)
    finally:
        p.close()
    assert got == {"lo": (1, "icmp ok", 0), "ttl": (1, "icmp ok", 0)}


def test_icmp6_loopback_and_timeout():
    p = check_icmp.Pinger(socket.AF_INET6)
    assert p.open(), f"no ICMPv6 socket: {p.failed}"
    got = {}

    async def main():
        now = trio.current_time()
        # 100::/64 is the IPv6 discard prefix (RFC 6666): never answers.
        await p.ping_all([("lo", "::1", 0, now + 1), ("void", "100::1", 0, now + 0.3)],
                         lambda k, r: got.setdefault(k, r))
    try:
        trio.run(main)
    finally:
        p.close()
    assert got["lo"] == (1, "icmp ok", 0)
    assert got["void"][0] == -1 and got["void"][1] in ("icmp read timeout", "icmp write timeout")


# -- metrics -----------------------------------------------------------------------

def test_metrics_exposition_and_server():
    conf = make_conf(("t", TCP, [("a", 0, 0)], {}))
    fake = Scripted({"a": [OK]})
    m = metrics.Metrics()
    m.session_done("www")
    m.session_done("www", error=True)

    class State:
        active = {"www": 2}
    m.attach_relay(State())
    port = closed_port()
    out = {}

    async def body(e, changes):
        m.attach_hce(e)
        await trio.sleep(0.5)
        text = m.render().decode()
        out["text"] = text
        async with trio.open_nursery() as n:
            await n.start(metrics.serve_metrics, MetricsConfig(addrs=("127.0.0.1",), port=port), m)
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            with trio.move_on_after(5):
                while chunk := await s.receive_some(65536):
                    data += chunk
            out["http"] = data.decode()
            n.cancel_scope.cancel()
    # Real sockets for the server: no autojump clock here.
    changes: list = []

    async def main():
        e = Hce(conf, lambda i, s: changes.append((i, s)), debug=False)
        e.checks["tcp"] = fake
        async with trio.open_nursery() as n:
            await n.start(e.run)
            await body(e, changes)
            n.cancel_scope.cancel()
    trio.run(main)
    text = out["text"]
    assert 'relayd_host_state{host="a",id="1",table="t:80"} 1.0' in text
    assert 'relayd_host_up{host="a",id="1",table="t:80"} 1.0' in text
    assert 'relayd_host_checks_total{host="a",id="1",table="t:80"} 1.0' in text
    assert "relayd_host_check_latency_seconds{" in text
    assert 'relayd_table_hosts_up{table="t:80"} 1.0' in text
    assert 'relayd_relay_sessions_total{relay="www"} 2.0' in text
    assert 'relayd_relay_session_errors_total{relay="www"} 1.0' in text
    assert 'relayd_relay_sessions_active{relay="www"} 2.0' in text
    assert "relayd_demote" not in text                  # no carp.Demote attached
    http = out["http"]
    assert http.startswith("HTTP/1.1 200 OK\r\n")
    assert "Content-Type: text/plain; version=" in http and "relayd_host_state" in http
    assert "HTTP/1.1 404 Not Found" in http


def test_parse_to_engine():
    conf = load("x.conf", text="""
interval 5
timeout 300
table <web> { 127.0.0.1 retry 2, 127.0.0.2 parent 1 }
relay "r" {
  listen on 127.0.0.1 port 18080
  forward to <web> port 8080 check http "/" code 200
  forward to <web> port 8081 timeout 100 interval 10 check tcp
}
""")
    e = Hce(conf, debug=False)
    t1, t2 = e.tables
    assert (t1.conf.name, t2.conf.name) == ("web:8080", "web:8081")
    assert t1.skip == 0 and t2.skip == 1
    assert [h.parent for h in t1.hosts] == [0, 1]
    assert e.hosts[2] in e.hosts[1].children


# -- a new hce process: its port rule and its seed ------------------------------------

def test_check_ports_are_tcp_style_checks_only():
    conf = make_conf(("t", TCP, [("a", 0, 0)], {}),
                     ("h", CheckConfig(type="http"), [("b", 0, 0)], {"disabled": True}),
                     ("i", CheckConfig(type="icmp"), [("c", 0, 0)], {}),
                     ("s", CheckConfig(type="script", path="/bin/true"), [("d", 0, 0)], {}),
                     ("n", CheckConfig(type="none"), [("e", 0, 0)], {}))
    insts = list(conf.instances)
    # make_conf gives every instance port 80: one port each here
    conf = dataclasses.replace(conf, instances=tuple(
        dataclasses.replace(x, port=8000 + n) for n, x in enumerate(insts)))
    # tcp and http (a disabled table may be enabled by relayctl); not icmp, script, none
    assert hce.check_ports(conf) == (8000, 8001)


def test_seed_starts_from_known_states_without_flapping():
    conf = make_conf(("t", TCP, [("a", 2, 0), ("b", 0, 0), ("c", 0, 0)], {}),
                     ("u", TCP, [("d", 0, 0)], {}), interval=10)
    fake = Scripted({"a": [FAIL, OK], "b": [OK], "c": [OK], "d": ["hang"]})

    async def body(e, changes):
        await trio.sleep(1)
        # a: up with its retries in hand (one failure tolerated), b: down,
        # c: unknown (not seeded), d: its table disabled by relayctl
        assert e.state(1) == UP and e.hosts[1].retry_cnt == 1
        assert e.state(2) == UP and e.state(3) == UP
        assert e.find_table(2).disabled and e.state(4) == UNKNOWN
        assert "d" not in fake.calls
        # the seeded states were reported once (d's switch, then run()'s
        # resync), then only flips
        assert per_host(changes) == {4: [UNKNOWN], 1: [UP], 2: [DOWN, UP], 3: [UP]}

    changes: list = []

    async def main():
        e = Hce(conf, lambda i, s: changes.append((i, s)), debug=False)
        e.checks["tcp"] = fake
        hce.seed(e, {1: "up", 2: "down", 9: "up", 4: "up"}, (), {2: True})
        async with trio.open_nursery() as n:
            await n.start(e.run)
            await body(e, changes)
            n.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_metrics_demote_counters(tmp_path):
    from relayd import carp
    d = carp.Demote(str(tmp_path))
    d.configure({"carp", "other"})
    d.set("carp", 1, True)
    d.commit()
    m = metrics.Metrics(remote=True)
    m.attach_demote(d)
    text = m.render().decode()
    assert 'relayd_demote{group="carp"} 1.0' in text
    assert 'relayd_demote{group="other"} 0.0' in text
