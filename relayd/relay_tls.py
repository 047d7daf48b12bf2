"""relayd.relay_tls -- TLS in relays (relay.c's relay_tls_* and
relay_load_certfiles), on engine.tls.

Parent side (read()): before any child is chrooted -- and again on every
reload, which is how renewed certificates get served -- the parent reads,
for every relay:
  - for each `listen on ... tls` address, the keypairs of its protocol's
    `tls keypair NAME` lines (default NAME: the listen address):
    /etc/ssl/private/NAME:PORT.key + /etc/ssl/NAME:PORT.crt, else
    NAME.key + NAME.crt; an OCSP response from /etc/ssl/NAME[:PORT].ocsp
    when that file exists and is not empty;
  - `tls ca file` (verify backends of `forward with tls`), `tls client ca`,
    and for TLS inspection `tls ca cert` + `tls ca key` (decrypted here
    with its `password`);
and checks that OpenSSL takes them.  A failure is the config error
"<file>:<line>: cannot load certificates for relay NAME".  A relative path
of `tls ca file`, `ca cert`, `ca key` or `client ca` is opened relative to
the directory relayd was started in, on every reload too (OpenBSD open(2)s
them as written, and its daemon(3) keeps the working directory); keypair
names are always looked up in /etc/ssl.  Extension: the environment
variable RELAYD_SSL_DIR replaces /etc/ssl for keypairs (keys then come from
$RELAYD_SSL_DIR/private).

Certificates travel in the relay worker's CFG_CONFIG message (payload());
private keys (keypairs and the inspection CA key) go to the ca process
only (relayd.ca), each in a sealed memfd (Imsg.CFG_TLS_KEY).  Workers
never open a key file and never hold a private key.

Worker side (build()): a ListenTls per TLS listening socket: a TlsServer
(SNI picks the keypair whose certificate names the requested host, else
the first) of keyless contexts whose private operations ca does (each
key by its key id), the client context towards `forward with tls`
backends, and the inspection state (forged certificates, cached by the
backend certificate's digest: a copy of the backend's certificate with
the public key of the listener's first keypair, so its key stays in ca
too, and signed by ca with the CA key).  A failed handshake ends the
connection with one log line.

Defaults: TLS 1.2 + 1.3; the default cipher string (`HIGH:!aNULL`, not
written in the file) is served as libtls' "secure" list, which passes
Mozilla's intermediate profile.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from engine import tls
from relayd.ca import CaClient
from relayd.config import TLS_CIPHERS, TLS_KEY_DIR, TLS_SSL_DIR, ProtocolConfig, RelaydConfig
from relayd.config import TlsOptions as ConfTls
from shared import log

SockKey = tuple[str, int]
# `tls session tickets`: lifetime of a session (libtls' default, 2 hours).
TICKET_LIFETIME = 7200
# Forged certificates kept per listening socket (TLS inspection).
FORGED_CACHE = 256
# ALPN offers of an HTTP relay's TLS listener, with and without `http2`.
ALPN_H2 = ("h2", "http/1.1")
ALPN_H1 = ("http/1.1",)
# Handshake timeout ceiling (s); a relay's session timeout may be shorter.
HANDSHAKE_TIMEOUT = 60.0


def ssl_dir() -> str:
    d = os.environ.get("RELAYD_SSL_DIR")
    return os.path.abspath(d) if d else TLS_SSL_DIR


def key_dir() -> str:
    d = os.environ.get("RELAYD_SSL_DIR")
    return os.path.join(os.path.abspath(d), "private") if d else TLS_KEY_DIR


def _path(p: str, cwd: str) -> str:
    return os.path.join(cwd, p)          # an absolute p wins


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def alpn(proto: ProtocolConfig) -> tuple[str, ...]:
    """What a TLS listener offers in ALPN: HTTP relays `http/1.1`, with
    `http { http2 }` first `h2`; other relays nothing."""
    if proto.type != "http":
        return ()
    return ALPN_H2 if proto.http.http2 else ALPN_H1


def options(t: ConfTls, client_ca: bytes | None = None,
            alpn: tuple[str, ...] = ()) -> tls.TlsOptions:
    """engine.tls options of a protocol's `tls {}` block."""
    return tls.TlsOptions(alpn=alpn,
        protocols=frozenset(v for v in t.versions if v in tls.PROTOCOLS),
        ciphers="secure" if t.ciphers == TLS_CIPHERS else t.ciphers,
        ecdhe=t.ecdhe, dhe=t.edh, client_ca=client_ca,
        ticket_lifetime=TICKET_LIFETIME if t.session_tickets else None,
        cipher_server_preference=t.cipher_server_preference,
        client_renegotiation=t.client_renegotiation)


