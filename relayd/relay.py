"""relayd.relay -- the relay process: accept, pick a backend, move bytes.

Gets a configuration and the listening sockets the parent bound (one per
relay listen address) and runs engine.serve on them.  Every accepted
connection becomes a Session: a `disable`d relay closes it at once; an
`http` protocol hands it to relay_http.serve(); anything else is a TCP
relay: connect to a backend chosen by the relay's forwards, then
engine.splice.relay() both ways with the session timeout as idle timeout.
When the session ends, close_log() writes the `log connection` line.

Backend choice (relay.c's relay_connect/relay_from_table): the relay's
table forwards in order -- the main table, then each backup table when no
host of the previous one is up -- then its address forward.  As an
extension, a table whose chosen host cannot be connected to (after the
host's `retry` attempts) also falls over to the next forward: without
health checks a dead host is never "down", and a client is better served by
the backup table than by a closed connection.

RelayState holds what a relay process learns at run time: host states
(health checks report them later; until then every host counts as up),
round-robin positions, session ids and per-relay session counts.

Under privilege separation this runs in `prefork` relay processes
(child_main: `relayd -P relay`): each gets the configuration, the current
host states, the listening sockets and the shared counters (relay_shm:
session ids, open sessions, round-robin positions) from the parent, drops
to /var/empty, and then takes HOST_STATUS updates and relayctl commands
(host/table switches, stats, sessions, quiesce) from the parent.

Does not parse configs or bind listening sockets (the parent does), and
does not speak HTTP (relay_http does).
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import os
import resource
import socket
import time
from dataclasses import dataclass

import trio

from engine.conn import CLOSED, SocketTransport, Transport
from engine.listen import set_options, set_transparent
from engine.serve import Listener, Server
from engine.splice import relay as splice_relay
from relayd import balance
from relayd import relay_tls               # tls hook: TLS listeners, backends, inspection
from relayd import relay_udp               # dns hook: UDP relays (dns protocol)
from relayd import stats as relay_stats   # control hook: relayctl counters
from relayd.config import (ForwardConfig, Listen, ProtocolConfig, RelayConfig,
                           RelaydConfig, TableInstance)
from relayd.errors import BackendError  # noqa: F401  (re-exported: relay_udp, tests)
from shared import log, pledge, proc
from shared.imsg import Channel, Imsg

SockKey = tuple[str, int]

# Pause between two connect attempts of one session (`retry n`); OpenBSD
# retries at once, which a backend that is just coming up never survives.
RELAY_RETRY_PAUSE = 1.0
# Close reasons of sessions that ended normally (relay_close(..., 0)).
DONE_REASONS = frozenset({"done", "last write (done)", "last read (done)"})
# File descriptors kept free for the parent's and the engine's own use.
FD_RESERVE = 64
# Ceiling of concurrent sessions per process when the fd limit is huge.
RELAY_MAX_SESSIONS = 65536


class RelayState:
    """Run-time state of one relay process: host states, round-robin
    positions, session ids, sessions open per relay."""

    def __init__(self, conf: RelaydConfig | None = None) -> None:
        # True once health checks report host states; until then a host that
        # was never reported counts as up.
        self.checks = False
        self.last_id = 0
        self.active: dict[str, int] = {}
        self._up: dict[int, bool | None] = {}
        self._rr: dict[tuple[int, int], balance.RoundRobin] = {}
        self._tables: dict[int, TableInstance] = {}   # host id -> its instance
        self._names: dict[int, str] = {}
        self._table_disabled: dict[int, bool] = {}    # relayctl table disable/enable
        self.disabled_hosts: set[int] = set()   # control hook: relayctl host disable
        # Stopping (or an old generation after a reload): HTTP sessions
        # answer the request in progress with `Connection: close`.
        self.draining = False
        # HTTP/2 client connections (relay_h2): GOAWAY when stopping.
        self.h2conns: set = set()
        # Under privilege separation: the counters every relay process
        # shares (relay_shm.Shared); None in a single process.
        self.shared = None
        if conf is not None:
            self.configure(conf)

    def configure(self, conf: RelaydConfig) -> None:
        """Adopt a new configuration; host states carry over by
        (table instance name, host name), round-robin positions are reset."""
        old = {(self._tables[h].name, self._names[h]): up for h, up in self._up.items()
               if h in self._tables}
        self._up, self._tables, self._names, self._rr = {}, {}, {}, {}
        self._table_disabled = {}
        self.disabled_hosts = set()             # control hook: the new file decides
        for inst in conf.instances:
            for host in inst.hosts:
                self._tables[host.id] = inst
                self._names[host.id] = host.name
                self._up[host.id] = old.get((inst.name, host.name))

    def host_up(self, host_id: int) -> bool:
        """May a session be sent to this host right now?"""
        if host_id in self.disabled_hosts:      # control hook: relayctl host disable
            return False
        inst = self._tables.get(host_id)
        if inst is not None:
            if self._table_disabled.get(inst.id, inst.disabled):
                return False
            if inst.check.type == "none":
                return True
        up = self._up.get(host_id)      # hce reports `parent N` hosts itself
        if up is None:
            return not self.checks
        return up

    def set_host(self, host_id: int, up: bool | None) -> None:
        """Record a host's state (True up, False down, None unknown)."""
        self._up[host_id] = up

    def set_table(self, table_id: int, disabled: bool | None) -> None:
        """Disable or enable a table instance at run time (None: as configured)."""
        if disabled is None:
            self._table_disabled.pop(table_id, None)
        else:
            self._table_disabled[table_id] = disabled

    def roundrobin(self, relay_id: int, table_id: int) -> balance.RoundRobin:
        if self.shared is not None:
            rr = self.shared.roundrobin(relay_id, table_id)
            if rr is not None:
                return rr
        return self._rr.setdefault((relay_id, table_id), balance.RoundRobin())

    def locked(self):
        """Hold while a round-robin position is read and moved."""
        return self.shared.locked() if self.shared is not None else contextlib.nullcontext()

    def next_id(self) -> int:
        if self.shared is not None:
            self.last_id = self.shared.next_id()
            return self.last_id
        self.last_id += 1
        return self.last_id

    def session_open(self, name: str) -> None:
        self.active[name] = self.active.get(name, 0) + 1
        if self.shared is not None:
            self.shared.open(name, 1)

    def session_close(self, name: str) -> None:
        self.active[name] -= 1
        if self.shared is not None:
            self.shared.open(name, -1)

    def active_count(self, name: str) -> int:
        """Sessions open on relay `name` (in every relay process)."""
        if self.shared is not None:
            n = self.shared.active(name)
            if n is not None:
                return n
        return self.active.get(name, 0)


