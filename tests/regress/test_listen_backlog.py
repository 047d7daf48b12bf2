"""The listen backlog (issue 19): without `backlog`, httpd and relayd listen
with engine.listen's default (511, capped by net.core.somaxconn) instead of
OpenBSD's 10; an explicit `backlog N` is honoured as written, and a reload
that changes it applies it.  (Sockets systemd passes keep their backlog:
test_httpd_privsep / test_relayd_privsep's socket activation tests.)
"""

from __future__ import annotations

import signal

from engine.listen import DEFAULT_BACKLOG, default_backlog
from tests.conftest import Daemon, free_port, listen_backlog, wait_port
from tests.regress.httpd_helpers import site_factory, wait_for  # noqa: F401


def test_default_is_511_capped_by_somaxconn():
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    assert DEFAULT_BACKLOG == 511
    assert default_backlog() == min(511, somaxconn)


HTTPD = """
server "default" {
    listen on 127.0.0.1 port {port}
    listen on ::1 port {port}
    root "/htdocs"
}
server "tls" {
    listen on 127.0.0.1 tls port {tls}
    root "/htdocs"
    tls certificate "{dir}/c.crt"
    tls key "{dir}/c.key"
}
server "small" {
    listen on 127.0.0.1 port {small}
    root "/htdocs"
    tcp backlog 32
}
"""


def test_httpd_backlogs(site_factory):  # noqa: F811
    import trustme
    ports = {"tls": free_port(), "small": free_port()}

    def setup(s):
        leaf = trustme.CA().issue_cert("c.test")
        leaf.cert_chain_pems[0].write_to_path(str(s.dir / "c.crt"))
        leaf.private_key_pem.write_to_path(str(s.dir / "c.key"))
    s = site_factory(HTTPD, setup=setup, extra_ports=list(ports.values()), **ports)
    want = default_backlog()
    assert listen_backlog(s.port) == want
    assert listen_backlog(s.port, "::1") == want
    assert listen_backlog(ports["tls"]) == want
    assert listen_backlog(ports["small"]) == 32
    # A reload applies a changed backlog to a socket it keeps.
    s.write_conf(HTTPD.replace("tcp backlog 32", "tcp backlog 48")
                 .replace('listen on ::1 port {port}', 'listen on ::1 port {port}\n'
                          '    tcp backlog 64'), **ports)
    s.daemon.signal(signal.SIGHUP)
    s.daemon.wait_output("parent_reload: configuration reloaded")
    wait_for(lambda: listen_backlog(ports["small"]) == 48, 10, "backlog 48")
    assert listen_backlog(s.port) == 64 and listen_backlog(s.port, "::1") == 64
    assert listen_backlog(ports["tls"]) == want


RELAYD = """
table <b> {{ 127.0.0.1 }}
protocol "small" {{ tcp {{ backlog 32 }} }}
relay "default" {{
    listen on 127.0.0.1 port {p1}
    forward to <b> port {backend}
}}
http protocol "web" {{ }}
relay "web" {{
    listen on 127.0.0.1 port {p2}
    protocol "web"
    forward to <b> port {backend}
}}
relay "small" {{
    listen on 127.0.0.1 port {p3}
    protocol "small"
    forward to <b> port {backend}
}}
"""


def test_relayd_backlogs(tmp_path):
    ports = {"p1": free_port(), "p2": free_port(), "p3": free_port()}
    conf = tmp_path / "relayd.conf"
    conf.write_text(RELAYD.format(backend=free_port(), **ports))
    d = Daemon("relayd", conf)
    try:
        for p in ports.values():
            wait_port(p, proc=d.proc)
        assert listen_backlog(ports["p1"]) == default_backlog()
        assert listen_backlog(ports["p2"]) == default_backlog()
        assert listen_backlog(ports["p3"]) == 32
    finally:
        d.stop()
