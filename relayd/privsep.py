"""relayd.privsep -- relayd's processes, and the pfe process itself.

OpenBSD's relayd split, on Linux (features.md 3.3):

  process  count      chroot / user              keeps            role
  parent   1          none / root                everything       config, sockets,
                                                                  scripts, message hub
  pfe      1          /var/empty / _relayd       CAP_NET_ADMIN    nftables redirects,
                                                                  routes, demotion, the
                                                                  control socket, metrics
  hce      1          /var/empty / _relayd       -                health checks
  relay    prefork    /var/empty / _relayd       -                relays

Every child is `python -m relayd -P <title> -I <instance> -S <fd>`
(shared.proc), reads its configuration and descriptors from the parent,
then drops privileges (PR_SET_NO_NEW_PRIVS included) and pledges
(shared.pledge: seccomp and Landlock).  pfe drives nftables through
libnftables (relayd.nft, its netlink socket opened before the chroot) and
pyroute2, keeping CAP_NET_ADMIN for both; keepalived track files are
written by the parent.

Messages go through the parent, which never unpickles what a child sends
(JSON up, pickle down):

  hce -> parent -> relays, pfe     HOST_STATUS {"gen", "id", "state", "name", "quiet"}
  hce -> parent -> hce             SCRIPT_RUN / SCRIPT_RESULT (the parent runs scripts)
  pfe -> parent                    CTL_COMMAND {"seq", "cmd", ...} (relayctl, metrics)
  parent -> hce / relays           HCE_COMMAND / CTL_COMMAND {"seq", ...}
  hce / relays -> parent           CTL_REPLY {"seq", "result"}
  parent -> pfe                    CTL_REPLY {"seq", "result"} (sums over relays)
  relay -> parent                  RELAY_STATS {"final": true, ...} when it exits
  pfe -> parent                    DEMOTE {"group", "level"}
  parent -> hce, pfe               CFG_RELOAD {"conf", "gen"} (a new configuration)

This module is the pfe process (pfe_main): relayd.pfe.Pfe fed with the
HOST_STATUS the parent forwards, the control socket (control.serve with a
control.MessageBackend) and the Prometheus exporter (metrics, remote mode).
"""

from __future__ import annotations

import math
import re
import socket

import trio

from engine.serve import Listener
from relayd import carp, control, metrics
from relayd import pfe as pfe_mod
from shared import pledge, proc
from shared.imsg import Channel, Imsg

# Group names a DEMOTE may name (a file name in the demote directory).
GROUP_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class RemoteDemote(carp.Demote):
    """carp.Demote whose files the parent writes (pfe cannot: not root)."""

    def __init__(self, send) -> None:
        super().__init__()
        self.send = send

    def _write(self, group: str, value: int) -> str | None:
        self.send(Imsg.DEMOTE, {"group": group, "level": value})
        self.written[group] = value
        return None


def valid_demote(payload) -> tuple[str, int]:
    """(group, level) of a DEMOTE from pfe; ValueError when malformed."""
    group, level = payload["group"], payload["level"]
    if not isinstance(group, str) or not GROUP_RE.match(group):
        raise ValueError(f"bad demote group {group!r}")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 1 << 16:
        raise ValueError(f"bad demote level {level!r}")
    return group, level


def preload() -> dict:
    """Import (and open) before the drop what pfe would load lazily."""
    import encodings.idna  # noqa: F401
    import prometheus_client  # noqa: F401
    out: dict = {"nft": pfe_mod.Nft()}
    # The netlink socket of libnftables, opened now (seccomp keeps pfe from
    # opening new ones of that family); asking the version warms it up.
    if out["nft"].open():
        out["nft"].version_now()
    try:
        from relayd import pfe_route
        out["routes"] = pfe_route.Routes()
    except Exception:         # noqa: BLE001 -- no pyroute2: pfe says so itself
        pass
    return out


