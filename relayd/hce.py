"""hce -- the health check engine: check every host of every checked table
instance each `interval`, keep its state, report the changes.

A round starts every global `interval` seconds (the first at once, another
at once on poll()).  Tables whose own `interval` is a multiple of the
global one take part every Nth round.  A round is one nursery: a task per
checked host (tcp, tls, http, send/expect, binary, script) plus one task
per address family for the batched ICMP echoes.  Each check has a deadline
of round start + the table's `timeout` (validated < interval, so rounds
never overlap).

What a result does (OpenBSD's hce_notify_done()):
* a failure while the host still has retries left keeps its previous state
  and uses one retry (`retry N` tolerates N consecutive failures: the host
  goes down on the N+1th); any other result sets the state and refills the
  retries.  A host starts `unknown` with no retries in hand, so its first
  failure marks it down at once;
* checks that end up or down count towards availability (up / checks);
* hosts with `parent N` are never checked: each result of host N is applied
  to them as well (with their own retry counter);
* a log line in log-formats.md's format when the state changed (`log state
  changes`, always with -d) and for every check with `log host checks`;
* notify(host_id, new_state) only when the state flipped: this is
  HOST_STATUS to the relays, who pick only `up` hosts.

Tables without a check (`check` type "none", relay forwards only) are never
checked: OpenBSD's relays treat their hosts as up, and so do we: they are
reported `up` once at start (and after a reload) and shown as unchecked.

Reload keeps what was learnt: hosts are matched by (table instance name,
host name) and keep state, counters and retries, so a reload causes no
outage (OpenBSD restarts every host as unknown).  Runtime enable/disable
is not carried over: the new file decides.

Under privilege separation hce is a process of its own (child_main:
`relayd -P hce`): it opens both ICMP sockets, drops to /var/empty, sends
every state change to the parent as HOST_STATUS (tagged with the
configuration generation), asks the parent to run check scripts
(SCRIPT_RUN), and answers the relayctl commands the parent forwards
(Commands); carry_states() is the parent's copy of reload()'s matching.
Its Landlock domain allows TCP connects to check_ports() of the
configuration it started with, nothing else; a domain cannot be widened,
so a reload that needs another port makes the parent start a new hce,
seeded (seed()) with the host states the parent knows: no state flaps to
unknown and no host is logged down and up again.

Not here: the checks themselves (check_tcp, check_http, check_icmp,
check_script) and the relays' view of the states (relay_session.RelayState).
"""

from __future__ import annotations

import math
import socket
import time
from enum import IntEnum
from functools import partial
from typing import Any, Callable

import trio

from relayd import check_http, check_icmp, check_script, check_tcp
from relayd.check_tcp import HOST_DOWN, HOST_UNKNOWN, HOST_UP
from relayd.config import InstanceHost, RelaydConfig, TableInstance
from shared import log, pledge, proc
from shared.imsg import Channel, Imsg

# Extra time a check gets past its deadline before it is abandoned as
# `aborted` (the checks honour the deadline themselves; this is a backstop).
CHECK_GRACE = 1.0
# Result text of a host not checked yet / of an abandoned check.
HCE_NONE = "none"
HCE_ABORT = "aborted"


class HostStatus(IntEnum):
    """A host's state, OpenBSD's values (enum host_status)."""
    DOWN = HOST_DOWN
    UNKNOWN = HOST_UNKNOWN
    UP = HOST_UP

    def __str__(self) -> str:
        return self.name.lower()


_STATUS = {HOST_DOWN: HostStatus.DOWN, HOST_UNKNOWN: HostStatus.UNKNOWN,
           HOST_UP: HostStatus.UP}

Notify = Callable[[int, HostStatus], Any]


def check_name(check) -> str:
    """OpenBSD's table_check() name of a CheckConfig (` use tls` apart)."""
    t = check.type
    if t in ("http", "https"):
        return "http digest" if check.digest is not None else "http code"
    if t in ("tcp", "tls"):
        return "tcp"
    if t in ("send-expect", "binary"):
        return "send expect"
    return t          # icmp, script, none


