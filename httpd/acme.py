"""httpd.acme -- built-in certificates (extension): the parent's scheduler.

For each acme-client.conf domain a `tls acme "HANDLE"` server names, one
Renewer task in the privileged parent decides when to talk to the CA:
at start when the files are missing (the servers meanwhile serve a
temporary self-signed certificate, httpd.server_tls), then when
shared.acme.renewal_due() says so, plus up to ACME_JITTER of the window.
It holds the account and domain keys and runs shared.acme_main's key
holder with its net process (`httpd -P acme`, shared.acme_net:
unprivileged, chrooted).  http-01 answers go to the server processes in
memory (ACME_CHALLENGE, acknowledged before the CA is told to look), and
they answer them on plain-HTTP sockets (server_http.acme_answer).

New files are installed atomically and served through the parent's reload
path (a new generation of servers; the old one drains), so no connection
is refused or reset.  A failure keeps the old files and backs off
(ACME_BACKOFF_STEPS x the base; at least the CA's Retry-After).

Several instances sharing a certificate directory: issuance runs under
flock(2) on `<certdir>/.<handle>.lock`; the others never order, they
notice the new files (checked every base interval) and reload.

Does not speak ACME (shared.acme) nor HTTP to clients (server_http).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import random
import time

import trio

from httpd.config import (ACME_BACKOFF_STEPS, ACME_BASE, ACME_JITTER, HttpdConfig)
from shared import acme, acme_crypto, acme_main, log
from shared.acme_conf import AuthorityConfig, DomainConfig
from shared.imsg import Imsg

# Seconds the servers get to acknowledge a published challenge answer.
PUBLISH_TIMEOUT = 10.0
# Problem types that mean the CA refuses the configuration itself: retry
# daily at once (mod_md does the same), not after minutes.
CONFIG_REFUSED = ("rejectedIdentifier", "invalidContact", "unsupportedContact",
                  "unsupportedIdentifier", "caa", "externalAccountRequired")


def base_interval() -> float:
    """The back-off base and file-check interval: HTTPD_ACME_BASE or
    ACME_BASE seconds."""
    try:
        return max(0.05, float(os.environ.get("HTTPD_ACME_BASE", ACME_BASE)))
    except ValueError:
        return ACME_BASE


def backoff(failures: int, base: float, retry_after: float | None = None,
            kind: str = "") -> float:
    """Seconds to wait after the `failures`-th failure in a row."""
    if kind in CONFIG_REFUSED:
        failures = len(ACME_BACKOFF_STEPS)
    step = ACME_BACKOFF_STEPS[min(failures, len(ACME_BACKOFF_STEPS)) - 1]
    return max(step * base, retry_after or 0.0)


def handles(conf: HttpdConfig) -> dict[str, tuple[DomainConfig, AuthorityConfig]]:
    """The domains (and their authorities) `tls acme` servers name."""
    out: dict[str, tuple[DomainConfig, AuthorityConfig]] = {}
    if conf.acme is None:
        return out
    for srv in conf.servers:
        if srv.tls is not None and srv.tls.acme and srv.tls.acme not in out:
            dom = conf.acme.domain(srv.tls.acme)
            auth = conf.acme.authority_for(dom) if dom else None
            if dom is not None and auth is not None:
                out[srv.tls.acme] = (dom, auth)
    return out


def read_cert(dom: DomainConfig) -> acme_crypto.CertInfo | None:
    """The leaf of the domain's certificate file; None when missing or
    unreadable."""
    try:
        with open(dom.certfile, "rb") as f:
            return acme_crypto.cert_info(acme_crypto.split_pem_chain(f.read())[0])
    except (OSError, ValueError):
        return None


def needs_issue(dom: DomainConfig, info: acme_crypto.CertInfo | None, now: float) -> bool:
    """No certificate, one for other names, or one inside its renewal window."""
    return info is None or sorted(set(info.names)) != sorted(set(dom.names)) or \
        acme.renewal_due(info.not_before, info.not_after, now)


def describe(info: acme_crypto.CertInfo) -> str:
    when = datetime.datetime.fromtimestamp(info.not_after, datetime.timezone.utc)
    return f"serial {info.serial:x}, expires {when:%Y-%m-%dT%H:%M:%SZ}"


def try_lock(dom: DomainConfig, handle: str) -> int | None:
    """An fd holding flock(2) on `<certdir>/.<handle>.lock`, or None when
    another instance holds it."""
    path = os.path.join(os.path.dirname(dom.certfile) or ".", f".{handle}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class Acme:
    """The parent's ACME state: renewers by handle, published answers."""

    def __init__(self, parent) -> None:
        self.parent = parent               # httpd.parent.Parent
        self.base = base_interval()
        self.tokens: dict[str, list] = {}  # token -> [keyauth, names]: for new servers too
        self.renewers: dict[str, tuple[tuple, trio.CancelScope]] = {}
        self.seq = 0
        self.acks: dict[int, tuple[set[int], trio.Event]] = {}
        self.nursery: trio.Nursery | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.update(self.parent.conf)
            task_status.started()
            await trio.sleep_forever()

    def stop(self) -> None:
        """No more attempts (termination); a net process is killed."""
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def update(self, conf: HttpdConfig) -> None:
        """Follow a (re)loaded configuration: a renewer per domain; one
        whose domain or authority changed starts over."""
        if self.nursery is None or self.nursery.cancel_scope.cancel_called:
            return
        want = handles(conf)
        for handle, (key, scope) in list(self.renewers.items()):
            if want.get(handle) != key:
                scope.cancel()
                del self.renewers[handle]
        for handle, key in want.items():
            if handle not in self.renewers:
                scope = trio.CancelScope()
                self.renewers[handle] = (key, scope)
                self.nursery.start_soon(self._renewer, handle, key[0], key[1], scope)

    async def _renewer(self, handle: str, dom: DomainConfig, auth: AuthorityConfig,
                       scope: trio.CancelScope) -> None:
        with scope:
            await Renewer(self, handle, dom, auth).run()

    # -- challenge answers in the server processes ---------------------------------
    async def publish(self, token: str, keyauth: str, names) -> None:
        self.tokens[token] = [keyauth, list(names)]
        await self._tell({"add": {token: self.tokens[token]}})

    async def withdraw(self, token: str) -> None:
        self.tokens.pop(token, None)
        await self._tell({"del": [token]})

    async def _tell(self, change: dict) -> None:
        """Send a change to every server process; wait (bounded) until each
        has it, so the CA finds the answer wherever it connects."""
        sup = self.parent.sup
        self.seq += 1
        seq = self.seq
        servers = sup.of("server")
        done = trio.Event()
        waiting = {c.pid for c in servers}
        self.acks[seq] = (waiting, done)
        try:
            for c in servers:
                if not await sup.send(c, Imsg.ACME_CHALLENGE, {"seq": seq, **change}):
                    waiting.discard(c.pid)
            if waiting:
                with trio.move_on_after(PUBLISH_TIMEOUT):
                    await done.wait()
        finally:
            del self.acks[seq]

    def acked(self, pid: int, seq: int) -> None:
        """ACME_CHALLENGE_OK from a server process."""
        entry = self.acks.get(seq)
        if entry is None:
            return
        waiting, done = entry
        waiting.discard(pid)
        if not waiting:
            done.set()


