"""relayd.pfe_filter -- redirections as nftables JSON (pure: no I/O).

OpenBSD's pfe_filter.c loads one pf anchor per redirect with `rdr-to
<table>` rules; here every redirect becomes rules in the nftables table
`inet relayd`, which relayd owns: it replaces the table at start and
deletes it at exit.  The commands are libnftables JSON objects
(libnftables-json(5)), applied through libnftables (relayd.nft) as one
transaction.

Layout of the table (all names are ids, so any redirect name is fine):

  chain mangle      filter, prerouting, priority mangle (-150):
                    `ct mark T meta mark set T` per pftag (the tag follows
                    every packet of the connection, as pf tags do)
  chain prerouting  nat, prerouting, priority dstnat (-100):
                    `jump rdr_<id>` per redirect
  chain sticky      filter, prerouting, priority dstnat + 10:
                    `jump rdr_<id>_sticky` per sticky-address redirect
  chain rdr_<id>    the redirect's rules, rewritten on every change (below)
  chain rdr_<id>_sticky  refreshes the sticky entries (below)
  counter rdr_<id>  connections the redirect saw (`relayctl show redirects`)
  set rdr_<id>_hosts[6]  the hosts in the pool now (pf's table relayd/<name>),
                    flushed and refilled in place
  set rdr_<id>_sticky_<hostid>  sticky-address: clients of that host,
                    dynamic, entries expire after `session timeout`
  ct timeout rdr_<id>_tcp4|6  `session timeout` as the TCP established
                    timeout of the redirect's connections (pf's rule timeout)

Per virtual address (`listen on`) the chain rdr_<id> holds, in order:

  1. match [+ iifname] + counter [+ log group 0] [+ mark/ct mark set TAG]
     [+ ct timeout set]                        (accounting; does not stop)
  2. sticky-address: per pool host H, `ip saddr @rdr_<id>_sticky_H dnat to H`
  3. `dnat to <selector> map { 0 : H0, 1 : H1, ... }` with the selector of
     the mode: roundrobin `numgen inc mod N`, random `numgen random mod N`,
     source-hash `jhash ip saddr mod N seed S` (S from the mode key),
     least-states: round robin (nftables cannot count states per target)
  ... or, with no host in the pool, `drop` (pf drops what it cannot map).

NAT rules only see the first packet of a connection, so connections in
flight keep their backend (conntrack) whatever the rules become; rewriting
rdr_<id> in one transaction is how the pool is changed.  The sticky chain
runs after DNAT: every packet from a client to host H through the redirect
refreshes the client's entry in rdr_<id>_sticky_H; when H leaves the pool
its set is flushed (pf's kill_srcnodes).

The port: the forward's port, except for a `listen on ... port A:B` range
without its own forward port, where the original port is kept.  A pool
uses the hosts of the listen address's family only.

Not here: running nft, host states (pfe.py), routes (pfe_route.py).
"""

from __future__ import annotations

import socket
import zlib
from dataclasses import dataclass

from relayd.config import RedirectConfig, RedirectListen, RelaydConfig

FAMILY = "inet"
TABLE = "relayd"
# Base chain priorities (nft's mangle, dstnat).
PRIO_MANGLE = -150
PRIO_DSTNAT = -100
PRIO_STICKY = PRIO_DSTNAT + 10
# NFLOG group of `pflog` (pflog0).
PFLOG_GROUP = 0
# Protocols with a port nftables can match by name.
PORT_PROTOS = ("tcp", "udp", "sctp", "dccp", "udplite")


@dataclass(frozen=True)
class Pool:
    """What a redirect's rules send traffic to right now."""
    enabled: bool = True                       # False: no rules (relayctl redirect disable)
    hosts: tuple[tuple[int, str], ...] = ()    # (host id, address) of the up hosts, in order
    backup: bool = False                       # the hosts are the backup table's

    @property
    def addrs(self) -> tuple[str, ...]:
        return tuple(a for _, a in self.hosts)


# -- names ----------------------------------------------------------------------