def availability(check_cnt: int, up_cnt: int) -> str:
    """print_availability(): "NN.NN%", or "" before the first check."""
    if check_cnt == 0:
        return ""
    return f"{up_cnt / check_cnt * 100:.2f}%"


def format_check(host: str, check: str, tls: bool, ms: int, msg: str, code: int,
                 old: HostStatus | int, new: HostStatus | int,
                 check_cnt: int, up_cnt: int) -> str:
    """The health-check log line (log-formats.md)."""
    return (f"host {host}, check {check}{' use tls' if tls else ''} "
            f"({ms}ms,{msg}{f',{code}' if code > 0 else ''}), "
            f"state {_STATUS[int(old)]} -> {_STATUS[int(new)]}, "
            f"availability {availability(check_cnt, up_cnt)}")


class HostState:
    """What hce knows about one host of one table instance."""

    __slots__ = ("conf", "id", "name", "addr", "retry", "parent", "table", "gen",
                 "up", "check_cnt", "up_cnt", "retry_cnt", "he", "code", "last_ms",
                 "last_time", "disabled", "children")

    def __init__(self, conf: InstanceHost, table: "TableState", gen: int) -> None:
        self.conf = conf
        self.id = conf.id
        self.name = conf.conf.name
        self.addr = conf.conf.addr
        self.retry = conf.conf.retry
        self.parent = conf.parent
        self.table = table
        self.gen = gen
        self.up = HostStatus.UNKNOWN
        self.check_cnt = 0            # checks that found the host up or down
        self.up_cnt = 0               # of which up
        self.retry_cnt = 0            # failures still tolerated before `down`
        self.he = HCE_NONE            # last result text
        self.code = 0                 # HTTP code of an `http code mismatch`
        self.last_ms = -1             # duration of the last check (ms); -1: none yet
        self.last_time = 0.0          # wall clock of the last result
        self.disabled = False
        self.children: list[HostState] = []

    def update(self, raw: int, he: str, code: int = 0, ms: int = 0) -> HostStatus:
        """Apply one check result (raw state); return the previous state."""
        old = self.up
        new = raw
        if raw == HOST_DOWN and self.retry_cnt:
            new = old                 # tolerated: keep the state, use a retry
            self.retry_cnt -= 1
        else:
            self.retry_cnt = self.retry
        if new != HOST_UNKNOWN:
            self.check_cnt += 1
            if new == HOST_UP:
                self.up_cnt += 1
        self.up = _STATUS[new]
        self.he = he
        self.code = code
        self.last_ms = ms
        self.last_time = time.time()
        return old

    def carry(self, old: "HostState") -> None:
        """Take over what `old` (same table and host, previous config) learnt."""
        for attr in ("up", "check_cnt", "up_cnt", "retry_cnt", "he", "code",
                     "last_ms", "last_time"):
            setattr(self, attr, getattr(old, attr))
        self.retry_cnt = min(self.retry_cnt, self.retry)

    def reset(self) -> None:
        self.up = HostStatus.UNKNOWN
        self.retry_cnt = 0
        self.he = HCE_NONE
        self.code = 0


