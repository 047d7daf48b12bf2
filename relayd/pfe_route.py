"""relayd.pfe_route -- routers: health-checked gateways as kernel routes.

OpenBSD's pfe_route.c writes RTM_ADD/RTM_DELETE on the routing socket for
every (route, gateway) pair: one static multipath route per gateway and
network, priority from the host's `priority` (8 when none), in `rtable`,
labelled `rtlabel`.  Linux keeps the nexthops of one multipath route
together (RTA_MULTIPATH), so here the up gateways of a router with the same
priority become one route per network: a plain `via` route for one
gateway, an ECMP route for several; different priorities are separate
routes (metrics).  Routes are written with netlink (pyroute2) `replace`, so
a route is changed in place when a gateway goes or comes back, and deleted
when no gateway of its priority is up.

Mapping: `rtable N` -> routing table N (0, the OpenBSD default, is the
main table, 254); `priority P` -> metric P; routes carry protocol
RTPROT_RELAYD so `ip route show proto 245` lists them and a restart can
flush what a killed relayd left.  `rtlabel` has no Linux equivalent: it is
accepted and ignored (pfe warns once).

desired_routes() is pure; Routes applies a difference with pyroute2.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from relayd.config import RouterConfig

RTPROT_RELAYD = 245          # route protocol id marking relayd's routes
RT_TABLE_MAIN = 254
RTP_DEFAULT = 8              # OpenBSD's RTP_STATIC: priority of a host without one


@dataclass(frozen=True, order=True)
class RouteKey:
    table: int
    dst: str                 # "net/len"
    metric: int


def rt_table(rtable: int) -> int:
    return rtable or RT_TABLE_MAIN


def desired_routes(router: RouterConfig, up: set[int]) -> dict[RouteKey, tuple[str, ...]]:
    """Route -> gateway addresses (config order) for the up host ids `up`."""
    out: dict[RouteKey, list[str]] = {}
    if router.disabled or router.forward.table is None:
        return {}
    table = rt_table(router.rtable)
    for net in router.routes:
        for h in router.forward.table.hosts:
            if h.id not in up:
                continue
            key = RouteKey(table, str(net), h.conf.priority or RTP_DEFAULT)
            gws = out.setdefault(key, [])
            if h.addr not in gws:
                gws.append(h.addr)
    return {k: tuple(v) for k, v in out.items()}


def describe(key: RouteKey, gws: tuple[str, ...] = ()) -> str:
    via = " ".join(f"via {g}" for g in gws)
    return (f"{key.dst}{' ' + via if via else ''} table {key.table} metric {key.metric}")


class RouteError(Exception):
    """A netlink request failed."""


class Routes:
    """Kernel routes through pyroute2 (blocking calls: run them in a thread)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute   # noqa: F401  (ImportError: no routers)

    @staticmethod
    def _ipr():
        from pyroute2 import IPRoute
        return IPRoute()

    @staticmethod
    def _family(dst: str) -> int:
        return socket.AF_INET6 if ipaddress.ip_network(dst).version == 6 else socket.AF_INET

    def replace(self, key: RouteKey, gws: tuple[str, ...]) -> None:
        """Install or change the route (one netlink request, atomic)."""
        from pyroute2 import NetlinkError
        kw: dict = dict(dst=key.dst, table=key.table, priority=key.metric,
                        proto=RTPROT_RELAYD, family=self._family(key.dst))
        if len(gws) == 1:
            kw["gateway"] = gws[0]
        else:
            kw["multipath"] = [{"gateway": g} for g in gws]
        try:
            with self._ipr() as ipr:
                ipr.route("replace", **kw)
        except NetlinkError as e:
            raise RouteError(f"{e.args[1] if len(e.args) > 1 else e}") from None
        except OSError as e:
            raise RouteError(e.strerror or str(e)) from None

    def delete(self, key: RouteKey) -> None:
        from pyroute2 import NetlinkError
        try:
            with self._ipr() as ipr:
                ipr.route("del", dst=key.dst, table=key.table, priority=key.metric,
                          proto=RTPROT_RELAYD, family=self._family(key.dst))
        except NetlinkError as e:
            if e.code == 3:        # ESRCH: already gone
                return
            raise RouteError(f"{e.args[1] if len(e.args) > 1 else e}") from None
        except OSError as e:
            raise RouteError(e.strerror or str(e)) from None

    def flush(self, tables: set[int]) -> int:
        """Delete routes of protocol RTPROT_RELAYD in `tables` (what a
        previous relayd left); returns how many."""
        n = 0
        with self._ipr() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for table in sorted(tables):
                    try:
                        routes = ipr.route("dump", family=family, table=table,
                                           proto=RTPROT_RELAYD)
                    except Exception:
                        continue
                    for r in routes:
                        if r.get("proto") != RTPROT_RELAYD or r.get_attr("RTA_TABLE") != table:
                            continue
                        dst = r.get_attr("RTA_DST") or (
                            "::" if family == socket.AF_INET6 else "0.0.0.0")
                        try:
                            ipr.route("del", dst=f"{dst}/{r['dst_len']}", table=table,
                                      priority=r.get_attr("RTA_PRIORITY") or 0,
                                      proto=RTPROT_RELAYD, family=family)
                            n += 1
                        except Exception:
                            pass
        return n