@dataclass(frozen=True)
class ListenFiles:
    """Certificates of one TLS listening socket (keys travel apart)."""
    certs: tuple[bytes, ...]
    ocsp: tuple[bytes | None, ...]
    names: tuple[tuple[str, ...], ...]
    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class RelayFiles:
    listens: dict = field(default_factory=dict)     # SockKey -> ListenFiles
    ca_file: bytes | None = None
    client_ca: bytes | None = None
    ca_cert: bytes | None = None
    ca_key_id: str | None = None


@dataclass
class Material:
    """What the parent read for one configuration generation."""
    relays: dict = field(default_factory=dict)      # relay id -> RelayFiles
    keys: dict = field(default_factory=dict)        # key id -> PEM bytes (for ca only)
    ticket_key: bytes | None = None

    def payload(self) -> dict:
        return {"relays": self.relays, "ticket_key": self.ticket_key}


def _keypair(name: str, port: int) -> tuple[bytes, bytes, bytes | None]:
    """relay_load_certfiles(): NAME:PORT first, then NAME."""
    d, kd = ssl_dir(), key_dir()
    cert = key = None
    for base in (f"{name}:{port}", name):
        try:
            cert = _read(os.path.join(d, base + ".crt"))
            key = _read(os.path.join(kd, base + ".key"))
        except OSError:
            cert = key = None
            continue
        break
    if cert is None or key is None:
        raise OSError(f"no keypair {name}")
    ocsp = None
    for base in (f"{name}:{port}", name):
        try:
            ocsp = _read(os.path.join(d, base + ".ocsp")) or None
        except OSError:
            continue
        break
    return cert, key, ocsp


def _ca_key(path: str, password: str | None) -> bytes:
    """The inspection CA key, decrypted, as unencrypted PKCS#8 PEM."""
    from cryptography.hazmat.primitives import serialization
    raw = _read(path)
    k = serialization.load_pem_private_key(raw, password.encode() if password else None)
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def read(conf: RelaydConfig, cwd: str | None = None) -> tuple[Material, list[str]]:
    """Read and check every relay's TLS files (the parent's job); relative
    file names are taken from `cwd` (default: the working directory).
    Returns (material, errors as "file:line: message")."""
    cwd = os.getcwd() if cwd is None else cwd
    mat = Material()
    errors: list[str] = []
    for rl in conf.relays:
        proto = conf.protocol_of(rl)
        t = proto.tls
        server = any(lis.tls for lis in rl.listens)
        if not server and not rl.tls_client:
            continue
        try:
            ca_file = _read(_path(t.ca_file, cwd)) if t.ca_file and rl.tls_client else None
            client_ca = _read(_path(t.client_ca, cwd)) if t.client_ca and server else None
            opts = options(t, client_ca)
            listens = {}
            for lis in rl.listens:
                if not lis.tls:
                    continue
                certs, ocsps, names, ids = [], [], [], []
                for i, name in enumerate(t.keypairs or (lis.addr,)):
                    cert, key, ocsp = _keypair(name, lis.port)
                    tls.server_context(opts, tls.Keypair(cert, key, ocsp))
                    kid = f"{rl.id}:{lis.addr}:{lis.port}:{i}"
                    mat.keys[kid] = key
                    certs.append(cert)
                    ocsps.append(ocsp)
                    names.append(tuple(tls.cert_names(cert)))
                    ids.append(kid)
                listens[(lis.addr, lis.port)] = ListenFiles(tuple(certs), tuple(ocsps),
                                                            tuple(names), tuple(ids))
            ca_cert = ca_key_id = None
            if server and t.ca_cert and t.ca_key:
                ca_cert = _read(_path(t.ca_cert, cwd))
                ca_key_id = f"{rl.id}:ca"
                mat.keys[ca_key_id] = _ca_key(_path(t.ca_key, cwd), t.ca_key_password)
            if rl.tls_client:
                tls.client_context(options(t), ca=ca_file)
        except (OSError, ValueError, TypeError, tls.TlsError) as e:
            log.debug(f"relay_load_certfiles: relay {rl.name}: {e}")
            errors.append(f"{rl.where}: cannot load certificates for relay {rl.name}")
            continue
        mat.relays[rl.id] = RelayFiles(listens, ca_file, client_ca, ca_cert, ca_key_id)
        if t.session_tickets and mat.ticket_key is None:
            mat.ticket_key = tls.new_ticket_key()
    return mat, errors


