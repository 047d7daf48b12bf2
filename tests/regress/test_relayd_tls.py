"""relayd with TLS (features.md 2.7/2.8): termination with keypairs and SNI,
`forward with tls` (with and without `ca file`), TLS inspection, reload of
renewed certificates, bad input on a TLS port, sslyze's Mozilla check.

Certificates come from trustme and are written to a temp dir that
RELAYD_SSL_DIR (a test extension replacing /etc/ssl) points at; relayd runs
in that dir, where its relative `tls ca ...` file names are opened.  One relayd
(prefork 1, -vv) runs every relay; backends are threads on loopback.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import REPO, free_port, run_cmd, wait_for
from tests.regress.test_httpd_tls import make_webpki

DAY = datetime.timedelta(days=1)
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")


class Backend:
    """A loopback server thread: plain, or TLS with `ctx`; answers one
    HTTP/1.0 response and closes."""

    def __init__(self, body: bytes, ctx: ssl.SSLContext | None = None) -> None:
        self.body = body
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self.ctx is not None:
                conn = self.ctx.wrap_socket(conn, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(self.body), self.body))
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stopped = True
        self.sock.close()


def write_pair(d: Path, name: str, cert: trustme.LeafCert) -> None:
    (d / f"{name}.crt").write_bytes(cert.cert_chain_pems[0].bytes())
    (d / "private" / f"{name}.key").write_bytes(cert.private_key_pem.bytes())


def get(port: int, ctx: ssl.SSLContext, sni: str | None = "127.0.0.1",
        host: str = "x") -> tuple[bytes, ssl.SSLSocket]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t = ctx.wrap_socket(s, server_hostname=sni)
    t.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while True:
        try:
            chunk = t.recv(65536)
        except (ssl.SSLError, OSError):
            break
        if not chunk:
            break
        out += chunk
    t.close()
    return out, t


def peer_cert(port: int, ctx: ssl.SSLContext, sni: str | None = "127.0.0.1") -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname=sni) as t:
            return x509.load_der_x509_certificate(t.getpeercert(True))


def cert_and_reply(port: int, ctx: ssl.SSLContext, sni: str) -> tuple[x509.Certificate, bytes]:
    """The relay's certificate and its whole answer to a GET over TLS."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname=sni) as t:
            c = x509.load_der_x509_certificate(t.getpeercert(True))
            t.sendall(b"GET / HTTP/1.0\r\n\r\n")
            out = b""
            while chunk := t.recv(4096):
                out += chunk
    return c, out


def noverify() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


