"""httpd over TLS (features.md §1.10; H48 H66-H72 A05).

One httpd (prefork 2, chrooted to a temp dir) serves, on TLS sockets:
  main     a.test (+ alias www.a.test, hsts, OCSP staple) and b.test: SNI
  auth     client certificates required, checked against a CA and a CRL,
           with a FastCGI location (the stub echoes HTTPS, TLS_PEER_VERIFY)
  opt      client certificates optional
  tix      session tickets on (`ticket lifetime default`)
  strict   TLS 1.2 only, one cipher
and `plain`, a non-TLS socket with hsts.  Certificates come from trustme,
the OCSP response and the CRL from cryptography; clients are Python's ssl,
curl --resolve, openssl s_client and sslyze.  Separate daemons check
certificate rotation on SIGHUP and configuration errors.
"""

from __future__ import annotations

import datetime
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from tests.conftest import free_port, procs_by_title, run_cmd
from tests.regress.fcgi import servers
from tests.regress.httpd_helpers import module_site, site_factory, wait_for  # noqa: F401

NOW = datetime.datetime.now(datetime.timezone.utc)
# Clients below offer TLS 1.0/1.1 on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
DAY = datetime.timedelta(days=1)
OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
need_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
need_curl = pytest.mark.skipif(CURL is None, reason="curl not installed")

CONF = """
prefork 2
server "a.test" {
    alias "www.a.test"
    listen on 127.0.0.1 tls port {port}
    root "/htdocs"
    hsts {
        max-age 300
        subdomains
        preload
    }
    tls {
        certificate "{dir}/a.crt"
        key "{dir}/a.key"
        ocsp "{dir}/a.ocsp"
    }
}
server "b.test" {
    listen on 127.0.0.1 tls port {port}
    root "/htdocs-b"
    tls {
        certificate "{dir}/b.crt"
        key "{dir}/b.key"
    }
}
server "plain" {
    listen on 127.0.0.1 port {plain}
    root "/htdocs"
    hsts
}
server "auth.test" {
    listen on 127.0.0.1 tls port {auth}
    root "/htdocs"
    tls {
        certificate "{dir}/a.crt"
        key "{dir}/a.key"
        client ca "{dir}/clientca.pem" crl "{dir}/crl.pem"
    }
    location "/fcgi/*" {
        fastcgi socket tcp 127.0.0.1 {fcgi}
    }
}
server "opt.test" {
    listen on 127.0.0.1 tls port {opt}
    root "/htdocs"
    tls {
        certificate "{dir}/a.crt"
        key "{dir}/a.key"
        client ca "{dir}/clientca.pem" optional
    }
}
server "tix.test" {
    listen on 127.0.0.1 tls port {tix}
    root "/htdocs"
    tls {
        certificate "{dir}/a.crt"
        key "{dir}/a.key"
        ticket lifetime default
    }
}
server "moz.test" {
    listen on 127.0.0.1 tls port {moz}
    root "/htdocs"
    tls {
        certificate "{dir}/moz.crt"
        key "{dir}/moz.key"
    }
}
server "strict.test" {
    listen on 127.0.0.1 tls port {strict}
    root "/htdocs"
    tls {
        certificate "{dir}/a.crt"
        key "{dir}/a.key"
        protocols "tlsv1.2"
        ciphers "ECDHE-ECDSA-AES256-GCM-SHA384"
    }
}
"""


