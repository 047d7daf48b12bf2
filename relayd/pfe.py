"""relayd.pfe -- the packet filter engine: redirections, routers, demotion.

OpenBSD's pfe keeps the pf anchors of the redirects and the routes of the
routers in step with the host states hce reports.  Pfe does the same on
Linux: redirects are nftables rules in table `inet relayd` (built by
pfe_filter, applied through libnftables (relayd.nft), one transaction per
change),
routers are kernel routes written with netlink (pfe_route), and `demote
GROUP` writes keepalived track files (carp).  It needs CAP_NET_ADMIN; a
process without it says so once at start and leaves all three alone (the
relays run regardless).  Nothing is touched for a configuration without
redirects, routers and demote groups.

API (what the process hosting it calls; all in one trio task at a time):

    pfe = Pfe(conf)
    await pfe.start()                      replace the table, flush stale routes
    await pfe.host_status(host_id, up)     up: True / False / None (unknown) or
                                           an hce.HostStatus; updates rules/routes
    pfe.set_host(host_id, up); await pfe.sync()   the same, batched
    await pfe.redirect_set(name_or_id, enabled) -> bool   relayctl redirect ...
    await pfe.reload(new_conf)             keep host states, rebuild the table
    await pfe.refresh_stats()              read the nft counters
    pfe.snapshot() -> rows                 control_rows.redirect_row/router_row dicts
    await pfe.stop()                       delete the table and routes, undemote

or let run() do it: `pfe = await nursery.start(Pfe(conf).run)` starts it,
then pfe.notify(host_id, state) (a synchronous hce notify callback) and
pfe.reload_soon(conf) queue work in order, and cancelling run() stops it.

Failures: an nft transaction that fails changes nothing in the kernel; the
error and the command it failed on (found with dry runs of prefixes of the
transaction) are logged and the rules in force stay what they were (the
next change tries again).  A failed route change is logged and the route
is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import trio

from relayd import carp, control_rows, pfe_filter, pfe_route
from relayd.config import (RELAY_STATINTERVAL, RedirectConfig, RelaydConfig,
                           RouterConfig)
from relayd.nft import Nft, NftError  # noqa: F401  (NftError: pfe's API)
from relayd.pfe_filter import Pool
from relayd.stats import Counters
from shared import log, proc

CAP_NET_ADMIN = 12
# Seconds between two reads of the nft counters by run().
STATS_POLL = 5.0
# First nft whose JSON parser keeps a ct timeout object's policy.
NFT_JSON_CT_TIMEOUT = (1, 0, 9)


def has_net_admin(status_text: str | None = None) -> bool:
    """Is CAP_NET_ADMIN in this process's effective set?  (From
    /proc/PID/status text when given; else capget(2), which works in a
    chroot without /proc.)"""
    if status_text is None:
        return bool(proc.effective_caps() >> CAP_NET_ADMIN & 1)
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
            except (IndexError, ValueError):
                break
    return os.geteuid() == 0


def _state(up: Any) -> bool | None:
    """True (up), False (down) or None (unknown) from a bool/None or an
    hce.HostStatus / OpenBSD HOST_* value (1 up, -1 down, 0 unknown)."""
    if up is None or isinstance(up, bool):
        return up
    try:
        n = int(up)
    except (TypeError, ValueError):
        s = str(up)
        return True if s == "up" else False if s == "down" else None
    return True if n > 0 else False if n < 0 else None


class Pfe:
    """Redirections, routers and carp demotion of one relayd configuration."""

    def __init__(self, conf: RelaydConfig, *, nft: Nft | None = None,
                 routes: Any = None, demote: carp.Demote | None = None,
                 capable: bool | None = None) -> None:
        self.conf = conf
        self.nft = nft if nft is not None else Nft()
        self._routes = routes                      # pfe_route.Routes (made at start)
        self.demote = demote if demote is not None else carp.Demote()
        self.capable = capable
        self.states: dict[int, bool | None] = {}   # host id -> up / down / unknown
        self.enabled: dict[int, bool] = {}         # redirect id -> enabled
        self.applied: dict[int, Pool] = {}         # redirect id -> pool in the kernel
        self.routes_applied: dict[pfe_route.RouteKey, tuple[str, ...]] = {}
        self.nft_active = False                    # table inet relayd is ours and loaded
        self.table_owned = False                   # we (tried to) load it: delete at stop
        self.rt_active = False                     # routes can be written
        self.ct_timeouts = True                    # session timeout objects work
        self.counters: dict[int, Counters] = {}
        self._raw: dict[int, int] = {}
        self._warned: set[str] = set()
        self._lock = trio.Lock()
        self._send, self._recv = trio.open_memory_channel(math.inf)
        self._setup(conf)

    # -- configuration ---------------------------------------------------------
    def _setup(self, conf: RelaydConfig) -> None:
        self.conf = conf
        self.enabled = {r.id: not r.disabled for r in conf.redirects}
        now = time.monotonic()
        self.counters = {r.id: Counters(RELAY_STATINTERVAL, now) for r in conf.redirects}
        self._raw = {}

    @staticmethod
    def needed(conf: RelaydConfig) -> bool:
        """Has `conf` anything for pfe to do?"""
        return bool(conf.redirects or conf.routers or _groups(conf))

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warn(msg)

    def _host_keys(self, conf: RelaydConfig) -> dict[tuple, int]:
        keys: dict[tuple, int] = {}
        seen: dict[tuple, int] = {}
        for inst in conf.instances:
            for h in inst.hosts:
                k = (inst.name, h.name)
                n = seen.get(k, 0)
                seen[k] = n + 1
                keys[k + (n,)] = h.id
        return keys

    # -- host states -------------------------------------------------------------
    def set_host(self, host_id: int, up: Any) -> None:
        """Record a host's state; sync() applies what changed."""
        self.states[host_id] = _state(up)

    def up(self, host_id: int) -> bool:
        return self.states.get(host_id) is True

    def pool(self, rdr: RedirectConfig) -> Pool:
        """What the redirect's rules should send traffic to now."""
        if not self.enabled.get(rdr.id, not rdr.disabled):
            return Pool(enabled=False)
        for fwd, backup in ((rdr.table, False), (rdr.backup, True)):
            if fwd is None or fwd.table is None:
                continue
            hosts = tuple((h.id, h.addr) for h in fwd.table.hosts if self.up(h.id))
            if hosts:
                return Pool(True, hosts, backup)
        return Pool(True, (), False)

    async def host_status(self, host_id: int, up: Any) -> None:
        self.set_host(host_id, up)
        await self.sync()

    async def sync(self) -> None:
        """Bring rules, routes and demotion in line with the host states."""
        async with self._lock:
            await self._sync_redirects()
            await self._sync_routes()
            self._sync_demote()

    # -- redirects ---------------------------------------------------------------
    async def _sync_redirects(self) -> None:
        if not self.nft_active:
            return
        cmds: list[dict] = []
        changed: dict[int, Pool] = {}
        for rdr in self.conf.redirects:
            new = self.pool(rdr)
            old = self.applied.get(rdr.id)
            if new == old:
                continue
            changed[rdr.id] = new
            cmds += pfe_filter.redirect_update(rdr, new, old, ct_timeouts=self.ct_timeouts)
        if not cmds:
            return
        try:
            await self.nft.apply(cmds)
        except NftError as e:
            names = ", ".join(r.name for r in self.conf.redirects if r.id in changed)
            self._log_nft(f"pfe_sync: cannot update redirect {names}", e)
            return
        for rdr in self.conf.redirects:
            if rdr.id in changed:
                new = changed[rdr.id]
                log.debug(f"pfe_sync: redirect {rdr.name}: "
                          f"{'disabled' if not new.enabled else ', '.join(new.addrs) or 'no host up'}"
                          f"{' (backup table)' if new.backup else ''}")
                self.applied[rdr.id] = new

    @staticmethod
    def _log_nft(what: str, e: NftError) -> None:
        log.warn(f"{what}: {e}; keeping the previous rules")
        if e.failed is not None:
            log.warn(f"pfe: failed command: {pfe_filter.describe(e.failed)}: "
                     f"{json.dumps(e.failed, separators=(',', ':'))}")

    async def _load_table(self) -> bool:
        """Replace table inet relayd with the rules for the current pools.

        With `session timeout` objects and an nft older than 1.0.9 (whose
        JSON parser drops a ct timeout's policy) the table and those objects
        are made first in a text transaction, then the rest goes in as JSON:
        two transactions instead of one."""
        pools = {r.id: self.pool(r) for r in self.conf.redirects}
        self.table_owned = True
        timeouts = pfe_filter.ct_timeouts_text(self.conf)
        self.ct_timeouts = bool(timeouts)
        json_timeouts = bool(timeouts) and await self.nft.version() >= NFT_JSON_CT_TIMEOUT
        reset = True
        if timeouts and not json_timeouts:
            t = f"add table {pfe_filter.FAMILY} {pfe_filter.TABLE}\n"
            try:
                await self.nft.apply_text(t + f"delete table {pfe_filter.FAMILY} "
                                          f"{pfe_filter.TABLE}\n" + t + timeouts)
                reset = False
            except NftError as e:
                self._warn_once("ct-timeout", f"pfe_init: cannot create ct timeout objects "
                                f"({e}); `session timeout` is not applied to connections")
                self.ct_timeouts = False
        try:
            await self.nft.apply(pfe_filter.ruleset(
                self.conf, pools, reset=reset, ct_timeouts=self.ct_timeouts,
                timeout_objects=json_timeouts))
        except NftError as e:
            self._log_nft("pfe_init: cannot load table inet relayd", e)
            if not reset:
                try:
                    await self.nft.apply(pfe_filter.table_delete())
                except NftError:
                    pass
            self.applied = {}
            return False
        self.applied = pools
        return True

    async def redirect_set(self, key: int | str, enabled: bool) -> bool:
        """`relayctl redirect enable|disable NAME|ID`; False: no such redirect."""
        rdr = self.find_redirect(key)
        if rdr is None:
            return False
        if self.enabled.get(rdr.id) != enabled:
            self.enabled[rdr.id] = enabled
            log.debug(f"{'enable' if enabled else 'disable'}_rdr: redirect {rdr.id}")
            await self.sync()
        return True

    def find_redirect(self, key: int | str) -> RedirectConfig | None:
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        for r in self.conf.redirects:
            if (r.id == key) if isinstance(key, int) else (r.name == key):
                return r
        return None

    # -- routers -----------------------------------------------------------------
    def desired_routes(self) -> dict[pfe_route.RouteKey, tuple[str, ...]]:
        out: dict = {}
        for rt in self.conf.routers:
            ups = {h.id for h in rt.forward.table.hosts if self.up(h.id)} \
                if rt.forward.table is not None else set()
            for k, gws in pfe_route.desired_routes(rt, ups).items():
                if k in out:            # two routers, same route: merge the gateways
                    gws = out[k] + tuple(g for g in gws if g not in out[k])
                out[k] = gws
        return out

    async def _sync_routes(self) -> None:
        if not self.rt_active:
            return
        want = self.desired_routes()
        for key in sorted(set(want) | set(self.routes_applied)):
            new, old = want.get(key), self.routes_applied.get(key)
            if new == old:
                continue
            try:
                if new:
                    await trio.to_thread.run_sync(self._routes.replace, key, new)
                    self.routes_applied[key] = new
                    log.debug(f"pfe_route: {'changed' if old else 'added'} route "
                              f"{pfe_route.describe(key, new)}")
                else:
                    await trio.to_thread.run_sync(self._routes.delete, key)
                    del self.routes_applied[key]
                    log.debug(f"pfe_route: removed route {pfe_route.describe(key)}")
            except pfe_route.RouteError as e:
                verb = "add" if new and not old else "change" if new else "delete"
                log.warn(f"pfe_route: cannot {verb} route "
                         f"{pfe_route.describe(key, new or old or ())}: {e}")

    # -- carp demotion -------------------------------------------------------------
    def _sync_demote(self) -> None:
        """A table with `demote GROUP` demotes its group while none of its
        hosts is up and at least one is down (not while all are unknown:
        before the first check, or disabled)."""
        for inst in self.conf.instances:
            if inst.demote:
                states = [self.states.get(h.id) for h in inst.hosts]
                self.demote.set(inst.demote, inst.id,
                                not any(s is True for s in states)
                                and any(s is False for s in states))
        self._log_demote(self.demote.commit())

    def _log_demote(self, changes) -> None:
        for group, level, prev, err in changes:
            if err:
                self._warn_once(f"demote:{group}", err)
            elif (text := carp.change_text(group, level, prev)) is not None:
                log.info(text)
            else:
                log.debug(f"carp_demote_init: group {group} reset ({self.demote.path(group)})")

    # -- life cycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Install what the configuration asks for (no host is up yet):
        replace table inet relayd, remove relayd routes a previous run
        left in the routers' tables, reset the demote files to 0."""
        async with self._lock:
            self.demote.configure(_groups(self.conf))
            await self._install(first=True)

    async def _install(self, first: bool) -> None:
        conf = self.conf
        if conf.redirects or conf.routers:
            if self.capable is None:
                self.capable = has_net_admin()
            if not self.capable:
                self._warn_once("cap", "pfe_init: no CAP_NET_ADMIN: redirections and "
                                "routers are not installed, running the relays only")
        if self.capable and conf.routers:
            await self._init_routes(first)
        if self.capable and conf.redirects:
            if not self.nft.available():
                self._warn_once("nft", f"pfe_init: {self.nft.error}: "
                                "redirections are not installed")
            else:
                self.nft_active = await self._load_table()
                if self.nft_active:
                    log.debug(f"pfe_init: table {pfe_filter.FAMILY} {pfe_filter.TABLE} "
                              f"loaded, {len(conf.redirects)} redirect(s)")
        await self._sync_redirects()
        await self._sync_routes()
        self._sync_demote()

    async def _init_routes(self, first: bool) -> None:
        conf = self.conf
        if any(r.rtlabel for r in conf.routers):
            self._warn_once("rtlabel", "pfe_route: rtlabel has no Linux equivalent, ignored "
                            f"(relayd's routes carry protocol {pfe_route.RTPROT_RELAYD})")
        if not self.rt_active:
            try:
                if self._routes is None:
                    self._routes = pfe_route.Routes()
                self.rt_active = True
            except ImportError as e:
                self._warn_once("pyroute2", f"pfe_route: no netlink library ({e}); "
                                "routers are not installed")
                return
        if first:
            tables = {pfe_route.rt_table(r.rtable) for r in conf.routers}
            try:
                n = await trio.to_thread.run_sync(self._routes.flush, tables)
            except Exception as e:          # noqa: BLE001 -- a dump failure is not fatal
                log.warn(f"pfe_route: cannot list routes: {e}")
            else:
                if n:
                    log.info(f"pfe_route: removed {n} stale route{'s' if n > 1 else ''}")

    async def reload(self, conf: RelaydConfig) -> None:
        """Switch to a new configuration: host states carry over by (table
        instance, host name), the table is rebuilt (or deleted), routes
        change only where they differ, demotions follow the new tables."""
        async with self._lock:
            old_keys = self._host_keys(self.conf)
            old_states = self.states
            self.states = {}
            for k, hid in self._host_keys(conf).items():
                if k in old_keys and old_keys[k] in old_states:
                    self.states[hid] = old_states[old_keys[k]]
            self._setup(conf)
            self.demote.configure(_groups(conf))
            if (self.nft_active or self.table_owned) and not conf.redirects:
                try:
                    await self.nft.apply(pfe_filter.table_delete())
                except NftError as e:
                    self._log_nft("pfe_reload: cannot delete table inet relayd", e)
                self.nft_active = self.table_owned = False
                self.applied = {}
            await self._install(first=False)

    async def stop(self) -> None:
        """Delete the table and the routes, undo the demotions."""
        async with self._lock:
            if self.nft_active or self.table_owned:
                try:
                    await self.nft.apply(pfe_filter.table_delete())
                except NftError as e:
                    log.warn(f"pfe_shutdown: cannot delete table inet relayd: {e}")
                self.nft_active = self.table_owned = False
                self.applied = {}
            if self.rt_active:
                for key in sorted(self.routes_applied):
                    try:
                        await trio.to_thread.run_sync(self._routes.delete, key)
                    except pfe_route.RouteError as e:
                        log.warn(f"pfe_shutdown: cannot delete route "
                                 f"{pfe_route.describe(key)}: {e}")
                self.routes_applied = {}
                self.rt_active = False
            self._log_demote(self.demote.shutdown())

    # -- statistics and views ----------------------------------------------------------
    async def refresh_stats(self) -> None:
        """Read the per-redirect connection counters into the statistics."""
        if not self.nft_active:
            return
        raw = await self.nft.counters()
        now = time.monotonic()
        for rdr in self.conf.redirects:
            n = raw.get(pfe_filter.counter_name(rdr))
            if n is None:
                continue
            last = self._raw.get(rdr.id, 0)
            delta = n - last if n >= last else n     # a smaller value: table was replaced
            self._raw[rdr.id] = n
            c = self.counters.get(rdr.id)
            if c is not None and delta > 0:
                c.advance(now)
                c.cur += delta

    def redirect_status(self, rdr: RedirectConfig) -> str:
        """active / active (using backup table) / down / disabled."""
        if not self.enabled.get(rdr.id, not rdr.disabled):
            return "disabled"
        pool = self.applied.get(rdr.id) if self.nft_active else None
        if pool is None or not pool.enabled or not pool.hosts:
            return "down"
        return "active (using backup table)" if pool.backup else "active"

    def snapshot(self) -> list[dict]:
        """Redirect rows, router rows (control_rows.redirect_row/router_row
        fields plus the installed hosts / nexthops), then a demote row per
        carp group."""
        rows: list[dict] = []
        now = time.monotonic()
        for rdr in self.conf.redirects:
            status = self.redirect_status(rdr)
            pool = self.applied.get(rdr.id) if self.nft_active else None
            c = self.counters.get(rdr.id)
            stats = [c.snapshot(now)] if c is not None else []
            row = control_rows.redirect_row(rdr.id, rdr.name, status == "disabled",
                                            down=status in ("down", "disabled"),
                                            backup=status.endswith("(using backup table)"),
                                            stats=stats)
            row["status"] = status
            row["hosts"] = list(pool.addrs) if pool is not None else []
            rows.append(row)
        for rt in self.conf.routers:
            rows.append(self.router_row(rt))
        for group, level in self.demote.levels().items():
            rows.append(control_rows.demote_row(group, level, self.demote.path(group)))
        return rows

    def router_row(self, rt: RouterConfig) -> dict:
        row = control_rows.router_row(rt.id, rt.name, rt.disabled, rtable=rt.rtable,
                                      rtlabel=rt.rtlabel,
                                      routes=[[str(n.network_address), n.prefixlen]
                                              for n in rt.routes])
        table = pfe_route.rt_table(rt.rtable)
        nets = {str(n) for n in rt.routes}
        row["installed"] = [[k.dst, k.metric, list(g)]
                            for k, g in sorted(self.routes_applied.items())
                            if k.table == table and k.dst in nets]
        return row

    # -- a task of its own ---------------------------------------------------------------
    def notify(self, host_id: int, state: Any) -> None:
        """hce notify callback (synchronous): queue a host state."""
        self._send.send_nowait(("host", host_id, state))

    def reload_soon(self, conf: RelaydConfig) -> None:
        """Queue a reload; host states queued after it use the new ids."""
        self._send.send_nowait(("reload", conf, None))

    async def _handle(self, msg: tuple) -> None:
        kind, a, b = msg
        if kind == "host":
            self.set_host(a, b)
        elif kind == "reload":
            await self.sync()
            await self.reload(a)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """start(), then apply queued host states (in batches) and read the
        counters every STATS_POLL seconds until cancelled; stop() on the way
        out."""
        try:
            await self.start()
            task_status.started(self)
            next_stats = trio.current_time() + STATS_POLL
            while True:
                with trio.move_on_at(next_stats):
                    msg = await self._recv.receive()
                    await self._handle(msg)
                    while True:
                        try:
                            msg = self._recv.receive_nowait()
                        except trio.WouldBlock:
                            break
                        await self._handle(msg)
                    await self.sync()
                if trio.current_time() >= next_stats:
                    next_stats = trio.current_time() + STATS_POLL
                    await self.refresh_stats()
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()


def _groups(conf: RelaydConfig) -> set[str]:
    return {i.demote for i in conf.instances if i.demote}