CONF = """
prefork 1
log connection
http protocol "web" {{
    tls {{ keypair "a.test"
          keypair "b.test" }}
}}
tcp protocol "good" {{
    tls ca file "backend-ca.pem"
}}
tcp protocol "bad" {{
    tls ca file "{d}/wrong-ca.pem"
}}
tcp protocol "mitm" {{
    tls {{ ca cert "local-ca.pem"
          ca key "local-ca.key" password "secret" }}
}}
tcp protocol "mozp" {{
    tls keypair "moz"
}}
relay "moz" {{
    listen on 127.0.0.1 port {p[moz]} tls
    protocol "mozp"
    forward to 127.0.0.1 port {plain}
}}
tcp protocol "cca" {{
    tls client ca "client-ca.pem"
}}
relay "cca" {{
    listen on 127.0.0.1 port {p[cca]} tls
    protocol "cca"
    forward to 127.0.0.1 port {plain}
}}
table <tlsck> {{ 127.0.0.1 }}
table <httpsck> {{ 127.0.0.1 }}
relay "chk" {{
    listen on 127.0.0.1 port {p[chk]}
    forward with tls to <tlsck> port {tlsb} check tls
    forward with tls to <httpsck> port {tlsb} check https "/" code 200
}}
relay "term" {{
    listen on 127.0.0.1 port {p[term]} tls
    protocol "web"
    forward to 127.0.0.1 port {plain}
}}
relay "dflt" {{
    listen on 127.0.0.1 port {p[dflt]} tls
    forward to 127.0.0.1 port {plain}
}}
relay "fwdgood" {{
    listen on 127.0.0.1 port {p[fwdgood]}
    protocol "good"
    forward with tls to 127.0.0.1 port {tlsb}
}}
relay "fwdbad" {{
    listen on 127.0.0.1 port {p[fwdbad]}
    protocol "bad"
    forward with tls to 127.0.0.1 port {tlsb}
}}
relay "fwdnoca" {{
    listen on 127.0.0.1 port {p[fwdnoca]}
    forward with tls to 127.0.0.1 port {tlsb}
}}
relay "inspect" {{
    listen on 127.0.0.1 port {p[inspect]} tls
    protocol "mitm"
    forward with tls to 127.0.0.1 port {tlsb}
}}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("ssl")
    (d / "private").mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    write_pair(d, "a.test", ca.issue_cert("a.test"))
    write_pair(d, "b.test", ca.issue_cert("b.test"))
    ports = {k: free_port() for k in ("term", "dflt", "fwdgood", "fwdbad", "fwdnoca",
                                      "inspect", "moz", "cca", "chk")}
    write_pair(d, f"127.0.0.1:{ports['dflt']}", ca.issue_cert("127.0.0.1"))
    write_pair(d, "127.0.0.1", ca.issue_cert("127.0.0.1", "inspect.test"))
    cca = trustme.CA()
    cca.cert_pem.write_to_path(str(d / "client-ca.pem"))
    now = datetime.datetime.now(datetime.timezone.utc)
    good_client = cca.issue_cert("client.test")
    expired_client = cca.issue_cert("old.test", not_before=now - 10 * DAY,
                                    not_after=now - DAY)
    make_webpki(d)          # moz.crt/moz.key as sslyze's path validation wants them
    (d / "moz.key").rename(d / "private" / "moz.key")
    # The TLS backend: its own CA (backend-ca.pem), subject and SANs to copy.
    bca = trustme.CA()
    bca.cert_pem.write_to_path(str(d / "backend-ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "wrong-ca.pem"))
    bleaf = bca.issue_cert("backend.test", "alt.backend.test",
                           common_name="backend.test", organization_name="Backend Org")
    bctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bleaf.configure_cert(bctx)
    # The inspection CA, its key encrypted.
    lca = trustme.CA(organization_name="Local Inspect CA")
    lca.cert_pem.write_to_path(str(d / "local-ca.pem"))
    key = serialization.load_pem_private_key(lca.private_key_pem.bytes(), None)
    (d / "local-ca.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    plain = Backend(b"plain-backend")
    tlsb = Backend(b"tls-backend", bctx)
    conf = d / "relayd.conf"
    conf.write_text(CONF.format(d=d, p=ports, plain=plain.port, tlsb=tlsb.port))
    # Relative TLS file names are opened from relayd's working directory.
    env = {**os.environ, "RELAYD_SSL_DIR": str(d), "PYTHONPATH": str(REPO)}
    import subprocess
    import sys
    errpath = d / "relayd.stderr"
    errf = open(errpath, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "-d", "-vv", "-f", str(conf)],
                            cwd=d, stdout=errf, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)

    def output() -> str:
        errf.flush()
        return errpath.read_text(errors="replace")
    try:
        wait_for(lambda: "startup" in output() or proc.poll() is not None, 20, "startup")
        assert proc.poll() is None, output()
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        yield dict(good_client=good_client, expired_client=expired_client, dir=d, ports=ports, ca=ca, ctx=ctx, proc=proc, output=output, bleaf=bleaf,
                   lca=lca, env=env)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errf.close()
        plain.close()
        tlsb.close()


def test_termination_http_to_plain_backend(site):
    out, t = get(site["ports"]["term"], site["ctx"], sni="a.test", host="a.test")
    assert out.startswith(b"HTTP/1.") and out.endswith(b"plain-backend"), out
    wait_for(lambda: "relay term, tls session" in site["output"](), what="tls session line")
    assert " established (" in site["output"]()


def test_sni_picks_keypair(site):
    p = site["ports"]["term"]
    for name in ("a.test", "b.test"):
        c = peer_cert(p, site["ctx"], sni=name)
        sans = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [name]
    # Unknown name: the first keypair, no error.
    c = peer_cert(p, noverify(), sni="unknown.test")
    assert c.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["a.test"]
    assert "unknown server name unknown.test" in site["output"]()


def test_default_keypair_named_after_listen_address(site):
    c = peer_cert(site["ports"]["dflt"], site["ctx"])
    sans = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    out, t = get(site["ports"]["dflt"], site["ctx"])
    assert out.endswith(b"plain-backend")


def test_old_tls_refused(site):
    ctx = noverify()
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pass
    with socket.create_connection(("127.0.0.1", site["ports"]["dflt"]), timeout=5) as s:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(s).do_handshake()
    # Anything that does connect negotiates 1.2 or newer.
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = noverify()
        ctx.minimum_version = ctx.maximum_version = v
        with socket.create_connection(("127.0.0.1", site["ports"]["dflt"]), timeout=5) as s:
            with ctx.wrap_socket(s) as t:
                assert t.version() in ("TLSv1.2", "TLSv1.3")


def test_plain_http_on_tls_port_closed_with_log(site):
    with socket.create_connection(("127.0.0.1", site["ports"]["dflt"]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:     # unread request bytes: RST
                break
            if not chunk:
                break
            data += chunk
    assert b"HTTP/" not in data and b"plain-backend" not in data
    wait_for(lambda: "relay dflt" in site["output"]() and "tls handshake failed" in
             site["output"](), what="handshake failure line")


def tcp_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        out = b""
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk


def test_forward_with_tls_ca_file(site):
    assert tcp_get(site["ports"]["fwdgood"]).endswith(b"tls-backend")


def test_forward_with_tls_wrong_ca_fails_logged(site):
    assert tcp_get(site["ports"]["fwdbad"]) == b""
    wait_for(lambda: "relay_tls_connect" in site["output"]() and "relay fwdbad," in
             site["output"](), what="backend tls failure lines")


def test_forward_with_tls_without_ca_file(site):
    assert tcp_get(site["ports"]["fwdnoca"]).endswith(b"tls-backend")


def test_interception_forges_backend_certificate(site):
    ctx = ssl.create_default_context(cafile=str(site["dir"] / "local-ca.pem"))
    port = site["ports"]["inspect"]
    c, out = cert_and_reply(port, ctx, "backend.test")
    assert out.endswith(b"tls-backend")
    orig = x509.load_pem_x509_certificate(site["bleaf"].cert_chain_pems[0].bytes())
    assert c.subject == orig.subject
    assert c.issuer == x509.load_pem_x509_certificate(site["lca"].cert_pem.bytes()).subject
    san = lambda x: x.extensions.get_extension_for_class(  # noqa: E731
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert san(c) == san(orig) == ["backend.test", "alt.backend.test"]
    # Cached: the same forged certificate the second time.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="alt.backend.test") as t:
            assert t.getpeercert(True) == c.public_bytes(serialization.Encoding.DER)


def test_client_ca_good_and_expired_client_certificates(site):
    port = site["ports"]["cca"]
    ctx = noverify()
    site["good_client"].configure_cert(ctx)
    out, _ = get(port, ctx)
    assert out.endswith(b"plain-backend")
    ctx = noverify()
    site["expired_client"].configure_cert(ctx)
    try:
        out, _ = get(port, ctx)
    except (ssl.SSLError, OSError):
        out = b""
    assert b"plain-backend" not in out
    wait_for(lambda: "relay cca," in site["output"]() and "tls handshake failed - "
             in site["output"]().split("relay cca,", 1)[1], what="client cert failure line")
    ctx = noverify()           # no certificate at all
    try:
        out, _ = get(port, ctx)
    except (ssl.SSLError, OSError):
        out = b""
    assert b"plain-backend" not in out


def test_check_tls_and_https_on_tls_backend(site):
    def ups():
        out = site["output"]()
        return ("check tcp use tls (" in out and "tls connect ok), state unknown -> up" in out
                and "check http code use tls (" in out and "http code ok), state unknown -> up"
                in out)
    wait_for(ups, 15, "tls checks up")
    assert tcp_get(site["ports"]["chk"]).endswith(b"tls-backend")


SSLYZE = REPO / ".venv" / "bin" / "sslyze"


@pytest.mark.skipif(not SSLYZE.exists(), reason="sslyze not installed")
def test_sslyze_mozilla_intermediate(site):
    import subprocess
    r = subprocess.run([str(SSLYZE), "--mozilla_config=intermediate", "--certinfo",
                        "--certinfo_ca_file", str(site["dir"] / "mozca.pem"),
                        f"moz.test:{site['ports']['moz']}{{127.0.0.1}}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "OK - Compliant" in r.stdout, r.stdout[-3000:]


def test_renewed_certificate_after_sighup(site):
    d, port = site["dir"], site["ports"]["dflt"]
    before = peer_cert(port, site["ctx"])
    write_pair(d, f"127.0.0.1:{port}", site["ca"].issue_cert("127.0.0.1", "renewed.test"))
    site["proc"].send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in site["output"](), what="reload")

    def renewed():
        c = peer_cert(port, site["ctx"])
        return c.serial_number != before.serial_number and c
    c = wait_for(renewed, what="renewed certificate")
    assert "renewed.test" in c.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_missing_keypair_fails_config_load(tmp_path):
    conf = tmp_path / "relayd.conf"
    conf.write_text(f'relay "nokey" {{\n  listen on 127.0.0.1 port {free_port()} tls\n'
                    f'  forward to 127.0.0.1 port 9\n}}\n')
    old = os.environ.get("RELAYD_SSL_DIR")
    os.environ["RELAYD_SSL_DIR"] = str(tmp_path)
    try:
        r = run_cmd("relayd", "-n", "-f", str(conf))
    finally:
        if old is None:
            del os.environ["RELAYD_SSL_DIR"]
        else:
            os.environ["RELAYD_SSL_DIR"] = old
    assert r.returncode == 1
    assert f"{conf}:1: cannot load certificates for relay nokey" in r.stderr
