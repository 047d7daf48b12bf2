"""relayd.relay: Session.connect() backend choice and errors, close_log()
lines, RelayState host states.  Backends are loopback listening sockets."""

from __future__ import annotations

import socket

import pytest
import trio

from relayd.parse import load
from relayd.errors import BackendError
from relayd.relay_session import RelayState, Session
from shared import log

IP_MINTTL = getattr(socket, "IP_MINTTL", 21)


class FakeClient:
    peer = ("127.0.0.9", 40000)
    local = ("127.0.0.1", 8080)


def listener(host: str = "127.0.0.1", minttl: int | None = None) -> socket.socket:
    s = socket.socket()
    if minttl:
        s.setsockopt(socket.IPPROTO_IP, IP_MINTTL, minttl)
    s.bind((host, 0))
    s.listen(16)
    return s


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session(text: str, state: RelayState | None = None, relay: int = 0) -> Session:
    conf = load("relayd.conf", text=text)
    rl = conf.relays[relay]
    state = state or RelayState(conf)
    s = Session(state, conf, rl, rl.listens[0], conf.protocol_of(rl), FakeClient())
    state.active[s.name] = state.active.get(s.name, 0) + 1
    return s


def connect(s: Session, *args) -> tuple[str, int]:
    async def main():
        t = await s.connect(*args)
        await t.aclose()
        return s.backend
    return trio.run(main)


def connect_error(s: Session, *args) -> BackendError:
    with pytest.raises(BackendError) as e:
        trio.run(lambda: s.connect(*args))
    return e.value


@pytest.fixture(autouse=True)
def stderr_log():
    log.init(debug=True, verbose=0)


# -- backend choice ---------------------------------------------------------------

def test_address_forward():
    b = listener()
    port = b.getsockname()[1]
    s = session(f'relay "r" {{ listen on 127.0.0.1 port 1 \n forward to 127.0.0.1 port {port} }}')
    assert connect(s) == ("127.0.0.1", port)
    b.close()


def test_rule_table_chosen_by_forward_to():
    a, b = listener(), listener()
    pa, pb = a.getsockname()[1], b.getsockname()[1]
    text = (f"table <a> {{ 127.0.0.1 }}\ntable <b> {{ 127.0.0.1 }}\n"
            f'relay "r" {{ listen on 127.0.0.1 port 1\n forward to <a> port {pa}\n'
            f" forward to <b> port {pb} }}")
    assert connect(session(text)) == ("127.0.0.1", pa)
    assert connect(session(text), "b") == ("127.0.0.1", pb)
    assert connect(session(text), "nosuch") == ("127.0.0.1", pa)
    a.close()
    b.close()


def test_backup_table_when_main_has_no_host_up():
    a, b = listener(), listener()
    pa, pb = a.getsockname()[1], b.getsockname()[1]
    text = (f"table <a> {{ 127.0.0.1 }}\ntable <b> {{ 127.0.0.1 }}\n"
            f'relay "r" {{ listen on 127.0.0.1 port 1\n'
            f" forward to <a> port {pa} check tcp\n forward to <b> port {pb} check tcp }}")
    conf = load("relayd.conf", text=text)
    state = RelayState(conf)
    state.checks = True
    main, backup = conf.relays[0].tables
    assert connect_error(session(text, state)).status == 503       # all unknown
    state.set_host(backup.table.hosts[0].id, True)
    assert connect(session(text, state)) == ("127.0.0.1", pb)
    state.set_host(main.table.hosts[0].id, True)
    assert connect(session(text, state)) == ("127.0.0.1", pa)
    state.set_host(main.table.hosts[0].id, False)
    assert connect(session(text, state)) == ("127.0.0.1", pb)
    a.close()
    b.close()


def test_refused_main_table_falls_over_to_backup():
    b = listener()
    pb = b.getsockname()[1]
    text = (f"table <a> {{ 127.0.0.1 }}\ntable <b> {{ 127.0.0.1 }}\n"
            f'relay "r" {{ listen on 127.0.0.1 port 1\n forward to <a> port {dead_port()}\n'
            f" forward to <b> port {pb} }}")
    assert connect(session(text)) == ("127.0.0.1", pb)
    b.close()


