"""shared.acme_net -- the unprivileged process that talks to the CA.

Started by a key holder (shared.acme_main) as `python -m acme_client -P net
-S fd` or, for httpd's built-in ACME, `python -m httpd -P acme -S fd`.  It
reads its job (the directory URL, the names, the account's JWK thumbprint,
issue or revoke, the prefix of its log lines), loads the trust store (SSL_CERT_FILE or the system's)
and every module it will need, then chroots to an empty directory and
becomes an unprivileged user.  After that it can reach the network and its
parent, nothing else: it holds no key and opens no file.  Each JWS, host
name lookup (OpenBSD's dnsproc), token file, CSR and the downloaded
certificate is a request to the parent over the socketpair.  A failure
is reported (ACME_ERROR, with any Retry-After) before the process exits 1,
so a scheduler can back off.

The protocol is shared.acme's; this module is its I/O: httpx under trio.
"""

from __future__ import annotations

import os
import socket
import ssl

import httpx
import trio

from shared import acme, log, proc
from shared.acme_crypto import b64url_decode
from shared.imsg import Channel, Imsg

NET_USERS = ("_acme", "nobody")   # who the net process runs as
NET_CHROOT = "/var/empty"         # an empty, root-owned directory

_prefix = "acme-client"           # of every log line (the job's "prog")


def warnx(msg: str) -> None:
    log.warn(f"{_prefix}: {msg}")


def dodbg(msg: str) -> None:
    log.verbose(f"{_prefix}: {msg}")


class ParentRefused(Exception):
    """The parent answered a request with an error (it logged why)."""


class Parent:
    """Requests to the parent, one at a time, each with its answer."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self.lock = trio.Lock()

    async def call(self, mtype: int, payload: dict, answer: int = Imsg.ACME_OK) -> dict:
        async with self.lock:
            await self.chan.send(mtype, payload)
            msg = await self.chan.recv()
        if msg is None:
            raise ParentRefused("parent went away")
        if msg.type == Imsg.ACME_OK and msg.payload.get("error"):
            raise ParentRefused(msg.payload["error"])
        if msg.type != answer:
            raise ParentRefused(f"unexpected answer {msg.type}")
        return msg.payload

    async def sign(self, url: str, nonce: str, payload: dict | None, kid: str | None) -> dict:
        reply = await self.call(Imsg.ACME_SIGN, {"url": url, "nonce": nonce,
                                                 "payload": payload, "kid": kid},
                                Imsg.ACME_SIGNED)
        return reply["jws"]

    async def publish(self, token: str, keyauth: str) -> None:
        await self.call(Imsg.ACME_TOKEN_ADD, {"token": token, "keyauth": keyauth})

    async def unpublish(self, token: str) -> None:
        await self.call(Imsg.ACME_TOKEN_DEL, {"token": token})

    async def csr(self) -> bytes:
        return b64url_decode((await self.call(Imsg.ACME_CSR, {}, Imsg.ACME_CSR))["der"])


class ParentResolver(trio.abc.HostnameResolver):
    """Name lookups done by the parent: no resolv.conf in the chroot.
    (trio answers numeric hosts itself, without asking.)"""

    def __init__(self, parent: Parent) -> None:
        self.parent = parent

    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        if isinstance(host, bytes):
            host = host.decode("ascii")
        if isinstance(port, bytes):
            port = port.decode("ascii")
        reply = await self.parent.call(Imsg.ACME_RESOLVE, {"host": host, "port": port},
                                       Imsg.ACME_RESOLVED)
        if not reply.get("addrs"):
            raise socket.gaierror(socket.EAI_NONAME, reply.get("error") or "no address")
        return [(socket.AddressFamily(f), socket.SocketKind(t), p, c, tuple(sa))
                for f, t, p, c, sa in reply["addrs"]
                if (not family or f == family)]

    async def getnameinfo(self, sockaddr, flags):
        raise socket.gaierror(socket.EAI_NONAME, "not supported")


def _ssl_context() -> ssl.SSLContext:
    # Loaded now, in full: a CA directory (lazy lookups) would be out of
    # reach after the chroot.  SSL_CERT_FILE overrides the system store.
    cafile = os.environ.get("SSL_CERT_FILE") or ssl.get_default_verify_paths().cafile
    return ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()


def _preload() -> None:
    # Everything imported lazily on the first request must be loaded
    # before the chroot: afterwards there is no Python library to read.
    import anyio._backends._trio  # noqa: F401
    import httpcore._backends.anyio  # noqa: F401
    import encodings.idna  # noqa: F401
    "localhost".encode("idna")


def _reason(exc: BaseException) -> str:
    # httpx often wraps the OSError or SSLError that says what happened
    # and has no text of its own.
    e: BaseException | None = exc
    for _ in range(10):
        if e is None:
            break
        if str(e):
            return str(e)
        e = e.__cause__ or e.__context__
    return type(exc).__name__


def net_main(fd: int) -> int:
    """The net process: sandbox, then run the job under trio."""
    global _prefix
    sock = proc.child_socket(fd)
    setup = proc.recv_setup(sock)
    job = setup.config
    _prefix = job.get("prog", _prefix)
    ctx = _ssl_context()
    _preload()
    if os.geteuid() == 0:
        proc.make_empty_dir(NET_CHROOT)
        user = proc.find_user(NET_USERS)
        if user is None:
            warnx(f"no user {' or '.join(NET_USERS)}")
            return 1
        proc.drop_privileges(NET_CHROOT, user)
    return trio.run(_run, sock, setup.reader, job, ctx)


async def _run(sock: socket.socket, reader, job: dict, ctx: ssl.SSLContext) -> int:
    chan = Channel(sock, allow_pickle=True, reader=reader)
    parent = Parent(chan)
    trio.socket.set_custom_hostname_resolver(ParentResolver(parent))
    async with httpx.AsyncClient(verify=ctx, timeout=acme.HTTP_TIMEOUT,
                                 trust_env=False) as http:
        client = acme.AcmeClient(http, job["api_url"], parent.sign, log=dodbg)
        try:
            await client.get_directory()
            await client.account(job["contact"])
            if job["op"] == "revoke":
                await client.revoke(job["cert_der"])
                await parent.call(Imsg.ACME_REVOKED, {})
            else:
                hooks = acme.Hooks(parent.sign, parent.publish, parent.unpublish, parent.csr)
                pem = await client.issue(tuple(job["names"]), job["thumbprint"], hooks)
                await parent.call(Imsg.ACME_CERT, {"pem": pem})
        except acme.AcmeError as e:
            return await _failed(parent, str(e), e.short_type(), e.retry_after)
        except httpx.HTTPError as e:
            url = e.request.url if getattr(e, "_request", None) is not None else job["api_url"]
            return await _failed(parent, f"{url}: {_reason(e)}")
        except ParentRefused:
            return 1                     # the parent said why
        except ValueError as e:          # JSON the CA sent that is not JSON
            return await _failed(parent, f"{job['api_url']}: bad answer: {e}")
    return 0


async def _failed(parent: Parent, msg: str, kind: str = "",
                  retry_after: float | None = None) -> int:
    warnx(msg)
    try:
        await parent.call(Imsg.ACME_ERROR, {"error": msg, "type": kind,
                                            "retry_after": retry_after})
    except (ParentRefused, OSError, trio.BrokenResourceError):
        pass
    return 1
