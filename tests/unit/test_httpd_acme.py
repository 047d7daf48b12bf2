"""httpd's built-in ACME without a CA: the grammar (`acme config`, `tls
acme`) and its errors, the back-off, the http-01 answer in a server
process, and the scheduler's decisions with a stand-in parent."""

from __future__ import annotations

import datetime
import types

import pytest
import trio
import trustme

from httpd import acme, parse, server, server_http
from httpd.config import ACME_BACKOFF_STEPS
from shared.acme_conf import ACME_CONF
from shared.lexer import ConfigError

NOW = datetime.datetime.now(datetime.timezone.utc)


def acme_conf(tmp_path, alt: str = "www.a.test") -> str:
    path = tmp_path / "acme-client.conf"
    path.write_text(f'authority ca {{\n\tapi url "https://127.0.0.1:1/dir"\n'
                    f'\taccount key "{tmp_path}/account.key"\n}}\n'
                    f'domain a.test {{\n\talternative names {{ {alt} }}\n'
                    f'\tdomain key "{tmp_path}/a.key"\n'
                    f'\tdomain full chain certificate "{tmp_path}/full.pem"\n}}\n')
    return str(path)


def httpd_conf(path: str, tls_lines: str, names: str = 'alias "www.a.test"') -> str:
    return (f'acme config "{path}"\n'
            f'server "a.test" {{\n\t{names}\n\tlisten on 127.0.0.1 tls port 8443\n'
            f'{tls_lines}\n}}\n')


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse.load("h.conf", text=text)
    return exc.value.lines


@pytest.mark.parametrize("tls", ['\ttls acme "a.test"', '\ttls { acme "a.test" }',
                                 '\ttls {\n\t\tacme a.test\n\t\tticket lifetime default\n\t}'])
def test_tls_acme_takes_the_domain_files(tmp_path, tls):
    conf = parse.load("h.conf", text=httpd_conf(acme_conf(tmp_path), tls))
    srv = conf.servers[0]
    assert srv.tls.acme == "a.test"
    assert srv.tls.certificate == f"{tmp_path}/full.pem"
    assert srv.tls.key == f"{tmp_path}/a.key"
    assert conf.acme.domain("a.test").names == ("a.test", "www.a.test")
    assert acme.handles(conf)["a.test"][1].name == "ca"


def test_acme_config_default_and_unread_without_tls_acme():
    conf = parse.load("h.conf", text='server "x" {\n\tlisten on 127.0.0.1 port 80\n}\n')
    assert conf.acme_config == ACME_CONF and conf.acme is None
    conf = parse.load("h.conf", text='acme config "/nonexistent"\n'
                      'server "x" {\n\tlisten on 127.0.0.1 port 80\n}\n')
    assert conf.acme_config == "/nonexistent" and conf.acme is None


def test_errors(tmp_path):
    path = acme_conf(tmp_path)
    assert errors(httpd_conf(path, '\ttls acme "b.test"')) == [
        f'h.conf:5: server "a.test": acme domain b.test not found in {path}']
    assert errors(httpd_conf(path, '\ttls acme "a.test"', 'alias "other.test"')) == [
        'h.conf:5: server "a.test": name "other.test" is not a name of acme domain a.test']
    assert errors(httpd_conf(path, '\ttls { certificate "/x.pem", acme "a.test" }')) == [
        'h.conf:5: server "a.test": tls acme takes the certificate and key from the acme domain']
    assert errors('acme config "/nonexistent/acme.conf"\n'
                  + httpd_conf(path, '\ttls acme "a.test"').split("\n", 1)[1]) == [
        "/nonexistent/acme.conf: No such file or directory"]
    bad = tmp_path / "bad.conf"
    bad.write_text("domain x {\n}\n")
    assert errors(httpd_conf(str(bad), '\ttls acme "x"')) == [
        f"{bad}:2: no domain key file specified for domain x"]


def test_backoff():
    base = 60
    assert [acme.backoff(n, base) for n in (1, 2, 3, 4, 5)] == \
        [60, 600, 6000, 86400, 86400]
    assert len(ACME_BACKOFF_STEPS) == 4
    assert acme.backoff(1, base, retry_after=3600) == 3600      # Retry-After wins
    assert acme.backoff(3, base, retry_after=10) == 6000
    assert acme.backoff(1, base, kind="rejectedIdentifier") == 86400


