"""Unit tests for engine.tls: contexts from bytes, the data path, SNI,
client certificates and CRLs, session tickets, OCSP, forging.

Both ends run in one trio loop over a socketpair; certificates come from
trustme (the CRL is built with cryptography)."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from engine import tls
from engine.tls import Keypair, TlsOptions

NOW = datetime.datetime.now(datetime.timezone.utc)
# Clients below offer TLS 1.0/1.1 on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")


@pytest.fixture(autouse=True)
def no_sigpipe():
    # OpenSSL writes with send() without MSG_NOSIGNAL: Python ignores
    # SIGPIPE, but relayctl's main() (run in-process by test_control)
    # restores the default, which would kill pytest on a write to a closed peer.
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGPIPE, old)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca):
    return {name: ca.issue_cert(name, f"www.{name}") for name in ("a.test", "b.test")}


def keypair(cert, ocsp=None, wipe=True) -> Keypair:
    key = cert.private_key_pem.bytes()
    return Keypair(cert.cert_chain_pems[0].bytes(), bytearray(key) if wipe else key, ocsp)


def client_ctx(ca=None, **kw) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if ca is not None:
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def exchange(server: tls.TlsServer, cctx: ssl.SSLContext, name: str | None = None,
             payload: bytes = b"ping", session=None):
    """One connection: client sends `payload`, server echoes it upper-cased.
    Returns (client info dict, server result: TlsTransport or exception)."""
    out: dict = {}

    async def main():
        a, b = trio.socket.socketpair()

        async def serve():
            try:
                t = await server.accept(b, peer=("127.0.0.1", 1), local=("127.0.0.1", 2))
            except Exception as e:      # noqa: BLE001  (the test inspects it)
                out["server"] = e
                return
            out["server"] = t
            data = await t.receive()
            await t.send_more(b"<")
            await t.send_all(data.upper())
            await t.aclose()

        async def client():
            try:
                t = await tls.connect(a, cctx, server_hostname=name, session=session)
                await t.send_all(payload)
                got = b""
                while True:
                    d = await t.receive()
                    if not d:
                        break
                    got += d
            except (ssl.SSLError, OSError) as e:
                out["client"] = e
                return
            out["client"] = {"data": got, "cert": t.peer_certificate(),
                             "version": t.version(), "cipher": t.cipher()[0],
                             "session": t.session, "reused": t.session_reused}
            await t.aclose()

        async with trio.open_nursery() as n:
            n.start_soon(serve)
            n.start_soon(client)

    trio.run(main)
    return out["client"], out["server"]


def cn_of(der: bytes) -> str:
    """The certificate's DNS names, as one string."""
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    return " ".join(tls.cert_names(pem))


def test_echo_tls13_key_kept_until_wiped(certs):
    kp = keypair(certs["a.test"])
    server = tls.TlsServer(tls.server_context(TlsOptions(), kp))
    # A second socket of the same server builds its own context from the
    # same bytes (issue 18): the context must not have wiped them.
    assert kp.key != bytes(len(kp.key))
    tls.server_context(TlsOptions(), kp)
    tls.wipe([kp.key, b"immutable"])
    assert kp.key == bytes(len(kp.key))
    c, s = exchange(server, client_ctx())
    assert c["data"] == b"<PING" and c["version"] == "TLSv1.3"
    assert s.version() == "TLSv1.3" and s.bytes_in == 4 and s.bytes_out == 5


def test_verifies_against_ca(ca, certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])))
    cctx = client_ctx(ca)
    cctx.check_hostname = True
    c, _ = exchange(server, cctx, name="a.test")
    assert c["data"] == b"<PING"


