"""httpd.parent -- the privileged parent: config, sockets, log files,
children, signals.

The parent parses and validates the whole configuration before it binds
anything, binds every listening socket, opens the log files, and starts
its children by re-executing httpd (shared.proc): one `logger` and
`prefork` `server` processes (default: one per core).  Each server gets
the configuration, a descriptor per listening socket and the datagram
socket to the logger, then chroots and drops to the `www` user.

SIGHUP parses the file again into a *new* configuration; if that fails,
every error is logged as `file:line: message` and the old configuration
keeps serving.  On success sockets whose address is unchanged are kept
(never rebound), new ones are bound; a new generation of servers starts
on the new configuration, and once all of it is ready the old generation
stops accepting (CTL_QUIESCE, acknowledged), `parent_reload: configuration
reloaded` is logged -- from then on every new connection is the new
generation's -- and the old servers finish their requests and exit: no
connection is refused or reset by a reload.  SIGUSR1 reopens the log files
and passes the new descriptors to the logger.  SIGTERM/SIGINT: children
drain, the parent logs `parent terminating, pid N` and exits 0.  A child
that dies unexpectedly is logged (`lost child: ...`) and restarted.

Does not serve HTTP itself (httpd.server does, in the children).
"""

from __future__ import annotations

import os
import signal
import socket

import trio

from engine import tls
from engine.listen import bind_tcp, listen
from httpd import acme, parse, server_tls
from httpd.config import HttpdConfig
from httpd.server import SockKey, log_names, logdir_of, socket_groups
from shared import log, proc, sd
from shared.imsg import Imsg
from shared.lexer import ConfigError
from shared.sd import notify

# Seconds connections get to finish on SIGTERM.
STOP_DRAIN = 10.0
# Seconds an old generation gets to finish its requests after a reload.
RELOAD_DRAIN = 600.0
# Seconds a new generation of servers gets to become ready.
READY_TIMEOUT = 30.0
# The unprivileged users, in order of preference.
HTTPD_USERS = ("www", "www-data")
# Session-ticket keys rotate every `ticket lifetime` / this, never faster
# than TICKET_REKEY_MIN seconds; tls.TICKET_KEYS_KEPT old keys still
# decrypt, so a ticket stays good for its whole lifetime.
TICKET_REKEY_DIV = 4
TICKET_REKEY_MIN = 15


def bind_all(conf: HttpdConfig, old: dict[SockKey, socket.socket] | None = None
             ) -> dict[SockKey, socket.socket]:
    """A socket per (addr, port) of `conf`, reusing `old` ones and sockets
    systemd passed (shared.sd, socket activation); raises OSError."""
    old = old or {}
    out: dict[SockKey, socket.socket] = {}
    try:
        for key, servers in socket_groups(conf).items():
            tcp = servers[0].tcp
            if key in old:
                out[key] = old[key]
                # A reload applies a changed `tcp backlog` (listen(2) again).
                listen(old[key], tcp.backlog, inherited=sd.was_inherited(old[key]))
                continue
            inherited = sd.take(key[0], key[1])
            if inherited is not None:
                out[key] = inherited
                listen(inherited, tcp.backlog, inherited=True)
                continue
            out[key] = bind_tcp(key[0], key[1], backlog=tcp.backlog,
                                sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                                ttl=tcp.ip_ttl, minttl=tcp.ip_minttl)
    except OSError:
        for key, s in out.items():
            if key not in old:
                s.close()
        raise
    return out


def open_logs(conf: HttpdConfig) -> dict[str, int]:
    """Open every log file the config names (the parent's job: root, no chroot)."""
    logdir = logdir_of(conf)
    out: dict[str, int] = {}
    for name in log_names(conf):
        path = name if os.path.isabs(name) else os.path.join(logdir, name)
        try:
            out[name] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            log.warn_errno(f"logger: cannot open {path}", e)
    return out


