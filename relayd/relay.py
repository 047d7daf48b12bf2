"""relayd.relay -- the relay process: accept, pick a backend, move bytes.

Gets a configuration and the listening sockets the parent bound (one per
relay listen address) and runs engine.serve on them.  Every accepted
connection becomes a Session: a `disable`d relay closes it at once; an
`http` protocol hands it to relay_http.serve(); anything else is a TCP
relay: connect to a backend chosen by the relay's forwards, then
engine.splice.relay() both ways with the session timeout as idle timeout.
When the session ends, close_log() writes the `log connection` line.
Session and RelayState (backend choice, host states) are relay_session's.

Under privilege separation this runs in `prefork` relay processes
(child_main: `relayd -P relay`): each gets the configuration, the current
host states, the listening sockets and the shared counters (relay_shm:
session ids, open sessions, round-robin positions) from the parent, drops
to /var/empty, and then takes HOST_STATUS updates, relayctl commands
(host/table switches, stats, sessions) and a reload's CTL_QUIESCE from the
parent.

Does not parse configs or bind listening sockets (the parent does), and
does not speak HTTP (relay_http does).
"""

from __future__ import annotations

import gc
import os
import resource
import socket
from dataclasses import dataclass

import trio

from engine.conn import CLOSED, SocketTransport, Transport
from engine.serve import Listener, Server
from engine.splice import relay as splice_relay
from relayd import relay_tls               # tls hook: TLS listeners, backends, inspection
from relayd import relay_udp               # dns hook: UDP relays (dns protocol)
from relayd import stats as relay_stats   # control hook: relayctl counters
from relayd.config import Listen, ProtocolConfig, RelayConfig, RelaydConfig
from relayd.errors import BackendError
from relayd.relay_session import DONE_REASONS, RelayState, Session
from shared import log, pledge, proc
from shared.imsg import Channel, Imsg

SockKey = tuple[str, int]

# File descriptors kept free for the parent's and the engine's own use.
FD_RESERVE = 64
# Ceiling of concurrent sessions per process when the fd limit is huge.
RELAY_MAX_SESSIONS = 65536


@dataclass
class RelayCtx:
    """What a listening socket serves: hung on engine.serve's Listener."""
    conf: RelaydConfig
    relay: RelayConfig
    listen: Listen
    proto: ProtocolConfig
    tls: object = None    # tls hook: a relay_tls.ListenTls in relay processes


def listen_sockets(conf: RelaydConfig) -> dict[SockKey, RelayCtx]:
    """Every relay listen address of `conf`, in config order."""
    out: dict[SockKey, RelayCtx] = {}
    for rl in conf.relays:
        proto = conf.protocol_of(rl)
        for lis in rl.listens:
            out.setdefault((lis.addr, lis.port), RelayCtx(conf, rl, lis, proto))
    return out


