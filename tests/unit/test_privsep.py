"""Privilege separation pieces: Supervisor's handling of bad messages and
lost children, Pending, relay_shm's shared counters across processes, and
systemd socket activation (shared.sd)."""

from __future__ import annotations

import multiprocessing
import os
import socket

import pytest
import trio

from relayd import parse
from relayd.relay_shm import ParentSlots, Shared
from shared import proc, sd
from shared.imsg import Imsg, ImsgError
from tests.conftest import REPO

CONF = """table <web> { 127.0.0.1, 127.0.0.2, 127.0.0.3 }
relay "lb" {
	listen on 127.0.0.1 port 9999
	forward to <web> port 80 mode roundrobin
}
"""


def _conf():
    return parse.load("relayd.conf", text=CONF)


# -- Supervisor ---------------------------------------------------------------

async def _setup(child):
    await child.chan.send(Imsg.CFG_CONFIG, {})
    await child.chan.send(Imsg.CFG_DONE)


@pytest.mark.parametrize("mode", ["junk", "bad"])
def test_bad_message_kills_child_and_it_is_restarted(mode, capfd, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(proc, "RESTART_PAUSE", 0.0)

    async def on_message(child, msg):
        if msg.type != Imsg.HOST_STATUS:
            raise ImsgError(f"unexpected message type {msg.type}")
        int(msg.payload["id"])

    async def main():
        async with trio.open_nursery() as n:
            sup = proc.Supervisor("tests.unit.privsep_child", [], n, on_message=on_message)
            first = await sup.start(mode, 0, 1, _setup)
            with trio.fail_after(20):
                while first in sup.children or not sup.children:
                    await trio.sleep(0.05)
                second = sup.children[0]
                await second.ready.wait()
            assert second.pid != first.pid
            sup.stopping = True
            await sup.stop(list(sup.children), 0)
            n.cancel_scope.cancel()
        return first.pid
    pid = trio.run(main)
    err = capfd.readouterr().err
    assert f"killing pid {pid}" in err
    assert f"lost child: pid {pid} terminated; signal 9" in err


def test_pending_answers_only_its_peer():
    async def main():
        p = proc.Pending()
        seq, wait = p.new(peer=1)
        assert not p.answer({"seq": seq, "result": "x"}, peer=2)
        assert p.answer({"seq": seq, "result": "ok"}, peer=1)
        assert await wait(1) == "ok"
        seq, wait = p.new(peer=3)
        p.fail_peer(3)
        assert await wait(1) is None
        with pytest.raises(ValueError):
            p.answer({"result": 1})
    trio.run(main)


# -- shared relay counters ---------------------------------------------------------

def _worker(fd, names, w, base, n, q):
    conf = _conf()
    sh = Shared(fd, conf, names, w, base)
    ids = [sh.next_id() for _ in range(n)]
    sh.open("lb", 1)
    q.put(ids)


def test_shared_session_ids_and_active_counts():
    conf = _conf()
    slots = ParentSlots()
    base = slots.rr_block(conf)
    names = slots.name_slots(conf)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(slots.fd, names, slots.worker(), base, 200, q))
          for _ in range(3)]
    for p in ps:
        p.start()
    got = sorted(i for _ in ps for i in q.get(timeout=20))
    for p in ps:
        p.join(20)
    assert got == list(range(1, 601))          # one sequence, no duplicates
    view = Shared(slots.fd, conf, names, slots.worker(), base)
    assert view.active("lb") == 3
    slots.release(0)                           # worker slot 0 died
    assert view.active("lb") == 2


def test_shared_roundrobin_positions():
    conf = _conf()
    slots = ParentSlots()
    base = slots.rr_block(conf)
    names = slots.name_slots(conf)
    a = Shared(slots.fd, conf, names, slots.worker(), base)
    b = Shared(slots.fd, conf, names, slots.worker(), base)
    rl = conf.relays[0]
    inst = rl.tables[0].table
    ra = a.roundrobin(rl.listens[0].id or rl.id, inst.id)
    rb = b.roundrobin(rl.listens[0].id or rl.id, inst.id)
    assert ra.index == -1
    ra.index = 1
    assert rb.index == 1
    # A new generation starts over.
    base2 = slots.rr_block(conf)
    c = Shared(slots.fd, conf, names, slots.worker(), base2)
    assert c.roundrobin(rl.listens[0].id or rl.id, inst.id).index == -1


# -- socket activation ---------------------------------------------------------

def test_sd_take_matches_address_and_port(monkeypatch):
    s4 = socket.socket()
    s4.bind(("127.0.0.1", 0))
    s4.listen(1)
    s6 = None
    if socket.has_ipv6:
        try:
            s6 = socket.socket(socket.AF_INET6)
            s6.bind(("::1", 0))
            s6.listen(1)
        except OSError:
            s6 = None
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    pool = [x for x in (udp, s4, s6) if x is not None]
    sd.reset_for_tests(list(pool))
    try:
        assert sd.take("127.0.0.1", udp.getsockname()[1]) is None     # not a stream
        assert sd.take("127.0.0.2", s4.getsockname()[1]) is None
        got = sd.take("127.0.0.1", s4.getsockname()[1])
        assert got is s4 and not got.getblocking()
        assert sd.take("127.0.0.1", s4.getsockname()[1]) is None       # taken once
        if s6 is not None:
            assert sd.take("0:0::1", s6.getsockname()[1]) is s6
    finally:
        sd.reset_for_tests(None)
        for x in pool:
            x.close()


def test_sd_listen_fds_ignores_other_pid(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    sd.reset_for_tests(None)
    try:
        assert sd.listen_fds() == []
        assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
    finally:
        sd.reset_for_tests(None)


def test_sd_notify(tmp_path, monkeypatch):
    path = str(tmp_path / "n.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd.notify("READY=1")
    assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd.notify("READY=1")
    s.close()