class Session:
    """One client connection to a relay, from accept to close_log()."""

    def __init__(self, state: RelayState, conf: RelaydConfig, relay: RelayConfig,
                 listen: Listen, proto: ProtocolConfig, client: Transport) -> None:
        self.id = state.next_id()
        self.state = state
        self.conf = conf
        self.relay = relay
        self.listen = listen
        self.name = listen.name or relay.name      # clones: "<name><id>:<port>"
        self.proto = proto
        self.client = client
        self.tag: str | None = None
        self.label: str | None = None
        self.log_items: list[str] = []
        self.backend: tuple[str, int] | None = None
        self.started = time.monotonic()
        self.backends: list[Transport] = []       # closed by the dispatcher
        self._logged = False
        self.tls: relay_tls.ListenTls | None = None   # tls hook: this listener's TLS
        self.preconnected: Transport | None = None    # tls hook: inspection's backend
        # False: close_log() writes nothing (an HTTP/2 connection whose
        # streams had their own lines and that ended normally).
        self.log_close = True
        # The engine.serve Server (Server.hold(): extra backend connections).
        self.server = None

    def child(self) -> "Session":
        """A session of its own (id, tag, label, log items, backend, log
        line) for one HTTP/2 stream of this client connection."""
        c = Session(self.state, self.conf, self.relay, self.listen, self.proto, self.client)
        c.tls = self.tls
        c.server = self.server
        return c

    @property
    def active(self) -> int:
        """Sessions open on this relay, this one included."""
        return self.state.active_count(self.name)

    # -- backend selection ---------------------------------------------------
    def _forwards(self, forward_to: str | None) -> list[ForwardConfig]:
        fwds = self.relay.forwards
        if forward_to is not None:
            chosen = [f for f in fwds if f.kind == "table" and f.table is not None
                      and f.table.table == forward_to]
            if chosen:
                return chosen[:1]
        # The client's own destination first; an address or table forward
        # next to it is the fallback when the lookup finds none.
        return ([f for f in fwds if f.kind in ("natlook", "destination")]
                + [f for f in fwds if f.kind == "table"]
                + [f for f in fwds if f.kind == "address"])

    def _pick(self, fwd: ForwardConfig, hash_input: bytes) -> tuple[str, int, int] | None:
        """(addr, port, retry) for one forward; None when no host is up."""
        if fwd.kind == "address":
            return fwd.addr or "", fwd.port or 0, fwd.retry
        if fwd.kind in ("natlook", "destination"):
            dst = self._destination(fwd)
            return None if dst is None else (dst[0], dst[1], fwd.retry)
        inst = fwd.table
        if inst is None or not inst.hosts:
            return None
        up = [self.state.host_up(h.id) for h in inst.hosts]
        with (self.state.locked() if fwd.mode in ("roundrobin", "least-states")
              else contextlib.nullcontext()):
            host = balance.pick(fwd.mode, inst.hosts, up,
                                self.state.roundrobin(self.listen.id or self.relay.id, inst.id),
                                key=fwd.key, client=self.client.peer[0],
                                relay_addr=self.listen.addr, relay_port=self.listen.port,
                                hash_input=hash_input)
        if host is None:
            log.debug(f"relay_from_table: session {self.id}: no active hosts")
            return None
        return host.addr, inst.port, host.retry

    def _destination(self, fwd: ForwardConfig) -> tuple[str, int] | None:
        """Where the client meant to go: `destination`, the local address
        of a connection a TPROXY rule diverted here (OpenBSD: divert-to);
        `nat lookup`, the original destination of one a REDIRECT or DNAT
        rule rewrote (SO_ORIGINAL_DST; OpenBSD: DIOCNATLOOK).  None when
        the connection came straight to the relay."""
        sock = getattr(self.client, "sock", None)
        try:
            # The transport's `local` is the listener's: ask the socket.
            local = sock.getsockname()[:2] if sock is not None else None
        except OSError:
            local = None
        if fwd.kind == "destination":
            dst = local
            if dst is not None and dst[1] == self.listen.port and \
                    self.listen.addr in (dst[0], "0.0.0.0", "::", ""):
                dst = None          # not diverted: it came to the relay's own address
        else:
            dst = original_dst(sock) if sock is not None else None
            if dst is not None and dst == local:
                dst = None          # conntrack knows it, but nothing rewrote it
        if dst is None:
            log.debug(f"relay_{'natlook' if fwd.kind == 'natlook' else 'connect'}: "
                      f"session {self.id}: no original destination")
            return None
        return map_family(dst[0], fwd), dst[1]

    async def connect(self, forward_to: str | None = None,
                      hash_input: bytes = b"", ready=None) -> Transport:
        """Connect to a backend chosen by the relay's forwards.

        `ready()` runs once the TCP connection stands, before a TLS
        handshake; what it raises closes the connection and propagates.

        `forward_to`: a template table name a filter rule chose (only that
        forward is tried).  `hash_input`: the protocol's `hash` inputs for
        `mode hash`.  Sets self.backend; raises BackendError."""
        if self.preconnected is not None:      # tls hook: inspection connected first
            backend, self.preconnected = self.preconnected, None
            return backend
        err: BackendError | None = None
        for fwd in self._forwards(forward_to):
            target = self._pick(fwd, hash_input)
            if target is None:
                continue
            addr, port, retry = target
            self.backend = (addr, port)
            if (addr, port) == (self.listen.addr, self.listen.port):
                log.debug(f"relay_session: session {self.id}: looping")
                raise BackendError(502, "session aborted")
            try:
                backend = await self._connect_addr(addr, port, retry, ready)
            except BackendError as e:
                if e.status == 504 or fwd.kind != "table":
                    raise
                err = e
                continue
            self.backends.append(backend)
            return backend
        if err is not None:
            raise err
        if self.backend is None:
            self.backend = self._default_backend()
        raise BackendError(503, "session failed")

    async def _connect_addr(self, addr: str, port: int, retry: int, ready=None) -> Transport:
        tcp = self.proto.tcp
        timeout = self.relay.session_timeout
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        for attempt in range(retry + 1):
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            try:
                set_options(sock, sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                            ttl=tcp.ip_ttl, minttl=tcp.ip_minttl, nodelay=tcp.nodelay)
                if self.relay.transparent:
                    await self._bind_client_addr(sock)
                with trio.fail_after(timeout):
                    await sock.connect((addr, port))
            except trio.TooSlowError:
                sock.close()
                log.debug(f"relay_connect: session {self.id}: connect timeout")
                raise BackendError(504, "connect timeout") from None
            except OSError as e:
                sock.close()
                left = retry - attempt
                why = os.strerror(e.errno) if e.errno else str(e)
                then = "" if not left else ", next retry" if left > 1 else ", last retry"
                log.debug(f"relay_connect: session {self.id}: forward failed: {why}{then}")
                if left:
                    await trio.sleep(RELAY_RETRY_PAUSE)
                    continue
                raise BackendError(502, "session failed") from None
            except BaseException:
                sock.close()
                raise
            if ready is not None:
                try:
                    ready()
                except BaseException:
                    sock.close()
                    raise
            if self.tls is not None and self.tls.client is not None:   # tls hook
                try:
                    return await self.tls.connect(sock)
                except (OSError, trio.TooSlowError, ValueError, relay_tls.ssl.SSLError) as e:
                    sock.close()
                    log.warn(f"relay_tls_connect: session {self.id}: {addr}:{port}, "
                             f"tls handshake failed - {relay_tls.tls.describe_error(e)}")
                    raise BackendError(502, "TLS handshake error") from None
            return SocketTransport(sock, peer=(addr, port))
        raise BackendError(502, "session failed")   # not reached

    async def _bind_client_addr(self, sock) -> None:
        """`transparent forward`: connect from the client's address, so the
        backend sees it (IP_TRANSPARENT; the backend's answers must be
        routed back to this host, see the README)."""
        try:
            set_transparent(sock)
            await sock.bind((self.client.peer[0], 0))
        except OSError as e:
            log.warn(f"relay_connect: session {self.id}: transparent bind to "
                     f"{self.client.peer[0]}: {os.strerror(e.errno) if e.errno else e}")
            raise BackendError(502, "session failed") from None

    def _default_backend(self) -> tuple[str, int]:
        for f in self.relay.forwards:
            if f.kind == "address":
                return "", f.port or 0
            if f.kind == "table" and f.table is not None:
                return "", f.table.port
        return "", 0

    # -- logging ---------------------------------------------------------------
    def close_log(self, reason: str, error: bool | None = None) -> None:
        """Write the session line (log-formats.md) if `log connection` wants it.

        `error` defaults to "reason is not a normal end"; `log connection
        errors` only logs those.  Only the first call writes."""
        if self._logged or not self.log_close:
            return
        self._logged = True
        mode = self.conf.log_connection
        if mode is None:
            return
        if error is None:
            error = reason not in DONE_REASONS
        if mode == "errors" and not error:
            return
        addr, port = self.backend or self._default_backend()
        items = "".join(self.log_items)
        line = (f"relay {self.name}, session {self.id} ({self.active} active), "
                f"{self.tag or 0}, {self.client.peer[0]} -> {addr}:{port}, {reason}"
                + (f",{items}" if items else ""))
        if error:
            log.warn(line)
        else:
            log.info(line)


