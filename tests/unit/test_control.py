"""relayd.control, relayd.stats and relayctl without a running relayd: the
line protocol, the server on a temporary socket with a fake backend, the
in-process backend over a parsed configuration and a (not running) Hce,
relayctl's grammar with abbreviations, and every output layout from fixed
rows, byte for byte as OpenBSD's relayctl prints them."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from types import SimpleNamespace

import pytest
import trio

import relayctl.__main__ as ctl
from relayd import control, control_rows, hce, stats
from relayd.control import (CommandFailed, ControlBackend, ControlError, LineBuffer,
                            ProtocolError, Request, parse_request)
from relayd.parse import load
from relayd.relay_session import RelayState
from shared import log

# -- protocol --------------------------------------------------------------------


def test_request_roundtrip():
    line = Request("host", ["disable", 3]).encode()
    assert line == b'{"cmd":"host","args":["disable",3]}\n'
    req = parse_request(line.strip())
    assert (req.cmd, req.args) == ("host", ["disable", 3])
    assert parse_request(b'{"cmd":"poll"}').args == []
    assert parse_request(b'{"cmd":"table","args":["enable","web:80"]}').args == \
        ["enable", "web:80"]


@pytest.mark.parametrize("line, why", [
    (b"nonsense", "malformed"),
    (b"[1]", "not an object"),
    (b'{"cmd":"frobnicate"}', "unknown command: frobnicate"),
    (b'{"cmd":"show"}', "1 argument expected"),
    (b'{"cmd":"show","args":["everything"]}', "unknown argument: everything"),
    (b'{"cmd":"poll","args":["x"]}', "0 arguments expected"),
    (b'{"cmd":"host","args":["disable"]}', "2 arguments expected"),
    (b'{"cmd":"host","args":["toggle",1]}', "unknown argument: toggle"),
    (b'{"cmd":"host","args":["disable",true]}', "name or id expected"),
    (b'{"cmd":"host","args":["disable",-1]}', "invalid id"),
    (b'{"cmd":"log","args":["loud"]}', "unknown argument: loud"),
    (b'{"cmd":"load","args":[""]}', "path expected"),
    (b'{"cmd":"show","args":"hosts"}', "must be a list"),
])
def test_bad_requests(line, why):
    with pytest.raises(ProtocolError, match=why):
        parse_request(line)


def test_line_buffer():
    buf = LineBuffer(limit=16)
    assert buf.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert buf.feed(b':2}\n\n') == [b'{"b":2}', b""]
    with pytest.raises(ProtocolError, match="too long"):
        buf.feed(b"x" * 17)


def test_events_carry_openbsd_imsg_fields():
    ev = control.host_status_event(3, "down", "web1")
    assert (ev["event"], ev["imsg"], ev["len"], ev["peerid"], ev["pid"]) == \
        ("host_status", 36, 48, 0, 1)
    assert (ev["id"], ev["state"]) == (3, "down")
    assert abs(ev["time"] - time.time()) < 5
    names = {(k, e): control.ctl_event(k, e, 1)["event"] for k in control.SWITCHES
             for e in (False, True)}
    assert names == {("host", False): "ctl_host_disable", ("host", True): "ctl_host_enable",
                     ("table", False): "ctl_table_disable",
                     ("table", True): "ctl_table_enable",
                     ("redirect", False): "ctl_rdr_disable",
                     ("redirect", True): "ctl_rdr_enable"}
    ev = control.ctl_event("host", False, 7, "web1")
    assert (ev["imsg"], ev["len"], ev["id"], ev["name"]) == (21, 84, 7, "web1")
    ev = control.verbose_event(2)
    assert (ev["imsg"], ev["len"]) == (3, 20)


class FakeBackend(ControlBackend):
    """Fixed rows; switches succeed for id 1 / name "web1"."""

    def __init__(self, rows=None):
        self.rows = rows if rows is not None else SUMMARY
        self.calls: list = []
        self.hub = control.EventHub()

    async def summary(self):
        return self.rows

    async def sessions(self):
        return SESSIONS

    async def host_set(self, key, enable):
        self.calls.append(("host", key, enable))
        if key == "parented":
            raise CommandFailed("host parented follows its parent")
        ok = key in (1, "web1")
        if ok:
            self.hub.publish(control.ctl_event("host", enable, 1, key if isinstance(key, str)
                                               else ""))
        return ok

    async def table_set(self, key, enable):
        self.calls.append(("table", key, enable))
        return key == 1

    async def redirect_set(self, key, enable):
        return False

    async def poll(self):
        self.calls.append(("poll",))

    async def reload(self, path=None):
        self.calls.append(("reload", path))
        return path != "/bad.conf"

    async def log_verbose(self, verbose):
        self.calls.append(("log", verbose))

    def subscribe(self):
        return self.hub.subscribe()

    async def stop(self):
        self.calls.append(("stop",))


def test_dispatch():
    async def main():
        b = FakeBackend()
        d = control.dispatch
        rows = await d(b, Request("show", ["hosts"]))
        assert [r["type"] for r in rows] == ["table", "host", "host", "host", "table",
                                             "table", "host", "end"]
        assert [r["type"] for r in await d(b, Request("show", ["relays"]))] == \
            ["relay", "relay", "end"]
        assert (await d(b, Request("show", ["sessions"])))[:-1] == SESSIONS
        assert await d(b, Request("host", ["disable", 1])) == [{"type": "ok"}]
        assert await d(b, Request("host", ["enable", "nope"])) == \
            [{"type": "fail", "error": "no host with name nope"}]
        assert await d(b, Request("table", ["disable", 9])) == \
            [{"type": "fail", "error": "no table with id 9"}]
        assert (await d(b, Request("host", ["disable", "parented"])))[0]["error"] == \
            "host parented follows its parent"
        assert await d(b, Request("poll", [])) == [{"type": "ok"}]
        assert await d(b, Request("reload", [])) == [{"type": "ok"}]
        assert (await d(b, Request("load", ["/bad.conf"])))[0]["type"] == "fail"
        assert await d(b, Request("log", ["verbose"])) == [{"type": "ok"}]
        assert ("reload", None) in b.calls and ("reload", "/bad.conf") in b.calls
        assert ("log", True) in b.calls and ("poll",) in b.calls
    trio.run(main)


def test_backend_default_views_filter_summary():
    async def main():
        b = FakeBackend()
        assert {r["type"] for r in await b.hosts()} == {"table", "host"}
        assert [r["name"] for r in await b.redirects()] == ["www"]
        assert [r["name"] for r in await b.routers()] == ["gw"]
    trio.run(main)


def test_event_hub_drops_slow_and_closed_subscribers(monkeypatch):
    async def main():
        monkeypatch.setattr(control, "MONITOR_BACKLOG", 2)
        hub = control.EventHub()
        slow = hub.subscribe()
        gone = hub.subscribe()
        await gone.aclose()
        hub.publish({"n": 1})
        assert hub.subscribers == 1
        hub.publish({"n": 2})
        hub.publish({"n": 3})          # slow is full: dropped
        assert hub.subscribers == 0
        assert [e["n"] async for e in slow] == [1, 2]
    trio.run(main)


# -- the socket --------------------------------------------------------------------

def test_open_socket_mode_stale_and_live(tmp_path):
    path = str(tmp_path / "relayd.sock")
    s = control.open_socket(path)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    if os.geteuid() == 0:
        assert st.st_uid == 0
    with pytest.raises(ControlError, match="in use by a running relayd"):
        control.open_socket(path)
    # A dead daemon's socket: the file is still there, nobody listens.
    s.close()
    assert os.path.exists(path)
    s2 = control.open_socket(path)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(path)                   # the new socket answers
    control.close_socket(s2)
    assert not os.path.exists(path)


def test_open_socket_refuses_other_files_and_long_names(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ControlError, match="not a socket"):
        control.open_socket(str(f))
    with pytest.raises(ControlError, match="too long"):
        control.open_socket(str(tmp_path / ("x" * 120)))
    with pytest.raises(ControlError, match="bind"):
        control.open_socket(str(tmp_path / "nodir" / "relayd.sock"))


def test_close_socket_leaves_a_replaced_file(tmp_path):
    path = str(tmp_path / "relayd.sock")
    s = control.open_socket(path)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    control.close_socket(s)
    assert os.path.exists(path)
    other.close()


class ServerThread:
    """control.serve() with a backend in a thread, for blocking clients."""

    def __init__(self, path: str, backend: ControlBackend) -> None:
        self.path, self.backend = path, backend
        self.ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self.scope:
            async with trio.open_nursery() as n:
                await n.start(control.serve, control.open_socket(self.path), self.backend)
                self.ready.set()

    def stop(self) -> None:
        trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self.thread.join(5)


@pytest.fixture
def server(tmp_path):
    started = []

    def start(backend=None):
        srv = ServerThread(str(tmp_path / "ctl.sock"), backend or FakeBackend())
        started.append(srv)
        return srv
    yield start
    for s in started:
        s.stop()
    assert not (tmp_path / "ctl.sock").exists()


def talk(path: str, *lines: bytes, want: int = 1) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        for ln in lines:
            s.sendall(ln)
        out, buf = [], LineBuffer()
        while len(out) < want:
            data = s.recv(65536)
            if not data:
                break
            out += [control.decode(x) for x in buf.feed(data)]
        return out


def test_server_answers_and_rejects(server):
    srv = server()
    rows = talk(srv.path, b'{"cmd":"show","args":["summary"]}\n', want=len(SUMMARY) + 1)
    assert rows[:-1] == SUMMARY and rows[-1] == {"type": "end"}
    # two requests on one connection, split across writes
    rows = talk(srv.path, b'{"cmd":"poll"}\n{"cmd":"host",', b'"args":["disable",1]}\n',
                want=2)
    assert rows == [{"type": "ok"}, {"type": "ok"}]
    assert talk(srv.path, b'{"cmd":"nope"}\n') == \
        [{"type": "error", "error": "unknown command: nope"}]


def test_server_monitor_streams_events(server):
    backend = FakeBackend()
    srv = server(backend)
    with socket.socket(socket.AF_UNIX) as mon:
        mon.settimeout(5)
        mon.connect(srv.path)
        mon.sendall(b'{"cmd":"monitor"}\n')
        deadline = time.monotonic() + 5
        while not backend.hub.subscribers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert talk(srv.path, b'{"cmd":"host","args":["disable","web1"]}\n') == \
            [{"type": "ok"}]
        ev = control.decode(mon.recv(65536).splitlines()[0])
        assert (ev["event"], ev["id"], ev["name"]) == ("ctl_host_disable", 1, "web1")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:   # the closed monitor is unsubscribed
        trio.from_thread.run_sync(backend.hub.publish, {"type": "event"},
                                  trio_token=srv.token)
        if not backend.hub.subscribers:
            break
        time.sleep(0.01)
    assert backend.hub.subscribers == 0


def test_relayctl_against_a_server(server, capsys):
    srv = server()
    assert ctl.main(["-s", srv.path, "sh", "rel"]) == 0
    assert capsys.readouterr().out == ctl.HEADER + RELAYS_OUT
    assert ctl.main(["-s", srv.path, "host", "disable", "1"]) == 0
    assert capsys.readouterr().out == "command succeeded\n"
    assert ctl.main(["-s", srv.path, "host", "disable", "nope"]) == 1
    out = capsys.readouterr()
    assert out.out == "command failed\n"
    assert out.err == "relayctl: no host with name nope\n"
    assert ctl.main(["-s", srv.path, "log", "verbose"]) == 0
    assert capsys.readouterr().out == "logging request sent.\n"
    assert ctl.main(["-s", srv.path, "reload"]) == 0
    assert capsys.readouterr().out == ""
    assert ctl.main(["-s", srv.path, "load", "/bad.conf"]) == 1
    assert capsys.readouterr().out == "command failed\n"
    assert ctl.main(["-s", srv.path, "-j", "poll"]) == 0
    assert capsys.readouterr().out == '{"type": "ok"}\n'
    assert ctl.main(["-s", srv.path, "poll", "-j"]) == 1      # options come first
    assert capsys.readouterr().err == "superfluous argument: -j\n"
    assert ctl.main(["-j", "-s", srv.path, "show", "hosts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [__import__("json").loads(x)["type"] for x in lines] == \
        ["table", "host", "host", "host", "table", "table", "host"]
    assert ctl.main(["-s", srv.path, "show", "sessions"]) == 0
    assert capsys.readouterr().out == SESSIONS_OUT
    assert ctl.main(["-s", srv.path, "stop"]) == 0
    assert capsys.readouterr().out == "command succeeded\n"


def test_relayctl_connect_errors(tmp_path, capsys):
    path = str(tmp_path / "none.sock")
    assert ctl.main(["-s", path, "show", "summary"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"relayctl: connect: {path}: No such file or directory\n"
    long = "/tmp/" + "x" * 120
    assert ctl.main(["-s", long, "poll"]) == 1
    assert capsys.readouterr().err == f"relayctl: socket `{long}' too long\n"


def test_relayctl_options(capsys):
    assert ctl.main(["-x", "poll"]) == 1
    assert capsys.readouterr().err == "relayctl: unknown option -- x\n" + ctl.USAGE
    assert ctl.main(["-s"]) == 1
    assert capsys.readouterr().err == \
        "relayctl: option requires an argument -- s\n" + ctl.USAGE


# -- grammar -----------------------------------------------------------------------

@pytest.mark.parametrize("words, action, target, path", [
    ("show summary", "show summary", None, None),
    ("sh su", "show summary", None, None),
    ("s" "how h", "show hosts", None, None),
    ("sh red", "show redirects", None, None),
    ("sh rel", "show relays", None, None),
    ("sh ro", "show routers", None, None),
    ("sh se", "show sessions", None, None),
    ("h dis 3", "host disable", 3, None),
    ("host enable web1", "host enable", "web1", None),
    ("host enable 127.0.0.1", "host enable", "127.0.0.1", None),
    ("host disable 007", "host disable", 7, None),
    ("host disable 4294967296", "host disable", "4294967296", None),
    ("t d web:80", "table disable", "web:80", None),
    ("ta e 2", "table enable", 2, None),
    ("red dis www", "redirect disable", "www", None),
    ("m", "monitor", None, None),
    ("p", "poll", None, None),
    ("rel", "reload", None, None),
    ("st", "stop", None, None),
    ("loa /etc/relayd.conf", "load", None, "/etc/relayd.conf"),
    ("log v", "log verbose", None, None),
    ("log b", "log brief", None, None),
])
def test_parse(words, action, target, path):
    p = ctl.parse(words.split())
    assert (p.action, p.target, p.path) == (action, target, path)


def test_parse_to_requests():
    assert ctl.parse(["sh", "h"]).request() == Request("show", ["hosts"])
    assert ctl.parse(["h", "dis", "3"]).request() == Request("host", ["disable", 3])
    assert ctl.parse(["load", "x.conf"]).request() == Request("load", ["x.conf"])
    assert ctl.parse(["log", "brief"]).request() == Request("log", ["brief"])
    assert ctl.parse(["stop"]).request() == Request("stop", [])
    for words in (["show", "summary"], ["t", "e", "web:80"], ["poll"], ["monitor"]):
        req = ctl.parse(words).request()
        assert parse_request(req.encode()) == req


MAIN_ARGS = ("valid commands/args:\n  monitor\n  show\n  load\n  poll\n  reload\n  stop\n"
             "  redirect\n  table\n  host\n  log\n")
SHOW_ARGS = ("valid commands/args:\n  summary\n  hosts\n  redirects\n  relays\n  routers\n"
             "  sessions\n")


@pytest.mark.parametrize("words, err", [
    ([], "missing argument:\n" + MAIN_ARGS),
    (["s"], "ambiguous argument: s\n" + MAIN_ARGS),
    (["re"], "ambiguous argument: re\n" + MAIN_ARGS),
    (["lo"], "ambiguous argument: lo\n" + MAIN_ARGS),
    (["frob"], "unknown argument: frob\n" + MAIN_ARGS),
    (["Show"], "unknown argument: Show\n" + MAIN_ARGS),
    (["show"], "missing argument:\n" + SHOW_ARGS),
    (["show", "s"], "ambiguous argument: s\n" + SHOW_ARGS),
    (["show", "re"], "ambiguous argument: re\n" + SHOW_ARGS),
    (["show", "all"], "unknown argument: all\n" + SHOW_ARGS),
    (["host"], "missing argument:\nvalid commands/args:\n  disable\n  enable\n"),
    (["host", "disable"], "missing argument:\nvalid commands/args:\n  <hostid>\n"),
    (["table", "enable"], "missing argument:\nvalid commands/args:\n  <tableid>\n"),
    (["redirect", "e"], "missing argument:\nvalid commands/args:\n  <redirectid>\n"),
    (["load"], "missing argument:\nvalid commands/args:\n  <path>\n"),
    (["log", "loud"], "unknown argument: loud\nvalid commands/args:\n  verbose\n  brief\n"),
    (["poll", "now"], "superfluous argument: now\n"),
    (["host", "disable", "1", "2"], "superfluous argument: 2\n"),
])
def test_parse_errors(words, err, capsys):
    with pytest.raises(ctl.ParseError) as e:
        ctl.parse(words)
    assert str(e.value) == err
    assert ctl.main(words) == 1
    assert capsys.readouterr().err == err


# -- layouts -----------------------------------------------------------------------

def stat_dict(cnt=0, last=0, avg=0, lh=0, ah=0, ld=0, ad=0, interval=60):
    return {"cnt": cnt, "last": last, "avg": avg, "last_hour": lh, "avg_hour": ah,
            "last_day": ld, "avg_day": ad, "interval": interval}


SUMMARY = [
    control_rows.redirect_row(1, "www", False, stats=[stat_dict(5, 1, 2, 3, 4, 5, 6)]),
    control_rows.table_row(1, "web:80", 2, False),
    control_rows.host_row(1, "10.0.0.1", "up", check_cnt=10, up_cnt=10, error="tcp connect ok"),
    control_rows.host_row(2, "10.0.0.2", "down", check_cnt=10, up_cnt=4, retry_cnt=2,
                          error="http code mismatch"),
    control_rows.host_row(3, "10.0.0.3", "up", parent=1, check_cnt=10, up_cnt=10),
    control_rows.table_row(2, "sorry:80", 0, True),
    control_rows.relay_row(1, "proxy", False, [stat_dict(7, 2, 1, 9, 8, 7, 6),
                                               stat_dict(3, 1, 1, 1, 0, 1, 0)]),
    control_rows.table_row(3, "backends:8080", 0, False),
    control_rows.host_row(4, "backend-with-a-rather-long-name.example.org", "unknown",
                          disabled=True),
    control_rows.relay_row(2, "idle", True, [stat_dict()]),
    control_rows.router_row(1, "gw", False, rtable=2, rtlabel="uplink",
                            routes=[["0.0.0.0", 0], ["2001:db8::", 32]]),
]

L = "\t        \t"   # "\t%8s\t" with ""

SUMMARY_OUT = (
    "1   \tredirect\twww                     \t       \tactive\n"
    "1   \ttable   \tweb:80                  \t       \tactive (2 hosts)\n"
    "1   \thost    \t10.0.0.1                \t100.00%\tup\n"
    "2   \thost    \t10.0.0.2                \t40.00% \tdown\n"
    "3   \thost    \t10.0.0.3 parent 1       \t100.00%\tup\n"
    "2   \ttable   \tsorry:80                \t       \tdisabled\n"
    "1   \trelay   \tproxy                   \t       \tactive\n"
    "3   \ttable   \tbackends:8080           \t       \tempty\n"
    "4   \thost    \tbackend-with-a-rather-long-name.example.org\t       \tdisabled\n"
    "2   \trelay   \tidle                    \t       \tdisabled\n"
    "1   \trouter  \tgw                      \t       \tactive\n"
)

HOSTS_OUT = (
    "1   \ttable   \tweb:80                  \t       \tactive (2 hosts)\n"
    "1   \thost    \t10.0.0.1                \t100.00%\tup\n"
    f"{L}total: 10/10 checks\n"
    "2   \thost    \t10.0.0.2                \t40.00% \tdown\n"
    f"{L}total: 4/10 checks, 2 retries, error: http code mismatch\n"
    "3   \thost    \t10.0.0.3 parent 1       \t100.00%\tup\n"
    f"{L}total: 10/10 checks\n"
    "2   \ttable   \tsorry:80                \t       \tdisabled\n"
    "3   \ttable   \tbackends:8080           \t       \tempty\n"
    "4   \thost    \tbackend-with-a-rather-long-name.example.org\t       \tdisabled\n"
)

RELAYS_OUT = (
    "1   \trelay   \tproxy                   \t       \tactive\n"
    f"{L}total: 10 sessions\n"
    f"{L}last: 3/60s 10/h 8/d sessions\n"
    f"{L}average: 2/60s 8/h 6/d sessions\n"
    "2   \trelay   \tidle                    \t       \tdisabled\n"
)

REDIRECTS_OUT = (
    "1   \tredirect\twww                     \t       \tactive\n"
    f"{L}total: 5 sessions\n"
    f"{L}last: 1/60s 3/h 5/d sessions\n"
    f"{L}average: 2/60s 4/h 6/d sessions\n"
)

ROUTERS_OUT = (
    "1   \trouter  \tgw                      \t       \tactive\n"
    f"{L}rtable: 2\n"
    f"{L}rtlabel: uplink\n"
    f"{L}route: 0.0.0.0/0\n"
    f"{L}route: 2001:db8::/32\n"
)


def test_header():
    assert ctl.HEADER == "Id  \tType    \tName                    \tAvlblty\tStatus\n"


@pytest.mark.parametrize("mode, out", [
    ("summary", SUMMARY_OUT), ("hosts", HOSTS_OUT), ("relays", RELAYS_OUT),
    ("redirects", REDIRECTS_OUT), ("routers", ROUTERS_OUT),
])
def test_show_layouts(mode, out):
    assert ctl.format_show(mode, SUMMARY) == ctl.HEADER + out


def test_demote_rows_only_in_summary():
    row = control_rows.demote_row("carp", 2, "/run/relayd/demote/carp")
    assert ctl.format_row("summary", row) == (
        "    \tdemote  \tcarp                    \t       \tcounter 2\n")
    for mode in ("hosts", "redirects", "relays", "routers"):
        assert ctl.format_row(mode, row) == ""


def test_summary_rows_end_with_demote_groups():
    from types import SimpleNamespace as NS
    conf = NS(redirects=[], relays=[], routers=[])
    pfe_rows = control_rows.pfe_row_map([control_rows.demote_row("b", 0),
                                         control_rows.demote_row("a", 1)])
    rows = control.summary_rows(conf, {}, set(), lambda name: [], pfe_rows)
    assert [(r["name"], r["counter"]) for r in rows] == [("a", 1), ("b", 0)]


def test_empty_views_print_only_the_header():
    for mode in ("summary", "hosts", "redirects", "relays", "routers"):
        assert ctl.format_show(mode, []) == ctl.HEADER


def test_status_strings():
    assert ctl.rdr_status({"down": True}) == "down"
    assert ctl.rdr_status({"backup": True}) == "active (using backup table)"
    assert ctl.rdr_status({"disabled": True, "down": True}) == "disabled"
    assert ctl.table_status({"up": 1}) == "active (1 hosts)"
    assert ctl.host_status({"state": "unknown"}) == "unknown"
    with pytest.raises(ProtocolError):
        ctl.host_status({"state": "sideways"})
    with pytest.raises(ProtocolError):
        ctl.format_row("summary", {"type": "spaceship"})


def test_host_total_line_details():
    row = control_rows.host_row(9, "h", "down", check_cnt=3, up_cnt=0, error="none")
    assert ctl.format_row("hosts", row).endswith(f"{L}total: 0/3 checks\n")
    row = control_rows.host_row(9, "h", "up", check_cnt=3, up_cnt=2, retry_cnt=1,
                                error="tcp connect failed")    # error only shown when down
    assert ctl.format_row("hosts", row).endswith(f"{L}total: 2/3 checks, 1 retries\n")
    row = control_rows.host_row(9, "h", "unknown")        # never checked: no total line
    assert ctl.format_row("hosts", row).count("\n") == 1


def test_availability():
    assert ctl.availability(0, 0) == ""
    assert ctl.availability(3, 1) == "33.33%"
    assert ctl.availability(3, 3) == "100.00%"
    assert ctl.availability(8, 1) == hce.availability(8, 1) == "12.50%"


def test_stats_lines():
    assert ctl.format_stats([]) == ""
    assert ctl.format_stats([stat_dict(last=3)]) == ""     # no session yet: nothing
    assert ctl.format_stats([stat_dict(1)]) == (f"{L}total: 1 sessions\n"
                                                f"{L}last: 0/60s 0/h 0/d sessions\n"
                                                f"{L}average: 0/60s 0/h 0/d sessions\n")


SESSIONS = [
    {"type": "session", "proc": 0, "id": 12, "client": ["127.0.0.1", 50312],
     "backend": ["10.0.0.1", 80], "done": False, "age": 3725.9, "idle": 61.2,
     "relay": 1, "pid": 4242, "tag": 0},
    {"type": "session", "proc": 1, "id": 3, "client": ["::1", 40000],
     "backend": ["", 0], "done": True, "age": 0.2, "idle": 0.1, "relay": 2,
     "pid": 4243, "tag": 5},
]

SESSIONS_OUT = (
    "session 0:12 127.0.0.1:50312 -> 10.0.0.1:80\tRUNNING\n"
    "\tage 01:02:05, idle 00:01:01, relay 1, pid 4242\n"
    "session 1:3 ::1:40000 -> :0\tDONE\n"
    "\tage 00:00:00, idle 00:00:00, relay 2, pid 4243, tag (id) 5\n"
)


def test_session_layout():
    assert "".join(ctl.format_session(r) for r in SESSIONS) == SESSIONS_OUT
    assert ctl.print_time(360000) == "100:00:00"


def test_monitor_layouts():
    now = 1700000000
    stamp = f"\ttimestamp: {now}, {time.ctime(now)}\n"
    text, done = ctl.format_event(control.host_status_event(3, "down"), now)
    assert (text, done) == ("host_status: imsg type 36 len 48 peerid 0 pid 1\n" + stamp +
                            "\tid: 3\n\tstate: down\n", False)
    text, done = ctl.format_event(control.ctl_event("host", False, 3, "web1"), now)
    assert text == ("ctl_host_disable: imsg type 21 len 84 peerid 0 pid 1\n" + stamp +
                    "\tid: 3\n\tname: web1\n")
    text, _ = ctl.format_event(control.ctl_event("table", True, 2), now)
    assert text == ("ctl_table_enable: imsg type 18 len 84 peerid 0 pid 1\n" + stamp +
                    "\tid: 2\n")
    text, done = ctl.format_event(control.verbose_event(2), now)
    assert (text, done) == ("<unknown>: imsg type 3 len 20 peerid 0 pid 1\n" + stamp, True)
    text, done = ctl.format_event({"imsg": 37, "len": 16, "peerid": 0, "pid": 1}, now)
    assert (text, done) == ("sync: imsg type 37 len 16 peerid 0 pid 1\n" + stamp, False)


# -- statistics --------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_counters_tick_like_relay_statistics():
    clk = Clock()
    st = stats.Stats(interval=60, clock=clk)
    sess = lambda i: SimpleNamespace(name="www", id=i)   # noqa: E731
    for i in range(4):
        st.session_start(sess(i))
    # the running interval shows in the total only
    assert st.relay("www") == stat_dict(cnt=4)
    clk.t += 60
    assert st.relay("www") == stat_dict(cnt=4, last=4, avg=2, lh=4, ld=4)
    st.session_start(sess(9))
    clk.t += 60
    assert st.relay("www") == stat_dict(cnt=5, last=1, avg=1, lh=5, ld=5)
    clk.t += 60 * 58                     # tick 60: the hour average, last_hour reset
    r = st.relay("www")
    assert (r["last"], r["avg"], r["last_hour"], r["avg_hour"]) == (0, 0, 5, 2)
    clk.t += 60
    assert st.relay("www")["last_hour"] == 0
    assert st.relay("www")["cnt"] == 5


def test_counters_idle_fast_forward_keeps_the_schedule():
    clk = Clock()
    c = stats.Counters(60, clk())
    clk.t += 86400 * 30 + 30
    c.advance(clk())
    assert c.tick == 30 * 1440 and c.next_tick == 1000 + 60 * (30 * 1440 + 1)
    c.add(clk())
    clk.t += 30
    assert c.snapshot(clk())["last"] == 1


def test_session_rows_and_tags():
    clk = Clock()
    st = stats.Stats(clock=clk, proc=2)

    class Client:
        peer = ("127.0.0.1", 5555)

        def fileno(self):
            return -1
    s1 = SimpleNamespace(name="www", id=7, started=clk.t - 5, client=Client(),
                         backend=("10.0.0.1", 80), listen=SimpleNamespace(id=0),
                         relay=SimpleNamespace(id=3), tag="blue")
    s2 = SimpleNamespace(name="www2:81", id=2, started=clk.t - 1, client=Client(),
                         backend=None, listen=SimpleNamespace(id=4),
                         relay=SimpleNamespace(id=3), tag=None)
    st.session_start(s1)
    st.session_start(s2)
    rows = st.session_rows()
    assert [r["id"] for r in rows] == [2, 7]
    assert rows[0]["backend"] == ["", 0] and rows[0]["relay"] == 4 and rows[0]["tag"] == 0
    assert rows[1]["relay"] == 3 and rows[1]["tag"] == 1 and rows[1]["age"] == 5
    assert rows[1]["idle"] == 5 and rows[1]["proc"] == 2 and rows[1]["pid"] == os.getpid()
    st.session_end(s1)
    assert [r["id"] for r in st.session_rows()] == [2]


def test_tcp_idle_of_a_real_socket():
    a, b = socket.socket(), None
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        a.connect(srv.getsockname())
        b, _ = srv.accept()
        a.sendall(b"x")
        b.recv(1)
        time.sleep(0.2)
        idle = stats.tcp_idle(b.fileno())
        assert idle is not None and 0.1 <= idle < 5
        assert stats.tcp_idle(-1) is None
    finally:
        for s in (a, b, srv):
            if s is not None:
                s.close()


# -- the in-process backend ------------------------------------------------------------

CONF = """
interval 5
socket "/nonexistent/relayd.sock"
table <web> { 127.0.0.1, 127.0.0.2 retry 2, 127.0.0.3 parent 1 }
table <fb> { 127.0.0.4 }
relay "www" {
	listen on 127.0.0.1 port 8080
	listen on 127.0.0.1 port 8081
	forward to <web> port 80 check tcp
	forward to <fb> port 80
}
"""


@pytest.fixture
def parent(tmp_path, monkeypatch):
    f = tmp_path / "relayd.conf"
    f.write_text(CONF)
    conf = load(str(f), {}, 0)
    state = RelayState(conf)
    state.checks = True
    engine = hce.Hce(conf, hce.relay_notify(state), debug=False)
    engine._resync()
    st = stats.Stats(clock=Clock())
    reloads = []

    def reload(path=None):
        reloads.append(path)
        return path != "/bad"
    monkeypatch.setattr(log, "_verbose", 0)
    return SimpleNamespace(conf=conf, hce=engine, reload=reload, reloads=reloads,
                           proc=SimpleNamespace(state=state, stats=st))


def in_trio(fn):
    return trio.run(fn)


def check(engine, host_id, up):
    h = engine.hosts[host_id]
    engine.done(h, (hce.HOST_UP if up else hce.HOST_DOWN,
                    "tcp connect ok" if up else "tcp connect failed", 0),
                trio.current_time())


def test_backend_summary_order_and_rows(parent):
    async def main():
        b = control.InProcessBackend(parent)
        check(parent.hce, 1, True)
        check(parent.hce, 2, False)
        sess = SimpleNamespace(name="www", id=1)
        parent.proc.stats.session_start(sess)
        parent.proc.stats.session_end(sess)
        rows = await b.summary()
        assert [(r["type"], r["id"]) for r in rows] == [
            ("relay", 1), ("table", 1), ("host", 1), ("host", 2), ("host", 3),
            ("table", 2), ("host", 4),
            ("relay", 2), ("table", 1), ("host", 1), ("host", 2), ("host", 3),
            ("table", 2), ("host", 4)]
        assert rows[7]["name"] == "www2:8081"
        assert rows[0]["stats"][0]["cnt"] == 1 and rows[7]["stats"][0]["cnt"] == 0
        h1, h2, h3 = rows[2], rows[3], rows[4]
        assert (h1["state"], h1["check_cnt"], h1["up_cnt"]) == ("up", 1, 1)
        assert (h2["state"], h2["error"], h2["retry_cnt"]) == ("down", "tcp connect failed", 2)
        assert (h3["parent"], h3["state"]) == (1, "up")
        assert rows[1]["up"] == 2 and rows[6]["state"] == "up"   # unchecked table: up
        text = ctl.format_show("summary", rows)
        assert f"3   \thost    \t{'127.0.0.3 parent 1':<24}\t100.00%\tup\n" in text
        assert [r["type"] for r in await b.hosts()].count("relay") == 0
        assert len(await b.relays()) == 2
        assert await b.redirects() == [] and await b.routers() == []
        assert await b.sessions() == []
    in_trio(main)


def test_backend_host_switch(parent):
    async def main():
        b = control.InProcessBackend(parent)
        state, engine = parent.proc.state, parent.hce
        check(engine, 1, True)
        events = b.subscribe()
        assert state.host_up(1) and state.host_up(3) and state.host_up(4)
        assert await b.host_set("127.0.0.1", False)      # children follow
        assert not state.host_up(1) and not state.host_up(3)
        assert engine.hosts[1].disabled and engine.hosts[3].disabled
        assert await b.host_set(4, False)                  # unchecked table too
        assert not state.host_up(4)
        assert await b.host_set(4, False)                  # already: no-op, success
        with pytest.raises(CommandFailed, match="parent"):
            await b.host_set(3, True)
        assert not await b.host_set("nosuch", True)
        assert not await b.host_set(99, True)
        rows = {r["id"]: r for r in await b.hosts() if r["type"] == "host"}
        assert rows[1]["disabled"] and rows[1]["check_cnt"] == 0
        assert await b.host_set(1, True) and await b.host_set(4, True)
        assert state.host_up(4) and not state.host_up(1)   # unknown until checked
        check(engine, 1, True)
        assert state.host_up(1) and state.host_up(3)
        got = []
        while True:
            try:
                got.append(events.receive_nowait())
            except trio.WouldBlock:
                break
        assert [(e["event"], e["id"], e.get("name", e.get("state"))) for e in got] == [
            ("ctl_host_disable", 1, "127.0.0.1"), ("ctl_host_disable", 4, ""),
            ("ctl_host_disable", 4, ""), ("ctl_host_enable", 1, ""),
            ("ctl_host_enable", 4, ""), ("host_status", 1, "up"),
            ("host_status", 3, "up")]
    in_trio(main)


def test_backend_table_switch_and_actions(parent):
    async def main():
        b = control.InProcessBackend(parent)
        state, engine = parent.proc.state, parent.hce
        events = b.subscribe()
        assert await b.table_set("fb:80", False)
        assert not state.host_up(4)
        rows = [r for r in await b.summary() if r["type"] == "table" and r["id"] == 2]
        assert rows[0]["disabled"]
        assert not any(r["type"] == "host" and r["id"] == 4 for r in await b.summary())
        assert await b.table_set(2, True) and state.host_up(4)
        assert not await b.table_set("fb", True)
        assert not await b.redirect_set("www", True)
        assert await b.reload() and await b.reload("/etc/x.conf")
        assert not await b.reload("/bad")
        assert parent.reloads == [None, "/etc/x.conf", "/bad"]
        engine._poll = trio.Event()
        await b.poll()
        assert engine._poll.is_set()
        await b.log_verbose(True)
        assert log.get_verbose() == 2
        await b.log_verbose(False)
        assert log.get_verbose() == 0
        got = []
        while True:
            try:
                got.append(events.receive_nowait())
            except trio.WouldBlock:
                break
        assert [(e["event"], e.get("id")) for e in got] == [
            ("ctl_table_disable", 2), ("ctl_table_enable", 2), ("<unknown>", None),
            ("<unknown>", None)]
    in_trio(main)