def pem_cert(leaf) -> x509.Certificate:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def make_pki(d: Path) -> dict:
    """Server CA + leaves (≤ 366 days: sslyze's Mozilla check), an OCSP
    response for a.test, a client CA with good/expired/revoked leaves and
    its CRL; everything written into `d`."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    leaves = {}
    for name in ("a", "b", "a2"):
        host = "a.test" if name == "a2" else f"{name}.test"
        leaf = ca.issue_cert(host, f"www.{host}", not_before=NOW - DAY, not_after=NOW + 90 * DAY)
        leaf.cert_chain_pems[0].write_to_path(d / f"{name}.crt")
        leaf.private_key_pem.write_to_path(d / f"{name}.key")
        leaves[name] = leaf
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    resp = (ocsp.OCSPResponseBuilder()
            .add_response(cert=pem_cert(leaves["a"]), issuer=ca_cert, algorithm=hashes.SHA1(),
                          cert_status=ocsp.OCSPCertStatus.GOOD, this_update=NOW - DAY,
                          next_update=NOW + DAY, revocation_time=None, revocation_reason=None)
            .responder_id(ocsp.OCSPResponderEncoding.HASH, ca_cert)
            .sign(ca_key, hashes.SHA256()))
    (d / "a.ocsp").write_bytes(resp.public_bytes(serialization.Encoding.DER))

    cca = trustme.CA()
    cca.cert_pem.write_to_path(d / "clientca.pem")
    clients = {"good": cca.issue_cert("client@test"),
               "expired": cca.issue_cert("old@test", not_before=NOW - 10 * DAY,
                                         not_after=NOW - DAY),
               "revoked": cca.issue_cert("revoked@test"),
               "stranger": trustme.CA().issue_cert("stranger@test")}
    for name, c in clients.items():
        c.private_key_and_cert_chain_pem.write_to_path(d / f"client-{name}.pem")
    cca_cert = x509.load_pem_x509_certificate(cca.cert_pem.bytes())
    cca_key = serialization.load_pem_private_key(cca.private_key_pem.bytes(), None)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(cca_cert.subject)
           .last_update(NOW - DAY).next_update(NOW + DAY)
           .add_revoked_certificate(
               x509.RevokedCertificateBuilder()
               .serial_number(pem_cert(clients["revoked"]).serial_number)
               .revocation_date(NOW - DAY).build())
           .sign(cca_key, hashes.SHA256()))
    (d / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    make_webpki(d)
    return {"ca": ca, "leaves": leaves, "dir": d}


def make_webpki(d: Path) -> None:
    """moz.crt/moz.key issued by mozca.pem as web PKI verifiers want them
    (trustme marks subjectAltName critical next to a subject: sslyze's
    path validation refuses that)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "Tandem test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME,
                                                        "moz.test")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 90 * DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("moz.test")]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), False)
            .sign(ca_key, hashes.SHA256()))
    (d / "mozca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "moz.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "moz.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    ports = {k: free_port() for k in ("plain", "auth", "opt", "tix", "strict", "moz", "fcgi")}
    work = tmp_path_factory.mktemp("fcgi")
    stub = servers.start_stub(("127.0.0.1", ports["fcgi"]), work, work / "marks")
    pki = {}

    def setup(s):
        (s.dir / "htdocs" / "index.html").write_text("site a\n")
        (s.dir / "htdocs-b").mkdir()
        (s.dir / "htdocs-b" / "index.html").write_text("site b\n")
        pki.update(make_pki(s.dir))

    try:
        for s in module_site(tmp_path_factory, CONF, setup=setup,
                             extra_ports=[ports[k] for k in ("plain", "auth", "opt", "tix",
                                                             "strict", "moz")], **ports):
            s.pki = pki
            s.p = ports
            yield s
    finally:
        stub.stop()


# -- clients ----------------------------------------------------------------------

def client_ctx(site, verify: bool = True, cert: str | None = None, **kw) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(str(site.dir / "ca.pem"))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(site.dir / f"client-{cert}.pem"))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


class Info:
    """What a closed client connection had negotiated."""

    def __init__(self, s: ssl.SSLSocket) -> None:
        self.version = s.version()
        self.session = s.session
        self.session_reused = s.session_reused


