"""httpd.route -- pure request routing: path canonicalisation, virtual
server by Host, location by path, and the block/rewrite macro expansion.

No I/O except the `found`/`not found` existence test, which the caller
passes in as a function.  Mirrors server_http.c's server_response(),
server_getlocation() and server_expand_http().
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Callable

from shared import patterns
from httpd.config import Location, ServerConfig
from httpd.http import PATH_MAX

_HEX = frozenset("0123456789abcdefABCDEF")


class RouteError(Exception):
    """The request path or an expansion is invalid (answered 400)."""


def url_decode(path: str) -> str:
    """Percent-decode `path` (given as latin-1 text of the raw bytes).

    Any %XX is decoded, %2F too; a '%' without two hex digits, or a decoded
    NUL, is an error.  '+' stays '+'.  The result is UTF-8 text with
    undecodable bytes kept as surrogates."""
    if "%" not in path:
        raw = path.encode("latin-1")
    else:
        out = bytearray()
        i = 0
        n = len(path)
        while i < n:
            c = path[i]
            if c == "%":
                h = path[i + 1:i + 3]
                if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
                    raise RouteError("malformed path")
                out.append(int(h, 16))
                i += 3
            else:
                out += c.encode("latin-1")
                i += 1
        raw = bytes(out)
    if b"\0" in raw:
        raise RouteError("malformed path")
    return raw.decode("utf-8", "surrogateescape")


def canonicalize_path(path: str) -> str:
    """Resolve `//`, `.` and `..` (never above `/`); must start with '/'."""
    if not path.startswith("/"):
        raise RouteError("malformed path")
    parts: list[str] = []
    segs = path.split("/")
    trailing = False
    for seg in segs[1:]:
        trailing = False
        if seg == "" or seg == ".":
            trailing = True
            continue
        if seg == "..":
            if parts:
                parts.pop()
            trailing = True
            continue
        parts.append(seg)
    out = "/" + "/".join(parts)
    if trailing and parts:
        out += "/"
    if len(out.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise RouteError("path too long")
    return out


def split_host(host: str) -> tuple[str, int | None]:
    """Host header → (name, port or None); `[v6]:port` understood."""
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise RouteError("malformed host")
        name, rest = host[1:end], host[end + 1:]
        colon = rest.find(":")
        if colon < 0:                     # server_http_parsehost: no port
            return name, None
        port = rest[colon + 1:]
    else:
        name, sep, port = host.partition(":")
        if not sep:
            return host, None
    # strtonum(port, 0, 0xffff)
    if not port.isdigit() or int(port) > 0xffff:
        raise RouteError("malformed host")
    return name, int(port)


def name_matches(pattern: str, lua: bool, name: str) -> bool:
    if lua:
        try:
            return patterns.find(name, pattern) is not None
        except patterns.PatternError:
            return False
    return fnmatchcase(name.lower(), pattern.lower())


def find_server(servers: list[ServerConfig], host: str | None,
                local_port: int) -> ServerConfig | None:
    """The first server (or alias) on this socket matching Host, else None."""
    if host is None:
        return None
    name, port = split_host(host)
    if port is not None and port != local_port:
        return None
    for srv in servers:
        if name_matches(srv.name, srv.name_lua, name):
            return srv
        for alias in srv.aliases:
            if name_matches(alias.pattern, alias.lua, name):
                return srv
    return None


# (id(srv), path) -> (srv, answer) of find_location for servers whose
# locations do not test the file system (`found`): the answer then depends
# on the path alone.  Paths come from clients: bounded.
_LOCATIONS: dict[tuple[int, str], tuple] = {}
_LOCATIONS_MAX = 4096
# Longest client-given key (path, Host, ...) any per-request memo of httpd
# keeps: entries x keys stay a few MiB at most, whatever clients send.
MEMO_KEY_MAX = 512


def find_location(srv: ServerConfig, path: str,
                  exists: Callable[[ServerConfig, str], bool]
                  ) -> tuple[ServerConfig, Location | None, list[str] | None]:
    """First matching location: (effective config, location, captures)."""
    key = (id(srv), path)
    hit = _LOCATIONS.get(key)
    if hit is not None and hit[0] is srv:
        return hit[1]
    answer = _find_location(srv, path, exists)
    if len(path) <= MEMO_KEY_MAX and not any(loc.found is not None for loc in srv.locations):
        if len(_LOCATIONS) >= _LOCATIONS_MAX:
            _LOCATIONS.clear()
        # The entry keeps srv alive, so its id is not reused meanwhile.
        _LOCATIONS[key] = (srv, answer)
    return answer


def _find_location(srv: ServerConfig, path: str,
                   exists: Callable[[ServerConfig, str], bool]
                   ) -> tuple[ServerConfig, Location | None, list[str] | None]:
    for loc in srv.locations:
        caps = None
        if loc.lua:
            try:
                caps = patterns.match(path, loc.pattern)
            except patterns.PatternError:
                caps = None
            if caps is None:
                continue
            # OpenBSD's str_match(): %0 is the whole path, %1.. the
            # captures, or the matched part when the pattern has none.
            caps = [path] + (caps[1:] if len(caps) > 1 else caps[:1])
        elif not fnmatchcase(path.lower(), loc.pattern.lower()):
            continue
        if loc.found is not None and exists(loc.conf, path) != loc.found:
            continue
        return loc.conf, loc, caps
    return srv, None, None


# -- macros of `block return` and `request rewrite` (server_expand_http) ----

_MACRO = re.compile(r"\$(DOCUMENT_URI|QUERY_STRING_ENC|QUERY_STRING|REMOTE_ADDR|"
                    r"REMOTE_PORT|REMOTE_USER|REQUEST_URI|REQUEST_SCHEME|"
                    r"SERVER_ADDR|SERVER_PORT|SERVER_NAME|HTTP_HOST)|%(\d)")


def expand(template: str, values: dict[str, str], captures: list[str] | None,
           encode: Callable[[str], str]) -> str:
    """Expand macros in one pass (so expanded text is never re-expanded).

    `values` maps macro names to final text; a missing one fails.  `%n`
    takes capture n (0 = whole match), url-encoded; out of range fails."""
    def sub(m: re.Match) -> str:
        if m.group(1):
            val = values.get(m.group(1))
            if val is None:
                raise RouteError(f"cannot expand ${m.group(1)}")
            return val
        if captures is None:
            return m.group(0)
        n = int(m.group(2))
        if n >= len(captures):
            raise RouteError(f"invalid capture %{n}")
        return encode(captures[n])
    return _MACRO.sub(sub, template)
