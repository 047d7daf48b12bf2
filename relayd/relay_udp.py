"""relayd.relay_udp -- UDP relays: the `dns protocol` (relay_udp.c).

A relay whose protocol is `dns` reads datagrams on a UDP socket bound to
its listen address.  Every datagram that is a DNS query (header, QR clear,
a known opcode, counts that the message holds) becomes a session: a backend
is picked from the relay's forwards (its tables in order with their modes
and only hosts that are up, then its address), the query's 16-bit ID is
replaced by a random one that is not pending (OpenBSD's shuffle table: an
ID is not drawn again within 32768 draws, and never 0) and the query goes
to the backend from a socket of the session's own (a fresh source port per
query, as OpenBSD; connected, so only the backend can answer on it).  A
response carrying the pending ID from that backend gets the client's
original ID back and is sent to the client from the relay's socket; the
session ends `done`.  No answer within the session timeout: `udp timeout`.
Anything else that arrives -- short or non-DNS datagrams, responses on the
listening socket, answers with another ID -- is dropped (`-vv` says so).
With `log connection` every session writes the same line as a TCP session
(relay_session.Session.close_log), and sessions show in `relayctl show sessions`.

The parent binds the sockets (udp_listens() and bind_udp(); keys ("udp",
addr, port), so they never collide with the TCP listeners' (addr, port));
a relay process runs one UdpRelay per socket (relays()).  Does not relay DNS over TCP: the TCP
listener a dns relay also gets is a plain TCP relay (relay.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import resource
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import trio

from engine.listen import set_options
from relayd import balance
from relayd import relay_session
from relayd.config import Listen, ProtocolConfig, RelayConfig, RelaydConfig
from shared import log

UdpKey = tuple[str, str, int]          # ("udp", addr, port)

# Largest datagram read (IBUF_READ_SIZE).
READ_SIZE = 65535
DNS_HEADER = struct.Struct("!HBBHHHH")
DNS_F0_QR = 0x80                       # response flag
DNS_F0_OPCODE = 0x78                   # message type
# Opcodes a query may carry: QUERY, IQUERY, STATUS, NOTIFY, UPDATE, DSO.
DNS_OPCODES = frozenset({0, 1, 2, 4, 5, 6})
# A name is at most 255 bytes on the wire (RFC 1035 2.3.4).
DNS_NAME_MAX = 255
SHUFFLE_SIZE = 65536
# Pending sessions per UdpRelay: IDs 1..65535, fewer when file descriptors
# are short (each pending query holds a socket).
UDP_MAX_SESSIONS = 65535
FD_RESERVE = 64


# -- DNS messages (sans I/O) ---------------------------------------------------

class DnsHeader(NamedTuple):
    id: int
    flags0: int
    flags1: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def response(self) -> bool:
        return bool(self.flags0 & DNS_F0_QR)

    @property
    def opcode(self) -> int:
        return (self.flags0 & DNS_F0_OPCODE) >> 3


def dns_header(buf: bytes) -> DnsHeader | None:
    """The header of a DNS message; None when `buf` is too short."""
    if len(buf) < DNS_HEADER.size:
        return None
    return DnsHeader(*DNS_HEADER.unpack_from(buf))


def _skip_name(buf: bytes, off: int) -> int | None:
    """Offset after the (possibly compressed) name at `off`; None if bad."""
    start, total = off, 0
    while off < len(buf):
        n = buf[off]
        if n & 0xC0 == 0xC0:                     # compression pointer: ends the name
            if off + 2 > len(buf):
                return None
            ptr = ((n & 0x3F) << 8) | buf[off + 1]
            return off + 2 if DNS_HEADER.size <= ptr < start else None
        if n & 0xC0:                             # 0x40/0x80 label types: not in use
            return None
        off += 1 + n
        total += 1 + n
        if total > DNS_NAME_MAX:
            return None
        if n == 0:
            return off if off <= len(buf) else None
    return None


def check_query(buf: bytes) -> str | None:
    """Why `buf` is not a DNS query relayd should forward; None if it is.

    Stricter than relay_dns_validate (header and QR only): the opcode must
    be one in use and the questions and records the counts announce must
    be there, so that stray datagrams never reach a backend."""
    hdr = dns_header(buf)
    if hdr is None:
        return "short dns packet"
    if hdr.response:
        return "not a query"
    if hdr.opcode not in DNS_OPCODES:
        return f"invalid opcode {hdr.opcode}"
    if not (hdr.qdcount or hdr.ancount or hdr.nscount or hdr.arcount):
        return "no question"
    off = DNS_HEADER.size
    for _ in range(hdr.qdcount):
        off = _skip_name(buf, off)
        if off is None or off + 4 > len(buf):
            return "bad question"
        off += 4
    for _ in range(hdr.ancount + hdr.nscount + hdr.arcount):
        off = _skip_name(buf, off)
        if off is None or off + 10 > len(buf):
            return "bad record"
        rdlen, = struct.unpack_from("!H", buf, off + 8)
        off += 10 + rdlen
        if off > len(buf):
            return "bad record"
    return None


def set_id(buf: bytes, new_id: int) -> bytes:
    """`buf` with its DNS ID replaced."""
    return struct.pack("!H", new_id) + buf[2:]


def dns_log(session_id: int, buf: bytes, where: str) -> None:
    """relay_dns_log: the header of a query or answer (-vv)."""
    if log.get_verbose() < 2:
        return
    hdr = dns_header(buf)
    if hdr is None:
        log.debug(f"{where}: session {session_id}: short dns packet")
        return
    log.debug(f"{where}: session {session_id}: "
              f"{'response' if hdr.response else 'request'} id {hdr.id:#x} "
              f"flags {hdr.flags0:#x}:{hdr.flags1:#x} qd {hdr.qdcount} an {hdr.ancount} "
              f"ns {hdr.nscount} ar {hdr.arcount}")


# -- IDs -------------------------------------------------------------------------

class Shuffle:
    """OpenBSD's shuffle.c (from BIND's isc shuffle): 16-bit IDs from a
    permutation that is stirred as it is read.  A value drawn is swapped to
    one of the 32768 positions just read, so it comes up again no sooner
    than 32768 draws later; 0 is never returned."""

    def __init__(self, seed: bytes | None = None) -> None:
        rnd = seed if seed is not None else os.urandom(4 * SHUFFLE_SIZE)
        ids = list(range(SHUFFLE_SIZE))
        # Knuth shuffle on 32-bit random words (bias below 2**-16).
        words = struct.unpack(f"<{len(rnd) // 4}I", rnd[:len(rnd) // 4 * 4])
        for i in range(SHUFFLE_SIZE - 1, 0, -1):
            j = words[i % len(words)] % (i + 1)
            ids[i], ids[j] = ids[j], ids[i]
        self._ids = ids
        self._index = 0

    def generate16(self) -> int:
        while True:
            i = self._index & 0xFFFF
            i2 = (self._index - secrets.randbits(15)) & 0xFFFF
            ids = self._ids
            r = ids[i]
            ids[i], ids[i2] = ids[i2], r
            self._index += 1
            if r:
                return r


_shuffle: Shuffle | None = None


def shuffle() -> Shuffle:
    """The process's shuffle (relay_shuffle), made on first use."""
    global _shuffle
    if _shuffle is None:
        _shuffle = Shuffle()
    return _shuffle