def socket_rlimit() -> int:
    """Raise the open-files limit to the hard limit (relayd's
    socket_rlimit(-1)); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class RelayProc:
    """One relay process's serving state; see the module docstring."""

    metrics = None   # hce/metrics hook: a relayd.metrics.Metrics when `metrics listen on` is set

    def __init__(self, conf: RelaydConfig, sockets: dict[SockKey, socket.socket],
                 shared=None, instance: int = 0, tls_listens: dict | None = None) -> None:
        self.conf = conf
        self.tls_listens = tls_listens or {}     # tls hook: SockKey -> relay_tls.ListenTls
        self.state = RelayState(conf)
        self.state.shared = shared
        self.instance = instance
        self.stats = relay_stats.Stats(proc=instance)   # control hook: show relays/sessions
        # Sessions ended / ended in error, by relay name (metrics).
        self.ended: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        nofile = socket_rlimit()
        if nofile == resource.RLIM_INFINITY:
            nofile = 2 * RELAY_MAX_SESSIONS
        self.server = Server(self._handle,
                            max_clients=max(16, min(RELAY_MAX_SESSIONS,
                                                    (nofile - FD_RESERVE) // 2)))
        self.listeners: dict[SockKey, Listener] = {}
        self._pending = self._make_listeners(conf, sockets)
        self.udp = relay_udp.relays(conf, sockets, self.state, stats=self.stats,   # dns hook
                                    counters=self)

    @staticmethod
    def _listener(sock: socket.socket, ctx: RelayCtx) -> Listener:
        lt = ctx.tls       # tls hook: handshake first (inspection: after the backend's)
        wrap = lt.accept if lt is not None and lt.server is not None and not lt.inspect else None
        return Listener(sock, ctx=ctx, nodelay=bool(ctx.proto.tcp.nodelay), wrap=wrap)

    def _make_listeners(self, conf: RelaydConfig, sockets: dict[SockKey, socket.socket]
                        ) -> dict[SockKey, Listener]:
        return {key: self._listener(sockets[key], ctx)
                for key, ctx in self._with_tls(listen_sockets(conf)).items() if key in sockets}

    def _with_tls(self, ctxs: dict[SockKey, RelayCtx]) -> dict[SockKey, RelayCtx]:
        for key, ctx in ctxs.items():       # tls hook
            ctx.tls = self.tls_listens.get(key)
        return ctxs

    def _launch(self, conf: RelaydConfig) -> None:
        if self.instance:
            return          # the first relay process of a generation says it
        for rl in conf.relays:
            for fwd in rl.tables:
                inst = fwd.table
                log.info(f"adding {len(inst.hosts)} hosts from table {inst.name}"
                         f"{' (no check)' if inst.check.type == 'none' else ''}")
            for lis in rl.listens:
                log.debug(f"relay_launch: running relay {lis.name or rl.name}")

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); returns once the last session is gone."""
        self._launch(self.conf)
        self.listeners = self._pending
        async with trio.open_nursery() as udp:     # dns hook: one task per dns relay socket
            for u in self.udp:
                await udp.start(u.run)
            await self.server.run(list(self.listeners.values()), task_status=task_status)

    def _goaway(self) -> None:
        for conn in list(self.state.h2conns):
            conn.shutdown()          # two-step GOAWAY; streams in flight finish

    def stop(self, drain: float | None = None) -> None:
        self.state.draining = True
        self._goaway()
        self.server.stop(drain)
        for u in self.udp:      # dns hook
            u.stop(drain)

    async def quiesce(self) -> None:
        """Stop accepting and close the listening descriptors (reload: the
        new generation accepts now); sessions go on."""
        self.state.draining = True
        self._goaway()
        lst = list(self.listeners.values())
        self.listeners = {}
        for u in self.udp:      # dns hook: stop reading; answers still go out
            u.stop()
        await self.server.quiesce(lst)

    def status(self) -> dict:
        """This process's counters (privilege separation: what the parent
        sums over relay processes for `relayctl show relays` and metrics)."""
        names = list(self.stats.relays)
        for rl in self.conf.relays:
            for lis in rl.listens:
                n = lis.name or rl.name
                if n not in names:
                    names.append(n)
        return {"pid": os.getpid(), "instance": self.instance,
                "relays": {n: self.stats.relay(n) for n in names},
                "active": {n: c for n, c in self.state.active.items() if c},
                "ended": dict(self.ended), "errors": dict(self.errors)}

    # -- sessions ----------------------------------------------------------------
    async def _handle(self, client: Transport, lis: Listener) -> None:
        ctx: RelayCtx = lis.ctx
        if ctx.relay.disabled:
            return          # accept, then close at once (the engine closes it)
        session = Session(self.state, ctx.conf, ctx.relay, ctx.listen, ctx.proto, client)
        session.tls = ctx.tls                   # tls hook
        self.state.session_open(session.name)
        self.stats.session_start(session)       # control hook: show relays/sessions
        try:
            if ctx.tls is not None and ctx.tls.inspect:   # tls hook: TLS inspection
                reason = await self._inspect(session)
                if reason is not None:
                    session.close_log(reason)
                    return
            if getattr(session.client, "tls", False):     # tls hook
                log.debug(f"relay {session.name}, tls session {session.id} established "
                          f"({session.active} active)")
            if ctx.proto.type == "http":
                if ctx.proto.http.http2:
                    # `http { http2 }`: HTTP/2 or HTTP/1, chosen once here.
                    from relayd import relay_h2
                    session.server = self.server
                    reason = await relay_h2.serve(session)
                else:
                    from relayd import relay_http
                    reason = await relay_http.serve(session)
            else:
                reason = await self._serve_tcp(session)
            session.close_log(reason)
            error = reason not in DONE_REASONS
            self.ended[session.name] = self.ended.get(session.name, 0) + 1
            if error:
                self.errors[session.name] = self.errors.get(session.name, 0) + 1
            if self.metrics is not None:   # hce/metrics hook (relayd/metrics.py)
                self.metrics.session_done(session.name, error)
        finally:
            self.stats.session_end(session)     # control hook
            self.state.session_close(session.name)
            with trio.CancelScope(shield=True):
                if session.client is not client:      # tls hook: inspection's TLS client
                    try:
                        await session.client.aclose()
                    except Exception:
                        pass
                for backend in session.backends:
                    try:
                        await backend.aclose()
                    except Exception:
                        pass

    async def _inspect(self, session: Session) -> str | None:
        """tls hook: TLS inspection -- connect to the backend first, then
        complete the client handshake with a forged copy of its
        certificate.  None when the session goes on."""
        try:
            backend = await session.connect()
        except BackendError as e:
            return e.msg
        der = backend.peer_certificate() if getattr(backend, "tls", False) else None
        client = await session.tls.accept_inspected(session.client, der)
        if client is None:
            return "TLS handshake error"
        session.client = client
        session.preconnected = backend
        return None

    async def _serve_tcp(self, session: Session) -> str:
        try:
            backend = await session.connect()
        except BackendError as e:
            return e.msg
        client = session.client
        splice = (session.proto.tcp.splice and isinstance(client, SocketTransport)
                  and isinstance(backend, SocketTransport))
        try:
            tun = await splice_relay(client, backend, idle=session.relay.session_timeout,
                                     splice=session.proto.tcp.splice)
        except CLOSED:
            return "done"
        if tun.error == "timeout":
            return "splice timeout" if splice else "buffer event timeout"
        return "done"


# -- the relay process (privilege separation) --------------------------------

# HOST_STATUS states as RelayState.set_host takes them.
HOST_STATES = {"up": True, "down": False, "unknown": None}


def preload(conf: RelaydConfig | None = None) -> None:
    """Import now what would otherwise be imported lazily after the chroot."""
    import encodings.idna  # noqa: F401  (socket.getaddrinfo on str hosts)
    from relayd import relay_http, rules  # noqa: F401
    if conf is not None and any(p.type == "http" and p.http.http2 for p in conf.protocols):
        from relayd import relay_h2  # noqa: F401
    trio.to_thread  # noqa: B018


class BadMessage(Exception):
    """A message the relay process does not know: fatal."""


def apply_command(rp: RelayProc, cmd: dict):
    """A CTL_COMMAND from the parent: the result to send back."""
    what = cmd["cmd"]
    if what == "stats":
        return rp.status()
    if what == "sessions":
        return rp.stats.session_rows()
    if what == "host":
        ids = [int(i) for i in cmd["ids"]]
        for i in ids:
            (rp.state.disabled_hosts.add if cmd["disabled"] else
             rp.state.disabled_hosts.discard)(i)
        return True
    if what == "table":
        disabled = cmd["disabled"]
        rp.state.set_table(int(cmd["id"]), None if disabled is None else bool(disabled))
        return True
    raise BadMessage(f"unknown command {what!r}")


def backend_ports(conf: RelaydConfig) -> tuple[int, ...] | None:
    """The TCP ports relays connect to; None (any) when a relay forwards
    to the original destination (`destination`, `nat lookup`)."""
    ports = set()
    for rl in conf.relays:
        for f in rl.forwards:
            if f.port is None or f.kind not in ("table", "address"):
                return None
            ports.add(f.port)
    return tuple(sorted(ports))


def child_main(fd: int) -> int:
    """`relayd -P relay`: take config and sockets, sandbox, relay."""
    from relayd.relay_shm import Shared
    sock = proc.child_socket(fd)
    setup = proc.recv_setup(sock)
    cfg = setup.config
    conf: RelaydConfig = cfg["conf"]
    sockets = {tuple(m.payload["key"]): socket.socket(fileno=m.fd)
               for m in setup.fds(Imsg.CFG_SOCKET)}
    # tls hook: certificates in the config message; the keys stay in the ca
    # process, asked through our own socket to it.
    ca_socks = setup.fds(Imsg.CFG_CA_SOCK)     # the last one: ca may have restarted meanwhile
    for m in ca_socks[:-1]:
        os.close(m.fd)
    ca = relay_tls.CaClient(socket.socket(fileno=ca_socks[-1].fd) if ca_socks else None)
    tls_listens = relay_tls.build(conf, cfg.get("tls"), ca)
    if any(lt.inspect for lt in tls_listens.values()):
        relay_tls.preload(tls_listens)
    shared = None
    shm = setup.fds(Imsg.CFG_SHM)
    if shm and shm[0].fd >= 0:
        s = cfg["shm"]
        shared = Shared(shm[0].fd, conf, s["names"], s["worker"], s["rr_base"])
    preload(conf)
    socket_rlimit()
    user = proc.find_user((cfg["user"],)) if cfg.get("user") else None
    # `transparent forward` binds the client's address (IP_TRANSPARENT):
    # CAP_NET_RAW is the one capability that takes (OpenBSD: SO_BINDANY
    # sockets made by the parent).
    transparent = any(rl.transparent for rl in conf.relays)
    proc.drop_privileges(cfg.get("chroot"), user,
                         keep_caps=(proc.CAP_NET_RAW,) if transparent else ())
    # OpenBSD: pledge("stdio recvfd inet"); splice and sendfile for the
    # pumps, bind for `transparent forward`; TCP only to backend ports.
    pledge.pledge("relay", ("stdio", "inet", "splice") + (("bind",) if transparent else ()),
                  connect=backend_ports(conf))
    status = [0]

    async def main() -> None:
        rp = RelayProc(conf, sockets, shared=shared, instance=cfg.get("instance", 0),
                       tls_listens=tls_listens)     # tls hook
        rp.state.checks = True      # hosts nobody reported yet are unknown, not up
        for hid, st in (cfg.get("states") or {}).items():
            rp.state.set_host(int(hid), HOST_STATES[st])
        for hid in cfg.get("disabled_hosts") or ():
            rp.state.disabled_hosts.add(int(hid))
        for tid, dis in (cfg.get("tables") or {}).items():
            rp.state.set_table(int(tid), dis)
        # Host states sent while we were set up or starting: applied before
        # the first accept (connections may be waiting in the backlog).
        early = proc.recv_nowait(sock, setup.reader)
        for m in setup.msgs + early:
            if m.type == Imsg.HOST_STATUS:
                rp.state.set_host(int(m.payload["id"]), HOST_STATES[m.payload["state"]])
        setup.reader.leftover.extend(m for m in early if m.type != Imsg.HOST_STATUS)
        chan = Channel(sock, allow_pickle=True, reader=setup.reader)
        async with trio.open_nursery() as nursery:
            await nursery.start(rp.run)
            await chan.send(Imsg.CTL_READY)
            drain = 0.0
            while True:
                msg = await chan.recv()
                if msg is None:             # the parent is gone: stop now
                    break
                try:
                    if msg.type == Imsg.HOST_STATUS:
                        p = msg.payload
                        rp.state.set_host(int(p["id"]), HOST_STATES[p["state"]])
                    elif msg.type == Imsg.CTL_QUIESCE:
                        await rp.quiesce()
                        await chan.send(Imsg.CTL_QUIESCED)
                    elif msg.type == Imsg.CTL_COMMAND:
                        await chan.send(Imsg.CTL_REPLY, {"seq": msg.payload["seq"],
                                                         "result": apply_command(rp, msg.payload)})
                    elif msg.type == Imsg.CTL_VERBOSE:
                        log.set_verbose(int(msg.payload.get("verbose", 0)))
                    elif msg.type == Imsg.CFG_CA_SOCK:      # tls hook: ca was restarted
                        ca.replace(socket.socket(fileno=msg.fd))
                    elif msg.type == Imsg.CTL_STOP:
                        drain = float(msg.payload.get("drain", 0))
                        break
                    else:
                        raise BadMessage(f"unknown message type {msg.type}")
                except (BadMessage, KeyError, TypeError, ValueError, AttributeError) as e:
                    log.warn(f"relay: bad message from the parent: {e!r}")
                    status[0] = 1
                    break
            rp.stop(drain)
            await rp.server.wait_stopped()
            for u in rp.udp:    # dns hook
                await u.wait_stopped()
            if msg is not None and status[0] == 0:
                try:   # what this process counted, for the parent's totals
                    await chan.send(Imsg.RELAY_STATS, {"final": True, **rp.status()})
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            nursery.cancel_scope.cancel()

    # Everything loaded so far (modules, configuration) lives as long as
    # the process: out of the collector's sight, a full collection no
    # longer walks it (it cost ~3 % of the CPU of short connections).
    gc.freeze()
    trio.run(main)
    return status[0]
