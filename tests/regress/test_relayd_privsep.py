"""relayd privilege separation, prefork and reload without interruption,
black-box: `python -m relayd -d -f CONF` as root, looked at through /proc.

Covers A02-A04 and R04/R87/R88: the process table (parent, pfe, hce, ca,
relay x prefork) with titles, users, NoNewPrivs and chroots; a relay
worker's view of the file system; a privileged port served by
unprivileged workers; reloads (SIGHUP) under a client loop without a
failed or reset connection, a 100 MiB transfer through a TCP relay
across a reload, a broken file keeping the old configuration, prefork
changes, a killed worker restarted, systemd notifications and socket
activation, session counters summed over workers (relayctl, metrics).

Clients are threads with raw sockets; nothing here asserts on timing.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from shared import landlock
from tests.conftest import (PYTHON, REPO, Daemon, children, free_port, listen_backlog,
                            probe_kills, proc_status, procs_by_title, sandboxed, status_ids,
                            wait_for)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, setuid)")]

RELAYCTL = str(Path(PYTHON).parent / "relayctl")


# -- /proc ---------------------------------------------------------------------------

def procs(d) -> dict[str, list[int]]:
    """The daemon's children by title ("relay", "hce", "pfe", "ca")."""
    return procs_by_title(d.pid, "relayd")


def wait_procs(d, relays: int, timeout: float = 30.0, exclude: set[int] = frozenset()
               ) -> dict[str, list[int]]:
    """Wait until the daemon has pfe, hce, ca and exactly `relays` relay
    processes (none of `exclude`), each with its sandbox in place."""
    deadline = time.monotonic() + timeout
    p: dict = {}
    while time.monotonic() < deadline:
        p = procs(d)
        rel = p.get("relay", [])
        if (len(rel) == relays and all(len(p.get(t, [])) == 1 for t in ("hce", "pfe", "ca"))
                and not set(rel) & exclude
                and all(sandboxed(x) for t in ("relay", "hce", "pfe", "ca") for x in p[t])):
            return p
        time.sleep(0.1)
    raise AssertionError(f"process table {p} (want {relays} relays):\n{d.output()}")




# -- helpers -------------------------------------------------------------------------

class Backend:
    """Threaded TCP backend: echo, or `size` bytes of a fixed pattern."""

    def __init__(self, handler: str = "echo", size: int = 0, addr: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.handler, self.size = handler, size
        self.conns = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._run, args=(c,), daemon=True).start()

    def _run(self, c: socket.socket) -> None:
        try:
            if self.handler == "echo":
                while data := c.recv(65536):
                    c.sendall(data)
            else:
                c.recv(16)
                c.sendall(pattern(self.size))
                c.shutdown(socket.SHUT_WR)
                c.recv(16)
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


_PATTERN: dict[int, bytes] = {}


