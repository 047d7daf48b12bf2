"""relayd.relay_session -- a relay's sessions and what they share: Session
(one client connection, from accept to its log line: backend choice over
the relay's forwards, connect with retries, `transparent`, `nat lookup` /
`destination`) and RelayState (what a relay process learns at run time).

Backend choice (relay.c's relay_connect/relay_from_table): the relay's
table forwards in order -- the main table, then each backup table when no
host of the previous one is up -- then its address forward.  As an
extension, a table whose chosen host cannot be connected to (after the
host's `retry` attempts) also falls over to the next forward: without
health checks a dead host is never "down", and a client is better served by
the backup table than by a closed connection.

RelayState holds host states (health checks report them later; until then
every host counts as up), round-robin positions, session ids and
per-relay session counts.

One floor below the protocols that run sessions: relay (TCP, and the
process), relay_http/relay_h2 (through relay) and relay_udp (`dns
protocol`) all use it, and it imports none of them.  Does not accept,
splice or speak a protocol.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time

import trio

from engine.conn import SocketTransport, Transport
from engine.listen import set_options, set_transparent
from relayd import balance
from relayd import relay_tls               # tls hook: TLS to backends, inspection
from relayd.config import (ForwardConfig, Listen, ProtocolConfig, RelayConfig, RelaydConfig,
                           TableInstance)
from relayd.errors import BackendError
from shared import log

# Pause between two connect attempts of one session (`retry n`); OpenBSD
# retries at once, which a backend that is just coming up never survives.
RELAY_RETRY_PAUSE = 1.0
# Close reasons of sessions that ended normally (relay_close(..., 0)).
DONE_REASONS = frozenset({"done", "last write (done)", "last read (done)"})


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