def https(port: int, ctx: ssl.SSLContext, name: str | None = "a.test", path: str = "/",
          session=None, host: str | None = None) -> tuple[bytes, Info]:
    """GET over one TLS connection; returns (raw response, what it negotiated)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=name, session=session) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host or name or 'a.test'}\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data, Info(s)


def names_of(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.DNSName)


def peer_names(port: int, name: str | None) -> list[str]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(raw, server_hostname=name) as s:
        return names_of(s.getpeercert(True))


def s_client(port: int, *args: str, stdin: bytes = b"") -> str:
    cmd = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args]
    r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=20)
    return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")


def header(resp: bytes, name: str) -> str | None:
    head = resp.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.lower() == name.lower():
            return v.strip()
    return None


# -- H66: handshake, GET ---------------------------------------------------------------

def test_get_over_tls(site):
    resp, s = https(site.port, client_ctx(site))
    assert resp.startswith(b"HTTP/1.1 200 ") and resp.endswith(b"site a\n")
    assert s.version == "TLSv1.3"


@need_curl
def test_curl_resolve(site):
    r = subprocess.run([CURL, "-sS", "--cacert", str(site.dir / "ca.pem"), "--resolve",
                        f"b.test:{site.port}:127.0.0.1", f"https://b.test:{site.port}/"],
                       capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"site b\n"


@need_openssl
def test_s_client_get(site):
    out = s_client(site.port, "-servername", "a.test", "-quiet",
                   stdin=b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n")
    assert "HTTP/1.0 200 OK" in out and "site a" in out


def test_keepalive_and_large_file(site):
    blob = bytes(range(256)) * 8192            # 2 MiB
    (site.htdocs / "big.bin").write_bytes(blob)
    raw = socket.create_connection(("127.0.0.1", site.port), timeout=10)
    with client_ctx(site).wrap_socket(raw, server_hostname="a.test") as s:
        f = s.makefile("rb")
        for path, want in (("/big.bin", blob), ("/index.html", b"site a\n"), ("/big.bin", blob)):
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = None
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert f.read(length) == want


# -- H67: SNI --------------------------------------------------------------------------

def test_sni_selects_certificate(site):
    assert "b.test" in peer_names(site.port, "b.test")
    assert "a.test" in peer_names(site.port, "www.a.test")       # alias of a.test
    assert "a.test" in peer_names(site.port, "unknown.test")     # the first server's
    assert "a.test" in peer_names(site.port, None)
    # Host still picks the virtual server.
    resp, _ = https(site.port, client_ctx(site), name="b.test")
    assert resp.endswith(b"site b\n")


@need_openssl
def test_s_client_servername(site):
    out = s_client(site.port, "-servername", "b.test", "-showcerts")
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
    cert = x509.load_pem_x509_certificate(pem.group(0).encode())
    assert cert.serial_number == pem_cert(site.pki["leaves"]["b"]).serial_number


# -- H48: HSTS -------------------------------------------------------------------------

def test_hsts_on_tls_only(site):
    resp, _ = https(site.port, client_ctx(site))
    assert header(resp, "Strict-Transport-Security") == "max-age=300; includeSubDomains; preload"
    resp, _ = https(site.port, client_ctx(site), name="b.test")
    assert header(resp, "Strict-Transport-Security") is None     # b.test has no hsts
    with socket.create_connection(("127.0.0.1", site.p["plain"]), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\nHost: plain\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.0 200") and b"Strict-Transport-Security" not in data


# -- H68: protocols and ciphers --------------------------------------------------------

def test_old_protocols_refused(site):
    ctx = client_ctx(site, verify=False)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        https(site.port, ctx)
    site.daemon.wait_output("tls handshake failed - unsupported protocol")


@need_openssl
def test_s_client_tls11_refused(site):
    out = s_client(site.port, "-tls1_1", "-cipher", "ALL:@SECLEVEL=0")
    assert "Cipher is (NONE)" in out or "alert" in out
    out = s_client(site.port, "-tls1_2")
    assert "Protocol  : TLSv1.2" in out or "TLSv1.2" in out


@need_openssl
def test_restricted_cipher(site):
    port = site.p["strict"]
    out = s_client(port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert "Cipher is (NONE)" in out
    out = s_client(port, "-tls1_2")
    assert "ECDHE-ECDSA-AES256-GCM-SHA384" in out
    out = s_client(port, "-tls1_3")
    assert "Cipher is (NONE)" in out


@need_openssl
def test_default_curves(site):
    assert "Cipher is (NONE)" in s_client(site.port, "-groups", "X448")
    out = s_client(site.port, "-groups", "P-384")
    assert "Cipher is (NONE)" not in out and "secp384r1" in out


def test_cbc_ciphers_refused_by_default(site):
    ctx = client_ctx(site, verify=False)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    with pytest.raises(ssl.SSLError):
        https(site.port, ctx)


# -- H70: OCSP stapling ----------------------------------------------------------------

@need_openssl
def test_ocsp_staple(site):
    out = s_client(site.port, "-servername", "a.test", "-status")
    assert "OCSP Response Status: successful" in out
    assert "Cert Status: good" in out
    out = s_client(site.port, "-servername", "b.test", "-status")
    assert "OCSP response: no response sent" in out


# -- H71: client certificates ----------------------------------------------------------

def test_client_cert_required(site):
    port = site.p["auth"]
    resp, _ = https(port, client_ctx(site, cert="good"), host="auth.test")
    assert resp.startswith(b"HTTP/1.1 200")
    for cert, why in ((None, "peer did not return a certificate"),
                      ("expired", "certificate has expired"),
                      ("revoked", "certificate revoked"),
                      ("stranger", "unable to get local issuer certificate")):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            https(port, client_ctx(site, cert=cert), host="auth.test")
        site.daemon.wait_output(f"tls handshake failed - {why}")


@need_openssl
def test_s_client_cert(site):
    port = site.p["auth"]
    pem = str(site.dir / "client-good.pem")
    out = s_client(port, "-cert", pem, "-key", pem, "-quiet",
                   stdin=b"GET / HTTP/1.0\r\nHost: auth.test\r\n\r\n")
    assert "HTTP/1.0 200 OK" in out
    out = s_client(port, "-quiet", stdin=b"GET / HTTP/1.0\r\nHost: auth.test\r\n\r\n")
    assert "HTTP/1.0 200" not in out


def test_client_cert_optional(site):
    port = site.p["opt"]
    resp, _ = https(port, client_ctx(site), host="opt.test")
    assert resp.startswith(b"HTTP/1.1 200")
    resp, _ = https(port, client_ctx(site, cert="good"), host="opt.test")
    assert resp.startswith(b"HTTP/1.1 200")


def test_fastcgi_https_and_peer_verify(site):
    resp, _ = https(site.p["auth"], client_ctx(site, cert="good"), host="auth.test",
                    path="/fcgi/env")
    body = resp.split(b"\r\n\r\n", 1)[1].decode()
    env = dict(line.split("=", 1) for line in body.splitlines() if "=" in line)
    assert env["HTTPS"] == "on"
    assert env["TLS_PEER_VERIFY"] == "ca, crl"


# -- H72: session tickets --------------------------------------------------------------

def test_tickets_resume_across_workers(site):
    ctx = client_ctx(site)
    _, first = https(site.p["tix"], ctx, host="tix.test")
    assert first.session is not None
    # prefork 2: the resumptions land on both workers; all must work.
    reused = [https(site.p["tix"], ctx, host="tix.test", session=first.session)[1].session_reused
              for _ in range(6)]
    assert all(reused)


def test_no_tickets_by_default(site):
    ctx = client_ctx(site)
    _, first = https(site.port, ctx)
    _, again = https(site.port, ctx, session=first.session)
    assert not again.session_reused


@need_openssl
def test_s_client_sess_out_in(site, tmp_path):
    sess = str(tmp_path / "sess.pem")
    for port, reuse in ((site.p["tix"], True), (site.port, False)):
        s_client(port, "-tls1_2", "-sess_out", sess)
        out = s_client(port, "-tls1_2", "-sess_in", sess)
        assert ("Reused, TLSv1.2" in out) is reuse, out[:2000]


# -- bad input -------------------------------------------------------------------------

def test_plain_http_on_tls_port(site):
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        try:
            data = c.recv(100)
        except ConnectionResetError:
            data = b""
    assert not data.startswith(b"HTTP")
    site.daemon.wait_output("tls handshake failed - http request")
    # The workers are fine.
    assert https(site.port, client_ctx(site))[0].startswith(b"HTTP/1.1 200")


# -- A05: keys stay out of the workers' files and memory ---------------------------------

def _workers(parent: int) -> list[int]:
    return procs_by_title(parent, "httpd").get("server", [])


def _memory_has(pid: int, needle: bytes) -> bool:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms or "[vvar]" in line or "[vsyscall]" in line:
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(lo)
                if needle in mem.read(hi - lo):
                    return True
            except (OSError, ValueError, OverflowError):
                continue
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_worker_memory_lacks_key_text(site):
    https(site.port, client_ctx(site))          # TLS works
    pem = (site.dir / "a.key").read_bytes()
    body = b"".join(pem.split(b"\n")[1:-2])      # base64 text of the key
    workers = _workers(site.daemon.pid)
    assert workers
    for pid in workers:
        assert not _memory_has(pid, body[8:40])
        root = Path(f"/proc/{pid}/root").resolve()
        if root != Path("/"):
            assert root == site.dir.resolve()   # chrooted away from the key files


# -- Mozilla intermediate (sslyze) -----------------------------------------------------

def test_sslyze_mozilla_intermediate(site):
    sslyze = Path(sys.executable).parent / "sslyze"
    if not sslyze.exists():
        pytest.fail("sslyze not installed")
    r = subprocess.run([str(sslyze), "--mozilla_config=intermediate", "--certinfo",
                        "--certinfo_ca_file", str(site.dir / "mozca.pem"),
                        f"moz.test:{site.p['moz']}{{127.0.0.1}}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK - Compliant" in r.stdout, r.stdout[-3000:]


# -- rotation and configuration errors ----------------------------------------------------

ROTATE = """
prefork 2
server "a.test" {
    listen on 127.0.0.1 tls port {port}
    root "/htdocs"
    tls {
        certificate "{dir}/a.crt"
        key "{dir}/a.key"
    }
}
"""


def test_renewed_certificate_after_sighup(site_factory):
    pki = {}

    def setup(s):
        (s.dir / "htdocs" / "index.html").write_text("rotated\n")
        pki.update(make_pki(s.dir))

    s = site_factory(ROTATE, setup=setup)
    old = pem_cert(pki["leaves"]["a"]).serial_number
    new = pem_cert(pki["leaves"]["a2"]).serial_number

    def serial():
        raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname="a.test") as c:
            return x509.load_der_x509_certificate(c.getpeercert(True)).serial_number

    assert serial() == old
    shutil.copy(s.dir / "a2.crt", s.dir / "a.crt")
    shutil.copy(s.dir / "a2.key", s.dir / "a.key")
    s.daemon.signal(signal.SIGHUP)
    s.daemon.wait_output("parent_reload: configuration reloaded")
    wait_for(lambda: serial() == new, 15, "the renewed certificate")
    resp, _ = https(s.port, client_ctx(s))
    assert resp.endswith(b"rotated\n")


def test_ticket_keys_rotate(site_factory):
    # `ticket lifetime 60`: a new key every 15 s; tickets of the old key
    # still resume (on either worker), new ones are issued.
    conf = ROTATE.replace('key "{dir}/a.key"', 'key "{dir}/a.key"\n        ticket lifetime 60')
    s = site_factory(conf, setup=lambda st: make_pki(st.dir), args=["-vv"])
    ctx = client_ctx(s)
    _, first = https(s.port, ctx)
    assert https(s.port, ctx, session=first.session)[1].session_reused
    s.daemon.wait_output("server_tls_ticket_rekey: new session ticket key", timeout=25)
    for _ in range(4):
        assert https(s.port, ctx, session=first.session)[1].session_reused


def test_config_errors(tmp_path):
    pki = make_pki(tmp_path)
    conf = tmp_path / "httpd.conf"

    def check(cert: str, key: str, extra: str = "") -> subprocess.CompletedProcess:
        conf.write_text(f'chroot "{tmp_path}"\nserver "s" {{\n'
                        f"listen on 127.0.0.1 tls port {free_port()}\n"
                        f'tls {{\ncertificate "{cert}"\nkey "{key}"\n{extra}}}\n}}\n')
        return run_cmd("httpd", "-n", "-f", str(conf))

    d = pki["dir"]
    r = check(f"{d}/a.crt", f"{d}/a.key")
    assert r.returncode == 0 and "configuration OK" in r.stderr
    for cert, key, extra, msg in (
            (f"{d}/missing.crt", f"{d}/a.key", "", "failed to load public/private keys"),
            (f"{d}/a.crt", f"{d}/b.key", "", "failed to load public/private keys"),
            (f"{d}/a.crt", f"{d}/a.key", f'ocsp "{d}/none.der"\n', "failed to load ocsp staple"),
            (f"{d}/a.crt", f"{d}/a.key", f'client ca "{d}/none.pem"\n',
             "failed to load ca cert(s)"),
            (f"{d}/a.crt", f"{d}/a.key", 'ecdhe "P-999"\n', "failed to set tls ecdhe curves")):
        r = check(cert, key, extra)
        assert r.returncode == 1 and f'{conf}:2: server "s": {msg}' in r.stderr, r.stderr
    # An empty OCSP file: no stapling, no error.
    (d / "empty.der").write_bytes(b"")
    assert check(f"{d}/a.crt", f"{d}/a.key", f'ocsp "{d}/empty.der"\n').returncode == 0


def test_reload_with_bad_certificate_keeps_serving(site_factory):
    pki = {}
    s = site_factory(ROTATE, setup=lambda st: pki.update(make_pki(st.dir)))
    (s.dir / "a.key").write_text("garbage\n")
    s.daemon.signal(signal.SIGHUP)
    s.daemon.wait_output("configuration failed, keeping the current one")
    assert https(s.port, client_ctx(s))[0].startswith(b"HTTP/1.")    # old keypair serves