def pattern(size: int) -> bytes:
    if size not in _PATTERN:
        block = hashlib.sha256(b"tandem").digest() * 2048        # 64 KiB
        _PATTERN[size] = (block * (size // len(block) + 1))[:size]
    return _PATTERN[size]


def echo_once(port: int, data: bytes = b"ping", timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def relay_conf(rport: int, bport: int, extra: str = "", sock: str | None = None) -> str:
    return (f"{extra}" + (f'socket "{sock}"\n' if sock else "")
            + f'relay "tcp" {{\n\tlisten on 127.0.0.1 port {rport}\n'
              f"\tforward to 127.0.0.1 port {bport}\n}}\n")


@pytest.fixture
def relayd(tmp_path):
    started: list[Daemon] = []

    def start(text: str, env: dict | None = None, name: str = "relayd.conf",
              wait: bool = True) -> Daemon:
        conf = tmp_path / name
        conf.write_text(text)
        d = Daemon("relayd", conf, env=env)
        d.path = conf
        started.append(d)
        if wait:
            wait_for(lambda: "startup" in d.output() or d.proc.poll() is not None,
                     30, "relayd startup")
            assert d.proc.poll() is None, d.output()
        return d
    yield start
    for d in started:
        d.stop()


@pytest.fixture
def backend():
    made: list[Backend] = []

    def make(*a, **kw) -> Backend:
        b = Backend(*a, **kw)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def reloaded(d, n: int, timeout: float = 30.0) -> None:
    wait_for(lambda: d.output().count("parent_reload: configuration reloaded") >= n,
             timeout, f"{n} reloads:\n{d.output()}")


# -- the process table ----------------------------------------------------------------

def test_process_table_users_and_chroots(relayd, backend, tmp_path):
    b = backend()
    rport = free_port()
    d = relayd("prefork 3\n" + relay_conf(rport, b.port, sock=str(tmp_path / "ctl.sock")))
    p = wait_procs(d, 3)
    assert sorted(p) == ["ca", "hce", "pfe", "relay"]
    assert proc_status(d.pid)["Uid"].split()[0] == "0"
    assert os.readlink(f"/proc/{d.pid}/root") == "/"
    for title in ("relay", "hce", "pfe", "ca"):
        for pid in p[title]:
            st = proc_status(pid)
            assert all(u != 0 for u in status_ids(st, "Uid")), (title, st["Uid"])
            assert all(g != 0 for g in status_ids(st, "Gid")), (title, st["Gid"])
            assert st["NoNewPrivs"] == "1"
            assert st["Groups"].split() == [st["Gid"].split()[0]]     # no supplementary
            # pfe too: nftables through libnftables, no nft(8) to run.
            assert os.readlink(f"/proc/{pid}/root") == "/var/empty", title
            assert st["Seccomp"] == "2", title      # filtered (shared.pledge)
    for pid in p["relay"] + p["hce"] + p["ca"]:
        assert int(proc_status(pid)["CapEff"], 16) == 0
    # pfe keeps CAP_NET_ADMIN (12) only, and no ambient set (it runs nothing).
    pfe = proc_status(p["pfe"][0])
    assert int(pfe["CapEff"], 16) == 1 << 12
    assert int(pfe["CapAmb"], 16) == 0
    st = os.stat("/var/empty")
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o755
    # Serving meanwhile.
    assert echo_once(rport) == b"ping"


def test_worker_sees_only_its_chroot(relayd, backend):
    b = backend()
    rport = free_port()
    d = relayd(relay_conf(rport, b.port))
    p = wait_procs(d, os.cpu_count() or 1)
    for pid in p["relay"] + p["hce"] + p["pfe"] + p["ca"]:
        root = f"/proc/{pid}/root"
        assert not os.path.exists(f"{root}/etc/passwd")
        assert not os.path.exists(f"{root}{REPO}")
        assert os.listdir(root) == [] or set(os.listdir(root)) <= {"lost+found"}


def test_privileged_port_served_by_unprivileged_workers(relayd, backend):
    b = backend()
    port = None
    for cand in range(1023, 900, -1):
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", cand))
            port = cand
            break
        except OSError:
            continue
    if port is None:
        pytest.fail("no free port below 1024")
    d = relayd("prefork 2\n" + relay_conf(port, b.port))
    p = wait_procs(d, 2)
    assert echo_once(port) == b"ping"
    for pid in p["relay"]:
        assert all(u != 0 for u in status_ids(proc_status(pid), "Uid"))


# -- reload --------------------------------------------------------------------------

def test_sighup_storm_under_load_loses_nothing(relayd, backend):
    """Ten reloads alternating two files while clients keep connecting:
    every connection is served (none refused, reset or cut)."""
    b = backend()
    rport = free_port()
    confs = [relay_conf(rport, b.port, "prefork 2\n"),
             relay_conf(rport, b.port, "prefork 3\nlog connection errors\n")]
    d = relayd(confs[0])
    stop = threading.Event()
    lock = threading.Lock()
    done, failures = [0], []

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            data = b"%d:%d" % (i, n) * 50
            try:
                got = echo_once(rport, data)
            except OSError as e:
                with lock:
                    failures.append(repr(e))
                continue
            with lock:
                if got != data:
                    failures.append(f"short reply {len(got)}/{len(data)}")
                done[0] += 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            d.path.write_text(confs[(i + 1) % 2])
            d.signal(signal.SIGHUP)
            reloaded(d, i + 1, 60)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert done[0] > 50
    assert "lost child" not in d.output()
    wait_procs(d, 2)                       # the last file says prefork 2


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"hello " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_sighup_storm_http_keepalive(relayd):
    """The same with an HTTP relay and keep-alive clients: a response of
    an old generation says `Connection: close`, nothing is cut."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    rport = free_port()

    def conf(extra: str) -> str:
        return (f'{extra}http protocol "web" {{\n\tpass\n}}\n'
                f'relay "www" {{\n\tlisten on 127.0.0.1 port {rport}\n\tprotocol "web"\n'
                f"\tforward to 127.0.0.1 port {srv.server_address[1]}\n}}\n")
    confs = [conf("prefork 2\n"), conf("prefork 3\n")]
    d = relayd(confs[0])
    stop = threading.Event()
    lock = threading.Lock()
    done, failures = [0], []

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", rport), timeout=10) as s:
                    f = s.makefile("rb")
                    for _ in range(3):
                        n += 1
                        s.sendall(b"GET /%d/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (i, n))
                        status = f.readline()
                        headers = {}
                        while (line := f.readline()) not in (b"\r\n", b""):
                            k, _, v = line.decode().partition(":")
                            headers[k.strip().lower()] = v.strip()
                        body = f.read(int(headers.get("content-length", 0)))
                        with lock:
                            if not status.startswith(b"HTTP/1.1 200") or \
                                    body != b"hello /%d/%d" % (i, n):
                                failures.append((status, body))
                                break
                            done[0] += 1
                        if headers.get("connection", "").lower() == "close":
                            break
            except OSError as e:
                with lock:
                    failures.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            d.path.write_text(confs[(i + 1) % 2])
            d.signal(signal.SIGHUP)
            reloaded(d, i + 1, 60)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        srv.shutdown()
    assert not failures, failures[:5]
    assert done[0] > 50
    assert "lost child" not in d.output()


def test_long_transfer_survives_reload(relayd, backend):
    size = 100 << 20
    b = backend("bulk", size)
    rport = free_port()
    d = relayd(relay_conf(rport, b.port))
    got = hashlib.sha256()
    n = 0
    with socket.create_connection(("127.0.0.1", rport), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.sendall(b"go")
        first = s.recv(65536)
        got.update(first)
        n += len(first)
        d.path.write_text(relay_conf(rport, b.port, "log connection\n"))
        d.signal(signal.SIGHUP)
        reloaded(d, 1)
        while chunk := s.recv(1 << 20):
            got.update(chunk)
            n += len(chunk)
    assert n == size
    assert got.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
    assert "lost child" not in d.output()


def test_broken_config_keeps_old_one_serving(relayd, backend):
    b = backend()
    rport = free_port()
    d = relayd("prefork 2\n" + relay_conf(rport, b.port))
    before = wait_procs(d, 2)
    d.path.write_text("prefork 3\nrelay broken {\n")
    d.signal(signal.SIGHUP)
    out = d.output()
    wait_for(lambda: "configuration failed" in d.output(), what="reload refused")
    out = d.output()
    assert re.search(rf"^{re.escape(str(d.path))}:\d+: ", out, re.M), out
    assert echo_once(rport) == b"ping"
    assert procs(d)["relay"] == before["relay"]          # same workers, not restarted


def test_reload_adds_relay_and_changes_prefork(relayd, backend):
    b = backend()
    rport, rport2 = free_port(), free_port()
    d = relayd("prefork 3\n" + relay_conf(rport, b.port))
    old = set(wait_procs(d, 3)["relay"])
    d.path.write_text("prefork 2\n" + relay_conf(rport, b.port)
                      + f'relay "two" {{\n\tlisten on 127.0.0.1 port {rport2}\n'
                        f"\tforward to 127.0.0.1 port {b.port}\n}}\n")
    d.signal(signal.SIGHUP)
    reloaded(d, 1)
    assert echo_once(rport2) == b"ping"
    assert echo_once(rport) == b"ping"
    new = wait_procs(d, 2, exclude=old)
    assert not set(new["relay"]) & old


def test_reload_by_relayctl(relayd, backend, tmp_path):
    b = backend()
    rport = free_port()
    sock = str(tmp_path / "ctl.sock")
    d = relayd("prefork 1\n" + relay_conf(rport, b.port, sock=sock))
    old = set(wait_procs(d, 1)["relay"])
    d.path.write_text("prefork 2\n" + relay_conf(rport, b.port, sock=sock))
    r = subprocess.run([RELAYCTL, "-s", sock, "reload"], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout) == (0, ""), (r, d.output())
    assert "parent_reload: configuration reloaded" in d.output()
    wait_procs(d, 2, exclude=old)
    assert echo_once(rport) == b"ping"


# -- children dying ------------------------------------------------------------------

@pytest.mark.parametrize("title", ["relay", "hce", "pfe", "ca"])
def test_killed_child_is_logged_and_restarted(relayd, backend, tmp_path, title):
    b = backend()
    rport = free_port()
    sock = str(tmp_path / "ctl.sock")
    d = relayd("prefork 2\n" + relay_conf(rport, b.port, sock=sock))
    p = wait_procs(d, 2)
    victim = p[title][0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"lost child: pid {victim} terminated; signal 9" in d.output(),
             what="lost child")
    p2 = wait_procs(d, 2, exclude={victim})
    assert victim not in p2[title]
    assert echo_once(rport) == b"ping"
    r = subprocess.run([RELAYCTL, "-s", sock, "show", "relays"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "tcp" in r.stdout
    assert d.proc.poll() is None


# -- syscall filters (shared.pledge) -------------------------------------------------
# TANDEM_PLEDGE_PROBE=ACTION makes a pledged process do ACTION on SIGUSR2
# (the filter is the production one; only the trigger is the test's).

@pytest.mark.parametrize("title,action", [("relay", "execve"), ("relay", "write"),
                                          ("hce", "netlink"), ("pfe", "execve"),
                                          ("ca", "write"), ("ca", "netlink")])
def test_forbidden_syscall_ends_child_and_parent_restarts_it(relayd, backend, tmp_path,
                                                             title, action):
    b = backend()
    rport = free_port()
    d = relayd("prefork 2\n" + relay_conf(rport, b.port, sock=str(tmp_path / "ctl.sock")),
               env={**os.environ, "TANDEM_PLEDGE_PROBE": action})
    victim = wait_procs(d, 2)[title][0]
    probe_kills(d, victim)
    wait_procs(d, 2, exclude={victim})
    assert echo_once(rport) == b"ping"
    assert d.proc.poll() is None


# -- hce's Landlock port rule ----------------------------------------------------------
# hce may connect to its check ports only; a reload that needs a new one
# gets a new hce, seeded with the states known so far.

def checked_conf(tables: list[tuple[str, str, int, int]]) -> str:
    """`interval 1`, and per (table, host, relay port, backend port) a
    checked table and a TCP relay to it."""
    out = "interval 1\ntimeout 500\nlog state changes\nprefork 1\n"
    for name, host, rport, bport in tables:
        out += (f"table <{name}> {{ {host} }}\n"
                f'relay "{name}" {{\n\tlisten on 127.0.0.1 port {rport}\n'
                f"\tforward to <{name}> port {bport} check tcp\n}}\n")
    return out


def state_lines(d, host: str) -> list[str]:
    return re.findall(rf"^host {re.escape(host)}, check tcp .*state (\w+ -> \w+)",
                      d.output(), re.M)


@pytest.mark.skipif(landlock.abi() < 4, reason="Landlock ABI < 4: no TCP port rules")
@pytest.mark.parametrize("target,result", [("other", "Permission denied"),
                                           ("check", "connected")])
def test_hce_connects_only_to_its_check_ports(relayd, backend, tmp_path, target, result):
    b = backend()
    rport, other = free_port(), free_port()
    port = b.port if target == "check" else other
    d = relayd(f'socket "{tmp_path}/ctl.sock"\n' + checked_conf([("web", "127.0.0.1", rport, b.port)]),
               env={**os.environ, "TANDEM_PLEDGE_PROBE": f"connect:{port}"})
    # its checks get through: the host comes up
    wait_for(lambda: "unknown -> up" in " ".join(state_lines(d, "127.0.0.1")),
             what=f"host up:\n{d.output()}")
    hce_pid = wait_procs(d, 1)["hce"][0]
    os.kill(hce_pid, signal.SIGUSR2)
    d.wait_output(f"pledge probe connect:{port}: survived ({result})", timeout=15)
    assert wait_procs(d, 1)["hce"] == [hce_pid]
    assert echo_once(rport) == b"ping"


def test_reload_with_new_check_port_restarts_hce_keeping_states(relayd, backend, tmp_path):
    b1, b2 = backend(), backend(addr="127.0.0.2")
    r1, r2 = free_port(), free_port()
    head = f'socket "{tmp_path}/ctl.sock"\n'
    d = relayd(head + checked_conf([("web", "127.0.0.1", r1, b1.port)]))
    wait_for(lambda: state_lines(d, "127.0.0.1") == ["unknown -> up"],
             what=f"host up:\n{d.output()}")
    hce1 = wait_procs(d, 1)["hce"][0]

    # Same check ports: the same hce takes the new configuration.
    d.signal(signal.SIGHUP)
    reloaded(d, 1)
    assert wait_procs(d, 1)["hce"] == [hce1]
    assert "restarting hce" not in d.output()

    # A new table checked on a new port: a new hce.
    d.path.write_text(head + checked_conf([("web", "127.0.0.1", r1, b1.port),
                                           ("api", "127.0.0.2", r2, b2.port)]))
    d.signal(signal.SIGHUP)
    reloaded(d, 2)
    assert "parent_reload: new check ports, restarting hce" in d.output()
    hce2 = wait_procs(d, 1, exclude=set())["hce"][0]
    assert hce2 != hce1
    wait_for(lambda: state_lines(d, "127.0.0.2") == ["unknown -> up"],
             what=f"new table's host up:\n{d.output()}")
    # the kept host was served throughout and never flapped
    assert echo_once(r1) == b"ping"
    assert echo_once(r2) == b"ping"
    time.sleep(2.5)      # a few more rounds of the new hce
    assert state_lines(d, "127.0.0.1") == ["unknown -> up"], d.output()
    assert "lost child" not in d.output()


# -- shared counters -------------------------------------------------------------------

def test_sessions_counted_over_workers(relayd, backend, tmp_path):
    b = backend()
    rport, mport = free_port(), free_port()
    sock = str(tmp_path / "ctl.sock")
    d = relayd(f"prefork 3\nlog connection\nmetrics listen on 127.0.0.1 port {mport}\n"
               + relay_conf(rport, b.port, sock=sock))
    wait_procs(d, 3)
    for _ in range(30):
        assert echo_once(rport) == b"ping"
    lines = wait_for(lambda: (lambda ls: ls if len(ls) >= 30 else None)(
        re.findall(r"^relay tcp, session (\d+) \((\d+) active\)", d.output(), re.M)),
        what="30 session lines")
    assert sorted(int(i) for i, _ in lines) == list(range(1, 31))   # one sequence
    r = subprocess.run([RELAYCTL, "-s", sock, "show", "relays"], capture_output=True,
                       text=True, timeout=30)
    m = re.search(r"total: (\d+) sessions", r.stdout)
    assert m and int(m[1]) == 30, r.stdout

    def scraped():
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as f:
            text = f.read().decode()
        m = re.search(r'^relayd_relay_sessions_total\{relay="tcp"\} (\S+)$', text, re.M)
        return m and float(m[1]) == 30.0
    wait_for(scraped, what="metrics sum")
    held = [socket.create_connection(("127.0.0.1", rport), timeout=10) for _ in range(4)]
    try:
        for s in held:
            s.sendall(b"h")
            assert s.recv(1) == b"h"
        r = subprocess.run([RELAYCTL, "-s", sock, "show", "sessions"], capture_output=True,
                           text=True, timeout=30)
        rows = re.findall(r"^session (\d+):(\d+) .*\n\tage .*, pid (\d+)$", r.stdout, re.M)
        assert len(rows) == 4, r.stdout
        relays = set(procs(d)["relay"])
        assert all(int(pid) in relays for _, _, pid in rows)
    finally:
        for s in held:
            s.close()


def test_roundrobin_in_turn_over_workers(relayd):
    """Round-robin positions are shared: hosts are taken in turn whatever
    worker accepts."""
    names = []
    socks = []
    port = free_port()
    for i in (1, 2, 3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((f"127.0.0.{i}", port))
        s.listen(64)
        socks.append(s)

        def serve(s=s, name=f"b{i}".encode()):
            while True:
                try:
                    c, _ = s.accept()
                except OSError:
                    return
                c.sendall(name)
                c.close()
        threading.Thread(target=serve, daemon=True).start()
    rport = free_port()
    d = relayd(f"prefork 3\ntable <web> {{ 127.0.0.1, 127.0.0.2, 127.0.0.3 }}\n"
               f'relay "lb" {{\n\tlisten on 127.0.0.1 port {rport}\n'
               f"\tforward to <web> port {port} mode roundrobin\n}}\n")
    wait_procs(d, 3)
    try:
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", rport), timeout=10) as c:
                names.append(c.recv(16))
    finally:
        for s in socks:
            s.close()
    assert names[:6] == [b"b1", b"b2", b"b3", b"b1", b"b2", b"b3"]
    assert {n: names.count(n) for n in set(names)} == {b"b1": 10, b"b2": 10, b"b3": 10}


# -- systemd ---------------------------------------------------------------------------

def test_sd_notify_ready_reloading_stopping(relayd, backend, tmp_path):
    b = backend()
    rport = free_port()
    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(30)
    try:
        env = dict(os.environ, NOTIFY_SOCKET=path)
        d = relayd(relay_conf(rport, b.port), env=env)
        assert ns.recv(4096) == b"READY=1"
        d.signal(signal.SIGHUP)
        assert ns.recv(4096) == b"RELOADING=1"
        assert ns.recv(4096) == b"READY=1"
        assert "configuration reloaded" in d.output()
        d.signal(signal.SIGTERM)
        assert ns.recv(4096) == b"STOPPING=1"
        assert d.proc.wait(20) == 0
    finally:
        ns.close()


def test_socket_activation(tmp_path, backend):
    """LISTEN_FDS/LISTEN_PID: relayd relays on the socket it was given (a
    bind of its own would fail: the port is taken without SO_REUSEADDR
    sharing)."""
    b = backend()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    rport = lsock.getsockname()[1]
    conf = tmp_path / "relayd.conf"
    conf.write_text(relay_conf(rport, b.port))
    wrapper = ("import os, sys\n"
               "os.dup2(int(sys.argv[1]), 3)\n"
               "os.environ['LISTEN_FDS'] = '1'\n"
               "os.environ['LISTEN_PID'] = str(os.getpid())\n"
               "os.execv(sys.executable, [sys.executable, '-m', 'relayd', '-d', '-f', sys.argv[2]])\n")
    out = open(tmp_path / "relayd.stderr", "wb")
    proc = subprocess.Popen([PYTHON, "-c", wrapper, str(lsock.fileno()), str(conf)], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, pass_fds=(lsock.fileno(),),
                            start_new_session=True)
    lsock.close()
    try:
        wait_for(lambda: b"startup" in (tmp_path / "relayd.stderr").read_bytes()
                 or proc.poll() is not None, 30, "startup")
        assert proc.poll() is None, (tmp_path / "relayd.stderr").read_text()
        assert echo_once(rport) == b"ping"
        assert listen_backlog(rport) == 64       # systemd's backlog, not ours
        for c in children(proc.pid):
            assert "LISTEN_FDS" not in open(f"/proc/{c}/environ", "rb").read().decode(
                errors="replace")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        out.close()


def test_sigterm_drains_sessions(relayd, backend):
    b = backend()
    rport = free_port()
    d = relayd(relay_conf(rport, b.port))
    wait_procs(d, os.cpu_count() or 1)
    with socket.create_connection(("127.0.0.1", rport), timeout=10) as s:
        s.sendall(b"a")
        assert s.recv(1) == b"a"
        d.signal(signal.SIGTERM)
        wait_for(lambda: "parent terminating" in d.output(), what="terminating")
        s.sendall(b"b")                       # the session goes on while draining
        assert s.recv(1) == b"b"
    assert d.proc.wait(20) == 0
    assert re.search(rf"^parent terminating, pid {d.pid}$", d.output(), re.M)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", rport), timeout=1).close()