def test_big_transfer_and_sendfile(certs, tmp_path):
    server_ctx = tls.server_context(TlsOptions(), keypair(certs["a.test"]))
    blob = os.urandom(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(blob)

    async def main():
        a, b = trio.socket.socketpair()
        got = bytearray()

        async def serve():
            t = await tls.TlsServer(server_ctx).accept(b)
            with open(path, "rb") as f:
                await t.send_more(b"HEAD")
                await t.sendfile(f.fileno(), 0, len(blob))
            await t.aclose()

        async def client():
            t = await tls.connect(a, client_ctx())
            while d := await t.receive():
                got.extend(d)
            await t.aclose()

        async with trio.open_nursery() as n:
            n.start_soon(serve)
            n.start_soon(client)
        assert bytes(got) == b"HEAD" + blob

    trio.run(main)


def test_sni_selects_keypair(certs):
    a = tls.server_context(TlsOptions(), keypair(certs["a.test"]))
    b = tls.server_context(TlsOptions(), keypair(certs["b.test"]))
    server = tls.TlsServer(a, lambda name: b if name.endswith("b.test") else None)
    c, s = exchange(server, client_ctx(), name="www.b.test")
    assert "b.test" in cn_of(c["cert"]) and s.servername == "www.b.test"
    c, _ = exchange(server, client_ctx(), name="unknown.test")
    assert "a.test" in cn_of(c["cert"])          # unknown name: the default
    c, _ = exchange(server, client_ctx(), name=None)
    assert "a.test" in cn_of(c["cert"])


def test_old_protocols_refused_by_default(certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])))
    cctx = client_ctx(minimum_version=ssl.TLSVersion.TLSv1,
                      maximum_version=ssl.TLSVersion.TLSv1_1)
    cctx.set_ciphers("ALL:@SECLEVEL=0")
    c, s = exchange(server, cctx)
    assert isinstance(c, ssl.SSLError) and isinstance(s, ssl.SSLError)
    assert tls.describe_error(s) in ("unsupported protocol", "no protocols available",
                                     "wrong version number")


def test_tls12_only_and_restricted_cipher(certs):
    opts = TlsOptions(protocols=frozenset({"tlsv1.2"}), ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    server = tls.TlsServer(tls.server_context(opts, keypair(certs["a.test"])))
    c, _ = exchange(server, client_ctx())
    assert c["version"] == "TLSv1.2" and c["cipher"] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    cctx = client_ctx()
    cctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    c, s = exchange(server, cctx)
    assert isinstance(s, ssl.SSLError) and tls.describe_error(s) == "no shared cipher"


def test_default_ciphers_are_aead_only(certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])))
    cctx = client_ctx(maximum_version=ssl.TLSVersion.TLSv1_2)
    cctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    c, s = exchange(server, cctx)
    assert isinstance(s, ssl.SSLError)


def test_ecdhe_groups(certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])))
    c, s = exchange(server, tls.client_context(TlsOptions(ecdhe="P-521")))
    assert isinstance(s, ssl.SSLError)           # not in the default list
    c, _ = exchange(server, tls.client_context(TlsOptions(ecdhe="P-384")))
    assert c["data"] == b"<PING"
    only521 = tls.TlsServer(tls.server_context(TlsOptions(ecdhe="secp521r1"),
                                               keypair(certs["a.test"])))
    c, _ = exchange(only521, tls.client_context(TlsOptions(ecdhe="P-521,X25519")))
    assert c["data"] == b"<PING"


def test_config_errors(certs):
    a, b = certs["a.test"], certs["b.test"]
    mismatch = Keypair(a.cert_chain_pems[0].bytes(), b.private_key_pem.bytes())
    with pytest.raises(tls.TlsError, match="does not match"):
        tls.server_context(TlsOptions(), mismatch)
    with pytest.raises(tls.TlsError, match="certificate"):
        tls.server_context(TlsOptions(), Keypair(b"junk", a.private_key_pem.bytes()))
    with pytest.raises(tls.TlsError, match="private key"):
        tls.server_context(TlsOptions(), Keypair(a.cert_chain_pems[0].bytes(), b"junk"))
    with pytest.raises(tls.TlsError, match="ecdhe"):
        tls.server_context(TlsOptions(ecdhe="P-999"), keypair(a))
    with pytest.raises(tls.TlsError, match="ciphers"):
        tls.server_context(TlsOptions(ciphers="NOPE"), keypair(a))
    with pytest.raises(tls.TlsError, match="ca cert"):
        tls.server_context(TlsOptions(client_ca=b"junk"), keypair(a))


def _client_auth_setup(ca):
    client_ca = trustme.CA()
    good = client_ca.issue_cert("client@test")
    expired = client_ca.issue_cert("old@test", not_before=NOW - datetime.timedelta(days=10),
                                   not_after=NOW - datetime.timedelta(days=1))
    revoked = client_ca.issue_cert("revoked@test")
    key = serialization.load_pem_private_key(client_ca.private_key_pem.bytes(), None)
    rev = x509.load_pem_x509_certificate(revoked.cert_chain_pems[0].bytes())
    cacert = x509.load_pem_x509_certificate(client_ca.cert_pem.bytes())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(cacert.subject)
           .last_update(NOW - datetime.timedelta(hours=1))
           .next_update(NOW + datetime.timedelta(days=1))
           .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                    .serial_number(rev.serial_number)
                                    .revocation_date(NOW - datetime.timedelta(hours=1)).build())
           .sign(key, hashes.SHA256()))
    return client_ca, good, expired, revoked, crl.public_bytes(serialization.Encoding.PEM)


