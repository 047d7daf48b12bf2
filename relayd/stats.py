"""relayd.stats -- session counters and live sessions of a relay process,
for `relayctl show relays` and `relayctl show sessions`.

Counters follow relay.c's relay_statistics(): every statistics interval
(RELAY_STATINTERVAL, 60 s) the sessions accepted during the interval
become `last`, are added to the total, and feed the running averages
(`avg` per interval, `avg_hour`, `avg_day`, each the mean of the new value
and the previous average).  What relayctl shows is the snapshot taken at
the last tick -- except the total, which also counts the interval in
progress, so `show relays` moves as soon as sessions come in (OpenBSD's
total lags by up to a minute).  OpenBSD never resets `last_day` (it resets
`last_hour` twice); we reset it once a day.

Ticks are computed when the counters are touched or read, not by a timer:
every session is counted after all ticks due before it have been applied,
so the result is the same as a timer's, and an idle relay costs nothing.

Sessions are registered from accept to close (relay.py's RelayProc hook)
and listed with their age and idle time; the idle time of a plain TCP
client comes from the kernel (TCP_INFO: time since data last moved on the
client socket), otherwise it is the age.

Does not know the control protocol (relayd.control builds rows from what
this returns) nor the relays' configuration.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any, Callable

from relayd.config import RELAY_STATINTERVAL

# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, 9 u32, then the times
# in ms: last_data_sent (offset 44), last_ack_sent, last_data_recv (52).
_TCP_INFO_LEN = 60
_TCP_LAST_DATA_SENT = 44
_TCP_LAST_DATA_RECV = 52


class Counters:
    """One relay's counters in one process (struct ctl_stats)."""

    __slots__ = ("interval", "next_tick", "tick", "cur", "cnt", "last", "avg",
                 "last_hour", "avg_hour", "last_day", "avg_day", "shown")

    def __init__(self, interval: int, now: float) -> None:
        self.interval = interval
        self.next_tick = now + interval
        self.tick = 0
        self.cur = 0                  # sessions since the last tick
        self.cnt = 0                  # sessions before the last tick
        self.last = self.avg = 0
        self.last_hour = self.avg_hour = 0
        self.last_day = self.avg_day = 0
        self.shown: dict[str, int] = self._values()

    def _values(self) -> dict[str, int]:
        return {"cnt": self.cnt, "last": self.last, "avg": self.avg,
                "last_hour": self.last_hour, "avg_hour": self.avg_hour,
                "last_day": self.last_day, "avg_day": self.avg_day}

    def _idle(self) -> bool:
        return not (self.cur or self.last or self.avg or self.last_hour or self.avg_hour
                    or self.last_day or self.avg_day)

    def advance(self, now: float) -> None:
        """Apply every tick due at `now`."""
        while now >= self.next_tick:
            if self._idle():
                # Nothing to average: jump to the last due tick at once.
                n = int((now - self.next_tick) // self.interval)
                if n:
                    self.tick += n
                    self.next_tick += n * self.interval
            self._tick()
            self.next_tick += self.interval

    def _tick(self) -> None:
        per_hour = max(3600 // self.interval, 1)
        per_day = max(86400 // self.interval, 1)
        self.last, self.cur = self.cur, 0
        self.cnt += self.last
        self.tick += 1
        self.avg = (self.last + self.avg) // 2
        self.last_hour += self.last
        self.last_day += self.last
        reset_hour = reset_day = False
        if self.tick % per_hour == 0:
            self.avg_hour = (self.last_hour + self.avg_hour) // 2
            reset_hour = True
        if self.tick % per_day == 0:
            self.avg_day = (self.last_day + self.avg_day) // 2
            reset_day = True
        self.shown = self._values()   # what the relay would send to pfe
        if reset_hour:
            self.last_hour = 0
        if reset_day:
            self.last_day = 0

    def add(self, now: float) -> None:
        self.advance(now)
        self.cur += 1

    def snapshot(self, now: float) -> dict[str, int]:
        """The values relayctl prints (the total includes the running interval)."""
        self.advance(now)
        out = dict(self.shown)
        out["cnt"] = self.cnt + self.cur
        out["interval"] = self.interval
        return out


def tcp_idle(fd: int) -> float | None:
    """Seconds since data last moved either way on TCP socket `fd` (None
    when the kernel cannot tell)."""
    if fd < 0:
        return None
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    finally:
        s.detach()
    if len(info) < _TCP_LAST_DATA_RECV + 4:
        return None
    sent, = struct.unpack_from("I", info, _TCP_LAST_DATA_SENT)
    recv, = struct.unpack_from("I", info, _TCP_LAST_DATA_RECV)
    return min(sent, recv) / 1000


class Stats:
    """Counters per relay (by its name: clones are relays of their own) and
    the sessions open in this relay process."""

    def __init__(self, interval: int = RELAY_STATINTERVAL, proc: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.proc = proc              # relay process instance (session rows)
        self.clock = clock
        self.relays: dict[str, Counters] = {}
        self.sessions: dict[int, Any] = {}
        self.tags: dict[str, int] = {}

    def counters(self, name: str) -> Counters:
        c = self.relays.get(name)
        if c is None:
            c = self.relays[name] = Counters(self.interval, self.clock())
        return c

    # -- relay hooks -------------------------------------------------------------
    def session_start(self, session) -> None:
        """An accepted session (relay_session.Session) of relay `session.name`."""
        self.counters(session.name).add(self.clock())
        self.sessions[session.id] = session

    def session_end(self, session) -> None:
        self.sessions.pop(session.id, None)

    # -- views -------------------------------------------------------------------
    def relay(self, name: str) -> dict[str, int]:
        """Counter values of one relay (ctl_stats as relayctl sums them)."""
        return self.counters(name).snapshot(self.clock())

    def tag_id(self, tag: str | None) -> int:
        """pf-style numeric id of a tag name (1.. in order of first use)."""
        if not tag:
            return 0
        return self.tags.setdefault(tag, len(self.tags) + 1)

    def session_rows(self) -> list[dict]:
        """Every open session as a `show sessions` row, by session id."""
        now = self.clock()
        pid = os.getpid()
        rows = []
        for sid in sorted(self.sessions):
            s = self.sessions[sid]
            age = max(now - s.started, 0.0)
            idle = tcp_idle(s.client.fileno())
            idle = age if idle is None else min(idle, age)
            addr, port = s.backend or ("", 0)
            rows.append({
                "type": "session", "proc": self.proc, "id": s.id,
                "client": [s.client.peer[0], s.client.peer[1]],
                "backend": [addr, port], "done": bool(getattr(s, "done", False)),
                "age": round(age, 3), "idle": round(idle, 3),
                "relay": s.listen.id or s.relay.id, "relay_name": s.name,
                "pid": pid, "tag": self.tag_id(s.tag), "tag_name": s.tag,
            })
        return rows