def test_refused_address_is_502():
    port = dead_port()
    s = session(f'relay "r" {{ listen on 127.0.0.1 port 1\n forward to 127.0.0.1 port {port} }}')
    e = connect_error(s)
    assert (e.status, e.msg) == (502, "session failed")
    assert s.backend == ("127.0.0.1", port)


def test_connect_timeout_is_504():
    b = listener(minttl=255)          # drops our TTL-64 SYNs: connect hangs
    port = b.getsockname()[1]
    s = session(f'relay "r" {{ listen on 127.0.0.1 port 1\n forward to 127.0.0.1 port {port}\n'
                " session timeout 1 }")
    e = connect_error(s)
    assert (e.status, e.msg) == (504, "connect timeout")
    b.close()


def test_loop_to_own_listener_is_aborted():
    s = session('relay "r" { listen on 127.0.0.1 port 7777\n forward to 127.0.0.1 port 7777 }')
    assert connect_error(s).msg == "session aborted"


def test_roundrobin_position_per_relay():
    # The same port on two addresses: retry a few fresh ports if one is taken.
    for _ in range(20):
        bs = [listener("127.0.0.1")]
        port = bs[0].getsockname()[1]
        try:
            bs.append(socket.create_server(("127.0.0.2", port)))
            break
        except OSError:
            bs[0].close()
    else:
        raise AssertionError("no port free on both 127.0.0.1 and 127.0.0.2")
    text = (f"table <t> {{ 127.0.0.1, 127.0.0.2 }}\n"
            f'relay "r" {{ listen on 127.0.0.1 port 1\n forward to <t> port {port} }}\n'
            f'relay "q" {{ listen on 127.0.0.1 port 2\n forward to <t> port {port} }}\n')
    conf = load("relayd.conf", text=text)
    state = RelayState(conf)

    def pick(relay: int) -> str:
        rl = conf.relays[relay]
        s = Session(state, conf, rl, rl.listens[0], conf.protocol_of(rl), FakeClient())
        return connect(s)[0]
    assert [pick(0), pick(0), pick(1), pick(0), pick(1)] == [
        "127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.1", "127.0.0.2"]
    for b in bs:
        b.close()


# -- RelayState -------------------------------------------------------------------------

def test_state_carries_over_reload_by_names():
    text = "table <t> {{ 127.0.0.1, 127.0.0.2 }}\n" \
           'relay "r" {{ listen on 127.0.0.1 port 1\n forward to <t> port {p} check tcp }}'
    c1 = load("relayd.conf", text=text.format(p=80))
    st = RelayState(c1)
    st.checks = True
    h1, h2 = c1.instances[0].hosts
    st.set_host(h1.id, False)
    st.set_host(h2.id, True)
    assert (st.host_up(h1.id), st.host_up(h2.id)) == (False, True)
    st.configure(load("relayd.conf", text=text.format(p=80)))
    assert (st.host_up(h1.id), st.host_up(h2.id)) == (False, True)
    c3 = load("relayd.conf", text=text.format(p=81))     # another instance: unknown
    st.configure(c3)
    assert not any(st.host_up(h.id) for h in c3.instances[0].hosts)


def test_unchecked_and_disabled_tables():
    conf = load("relayd.conf", text="table <t> { 127.0.0.1 }\ntable <d> disable { 127.0.0.2 }\n"
                'relay "r" { listen on 127.0.0.1 port 1\n forward to <t> port 80\n'
                " forward to <d> port 80 }")
    st = RelayState(conf)
    st.checks = True
    t, d = conf.instances
    st.set_host(t.hosts[0].id, False)
    assert st.host_up(t.hosts[0].id)           # no check: always up
    assert not st.host_up(d.hosts[0].id)
    st.set_table(d.id, False)
    assert st.host_up(d.hosts[0].id)
    st.set_table(t.id, True)
    assert not st.host_up(t.hosts[0].id)


# -- close_log --------------------------------------------------------------------------

RELAY = 'relay "web" { listen on 127.0.0.1 port 1\n forward to 127.0.0.1 port 8080 }\n'


