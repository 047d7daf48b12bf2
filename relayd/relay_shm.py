"""relayd.relay_shm -- counters the relay processes share.

With `prefork N` every relay process accepts on the same sockets, and the
kernel hands each connection to whichever process asks first.  Three
things must nevertheless look like one relayd to a client and to the
logs: session ids (one sequence, 1, 2, 3, ...), the number of sessions a
relay has open (`(N active)` in the session log line) and round-robin
positions (hosts taken in turn whatever process accepted).  They live in
one shared memory segment (a memfd the parent creates and passes to each
relay process) of signed 64-bit slots:

  slot 0                      last session id
  slots ACTIVE_BASE + n*W+w   sessions open on relay name n by worker slot w
  slots RR_BASE ...           round-robin positions, a block per generation

Each relay process gets a worker slot w (W of them): its open-session
counts are its own, so the parent can zero them when the process dies
without closing its sessions.  Relay names get a slot number from the
parent that stays the same across reloads.  Round-robin blocks are handed
out per generation from a ring (a new configuration starts over, as
RelayState.configure always did).

Updates take a POSIX record lock on the segment (fcntl F_SETLKW: per
process, released by the kernel if a process dies holding it).  The
parent writes to the segment (zeroing a dead worker's slots) but never
reads from it.

Not here: what the values mean to sessions (relay_session.RelayState).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from contextlib import contextmanager
from typing import Iterator

from relayd.config import RelaydConfig

SLOT = 8
# Worker slots (relay processes alive at once, all generations).
WORKERS = 256
# Relay names that get shared counts.
NAMES = 256
ACTIVE_BASE = 8
RR_BASE = ACTIVE_BASE + NAMES * WORKERS
# Total slots (the segment is sparse: untouched pages cost nothing).
SLOTS = RR_BASE + (1 << 17)
SIZE = SLOTS * SLOT

_Q = struct.Struct("=q")
_ROW = struct.Struct(f"={WORKERS}q")


def rr_pairs(conf: RelaydConfig) -> list[tuple[int, int]]:
    """(relay or listener id, table instance id) of every round-robin
    position `conf` can use, in a fixed order (parent and relays agree)."""
    out: list[tuple[int, int]] = []
    for rl in conf.relays:
        for lis in rl.listens or ():
            key = lis.id or rl.id
            for fwd in rl.tables:
                if fwd.table is not None and (key, fwd.table.id) not in out:
                    out.append((key, fwd.table.id))
        for fwd in rl.tables:
            if fwd.table is not None and (rl.id, fwd.table.id) not in out:
                out.append((rl.id, fwd.table.id))
    return out


def relay_names(conf: RelaydConfig) -> list[str]:
    """Every session name (Session.name) of `conf`."""
    names: list[str] = []
    for rl in conf.relays:
        for lis in rl.listens:
            n = lis.name or rl.name
            if n not in names:
                names.append(n)
        if rl.name not in names:
            names.append(rl.name)
    return names


class Segment:
    """The mapping of the shared segment in one process."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls) -> "Segment":
        fd = os.memfd_create("relayd-shared", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        return cls(fd)

    @contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def get(self, slot: int) -> int:
        return _Q.unpack_from(self.mm, slot * SLOT)[0]

    def put(self, slot: int, value: int) -> None:
        _Q.pack_into(self.mm, slot * SLOT, value)

    def add(self, slot: int, delta: int) -> int:
        """Atomically add `delta`; the new value."""
        with self.locked():
            v = self.get(slot) + delta
            self.put(slot, v)
        return v

    def row_sum(self, first: int) -> int:
        return sum(_ROW.unpack_from(self.mm, first * SLOT))

    def close(self) -> None:
        self.mm.close()


class ParentSlots:
    """The parent's bookkeeping: name slots, worker slots, RR blocks."""

    def __init__(self) -> None:
        self.seg = Segment.create()
        self.names: dict[str, int] = {}
        self.free_workers = list(range(WORKERS - 1, -1, -1))
        self.rr_next = 0

    @property
    def fd(self) -> int:
        return self.seg.fd

    def name_slots(self, conf: RelaydConfig) -> dict[str, int]:
        for n in relay_names(conf):
            if n not in self.names and len(self.names) < NAMES:
                self.names[n] = len(self.names)
        return dict(self.names)

    def rr_block(self, conf: RelaydConfig) -> int:
        """A fresh block of round-robin positions for `conf` (all -1)."""
        n = len(rr_pairs(conf))
        if self.rr_next + n > SLOTS - RR_BASE:
            self.rr_next = 0
        base = RR_BASE + self.rr_next
        self.rr_next += n
        for i in range(n):
            self.seg.put(base + i, -1)
        return base

    def worker(self) -> int:
        """A worker slot for a new relay process (-1: none left, unshared)."""
        return self.free_workers.pop() if self.free_workers else -1

    def release(self, w: int) -> None:
        """A relay process is gone: forget the sessions it had open."""
        if w < 0:
            return
        with self.seg.locked():
            for slot in self.names.values():
                self.seg.put(ACTIVE_BASE + slot * WORKERS + w, 0)
        if w not in self.free_workers:
            self.free_workers.append(w)

    def setup(self, conf: RelaydConfig, worker: int, rr_base: int) -> dict:
        """What a relay process needs to find its slots."""
        return {"names": self.name_slots(conf), "worker": worker, "rr_base": rr_base}


class SharedRoundRobin:
    """balance.RoundRobin over a shared slot (the caller holds the lock)."""

    __slots__ = ("seg", "slot")

    def __init__(self, seg: Segment, slot: int) -> None:
        self.seg = seg
        self.slot = slot

    @property
    def index(self) -> int:
        return self.seg.get(self.slot)

    @index.setter
    def index(self, value: int) -> None:
        self.seg.put(self.slot, value)


class Shared:
    """A relay process's view: session ids, open sessions, RR positions."""

    def __init__(self, fd: int, conf: RelaydConfig, names: dict[str, int], worker: int,
                 rr_base: int) -> None:
        self.seg = Segment(fd)
        self.names = names
        self.worker = worker
        self.rr = {pair: SharedRoundRobin(self.seg, rr_base + i)
                   for i, pair in enumerate(rr_pairs(conf))}

    def next_id(self) -> int:
        return self.seg.add(0, 1)

    def _active_slot(self, name: str) -> int | None:
        n = self.names.get(name)
        if n is None or self.worker < 0:
            return None
        return ACTIVE_BASE + n * WORKERS

    def open(self, name: str, delta: int) -> bool:
        """Count a session opening (+1) or closing (-1); False: not shared."""
        base = self._active_slot(name)
        if base is None:
            return False
        slot = base + self.worker          # written by this process only: no lock
        self.seg.put(slot, self.seg.get(slot) + delta)
        return True

    def active(self, name: str) -> int | None:
        base = self._active_slot(name)
        if base is None:
            return None
        return self.seg.row_sum(base)

    def roundrobin(self, relay_id: int, table_id: int) -> SharedRoundRobin | None:
        return self.rr.get((relay_id, table_id))

    def locked(self):
        return self.seg.locked()