def _addr_key(addr: tuple) -> tuple[Any, int]:
    try:
        return ipaddress.ip_address(addr[0].split("%", 1)[0]), int(addr[1])
    except ValueError:
        return addr[0], int(addr[1])


@dataclass
class Pending:
    """A query sent to a backend and not answered yet."""
    id: int                   # the ID the backend sees
    orig_id: int              # the client's ID
    client: tuple             # the client's socket address
    backend: tuple[str, int]  # where the query went
    started: float            # time.monotonic() when sent


class IdTable:
    """Pending queries of one UDP relay by the ID sent to the backend
    (relay_dns_priv in OpenBSD's session tree)."""

    def __init__(self, ids: Shuffle | None = None) -> None:
        self._shuffle = ids
        self._pending: dict[int, Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, orig_id: int, client: tuple, backend: tuple[str, int],
            now: float | None = None) -> Pending | None:
        """Register a query under a fresh ID: not pending, not 0 and not
        the client's own.  None when every ID is taken."""
        if len(self._pending) >= SHUFFLE_SIZE - 2:
            return None
        ids = self._shuffle or shuffle()
        while True:
            new = ids.generate16()
            if new != orig_id and new not in self._pending:
                break
        p = Pending(new, orig_id, client, backend,
                    time.monotonic() if now is None else now)
        self._pending[new] = p
        return p

    def match(self, resp_id: int, src: tuple) -> Pending | None:
        """The pending query answer `resp_id` from `src` belongs to, if any
        (relay_dns_validate: the ID and the query's destination)."""
        p = self._pending.get(resp_id)
        if p is None or _addr_key(src) != _addr_key(p.backend):
            return None
        return p

    def remove(self, p: Pending) -> None:
        if self._pending.get(p.id) is p:
            del self._pending[p.id]


# -- sockets (the parent) ----------------------------------------------------------

