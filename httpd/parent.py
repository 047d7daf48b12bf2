"""httpd.parent -- the parent: load config, bind sockets, signals, reload.

The parent parses and validates the whole configuration before it binds
anything, binds every listening socket, and runs the server.  SIGHUP parses
the file again into a *new* configuration; if that fails, every error is
logged as `file:line: message` and the old configuration keeps serving.
On success sockets whose address is unchanged are kept (never rebound), new
ones are bound and removed ones closed.  SIGUSR1 reopens log files;
SIGTERM/SIGINT stop accepting, let connections drain and exit 0.

Does not serve HTTP itself (httpd.server does).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import trio

from engine.listen import bind_tcp
from httpd import parse
from httpd.config import HttpdConfig
from httpd.server import ServerProc, SockKey, socket_groups
from shared import log
from shared.lexer import ConfigError

# Seconds connections get to finish on SIGTERM.
STOP_DRAIN = 10.0


def bind_all(conf: HttpdConfig, old: dict[SockKey, socket.socket] | None = None
             ) -> dict[SockKey, socket.socket]:
    """A socket per (addr, port) of `conf`, reusing `old` ones; raises OSError."""
    old = old or {}
    out: dict[SockKey, socket.socket] = {}
    try:
        for key, servers in socket_groups(conf).items():
            if key in old:
                out[key] = old[key]
                continue
            tcp = servers[0].tcp
            out[key] = bind_tcp(key[0], key[1], backlog=tcp.backlog,
                                sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                                ttl=tcp.ip_ttl, minttl=tcp.ip_minttl)
    except OSError:
        for key, s in out.items():
            if key not in old:
                s.close()
        raise
    return out


class Parent:
    def __init__(self, conf: HttpdConfig, path: str, macros: dict[str, str],
                 verbose: int) -> None:
        self.conf = conf
        self.path = path
        self.macros = macros
        self.verbose = verbose
        self.sockets: dict[SockKey, socket.socket] = {}
        self.proc: ServerProc | None = None

    async def run(self) -> int:
        # Signals are caught before the sockets are bound: a client (or a
        # test) may connect, and send SIGHUP, as soon as a port accepts.
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR1,
                                       signal.SIGTERM, signal.SIGINT) as sigs:
            try:
                self.sockets = bind_all(self.conf)
            except OSError as e:
                log.warn(f"server_privinit: failed to bind: {e.strerror}")
                return 1
            self.proc = ServerProc(self.conf, self.sockets, chrooted=False)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.proc.run)
                notify("READY=1")
                nursery.start_soon(self._signals, sigs, nursery)
        return 0

    async def _signals(self, sigs, nursery: trio.Nursery) -> None:
        async for sig in sigs:
            if sig == signal.SIGHUP:
                log.info("parent_reload: reloading config")
                notify("RELOADING=1")
                self.reload()
                notify("READY=1")
            elif sig == signal.SIGUSR1:
                log.info("parent_sig_handler: reopening logs")
                self.proc.reopen_logs()
            else:
                log.info(f"parent terminating, pid {os.getpid()}")
                notify("STOPPING=1")
                self.proc.stop(STOP_DRAIN)
                for s in self.sockets.values():
                    s.close()
                return

    def reload(self) -> bool:
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
        try:
            sockets = bind_all(new, self.sockets)
        except OSError as e:
            log.warn(f"parent_reload: failed to bind: {e.strerror}; keeping the current configuration")
            return False
        self.proc.configure(new, sockets)
        for key, s in self.sockets.items():
            if sockets.get(key) is not s:
                s.close()
        self.sockets = sockets
        self.conf = new
        log.info("parent_reload: configuration reloaded")
        return True


def notify(state: str) -> None:
    """sd_notify(3) when started by systemd with Type=notify."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        pass


def run(conf: HttpdConfig, path: str, macros: dict[str, str], verbose: int) -> int:
    parent = Parent(conf, path, macros, verbose)
    try:
        return trio.run(parent.run)
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stderr.flush()