def chain_name(rdr: RedirectConfig) -> str:
    return f"rdr_{rdr.id}"


def sticky_chain_name(rdr: RedirectConfig) -> str:
    return f"rdr_{rdr.id}_sticky"


def counter_name(rdr: RedirectConfig) -> str:
    return f"rdr_{rdr.id}"


def hosts_set_name(rdr: RedirectConfig, v6: bool) -> str:
    return f"rdr_{rdr.id}_hosts{'6' if v6 else ''}"


def sticky_set_name(rdr: RedirectConfig, host_id: int) -> str:
    return f"rdr_{rdr.id}_sticky_{host_id}"


def timeout_name(rdr: RedirectConfig, v6: bool) -> str:
    return f"rdr_{rdr.id}_tcp{'6' if v6 else '4'}"


# -- small helpers ----------------------------------------------------------------

def is_v6(addr: str) -> bool:
    return ":" in addr


def _ipproto(v6: bool) -> str:
    return "ip6" if v6 else "ip"


def _addr_type(v6: bool) -> str:
    return "ipv6_addr" if v6 else "ipv4_addr"


def _payload(proto: str, field: str) -> dict:
    return {"payload": {"protocol": proto, "field": field}}


def _match(left, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _obj(kind: str, **fields) -> dict:
    return {kind: {"family": FAMILY, "table": TABLE, **fields}}


def _add(kind: str, **fields) -> dict:
    return {"add": _obj(kind, **fields)}


def _flush(kind: str, name: str) -> dict:
    return {"flush": _obj(kind, name=name)}


def _rule(chain: str, expr: list, comment: str | None = None) -> dict:
    rule = _obj("rule", chain=chain, expr=expr)
    if comment:
        rule["rule"]["comment"] = comment[:127]
    return {"add": rule}


def tag_mark(tag: str) -> int:
    """The packet mark of a `pftag NAME`: a number written as the name
    (`pftag 16`, `pftag 0x10`) is used as is; any other name maps to a
    stable non-zero 31-bit value (CRC-32 of the name), so one tag is the
    same mark in every relayd and across restarts."""
    try:
        n = int(tag, 0)
    except ValueError:
        n = -1
    if 0 < n <= 0xFFFFFFFF:
        return n
    return (zlib.crc32(tag.encode()) & 0x7FFFFFFF) or 1


def hash_seed(key: bytes | None) -> int:
    """jhash seed of a source-hash key (its first 32 bits)."""
    return int.from_bytes((key or b"\0" * 4)[:4], "big")


def target_port(rdr: RedirectConfig, lis: RedirectListen) -> int | None:
    """Port the traffic of `lis` goes to; None keeps the original port (a
    port range whose forward gave no port of its own, which the parser
    records as the range's first port)."""
    port = rdr.table.port if rdr.table.port else None
    if port is None and rdr.table.table is not None:
        port = rdr.table.table.port or None
    if lis.port_end is not None and lis.port_end != lis.port and port == lis.port:
        return None
    return port


def _proto(lis: RedirectListen) -> tuple[str, int | None]:
    """(nft protocol name or "", IP protocol number or None)."""
    p = (lis.proto or "tcp").lower()
    if p in PORT_PROTOS:
        return p, None
    try:
        return "", socket.getprotobyname(p)
    except OSError:
        return "", None


def _port_right(lis: RedirectListen):
    if lis.port_end is not None and lis.port_end != lis.port:
        return {"range": [lis.port, lis.port_end]}
    return lis.port


def listen_match(lis: RedirectListen) -> list[dict]:
    """The statements matching the traffic of one virtual address."""
    v6 = is_v6(lis.addr)
    out: list[dict] = []
    if lis.interface:
        out.append(_match({"meta": {"key": "iifname"}}, lis.interface))
    out.append(_match(_payload(_ipproto(v6), "daddr"), lis.addr))
    name, number = _proto(lis)
    if name:
        if lis.port:
            out.append(_match(_payload(name, "dport"), _port_right(lis)))
        else:
            out.append(_match({"meta": {"key": "l4proto"}}, name))
    elif number is not None:
        out.append(_match({"meta": {"key": "l4proto"}}, number))
    return out


def _has_port(lis: RedirectListen) -> bool:
    return bool(_proto(lis)[0]) and bool(lis.port)


def _dnat(v6: bool, addr, port: int | None) -> dict:
    d: dict = {"family": _ipproto(v6), "addr": addr}
    if port is not None:
        d["port"] = port
    return {"dnat": d}


def selector(mode: str, n: int, v6: bool, key: bytes | None) -> dict:
    """The expression choosing a pool index 0..n-1 for a new connection."""
    if mode == "random":
        return {"numgen": {"mode": "random", "mod": n, "offset": 0}}
    if mode == "source-hash":
        return {"jhash": {"mod": n, "seed": hash_seed(key), "offset": 0,
                          "expr": _payload(_ipproto(v6), "saddr")}}
    # roundrobin, and least-states (no per-target state count in nftables)
    return {"numgen": {"mode": "inc", "mod": n, "offset": 0}}


def redirect_hosts(rdr: RedirectConfig) -> list[tuple[int, str]]:
    """(host id, address) of every host of the main and backup tables."""
    out = []
    for fwd in (rdr.table, rdr.backup):
        if fwd is not None and fwd.table is not None:
            out.extend((h.id, h.addr) for h in fwd.table.hosts)
    return out


# -- the rules of one redirect ----------------------------------------------------------

def redirect_rules(rdr: RedirectConfig, pool: Pool, *, ct_timeouts: bool = True) -> list[dict]:
    """`add rule` commands of chain rdr_<id> (and of rdr_<id>_sticky) for
    `pool`; none when the pool is disabled."""
    if not pool.enabled:
        return []
    chain = chain_name(rdr)
    out: list[dict] = []
    sticky: list[dict] = []
    for lis in rdr.listens:
        v6 = is_v6(lis.addr)
        match = listen_match(lis)
        port = target_port(rdr, lis)
        hosts = [(hid, a) for hid, a in pool.hosts if is_v6(a) == v6]
        acct = list(match) + [{"counter": counter_name(rdr)}]
        if lis.pflog:
            acct.append({"log": {"prefix": f"relayd/{rdr.name} "[:127], "group": PFLOG_GROUP}})
        if rdr.pftag:
            mark = tag_mark(rdr.pftag)
            acct.append({"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}})
            acct.append({"mangle": {"key": {"ct": {"key": "mark"}}, "value": mark}})
        if ct_timeouts and _proto(lis)[0] == "tcp":
            acct.append({"ct timeout": timeout_name(rdr, v6)})
        out.append(_rule(chain, acct, rdr.name))
        if not hosts:
            out.append(_rule(chain, list(match) + [{"drop": None}], rdr.name))
            continue
        if rdr.sticky_address:
            for hid, addr in hosts:
                out.append(_rule(chain, list(match) + [
                    _match(_payload(_ipproto(v6), "saddr"), "@" + sticky_set_name(rdr, hid)),
                    _dnat(v6, addr, port)], rdr.name))
                sticky.append(_rule(sticky_chain_name(rdr),
                                    _sticky_match(lis, v6) + [
                    _match(_payload(_ipproto(v6), "daddr"), addr),
                    {"set": {"op": "update", "elem": _payload(_ipproto(v6), "saddr"),
                             "set": "@" + sticky_set_name(rdr, hid)}}], rdr.name))
        if len(hosts) == 1:
            target = hosts[0][1]
        else:
            target = {"map": {"key": selector(rdr.mode, len(hosts), v6, rdr.key),
                              "data": {"set": [[i, a] for i, (_, a) in enumerate(hosts)]}}}
        out.append(_rule(chain, list(match) + [_dnat(v6, target, port)], rdr.name))
    return out + sticky


def _sticky_match(lis: RedirectListen, v6: bool) -> list[dict]:
    """Packets of connections this virtual address redirected (after DNAT)."""
    out = [_match({"ct": {"key": "direction"}}, "original"),
           _match({"ct": {"key": f"{_ipproto(v6)} daddr", "dir": "original"}}, lis.addr)]
    name, number = _proto(lis)
    if name or number is not None:
        out.append(_match({"meta": {"key": "l4proto"}}, name or number))
    if _has_port(lis):
        out.append(_match({"ct": {"key": "proto-dst", "dir": "original"}}, _port_right(lis)))
    return out


def pool_elements(rdr: RedirectConfig, pool: Pool) -> list[dict]:
    """Refill the rdr_<id>_hosts[6] sets with the pool (flush + add)."""
    out = []
    for v6 in sorted(_host_families(rdr)):
        name = hosts_set_name(rdr, v6)
        out.append(_flush("set", name))
        elems = [a for a in pool.addrs if is_v6(a) == v6] if pool.enabled else []
        if elems:
            out.append({"add": _obj("element", name=name, elem=elems)})
    return out


def _host_families(rdr: RedirectConfig) -> set[bool]:
    return {is_v6(a) for _, a in redirect_hosts(rdr)}


def redirect_update(rdr: RedirectConfig, pool: Pool, old: Pool | None = None, *,
                    ct_timeouts: bool = True) -> list[dict]:
    """Commands that move a live redirect to `pool` (one transaction):
    rewrite its chains, refill its host sets, forget the sticky clients of
    hosts that left the pool."""
    cmds = [_flush("chain", chain_name(rdr))]
    if rdr.sticky_address:
        cmds.append(_flush("chain", sticky_chain_name(rdr)))
    cmds += redirect_rules(rdr, pool, ct_timeouts=ct_timeouts)
    cmds += pool_elements(rdr, pool)
    if rdr.sticky_address:
        now = {hid for hid, _ in pool.hosts} if pool.enabled else set()
        before = ({hid for hid, _ in old.hosts} if old is not None and old.enabled
                  else {hid for hid, _ in redirect_hosts(rdr)})
        for hid in sorted(before - now):
            cmds.append(_flush("set", sticky_set_name(rdr, hid)))
    return cmds


# -- the whole table ----------------------------------------------------------------

def ct_timeout_objects(conf: RelaydConfig) -> list[tuple[str, str, int]]:
    """(name, l3proto, seconds) of the ct timeout objects the table needs:
    one per redirect with TCP virtual addresses and address family."""
    out = []
    for rdr in conf.redirects:
        fams = sorted({is_v6(l.addr) for l in rdr.listens if _proto(l)[0] == "tcp"})
        for v6 in fams:
            out.append((timeout_name(rdr, v6), _ipproto(v6), rdr.session_timeout))
    return out


def ct_timeouts_text(conf: RelaydConfig) -> str:
    """nft(8) syntax creating the ct timeout objects (libnftables 1.0.6
    ignores the policy of a JSON ct timeout, so they go in as text)."""
    lines = []
    for name, l3, secs in ct_timeout_objects(conf):
        lines.append(f"add ct timeout {FAMILY} {TABLE} {name} {{ protocol tcp; "
                     f"l3proto {l3}; policy = {{ established: {secs} }}; }}")
    return "".join(line + "\n" for line in lines)


def table_reset() -> list[dict]:
    """Create-then-delete-then-create: whatever table inet relayd there was
    (a crashed run's) is replaced in the same transaction."""
    t = {"table": {"family": FAMILY, "name": TABLE}}
    return [{"add": t}, {"delete": t}, {"add": t}]


def table_delete() -> list[dict]:
    t = {"table": {"family": FAMILY, "name": TABLE}}
    return [{"add": t}, {"delete": t}]


def ruleset(conf: RelaydConfig, pools: dict[int, Pool], *, reset: bool = True,
            ct_timeouts: bool = True, timeout_objects: bool = False) -> list[dict]:
    """The commands building table inet relayd for `conf` with the pools by
    redirect id (missing: enabled, empty); `reset` replaces any existing
    table in the same transaction (False when it was just made, holding
    only the ct timeout objects); `ct_timeouts` sets the `session timeout`
    objects on TCP connections, `timeout_objects` creates them here (nft
    1.0.9 and later; else ct_timeouts_text() made them)."""
    cmds: list[dict] = table_reset() if reset else [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    tagged = [r for r in conf.redirects if r.pftag]
    sticky = [r for r in conf.redirects if r.sticky_address]
    if tagged:
        cmds.append(_add("chain", name="mangle", type="filter", hook="prerouting",
                         prio=PRIO_MANGLE, policy="accept"))
    cmds.append(_add("chain", name="prerouting", type="nat", hook="prerouting",
                     prio=PRIO_DSTNAT, policy="accept"))
    if sticky:
        cmds.append(_add("chain", name="sticky", type="filter", hook="prerouting",
                         prio=PRIO_STICKY, policy="accept"))
    if ct_timeouts and timeout_objects:
        for name, l3, secs in ct_timeout_objects(conf):
            cmds.append(_add("ct timeout", name=name, protocol="tcp", l3proto=l3,
                             policy={"established": secs}))
    for rdr in conf.redirects:
        cmds.append(_add("counter", name=counter_name(rdr)))
        for v6 in sorted(_host_families(rdr)):
            cmds.append(_add("set", name=hosts_set_name(rdr, v6), type=_addr_type(v6)))
        if rdr.sticky_address:
            for hid, addr in redirect_hosts(rdr):
                cmds.append(_add("set", name=sticky_set_name(rdr, hid),
                                 type=_addr_type(is_v6(addr)), flags=["timeout"],
                                 timeout=rdr.session_timeout))
            cmds.append(_add("chain", name=sticky_chain_name(rdr)))
        cmds.append(_add("chain", name=chain_name(rdr)))
    seen_marks: set[int] = set()
    for rdr in tagged:
        mark = tag_mark(rdr.pftag)
        if mark in seen_marks:
            continue
        seen_marks.add(mark)
        cmds.append(_rule("mangle", [_match({"ct": {"key": "mark"}}, mark),
                                     {"mangle": {"key": {"meta": {"key": "mark"}},
                                                 "value": {"ct": {"key": "mark"}}}}],
                          f"pftag {rdr.pftag}"))
    for rdr in conf.redirects:
        cmds.append(_rule("prerouting", [{"jump": {"target": chain_name(rdr)}}], rdr.name))
        if rdr.sticky_address:
            cmds.append(_rule("sticky", [{"jump": {"target": sticky_chain_name(rdr)}}],
                              rdr.name))
    for rdr in conf.redirects:
        pool = pools.get(rdr.id, Pool(enabled=not rdr.disabled))
        cmds += redirect_rules(rdr, pool, ct_timeouts=ct_timeouts)
        cmds += [c for c in pool_elements(rdr, pool) if "add" in c]
    return cmds


def document(cmds: list[dict]) -> dict:
    """The JSON document libnftables (and `nft -j -f -`) reads."""
    return {"nftables": cmds}


# -- reading nft's answers ------------------------------------------------------------

def counters_from_listing(listing: dict) -> dict[str, int]:
    """Packet counts by counter name from `nft -j list counters table ...`."""
    out: dict[str, int] = {}
    for obj in listing.get("nftables", []):
        c = obj.get("counter") if isinstance(obj, dict) else None
        if isinstance(c, dict) and c.get("table") == TABLE and "name" in c:
            out[c["name"]] = int(c.get("packets", 0))
    return out


def describe(cmd: dict) -> str:
    """A short text of one command for error messages ("add rule rdr_1 ...")."""
    for verb, body in cmd.items():
        for kind, obj in body.items():
            if kind == "table":
                return f"{verb} table {obj.get('family', FAMILY)} {obj.get('name', TABLE)}"
            name = obj.get("name") or obj.get("chain") or ""
            what = f"{verb} {kind} {FAMILY} {TABLE}"
            if kind == "rule":
                return f"{what} {name} (redirect {obj.get('comment', '?')})"
            return f"{what} {name}".rstrip()
    return str(cmd)