def test_client_certificates(ca, certs):
    client_ca, good, expired, revoked, crl = _client_auth_setup(ca)
    opts = TlsOptions(client_ca=client_ca.cert_pem.bytes(), crl=crl)
    server = tls.TlsServer(tls.server_context(opts, keypair(certs["a.test"])))

    def with_cert(cert):
        cctx = client_ctx()
        if cert is not None:
            cert.configure_cert(cctx)
        return exchange(server, cctx)

    c, s = with_cert(good)
    assert c["data"] == b"<PING" and s.peer_certificate()
    # TLS 1.3: the client learns of the refusal only when it reads.
    for cert, why in ((None, "peer did not return a certificate"),
                      (expired, "certificate has expired"),
                      (revoked, "certificate revoked")):
        c, s = with_cert(cert)
        assert isinstance(s, ssl.SSLError), cert
        assert tls.describe_error(s) == why
    optional = tls.TlsServer(tls.server_context(
        TlsOptions(client_ca=client_ca.cert_pem.bytes(), client_optional=True),
        keypair(certs["a.test"])))
    c, s = exchange(optional, client_ctx())
    assert c["data"] == b"<PING" and s.peer_certificate() is None


def test_tickets_shared_between_contexts(certs):
    first = tls.new_ticket_key()
    tls.set_ticket_keys([first])
    opts = TlsOptions(ticket_lifetime=300)
    w1 = tls.TlsServer(tls.server_context(opts, keypair(certs["a.test"])))
    w2 = tls.TlsServer(tls.server_context(opts, keypair(certs["a.test"])))
    cctx = client_ctx()
    c, _ = exchange(w1, cctx)
    assert c["session"] is not None and not c["reused"]
    c2, _ = exchange(w2, cctx, session=c["session"])     # another "worker"
    assert c2["reused"]
    # After a rotation the old key still decrypts; unknown keys do not.
    tls.set_ticket_keys([tls.new_ticket_key(), first])
    c3, _ = exchange(w1, cctx, session=c["session"])
    assert c3["reused"]
    tls.set_ticket_keys([tls.new_ticket_key()])
    c4, _ = exchange(w1, cctx, session=c["session"])
    assert not c4["reused"]


def test_no_tickets_no_resumption(certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])))
    cctx = client_ctx(maximum_version=ssl.TLSVersion.TLSv1_2)
    c, _ = exchange(server, cctx)
    c2, _ = exchange(server, cctx, session=c["session"])
    assert not c2["reused"]


def test_plain_http_on_tls_port(certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])))
    out = {}

    async def main():
        a, b = trio.socket.socketpair()

        async def serve():
            try:
                await server.accept(b)
            except ssl.SSLError as e:
                out["err"] = e

        async with trio.open_nursery() as n:
            n.start_soon(serve)
            await a.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                out["reply"] = await a.recv(100)
            except ConnectionResetError:
                out["reply"] = b""

    trio.run(main)
    assert tls.describe_error(out["err"]) == "http request"
    assert not out["reply"].startswith(b"HTTP")


def test_handshake_timeout(certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])), timeout=0.2)

    async def main():
        a, b = trio.socket.socketpair()
        with pytest.raises(trio.TooSlowError):
            await server.accept(b)
        assert b.fileno() == -1                   # taken over and closed
        a.close()

    trio.run(main)


def test_ocsp_staple_callback(certs):
    # The stdlib client cannot ask for a staple; check the server side is
    # wired (callback registered, freed with its context).
    ctx = tls.server_context(TlsOptions(), keypair(certs["a.test"], ocsp=b"\x30\x03\x0a\x01\x00"))
    assert b"\x30\x03\x0a\x01\x00" in tls._staples.values()
    n = len(tls._staples)
    del ctx
    import gc
    gc.collect()
    assert len(tls._staples) == n - 1


