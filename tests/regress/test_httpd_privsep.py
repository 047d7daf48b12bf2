"""httpd privilege separation, prefork and reload without interruption,
black-box: `python -m httpd -d -f CONF` as root, looked at through /proc.

Covers A01/A03/A04/A09, H01, H03 and H79-H81: the process table (parent,
logger, server x prefork) with titles, users, NoNewPrivs and chroots; a
server's view of the file system; a privileged port served by
unprivileged workers; reloads (SIGHUP) under a client loop without a
failed or reset request, a 100 MiB download across a reload, a broken
file keeping the old configuration, a virtual host added by reload,
prefork changes, a killed worker restarted, systemd notifications and
socket activation.

Clients are threads with raw sockets; nothing here asserts on timing.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import (PYTHON, REPO, listen_backlog, probe_kills, proc_status,
                            procs_by_title, sandboxed, status_ids)
from tests.regress.httpd_helpers import (Conn, request, site_factory,  # noqa: F401
                                         wait_for)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, setuid)")]

SITE = 'server "priv.test" {{\n listen on 127.0.0.1 port {port}\n root "{root}"\n}}\n'


# -- /proc ---------------------------------------------------------------------------

def procs(d) -> dict[str, list[int]]:
    return procs_by_title(d.pid, "httpd")


def wait_procs(d, servers: int, timeout: float = 30.0, exclude=frozenset(),
               filtered: bool = True) -> dict:
    """Wait until the daemon has one logger and exactly `servers` servers
    (none of `exclude`), each with its sandbox in place (`filtered=False`:
    the daemon runs with -U)."""
    deadline = time.monotonic() + timeout
    p: dict = {}
    while time.monotonic() < deadline:
        p = procs(d)
        srv = p.get("server", [])
        if (len(srv) == servers and len(p.get("logger", [])) == 1
                and not set(srv) & set(exclude)
                and all(sandboxed(x, filtered) for x in srv + p["logger"])):
            return p
        time.sleep(0.1)
    raise AssertionError(f"process table {p} (want {servers} servers):\n{d.output()}")




def roots(site) -> None:
    for r in ("one", "two"):
        (site.dir / r).mkdir(exist_ok=True)
        (site.dir / r / "index.html").write_text(f"root {r}\n")


def reconf(site, text: str) -> None:
    site.conf.write_text(f'chroot "{site.dir}"\n' + text)


def reloaded(site, n: int, timeout: float = 60.0, every: float = 0.05) -> None:
    wait_for(lambda: site.daemon.output().count("parent_reload: configuration reloaded") >= n,
             timeout, f"{n} reloads:\n{site.daemon.output()}", every=every)


# -- the process table ----------------------------------------------------------------

def test_process_table_users_and_chroots(site_factory):
    site = site_factory("prefork 3\n" + SITE.format(port="{port}", root="/one"), setup=roots)
    d = site.daemon
    p = wait_procs(d, 3)
    assert sorted(p) == ["logger", "server"]
    assert os.readlink(f"/proc/{d.pid}/root") == "/"
    assert proc_status(d.pid)["Uid"].split()[0] == "0"
    for pid in p["server"] + p["logger"]:
        st = proc_status(pid)
        assert all(u != 0 for u in status_ids(st, "Uid")), st["Uid"]
        assert all(g != 0 for g in status_ids(st, "Gid")), st["Gid"]
        assert st["NoNewPrivs"] == "1"
        assert st["Groups"].split() == [st["Gid"].split()[0]]
        assert os.readlink(f"/proc/{pid}/root") == str(site.dir)
        # At most the file-mode capabilities (temp dirs are 0700 root).
        assert int(st["CapEff"], 16) & ~0b110 == 0
        assert st["Seccomp"] == "2"            # filtered (shared.pledge)
    assert site.get("/").body == b"root one\n"


def test_server_sees_only_its_chroot(site_factory):
    site = site_factory("prefork 2\n" + SITE.format(port="{port}", root="/one"), setup=roots)
    p = wait_procs(site.daemon, 2)
    for pid in p["server"] + p["logger"]:
        root = f"/proc/{pid}/root"
        assert not os.path.exists(f"{root}/etc/passwd")
        assert not os.path.exists(f"{root}{REPO}")
        assert os.path.exists(f"{root}/one/index.html")
    # ... and a request cannot climb out of it either.
    r = request(site.port, "/../../../../etc/passwd")
    assert r.status in (400, 403, 404)


def test_privileged_port_served_by_unprivileged_workers(site_factory):
    port = None
    for cand in range(899, 780, -1):        # (relayd's test takes 1023..901)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", cand))
            port = cand
            break
        except OSError:
            continue
    if port is None:
        pytest.fail("no free port below 1024")
    site = site_factory("prefork 2\n" + SITE.format(port=port, root="/one"), setup=roots,
                        wait_ports=[port])
    site.port = port
    p = wait_procs(site.daemon, 2)
    assert site.get("/").body == b"root one\n"
    for pid in p["server"]:
        assert all(u != 0 for u in status_ids(proc_status(pid), "Uid"))


# -- reload --------------------------------------------------------------------------

def test_sighup_storm_under_load_loses_nothing(site_factory):
    site = site_factory("prefork 2\n" + SITE.format(port="{port}", root="/one"), setup=roots)
    confs = ["prefork 2\n" + SITE.format(port=site.port, root="/one"),
             "prefork 3\n" + SITE.format(port=site.port, root="/two")]
    stop = threading.Event()
    lock = threading.Lock()
    done, failures = [0], []

    def client() -> None:
        """Keep-alive requests, two per connection, as HTTP clients do: a
        response with `Connection: close` ends the connection."""
        while not stop.is_set():
            try:
                with Conn(site.port) as c:
                    for last in (False, True):
                        c.send(b"GET / HTTP/1.1\r\nHost: priv.test\r\n"
                               + (b"Connection: close\r\n" if last else b"") + b"\r\n")
                        r = c.response()
                        if r is None or r.status != 200 or r.body not in (b"root one\n",
                                                                          b"root two\n"):
                            with lock:
                                failures.append(repr(r))
                            break
                        with lock:
                            done[0] += 1
                        if (r.header("connection") or "").lower() == "close":
                            break
            except (OSError, AssertionError) as e:
                with lock:
                    failures.append(repr(e))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            reconf(site, confs[(i + 1) % 2])
            site.daemon.signal(signal.SIGHUP)
            reloaded(site, i + 1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert done[0] > 50
    assert "lost child" not in site.daemon.output()
    wait_procs(site.daemon, 2)
    assert site.get("/").body == b"root one\n"


def test_reloaded_line_means_new_connections_see_new_config(site_factory):
    """The old generation stops accepting (and says so) before the parent
    logs `configuration reloaded`: every connection opened after that
    line is served by the new configuration, never by a draining server."""
    site = site_factory("prefork 3\n" + SITE.format(port="{port}", root="/one"), setup=roots)
    wait_procs(site.daemon, 3)
    for i in range(6):
        root = ("one", "two")[(i + 1) % 2]
        reconf(site, "prefork 3\n" + SITE.format(port=site.port, root=f"/{root}"))
        site.daemon.signal(signal.SIGHUP)
        reloaded(site, i + 1, every=0.001)     # the requests follow the line closely
        bodies = {request(site.port, "/").body for _ in range(20)}
        assert bodies == {f"root {root}\n".encode()}, (i, bodies)


def test_long_download_survives_reload(site_factory):
    size = 100 << 20
    block = hashlib.sha256(b"tandem").digest() * 2048

    def setup(site):
        roots(site)
        with open(site.dir / "one" / "big.bin", "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
    site = site_factory(SITE.format(port="{port}", root="/one"), setup=setup)
    h = hashlib.sha256()
    n = 0
    with socket.create_connection(("127.0.0.1", site.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: priv.test\r\nConnection: close\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, body = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200")
        assert f"Content-Length: {size}".encode() in head
        h.update(body)
        n += len(body)
        reconf(site, SITE.format(port=site.port, root="/two"))
        site.daemon.signal(signal.SIGHUP)
        reloaded(site, 1)
        while chunk := s.recv(1 << 20):
            h.update(chunk)
            n += len(chunk)
    assert n == size
    assert h.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()
    assert site.get("/").body == b"root two\n"


def test_broken_config_keeps_old_one_serving(site_factory):
    site = site_factory("prefork 2\n" + SITE.format(port="{port}", root="/one"), setup=roots)
    before = wait_procs(site.daemon, 2)
    reconf(site, "prefork 3\nserver broken {\n")
    site.daemon.signal(signal.SIGHUP)
    wait_for(lambda: "configuration failed" in site.daemon.output(), what="reload refused")
    out = site.daemon.output()
    assert re.search(rf"^{re.escape(str(site.conf))}:\d+: ", out, re.M), out
    assert site.get("/").body == b"root one\n"
    assert procs(site.daemon)["server"] == before["server"]


def test_vhost_added_by_reload_answers(site_factory):
    site = site_factory(SITE.format(port="{port}", root="/one"), setup=roots)
    assert site.get("/", host="new.test").body == b"root one\n"     # first server
    reconf(site, SITE.format(port=site.port, root="/one")
           + f'server "new.test" {{\n listen on 127.0.0.1 port {site.port}\n root "/two"\n}}\n')
    site.daemon.signal(signal.SIGHUP)
    reloaded(site, 1)
    assert site.get("/", host="new.test").body == b"root two\n"
    assert site.get("/", host="priv.test").body == b"root one\n"


def test_prefork_change_on_reload(site_factory):
    site = site_factory("prefork 3\n" + SITE.format(port="{port}", root="/one"), setup=roots)
    old = set(wait_procs(site.daemon, 3)["server"])
    reconf(site, "prefork 1\n" + SITE.format(port=site.port, root="/one"))
    site.daemon.signal(signal.SIGHUP)
    reloaded(site, 1)
    p = wait_procs(site.daemon, 1, exclude=old)
    assert not set(p["server"]) & old
    assert site.get("/").body == b"root one\n"


# -- children dying ------------------------------------------------------------------

@pytest.mark.parametrize("title", ["server", "logger"])
def test_killed_child_is_logged_and_restarted(site_factory, title):
    site = site_factory("prefork 2\n" + SITE.format(port="{port}", root="/one"), setup=roots)
    d = site.daemon
    victim = wait_procs(d, 2)[title][0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"lost child: pid {victim} terminated; signal 9" in d.output(),
             what="lost child")
    p = wait_procs(d, 2, exclude={victim})
    assert victim not in p[title]
    assert site.get("/?after").body == b"root one\n"
    site.wait_log(r"\?after ")                     # the logger writes again
    assert d.proc.poll() is None


# -- syscall filters (shared.pledge) -------------------------------------------------
# TANDEM_PLEDGE_PROBE=ACTION makes a pledged process do ACTION on SIGUSR2
# (the filter is the production one; only the trigger is the test's).

def probe_site(site_factory, monkeypatch, action: str, args=None):
    monkeypatch.setenv("TANDEM_PLEDGE_PROBE", action)
    site = site_factory("prefork 1\n" + SITE.format(port="{port}", root="/one"),
                        setup=roots, args=args)
    filtered = "-U" not in (args or [])
    victim = wait_procs(site.daemon, 1, filtered=filtered)["server"][0]
    # Answered: that server is serving, its SIGUSR2 handler is in place.
    assert site.get("/").body == b"root one\n"
    return site, victim


@pytest.mark.parametrize("action", ["execve", "write", "netlink"])
def test_forbidden_syscall_ends_server_and_parent_restarts_it(site_factory, monkeypatch,
                                                              action):
    site, victim = probe_site(site_factory, monkeypatch, action)
    probe_kills(site.daemon, victim)
    wait_procs(site.daemon, 1, exclude={victim})
    assert site.get("/?after").body == b"root one\n"
    assert not (site.dir / "pledge-probe").exists()


def test_allowed_syscall_keeps_server(site_factory, monkeypatch):
    site, victim = probe_site(site_factory, monkeypatch, "read")
    os.kill(victim, signal.SIGUSR2)
    site.daemon.wait_output("pledge probe read: survived (opened / read-only)")
    assert wait_procs(site.daemon, 1)["server"] == [victim]


@pytest.mark.parametrize("action", ["execve", "netlink"])
def test_flag_U_turns_filters_off(site_factory, monkeypatch, action):
    site, victim = probe_site(site_factory, monkeypatch, action, args=["-U"])
    assert proc_status(victim)["Seccomp"] == "0"
    os.kill(victim, signal.SIGUSR2)
    site.daemon.wait_output(f"pledge probe {action}: survived")
    assert wait_procs(site.daemon, 1, filtered=False)["server"] == [victim]
    assert "lost child" not in site.daemon.output()


# -- systemd ---------------------------------------------------------------------------

def test_sd_notify_ready_reloading_stopping(site_factory, tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        site = site_factory(SITE.format(port="{port}", root="/one"), setup=roots)
        assert ns.recv(4096) == b"READY=1"
        reconf(site, SITE.format(port=site.port, root="/two"))
        site.daemon.signal(signal.SIGHUP)
        assert ns.recv(4096) == b"RELOADING=1"
        assert ns.recv(4096) == b"READY=1"
        assert "configuration reloaded" in site.daemon.output()
        site.daemon.signal(signal.SIGTERM)
        assert ns.recv(4096) == b"STOPPING=1"
        assert site.daemon.proc.wait(20) == 0
    finally:
        ns.close()


def test_socket_activation(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "index.html").write_text("activated\n")
    (tmp_path / "logs").mkdir()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    port = lsock.getsockname()[1]
    conf = tmp_path / "httpd.conf"
    conf.write_text(f'chroot "{tmp_path}"\n' + SITE.format(port=port, root="/one"))
    wrapper = ("import os, sys\n"
               "os.dup2(int(sys.argv[1]), 3)\n"
               "os.environ['LISTEN_FDS'] = '1'\n"
               "os.environ['LISTEN_PID'] = str(os.getpid())\n"
               "os.execv(sys.executable, [sys.executable, '-m', 'httpd', '-d', '-f', sys.argv[2]])\n")
    errpath = tmp_path / "httpd.stderr"
    out = open(errpath, "wb")
    proc = subprocess.Popen([PYTHON, "-c", wrapper, str(lsock.fileno()), str(conf)], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, pass_fds=(lsock.fileno(),),
                            start_new_session=True)
    lsock.close()
    try:
        wait_for(lambda: proc.poll() is not None or _answers(port), 30,
                 "activated httpd")
        assert proc.poll() is None, errpath.read_text()
        assert request(port, "/").body == b"activated\n"
        assert listen_backlog(port) == 64        # systemd's backlog, not ours
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, errpath.read_text()
        out.close()


def _answers(port: int) -> bool:
    try:
        return request(port, "/").status == 200
    except (OSError, AssertionError):
        return False