def needs_dac(conf: HttpdConfig, user) -> list[str]:
    """Configured paths `user` could not reach from inside the chroot."""
    if user is None or os.geteuid() != 0:
        return []
    root = conf.chroot.rstrip("/")
    want: list[tuple[str, bool]] = [(conf.chroot, False)]
    for srv in conf.servers:
        for c in (srv, *[loc.conf for loc in srv.locations if loc.conf]):
            want.append((root + c.root, False))
            if c.errdocs:
                want.append((root + c.errdocs, False))
            if c.auth:
                want.append((root + c.auth.htpasswd, False))
            if c.fastcgi and c.fastcgi.socket and c.fastcgi.host is None:
                want.append((root + c.fastcgi.socket, True))
    bad = []
    for path, write in want:
        if path not in bad and not proc.can_reach(path, user, write):
            bad.append(path)
    return bad


class Parent:
    def __init__(self, conf: HttpdConfig, path: str, macros: dict[str, str],
                 verbose: int, debug: bool) -> None:
        self.conf = conf
        self.path = path
        self.macros = macros
        self.verbose = verbose
        self.debug = debug
        self.sockets: dict[SockKey, socket.socket] = {}
        self.logfiles: dict[str, int] = {}
        self.generation = 0
        self.sup: proc.Supervisor | None = None
        self.logsock: tuple[socket.socket, socket.socket] | None = None
        self.user = proc.find_user(HTTPD_USERS) if os.geteuid() == 0 else None
        self.reloading = False
        # TLS files of self.conf (read here, in the parent) and ticket keys.
        self.tls_files: dict = {}
        self.tls_keys: dict[int, bytes] = {}
        self.ticket_keys: list[bytes] = []
        # Built-in ACME (extension): the scheduler, and one reload at a time.
        self.acme = acme.Acme(self)
        self.reload_lock = trio.Lock()
        self._serials: dict[bytes, int] = {}

    def child_args(self) -> list[str]:
        return (["-d"] if self.debug else []) + (["-v"] * self.verbose)

    # -- children's set-up ---------------------------------------------------
    def _server_setup(self, conf: HttpdConfig, sockets: dict[SockKey, socket.socket],
                      tls_files: dict, tls_keys: dict[int, bytes]):
        keep_dac = False
        bad = needs_dac(conf, self.user)
        if bad:
            keep_dac = True
            log.warn(f"user {self.user.pw_name} cannot reach {', '.join(bad)}: "
                     "server processes keep CAP_DAC_OVERRIDE")

        async def setup(child: proc.Child) -> None:
            c = child.chan
            await c.send(Imsg.CFG_CONFIG, {"conf": conf, "keep_dac": keep_dac,
                                           "user": self.user.pw_name if self.user else None,
                                           "tls": tls_files, "acme_tokens": self.acme.tokens})
            for key, sock in sockets.items():
                await c.send(Imsg.CFG_SOCKET, {"key": list(key)}, fd=sock.fileno())
            await c.send(Imsg.CFG_LOGSOCK, None, fd=self.logsock[1].fileno())
            # Private keys go by memfd, never in a message a buffer keeps.
            for sid, key in tls_keys.items():
                fd = tls.key_to_fd(key)
                try:
                    await c.send(Imsg.CFG_TLS_KEY, {"id": sid}, fd=fd)
                finally:
                    os.close(fd)
            if self.ticket_keys:
                await c.send(Imsg.TLS_TICKET_KEYS, {"keys": list(self.ticket_keys)})
            await c.send(Imsg.CFG_DONE)
        return setup

    def _logger_setup(self):
        async def setup(child: proc.Child) -> None:
            c = child.chan
            await c.send(Imsg.CFG_CONFIG, {"chroot": self.conf.chroot,
                                           "user": self.user.pw_name if self.user else None})
            for name, fd in self.logfiles.items():
                await c.send(Imsg.LOG_FILE, {"name": name}, fd=fd)
            await c.send(Imsg.CFG_LOGSOCK, None, fd=self.logsock[0].fileno())
            await c.send(Imsg.CFG_DONE)
        return setup

    def nservers(self, conf: HttpdConfig) -> int:
        return conf.prefork or os.cpu_count() or 1

    async def start_servers(self, conf: HttpdConfig, sockets, tls_files: dict,
                            tls_keys: dict[int, bytes]) -> list[proc.Child]:
        self.generation += 1
        if server_tls.ticket_lifetime(conf) and not self.ticket_keys:
            self.ticket_keys = [tls.new_ticket_key()]
        setup = self._server_setup(conf, sockets, tls_files, tls_keys)
        return [await self.sup.start("server", i, self.generation, setup)
                for i in range(self.nservers(conf))]

    # -- main ----------------------------------------------------------------
    async def run(self) -> int:
        # Signals are caught before the sockets are bound: a client (or a
        # test) may connect, and send SIGHUP, as soon as a port accepts.
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR1,
                                       signal.SIGTERM, signal.SIGINT) as sigs:
            # Certificates and keys are read before anything is bound.
            self.tls_files, self.tls_keys, errors = server_tls.read_files(self.conf)
            if errors:
                for line in errors:
                    log.warn(line)
                return 1
            try:
                self.sockets = bind_all(self.conf)
            except OSError as e:
                log.warn(f"server_privinit: failed to bind: {e.strerror}")
                return 1
            self.logfiles = open_logs(self.conf)
            self.logsock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.logsock[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if os.geteuid() != 0:
                proc.warn_not_sandboxed("httpd")
            async with trio.open_nursery() as nursery:
                self.sup = proc.Supervisor("httpd", self.child_args(), nursery,
                                           on_message=self.child_message)
                logger = await self.sup.start("logger", 0, 0, self._logger_setup())
                servers = await self.start_servers(self.conf, self.sockets,
                                                   self.tls_files, self.tls_keys)
                nursery.start_soon(self._rekey_tickets)
                if not await self.sup.wait_ready([logger, *servers], READY_TIMEOUT):
                    log.warn("parent: children did not start")
                notify("READY=1")
                await nursery.start(self.acme.run)
                await self._signals(sigs)
                nursery.cancel_scope.cancel()
        return 0

    async def _signals(self, sigs) -> None:
        async for sig in sigs:
            if sig == signal.SIGHUP:
                if self.reloading:
                    log.info("parent_reload: reload already in progress")
                    continue
                log.info("parent_sig_handler: reload requested with SIGHUP")
                notify("RELOADING=1")
                await self.reload()
                notify("READY=1")
            elif sig == signal.SIGUSR1:
                log.info("parent_sig_handler: reopening logs")
                await self.reopen_logs()
            else:
                log.info(f"parent terminating, pid {os.getpid()}")
                notify("STOPPING=1")
                self.acme.stop()
                self.sup.stopping = True
                servers = [c for c in self.sup.children if c.title == "server"]
                await self.sup.stop(servers, STOP_DRAIN)
                await self.sup.stop([c for c in self.sup.children], 1.0)
                for s in self.sockets.values():
                    s.close()
                return

    async def reopen_logs(self) -> None:
        old = self.logfiles
        self.logfiles = open_logs(self.conf)
        for lg in self.sup.of("logger"):
            for name, fd in self.logfiles.items():
                await self.sup.send(lg, Imsg.LOG_FILE, {"name": name}, fd=fd)
        for fd in old.values():
            os.close(fd)

    async def reload(self) -> bool:
        try:
            new = parse.load(self.path, self.macros, self.verbose)
        except ConfigError as e:
            for line in e.lines:
                log.warn(line)
            log.warn("parent_reload: configuration failed, keeping the current one")
            return False
        if new.unimplemented:
            for where, what in new.unimplemented:
                log.warn(f"{where}: {what} is not implemented yet")
            log.warn("parent_reload: configuration failed, keeping the current one")
            return False
        self.reloading = True
        try:
            async with self.reload_lock:
                return await self.restart_servers(new, "configuration")
        finally:
            self.reloading = False

    async def reload_certs(self) -> bool:
        """Serve the certificate files as they are now (httpd.acme): the
        reload path with the current configuration."""
        async with self.reload_lock:
            return await self.restart_servers(self.conf, "certificates")

    async def restart_servers(self, new: HttpdConfig, what: str) -> bool:
        """A new generation of servers for `new`; once it is ready the old
        one stops accepting and drains.  False keeps the current one."""
        # Read again even if unchanged: renewed certificates take effect.
        tls_files, tls_keys, errors = server_tls.read_files(new)
        if errors:
            for line in errors:
                log.warn(line)
            log.warn(f"parent_reload: {what} failed, keeping the current one")
            return False
        try:
            sockets = bind_all(new, self.sockets)
        except OSError as e:
            log.warn(f"parent_reload: failed to bind: {e.strerror}; "
                     "keeping the current configuration")
            return False
        old_servers = self.sup.of("server")
        fresh = await self.start_servers(new, sockets, tls_files, tls_keys)
        if not await self.sup.wait_ready(fresh, READY_TIMEOUT):
            log.warn("parent_reload: new servers did not start, keeping the current configuration")
            await self.sup.stop(fresh, 0)
            for key, s in sockets.items():
                if self.sockets.get(key) is not s:
                    s.close()
            return False
        await self.sup.quiesce(old_servers)
        # No server accepts on a removed address any more: its port closes now.
        for key, s in self.sockets.items():
            if sockets.get(key) is not s:
                s.close()
        self.sockets = sockets
        self.conf = new
        self.tls_files, self.tls_keys = tls_files, tls_keys
        await self.reopen_logs()
        log.info(f"parent_reload: {what} reloaded")
        self.acme.update(new)
        self.sup.nursery.start_soon(self.sup.stop, old_servers, RELOAD_DRAIN)
        return True

    def served_serial(self, handle: str) -> int | None:
        """The serial of the certificate the servers have for `handle`."""
        for srv in self.conf.servers:
            f = self.tls_files.get(srv.id)
            if f is not None and srv.tls is not None and srv.tls.acme == handle:
                if f.cert not in self._serials:
                    from shared import acme_crypto
                    self._serials = {f.cert: acme_crypto.split_pem_chain(f.cert)[0].serial_number}
                return self._serials[f.cert]
        return None

    async def child_message(self, child: proc.Child, msg) -> None:
        """What a child may send up besides CTL_READY."""
        if child.title == "server" and msg.type == Imsg.ACME_CHALLENGE_OK:
            self.acme.acked(child.pid, int(msg.payload["seq"]))
        else:
            raise ValueError(f"unexpected message {msg.type}")

    async def _rekey_tickets(self) -> None:
        """parent_tls_ticket_rekey(): a new session-ticket key for every
        server process, every `ticket lifetime` / 4."""
        while True:
            life = server_tls.ticket_lifetime(self.conf)
            if not life:
                await trio.sleep(60)      # a reload may turn tickets on
                continue
            await trio.sleep(max(TICKET_REKEY_MIN, life // TICKET_REKEY_DIV))
            if not server_tls.ticket_lifetime(self.conf):
                continue
            self.ticket_keys = [tls.new_ticket_key(), *self.ticket_keys][:tls.TICKET_KEYS_KEPT + 1]
            await self.sup.broadcast(Imsg.TLS_TICKET_KEYS, {"keys": list(self.ticket_keys)},
                                     title="server")


def run(conf: HttpdConfig, path: str, macros: dict[str, str], verbose: int,
        debug: bool = True) -> int:
    return proc.run_parent(Parent(conf, path, macros, verbose, debug))