# -- the relay worker ------------------------------------------------------------

class ListenTls:
    """TLS of one listening socket in a relay process."""

    def __init__(self, name: str, timeout: float, server: tls.TlsServer | None,
                 client: ssl.SSLContext | None, inspect: tuple | None = None) -> None:
        self.name = name
        self.timeout = timeout
        self.server = server
        self.client = client            # towards `forward with tls` backends
        # TLS inspection: (ca_cert, its Signer, the leaf certificate whose
        # public key forged certificates get, its Signer, opts)
        self.inspect = inspect
        self._forged: OrderedDict[bytes, tls.TlsServer] = OrderedDict()

    def _fail(self, peer, local, e: BaseException) -> None:
        why = tls.describe_error(e)
        line = (f"relay_tls_handshake: relay {self.name}, {peer[0]}:{peer[1]} -> "
                f"{local[0]}:{local[1]}, tls handshake failed - {why}")
        if why == tls.NO_HANDSHAKE:
            log.debug(line)          # port probes: connect, close
        else:
            log.warn(line)

    async def accept(self, sock, lis) -> tls.TlsTransport | None:
        """The Listener's wrap hook: handshake, or log and close."""
        peer = ("?", 0)
        try:
            peer = sock.getpeername()
            return await self.server.accept(sock, peer=peer, local=lis.local)
        except (ssl.SSLError, OSError, trio.TooSlowError, ValueError) as e:
            self._fail(peer, lis.local, e)
            return None

    async def connect(self, sock) -> tls.TlsTransport:
        """Client handshake towards a backend (raises, see describe_error)."""
        return await tls.connect(sock, self.client, timeout=self.timeout)

    def _forge(self, der: bytes) -> tls.TlsServer:
        digest = hashlib.sha256(der).digest()
        srv = self._forged.get(digest)
        if srv is not None:
            self._forged.move_to_end(digest)
            return srv
        ca_cert, ca_sign, leaf, sign, opts = self.inspect
        cert = tls.forge_certificate(der, ca_cert, ca_sign, leaf)
        srv = tls.TlsServer(tls.server_context(opts, tls.Keypair(cert, None), sign), None,
                            self.timeout)
        self._forged[digest] = srv
        while len(self._forged) > FORGED_CACHE:
            self._forged.popitem(last=False)
        return srv

    async def accept_inspected(self, client, backend_cert: bytes | None
                               ) -> tls.TlsTransport | None:
        """TLS inspection: the client handshake with a copy of the
        backend's certificate signed by the local CA."""
        peer, local = client.peer, client.local
        try:
            if not backend_cert:
                raise ssl.SSLError(0, "no server certificate")
            srv = self._forge(backend_cert)
            return await srv.accept(client.sock, peer=peer, local=local)
        except (ssl.SSLError, OSError, trio.TooSlowError, ValueError, tls.TlsError) as e:
            self._fail(peer, local, e)
            return None