def test_key_through_fd():
    fd = tls.key_to_fd(b"-----BEGIN KEY-----\nabc\n")
    assert tls.key_from_fd(fd) == bytearray(b"-----BEGIN KEY-----\nabc\n")
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("kind", [trustme.KeyType.RSA, trustme.KeyType.ECDSA])
def test_forge_certificate(ca, kind):
    origin = trustme.CA().issue_cert("origin.test")
    local_ca = trustme.CA(key_type=kind)
    ours = trustme.CA().issue_cert("ignored.test", key_type=kind)   # our keypair
    der = x509.load_pem_x509_certificate(origin.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER)
    ca_key = tls.PrivateKey(local_ca.private_key_pem.bytes())
    pem = tls.forge_certificate(der, local_ca.cert_pem.bytes(), ca_key.op,
                                ours.cert_chain_pems[0].bytes())
    forged = x509.load_pem_x509_certificate(pem)
    orig = x509.load_pem_x509_certificate(origin.cert_chain_pems[0].bytes())
    assert forged.subject == orig.subject and forged.serial_number == orig.serial_number
    assert forged.issuer == x509.load_pem_x509_certificate(local_ca.cert_pem.bytes()).subject
    assert tls.cert_names(pem) == ["origin.test"]
    # It serves (keyless: our key signs through a Signer), and a client
    # trusting the local CA accepts it for the name.
    server = tls.TlsServer(tls.server_context(
        TlsOptions(), Keypair(pem, None), signer=tls.PrivateKey(ours.private_key_pem.bytes()).op))
    cctx = client_ctx(local_ca)
    cctx.check_hostname = True
    c, _ = exchange(server, cctx, name="origin.test")
    assert c["data"] == b"<PING"


# -- keyless contexts (relayd's ca) ------------------------------------------------------

@pytest.mark.parametrize("kind", [trustme.KeyType.RSA, trustme.KeyType.ECDSA])
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_keyless_handshake(kind, version):
    """Private operations go through the signer, once per full handshake;
    the context holds the certificate only."""
    local_ca = trustme.CA(key_type=kind)
    leaf = local_ca.issue_cert("k.test", key_type=kind)
    holder = tls.PrivateKey(leaf.private_key_pem.bytes())
    calls = []

    def signer(op, data, padding):
        calls.append(op)
        return holder.op(op, data, padding)
    tls.set_ticket_keys([tls.new_ticket_key()])
    server = tls.TlsServer(tls.server_context(
        TlsOptions(ticket_lifetime=300), Keypair(leaf.cert_chain_pems[0].bytes(), None),
        signer=signer))
    v = getattr(ssl.TLSVersion, version)
    cctx = client_ctx(local_ca, minimum_version=v, maximum_version=v)
    c, s = exchange(server, cctx)
    assert c["data"] == b"<PING" and c["version"] == version.replace("_", ".")
    assert calls == [tls.ECDSA_SIGN if kind == trustme.KeyType.ECDSA else tls.RSA_PRIV_ENC]
    # A resumed handshake signs nothing.
    c2, _ = exchange(server, cctx, session=c["session"])
    assert c2["reused"] and len(calls) == 1


def test_keyless_signer_fails():
    """A signer that refuses (None) or raises fails the handshake, nothing more."""
    local_ca = trustme.CA()
    leaf = local_ca.issue_cert("k.test")

    def boom(op, data, padding):
        raise RuntimeError("no")
    for signer in (lambda *a: None, boom):
        server = tls.TlsServer(tls.server_context(
            TlsOptions(), Keypair(leaf.cert_chain_pems[0].bytes(), None), signer=signer))
        c, s = exchange(server, client_ctx(local_ca))
        assert isinstance(s, ssl.SSLError)


def test_private_key_checks():
    """The key holder's side checks operation, length and padding."""
    rsa_key = tls.PrivateKey(trustme.CA(key_type=trustme.KeyType.RSA).private_key_pem.bytes())
    ec_key = tls.PrivateKey(trustme.CA(key_type=trustme.KeyType.ECDSA).private_key_pem.bytes())
    n = rsa_key.size
    assert len(rsa_key.op(tls.RSA_PRIV_ENC, b"\x00" + b"x" * (n - 1), tls.RSA_NO_PADDING)) == n
    assert len(rsa_key.op(tls.RSA_PRIV_ENC, b"x" * 51, tls.RSA_PKCS1_PADDING)) == n
    assert ec_key.op(tls.ECDSA_SIGN, b"d" * 32, 0)[0] == 0x30
    for key, op, data, pad in [(rsa_key, tls.RSA_PRIV_ENC, b"x" * (n - 1), tls.RSA_NO_PADDING),
                               (rsa_key, tls.RSA_PRIV_ENC, b"x" * (n - 10), tls.RSA_PKCS1_PADDING),
                               (rsa_key, tls.RSA_PRIV_ENC, b"x" * n, 4),      # OAEP
                               (rsa_key, tls.ECDSA_SIGN, b"d" * 32, 0),
                               (ec_key, tls.ECDSA_SIGN, b"d" * 31, 0),
                               (ec_key, tls.RSA_PRIV_DEC, b"d" * 32, 1),
                               (ec_key, 99, b"d" * 32, 0)]:
        with pytest.raises(ValueError):
            key.op(op, data, pad)


