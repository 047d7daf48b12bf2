"""relayd.protodebug -- the `-vv` configuration dump of relays and protocols.

What OpenBSD's relay_privinit() prints for every relay listener when
relayd runs with -vv: "relay_privinit: adding relay NAME", then
relay_protodebug() -- the protocol's id and name, its flags and the relay's
(printb_flags() over F_BITS: "relay flags: tls, tls client"), tcp and tls
flags, session tickets, type -- and relay_ruledebug()'s one line per filter
rule, trailing blank included.  OpenBSD has no dump of tables; their
"adding N hosts from table NAME" lines come from the relay processes.

Pure text from a RelaydConfig: lines(); parent.py logs them at start and
on each reload, as OpenBSD's parent does in config_setrelay().  Nothing
here reads files or changes the configuration.
"""

from __future__ import annotations

from relayd.config import (DEFAULT_PROTOCOL, Entity, ProtocolConfig, RelayConfig,
                           RelaydConfig, Rule)

# F_BITS flags (relayd.h), in bit order as printb_flags() prints them:
# lower case, "_" as a blank.  Only the ones a relay or protocol can carry.
F_USED = "used"
F_TLS = "tls"
F_NATLOOK = "nat lookup"
F_UDP = "udp"
F_RETURN = "return"
F_TLSCLIENT = "tls client"
F_DIVERT = "divert"
F_TLSINSPECT = "tls inspect"
F_HASHKEY = "hashkey"
# EMPTY_ID (UINT_MAX) printed with %d: the default protocol's id.
EMPTY_ID = -1


def lines(conf: RelaydConfig) -> list[str]:
    """Every relay listener's dump, in file order (OpenBSD keeps one relay
    per listen address, so a relay with two addresses is dumped twice)."""
    out: list[str] = []
    for rl in conf.relays:
        proto = conf.protocol_of(rl)
        for lis in rl.listens:
            out.append(f"relay_privinit: adding relay {lis.name or rl.name}")
            out.extend(protocol_lines(proto, relay_flags(rl, proto, lis.tls)))
    return out


def relay_flags(rl: RelayConfig, proto: ProtocolConfig, tls: bool) -> list[str]:
    """rl_conf.flags of one listener, in F_BITS order."""
    kinds = {f.kind for f in rl.forwards}
    flags = [(12, F_TLS, tls),
             (13, F_NATLOOK, "natlook" in kinds),
             (17, F_UDP, proto.type == "dns"),
             (22, F_TLSCLIENT, rl.tls_client),
             (25, F_DIVERT, "destination" in kinds),
             # parent_configure(): tls both ways and a CA certificate
             (27, F_TLSINSPECT, tls and rl.tls_client and proto.tls.ca_cert is not None),
             (28, F_HASHKEY, any(f.key_set for f in rl.tables))]
    return [name for _, name, on in flags if on]


def _tcp_flags(proto: ProtocolConfig) -> list[str]:
    t = proto.tcp
    return [name for name, on in (
        ("nodelay", t.nodelay is True), ("no nodelay", t.nodelay is False),
        ("sack", t.sack is True), ("no sack", t.sack is False),
        ("socket buffer size", t.socket_buffer is not None),
        ("ip ttl", t.ip_ttl is not None), ("ip minttl", t.ip_minttl is not None),
        ("no splice", not t.splice)) if on]


def _tls_flags(proto: ProtocolConfig) -> list[str]:
    t = proto.tls
    vers = [v for v in ("sslv3", "tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3") if v in t.versions]
    return vers + [name for name, on in (
        ("cipher-server-preference", t.cipher_server_preference),
        ("client-renegotiation", t.client_renegotiation)) if on]


def protocol_lines(proto: ProtocolConfig, rflags: list[str]) -> list[str]:
    """relay_protodebug() for one relay listener with flags `rflags`."""
    pflags = [F_USED] + ([F_RETURN] if proto.return_error else [])
    pid = EMPTY_ID if proto is DEFAULT_PROTOCOL else proto.id
    out = [f"protocol {pid}: name {proto.name}",
           f"\tflags: {', '.join(pflags)}, relay flags: {', '.join(rflags)}"]
    tcp = _tcp_flags(proto)
    if tcp:
        out.append(f"\ttcp flags: {', '.join(tcp)}")
    if F_TLS in rflags or F_TLSCLIENT in rflags:
        out.append(f"\ttls flags: {', '.join(_tls_flags(proto))}")
    out.append("\ttls session tickets: "
               + ("enabled" if proto.tls.session_tickets else "disabled"))
    out.append(f"\ttype: {proto.type}")
    for r in proto.rules:
        out.extend(rule_lines(r))
    return out


def _entity(e: Entity, key: str | None) -> str:
    s = f"{e.type} " + (f"{e.option} " if e.option else "") + ("digest " if e.digest else "")
    s += "pattern " if e.pattern else ""
    s += "" if key is None else f'"{key}"'
    # parse.y stores "*" when a key is given without a value
    value = e.value if e.value is not None or key is None else "*"
    return s + ("" if value is None else f' value "{value}"') + " "


# KEY_TYPE_* order: relay_ruledebug() prints the entities in it.
KEY_TYPES = ("cookie", "header", "path", "query", "url")


def rule_lines(r: Rule) -> list[str]:
    """relay_ruledebug(): a rule with `file` keys is one rule per key."""
    filed = next((e for e in r.entities if e.keys), None)
    out = []
    for k in filed.keys if filed is not None else (None,):
        s = f"\t\t{r.action} {r.direction} " + ("quick " if r.quick else "")
        s += f"{r.af} " if r.af else ""
        s += f"from {r.src.network_address}/{r.src.prefixlen} " if r.src is not None else ""
        s += f"to {r.dst.network_address}/{r.dst.prefixlen} " if r.dst is not None else ""
        segs = [(KEY_TYPES.index(e.type), _entity(e, k if e is filed else e.key))
                for e in r.entities]
        if r.path_strip is not None:        # a path kv with option strip
            segs.append((KEY_TYPES.index("path"), f"path strip {r.path_strip} "))
        s += "".join(seg for _, seg in sorted(segs, key=lambda x: x[0]))
        s += f"forward to <{r.forward_to}> " if r.forward_to else ""
        s += "no tag " if r.no_tag else (f'tag "{r.tag}" ' if r.tag else "")
        s += f'tagged "{r.tagged}" ' if r.tagged else ""
        s += "no label " if r.no_label else (f'label "{r.label}" ' if r.label else "")
        out.append(s)
    return out