def test_base_interval(monkeypatch):
    monkeypatch.delenv("HTTPD_ACME_BASE", raising=False)
    assert acme.base_interval() == 60
    monkeypatch.setenv("HTTPD_ACME_BASE", "0.5")
    assert acme.base_interval() == 0.5
    monkeypatch.setenv("HTTPD_ACME_BASE", "soon")
    assert acme.base_interval() == 60


def exchange(worker, path: str, host: str | None, method: str = "GET"):
    hmap = {"host": host} if host is not None else {}
    return types.SimpleNamespace(path=path, req=types.SimpleNamespace(method=method, hmap=hmap),
                                 worker=worker, srv="srv", conf=None)


def test_challenge_answer():
    w = server_http.Worker(prefix="", logs=None)
    server.set_acme_tokens(w, {"add": {"tok": ["tok.thumb", ["a.test", "www.a.test"]]}})
    path = "/.well-known/acme-challenge/tok"
    fr = server_http.acme_answer(exchange(w, path, "WWW.a.test:80"))
    assert (fr.status, fr.segments, fr.length) == (200, [b"tok.thumb"], 9)
    assert fr.headers == [("Content-Type", "text/plain")]
    assert server_http.acme_answer(exchange(w, path, "a.test", "HEAD")).segments == []
    for x in (exchange(w, path, "other.test"),               # not the domain's name
              exchange(w, path, None),                       # no Host
              exchange(w, path + "x", "a.test"),             # unknown token
              exchange(w, path, "a.test", "POST"),
              exchange(w, "/tok", "a.test")):
        assert server_http.acme_answer(x) is None
    server.set_acme_tokens(w, {"del": ["tok"]})
    assert w.acme_tokens == {}


class FakeParent:
    def __init__(self, serial=None) -> None:
        self.serial = serial
        self.reloads = 0
        self.sup = types.SimpleNamespace(of=lambda title: [])

    def served_serial(self, handle):
        return self.serial

    async def reload_certs(self):
        self.reloads += 1
        return True


def write_cert(path, names, days_left: float, lifetime: float = 90):
    leaf = trustme.CA().issue_cert(
        *names, not_before=NOW - datetime.timedelta(days=lifetime - days_left),
        not_after=NOW + datetime.timedelta(days=days_left))
    leaf.cert_chain_pems[0].write_to_path(str(path))
    return acme.read_cert(types.SimpleNamespace(certfile=str(path)))


def renewer(tmp_path, parent):
    conf = parse.load("h.conf", text=httpd_conf(acme_conf(tmp_path), '\ttls acme "a.test"'))
    dom, auth = acme.handles(conf)["a.test"]
    a = acme.Acme(parent)
    a.base = 60.0
    return acme.Renewer(a, "a.test", dom, auth), dom


def test_renewer_picks_up_new_files_and_waits(tmp_path):
    parent = FakeParent(serial=1)
    r, dom = renewer(tmp_path, parent)
    info = write_cert(dom.certfile, ("a.test", "www.a.test"), days_left=60)
    wait = trio.run(r.step, NOW.timestamp())
    assert parent.reloads == 1                      # someone else's new files
    assert wait == 60.0                             # not due: look again after base
    parent.serial = info.serial
    trio.run(r.step, NOW.timestamp())
    assert parent.reloads == 1
    assert not acme.needs_issue(dom, info, NOW.timestamp())
    assert acme.needs_issue(dom, info, info.not_after - 29 * 86400)
    assert acme.needs_issue(dom, None, NOW.timestamp())
    other = write_cert(dom.certfile, ("a.test",), days_left=60)
    assert acme.needs_issue(dom, other, NOW.timestamp())     # names changed


def test_renewer_waits_for_the_lock(tmp_path):
    import fcntl
    import os
    parent = FakeParent()
    r, dom = renewer(tmp_path, parent)
    fd = os.open(os.path.join(tmp_path, ".a.test.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert trio.run(r.step, NOW.timestamp()) == 60.0   # missing files, lock held: wait
        assert r.waiting and r.failures == 0
    finally:
        os.close(fd)