@dataclass
class RelayCtx:
    """What a listening socket serves: hung on engine.serve's Listener."""
    conf: RelaydConfig
    relay: RelayConfig
    listen: Listen
    proto: ProtocolConfig
    tls: object = None    # tls hook: a relay_tls.ListenTls in relay processes


# getsockopt() name of the pre-NAT destination, for IPv4 (linux/netfilter_ipv4.h)
# and IPv6 (IP6T_SO_ORIGINAL_DST): both 80.
SO_ORIGINAL_DST = 80


def original_dst(sock) -> tuple[str, int] | None:
    """The destination of an accepted connection before a REDIRECT or DNAT
    rule rewrote it (what conntrack remembers); None if it has none."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)   # sockaddr_in6
            addr = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)     # sockaddr_in
            addr = socket.inet_ntop(socket.AF_INET, raw[4:8])
    except (OSError, ValueError):
        return None
    return addr, int.from_bytes(raw[2:4], "big")


def map_family(addr: str, fwd: ForwardConfig) -> str:
    """relayd.conf(5)'s `inet` (an IPv6 destination becomes the IPv4
    address of its last 4 octets) and `inet6 PREFIX` (an IPv4 destination
    becomes PREFIX with its last 4 octets set to it)."""
    ip = ipaddress.ip_address(addr)
    if fwd.inet and ip.version == 6:
        return str(ipaddress.IPv4Address(ip.packed[-4:]))
    if fwd.inet6 and ip.version == 4:
        return str(ipaddress.IPv6Address(ipaddress.IPv6Address(fwd.inet6).packed[:12] + ip.packed))
    return addr


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


class _Server(Server):
    """engine.serve's Server that tells when a listener's accept loop is
    over (Listener.stopped): a relay process of an old generation stops
    accepting for good before the parent says the reload is done."""

    async def _accept_loop(self, lis: Listener) -> None:
        try:
            await super()._accept_loop(lis)
        finally:
            ev = getattr(lis, "stopped", None)
            if ev is not None:
                ev.set()


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
        self.server = _Server(self._handle,
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
        lis = Listener(sock, ctx=ctx, nodelay=bool(ctx.proto.tcp.nodelay), wrap=wrap)
        lis.stopped = trio.Event()
        return lis

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

    def configure(self, conf: RelaydConfig, sockets: dict[SockKey, socket.socket]) -> None:
        """Swap in `conf` (reload); `sockets` are all sockets of the new config.

        Sessions in flight keep the configuration they started with."""
        ctxs = self._with_tls(listen_sockets(conf))     # tls hook
        for key in list(self.listeners):
            if key not in ctxs or sockets.get(key) is not self.listeners[key].sock:
                self.server.remove_listener(self.listeners.pop(key))
        self.state.configure(conf)
        self.conf = conf
        self._launch(conf)
        for key, ctx in ctxs.items():
            if key in self.listeners:
                lis = self.listeners[key]
                lis.ctx = ctx
                lis.nodelay = bool(ctx.proto.tcp.nodelay)
            elif key in sockets:
                lis = self._listener(sockets[key], ctx)
                self.listeners[key] = lis
                self.server.add_listener(lis)

    def _goaway(self) -> None:
        for conn in list(self.state.h2conns):
            conn.shutdown()          # two-step GOAWAY; streams in flight finish

    def stop(self, drain: float | None = None) -> None:
        self.state.draining = True
        self._goaway()
        self.server.stop(drain)
        for u in self.udp:      # dns hook
            u.stop(drain)

    async def quiesce(self, timeout: float = 2.0) -> None:
        """Stop accepting and close the listening descriptors (reload: the
        new generation accepts now); sessions go on."""
        self.state.draining = True
        self._goaway()
        lst = list(self.listeners.values())
        self.listeners = {}
        for u in self.udp:      # dns hook: stop reading; answers still go out
            u.stop()
        for lis in lst:
            self.server.remove_listener(lis)
        with trio.move_on_after(timeout):
            for lis in lst:
                await lis.stopped.wait()
        for lis in lst:
            lis.tsock.close()

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
                    elif msg.type == Imsg.CTL_COMMAND:
                        if msg.payload["cmd"] == "quiesce":
                            await rp.quiesce()
                            result = True
                        else:
                            result = apply_command(rp, msg.payload)
                        await chan.send(Imsg.CTL_REPLY, {"seq": msg.payload["seq"],
                                                         "result": result})
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
