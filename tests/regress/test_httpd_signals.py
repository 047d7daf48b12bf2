"""httpd signals: SIGTERM/SIGINT stop (exit 0, "parent terminating"),
SIGUSR1 reopens logs, SIGHUP reloads (new root, new/removed ports, broken
config keeps the old one serving, connections in flight survive)."""

from __future__ import annotations

import re
import signal
import socket

import pytest

from tests.regress.httpd_helpers import (Conn, free_port, request, site_factory,  # noqa: F401
                                         wait_for)

BASE = 'server "sig.test" {{\n listen on 127.0.0.1 port {port}\n root "{root}"\n}}\n'


def _two_roots(site):
    for root in ("one", "two"):
        (site.dir / root).mkdir()
        (site.dir / root / "index.html").write_text(f"root {root}\n")


def reconf(site, text: str) -> None:
    site.conf.write_text(f'chroot "{site.dir}"\n' + text)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal(site_factory, sig):
    site = site_factory(BASE.format(port="{port}", root="/one"), setup=_two_roots)
    d = site.daemon
    site.daemon.signal(sig)
    assert d.proc.wait(15) == 0
    out = d.output()
    assert f"parent terminating, pid {d.pid}" in out
    assert "lost child" not in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", site.port), timeout=2).close()


def test_sigusr1_reopens_log(site_factory):
    site = site_factory(BASE.format(port="{port}", root="/one"), setup=_two_roots)
    request(site.port, "/?before")
    site.wait_log(r"\?before ")
    rotated = site.logs / "access.log.0"
    (site.logs / "access.log").rename(rotated)
    site.daemon.signal(signal.SIGUSR1)
    wait_for((site.logs / "access.log").exists, what="access.log reopened")
    request(site.port, "/?after")
    site.wait_log(r"\?after ")
    old = rotated.read_text()
    assert "?before " in old and "?after " not in old
    assert "?before " not in (site.logs / "access.log").read_text()


def test_sighup_new_root(site_factory):
    site = site_factory(BASE.format(port="{port}", root="/one"), setup=_two_roots)
    assert site.get("/").body == b"root one\n"
    reconf(site, BASE.format(port=site.port, root="/two"))
    site.daemon.signal(signal.SIGHUP)
    wait_for(lambda: site.get("/").body == b"root two\n", what="new root served")


def test_sighup_broken_config_keeps_old(site_factory):
    site = site_factory(BASE.format(port="{port}", root="/one"), setup=_two_roots)
    reconf(site, 'server "sig.test" {\n listen on 127.0.0.1 port '
                 f'{site.port}\n root "/two"\n bogus directive here\n}}\n')
    site.daemon.signal(signal.SIGHUP)
    out = site.daemon.wait_output(f"{site.conf}:5: ")
    assert re.search(rf"^{re.escape(str(site.conf))}:5: ", out, re.M)
    assert site.get("/").body == b"root one\n"
    assert site.daemon.proc.poll() is None
    # a fixed file is picked up by the next SIGHUP
    reconf(site, BASE.format(port=site.port, root="/two"))
    site.daemon.signal(signal.SIGHUP)
    wait_for(lambda: site.get("/").body == b"root two\n", what="fixed config applied")


def test_sighup_adds_and_removes_ports(site_factory):
    port2 = free_port()
    site = site_factory(BASE.format(port="{port}", root="/one"), setup=_two_roots)
    reconf(site, f'server "sig.test" {{\n listen on 127.0.0.1 port {port2}\n root "/two"\n}}\n')
    site.daemon.signal(signal.SIGHUP)
    site.daemon.wait_output("parent_reload: configuration reloaded")
    assert request(port2, "/").body == b"root two\n"
    with pytest.raises(OSError):       # closed by the time the line is logged
        socket.create_connection(("127.0.0.1", site.port), timeout=2).close()


def test_sighup_keeps_connection_in_flight(site_factory):
    site = site_factory(BASE.format(port="{port}", root="/one"), setup=_two_roots)
    with Conn(site.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.response().body == b"root one\n"
        reconf(site, BASE.format(port=site.port, root="/two"))
        site.daemon.signal(signal.SIGHUP)
        wait_for(lambda: site.get("/").body == b"root two\n", what="reload")
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = c.response()
        assert r is not None and r.status == 200


def test_sighup_unchanged_port_keeps_listening(site_factory):
    site = site_factory(BASE.format(port="{port}", root="/one"), setup=_two_roots)
    for _ in range(3):
        site.daemon.signal(signal.SIGHUP)
        assert site.get("/").status == 200
    assert site.daemon.proc.poll() is None