class TableState:
    """A table instance at run time."""

    __slots__ = ("conf", "hosts", "disabled", "skip", "countdown", "checked")

    def __init__(self, conf: TableInstance, global_interval: int) -> None:
        self.conf = conf
        self.hosts: list[HostState] = []
        self.disabled = conf.disabled
        # Rounds skipped between two checks: table interval / global - 1.
        self.skip = max(conf.interval // max(global_interval, 1) - 1, 0)
        self.countdown = 0
        self.checked = conf.check.type != "none"


class Hce:
    """The health check engine of one relayd configuration.

    notify(host_id, HostStatus) is called (synchronously, in trio's thread)
    each time a host's state flips; wrap a memory channel's send_nowait or an
    imsg sender in it.  `debug` (-d) logs state changes without `log state
    changes`; None reads it from shared.log.  `run_script(path, name,
    deadline) -> status` replaces check_script.run (the parent round trip
    under privilege separation).
    """

    def __init__(self, conf: RelaydConfig, notify: Notify | None = None, *,
                 debug: bool | None = None,
                 run_script: Callable | None = None) -> None:
        self.notify = notify
        self.debug = bool(getattr(log, "_debug", False)) if debug is None else debug
        self.gen = 0
        self.rounds = 0
        self.checks: dict[str, Callable] = {
            "tcp": check_tcp.check, "tls": check_tcp.check,
            "send-expect": check_tcp.check, "binary": check_tcp.check,
            "http": check_http.check, "https": check_http.check,
            "script": partial(check_script.check, runner=run_script),
        }
        self._pingers: dict[int, check_icmp.Pinger] = {}
        self._icmp_warned: set[int] = set()
        self._poll = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._running = False
        self._build(conf)

    # -- configuration ---------------------------------------------------------
    def _build(self, conf: RelaydConfig) -> None:
        self.conf = conf
        self.gen += 1
        self.log_changes = conf.log_state_changes or self.debug
        self.log_checks = conf.log_host_checks
        self.tables: list[TableState] = []
        self.hosts: dict[int, HostState] = {}
        for inst in conf.instances:
            tbl = TableState(inst, conf.interval)
            for ih in inst.hosts:
                h = HostState(ih, tbl, self.gen)
                if not tbl.checked and not tbl.disabled:
                    h.up = HostStatus.UP
                tbl.hosts.append(h)
                self.hosts[h.id] = h
            self.tables.append(tbl)
        for h in self.hosts.values():
            if h.parent and h.parent in self.hosts:
                self.hosts[h.parent].children.append(h)

    @staticmethod
    def _keys(hosts) -> dict:
        keys: dict = {}
        seen: dict = {}
        for h in hosts:
            k = (h.table.conf.name, h.name)
            n = seen.get(k, 0)
            seen[k] = n + 1
            keys[k + (n,)] = h
        return keys

    def reload(self, conf: RelaydConfig) -> None:
        """Switch to a new configuration, keeping the state of hosts whose
        table instance and host name still exist; restart the rounds (the
        first one at once) and report every host's known state again, by
        its new id."""
        old = self._keys(self.hosts.values())
        self._build(conf)
        for key, h in self._keys(self.hosts.values()).items():
            o = old.get(key)
            if o is not None and h.table.checked and not h.table.disabled:
                h.carry(o)
        if self._scope is not None:
            self._scope.cancel()
        self._resync()

    def _resync(self) -> None:
        for h in self.hosts.values():
            if h.up != HostStatus.UNKNOWN:
                self._notify(h.id, h.up)

    # -- the rounds ------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run rounds until cancelled; started() hands back this Hce."""
        if self._running:
            raise RuntimeError("hce already running")
        self._running = True
        self._resync()
        task_status.started(self)
        try:
            while True:
                with trio.CancelScope() as self._scope:
                    await self._loop()
        finally:
            self._running = False
            self._scope = None
            for p in self._pingers.values():
                p.close()
            self._pingers.clear()

    async def _loop(self) -> None:
        next_at = trio.current_time()
        while True:
            await self.check_round()
            next_at += self.conf.interval
            now = trio.current_time()
            if next_at < now:
                next_at = now
            with trio.move_on_at(next_at):
                await self._poll.wait()
            if self._poll.is_set():
                self._poll = trio.Event()
                for tbl in self.tables:
                    tbl.countdown = 0
                next_at = trio.current_time()

    def poll(self) -> None:
        """Check every host now (relayctl poll); the schedule restarts."""
        self._poll.set()

    async def check_round(self) -> None:
        """One round: check every due host; returns when all are done."""
        self.rounds += 1
        start = trio.current_time()
        icmp: dict[int, list] = {}
        async with trio.open_nursery() as nursery:
            for tbl in self.tables:
                if tbl.disabled or not tbl.checked:
                    continue
                if tbl.countdown > 0:
                    tbl.countdown -= 1
                    continue
                tbl.countdown = tbl.skip
                deadline = start + tbl.conf.timeout / 1000
                kind = tbl.conf.check.type
                for h in tbl.hosts:
                    if h.disabled or h.parent:
                        continue
                    if kind == "icmp":
                        fam = socket.AF_INET6 if ":" in h.addr else socket.AF_INET
                        icmp.setdefault(fam, []).append(
                            (h, h.addr, h.conf.conf.ip_ttl, deadline))
                    else:
                        nursery.start_soon(self._check_one, tbl, h, deadline, start)
            for fam, targets in icmp.items():
                nursery.start_soon(self._icmp, fam, targets, start)

    async def _check_one(self, tbl: TableState, h: HostState, deadline: float,
                         start: float) -> None:
        res = None
        with trio.move_on_at(deadline + CHECK_GRACE):
            try:
                res = await self.checks[tbl.conf.check.type](tbl.conf, h.conf, deadline)
            except Exception as e:        # a bug in a check must not stop hce
                log.warn_exc(f"hce: check of host {h.name} failed: {e!r}")
        self.done(h, res or (HOST_DOWN, HCE_ABORT, 0), start)

    async def _icmp(self, family: int, targets: list, start: float) -> None:
        pinger = self._pingers.get(family)
        if pinger is None:
            pinger = self._pingers[family] = check_icmp.Pinger(family)
        if not pinger.open() and family not in self._icmp_warned:
            self._icmp_warned.add(family)
            log.warn(f"hce: cannot open an ICMP{'v6' if family == socket.AF_INET6 else ''}"
                     f" socket: {pinger.failed}")
        await pinger.ping_all(targets, lambda h, res: self.done(h, res, start))

    # -- results ---------------------------------------------------------------
    def done(self, h: HostState, res: tuple, start: float) -> None:
        """Apply a check result to `h` and to the hosts inheriting from it."""
        ms = max(int((trio.current_time() - start) * 1000), 0)
        state, he, code = res
        self._apply(h, state, he, code, ms)
        for child in h.children:
            if not child.table.disabled:
                self._apply(child, state, he, code, ms)

    def _apply(self, h: HostState, state: int, he: str, code: int, ms: int) -> None:
        if h.gen != self.gen:
            return                        # a check of a previous configuration
        check = h.table.conf.check
        if h.disabled:
            if self.log_changes:
                log.info(f"host {h.name}, check {check_name(check)}"
                         f"{' use tls' if check.tls else ''} (ignoring result, host disabled)")
            return
        old = h.update(state, he, code, ms)
        changed = old != h.up
        if (changed and self.log_changes) or self.log_checks:
            log.info(format_check(h.name, check_name(check), check.tls, ms, he, code,
                                  old, h.up, h.check_cnt, h.up_cnt))
        if changed:
            self._notify(h.id, h.up)

    def _notify(self, host_id: int, state: HostStatus) -> None:
        if self.notify is None:
            return
        try:
            self.notify(host_id, state)
        except Exception as e:            # a consumer's bug must not stop the checks
            log.warn_exc(f"hce: host status notification failed: {e!r}")

    # -- control (relayctl) ----------------------------------------------------
    def _set(self, h: HostState, old: HostStatus, state: HostStatus) -> None:
        h.up = state
        if old != state:
            self._notify(h.id, state)

    def find_host(self, key: int | str) -> HostState | None:
        """A host by id, or the first host of that name."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            return self.hosts.get(int(key))
        return next((h for h in self.hosts.values() if h.name == key), None)

    def find_table(self, key: int | str) -> TableState | None:
        """A table instance by id or by name ("web:80")."""
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        return next((t for t in self.tables if t.conf.id == key or t.conf.name == key),
                    None)

    def set_disabled(self, host: int | str | None = None, table: int | str | None = None,
                     disabled: bool = True) -> bool:
        """`relayctl host|table disable|enable`: False when not found.

        A disabled host is `unknown` with its counters cleared and is not
        checked; a disabled table is not checked and all its hosts are
        `unknown`.  Enabling makes them `unknown` until the next round
        (hosts of unchecked tables go back to `up`)."""
        if host is not None:
            h = self.find_host(host)
            if h is None:
                return False
            old = h.up
            h.disabled = disabled
            h.reset()
            if disabled:
                h.check_cnt = h.up_cnt = 0
            self._set(h, old, HostStatus.UP if not disabled and not h.table.checked
                      and not h.table.disabled else HostStatus.UNKNOWN)
            return True
        if table is not None:
            t = self.find_table(table)
            if t is None:
                return False
            t.disabled = disabled
            for h in t.hosts:
                old = h.up
                h.reset()
                self._set(h, old, HostStatus.UP if not disabled and not t.checked
                          and not h.disabled else HostStatus.UNKNOWN)
            if not disabled:
                t.countdown = 0
            return True
        return False

    # -- views -----------------------------------------------------------------
    def state(self, host_id: int) -> HostStatus:
        h = self.hosts.get(host_id)
        return h.up if h is not None else HostStatus.UNKNOWN

    def states(self) -> dict[int, HostStatus]:
        """Every host's state by id (to seed a relay's table view)."""
        return {h.id: h.up for h in self.hosts.values()}

    def snapshot(self) -> list[dict]:
        """Tables and hosts as plain values (JSON-safe), for relayctl and
        metrics.  See host_info() for the host fields."""
        out = []
        for t in self.tables:
            c = t.conf.check
            out.append({
                "id": t.conf.id, "name": t.conf.name, "port": t.conf.port,
                "check": check_name(c), "tls": c.tls, "checked": t.checked,
                "interval": t.conf.interval, "timeout": t.conf.timeout,
                "disabled": t.disabled,
                "up": sum(1 for h in t.hosts if h.up == HostStatus.UP),
                "hosts": [host_info(h) for h in t.hosts],
            })
        return out


def host_info(h: HostState) -> dict:
    """One host of snapshot(): id, name, addr, table (id), parent (id, 0:
    none), state ("up"/"down"/"unknown"), disabled, check_cnt, up_cnt,
    retry (configured), retry_cnt (retries left), error (last result text,
    "none" before the first), code (HTTP code of a mismatch, else 0),
    latency_ms (last check, -1: none yet), last_check (epoch seconds, 0:
    never), availability ("NN.NN%" or "")."""
    return {
        "id": h.id, "name": h.name, "addr": h.addr, "table": h.table.conf.id,
        "parent": h.parent, "state": str(h.up), "disabled": h.disabled,
        "check_cnt": h.check_cnt, "up_cnt": h.up_cnt, "retry": h.retry,
        "retry_cnt": h.retry_cnt, "error": h.he, "code": h.code,
        "latency_ms": h.last_ms, "last_check": h.last_time,
        "availability": availability(h.check_cnt, h.up_cnt),
    }


async def run(conf: RelaydConfig, notify: Notify | None = None, *,
              task_status=trio.TASK_STATUS_IGNORED, **kwargs) -> None:
    """Run an Hce for `conf`: `hce = await nursery.start(hce.run, conf, notify)`
    gives the engine (for poll/reload/set_disabled/snapshot)."""
    engine = Hce(conf, notify, **kwargs)
    await engine.run(task_status=task_status)


def relay_notify(state) -> Notify:
    """A notify callback feeding a relay_session.RelayState: set_host(id, True|False|None)."""
    def notify(host_id: int, st: HostStatus) -> None:
        state.set_host(host_id, True if st == HostStatus.UP
                       else False if st == HostStatus.DOWN else None)
    return notify


# -- under privilege separation ------------------------------------------------

def host_keys(conf: RelaydConfig) -> dict[tuple, InstanceHost]:
    """Hosts of `conf` by (table instance name, host name, n): how a reload
    matches hosts (reload() does the same on its HostStates)."""
    keys: dict = {}
    seen: dict = {}
    for inst in conf.instances:
        for ih in inst.hosts:
            k = (inst.name, ih.name)
            n = seen.get(k, 0)
            seen[k] = n + 1
            keys[k + (n,)] = ih
    return keys


def carry_states(old: RelaydConfig, new: RelaydConfig, states: dict[int, str]) -> dict[int, str]:
    """Host states ("up"/"down"/"unknown") by id of `old` -> by id of `new`,
    as reload() carries them: checked, enabled tables keep what was learnt,
    unchecked ones are up."""
    old_keys = host_keys(old)
    out: dict[int, str] = {}
    for key, ih in host_keys(new).items():
        inst = new.instance(ih.table_id)
        if inst is None or inst.disabled:
            continue
        if inst.check.type == "none":
            out[ih.id] = "up"
            continue
        o = old_keys.get(key)
        if o is not None and o.id in states:
            out[ih.id] = states[o.id]
    return out


# Check types that connect to the table instance's port (ICMP and scripts
# connect nowhere from hce; `none` is not checked).
TCP_CHECKS = frozenset({"tcp", "tls", "send-expect", "binary", "http", "https"})


def check_ports(conf: RelaydConfig) -> tuple[int, ...]:
    """The TCP ports hce connects to for `conf`'s checks: its Landlock
    connect rule.  Disabled tables count: relayctl may enable them."""
    return tuple(sorted({i.port for i in conf.instances if i.check.type in TCP_CHECKS}))


def seed(engine: Hce, states: dict[int, str], disabled_hosts=(), tables=None) -> None:
    """Start `engine` from what the parent knows (a new hce after a reload
    or a crash): host states by id, relayctl's disabled hosts and tables.
    A known state comes with its retries in hand, as after a check."""
    by_name = {str(v): v for v in HostStatus}
    for hid, st in states.items():
        h = engine.hosts.get(int(hid))
        if h is None or not h.table.checked or h.table.disabled or st not in by_name:
            continue
        h.up = by_name[st]
        if h.up != HostStatus.UNKNOWN:
            h.retry_cnt = h.retry
    for tid, off in (tables or {}).items():
        if off:
            engine.set_disabled(table=int(tid), disabled=True)
    for hid in disabled_hosts:
        engine.set_disabled(host=int(hid), disabled=True)


def preload() -> None:
    """Load before the chroot what the checks would load lazily."""
    import encodings.idna  # noqa: F401
    check_tcp.tls_context()
    trio.to_thread  # noqa: B018


class Commands:
    """hce's side of relayctl's switches and views (the parent forwards
    them; InProcessBackend does the same in one process)."""

    def __init__(self, engine: Hce) -> None:
        self.engine = engine
        self.quiet = False          # no monitor events for what a switch causes

    def run(self, cmd: dict):
        what = cmd["cmd"]
        engine = self.engine
        if what == "snapshot":
            return engine.snapshot()
        if what == "poll":
            engine.poll()
            return True
        if what == "host":
            return self.host(cmd["key"], bool(cmd["enable"]))
        if what == "table":
            return self.table(cmd["key"], bool(cmd["enable"]))
        raise ValueError(f"unknown command {what!r}")

    @staticmethod
    def _key(key):
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError("bad key")
        return key

    def host(self, key, enable: bool) -> dict:
        engine = self.engine
        h = engine.find_host(self._key(key))
        if h is None:
            return {"found": False}
        if h.parent:
            return {"found": True, "error": f"host {h.name} (id {h.id}) follows its parent "
                                            f"host {h.parent}; switch that one"}
        ids = [h.id] + [c.id for c in h.children]
        changed = h.disabled != (not enable)
        if changed:
            self.quiet = True
            try:
                for hid in ids:
                    engine.set_disabled(host=hid, disabled=not enable)
            finally:
                self.quiet = False
            log.debug(f"{'enable' if enable else 'disable'}_host: host {h.id}")
        return {"found": True, "id": h.id, "ids": ids, "changed": changed}

    def table(self, key, enable: bool) -> dict:
        engine = self.engine
        t = engine.find_table(self._key(key))
        if t is None:
            return {"found": False}
        changed = t.disabled != (not enable)
        if changed:
            self.quiet = True
            try:
                engine.set_disabled(table=t.conf.id, disabled=not enable)
            finally:
                self.quiet = False
            log.debug(f"{'enable' if enable else 'disable'}_table: table {t.conf.id}")
        return {"found": True, "id": t.conf.id, "changed": changed}


def child_main(fd: int) -> int:
    """`relayd -P hce`: take the config, open the ICMP sockets, sandbox, check."""
    sock = proc.child_socket(fd)
    setup = proc.recv_setup(sock)
    cfg = setup.config
    conf: RelaydConfig = cfg["conf"]
    gen = [int(cfg.get("gen", 0))]
    # As OpenBSD's hce: both ICMP sockets are opened before the drop.
    pingers = {}
    for fam in (socket.AF_INET, socket.AF_INET6):
        p = check_icmp.Pinger(fam)
        p.open()
        pingers[fam] = p
    preload()
    user = proc.find_user((cfg["user"],)) if cfg.get("user") else None
    proc.drop_privileges(cfg.get("chroot"), user)
    # OpenBSD: pledge("stdio recvfd inet"); the ICMP sockets are open
    # already.  Connects only to the check ports: a reload that needs
    # another one gets a new hce (the parent compares check_ports()).
    pledge.pledge("hce", ("stdio", "inet"), connect=check_ports(conf))
    status = [0]

    async def main() -> None:
        chan = Channel(sock, allow_pickle=True, reader=setup.reader)
        out_send, out_recv = trio.open_memory_channel(math.inf)
        pending = proc.Pending()
        commands: list[Commands] = []

        def notify(host_id: int, state: HostStatus) -> None:
            h = engine.hosts.get(host_id)
            out_send.send_nowait((Imsg.HOST_STATUS, {
                "gen": gen[0], "id": host_id, "state": str(state),
                "name": h.name if h is not None else "",
                "quiet": bool(commands and commands[0].quiet)}))

        async def run_script(path: str, name: str, deadline: float) -> int:
            seq, wait = pending.new()
            timeout = max(deadline - trio.current_time(), 0.0)
            out_send.send_nowait((Imsg.SCRIPT_RUN, {"seq": seq, "path": path, "host": name,
                                                    "timeout": timeout}))
            res = await wait(timeout + 5.0)
            return res if isinstance(res, int) and not isinstance(res, bool) else -1

        async def sender() -> None:
            async for mtype, payload in out_recv:
                await chan.send(mtype, payload)

        engine = Hce(conf, notify, run_script=run_script)
        engine._pingers.update(pingers)
        commands.append(Commands(engine))
        # Before run(): its first resync reports these states again.
        commands[0].quiet = True
        seed(engine, cfg.get("states") or {}, cfg.get("disabled_hosts") or (),
             cfg.get("tables") or {})
        commands[0].quiet = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await nursery.start(engine.run)
            await chan.send(Imsg.CTL_READY)

            def handle(msg) -> None:
                p = msg.payload
                if msg.type == Imsg.HCE_COMMAND:
                    result = commands[0].run(p)
                    if "seq" in p:
                        out_send.send_nowait((Imsg.CTL_REPLY, {"seq": p["seq"],
                                                               "result": result}))
                elif msg.type == Imsg.CFG_RELOAD:
                    gen[0] = int(p["gen"])
                    engine.reload(p["conf"])
                elif msg.type == Imsg.SCRIPT_RESULT:
                    pending.answer(p)
                else:
                    raise ValueError(f"unknown message type {msg.type}")
            status[0] = await proc.parent_messages(chan, "hce", handle)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return status[0]
