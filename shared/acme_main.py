"""shared.acme_main -- the key-holding side of one ACME run.

Holds the account and domain keys and starts the net process
(shared.acme_net, unprivileged and chrooted) that talks to the CA, then
answers its requests one at a time: sign a JWS (only for URLs on the CA's
origin), resolve a host name, publish or withdraw an http-01 answer (only
a well-formed token with this account's key authorization; *how* is the
caller's: token files for acme-client, memory of the server processes for
httpd), build the CSR, install the certificate it downloaded (only one for
the domain key and names), note why it failed.

Used by acme-client's main process (acme_client.parent) and by httpd's
parent (httpd.acme).  Every file goes through shared.acme_files.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import trio

from shared import acme_crypto, acme_files, proc
from shared.acme_conf import AuthorityConfig, DomainConfig
from shared.imsg import Imsg

NET_DEADLINE = 600.0      # a net process still talking after this is killed


def load_keys(auth: AuthorityConfig, dom: DomainConfig,
              log: Callable[[str], None] = lambda msg: None):
    """(account key, domain key); missing ones are created (mode 0600)."""
    keys = []
    for path, keytype, what in ((auth.account_key, auth.account_keytype, "account"),
                                (dom.key, dom.keytype, "domain")):
        key, created = acme_files.load_or_create_key(path, keytype)
        if created:
            log(f"{path}: generated {'ECDSA' if keytype == 'ecdsa' else 'RSA'} {what} key")
        keys.append(key)
    return keys


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


@dataclass
class Main:
    """One run: the net process and the answers it gets.

    `publish(token, keyauth)` / `withdraw(token)` make an http-01 answer
    reachable and take it away; `warn` and `debug` log."""
    auth: AuthorityConfig
    dom: DomainConfig
    op: str                                   # "issue" or "revoke"
    cert: acme_crypto.CertInfo | None         # the certificate there now
    account_key: acme_crypto.PrivateKey
    domain_key: acme_crypto.PrivateKey
    publish: Callable[[str, str], Awaitable[None]]
    withdraw: Callable[[str], Awaitable[None]]
    warn: Callable[[str], None]
    debug: Callable[[str], None] = lambda msg: None
    prog: str = "acme-client"                 # the net process's log prefix
    installed: acme_crypto.CertInfo | None = None   # what install() wrote
    error: dict | None = None                 # ACME_ERROR: {"error", "type", "retry_after"}
    tokens: set = field(default_factory=set)  # published, withdrawn at the end whatever happens

    def __post_init__(self) -> None:
        self.thumbprint = acme_crypto.thumbprint(acme_crypto.jwk(self.account_key))
        self.origin = origin(self.auth.api_url)
        self.done = False
        self.handlers = {
            Imsg.ACME_SIGN: self.sign,
            Imsg.ACME_RESOLVE: self.resolve,
            Imsg.ACME_TOKEN_ADD: self.token_add,
            Imsg.ACME_TOKEN_DEL: self.token_del,
            Imsg.ACME_CSR: self.csr,
            Imsg.ACME_CERT: self.install,
            Imsg.ACME_ERROR: self.failed,
        }

    def job(self) -> dict:
        return {"op": self.op, "api_url": self.auth.api_url, "contact": self.auth.contact,
                "names": list(self.dom.names), "thumbprint": self.thumbprint,
                "cert_der": self.cert.der if self.cert else None, "prog": self.prog}

    async def run(self, module: str, title: str, args: list[str]) -> bool:
        """Start `python -m module -P title` as the net process and serve
        it; True when it finished its job."""
        child = await proc.spawn(module, title, 0, 0, args)
        code = None
        try:
            await child.chan.send(Imsg.CFG_CONFIG, self.job())
            await child.chan.send(Imsg.CFG_DONE)
            with trio.move_on_after(NET_DEADLINE):
                await self.serve(child)
                code = await child.process.wait()
            if code is None:
                self.warn(f"net process: no result after {NET_DEADLINE:g} seconds")
        finally:
            with trio.CancelScope(shield=True):
                if child.process.returncode is None:
                    child.process.kill()
                    await child.process.wait()
                child.chan.close()
                for token in list(self.tokens):
                    await self.withdraw(token)
                self.tokens.clear()
        return code == 0 and self.done

    async def serve(self, child) -> None:
        while (msg := await child.chan.recv()) is not None:
            handler = self.handlers.get(msg.type)
            if handler is None or not isinstance(msg.payload, dict):
                self.warn(f"net process: unexpected message {msg.type}")   # desynchronized
                child.process.kill()
                return
            try:
                mtype, reply = await handler(msg.payload)
            except (OSError, ValueError, TypeError, KeyError) as e:
                mtype, reply = Imsg.ACME_OK, {"error": str(getattr(e, "strerror", None) or e)}
            if reply.get("error"):
                self.warn(reply["error"])
            await child.chan.send(mtype, reply)

    # -- answers -----------------------------------------------------------------
    async def sign(self, req: dict):
        url = str(req["url"])
        if origin(url) != self.origin:
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
        if not acme_files.valid_token(token):
            raise ValueError(f"invalid token {token!r}")
        if keyauth != f"{token}.{self.thumbprint}":
            raise ValueError(f"{token}: not this account's key authorization")
        await self.publish(token, keyauth)
        self.tokens.add(token)
        return Imsg.ACME_OK, {"error": None}

    async def token_del(self, req: dict):
        token = str(req["token"])
        if not acme_files.valid_token(token):
            raise ValueError(f"invalid token {token!r}")
        await self.withdraw(token)
        self.tokens.discard(token)
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
        info = acme_crypto.cert_info(leaf)
        missing = set(self.dom.names) - set(info.names)
        if missing:
            raise ValueError(f"certificate lacks {', '.join(sorted(missing))}")
        pems = [acme_crypto.cert_pem(c) for c in chain]
        out = {}
        for path, data in ((self.dom.cert, pems[0]), (self.dom.chain, b"".join(pems[1:])),
                           (self.dom.fullchain, b"".join(pems))):
            if path:
                out[path] = (data, acme_files.CERT_MODE)
        acme_files.install(out)
        for path in out:
            self.debug(f"{path}: created")
        self.installed = info
        self.done = True
        return Imsg.ACME_OK, {"error": None}

    async def failed(self, req: dict):
        ra = req.get("retry_after")
        self.error = {"error": str(req.get("error", "")), "type": str(req.get("type", "")),
                      "retry_after": float(ra) if isinstance(ra, (int, float)) else None}
        return Imsg.ACME_OK, {"error": None}
