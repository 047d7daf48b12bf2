"""relayd.parent -- the parent: bind relay sockets, signals, reload.

The parent gets a parsed, validated configuration, binds one listening
socket per relay listen address with the protocol's `tcp` options (backlog,
socket buffer, ip ttl, ip minttl), and runs the relay process logic
(in-process until privilege separation lands).  SIGHUP parses the file again
into a *new* configuration; on failure every error is logged as
`file:line: message` and the old configuration keeps running.  On success,
sockets whose address is unchanged are kept (never rebound), new ones are
bound and removed ones closed; sessions in flight go on under the
configuration they started with (OpenBSD drops them; see style.md §3.4).
SIGTERM/SIGINT log `parent terminating, pid N`, stop accepting, let
sessions drain and exit 0.  SIGUSR1 is ignored, as in OpenBSD.

Does not relay anything itself (relayd.relay does).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import trio

from engine.listen import bind_tcp, set_options
from relayd import hce, metrics  # hce hook: health checks, metrics exporter
from relayd import control  # control hook: the relayctl socket
from relayd import pfe as pfe_mod  # pfe hook: redirections, routers, carp demotion
from relayd import parse
from relayd.config import RELAYD_SOCKET, RelaydConfig  # control hook: RELAYD_SOCKET
from relayd.relay import RelayProc, SockKey, listen_sockets
from shared import log
from shared.lexer import ConfigError

# Seconds sessions get to finish on SIGTERM/SIGINT.
STOP_DRAIN = 5.0


def bind_all(conf: RelaydConfig, old: dict[SockKey, socket.socket] | None = None
             ) -> dict[SockKey, socket.socket]:
    """A listening socket per relay (addr, port) of `conf`, reusing `old`
    ones (their options are updated); raises OSError."""
    old = old or {}
    out: dict[SockKey, socket.socket] = {}
    try:
        for key, ctx in listen_sockets(conf).items():
            tcp = ctx.proto.tcp
            if key in old:
                sock = out[key] = old[key]
                try:
                    set_options(sock, sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                                ttl=tcp.ip_ttl, minttl=tcp.ip_minttl)
                    sock.listen(tcp.backlog)
                except OSError:
                    pass
                continue
            out[key] = bind_tcp(key[0], key[1], backlog=tcp.backlog,
                                sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                                ttl=tcp.ip_ttl, minttl=tcp.ip_minttl)
    except OSError as e:
        for key, s in out.items():
            if key not in old:
                s.close()
        e.relay_key = key   # type: ignore[attr-defined]
        raise
    return out


def _bind_error(e: OSError) -> str:
    key = getattr(e, "relay_key", None)
    where = f" {key[0]}:{key[1]}" if key else ""
    return f"relay_privinit: failed to bind{where}: {e.strerror or e}"


class Parent:
    # -- hce hook: health checks (relayd/hce.py) and metrics (relayd/metrics.py)
    hce: hce.Hce | None = None
    metrics: metrics.Metrics | None = None
    _health_scope: trio.CancelScope | None = None

    async def _health(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run hce (feeding the relay state) and the metrics exporter until
        _health_scope is cancelled.  In-process until privilege separation
        lands; then hce becomes its own process sending HOST_STATUS."""
        with trio.CancelScope() as self._health_scope:
            async with trio.open_nursery() as nursery:
                self.proc.state.checks = True    # unreported hosts are unknown, not up
                self.hce = await nursery.start(hce.run, self.conf,
                                               self._pfe_notify(  # pfe hook
                                                   hce.relay_notify(self.proc.state)))
                if self.conf.metrics is not None:
                    self.metrics = metrics.Metrics()
                    self.metrics.attach_hce(self.hce)
                    self.metrics.attach_relay(self.proc.state)
                    self.proc.metrics = self.metrics
                    await nursery.start(metrics.serve_metrics, self.conf.metrics, self.metrics)
                task_status.started()
    # -- end of hce hook

    # -- pfe hook: redirections (nftables), routers (netlink), carp demotion
    # (keepalived track files): relayd/pfe.py.  Moves into the pfe process
    # (the one keeping CAP_NET_ADMIN) with privilege separation: there the
    # HOST_STATUS imsgs from hce feed pfe.notify().
    pfe: pfe_mod.Pfe | None = None
    _pfe_scope: trio.CancelScope | None = None

    async def _pfe(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run pfe until _pfe_scope is cancelled; on the way out it deletes
        table inet relayd and its routes and undoes its demotions.  Touches
        nothing for a configuration without redirects, routers or demote."""
        with trio.CancelScope() as self._pfe_scope:
            async with trio.open_nursery() as nursery:
                self.pfe = await nursery.start(pfe_mod.Pfe(self.conf).run)
                task_status.started()

    def _pfe_notify(self, inner):
        """hce's notify callback, teed into pfe (host states in order)."""
        def notify(host_id, state) -> None:
            inner(host_id, state)
            if self.pfe is not None:
                self.pfe.notify(host_id, state)
        return notify
    # -- end of pfe hook

    # -- control hook: the relayctl control socket (relayd/control.py)
    control_sock: socket.socket | None = None
    _control_scope: trio.CancelScope | None = None

    def _control_open(self) -> bool:
        """Create the socket; False (do not start) when a configured `socket`
        cannot be had.  The default path only warns: several daemons (tests,
        non-root runs) may share it, the first one wins."""
        try:
            self.control_sock = control.open_socket(self.conf.socket)
        except control.ControlError as e:
            if self.conf.socket == RELAYD_SOCKET:
                log.warn(f"{e}; running without a control socket")
                return True
            log.warn(str(e))
            log.warn("control socket setup failed")
            return False
        return True

    async def _control(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Answer relayctl until _control_scope is cancelled (in-process
        backend until privilege separation moves the socket to pfe)."""
        if self.control_sock is None:
            task_status.started()
            return
        with trio.CancelScope() as self._control_scope:
            await control.serve(self.control_sock, control.InProcessBackend(self),
                                task_status=task_status)
    # -- end of control hook

    def __init__(self, conf: RelaydConfig, path: str, macros: dict[str, str],
                 verbose: int) -> None:
        self.conf = conf
        self.path = path
        self.macros = macros
        self.verbose = verbose
        self.sockets: dict[SockKey, socket.socket] = {}
        self.proc: RelayProc | None = None

    async def run(self) -> int:
        if not self._control_open():           # control hook
            return 1
        try:
            self.sockets = bind_all(self.conf)
        except OSError as e:
            log.warn(_bind_error(e))
            if self.control_sock is not None:         # control hook
                control.close_socket(self.control_sock)
            return 1
        log.info("startup")
        self.proc = RelayProc(self.conf, self.sockets)
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR1,
                                       signal.SIGTERM, signal.SIGINT) as sigs:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.proc.run)
                await nursery.start(self._pfe)      # pfe hook (before hce: it gets its reports)
                await nursery.start(self._health)   # hce hook
                await nursery.start(self._control)  # control hook
                notify("READY=1")
                nursery.start_soon(self._signals, sigs)
        return 0

    async def _signals(self, sigs) -> None:
        async for sig in sigs:
            if sig == signal.SIGHUP:
                log.info("parent_sig_handler: reload requested with SIGHUP")
                notify("RELOADING=1")
                self.reload()
                notify("READY=1")
            elif sig == signal.SIGUSR1:
                pass
            else:
                log.info(f"parent terminating, pid {os.getpid()}")
                notify("STOPPING=1")
                self.proc.stop(STOP_DRAIN)
                if self._health_scope is not None:   # hce hook
                    self._health_scope.cancel()
                if self._pfe_scope is not None:      # pfe hook: removes table and routes
                    self._pfe_scope.cancel()
                if self._control_scope is not None:  # control hook
                    self._control_scope.cancel()
                for s in self.sockets.values():
                    s.close()
                return

    def reload(self, path: str | None = None) -> bool:
        """Load the file again (`relayctl load`: `path`, this once); switch
        to it only if it is valid."""
        try:
            new = parse.load(path or self.path, self.macros, self.verbose)  # control hook: path
        except ConfigError as e:
            for line in e.lines:
                log.warn(line)
            log.warn("parent_reload: configuration failed, keeping the current one")
            return False
        for line in new.warnings:
            log.warn(line)
        if new.unimplemented:
            for where, what in new.unimplemented:
                log.warn(f"{where}: {what} is not implemented yet")
            log.warn("parent_reload: configuration failed, keeping the current one")
            return False
        try:
            sockets = bind_all(new, self.sockets)
        except OSError as e:
            log.warn(_bind_error(e) + "; keeping the current configuration")
            return False
        self.proc.configure(new, sockets)
        if self.pfe is not None:   # pfe hook: queued before hce's reports with the new ids
            self.pfe.reload_soon(new)
        if self.hce is not None:   # hce hook: keep host states, new ids
            self.hce.reload(new)
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


def run(conf: RelaydConfig, path: str, macros: dict[str, str], verbose: int) -> int:
    parent = Parent(conf, path, macros, verbose)
    try:
        return trio.run(parent.run)
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stderr.flush()
