"""relayd.balance -- pick a backend host: roundrobin, random, hash,
source-hash, loadbalance (relay.c's relay_from_table()).

Pure: gets the hosts of a table instance that are up right now and the
inputs of the keyed modes, returns a host.  SipHash-2-4 with the forward's
16-byte key, as OpenBSD; keyed modes try up to min(hosts, 5) candidates by
shifting the hash before falling back to the next up host.

Nothing here knows about sockets or health checks.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Sequence, TypeVar

H = TypeVar("H")

# Candidates a keyed mode tries before falling back (RELAY_MAX_HASH_RETRIES).
MAX_HASH_RETRIES = 5
_MASK = 0xFFFFFFFFFFFFFFFF


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 of `data` under a 16-byte key (64-bit result)."""
    k0, k1 = struct.unpack("<QQ", key[:16].ljust(16, b"\0"))
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    n = len(data)
    end = n - (n % 8)

    def rounds(v0, v1, v2, v3, count):
        for _ in range(count):
            v0 = (v0 + v1) & _MASK
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _MASK
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _MASK
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _MASK
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)
        return v0, v1, v2, v3

    for off in range(0, end, 8):
        m = struct.unpack_from("<Q", data, off)[0]
        v3 ^= m
        v0, v1, v2, v3 = rounds(v0, v1, v2, v3, 2)
        v0 ^= m
    b = (n & 0xFF) << 56
    tail = data[end:]
    for i, c in enumerate(tail):
        b |= c << (8 * i)
    v3 ^= b
    v0, v1, v2, v3 = rounds(v0, v1, v2, v3, 2)
    v0 ^= b
    v2 ^= 0xFF
    v0, v1, v2, v3 = rounds(v0, v1, v2, v3, 4)
    return v0 ^ v1 ^ v2 ^ v3


def addr_bytes(addr: str) -> bytes:
    try:
        return ipaddress.ip_address(addr).packed
    except ValueError:
        return addr.encode()


class RoundRobin:
    """Round-robin position of one table instance in one relay process."""

    __slots__ = ("index",)

    def __init__(self) -> None:
        self.index = -1


def pick(mode: str, hosts: Sequence[H], up: Sequence[bool], rr: RoundRobin,
         key: bytes | None = None, client: str = "", relay_addr: str = "",
         relay_port: int = 0, hash_input: bytes = b"") -> H | None:
    """A host that is up, by `mode`; None when no host is up.

    `hosts` and `up` are parallel; `rr` carries the roundrobin index."""
    n = len(hosts)
    if n == 0 or not any(up):
        return None
    if mode == "roundrobin":
        for step in range(1, n + 1):
            i = (rr.index + step) % n
            if up[i]:
                rr.index = i
                return hosts[i]
        return None
    if mode == "random":
        i = random.randrange(n)
        return _next_up(hosts, up, i)
    key = key or b"\0" * 16
    if mode == "source-hash":
        data = addr_bytes(client)
    elif mode == "loadbalance":
        data = addr_bytes(client) + addr_bytes(relay_addr) + struct.pack("!H", relay_port)
    elif mode == "hash":
        # relay_http feeds the protocol's hash inputs into the SipHash
        # context first; relay_from_table adds the relay address and port.
        data = hash_input + addr_bytes(relay_addr) + struct.pack("!H", relay_port)
    else:   # least-states: a redirect mode; treat like roundrobin for relays
        return pick("roundrobin", hosts, up, rr)
    h = siphash24(key, data)
    i = 0
    for _ in range(min(n, MAX_HASH_RETRIES)):
        i = h % n
        if up[i]:
            return hosts[i]
        h >>= 1   # relay.c shifts the hash for the next candidate
    return _next_up(hosts, up, i)   # walk on from the last candidate tried


def _next_up(hosts: Sequence[H], up: Sequence[bool], start: int) -> H | None:
    n = len(hosts)
    for step in range(n):
        i = (start + step) % n
        if up[i]:
            return hosts[i]
    return None