def pfe_main(fd: int) -> int:
    """`relayd -P pfe`: redirections, routers, control socket, metrics."""
    sock = proc.child_socket(fd)
    setup = proc.recv_setup(sock)
    cfg = setup.config
    conf = cfg["conf"]
    gen = [int(cfg.get("gen", 0))]
    ctl = setup.fds(Imsg.CFG_CONTROL)
    control_sock = socket.socket(fileno=ctl[0].fd) if ctl and ctl[0].fd >= 0 else None
    metric_socks = {tuple(m.payload["key"]): socket.socket(fileno=m.fd)
                    for m in setup.fds(Imsg.CFG_METRICS) if m.fd >= 0}
    extra = preload()
    user = proc.find_user((cfg["user"],)) if cfg.get("user") else None
    proc.drop_privileges(cfg.get("chroot"), user, keep_caps=(proc.CAP_NET_ADMIN,))
    # OpenBSD: pledge("stdio recvfd unix pf"); pf is netlink here (routes and
    # nftables), unix the control socket.
    pledge.pledge("pfe", ("stdio", "unix", "route"), connect=())
    status = [0]

    async def main() -> None:
        chan = Channel(sock, allow_pickle=True, reader=setup.reader)
        pending = proc.Pending()
        out_send, out_recv = trio.open_memory_channel(math.inf)

        async def sender() -> None:
            async for mtype, payload in out_recv:
                try:
                    await chan.send(mtype, payload)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    return

        async def ask(cmd: dict, timeout: float):
            seq, wait = pending.new()
            out_send.send_nowait((Imsg.CTL_COMMAND, {**cmd, "seq": seq}))
            return await wait(timeout)

        pfe = pfe_mod.Pfe(conf, demote=RemoteDemote(lambda t, p: out_send.send_nowait((t, p))),
                          routes=extra.get("routes"), nft=extra["nft"])
        for hid, st in (cfg.get("states") or {}).items():
            pfe.set_host(int(hid), st)
        backend = control.MessageBackend(conf, ask, pfe)

        # The exporter runs even without `metrics listen on`: a reload may
        # add sockets (CFG_METRICS).
        mx = metrics.Metrics(remote=True)
        mx.attach_demote(pfe.demote)

        async def refresh() -> None:
            snap = await ask({"cmd": "snapshot"}, 5.0)
            if isinstance(snap, list):
                mx.view.tables = snap
                backend.snapshot = snap
            st = await ask({"cmd": "stats"}, 5.0)
            if isinstance(st, dict):
                mx.view.active, mx.totals = sum_stats(st)
        mx.refresh = refresh
        mserver = metrics.make_server(mx)
        mlisteners = {k: Listener(s) for k, s in metric_socks.items()}

        async with trio.open_nursery() as outer:
            outer.start_soon(sender)
            async with trio.open_nursery() as inner:
                await inner.start(pfe.run)
                if control_sock is not None:
                    await inner.start(control.serve, control_sock, backend)
                await inner.start(mserver.run, list(mlisteners.values()))
                await chan.send(Imsg.CTL_READY)

                def handle(msg) -> None:
                    p = msg.payload
                    if msg.type == Imsg.CTL_REPLY:
                        pending.answer(p)
                    elif msg.type == Imsg.HOST_STATUS:
                        if int(p["gen"]) == gen[0]:
                            pfe.notify(int(p["id"]), p["state"])
                            backend.host_status(int(p["id"]), str(p["state"]),
                                                str(p.get("name", "")), bool(p.get("quiet")))
                    elif msg.type == Imsg.CFG_RELOAD:
                        gen[0] = int(p["gen"])
                        pfe.reload_soon(p["conf"])
                        backend.configure(p["conf"])
                        keep = {tuple(k) for k in p.get("metrics", [])}
                        for k in list(mlisteners):
                            if k not in keep:
                                lis = mlisteners.pop(k)
                                mserver.remove_listener(lis)
                                lis.tsock.close()
                    elif msg.type == Imsg.CFG_METRICS:
                        key = tuple(p["key"])
                        s = socket.socket(fileno=msg.fd)
                        if key in mlisteners:
                            s.close()
                        else:
                            mlisteners[key] = Listener(s)
                            mserver.add_listener(mlisteners[key])
                    else:
                        raise ValueError(f"unknown message type {msg.type}")
                status[0] = await proc.parent_messages(chan, "pfe", handle)
                pending.fail_all()
                # Cancelling pfe.run() deletes the nft table and the routes
                # and undoes demotions (DEMOTE messages, sent below).
                inner.cancel_scope.cancel()
            out_send.close()        # the sender sends what is queued, then ends
            outer.cancel_scope.deadline = trio.current_time() + 5

    trio.run(main)
    return status[0]


def sum_stats(st: dict) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(open sessions by relay, {"ended": ..., "errors": ...}) summed over
    the relay processes of a "stats" answer (and those that exited)."""
    active: dict[str, int] = {}
    totals: dict[str, dict[str, int]] = {"ended": {}, "errors": {}}
    retired = st.get("retired") or {}
    for what in ("ended", "errors"):
        for name, n in (retired.get(what) or {}).items():
            totals[what][name] = totals[what].get(name, 0) + int(n)
    for w in st.get("workers") or []:
        for name, n in (w.get("active") or {}).items():
            active[name] = active.get(name, 0) + int(n)
        for what in ("ended", "errors"):
            for name, n in (w.get(what) or {}).items():
                totals[what][name] = totals[what].get(name, 0) + int(n)
    return active, totals
