"""httpd.server_tls -- TLS on httpd's sockets (the libtls half of server.c).

The parent reads every TLS server's certificate, key, OCSP response,
client CA and CRL with read_files() -- before any child chroots, and again
on each reload, which is how renewed certificates get served -- and checks
that OpenSSL takes them.  A `tls acme` server whose files do not exist yet
gets a temporary self-signed certificate for its domain's names (httpd.acme
then obtains the real one).  A server process builds one context per keypair
from those bytes (ListenTls, one per TLS socket); SNI picks the keypair of
the server or alias of that name, else the one whose certificate names it,
else the first server's.  ListenTls.accept() runs the handshake before
server_http sees the connection; a failed handshake ends the connection
with one log line.

Does not parse configs, read files in the server process, or speak HTTP.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import trio

from engine import tls
from httpd import parse, route
from httpd.config import HttpdConfig, ServerConfig, TlsConfig
from shared import log


@dataclass(frozen=True)
class ServerFiles:
    """What the parent read for one TLS server (the key travels apart)."""
    cert: bytes
    ocsp: bytes | None = None
    ca: bytes | None = None
    crl: bytes | None = None
    names: tuple[str, ...] = ()         # DNS names in the certificate


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def options(tc: TlsConfig, files: ServerFiles | None,
            alpn: tuple[str, ...] = ()) -> tls.TlsOptions:
    """engine.tls options of a server's `tls {}` block (`alpn`: the
    protocols the socket offers)."""
    return tls.TlsOptions(
        protocols=parse.tls_protocols(tc.protocols), ciphers=tc.ciphers,
        ecdhe=tc.ecdhe, dhe=tc.dhe,
        client_ca=files.ca if files and tc.client_ca else None,
        crl=files.crl if files and tc.crl else None,
        client_optional=tc.client_optional, ticket_lifetime=tc.ticket_lifetime,
        alpn=alpn)


def read_files(conf: HttpdConfig) -> tuple[dict[int, ServerFiles], dict[int, bytes], list[str]]:
    """Read and check every TLS server's files (the parent's job).

    Returns (files by server id, keys by server id, errors as
    "file:line: message", OpenBSD's parse.y wording)."""
    files: dict[int, ServerFiles] = {}
    keys: dict[int, bytes] = {}
    errors: list[str] = []
    for srv in conf.servers:
        tc = srv.tls
        if tc is None:
            continue

        def err(what: str, srv=srv) -> None:
            errors.append(f'{srv.where}: server "{srv.name}": {what}')
        try:
            cert, key = _read(tc.certificate), _read(tc.key)
        except OSError:
            if tc.acme is None or conf.acme is None:
                err("failed to load public/private keys")
                continue
            cert, key = temporary_keypair(conf.acme.domain(tc.acme).names)
        extra: dict[str, bytes | None] = {}
        for field, path, what in (("ocsp", tc.ocsp, "failed to load ocsp staple"),
                                  ("ca", tc.client_ca, "failed to load ca cert(s)"),
                                  ("crl", tc.crl, "failed to load crl(s)")):
            try:
                extra[field] = _read(path) if path else None
            except OSError:
                err(what)
        if len(extra) < 3:
            continue
        # An empty OCSP file means "no staple" (httpd.conf(5)).  The names
        # are parsed here: workers need not load cryptography.
        f = ServerFiles(cert, extra["ocsp"] or None, extra["ca"], extra["crl"],
                        tuple(tls.cert_names(cert)))
        try:
            tls.server_context(options(tc, f), tls.Keypair(cert, key, f.ocsp))
        except tls.TlsError as e:
            msg = str(e)
            if "key" in msg or "certificate" in msg:
                msg = "failed to load public/private keys"
            err(msg)
            continue
        files[srv.id] = f
        keys[srv.id] = key
    return files, keys, errors


_temporary: dict[tuple[str, ...], tuple[bytes, bytes]] = {}


def temporary_keypair(names: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A self-signed (certificate, key) for `names`, the same one for as
    long as this process needs one (reloads do not make another)."""
    pair = _temporary.get(names)
    if pair is None:
        from shared import acme_crypto
        pair = _temporary[names] = acme_crypto.self_signed(names)
        log.verbose(f"server_tls: no certificate for {names[0]} yet, "
                 "serving a temporary self-signed one")
    return pair


def ticket_lifetime(conf: HttpdConfig) -> int | None:
    """The shortest `ticket lifetime` of the configuration (None: none)."""
    lives = [s.tls.ticket_lifetime for s in conf.servers
             if s.tls is not None and s.tls.ticket_lifetime]
    return min(lives) if lives else None


class ListenTls:
    """The TLS side of one listening socket in a server process."""

    def __init__(self, servers: list[ServerConfig], files: dict[int, ServerFiles],
                 keys: dict[int, bytearray], alpn: tuple[str, ...] = ()) -> None:
        self.servers = [s for s in servers if s.tls is not None and s.id in files]
        if not self.servers:
            raise tls.TlsError("no keypair for this socket")
        self.contexts: dict[int, ssl.SSLContext] = {}
        names: list[tuple[list[str], ssl.SSLContext]] = []
        made: dict[tuple[bytes, bytes | None], ssl.SSLContext] = {}
        for srv in self.servers:
            f = files[srv.id]
            ctx = made.get((f.cert, f.ocsp))
            if ctx is None:
                key = keys.get(srv.id, bytearray())
                ctx = tls.server_context(options(srv.tls, f, alpn),
                                         tls.Keypair(f.cert, key, f.ocsp))
                made[(f.cert, f.ocsp)] = ctx
            self.contexts[srv.id] = ctx
            names.append((list(f.names), ctx))
        self.by_cert = tls.select_by_names(names)
        first = self.servers[0]
        timeout = first.connection.request_timeout
        # One keypair on the socket: no SNI callback per handshake.
        select = self.select if len(made) > 1 else None
        self.server = tls.TlsServer(self.contexts[first.id], select, timeout)

    def select(self, name: str) -> ssl.SSLContext | None:
        """The context for an SNI name; None keeps the first server's."""
        name = name.rstrip(".")
        for srv in self.servers:
            if route.name_matches(srv.name, srv.name_lua, name) or \
                    any(route.name_matches(a.pattern, a.lua, name) for a in srv.aliases):
                return self.contexts[srv.id]
        ctx = self.by_cert(name)
        if ctx is not None:
            return ctx
        if log.get_verbose() > 1:
            log.debug(f"server_tls_sni: unknown server name {name}, "
                      f"using the certificate of server {self.servers[0].name}")
        return None

    async def accept(self, sock, lis) -> tls.TlsTransport | None:
        """The Listener's wrap hook: handshake, or log and close."""
        peer = ("?", 0)
        try:
            peer = sock.getpeername()
            return await self.server.accept(sock, peer=peer, local=lis.local)
        except (ssl.SSLError, OSError, trio.TooSlowError, ValueError) as e:
            why = tls.describe_error(e)
            line = (f"server_tls_handshake: server {self.servers[0].name}, "
                    f"{peer[0]}:{peer[1]} -> {lis.local[0]}:{lis.local[1]}, "
                    f"tls handshake failed - {why}")
            if why == tls.NO_HANDSHAKE:
                log.verbose(line)    # port probes: connect, close
            else:
                log.info(line)
            return None