def _logged_select(relay: str, select):
    """SNI: an unknown name keeps the first keypair (libtls), said at -vv."""
    def sel(name: str):
        ctx = select(name)
        if ctx is None:
            log.debug(f"relay {relay}: tls: unknown server name {name}, "
                      "using the first keypair")
        return ctx
    return sel


def build(conf: RelaydConfig, payload: dict | None, ca: CaClient
          ) -> dict[SockKey, ListenTls]:
    """The worker's ListenTls objects, from the parent's certificates
    (built before the chroot); `ca` does the private operations."""
    out: dict[SockKey, ListenTls] = {}
    if not payload:
        return out
    if payload.get("ticket_key"):
        tls.set_ticket_keys([payload["ticket_key"]])
    relays = payload.get("relays") or {}
    for rl in conf.relays:
        rf: RelayFiles | None = relays.get(rl.id)
        if rf is None:
            continue
        proto = conf.protocol_of(rl)
        t = proto.tls
        timeout = min(HANDSHAKE_TIMEOUT, float(rl.session_timeout or HANDSHAKE_TIMEOUT))
        opts = options(t, rf.client_ca, alpn(proto))
        client = tls.client_context(options(t), ca=rf.ca_file) if rl.tls_client else None
        for lis in rl.listens:
            key = (lis.addr, lis.port)
            lf: ListenFiles | None = rf.listens.get(key)
            name = lis.name or rl.name
            if lf is None:
                if client is not None:
                    out.setdefault(key, ListenTls(name, timeout, None, client))
                continue
            pairs = []
            inspect = None
            for cert, ocsp, names, kid in zip(lf.certs, lf.ocsp, lf.names, lf.key_ids):
                sign = ca.signer(kid)
                if inspect is None and rf.ca_key_id and rf.ca_cert:
                    inspect = (rf.ca_cert, ca.signer(rf.ca_key_id), cert, sign, opts)
                pairs.append((list(names),
                              tls.server_context(opts, tls.Keypair(cert, None, ocsp), sign)))
            select = _logged_select(name, tls.select_by_names(pairs)) if len(pairs) > 1 else None
            server = tls.TlsServer(pairs[0][1], select, timeout)
            out.setdefault(key, ListenTls(name, timeout, server, client, inspect))
    return out


def preload(listens: dict[SockKey, ListenTls]) -> None:
    """What forging certificates needs, imported before the chroot: one
    forgery per inspecting listener of a throwaway certificate, signed by
    a throwaway CA of its CA's key type (ca is not asked)."""
    import datetime

    import cryptography.hazmat.backends  # noqa: F401
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: F401
    from cryptography.x509.oid import NameOID
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "preload")])
    now = datetime.datetime.now(datetime.timezone.utc)

    def throwaway(key) -> bytes:
        return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("preload")]), False)
                .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    pem = serialization.Encoding.PEM
    for lt in listens.values():
        if lt.inspect:
            try:
                ca_cert, _, leaf, _, _ = lt.inspect
                rsa_ca = isinstance(x509.load_pem_x509_certificate(ca_cert).public_key(),
                                    rsa.RSAPublicKey)
                key = (rsa.generate_private_key(65537, 1024) if rsa_ca
                       else ec.generate_private_key(ec.SECP256R1()))
                holder = tls.PrivateKey(key.private_bytes(
                    pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
                ca_pem = x509.load_der_x509_certificate(throwaway(key)).public_bytes(pem)
                tls.forge_certificate(throwaway(key), ca_pem, holder.op, leaf)
            except Exception as e:      # noqa: BLE001 -- said again per session
                log.warn(f"relay {lt.name}: tls inspection: {e}")
