"""acme_client.parent -- the privileged main process of acme-client.

Decides whether there is anything to do (the certificate file: names,
renewal window, -F, -r), then runs shared.acme_main's key holder with its
net process (shared.acme_net, unprivileged and chrooted): http-01 answers
are token files in the challenge directory, and a revocation removes the
certificate files.

Exit status as OpenBSD's: 0 changed, 2 nothing to do, 1 error.  Every file
is replaced atomically (shared.acme_files); a failed run leaves existing
files as they were.
"""

from __future__ import annotations

import math
import os
import time

import trio

from acme_client import dodbg, warnx
from shared import acme, acme_crypto, acme_main, proc
from shared import acme_files as files
from shared.acme_conf import AuthorityConfig, DomainConfig
from shared.imsg import Imsg

EXIT_CHANGED, EXIT_ERROR, EXIT_UNCHANGED = 0, 1, 2


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


class Main(acme_main.Main):
    """One acme-client run: token files in the challenge directory, and
    revocation."""

    def __init__(self, auth: AuthorityConfig, dom: DomainConfig, op: str,
                 cert: acme_crypto.CertInfo | None, account_key, domain_key,
                 verbose: int = 0) -> None:
        super().__init__(auth, dom, op, cert, account_key, domain_key,
                         self.write_token, self.remove_token, warnx, dodbg)
        self.verbose = verbose
        self.handlers[Imsg.ACME_REVOKED] = self.revoked

    async def write_token(self, token: str, keyauth: str) -> None:
        files.write_token(self.dom.challengedir, token, keyauth)
        dodbg(f"{files.token_path(self.dom.challengedir, token)}: created")

    async def remove_token(self, token: str) -> None:
        files.remove_token(self.dom.challengedir, token)
        dodbg(f"{files.token_path(self.dom.challengedir, token)}: unlinked")

    async def main(self) -> int:
        ok = await self.run("acme_client", "net", ["-v"] * self.verbose)
        return EXIT_CHANGED if ok else EXIT_ERROR

    async def revoked(self, req: dict):
        if self.op != "revoke":
            raise ValueError("no certificate is being revoked")
        for path in files.remove([p for p in (self.dom.cert, self.dom.chain,
                                              self.dom.fullchain) if p]):
            dodbg(f"{path}: unlinked")
        self.done = True
        return Imsg.ACME_OK, {"error": None}


def run(auth: AuthorityConfig, dom: DomainConfig, force: bool, revoke: bool,
        verbose: int) -> int:
    """Everything after the command line: plan, keys, net process."""
    planned = plan(dom, force, revoke)
    if isinstance(planned, int):
        return planned
    op, cert = planned
    try:
        account_key, domain_key = acme_main.load_keys(auth, dom, dodbg)
    except (OSError, ValueError) as e:
        warnx(f"{getattr(e, 'filename', None) or 'key'}: {getattr(e, 'strerror', None) or e}")
        return EXIT_ERROR
    if os.geteuid() != 0:
        proc.warn_not_sandboxed("acme-client")
    main = Main(auth, dom, op, cert, account_key, domain_key, verbose)
    return trio.run(main.main)