def udp_listens(conf: RelaydConfig) -> dict[UdpKey, tuple[RelayConfig, Listen, ProtocolConfig]]:
    """Every listen address of the relays with a `dns` protocol, in config order."""
    out: dict[UdpKey, tuple[RelayConfig, Listen, ProtocolConfig]] = {}
    for rl in conf.relays:
        proto = conf.protocol_of(rl)
        if proto.type != "dns":
            continue
        for lis in rl.listens:
            out.setdefault(("udp", lis.addr, lis.port), (rl, lis, proto))
    return out


def bind_udp(addr: str, port: int, proto: ProtocolConfig | None = None) -> socket.socket:
    """A UDP socket bound to addr:port with the protocol's socket options
    (relay_udp_bind); raises OSError.  No SO_REUSEADDR: a port another
    process reads is an error, not shared."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if proto is not None:
            tcp = proto.tcp
            set_options(sock, sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                        ttl=tcp.ip_ttl, minttl=tcp.ip_minttl)
        sock.bind((addr, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def max_sessions() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return UDP_MAX_SESSIONS
    return max(16, min(UDP_MAX_SESSIONS, (soft - FD_RESERVE) // 2))


# -- the relay (a relay process) -----------------------------------------------------

class _Client:
    """What relay_session.Session and stats need of a UDP client."""
    __slots__ = ("peer", "local")

    def __init__(self, peer: tuple, local: tuple) -> None:
        self.peer = (peer[0], peer[1])
        self.local = local

    def fileno(self) -> int:
        return -1


class UdpRelay:
    """One dns relay listen socket in a relay process; see the module
    docstring.  `stats` is the process's relayd.stats.Stats; `counters`
    an object with `ended` and `errors` dicts and `metrics` (RelayProc)."""

    def __init__(self, relay: RelayConfig, proto: ProtocolConfig, sock: socket.socket,
                 state: relay_session.RelayState, conf: RelaydConfig,
                 listen: Listen | None = None,
                 stats=None, counters=None, limit: int | None = None) -> None:
        self.relay = relay
        self.proto = proto
        self.state = state
        self.conf = conf
        sock.setblocking(False)
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.local = sock.getsockname()[:2]
        self.listen = listen or self._find_listen(relay, self.local)
        self.name = self.listen.name or relay.name
        self.stats = stats
        self.counters = counters
        self.limit = limit or max_sessions()
        self.ids = IdTable()
        self.active = 0
        self._recv_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._drain: float | None = None
        self._stopped = trio.Event()

    @staticmethod
    def _find_listen(relay: RelayConfig, local: tuple) -> Listen:
        for lis in relay.listens:
            if lis.port == local[1] and _addr_key((lis.addr, 0)) == _addr_key((local[0], 0)):
                return lis
        return relay.listens[0] if relay.listens else Listen(local[0], local[1])

    # -- control ---------------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Read queries until stop(); returns once the last session is gone."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with self._recv_scope:
                    task_status.started()
                    await self._receive(nursery)
                self._apply_drain()
        finally:
            self._stopped.set()

    def stop(self, drain: float | None = None) -> None:
        """Stop reading; sessions in flight get `drain` seconds (None: their
        session timeout) to end."""
        if drain is not None:
            self._drain = drain
        self._recv_scope.cancel()
        self._apply_drain()

    def _apply_drain(self) -> None:
        if self._nursery is not None and self._drain is not None:
            self._nursery.cancel_scope.deadline = min(
                self._nursery.cancel_scope.deadline, trio.current_time() + self._drain)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- queries -----------------------------------------------------------------------
    async def _receive(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data, addr = await self.sock.recvfrom(READ_SIZE)
            except (ConnectionRefusedError, ConnectionResetError):
                continue                        # an ICMP error for an earlier reply
            except OSError as e:
                log.warn_errno(f"relay_udp_server: relay {self.name}", e)
                await trio.sleep(0.1)           # never spin on a persistent error
                continue
            self._datagram(data, addr, nursery)

    def _datagram(self, data: bytes, addr: tuple, nursery: trio.Nursery) -> None:
        if self.relay.disabled:
            return
        why = check_query(data)
        if why is not None:
            log.debug(f"relay_udp_server: relay {self.name}: {addr[0]}: dropped: {why}")
            return
        if self.active >= self.limit:
            log.debug(f"relay_udp_server: relay {self.name}: too many sessions")
            return
        self.active += 1
        sess = relay_session.Session(self.state, self.conf, self.relay, self.listen,
                                     self.proto, _Client(addr, self.local))
        self.state.session_open(sess.name)
        if self.stats is not None:
            self.stats.session_start(sess)
        nursery.start_soon(self._session, sess, addr, data)

    async def _session(self, sess: relay_session.Session, client: tuple, data: bytes) -> None:
        pending: Pending | None = None
        try:
            target = self._choose(sess)
            if target is None:
                reason = "session failed"
            elif target[:2] == (self.listen.addr, self.listen.port):
                log.debug(f"relay_dns_request: session {sess.id}: looping")
                reason = "session aborted"
            else:
                pending = self.ids.add(DNS_HEADER.unpack_from(data)[0], client, target[:2])
                if pending is None:
                    reason = "session failed"
                else:
                    reason = "udp timeout"
                    with trio.move_on_after(self.relay.session_timeout):
                        reason = await self._forward(sess, pending, data, target[2])
            self._done(sess, reason)
        finally:
            if pending is not None:
                self.ids.remove(pending)
            self.active -= 1
            if self.stats is not None:
                self.stats.session_end(sess)
            self.state.session_close(sess.name)

    def _done(self, sess: relay_session.Session, reason: str) -> None:
        sess.close_log(reason)
        error = reason != "done"
        c = self.counters
        if c is not None:
            c.ended[sess.name] = c.ended.get(sess.name, 0) + 1
            if error:
                c.errors[sess.name] = c.errors.get(sess.name, 0) + 1
            if getattr(c, "metrics", None) is not None:
                c.metrics.session_done(sess.name, error)

    def _choose(self, sess: relay_session.Session) -> tuple[str, int, int] | None:
        """(addr, port, retry): the relay's tables in order (backups when
        no host of the one before is up), then its address forward."""
        fwds = self.relay.forwards
        for fwd in ([f for f in fwds if f.kind == "table"]
                    + [f for f in fwds if f.kind == "address"]):
            if fwd.kind == "address":
                sess.backend = (fwd.addr or "", fwd.port or 0)
                return fwd.addr or "", fwd.port or 0, fwd.retry
            inst = fwd.table
            if inst is None or not inst.hosts:
                continue
            sess.backend = ("", inst.port)
            up = [self.state.host_up(h.id) for h in inst.hosts]
            with (self.state.locked() if fwd.mode in ("roundrobin", "least-states")
                  else contextlib.nullcontext()):
                host = balance.pick(fwd.mode, inst.hosts, up,
                                    self.state.roundrobin(self.listen.id or self.relay.id,
                                                          inst.id),
                                    key=fwd.key, client=sess.client.peer[0],
                                    relay_addr=self.listen.addr, relay_port=self.listen.port)
            if host is None:
                log.debug(f"relay_from_table: session {sess.id}: no active hosts")
                continue
            sess.backend = (host.addr, inst.port)
            return host.addr, inst.port, host.retry
        return None

    async def _forward(self, sess: relay_session.Session, p: Pending, data: bytes,
                       retry: int) -> str:
        """Send the query with its new ID, wait for the answer, hand it to
        the client with the old ID: the session's close reason."""
        addr, port = p.backend
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        dns_log(sess.id, data, "relay_dns_request")
        query = set_id(data, p.id)
        with trio.socket.socket(family, socket.SOCK_DGRAM) as out:
            tcp = self.proto.tcp
            set_options(out, sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                        ttl=tcp.ip_ttl, minttl=tcp.ip_minttl)
            for attempt in range(retry + 1):
                try:
                    await out.connect((addr, port))
                    await out.send(query)
                    break
                except OSError as e:
                    left = retry - attempt
                    then = "" if not left else ", next retry" if left > 1 else ", last retry"
                    log.debug(f"relay_dns_request: session {sess.id}: forward failed: "
                              f"{e.strerror or e}{then}")
                    if not left:
                        return "session failed"
            while True:
                try:
                    resp, src = await out.recvfrom(READ_SIZE)
                except OSError as e:        # ICMP port unreachable and the like
                    log.debug(f"relay_udp_response: session {sess.id}: {e.strerror or e}")
                    return "session failed"
                hdr = dns_header(resp)
                if hdr is None or not hdr.response or self.ids.match(hdr.id, src) is not p:
                    log.debug(f"relay_udp_response: session {sess.id}: invalid response")
                    continue
                break
        dns_log(sess.id, resp, "relay_dns_result")
        try:
            await self.sock.sendto(set_id(resp, p.orig_id), p.client)
        except OSError as e:
            log.debug(f"relay_dns_result: session {sess.id}: {e.strerror or e}")
            return "response failed"
        return "done"


def relays(conf: RelaydConfig, sockets: dict, state: relay_session.RelayState, stats=None,
           counters=None) -> list[UdpRelay]:
    """A UdpRelay for each dns relay socket of `conf` found in `sockets`."""
    return [UdpRelay(rl, proto, sockets[key], state, conf, listen=lis, stats=stats,
                     counters=counters)
            for key, (rl, lis, proto) in udp_listens(conf).items() if key in sockets]