class Renewer:
    """One domain's schedule: check, issue or renew, back off, pick up."""

    def __init__(self, acme_: Acme, handle: str, dom: DomainConfig,
                 auth: AuthorityConfig) -> None:
        self.acme = acme_
        self.parent = acme_.parent
        self.handle = handle
        self.dom = dom
        self.auth = auth
        self.failures = 0
        self.jitter: dict[int, float] = {}   # serial -> its random delay
        self.waiting = False                 # logged that another instance holds the lock

    async def run(self) -> None:
        while True:
            try:
                wait = await self.step(time.time())
            except Exception as e:     # a bug must not take the parent down
                log.warn_exc(f"certificate {self.handle}: {e!r}")
                self.failures += 1
                wait = backoff(self.failures, self.acme.base)
            await trio.sleep(wait)

    async def step(self, now: float) -> float:
        """One look at the files; returns the seconds until the next."""
        base = self.acme.base
        info = read_cert(self.dom)
        if info is not None and not needs_issue(self.dom, info, now) and \
                info.serial != self.parent.served_serial(self.handle):
            # Another instance (or acme-client) renewed: serve it.
            log.info(f"certificate {self.handle}: new files, {describe(info)}")
            await self.parent.reload_certs()
        if needs_issue(self.dom, info, now):
            return await self.attempt(info)
        window = acme.renew_window(info.lifetime)
        jitter = self.jitter.setdefault(info.serial, random.uniform(0, ACME_JITTER * window))
        due = info.not_after - window + jitter
        return max(0.0, min(due - now, base))

    async def attempt(self, info: acme_crypto.CertInfo | None) -> float:
        base = self.acme.base
        lock = try_lock(self.dom, self.handle)
        if lock is None:
            if not self.waiting:
                log.info(f"certificate {self.handle}: another instance is renewing, waiting")
            self.waiting = True
            return base
        self.waiting = False
        try:
            # Under the lock, look again: the holder before us may have
            # just installed a new certificate.
            fresh = read_cert(self.dom)
            if fresh is not None and not needs_issue(self.dom, fresh, time.time()):
                return 0.0
            what = "renewal" if info is not None else "issuance"
            log.info(f"certificate {self.handle}: {what}, attempt {self.failures + 1}")
            main = await self._main(info)
            ok = main is not None and await main.run("httpd", "acme", self.parent.child_args())
        finally:
            unlock(lock)
        if ok:
            self.failures = 0
            log.info(f"certificate {self.handle} {'renewed' if info else 'issued'}, "
                     f"{describe(main.installed)}")
            await self.parent.reload_certs()
            return 0.0
        self.failures += 1
        err = (main.error if main is not None else None) or {}
        wait = backoff(self.failures, base, err.get("retry_after"), err.get("type", ""))
        wait *= 1 + random.uniform(0, ACME_JITTER)
        log.warn(f"certificate {self.handle}: {what} failed ({err.get('error') or 'see above'}), "
                 f"keeping the current files; next attempt in {wait:.1f} seconds")
        return wait

    async def _main(self, info) -> acme_main.Main | None:
        try:
            akey, dkey = acme_main.load_keys(self.auth, self.dom, log.verbose)
        except (OSError, ValueError) as e:
            log.warn(f"certificate {self.handle}: {getattr(e, 'filename', None) or 'key'}: "
                     f"{getattr(e, 'strerror', None) or e}")
            return None
        names = self.dom.names

        async def publish(token: str, keyauth: str) -> None:
            await self.acme.publish(token, keyauth, names)

        def warn(msg: str) -> None:
            log.warn(f"certificate {self.handle}: {msg}")
        return acme_main.Main(self.auth, self.dom, "issue", info, akey, dkey, publish,
                              self.acme.withdraw, warn, log.verbose,
                              prog=f"acme {self.handle}")

