"""relayd's ca process (issue 16): the relays' private keys -- `tls
keypair` keys (RSA and ECDSA) and the TLS inspection CA key -- live in ca
only.  Relays do full handshakes (TLS 1.2 and 1.3) and sign forged
certificates by asking ca; a reload sends new keys to ca only; a killed
ca is restarted and the running relays get a new socket to it.

Key material is looked for in /proc/PID/mem (readable regions) as three
needles per key: a slice of the PEM's base64 text, and the first 16
bytes of the private value (EC) or private exponent (RSA) in big- and
little-endian order (OpenSSL's BIGNUM limbs are little-endian).  It must
be found in ca (which shows the search works) and in no relay.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Daemon, free_port, wait_for
from tests.regress.test_httpd_tls import _memory_has
from tests.regress.test_relayd_privsep import procs
from tests.regress.test_relayd_tls import Backend, cert_and_reply, peer_cert, write_pair

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc")

CONF = """
prefork 2
http protocol "web" {{
    tls {{ keypair "ec.test"
          keypair "rsa.test" }}
}}
tcp protocol "mitm" {{
    tls {{ ca cert "local-ca.pem"
          ca key "local-ca.key" password "secret" }}
}}
relay "term" {{
    listen on 127.0.0.1 port {term} tls
    protocol "web"
    forward to 127.0.0.1 port {plain}
}}
relay "inspect" {{
    listen on 127.0.0.1 port {inspect} tls
    protocol "mitm"
    forward with tls to 127.0.0.1 port {tlsb}
}}
"""


def needles(key_pem: bytes) -> list[bytes]:
    body = b"".join(key_pem.split(b"\n")[1:-2])
    key = serialization.load_pem_private_key(key_pem, None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        n = key.private_numbers().private_value
    else:
        n = key.private_numbers().d
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return [body[8:40], raw[:16], raw[::-1][:16]]


def holders(pids: list[int], key_pem: bytes) -> list[int]:
    """The processes of `pids` where a needle of the key is found."""
    ns = needles(key_pem)
    return [p for p in pids if any(_memory_has(p, n) for n in ns)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    (d / "private").mkdir()
    ca = trustme.CA()
    leaves = {"ec.test": ca.issue_cert("ec.test", key_type=trustme.KeyType.ECDSA),
              "rsa.test": ca.issue_cert("rsa.test", key_type=trustme.KeyType.RSA),
              "127.0.0.1": ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)}
    for name, leaf in leaves.items():
        write_pair(d, name, leaf)
    lca = trustme.CA(key_type=trustme.KeyType.RSA, organization_name="Local Inspect CA")
    lca.cert_pem.write_to_path(str(d / "local-ca.pem"))
    key = serialization.load_pem_private_key(lca.private_key_pem.bytes(), None)
    (d / "local-ca.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    bca = trustme.CA()
    bctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bca.issue_cert("backend.test").configure_cert(bctx)
    plain, tlsb = Backend(b"plain-backend"), Backend(b"tls-backend", bctx)
    ports = {"term": free_port(), "inspect": free_port()}
    conf = d / "relayd.conf"
    conf.write_text(CONF.format(plain=plain.port, tlsb=tlsb.port, **ports))
    daemon = Daemon("relayd", conf, env={**os.environ, "RELAYD_SSL_DIR": str(d)}, cwd=d)
    try:
        wait_for(lambda: "startup" in daemon.output() or daemon.proc.poll() is not None, 30,
                 "startup")
        assert daemon.proc.poll() is None, daemon.output()
        yield dict(dir=d, ca=ca, lca=lca, leaves=leaves, ports=ports, proc=daemon.proc,
                   output=daemon.output)
    finally:
        daemon.stop()
        plain.close()
        tlsb.close()


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


def sans(c: x509.Certificate) -> list[str]:
    return c.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def children(site) -> dict[str, list[int]]:
    class D:
        pid = site["proc"].pid
    return wait_for(lambda: (lambda p: p if len(p.get("relay", [])) == 2 and p.get("ca")
                             else None)(procs(D)), 30, "relays and ca")


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("name", ["ec.test", "rsa.test"])
def test_full_handshakes_signed_by_ca(site, name, version):
    ctx = _trusting(site["ca"])
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    for _ in range(3):            # both relay processes, most likely
        c, out = cert_and_reply(site["ports"]["term"], ctx, name)
        assert out.endswith(b"plain-backend") and sans(c) == [name]


def test_inspection_ca_signs_forged_certificates(site):
    ctx = _trusting(site["lca"])
    for _ in range(2):
        c, out = cert_and_reply(site["ports"]["inspect"], ctx, "backend.test")
        assert out.endswith(b"tls-backend")
        assert c.issuer == x509.load_pem_x509_certificate(site["lca"].cert_pem.bytes()).subject


def test_relays_hold_no_private_key(site):
    # Every key has been used (the tests above, or here again).
    cert_and_reply(site["ports"]["inspect"], _trusting(site["lca"]), "backend.test")
    p = children(site)
    keys = {n: leaf.private_key_pem.bytes() for n, leaf in site["leaves"].items()}
    keys["inspection CA"] = site["lca"].private_key_pem.bytes()
    for name, pem in keys.items():
        assert holders(p["relay"], pem) == [], name
        assert holders(p["ca"], pem) == p["ca"], name
    for title in ("hce", "pfe"):
        assert all(holders(p[title], pem) == [] for pem in keys.values()), title


def test_reload_sends_new_keys_to_ca_only(site):
    d, out = site["dir"], site["output"]
    old = children(site)
    renewed = site["ca"].issue_cert("rsa.test", "renewed.test", key_type=trustme.KeyType.RSA)
    write_pair(d, "rsa.test", renewed)
    n = out().count("configuration reloaded")
    site["proc"].send_signal(signal.SIGHUP)
    wait_for(lambda: out().count("configuration reloaded") > n, 30, "reload")

    def served():
        c = peer_cert(site["ports"]["term"], _trusting(site["ca"]), "rsa.test")
        return "renewed.test" in sans(c)
    wait_for(served, 30, "renewed certificate")
    p = wait_for(lambda: (lambda q: q if len(q.get("relay", [])) == 2
                          and not set(q["relay"]) & set(old["relay"]) else None)(
        children(site)), 30, "new relays only")
    pem = renewed.private_key_pem.bytes()
    assert holders(p["relay"], pem) == []
    assert holders(p["ca"], pem) == p["ca"]
    assert p["ca"] == old["ca"]           # the same ca, given the new keys


def test_killed_ca_is_restarted_and_relays_follow(site):
    p = children(site)
    victim = p["ca"][0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"lost child: pid {victim}" in site["output"](), 15, "lost child")
    wait_for(lambda: (lambda q: q.get("ca") and victim not in q["ca"])(children(site)),
             30, "a new ca")

    def works():
        try:
            c, out = cert_and_reply(site["ports"]["term"], _trusting(site["ca"]), "ec.test")
            return out.endswith(b"plain-backend")
        except (ssl.SSLError, OSError):
            return False
    for _ in range(4):            # each relay process, most likely
        wait_for(works, 30, "handshakes through the new ca")
    assert site["proc"].poll() is None
