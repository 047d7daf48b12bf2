"""acme-client against a real ACME server (pebble) on loopback.

Issuance goes through a real Tandem httpd whose
`/.well-known/acme-challenge/*` location serves the challenge directory on
pebble's httpPort.  Checked from the outside only: exit status, the files
(chain verifies against pebble's root, names, modes, byte-identical after
a failure), pebble's management API (revocation), httpd's access log.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import PYTHON, REPO, free_port
from tests.regress.acme_helpers import (Domain, RateLimitProxy, acme_client, needs_pebble,
                                        net_facts, start_challenge_httpd, start_pebble)

pytestmark = [needs_pebble]


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    """One pebble (5-year certificates) and the httpd serving its challenges."""
    base = tmp_path_factory.mktemp("acme")
    pebble = start_pebble(base / "pebble")
    site = start_challenge_httpd(base / "site", pebble.http_port)
    try:
        yield pebble, site
    finally:
        site.daemon.stop()
        pebble.stop()


def new_domain(ca, tmp_path, handle: str, **kw) -> Domain:
    pebble, site = ca
    dom = Domain(tmp_path, handle, kw.pop("api", pebble.url), site.dir / "acme", **kw)
    dom.write_conf()
    return dom


def verify_chain(dom: Domain, root: x509.Certificate) -> None:
    leaf = dom.leaf()
    chain = x509.load_pem_x509_certificates(dom.chain.read_bytes())
    full = x509.load_pem_x509_certificates(dom.fullchain.read_bytes())
    assert full == [leaf, *chain]
    issuer = leaf
    for cert in chain:
        issuer.verify_directly_issued_by(cert)
        issuer = cert
    issuer.verify_directly_issued_by(root)


def san(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return ext.value.get_values_for_type(x509.DNSName)


def test_issue_renew_force_revoke(ca, tmp_path):
    pebble, site = ca
    dom = new_domain(ca, tmp_path, "example.test", alt=("www.example.test",))
    r = acme_client(dom, ca=pebble.ca)
    assert r.returncode == 0, r.stderr
    verify_chain(dom, pebble.root())
    assert sorted(san(dom.leaf())) == ["example.test", "www.example.test"]
    for key in (dom.key, dom.account_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert os.listdir(dom.challengedir) == []             # token files removed
    # pebble fetched each token through httpd's challenge location
    tokens = [line for line in r.stderr.splitlines() if line.endswith(": created")
              and str(dom.challengedir) in line]
    assert len(tokens) == 2
    for line in tokens:
        token = line.split(": ")[1].rsplit("/", 1)[1]
        site.wait_log(rf'"GET /\.well-known/acme-challenge/{token} HTTP/1\.1" 200 ')
    first = dom.leaf().serial_number

    r = acme_client(dom, ca=pebble.ca)
    assert r.returncode == 2, r.stderr                     # nothing to do
    assert "certificate valid: " in r.stderr
    assert dom.leaf().serial_number == first

    r = acme_client(dom, "-F", ca=pebble.ca)
    assert r.returncode == 0, r.stderr
    assert "forcing renewal" in r.stderr
    second = dom.leaf().serial_number
    assert second != first
    verify_chain(dom, pebble.root())

    r = acme_client(dom, "-r", ca=pebble.ca)
    assert r.returncode == 0, r.stderr
    assert pebble.cert_status(second)["Status"] == "Revoked"
    assert pebble.cert_status(first)["Status"] == "Valid"
    assert not dom.cert.exists() and not dom.fullchain.exists()

    r = acme_client(dom, "-r", ca=pebble.ca)                # nothing left to revoke
    assert r.returncode == 1
    assert "no certificate found" in r.stderr


@pytest.mark.parametrize("keytype", ["rsa", "ecdsa"])
def test_key_types(ca, tmp_path, keytype):
    pebble, _ = ca
    other = "ecdsa" if keytype == "rsa" else "rsa"
    dom = new_domain(ca, tmp_path, f"{keytype}.example.test", keytype=keytype,
                     account_keytype=other)
    r = acme_client(dom, ca=pebble.ca)
    assert r.returncode == 0, r.stderr
    kinds = {"rsa": rsa.RSAPublicKey, "ecdsa": ec.EllipticCurvePublicKey}
    assert isinstance(dom.leaf().public_key(), kinds[keytype])
    assert f"generated {'ECDSA' if keytype == 'ecdsa' else 'RSA'} domain key" in r.stderr
    assert f"generated {'ECDSA' if other == 'ecdsa' else 'RSA'} account key" in r.stderr
    assert dom.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    verify_chain(dom, pebble.root())


def test_renews_inside_window(ca, tmp_path):
    """A 90-day certificate with 10 days left is renewed (30-day rule)."""
    import datetime
    import trustme
    pebble, _ = ca
    dom = new_domain(ca, tmp_path, "window.example.test")
    now = datetime.datetime.now(datetime.timezone.utc)
    old = trustme.CA().issue_cert("window.example.test", not_before=now - datetime.timedelta(days=80),
                                  not_after=now + datetime.timedelta(days=10))
    old.cert_chain_pems[0].write_to_path(str(dom.cert))
    r = acme_client(dom, ca=pebble.ca)
    assert r.returncode == 0, r.stderr
    assert "certificate renewable: 9 days left" in r.stderr
    verify_chain(dom, pebble.root())


def test_domain_list_changed(ca, tmp_path):
    pebble, _ = ca
    dom = new_domain(ca, tmp_path, "names.example.test")
    assert acme_client(dom, ca=pebble.ca).returncode == 0
    dom.alt = ("more.names.example.test",)
    dom.write_conf()
    r = acme_client(dom, ca=pebble.ca)
    assert r.returncode == 0, r.stderr
    assert "domain list changed, forcing renewal" in r.stderr
    assert sorted(san(dom.leaf())) == ["more.names.example.test", "names.example.test"]


def test_challenge_not_served_leaves_files(ca, tmp_path):
    pebble, site = ca
    dom = new_domain(ca, tmp_path, "fail.example.test")
    assert acme_client(dom, ca=pebble.ca).returncode == 0
    before = dom.snapshot()
    # The tokens go where httpd does not look: validation fails.
    elsewhere = tmp_path / "not-served"
    elsewhere.mkdir()
    dom.challengedir = elsewhere
    # A new account: pebble may hand an account its valid authorization
    # again even with PEBBLE_AUTHZREUSE=0 (it reuses when rand.Intn(100) is
    # not above the percentage: 1 in 100), and then nothing is validated.
    first_account = dom.account_key
    dom.account_key = dom.dir / "account-2.key"
    dom.write_conf()
    r = acme_client(dom, "-F", ca=pebble.ca)
    assert r.returncode == 1, r.stderr
    assert "unauthorized" in r.stderr
    dom.account_key = first_account
    assert dom.snapshot() == before
    assert os.listdir(elsewhere) == []
    assert [p for p in os.listdir(dom.cert.parent) if p.startswith(".")] == []


def test_ca_down(tmp_path):
    port = free_port()
    dom = Domain(tmp_path, "down.example.test", f"https://127.0.0.1:{port}/dir",
                 tmp_path / "acme")
    dom.challengedir.mkdir()
    dom.write_conf()
    r = acme_client(dom, timeout=60)
    assert r.returncode == 1
    assert f"acme-client: https://127.0.0.1:{port}/dir: all attempts to connect" in r.stderr, r.stderr
    assert not dom.cert.exists()


def test_untrusted_ca(ca, tmp_path):
    """Without SSL_CERT_FILE pebble's certificate is not trusted."""
    dom = new_domain(ca, tmp_path, "trust.example.test")
    r = acme_client(dom)
    assert r.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in r.stderr or "certificate verify failed" in r.stderr
    assert not dom.cert.exists()


