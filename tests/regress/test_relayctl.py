"""relayctl against a real relayd, black-box: `python -m relayd -d -f CONF`
with `socket "<tmp>/relayd.sock"`, threaded loopback backends
(127.0.0.x stand in for hosts on one port), and `.venv/bin/relayctl` /
`python -m relayctl` run as users run them.

Covers K01/K02/K04/K06-K15, R05, R07 and R12: the layouts of show
summary/hosts/relays/sessions, host and table switches moving traffic at
once, poll reaching a backend at once, reload and load, monitor events,
log verbose/brief, -j, errors, -s, stop, and the socket itself (mode, a
stale file, a second daemon refused).
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, free_port, proc_state, wait_for

RELAYCTL = str(Path(PYTHON).parent / "relayctl")
HEADER = "Id  \tType    \tName                    \tAvlblty\tStatus\n"
PAD = "\t        \t"


def row(id, kind, name, avail, status) -> str:
    return f"{id:<4}\t{kind:<8}\t{name:<24}\t{avail:<7}\t{status}\n"


def rows_only(out: str) -> str:
    """`show` output without the indented detail lines (statistics, totals)."""
    return "".join(x for x in out.splitlines(keepends=True) if not x.startswith("\t"))


def total_sessions(out: str) -> int:
    m = re.search(r"^\t {8}\ttotal: (\d+) sessions$", out, re.M)
    return int(m[1]) if m else 0


class Backend:
    """Threaded TCP server on addr:port answering b"<name>:<data>"; counts
    every connection (health checks included) and the ones that sent data."""

    def __init__(self, addr: str, port: int, name: str = "", hold: float = 0.0) -> None:
        self.addr, self.port, self.name, self.hold = addr, port, name or addr, hold
        self.connects = 0
        self.sessions = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(128)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connects += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            data = conn.recv(1024)
            if data:
                with self.lock:
                    self.sessions += 1
                conn.sendall(self.name.encode() + b":" + data)
                if self.hold:
                    conn.recv(1024)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def backends():
    started: list[Backend] = []

    def start(*args, **kw) -> Backend:
        b = Backend(*args, **kw)
        started.append(b)
        return b
    yield start
    for b in started:
        b.stop()


class Env:
    def __init__(self, tmp: Path, daemons) -> None:
        self.tmp = tmp
        self.daemons = daemons
        self.sock = str(tmp / "relayd.sock")
        self.port = free_port()
        self.bport = free_port()
        self.d = None

    def conf(self, body: str, interval: int = 1, name: str = "relayd.conf") -> Path:
        path = self.tmp / name
        path.write_text(f'interval {interval}\ntimeout 300\nlog state changes\n'
                        f'socket "{self.sock}"\n' + body)
        return path

    def start(self, body: str, interval: int = 1, env: dict | None = None):
        self.d = self.daemons("relayd", self.conf(body, interval), ports=[self.port],
                              env=env)
        return self.d

    def ctl(self, *args: str, module: bool = False, sock: str | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess:
        cmd = [PYTHON, "-m", "relayctl"] if module else [RELAYCTL]
        cmd += ["-s", sock or self.sock, *args]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, *args: str, **kw) -> str:
        r = self.ctl(*args, **kw)
        assert r.returncode == 0, (r.stdout, r.stderr, self.d.output() if self.d else "")
        return r.stdout

    def request(self, data: bytes = b"ping") -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            return s.recv(1024).decode()

    def wait_state(self, host: str, state: str, timeout: float = 10.0) -> str:
        """Wait until `show hosts` lists `host` (name) with `state`."""
        def listed() -> str | None:
            out = self.ok("show", "hosts")
            line = rf"^\d+\s+\thost    \t{re.escape(host)}\s*\t[^\t]*\t{state}$"
            return out if re.search(line, out, re.M) else None
        return wait_for(listed, timeout, f"{host} {state} in show hosts",
                        lambda: f"{self.ok('show', 'hosts')}\n{self.d.output()}", every=0.1)


@pytest.fixture
def env(tmp_path, daemons):
    return Env(tmp_path, daemons)


def two_hosts(env: Env, mode: str = "") -> str:
    return (f"table <web> {{ 127.0.0.1, 127.0.0.2 }}\n"
            f'relay "www" {{\n\tlisten on 127.0.0.1 port {env.port}\n'
            f"\tforward to <web> port {env.bport} {mode} check tcp\n}}\n")


# -- show ------------------------------------------------------------------------

def test_show_summary_and_hosts(env, backends):
    backends("127.0.0.1", env.bport)          # 127.0.0.2 has no backend: down
    env.start(two_hosts(env))
    env.wait_state("127.0.0.1", "up")
    env.wait_state("127.0.0.2", "down")
    p = env.bport
    want = (HEADER + row(1, "relay", "www", "", "active")
            + row(1, "table", f"web:{p}", "", "active (1 hosts)")
            + row(1, "host", "127.0.0.1", "100.00%", "up")
            + row(2, "host", "127.0.0.2", "0.00%", "down"))
    assert env.ok("show", "summary") == want
    assert env.ok("sh", "su", module=True) == want
    out = env.ok("show", "hosts")
    lines = out.splitlines(keepends=True)
    assert lines[0] == HEADER
    assert lines[1] == row(1, "table", f"web:{p}", "", "active (1 hosts)")
    assert lines[2] == row(1, "host", "127.0.0.1", "100.00%", "up")
    n = int(re.fullmatch(rf"{PAD}total: (\d+)/\1 checks\n", lines[3])[1])
    assert n >= 1
    assert lines[4] == row(2, "host", "127.0.0.2", "0.00%", "down")
    assert re.fullmatch(rf"{PAD}total: 0/\d+ checks, error: tcp connect failed\n", lines[5])
    assert len(lines) == 6
    assert env.ok("show", "redirects") == HEADER
    assert env.ok("show", "routers") == HEADER
    assert env.ok("show", "sessions") == ""


def test_disabled_table_and_unchecked_instances(env, backends):
    other = free_port()
    backends("127.0.0.1", env.bport)
    env.start(f"table <web> {{ 127.0.0.1 }}\ntable <off> disable {{ 127.0.0.3 }}\n"
              f'relay "www" {{\n\tlisten on 127.0.0.1 port {env.port}\n'
              f"\tforward to <web> port {env.bport}\n"
              f"\tforward to <off> port {other} check tcp\n}}\n")
    out = env.ok("show", "hosts")
    assert out == (HEADER + row(1, "table", f"web:{env.bport}", "", "active (1 hosts)")
                   + row(1, "host", "127.0.0.1", "", "up")
                   + row(2, "table", f"off:{other}", "", "disabled"))


def test_show_relays_and_sessions(env, backends):
    backends("127.0.0.1", env.bport, hold=1)
    env.start(f"table <web> {{ 127.0.0.1 }}\n"
              f'relay "www" {{\n\tlisten on 127.0.0.1 port {env.port}\n'
              f"\tforward to <web> port {env.bport} check tcp\n}}\n")
    env.wait_state("127.0.0.1", "up")
    out = env.ok("show", "relays")
    assert rows_only(out) == HEADER + row(1, "relay", "www", "", "active")
    base = total_sessions(out)              # the fixture's probe of the port counts
    for _ in range(3):
        assert env.request() == "127.0.0.1:ping"
    held = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        held.sendall(b"hold")
        assert held.recv(100) == b"127.0.0.1:hold"
        out = env.ok("show", "relays")
        assert out == (HEADER + row(1, "relay", "www", "", "active")
                       + f"{PAD}total: {base + 4} sessions\n"
                       + f"{PAD}last: 0/60s 0/h 0/d sessions\n"
                       + f"{PAD}average: 0/60s 0/h 0/d sessions\n")
        cport = held.getsockname()[1]
        out = env.ok("show", "sessions")
        # session <relay process instance>:<id>, pid of that relay process
        m = re.fullmatch(rf"session (\d+):(\d+) 127\.0\.0\.1:{cport} -> 127\.0\.0\.1:{env.bport}"
                         rf"\tRUNNING\n\tage 00:00:0\d, idle 00:00:0\d, relay 1, pid "
                         rf"(\d+)\n", out)
        assert m and int(m[2]) >= 4, out
        assert proc_state(int(m[3]))[1] == env.d.pid      # a relay child of the daemon
    finally:
        held.close()


# -- switches --------------------------------------------------------------------

def spread(env: Env, n: int = 8) -> dict[str, int]:
    got: dict[str, int] = {}
    for _ in range(n):
        name = env.request().split(":")[0]
        got[name] = got.get(name, 0) + 1
    return got


def test_host_disable_moves_traffic_at_once(env, backends):
    backends("127.0.0.1", env.bport)
    backends("127.0.0.2", env.bport)
    env.start(two_hosts(env))
    env.wait_state("127.0.0.1", "up")
    env.wait_state("127.0.0.2", "up")
    assert set(spread(env)) == {"127.0.0.1", "127.0.0.2"}
    assert env.ok("host", "disable", "127.0.0.1") == "command succeeded\n"
    assert spread(env) == {"127.0.0.2": 8}
    out = env.ok("show", "hosts")
    assert row(1, "host", "127.0.0.1", "", "disabled") in out
    assert env.ok("host", "disable", "2") == "command succeeded\n"     # by id
    assert env.ok("show", "summary").endswith(row(2, "host", "127.0.0.2", "", "disabled"))
    assert env.ok("h", "e", "1") == "command succeeded\n"
    assert env.ok("host", "enable", "127.0.0.2") == "command succeeded\n"
    env.wait_state("127.0.0.1", "up")
    env.wait_state("127.0.0.2", "up")
    assert set(spread(env)) == {"127.0.0.1", "127.0.0.2"}


def test_host_disable_in_an_unchecked_table(env, backends):
    backends("127.0.0.1", env.bport)
    backends("127.0.0.2", env.bport)
    env.start(f"table <web> {{ 127.0.0.1, 127.0.0.2 }}\n"
              f'relay "www" {{\n\tlisten on 127.0.0.1 port {env.port}\n'
              f"\tforward to <web> port {env.bport}\n}}\n")
    assert env.ok("host", "disable", "127.0.0.2") == "command succeeded\n"
    assert spread(env, 6) == {"127.0.0.1": 6}
    assert env.ok("host", "enable", "127.0.0.2") == "command succeeded\n"
    assert set(spread(env)) == {"127.0.0.1", "127.0.0.2"}


def test_table_disable_swaps_to_backup(env, backends):
    backends("127.0.0.1", env.bport)
    backends("127.0.0.3", env.bport, name="backup")
    env.start(f"table <web> {{ 127.0.0.1 }}\ntable <fb> {{ 127.0.0.3 }}\n"
              f'relay "www" {{\n\tlisten on 127.0.0.1 port {env.port}\n'
              f"\tforward to <web> port {env.bport} check tcp\n"
              f"\tforward to <fb> port {env.bport} check tcp\n}}\n")
    env.wait_state("127.0.0.1", "up")
    env.wait_state("127.0.0.3", "up")
    assert spread(env, 3) == {"127.0.0.1": 3}
    assert env.ok("table", "disable", f"web:{env.bport}") == "command succeeded\n"
    assert spread(env, 3) == {"backup": 3}
    out = env.ok("show", "hosts")
    assert out.startswith(HEADER + row(1, "table", f"web:{env.bport}", "", "disabled")
                          + row(2, "table", f"fb:{env.bport}", "", "active (1 hosts)"))
    assert env.ok("t", "en", "1") == "command succeeded\n"
    assert env.ok("poll") == "command succeeded\n"
    env.wait_state("127.0.0.1", "up")
    assert spread(env, 3) == {"127.0.0.1": 3}


def test_poll_checks_at_once(env, backends):
    b = backends("127.0.0.1", env.bport)
    env.start(f"table <web> {{ 127.0.0.1 }}\n"
              f'relay "www" {{\n\tlisten on 127.0.0.1 port {env.port}\n'
              f"\tforward to <web> port {env.bport} check tcp\n}}\n", interval=3600)
    env.wait_state("127.0.0.1", "up")
    # The first check's connection (the backend may count it a moment after
    # relayd logged the state); with an hour's interval only poll makes another.
    before = wait_for(lambda: b.connects, 10, "the first check's connection")
    assert env.ok("poll") == "command succeeded\n"
    wait_for(lambda: b.connects > before, 30, "the check poll asked for")
    assert re.search(r"total: 2/2 checks", env.ok("show", "hosts"))


# -- reload ------------------------------------------------------------------------

def test_reload_keeps_up_hosts_up_and_load(env, backends):
    backends("127.0.0.1", env.bport)
    d = env.start(two_hosts(env), interval=30)
    env.wait_state("127.0.0.1", "up")
    r = env.ctl("reload")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    d.wait_output("parent_reload: configuration reloaded")
    out = env.ok("show", "hosts")          # no new check yet (interval 30): still up
    assert row(1, "host", "127.0.0.1", "100.00%", "up") in out
    assert env.request() == "127.0.0.1:ping"

    other = env.conf(f"table <web> {{ 127.0.0.1 }}\n"
                     f'relay "other" {{\n\tlisten on 127.0.0.1 port {env.port}\n'
                     f"\tforward to <web> port {env.bport} check tcp\n}}\n",
                     interval=30, name="other.conf")
    r = env.ctl("load", os.path.relpath(other, REPO))    # relative to relayctl's cwd
    assert (r.returncode, r.stdout) == (0, "")
    assert rows_only(env.ok("show", "relays")) == \
        HEADER + row(1, "relay", "other", "", "active")
    assert row(1, "host", "127.0.0.1", "100.00%", "up") in env.ok("show", "hosts")
    assert env.ok("rel") == ""                           # back to the -f file
    assert rows_only(env.ok("show", "relays")) == HEADER + row(1, "relay", "www", "", "active")

    bad = env.tmp / "bad.conf"
    bad.write_text("relay {\n")
    r = env.ctl("load", str(bad))
    assert (r.returncode, r.stdout) == (1, "command failed\n")
    assert rows_only(env.ok("show", "relays")) == HEADER + row(1, "relay", "www", "", "active")


# -- monitor and logging -------------------------------------------------------------

def test_monitor_shows_switches_and_state_changes(env, backends):
    b2 = backends("127.0.0.2", env.bport)
    backends("127.0.0.1", env.bport)
    env.start(two_hosts(env))
    env.wait_state("127.0.0.2", "up")
    mon = subprocess.Popen([RELAYCTL, "-s", env.sock, "monitor"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(mon.stdout.readline, "")),
                     daemon=True).start()
    try:
        deadline = time.monotonic() + 10
        while not any(x.startswith("ctl_host_disable:") for x in lines):
            assert time.monotonic() < deadline, lines
            assert env.ok("host", "disable", "127.0.0.1") == "command succeeded\n"
            time.sleep(0.3)
            if not any(x.startswith("ctl_host_disable:") for x in lines):
                env.ok("host", "enable", "1")
        i = next(i for i, x in enumerate(lines) if x.startswith("ctl_host_disable:"))
        assert lines[i] == "ctl_host_disable: imsg type 21 len 84 peerid 0 pid 1\n"
        assert re.fullmatch(r"\ttimestamp: \d+, \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n",
                            lines[i + 1])
        assert lines[i + 2:i + 4] == ["\tid: 1\n", "\tname: 127.0.0.1\n"]
        b2.stop()                                  # host 2 goes down: host_status
        wait_for(lambda: "\tstate: down\n" in lines, 10, "host 2's state: down",
                 lambda: lines)
        j = lines.index("\tstate: down\n")
        assert lines[j - 3] == "host_status: imsg type 36 len 48 peerid 0 pid 1\n"
        assert lines[j - 1] == "\tid: 2\n"
        assert mon.poll() is None
    finally:
        mon.terminate()
        mon.wait(5)


def test_monitor_ends_when_relayd_stops(env, backends):
    backends("127.0.0.1", env.bport)
    d = env.start(two_hosts(env))
    mon = subprocess.Popen([RELAYCTL, "-s", env.sock, "monitor"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        d.stop()
        _, err = mon.communicate(timeout=10)
        assert (mon.returncode, err) == (1, "relayctl: pipe closed\n")
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()


def test_log_verbose_and_brief(env, backends):
    backends("127.0.0.1", env.bport)
    d = env.start(two_hosts(env))
    env.ok("host", "disable", "2")
    time.sleep(0.2)
    assert "disable_host: host 2" not in d.output()
    assert env.ok("log", "verbose") == "logging request sent.\n"
    env.ok("host", "enable", "2")
    d.wait_output("enable_host: host 2")
    assert env.ok("log", "brief") == "logging request sent.\n"
    env.ok("host", "disable", "1")
    time.sleep(0.2)
    assert "disable_host: host 1" not in d.output()


# -- JSON, errors, sockets -----------------------------------------------------------

def test_json_output(env, backends):
    backends("127.0.0.1", env.bport)
    env.start(two_hosts(env))
    env.wait_state("127.0.0.1", "up")
    rows = [json.loads(x) for x in env.ok("-j", "show", "hosts").splitlines()]
    assert [r["type"] for r in rows] == ["table", "host", "host"]
    assert rows[0]["name"] == f"web:{env.bport}" and rows[0]["up"] >= 1
    assert (rows[1]["name"], rows[1]["state"], rows[1]["id"]) == ("127.0.0.1", "up", 1)
    assert rows[1]["check_cnt"] == rows[1]["up_cnt"] >= 1
    rows = [json.loads(x) for x in env.ok("-j", "show", "summary").splitlines()]
    assert rows[0] == {"type": "relay", "id": 1, "name": "www", "disabled": False,
                       "stats": rows[0]["stats"]}
    assert json.loads(env.ok("-j", "host", "disable", "1")) == {"type": "ok"}
    r = env.ctl("-j", "host", "enable", "nosuch")
    assert r.returncode == 1 and json.loads(r.stdout)["type"] == "fail"


def test_errors(env, backends):
    backends("127.0.0.1", env.bport)
    env.start(two_hosts(env))
    r = env.ctl("frobnicate")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("unknown argument: frobnicate\nvalid commands/args:\n")
    r = env.ctl("show", "everything", module=True)
    assert r.returncode == 1 and r.stderr.startswith("unknown argument: everything\n")
    r = env.ctl("s")
    assert r.returncode == 1 and r.stderr.startswith("ambiguous argument: s\n")
    r = env.ctl("host", "disable", "nosuch")
    assert (r.returncode, r.stdout) == (1, "command failed\n")
    assert "nosuch" in r.stderr
    r = env.ctl("table", "enable", "web")            # instance names carry the port
    assert (r.returncode, r.stdout) == (1, "command failed\n")
    r = env.ctl("host", "disable", "99")
    assert (r.returncode, r.stdout) == (1, "command failed\n")
    r = env.ctl("redirect", "disable", "www")
    assert (r.returncode, r.stdout) == (1, "command failed\n")
    r = subprocess.run([RELAYCTL], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and r.stderr.startswith("missing argument:\n")


def test_alternate_socket_path(env, backends, tmp_path):
    backends("127.0.0.1", env.bport)
    env.sock = str(tmp_path / "sub" / "ctl")
    (tmp_path / "sub").mkdir()
    env.start(two_hosts(env))
    st = os.stat(env.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert env.ok("show", "relays", sock=env.sock).startswith(HEADER)
    missing = str(tmp_path / "relayd.sock")
    r = env.ctl("show", "summary", sock=missing)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"relayctl: connect: {missing}: No such file or directory\n"


def test_stale_socket_live_socket_and_stop(env, backends, daemons):
    backends("127.0.0.1", env.bport)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(env.sock)                   # a dead daemon's leftover
    stale.close()
    d = env.start(two_hosts(env))
    assert env.ok("show", "relays").startswith(HEADER)
    # a second relayd on the same socket is refused (and keeps its hands off)
    second = env.tmp / "second.conf"
    second.write_text(f'socket "{env.sock}"\ntable <web> {{ 127.0.0.1 }}\n'
                      f'relay "two" {{\n\tlisten on 127.0.0.1 port {free_port()}\n'
                      f"\tforward to <web> port {env.bport}\n}}\n")
    r = subprocess.run([PYTHON, "-m", "relayd", "-d", "-f", str(second)], cwd=REPO,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert "in use by a running relayd" in r.stderr
    assert rows_only(env.ok("show", "relays")) == HEADER + row(1, "relay", "www", "", "active")
    # stop
    assert env.ok("stop") == "command succeeded\n"
    d.proc.wait(15)
    assert d.proc.returncode == 0
    assert not os.path.exists(env.sock)


# -- carp demotion (keepalived track file) -----------------------------------------------

def test_demote_counter_logged_shown_and_exported(env, backends, tmp_path):
    """Every change of a demote group's counter is logged (group, old and new
    counter), `show summary` ends with a line per group and the metrics
    export it; relayd writes 0 again at exit.  (relayctl as `python -m`:
    the one of this tree.)"""
    demote_dir = tmp_path / "demote"
    mport = free_port()
    b = backends("127.0.0.1", env.bport)
    d = env.start(f"metrics listen on 127.0.0.1 port {mport}\n"
                  f"table <web> {{ 127.0.0.1 }}\n"
                  f'relay "www" {{\n\tlisten on 127.0.0.1 port {env.port}\n'
                  f"\tforward to <web> port {env.bport} check tcp demote tdmha\n}}\n",
                  env=dict(os.environ, RELAYD_DEMOTE_DIR=str(demote_dir)))
    env.wait_state("127.0.0.1", "up")
    track = demote_dir / "tdmha"
    summary_line = "    \tdemote  \ttdmha                   \t       \tcounter {}\n"

    def metric() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as f:
            m = re.search(r'^relayd_demote\{group="tdmha"\} (\S+)$', f.read().decode(), re.M)
        return m[1] if m else None

    assert track.read_text() == "0\n"
    assert env.ok("show", "summary", module=True).endswith(summary_line.format(0))
    assert metric() == "0.0"
    b.stop()
    env.wait_state("127.0.0.1", "down")
    d.wait_output("carp_demote_set: incremented the demote state of group 'tdmha' "
                  "(demote counter 0 -> 1)")
    assert track.read_text() == "1\n"
    out = env.ok("show", "summary", module=True)
    assert out.endswith(summary_line.format(1)), out
    assert json.loads(env.ok("-j", "show", "summary", module=True).splitlines()[-1]) == {
        "type": "demote", "name": "tdmha", "counter": 1, "file": str(track)}
    assert metric() == "1.0"
    backends("127.0.0.1", env.bport)
    env.wait_state("127.0.0.1", "up")
    d.wait_output("carp_demote_set: decremented the demote state of group 'tdmha' "
                  "(demote counter 1 -> 0)")
    assert track.read_text() == "0\n"
    assert env.ok("show", "summary", module=True).endswith(summary_line.format(0))
    d.stop()
    assert track.read_text() == "0\n"
