"""httpd.server -- the server process: serve the configured sites.

Gets a configuration and the listening sockets the parent bound, groups the
servers by socket (name-based virtual hosts share one), and runs
engine.serve on each: server_http.serve_client, or server_h2.serve_h2 for a
connection that speaks HTTP/2 (`listen ... http2`).  A reload is a new
generation of server processes (httpd.parent): quiesce() stops this one
accepting, stop() lets its connections finish on the configuration they
started with.

Does not parse configs or bind sockets (that is the parent's job).
"""

from __future__ import annotations

import gc
import socket

import trio

from engine import tls
from engine.serve import Listener, Server
from httpd import logger, server_h2, server_http, server_tls
from httpd.config import SERVER_MAX_CLIENTS, HttpdConfig, ServerConfig
from shared import log, pledge, proc
from shared.imsg import Channel, Imsg

SockKey = tuple[str, int]
# ALPN offers of a TLS socket with and without `http2`.
ALPN_H2 = ("h2", "http/1.1")
ALPN_H1 = ("http/1.1",)


def socket_groups(conf: HttpdConfig) -> dict[SockKey, list[ServerConfig]]:
    """Servers by listening (addr, port), in config order."""
    groups: dict[SockKey, list[ServerConfig]] = {}
    for srv in conf.servers:
        for lis in srv.listens:
            lst = groups.setdefault((lis.addr, lis.port), [])
            if srv not in lst:
                lst.append(srv)
    return groups


def log_names(conf: HttpdConfig) -> list[str]:
    names: list[str] = []
    for srv in conf.servers:
        for c in (srv, *[loc.conf for loc in srv.locations if loc.conf]):
            if c.log.enabled and not c.log.syslog:
                for n in (c.log.access, c.log.error):
                    if n not in names:
                        names.append(n)
    return names


def logdir_of(conf: HttpdConfig, chrooted: bool = False) -> str:
    if conf.logdir:
        return conf.logdir
    return ("" if chrooted else conf.chroot.rstrip("/")) + "/logs"


class ServerProc:
    """One server process's serving state; see the module docstring."""

    def __init__(self, conf: HttpdConfig, sockets: dict[SockKey, socket.socket],
                 chrooted: bool = False, logs=None, tls_files=None) -> None:
        self.conf = conf
        self.chrooted = chrooted
        # (ServerFiles by server id, keys by server id) from the parent.
        self.tls_files = tls_files or ({}, {})
        prefix = "" if chrooted else conf.chroot.rstrip("/")
        if logs is None:
            logs = logger.Logs(logdir_of(conf, chrooted))
        self.worker = server_http.Worker(prefix=prefix, logs=logs)
        try:
            from httpd import server_fcgi
            self.worker.fcgi = server_fcgi
        except ImportError:
            pass
        self.server = Server(self._handle, max_clients=SERVER_MAX_CLIENTS,
                             on_full=self.worker.evict_reader)
        self.listeners: dict[SockKey, Listener] = {}
        self._pending = self._make_listeners(conf, sockets)
        # Log files exist as soon as the ports accept (right after binding).
        self.worker.logs.open_all(log_names(conf))

    def _ctx(self, conf: HttpdConfig, key: SockKey, servers: list[ServerConfig]):
        mine = [l for s in servers for l in s.listens if (l.addr, l.port) == key]
        tls = any(l.tls for l in mine)
        # `http2` on any `listen` of the socket turns it on for the socket.
        h2 = server_h2.limits(servers[0].connection) if any(l.http2 for l in mine) else None
        return server_http.ListenCtx(gconf=conf, servers=servers, port=key[1], tls=tls, h2=h2)

    def _wrap(self, ctx: server_http.ListenCtx):
        """The TLS handshake hook of a TLS socket's Listener, else None."""
        if not ctx.tls:
            return None
        files, keys = self.tls_files
        try:
            lt = server_tls.ListenTls(ctx.servers, files, keys,
                                      alpn=ALPN_H2 if ctx.h2 is not None else ALPN_H1)
            ctx.tls_contexts.update(lt.contexts)
            return lt.accept
        except tls.TlsError as e:
            log.warn(f"server_tls_init: server {ctx.servers[0].name}: {e}")
            return _refuse

    def _make_listeners(self, conf: HttpdConfig, sockets: dict[SockKey, socket.socket]
                        ) -> dict[SockKey, Listener]:
        out = {}
        groups = socket_groups(conf)
        for key, servers in groups.items():
            sock = sockets.get(key)
            if sock is None:
                continue
            ctx = self._ctx(conf, key, servers)
            out[key] = Listener(sock, ctx=ctx, wrap=self._wrap(ctx))
        self._wipe_keys()
        return out

    def _wipe_keys(self) -> None:
        # Only now: every TLS socket (`*` is two, each `listen on` line
        # one) has built its contexts from these bytes.
        tls.wipe(self.tls_files[1].values())

    async def _handle(self, transport, lis: Listener) -> None:
        ctx = lis.ctx
        if ctx.h2 is not None and await server_h2.wants_h2(transport, ctx):
            await server_h2.serve_h2(transport, ctx, self.worker)
        else:
            await server_http.serve_client(transport, ctx, self.worker)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        for key in self._pending:
            srv = self._pending[key].ctx.servers[0]
            log.debug(f"server_launch: running server {srv.name}")
        self.listeners = self._pending
        await self.server.run(list(self.listeners.values()), task_status=task_status)

    def reopen_logs(self) -> None:
        self.worker.logs.reopen()
        self.worker.logs.open_all(log_names(self.conf))

    def _drain(self) -> None:
        self.worker.draining = True
        for conn in list(self.worker.h2conns):
            conn.shutdown()          # two-step GOAWAY; streams in flight finish

    async def quiesce(self) -> None:
        """Reload, old generation: stop accepting and close the listening
        descriptors (the new generation accepts now); connections go on
        until stop()."""
        self._drain()
        lst = list(self.listeners.values())
        self.listeners = {}
        await self.server.quiesce(lst)

    def stop(self, drain: float | None = None) -> None:
        self._drain()
        self.server.stop(drain)


