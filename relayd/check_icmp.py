"""check_icmp -- `check icmp`: ICMP / ICMPv6 echo, batched per round.

As OpenBSD's check_icmp.c, one socket per address family serves every
host: a round sends one echo request per host (TTL from the host's `ip
ttl`), then reads replies until each host answered (`icmp ok`) or its
table's timeout passed (`icmp read timeout`); a request that cannot be sent
is `icmp write timeout`.

Linux offers two kinds of socket: an unprivileged ICMP datagram socket
(allowed when our group is inside net.ipv4.ping_group_range; the kernel
picks the echo identifier, fills in checksums and delivers only our
replies), else a raw socket (root or CAP_NET_RAW; we compute the IPv4
checksum and filter replies by identifier and a per-process cookie in the
payload).  The datagram socket is tried first.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Callable

import trio

from relayd.check_tcp import HOST_DOWN, HOST_UP, Result

ICMP_OK = "icmp ok"
ICMP_READ_TIMEOUT = "icmp read timeout"
ICMP_WRITE_TIMEOUT = "icmp write timeout"

ICMP_ECHO, ICMP_ECHOREPLY = 8, 0
ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY = 128, 129
# Echo payload size (ping(8)'s default: 56 data bytes, 64-byte ICMP message).
PAYLOAD_SIZE = 56
RECV_SIZE = 2048

Target = tuple    # (key, addr, ttl, deadline)
Done = Callable[[object, Result], None]


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(family: int, ident: int, seq: int, payload: bytes, raw: bool) -> bytes:
    """An echo request; the IPv4 checksum is ours to fill only on raw sockets
    (the kernel does it for ICMPv6 and for datagram sockets)."""
    typ = ICMP6_ECHO_REQUEST if family == socket.AF_INET6 else ICMP_ECHO
    pkt = struct.pack("!BBHHH", typ, 0, 0, ident, seq) + payload
    if raw and family == socket.AF_INET:
        pkt = pkt[:2] + struct.pack("!H", checksum(pkt)) + pkt[4:]
    return pkt


def parse_reply(family: int, data: bytes, raw: bool):
    """(ident, seq, payload) of an echo reply, else None."""
    if raw and family == socket.AF_INET:
        if len(data) < 20:
            return None
        data = data[(data[0] & 0x0F) * 4:]
    if len(data) < 8:
        return None
    typ, code, _, ident, seq = struct.unpack("!BBHHH", data[:8])
    if typ != (ICMP6_ECHO_REPLY if family == socket.AF_INET6 else ICMP_ECHOREPLY):
        return None
    return ident, seq, data[8:]


def _norm(addr: str) -> str:
    try:
        return ipaddress.ip_address(addr).compressed
    except ValueError:
        return addr


class Pinger:
    """The echo socket of one address family, kept across rounds."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.stdsock: socket.socket | None = None      # opened by open()
        self.sock: trio.socket.SocketType | None = None  # its trio wrapper
        self.raw = False
        self.ident = os.getpid() & 0xFFFF
        self.cookie = os.urandom(8)
        self.seq = int.from_bytes(os.urandom(2), "big")
        self.ttl = -1                   # TTL currently set on the socket
        self.failed: OSError | None = None

    def open(self) -> bool:
        """Open the socket (datagram, else raw); False when neither works.
        May be called outside trio, e.g. before dropping privileges."""
        if self.stdsock is not None:
            return True
        proto = socket.IPPROTO_ICMPV6 if self.family == socket.AF_INET6 else socket.IPPROTO_ICMP
        err: OSError | None = None
        for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
            try:
                s = socket.socket(self.family, kind, proto)
            except OSError as e:
                err = e
                continue
            s.setblocking(False)
            self.raw = kind == socket.SOCK_RAW
            self.stdsock = s
            return True
        self.failed = err
        return False

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except RuntimeError:          # outside trio
                pass
        if self.stdsock is not None:
            self.stdsock.close()
        self.sock = self.stdsock = None

    def _set_ttl(self, ttl: int) -> None:
        if ttl == self.ttl:
            return
        value = ttl if ttl > 0 else -1      # -1: the system default hop limit
        if self.family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, value)
        else:
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, value)
        self.ttl = ttl

    async def ping_all(self, targets: list[Target], done: Done) -> None:
        """Ping every target; call done(key, result) as each is decided."""
        if not self.open():
            for key, _addr, _ttl, _dl in targets:
                done(key, (HOST_DOWN, ICMP_WRITE_TIMEOUT, 0))
            return
        if self.sock is None:
            self.sock = trio.socket.from_stdlib_socket(self.stdsock)
        sock = self.sock
        payload = self.cookie + bytes(PAYLOAD_SIZE - len(self.cookie))
        waiting: dict[int, tuple] = {}
        for key, addr, ttl, deadline in targets:
            self.seq = (self.seq + 1) & 0xFFFF
            seq = self.seq
            pkt = echo_request(self.family, self.ident, seq, payload, self.raw)
            try:
                self._set_ttl(ttl)
            except OSError:
                pass
            sent = False
            with trio.move_on_at(deadline):
                try:
                    await sock.sendto(pkt, (addr, 0))
                    sent = True
                except OSError:
                    pass
            if not sent:
                done(key, (HOST_DOWN, ICMP_WRITE_TIMEOUT, 0))
                continue
            waiting[seq] = (key, _norm(addr), deadline)
        while waiting:
            first = min(w[2] for w in waiting.values())
            with trio.move_on_at(first):
                while waiting:
                    try:
                        data, src = await sock.recvfrom(RECV_SIZE)
                    except OSError:
                        continue
                    rep = parse_reply(self.family, data, self.raw)
                    if rep is None:
                        continue
                    ident, seq, body = rep
                    if self.raw and (ident != self.ident or not body.startswith(self.cookie)):
                        continue
                    w = waiting.get(seq)
                    if w is None or _norm(src[0]) != w[1]:
                        continue
                    del waiting[seq]
                    done(w[0], (HOST_UP, ICMP_OK, 0))
            now = trio.current_time()
            for seq, w in list(waiting.items()):
                if w[2] <= now:
                    del waiting[seq]
                    done(w[0], (HOST_DOWN, ICMP_READ_TIMEOUT, 0))