def test_nonces_rejected(tmp_path):
    pebble = start_pebble(tmp_path / "pebble", env={"PEBBLE_WFE_NONCEREJECT": "50"})
    try:
        site = start_challenge_httpd(tmp_path / "site", pebble.http_port)
        try:
            dom = Domain(tmp_path / "d", "nonce.example.test", pebble.url, site.dir / "acme",
                         alt=("a.nonce.example.test", "b.nonce.example.test"))
            dom.write_conf()
            r = acme_client(dom, ca=pebble.ca)
            assert r.returncode == 0, r.stderr
            assert "bad nonce, retrying" in r.stderr
            verify_chain(dom, pebble.root())
        finally:
            site.daemon.stop()
    finally:
        pebble.stop()


def test_rate_limited_retry_after(ca, tmp_path):
    pebble, _ = ca
    proxy = RateLimitProxy(pebble)
    try:
        dom = new_domain(ca, tmp_path, "limit.example.test", api=proxy.url)
        r = acme_client(dom, ca=pebble.ca)
        assert r.returncode == 0, r.stderr
        assert "429 rateLimited: too many new orders; retrying after 1 seconds" in r.stderr
        assert proxy.limited == 1
        assert sum(1 for h in proxy.hits if h.endswith("/order-plz")) == 2
        verify_chain(dom, pebble.root())
    finally:
        proxy.stop()