async def _refuse(sock, lis) -> None:
    """wrap hook of a TLS socket without a usable keypair: close."""
    return None


# -- the server process (privilege separation) -------------------------------

def set_acme_tokens(worker: server_http.Worker, change: dict) -> None:
    """Apply an ACME_CHALLENGE change: {"add": {token: [keyauth, names]},
    "del": [token]} (httpd.acme publishes them)."""
    for token, (keyauth, names) in (change.get("add") or {}).items():
        worker.acme_tokens[token] = (keyauth, frozenset(n.lower() for n in names))
    for token in change.get("del") or ():
        worker.acme_tokens.pop(token, None)


def preload() -> None:
    """Import now what would otherwise be imported lazily after the chroot."""
    import encodings.idna  # noqa: F401  (socket.getaddrinfo on str hosts)
    import bcrypt  # noqa: F401
    from httpd import auth, fcgi, server_fcgi, server_file  # noqa: F401
    # engine.tls, imported above, has found libssl and set OpenSSL up
    # (configuration file, providers) while the files are still in reach.
    trio.to_thread  # noqa: B018


def fcgi_ports(conf: HttpdConfig) -> tuple[int, ...]:
    """The TCP ports of `fastcgi socket tcp ...` (what a server may connect to)."""
    fcgis = [c.fastcgi for srv in conf.servers
             for c in (srv, *[loc.conf for loc in srv.locations if loc.conf])]
    return tuple(sorted({f.port for f in fcgis if f is not None and f.socket is None}))


def child_main(fd: int) -> int:
    """`httpd -P server`: take config and sockets, sandbox, serve."""
    sock = proc.child_socket(fd)
    setup = proc.recv_setup(sock)
    cfg = setup.config
    conf: HttpdConfig = cfg["conf"]
    sockets = {tuple(m.payload["key"]): socket.socket(fileno=m.fd) for m in setup.fds(Imsg.CFG_SOCKET)}
    logfd = setup.fds(Imsg.CFG_LOGSOCK)[0].fd
    # TLS: certificates in the config message, each key from its memfd.
    tls_keys = {m.payload["id"]: tls.key_from_fd(m.fd) for m in setup.fds(Imsg.CFG_TLS_KEY)}
    for m in setup.fds(Imsg.TLS_TICKET_KEYS):
        tls.set_ticket_keys(m.payload["keys"])
    preload()
    user = proc.find_user((cfg["user"],)) if cfg.get("user") else None
    chrooted = proc.drop_privileges(conf.chroot, user, keep_dac=cfg.get("keep_dac", False))
    logs = logger.LogSender(socket.socket(fileno=logfd))
    # OpenBSD: pledge("stdio rpath inet unix recvfd"); the docroots (the
    # chroot) read-only, TCP only to FastCGI ports.
    pledge.pledge("server", ("stdio", "rpath", "inet", "unix", "sendfile"),
                  read=("/",) if chrooted else (conf.chroot,), connect=fcgi_ports(conf))

    async def main() -> None:
        chan = Channel(sock, allow_pickle=True, reader=setup.reader)
        sp = ServerProc(conf, sockets, chrooted=chrooted, logs=logs,
                        tls_files=(cfg.get("tls") or {}, tls_keys))
        set_acme_tokens(sp.worker, {"add": cfg.get("acme_tokens") or {}})
        async with trio.open_nursery() as nursery:
            await nursery.start(sp.run)
            nursery.start_soon(logs.flusher)
            await chan.send(Imsg.CTL_READY)
            while True:
                msg = await chan.recv()
                if msg is None:             # the parent is gone: drain and exit
                    sp.stop(0)
                    break
                if msg.type == Imsg.CTL_STOP:
                    sp.stop(float(msg.payload.get("drain", 0)))
                    break
                if msg.type == Imsg.CTL_QUIESCE:
                    await sp.quiesce()
                    await chan.send(Imsg.CTL_QUIESCED)
                elif msg.type == Imsg.CTL_VERBOSE:
                    log.set_verbose(int(msg.payload.get("verbose", 0)))
                elif msg.type == Imsg.TLS_TICKET_KEYS:
                    tls.set_ticket_keys(msg.payload["keys"])
                    log.debug("server_tls_ticket_rekey: new session ticket key")
                elif msg.type == Imsg.ACME_CHALLENGE:
                    set_acme_tokens(sp.worker, msg.payload)
                    await chan.send(Imsg.ACME_CHALLENGE_OK, {"seq": msg.payload["seq"]})
            await sp.server.wait_stopped()
            nursery.cancel_scope.cancel()

    # Everything loaded so far (modules, configuration) lives as long as
    # the process: out of the collector's sight, a full collection no
    # longer walks it (it cost ~3 % of the CPU of short connections).
    gc.freeze()
    trio.run(main)
    return 0
