"""acme_client.parent -- the privileged main process of acme-client.

Decides whether there is anything to do (the certificate file: names,
renewal window, -F, -r), holds the account and domain keys, and starts the
net process (acme_client.netproc, unprivileged and chrooted) that talks to
the CA.  It then answers the net process's requests one at a time: sign a
JWS (only for URLs on the CA's origin), resolve a host name, write or
remove a token file (only a well-formed token with its exact key
authorization), build the CSR, install the certificate it downloaded (only
one for the domain key and names) or remove the files after revocation.

Exit status as OpenBSD's: 0 changed, 2 nothing to do, 1 error.  Every file
is replaced atomically (acme_client.files); a failed run leaves existing
files as they were.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from acme_client import dodbg, files, warnx
from shared import acme, acme_crypto, proc
from shared.acme_conf import AuthorityConfig, DomainConfig
from shared.imsg import Imsg

EXIT_CHANGED, EXIT_ERROR, EXIT_UNCHANGED = 0, 1, 2
NET_DEADLINE = 600.0      # a net process still talking after this is killed


def plan(dom: DomainConfig, force: bool, revoke: bool,
         now: float | None = None) -> tuple[str, acme_crypto.CertInfo | None] | int:
    """revokeproc.c: ("issue"|"revoke", the current certificate) or an exit
    status when there is nothing to do or the certificate is unusable."""
    now = time.time() if now is None else now
    path = dom.certfile
    try:
        with open(path, "rb") as f:
            info = acme_crypto.cert_info(acme_crypto.split_pem_chain(f.read())[0])
    except FileNotFoundError:
        if revoke:
            warnx(f"{path}: no certificate found")
            return EXIT_ERROR
        return "issue", None
    except (OSError, ValueError) as e:
        warnx(f"{path}: {getattr(e, 'strerror', None) or e}")
        return EXIT_ERROR
    changed = sorted(set(info.names)) != sorted(set(dom.names)) or \
        len(info.names) != len(set(info.names))
    if revoke:
        if changed:
            missing = [n for n in dom.names if n not in info.names]
            warnx(f"{path}: domain not listed: {missing[0]}" if missing
                  else f"{path}: unexpected SAN entry")
            return EXIT_ERROR
        dodbg(f"{path}: revocation")
        return "revoke", info
    days = math.floor((info.not_after - now) / 86400)
    if acme.renewal_due(info.not_before, info.not_after, now):
        dodbg(f"{path}: certificate renewable: {days} days left")
        return "issue", info
    dodbg(f"{path}: certificate valid: {days} days left")
    if changed or force:
        warnx(f"{path}: {'domain list changed, ' if changed else ''}forcing renewal")
        return "issue", info
    return EXIT_UNCHANGED


def load_keys(auth: AuthorityConfig, dom: DomainConfig):
    """(account key, domain key); missing ones are created (mode 0600)."""
    keys = []
    for path, keytype, what in ((auth.account_key, auth.account_keytype, "account"),
                                (dom.key, dom.keytype, "domain")):
        key, created = files.load_or_create_key(path, keytype)
        if created:
            dodbg(f"{path}: generated {'ECDSA' if keytype == 'ecdsa' else 'RSA'} {what} key")
        keys.append(key)
    return keys


@dataclass
class Main:
    """One run: the net process and the answers it gets."""
    auth: AuthorityConfig
    dom: DomainConfig
    op: str                                   # "issue" or "revoke"
    cert: acme_crypto.CertInfo | None         # the certificate there now
    account_key: acme_crypto.PrivateKey
    domain_key: acme_crypto.PrivateKey
    verbose: int = 0

    def __post_init__(self) -> None:
        self.thumbprint = acme_crypto.thumbprint(acme_crypto.jwk(self.account_key))
        self.origin = _origin(self.auth.api_url)
        self.tokens: set[str] = set()     # published, removed at the end whatever happens
        self.done = False
        self.handlers = {
            Imsg.ACME_SIGN: self.sign,
            Imsg.ACME_RESOLVE: self.resolve,
            Imsg.ACME_TOKEN_ADD: self.token_add,
            Imsg.ACME_TOKEN_DEL: self.token_del,
            Imsg.ACME_CSR: self.csr,
            Imsg.ACME_CERT: self.install,
            Imsg.ACME_REVOKED: self.revoked,
        }

    def job(self) -> dict:
        return {"op": self.op, "api_url": self.auth.api_url, "contact": self.auth.contact,
                "names": list(self.dom.names), "thumbprint": self.thumbprint,
                "cert_der": self.cert.der if self.cert else None}

    async def run(self) -> int:
        args = ["-v"] * self.verbose
        child = await proc.spawn("acme_client", "net", 0, 0, args)
        code = None
        try:
            await child.chan.send(Imsg.CFG_CONFIG, self.job())
            await child.chan.send(Imsg.CFG_DONE)
            with trio.move_on_after(NET_DEADLINE):
                await self.serve(child)
                code = await child.process.wait()
            if code is None:
                warnx(f"net process: no result after {NET_DEADLINE:g} seconds")
        finally:
            if child.process.returncode is None:
                child.process.kill()
                with trio.CancelScope(shield=True):
                    await child.process.wait()
            child.chan.close()
            for token in list(self.tokens):
                files.remove_token(self.dom.challengedir, token)
        if code != 0 or not self.done:
            return EXIT_ERROR
        return EXIT_CHANGED

    async def serve(self, child) -> None:
        while (msg := await child.chan.recv()) is not None:
            handler = self.handlers.get(msg.type)
            if handler is None or not isinstance(msg.payload, dict):
                warnx(f"net process: unexpected message {msg.type}")   # desynchronized
                child.process.kill()
                return
            try:
                mtype, reply = await handler(msg.payload)
            except (OSError, ValueError, TypeError, KeyError) as e:
                mtype, reply = Imsg.ACME_OK, {"error": str(getattr(e, "strerror", None) or e)}
            if reply.get("error"):
                warnx(reply["error"])
            await child.chan.send(mtype, reply)

    # -- answers -----------------------------------------------------------------
    async def sign(self, req: dict):
        url = str(req["url"])
        if _origin(url) != self.origin:
            return Imsg.ACME_OK, {"error": f"{url}: not on the CA's origin {self.origin}"}
        payload = req.get("payload")
        if payload is not None and not isinstance(payload, dict):
            raise ValueError("payload must be an object")
        kid = req.get("kid")
        jws = acme_crypto.sign_jws(self.account_key, url, str(req["nonce"]), payload,
                                   str(kid) if kid else None)
        return Imsg.ACME_SIGNED, {"jws": jws}

    async def resolve(self, req: dict):
        host, port = str(req["host"]), req.get("port")
        try:
            res = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            return Imsg.ACME_RESOLVED, {"addrs": [], "error": f"{host}: {e.strerror}"}
        return Imsg.ACME_RESOLVED, {"addrs": [[int(f), int(t), p, c, list(sa)]
                                              for f, t, p, c, sa in res]}

    async def token_add(self, req: dict):
        token, keyauth = str(req["token"]), str(req["keyauth"])
        if keyauth != f"{token}.{self.thumbprint}":
            raise ValueError(f"{token}: not this account's key authorization")
        files.write_token(self.dom.challengedir, token, keyauth)
        self.tokens.add(token)
        dodbg(f"{files.token_path(self.dom.challengedir, token)}: created")
        return Imsg.ACME_OK, {"error": None}

    async def token_del(self, req: dict):
        token = str(req["token"])
        files.remove_token(self.dom.challengedir, token)
        self.tokens.discard(token)
        dodbg(f"{files.token_path(self.dom.challengedir, token)}: unlinked")
        return Imsg.ACME_OK, {"error": None}

    async def csr(self, req: dict):
        if self.op != "issue":
            raise ValueError("no certificate is being issued")
        der = acme_crypto.make_csr(self.domain_key, self.dom.names)
        return Imsg.ACME_CSR, {"der": acme_crypto.b64url(der)}

    async def install(self, req: dict):
        if self.op != "issue":
            raise ValueError("no certificate is being issued")
        chain = acme_crypto.split_pem_chain(str(req["pem"]).encode())
        leaf = chain[0]
        if not acme_crypto.same_public_key(leaf, self.domain_key):
            raise ValueError("certificate does not match the domain key")
        missing = set(self.dom.names) - set(acme_crypto.cert_info(leaf).names)
        if missing:
            raise ValueError(f"certificate lacks {', '.join(sorted(missing))}")
        pems = [acme_crypto.cert_pem(c) for c in chain]
        out = {}
        for path, data in ((self.dom.cert, pems[0]), (self.dom.chain, b"".join(pems[1:])),
                           (self.dom.fullchain, b"".join(pems))):
            if path:
                out[path] = (data, files.CERT_MODE)
        files.install(out)
        for path in out:
            dodbg(f"{path}: created")
        self.done = True
        return Imsg.ACME_OK, {"error": None}

    async def revoked(self, req: dict):
        if self.op != "revoke":
            raise ValueError("no certificate is being revoked")
        for path in files.remove([p for p in (self.dom.cert, self.dom.chain,
                                              self.dom.fullchain) if p]):
            dodbg(f"{path}: unlinked")
        self.done = True
        return Imsg.ACME_OK, {"error": None}


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def run(auth: AuthorityConfig, dom: DomainConfig, force: bool, revoke: bool,
        verbose: int) -> int:
    """Everything after the command line: plan, keys, net process."""
    planned = plan(dom, force, revoke)
    if isinstance(planned, int):
        return planned
    op, cert = planned
    try:
        account_key, domain_key = load_keys(auth, dom)
    except (OSError, ValueError) as e:
        warnx(f"{getattr(e, 'filename', None) or 'key'}: {getattr(e, 'strerror', None) or e}")
        return EXIT_ERROR
    if os.geteuid() != 0:
        proc.warn_not_sandboxed("acme-client")
    main = Main(auth, dom, op, cert, account_key, domain_key, verbose)
    return trio.run(main.run)