def test_short_lifetime_renewal(tmp_path):
    """12-second certificates: nothing to do at first, renewed once fewer
    than 4 seconds (a third of the lifetime) are left."""
    pebble = start_pebble(tmp_path / "pebble", validity=12)
    try:
        site = start_challenge_httpd(tmp_path / "site", pebble.http_port)
        try:
            dom = Domain(tmp_path / "d", "short.example.test", pebble.url, site.dir / "acme")
            dom.write_conf()
            assert acme_client(dom, ca=pebble.ca).returncode == 0
            leaf = dom.leaf()
            r = acme_client(dom, ca=pebble.ca)
            if time.time() < leaf.not_valid_after_utc.timestamp() - 4:
                assert r.returncode == 2, r.stderr
            # Wait (bounded) until the certificate is inside its window.
            time.sleep(max(0.0, leaf.not_valid_after_utc.timestamp() - 3 - time.time()))
            r = acme_client(dom, ca=pebble.ca)
            assert r.returncode == 0, r.stderr
            assert "certificate renewable" in r.stderr
            assert dom.leaf().serial_number != leaf.serial_number
        finally:
            site.daemon.stop()
    finally:
        pebble.stop()


def test_command_line(tmp_path):
    conf = tmp_path / "acme-client.conf"
    conf.write_text('authority a {\n\tapi url "https://127.0.0.1:1/dir"\n'
                    f'\taccount key "{tmp_path}/a.key"\n}}\n'
                    f'domain d.test {{\n\tdomain key "{tmp_path}/d.key" ecdsa\n'
                    f'\tdomain full chain certificate "{tmp_path}/full.pem"\n}}\n')

    def run(*args):
        return subprocess.run([PYTHON, "-m", "acme_client", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    r = run("-n", "-f", str(conf))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = run("-nv", "-f", str(conf))
    assert r.returncode == 0 and 'domain key "%s/d.key" ecdsa' % tmp_path in r.stdout
    assert 'account key "%s/a.key" rsa' % tmp_path in r.stdout
    assert run("-f", str(conf)).stderr == "usage: acme-client [-Fnrv] [-f configfile] handle\n"
    assert run("-x", "d.test").returncode == 1
    r = run("-f", str(conf), "nope.test")
    assert (r.returncode, r.stderr) == (1, "acme-client: domain nope.test not found\n")
    r = run("-f", str(conf), "d.test")        # challengedir /var/www/acme is missing here
    if not os.path.isdir("/var/www/acme"):
        assert r.returncode == 1 and "/var/www/acme: challenge directory must exist" in r.stderr
    conf.write_text("domain x {\n}\n")
    r = run("-n", "-f", str(conf))
    assert r.returncode == 1
    assert f"{conf}:2: no domain key file specified for domain x" in r.stderr


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, setuid)")
def test_net_process_sandboxed(tmp_path):
    """While it talks to the CA (here: one that never answers), the net
    process runs as nobody, chrooted to /var/empty; main stays root and
    alone holds the keys."""
    import pwd
    import socket

    import psutil
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)
    port = stalled.getsockname()[1]
    dom = Domain(tmp_path, "jail.example.test", f"https://127.0.0.1:{port}/dir",
                 tmp_path / "acme")
    dom.challengedir.mkdir()
    dom.write_conf()
    main = subprocess.Popen([PYTHON, "-m", "acme_client", "-f", str(dom.conf), dom.handle],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        conn, _ = stalled.accept()        # the net process connected: it is sandboxed by now
        children = psutil.Process(main.pid).children()
        assert len(children) == 1
        nobody = pwd.getpwnam("nobody").pw_uid
        assert net_facts(children[0], dom) == (nobody, nobody, "/var/empty", False)
        assert psutil.Process(main.pid).uids().effective == 0
        assert dom.key.exists() and dom.account_key.exists()
        conn.close()
    finally:
        stalled.close()
        try:
            main.wait(60)
        except subprocess.TimeoutExpired:
            main.kill()
            main.wait()
    assert main.returncode == 1
