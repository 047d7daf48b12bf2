"""shared.addr -- addresses and ports as the config files write them.

Turns `*`, `0.0.0.0`, `::`, IPv4/IPv6 literals, `localhost`, host names,
interface names (`lo`, `eth0`) and the `egress` group into lists of IP
address strings, and ports given by number or /etc/services name into
integers.  Everything is resolved once, at parse time, in the parent: the
chrooted children have no resolver.  No sockets are bound here.
"""

from __future__ import annotations

import ipaddress
import socket


class AddrError(ValueError):
    """An address or port the config names cannot be used."""


def parse_port(value: str | int, proto: str = "tcp") -> int:
    """A port number (1..65535) or a service name from /etc/services."""
    if isinstance(value, int) or str(value).isdigit():
        port = int(value)
        if not 0 < port < 65536:
            raise AddrError(f"invalid port: {value}")
        return port
    try:
        return socket.getservbyname(str(value), proto)
    except (OSError, UnicodeError):
        raise AddrError(f"invalid port: {value}") from None


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _interface_addrs(name: str) -> list[str] | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a hard dependency
        return None
    addrs = psutil.net_if_addrs().get(name)
    if addrs is None:
        return None
    v4 = [a.address for a in addrs if a.family == socket.AF_INET]
    v6 = [a.address.split("%")[0] for a in addrs if a.family == socket.AF_INET6
          and not a.address.lower().startswith("fe80")]
    return v4 + v6


def egress_interface() -> str | None:
    """The interface of the IPv4 default route (OpenBSD's `egress` group)."""
    try:
        with open("/proc/net/route") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return None


def resolve_host(host: str, wildcard_both: bool = True) -> list[str]:
    """Every address `host` stands for, IPv4 first.

    `*` means all IPv4 and IPv6 addresses when `wildcard_both` (httpd), else
    all IPv4 only.  Raises AddrError when nothing is found.
    """
    if host == "*":
        return ["0.0.0.0", "::"] if wildcard_both else ["0.0.0.0"]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if is_ip(host):
        return [str(ipaddress.ip_address(host))]
    if host == "egress":
        ifname = egress_interface()
        addrs = _interface_addrs(ifname) if ifname else None
        if not addrs:
            raise AddrError(f"invalid address: {host}")
        return addrs
    addrs = _interface_addrs(host)
    if addrs:
        return addrs
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):     # UnicodeError: idna rejects e.g. "a..b"
        raise AddrError(f"invalid address: {host}") from None
    out: list[str] = []
    for fam, _, _, _, sa in sorted(infos, key=lambda i: i[0] != socket.AF_INET):
        a = sa[0].split("%")[0]
        if a not in out:
            out.append(a)
    if not out:
        raise AddrError(f"invalid address: {host}")
    return out


def parse_prefix(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`addr[/len]` as a network (host bits allowed, like pf)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise AddrError(f"invalid address: {text}") from None


def format_hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