def test_cert_names():
    names = ["a.test", "*.b.test"]
    assert tls.name_matches_cert("A.test", names)
    assert tls.name_matches_cert("x.b.test", names)
    assert not tls.name_matches_cert("b.test", names)
    assert not tls.name_matches_cert("y.x.b.test", names)


def test_client_context_verification(ca, certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])))
    c, _ = exchange(server, tls.client_context(ca=ca.cert_pem.bytes()), name="a.test")
    assert c["data"] == b"<PING"
    c, _ = exchange(server, tls.client_context(ca=trustme.CA().cert_pem.bytes()))
    assert isinstance(c, ssl.SSLCertVerificationError)
    c, _ = exchange(server, tls.client_context())              # no ca: no verification
    assert c["data"] == b"<PING"


def test_protocol_holes():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls._set_protocols(ctx, frozenset({"tlsv1.3"}))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    with pytest.raises(tls.TlsError):
        tls._set_protocols(ctx, frozenset())
    assert tls._cipher_lists("secure")[0] == tls.CIPHER_KEYWORDS["secure"]
    assert tls._cipher_lists("TLS_AES_128_GCM_SHA256:ECDHE-RSA-AES128-GCM-SHA256") == \
        ("ECDHE-RSA-AES128-GCM-SHA256", "TLS_AES_128_GCM_SHA256")
    assert tls._groups("default") == "X25519:P-256:P-384"
    assert tls._groups("x25519, P-256") == "x25519:P-256"


def test_unix_socketpair_is_what_we_think():
    # The tests above rely on AF_UNIX pairs; peer names are strings there.
    a, b = socket.socketpair()
    assert a.family == socket.AF_UNIX
    a.close()
    b.close()


def test_old_protocols_when_configured(certs):
    opts = TlsOptions(protocols=frozenset(tls.PROTOCOLS), ciphers="compat")
    server = tls.TlsServer(tls.server_context(opts, keypair(certs["a.test"])))
    cctx = client_ctx(minimum_version=ssl.TLSVersion.TLSv1,
                      maximum_version=ssl.TLSVersion.TLSv1)
    cctx.set_ciphers("ALL:@SECLEVEL=0")
    c, s = exchange(server, cctx)
    assert c["version"] == "TLSv1", (c, s)


def test_dhe_parameters(ca):
    rsa = ca.issue_cert("rsa.test", key_type=trustme.KeyType.RSA)
    cctx = client_ctx(maximum_version=ssl.TLSVersion.TLSv1_2)
    cctx.set_ciphers("DHE-RSA-AES128-GCM-SHA256")
    for dhe, ok in (("auto", True), ("none", False)):
        server = tls.TlsServer(tls.server_context(TlsOptions(dhe=dhe), keypair(rsa)))
        c, _ = exchange(server, cctx)
        assert (isinstance(c, dict) and c["cipher"] == "DHE-RSA-AES128-GCM-SHA256") is ok
    with pytest.raises(tls.TlsError):
        tls.server_context(TlsOptions(dhe="strong"), keypair(rsa))


def test_probe_and_truncated_hello(certs):
    server = tls.TlsServer(tls.server_context(TlsOptions(), keypair(certs["a.test"])))

    async def one(data: bytes) -> str:
        a, b = trio.socket.socketpair()
        if data:
            await a.send(data)
        a.close()
        with pytest.raises(OSError) as e:
            await server.accept(b)
        return tls.describe_error(e.value)

    async def main():
        assert await one(b"") == tls.NO_HANDSHAKE
        assert await one(b"\x16\x03\x01\x02\x00\x01") == "connection closed"

    trio.run(main)