def test_close_log_line(capsys):
    s = session("log connection\n" + RELAY)
    s.backend = ("127.0.0.2", 8080)
    s.close_log("done")
    assert capsys.readouterr().err == \
        "relay web, session 1 (1 active), 0, 127.0.0.9 -> 127.0.0.2:8080, done\n"


def test_close_log_items_and_tag(capsys):
    s = session("log connection\n" + RELAY)
    s.tag = "mytag"
    s.log_items += [" [Host: a]", " GET", " {Server: x}", ";", " GET"]
    s.close_log("done")
    s.close_log("done")                      # written once
    assert capsys.readouterr().err == (
        "relay web, session 1 (1 active), mytag, 127.0.0.9 -> :8080, "
        "done, [Host: a] GET {Server: x}; GET\n")


def test_close_log_errors_only(capsys):
    text = "log connection errors\n" + RELAY
    session(text).close_log("done")
    session(text).close_log("last write (done)")
    session(text).close_log("Forbidden")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith(", Forbidden")


def test_close_log_off(capsys):
    session(RELAY).close_log("session failed")
    assert capsys.readouterr().err == ""


def test_session_ids_and_active_count():
    conf = load("relayd.conf", text="log connection\n" + RELAY)
    st = RelayState(conf)
    rl = conf.relays[0]
    ss = [Session(st, conf, rl, rl.listens[0], conf.protocol_of(rl), FakeClient())
          for _ in range(3)]
    assert [s.id for s in ss] == [1, 2, 3]
    st.active["web"] = 2
    assert ss[0].active == 2


# -- `forward to destination` / `nat lookup` helpers ---------------------------------------

def test_map_family_inet_and_inet6_prefix():
    from types import SimpleNamespace
    from relayd.relay_session import map_family
    plain = SimpleNamespace(inet=False, inet6=None)
    assert map_family("10.1.2.3", plain) == "10.1.2.3"
    assert map_family("2001:db8::1", plain) == "2001:db8::1"
    # inet: an IPv6 destination becomes the IPv4 address of its last 4 octets
    assert map_family("64:ff9b::a01:203", SimpleNamespace(inet=True, inet6=None)) == "10.1.2.3"
    assert map_family("10.1.2.3", SimpleNamespace(inet=True, inet6=None)) == "10.1.2.3"
    # inet6 PREFIX: an IPv4 destination goes into the prefix's last 4 octets
    six = SimpleNamespace(inet=False, inet6="64:ff9b::")
    assert map_family("10.1.2.3", six) == "64:ff9b::a01:203"
    assert map_family("2001:db8::1", six) == "2001:db8::1"


def test_original_dst_of_a_connection_nothing_rewrote():
    import socket
    from relayd.relay_session import original_dst
    lis = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(lis.getsockname())
    s, _ = lis.accept()
    try:
        # No NAT: conntrack (if loaded) gives the real local address, else nothing.
        assert original_dst(s) in (None, s.getsockname())
        u = socket.socket(socket.AF_UNIX)
        assert original_dst(u) is None
        u.close()
    finally:
        for x in (s, c, lis):
            x.close()


def test_destination_of_a_connection_that_was_not_diverted():
    """`forward to destination` reads the accepted socket's own address; a
    connection made to the relay itself (wildcard listener included) has
    no other destination, so another forward takes it (no loop)."""
    import socket
    from types import SimpleNamespace
    from relayd.relay_session import Session
    lis = socket.create_server(("127.0.0.1", 0))
    port = lis.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = lis.accept()
    fwd = SimpleNamespace(kind="destination", inet=False, inet6=None)
    try:
        for listen_addr in ("127.0.0.1", "0.0.0.0"):
            me = SimpleNamespace(client=SimpleNamespace(sock=s), id=1,
                                 listen=SimpleNamespace(addr=listen_addr, port=port))
            assert Session._destination(me, fwd) is None
        # diverted (as TPROXY hands it over): the socket's address is elsewhere
        me = SimpleNamespace(client=SimpleNamespace(sock=s), id=1,
                             listen=SimpleNamespace(addr="127.0.0.1", port=port + 1))
        assert Session._destination(me, fwd) == ("127.0.0.1", port)
    finally:
        for x in (s, c, lis):
            x.close()
