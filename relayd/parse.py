"""relayd.parse -- the relayd.conf(5) grammar, producing a RelaydConfig.

Follows OpenBSD's parse.y v1.258 (Oct 2024): the same statements, the same
order-dependent rules (a table must be defined before a `forward to` uses
it, a protocol before a relay names it, a table's default port is the last
`listen on` port seen in its block), the same checks when a block closes,
and the same whole-file checks of load_config().  Error texts are
OpenBSD's where it has one; every error carries "file:line" and parsing
goes on, so one run reports every problem.

Parsing fills private mutable builders; once the whole file is read and
validated they are frozen into relayd.config values.  Host names are
resolved here, once.  Nothing is bound or opened except `file` key lists of
filter rules, which are read at load time as in OpenBSD.

Deliberate differences from OpenBSD (all accept more, never less, except
where noted):
- `forward to <t>` may have no options at all, and `forward to ADDR` may
  omit `port` (the listen port is used, as relayd.conf(5) says).
- `tcp ip ttl N` is accepted (OpenBSD's grammar lost it when `ttl` became a
  keyword).
- An unused table is a warning (OpenBSD drops unused templates silently).
- `url digest file "path"` is accepted (relayd.conf(5) syntax; parse.y lacks it).
- Stricter: path, query and url rules need the request direction, set
  and append need a value, set/append/remove need a key, a router needs a
  `forward to`, and a `file` key list may not be combined with a second
  entity type in the same rule.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Callable

from relayd.config import (CHECK_INTERVAL, CHECK_TIMEOUT, DEFAULT_MODE,
                           HTTP_METHODS, IFNAMSIZ, KEYED_MODES, LABEL_NAME_SIZE,
                           MAX_NAME_SIZE, PREFORK_MAX, RELAY_MAX_BACKLOG,
                           RELAY_MAXHEADERLENGTH, RELAY_TIMEOUT,
                           RELAYD_SOCKET, REQUEST_ONLY_ENTITIES,
                           ROUTER_DEFAULT_PORT, RT_LABEL_SIZE, RT_TABLEID_MAX,
                           RTP_MAX, SRV_MAX_VIRTS, TABLE_NAME_SIZE,
                           TAG_NAME_SIZE, TLS_DEFAULT_VERSIONS,
                           TIMEOUT_MAX, AgentxConfig, CheckConfig, Entity,
                           ForwardConfig, HostConfig, HttpOptions,
                           InstanceHost, IPNetwork, Listen, MetricsConfig,
                           ProtocolConfig, RedirectConfig, RedirectListen,
                           RelayConfig, RelaydConfig, RouterConfig, Rule,
                           TableConfig, TableInstance, TcpOptions, TlsOptions)
from shared import addr, patterns
from shared.lexer import EOF, NL, NUMBER, STRING, WORD, ConfigError, Token
from shared.parser import Parser, StmtError

# parse.y's keyword table: these words are never plain strings.
KEYWORDS = frozenset("""
agentx append backlog backup binary block buffer ca cache cert changes check
checks ciphers client code connection context cookie demote destination digest
disable ecdhe edh error errors expect external file forward from hash header
headerlen host http http2 icmp include inet inet6 interface interval ip key keypair
label least-states listen loadbalance log lookup match method mode nat no
nodelay nothing on params parent pass password path pattern pflog pftag port prefork
priority protocol query quick random real redirect relay remove request
response retry return roundrobin route router rtable rtlabel sack script send
session set socket source-hash splice state sticky-address strip style table
tag tagged tcp tickets timeout tls to transparent ttl url value websockets
with
""".split())

MODE_WORDS = ("roundrobin", "random", "hash", "source-hash", "loadbalance",
              "least-states")
KEY_OPTIONS = ("append", "set", "remove", "hash", "log")
TLS_FLAGS = {
    "sslv3": frozenset({"sslv3"}),
    "tlsv1": frozenset({"tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"}),
    "tlsv1.0": frozenset({"tlsv1.0"}),
    "tlsv1.1": frozenset({"tlsv1.1"}),
    "tlsv1.2": frozenset({"tlsv1.2"}),
    "tlsv1.3": frozenset({"tlsv1.3"}),
}
EDH_PARAMS = ("none", "auto", "legacy")
HOST_NAME_MAX = 255

# Feature names for RelaydConfig.unimplemented.
# pfe hook: redirect, router and demote are implemented (relayd/pfe.py); a
# redirect's `route to` (direct server return) is not: nftables has no route-to.
UNIMPL_ROUTE_TO = "redirect route to (direct server return)"
UNIMPL_AGENTX = "agentx"
UNIMPL_TLS_LISTEN = "listen ... tls"
UNIMPL_TLS_FORWARD = "forward with tls"
UNIMPL_TLS_KEYPAIR = "tls keypair"
UNIMPL_TLS_INSPECT = "tls interception (ca cert/ca key)"


# -- builders (mutable while parsing, frozen by _build) --------------------
@dataclass
class _Table:
    name: str
    where: str
    timeout: int
    hosts: list[HostConfig] = field(default_factory=list)
    disabled: bool = False
    used: bool = False


@dataclass
class _Instance:
    id: int
    name: str
    table: _Table
    port: int
    check: CheckConfig
    skip: int              # extra global intervals between checks (OpenBSD skip_cnt)
    timeout: int
    demote: str | None
    where: str
    hosts: list[tuple[int, HostConfig]] = field(default_factory=list)


@dataclass
class _Forward:
    kind: str
    where: str
    inst: _Instance | None = None
    table: str = ""
    port: int | None = None
    check: CheckConfig = field(default_factory=CheckConfig)
    skip: int = 0
    timeout: int = 0
    demote: str | None = None
    mode: str = DEFAULT_MODE
    key: bytes | None = None
    key_set: bool = False
    addr: str | None = None
    host: str | None = None
    retry: int = 0
    with_tls: bool = False
    backup: bool = False
    inet: bool = False
    inet6: str | None = None
    route: bool = False
    interface: str | None = None

    @property
    def instance_name(self) -> str:
        return f"{self.table}:{self.port}"


@dataclass
class _Relay:
    id: int
    name: str
    where: str
    listens: list[tuple[str, int, bool, str]] = field(default_factory=list)
    forwards: list[_Forward] = field(default_factory=list)
    protocol: str | None = None
    timeout: int = RELAY_TIMEOUT
    transparent: bool = False
    disabled: bool = False
    clones: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _Redirect:
    id: int
    name: str
    where: str
    listens: list[RedirectListen] = field(default_factory=list)
    port: int = 0
    table: _Forward | None = None
    backup: _Forward | None = None
    mode: str = DEFAULT_MODE
    key: bytes | None = None
    pftag: str | None = None
    pftag_match: bool = False
    timeout: int = RELAY_TIMEOUT
    sticky: bool = False
    disabled: bool = False


@dataclass
class _Router:
    id: int
    name: str
    where: str
    routes: list[IPNetwork] = field(default_factory=list)
    forward: _Forward | None = None
    rtable: int | None = None
    rtlabel: str | None = None
    disabled: bool = False


@dataclass
class _Protocol:
    id: int
    name: str
    type: str
    where: str
    tcp: dict = field(default_factory=dict)
    tls: dict = field(default_factory=dict)
    http: dict = field(default_factory=dict)
    versions: frozenset[str] = TLS_DEFAULT_VERSIONS
    keypairs: list[str] = field(default_factory=list)
    return_error: bool = False
    style: str | None = None
    rules: list[Rule] = field(default_factory=list)


class RelaydParser(Parser):
    """relayd.conf(5); see the module docstring."""

    KEYWORDS = KEYWORDS

    def __init__(self, path: str, macros: dict[str, str] | None = None,
                 text: str | None = None, verbose: int = 0) -> None:
        super().__init__(path, macros, text=text, verbose=verbose)
        self.interval = CHECK_INTERVAL
        self.interval_where: str | None = None
        self.timeout = CHECK_TIMEOUT
        self.timeout_where: str | None = None
        self.prefork: int | None = None
        self.log_state_changes = False
        self.log_host_checks = False
        self.log_connection: str | None = None
        self.socket = RELAYD_SOCKET
        self.agentx: AgentxConfig | None = None
        self.metrics: MetricsConfig | None = None
        self.tables: dict[str, _Table] = {}
        self.instances: list[_Instance] = []
        self.instance_index: dict[tuple, _Instance] = {}
        self.protocols: dict[str, _Protocol] = {}
        self.protocols_used: set[str] = set()
        self.relays: list[_Relay] = []
        self.redirects: list[_Redirect] = []
        self.routers: list[_Router] = []
        self.unimplemented: list[tuple[str, str]] = []
        self.last_template_host = 0
        self.last_host = 0
        self.last_table = 0
        self.last_relay = 0
        self.last_rdr = 0
        self.last_proto = 0
        self.last_router = 0
        self.tableport = 0          # default port of a table forward (parse.y's tableport)
        self.seen_tag = False       # `no tag` needs an earlier `tag` (parse.y's static tag)
        self.seen_label = False

    # -- driver -------------------------------------------------------------
    def parse(self) -> RelaydConfig:
        if self.errors:              # the file itself could not be opened
            raise ConfigError(self.errors.lines)
        self.top_level(self.statement)
        self._validate()
        self.finish()
        return self._build()

    def statement(self) -> None:
        t = self.tok
        if t.kind == WORD:
            fn = self._STATEMENTS.get(str(t.value))
            if fn is not None:
                self.next()
                fn(self, t)
                return
            if t.value in ("tcp", "http", "dns"):
                self.next()
                self.expect("protocol")
                self._protocol(t, str(t.value))
                return
            if t.value not in KEYWORDS:
                self.next()
                if self.at("protocol"):
                    raise self.error(f"invalid protocol type: {t.value}", t)
                self.tok, bad = t, self.tok
                self.lex.unget(bad)
        raise self.syntax_error()

    # -- small helpers -----------------------------------------------------
    def _add(self, where: str, msg: str) -> None:
        self.errors.add(where, msg)

    def _unimpl(self, tok: Token, feature: str) -> None:
        self.unimplemented.append((self.where(tok), feature))

    def _int(self, what: str = "number") -> tuple[int, Token]:
        t = self.tok
        return self.number(what), t

    def _name(self, what: str) -> tuple[str, Token]:
        t = self.tok
        return self.string(f"{what} name"), t

    def _any_word(self, what: str) -> str:
        """A string where parse.y takes a keyword as a plain string too."""
        t = self.tok
        if t.kind in (STRING, WORD, NUMBER):
            self.next()
            return str(t.value)
        raise self.syntax_error(what)

    def _table_name(self) -> tuple[str, Token]:
        self.expect_punct("<")
        t = self.tok
        name = self._any_word("table name")
        self.expect_punct(">")
        if not name or len(name) >= TABLE_NAME_SIZE:
            raise self.error("invalid table name", t)
        return name, t

    def _optlist(self, item: Callable[[], None]) -> None:
        """One option, or `{ a, b \\n c }` (comma, newline or nothing between)."""
        if not self.accept_punct("{"):
            item()
            return
        while True:
            while self.tok.kind == NL or self.at_punct(","):
                self.next()
            if self.accept_punct("}"):
                return
            if self.tok.kind == EOF:
                raise self.error("syntax error: missing '}'")
            item()

    def _body(self, item: Callable[[], None]) -> None:
        """`{ item \\n item ... }` of a redirect, relay, protocol or router."""
        def one() -> None:
            if self.accept("include"):
                self.include()
            else:
                item()
        self.block(one, seps="")

    def _port(self, allow_range: bool = False) -> tuple[int, int | None]:
        """`port N`, `port name`, `port P:P2` (the keyword not yet read)."""
        self.expect("port")
        t = self.tok
        if t.kind == NUMBER:
            self.next()
            if not 0 < int(t.value) <= 65535:
                raise self.error(f"invalid port: {t.value}", t)
            return int(t.value), None
        if t.kind not in (STRING, WORD) or (t.kind == WORD and t.value in KEYWORDS
                                            and t.value != "http"):
            raise self.syntax_error("port")
        self.next()
        first, sep, last = str(t.value).partition(":")
        lo = self._service(first, t)
        hi = self._service(last, t) if sep else None
        if hi is not None:
            if not allow_range:
                raise self.error("invalid port", t)
            if hi < lo:
                raise self.error(f"invalid port range: {t.value}", t)
        return lo, hi

    def _service(self, name: str, tok: Token) -> int:
        if name.isdigit():
            port = int(name)
            if not 0 < port <= 65535:
                raise self.error(f"invalid port: {name}", tok)
            return port
        for proto in ("tcp", "udp"):
            try:
                return addr.parse_port(name, proto)
            except addr.AddrError:
                pass
        raise self.error(f"unknown port {name}", tok)

    def _resolve(self, host: str, tok: Token, msg: str) -> list[str]:
        try:
            return addr.resolve_host(host, wildcard_both=False)
        except addr.AddrError:
            raise self.error(msg, tok) from None

    def _addrprefix(self) -> IPNetwork:
        t = self.tok
        host = self.string("address")
        ip = self._resolve(host, t, f"invalid host {host}")[0]
        bits = 128 if ":" in ip else 32
        if self.accept_punct("/"):
            nt = self.tok
            plen = self.number("prefix length")
            if not 0 <= plen <= bits:
                raise self.error(f"invalid prefixlen {plen}", nt)
            bits = plen
        return ipaddress.ip_network(f"{ip}/{bits}", strict=False)

    def _timeout_value(self) -> int:
        n, t = self._int("timeout")
        if n < 0:
            raise self.error(f"invalid timeout: {n}", t)
        return n

    def _session_timeout(self) -> int:
        self.expect("timeout")
        n, t = self._int("timeout")
        if n < 0:
            raise self.error(f"invalid timeout: {n}", t)
        if n > TIMEOUT_MAX:
            raise self.error(f"timeout too large: {n}", t)
        return n

    def _retry(self) -> int:
        if not self.accept("retry"):
            return 0
        n, t = self._int("retry")
        if n < 0:
            raise self.error(f"invalid retry value: {n}", t)
        return n

    # -- global settings ---------------------------------------------------
    def _st_interval(self, kw: Token) -> None:
        n, t = self._int("interval")
        if n <= 0:
            raise self.error(f"invalid interval: {n}", t)
        self.interval, self.interval_where = n, self.where(kw)

    def _st_timeout(self, kw: Token) -> None:
        self.timeout = self._timeout_value()
        self.timeout_where = self.where(kw)

    def _st_log(self, kw: Token) -> None:
        if self.accept("state"):
            self.expect("changes")
            self.log_state_changes = True
        elif self.accept("host"):
            self.expect("checks")
            self.log_host_checks = True
        elif self.accept("connection"):
            self.log_connection = "errors" if self.accept("errors") else "all"
        else:
            raise self.syntax_error('"state changes", "host checks" or "connection"')

    def _st_prefork(self, kw: Token) -> None:
        n, t = self._int("prefork")
        if not 0 < n <= PREFORK_MAX:
            raise self.error(f"invalid number of preforked relays: {n}", t)
        self.prefork = n

    def _st_agentx(self, kw: Token) -> None:
        context = self.string("context") if self.accept("context") else None
        path = self.string("path") if self.accept("path") else None
        kwargs = {"path": path} if path is not None else {}
        self.agentx = AgentxConfig(context=context, where=self.where(kw), **kwargs)
        self._unimpl(kw, UNIMPL_AGENTX)

    def _st_socket(self, kw: Token) -> None:
        self.socket = self.string("socket path")

    def _st_metrics(self, kw: Token) -> None:
        # Extension: `metrics listen on ADDR port N` (Prometheus exporter).
        self.expect("listen")
        self.expect("on")
        t = self.tok
        host = self.string("address")
        addrs = self._resolve(host, t, f"invalid listen ip: {host}")
        port, _ = self._port()
        if self.metrics is not None:
            raise self.error("metrics already specified", kw)
        self.metrics = MetricsConfig(addrs=tuple(addrs), port=port, where=self.where(kw))

    # -- tables --------------------------------------------------------------
    def _st_table(self, kw: Token) -> None:
        name, t = self._table_name()
        if name in self.tables:
            raise self.error(f"table {name} defined twice", t)
        tb = _Table(name=name, where=self.where(kw), timeout=self.timeout)
        nerr = len(self.errors.lines)
        while True:
            if self.accept("disable"):
                tb.disabled = True
            elif self.at_punct("{"):
                self._table_hosts(tb)
            else:
                break
        if not tb.hosts and len(self.errors.lines) == nerr:
            raise self.error(f"table {name} has no hosts", kw)
        self.tables[name] = tb

    def _table_hosts(self, tb: _Table) -> None:
        self.expect_punct("{")
        while True:
            while self.tok.kind == NL or self.at_punct(","):
                self.next()
            if self.accept_punct("}"):
                return
            if self.tok.kind == EOF:
                raise self.error("syntax error: missing '}'")
            try:
                if self.accept("include"):
                    self.include()
                else:
                    self._host(tb)
            except StmtError:
                self.recover()

    def _host(self, tb: _Table) -> None:
        t = self.tok
        name = self.string("host")
        if len(name) > HOST_NAME_MAX:
            raise self.error("host name truncated", t)
        ip = self._resolve(name, t, f"invalid host {name}")[0]
        opts: dict[str, int] = {}
        while True:
            ot = self.tok
            if self.accept("retry"):
                key, what = "retry", "retry value"
            elif self.accept("parent"):
                key, what = "parent", "parent value"
            elif self.accept("priority"):
                key, what = "priority", "priority"
            elif self.accept("ip"):
                self.expect("ttl")
                key, what = "ip_ttl", "ttl value"
            else:
                break
            if key in opts:
                raise self.error(f"{what} already set", ot)
            n, nt = self._int(what)
            hi = RTP_MAX if key == "priority" else None
            if n < 0 or (hi is not None and n > hi):
                label = "priority value" if key == "priority" else what
                raise self.error(f"invalid {label}: {n}", nt)
            opts[key] = n
        self.last_template_host += 1
        tb.hosts.append(HostConfig(id=self.last_template_host, name=name, addr=ip,
                                   where=self.where(t), **opts))

    # `forward to <table> [port N] [check ...] [interval n] [timeout ms]
    #  [demote group] [mode m [key]]`; ctx is "relay", "redirect" or "router".
    def _tablespec(self, ctx: str, kw: Token) -> _Forward:
        name, nt = self._table_name()
        fwd = _Forward(kind="table", where=self.where(kw), table=name)
        keyed = False
        while True:
            ot = self.tok
            if self.accept("check"):
                fwd.check = self._check()
            elif self.at("port"):
                fwd.port, _ = self._port()
            elif self.accept("timeout"):
                fwd.timeout = self._timeout_value()
            elif self.accept("demote"):
                gt = self.tok
                group = self.string("demote group")
                if len(group) >= IFNAMSIZ:
                    raise self.error("demote group name too long", gt)
                fwd.demote = group
            elif self.accept("interval"):
                n, it = self._int("interval")
                if n < self.interval or n % self.interval:
                    raise self.error("table interval must be divisible by global interval", it)
                fwd.skip = n // self.interval - 1
            elif self.accept("mode"):
                mode = DEFAULT_MODE
                if self.tok.kind == WORD and self.tok.value in MODE_WORDS:
                    mode = str(self.next().value)
                key = None
                kt = self.tok
                if self.is_string() or kt.kind == NUMBER:
                    key = self._hash_key(self.string("key"), kt)
                if mode in KEYED_MODES:
                    if keyed:
                        raise self.error("key already specified", kt)
                    keyed = True
                    fwd.key_set = key is not None
                    fwd.key = key if key is not None else os.urandom(16)
                elif key is not None:
                    raise self.error("key not supported by mode", kt)
                if mode in ("loadbalance", "hash") and ctx == "redirect":
                    raise self.error("mode not supported for redirections", ot)
                if mode == "least-states" and ctx != "redirect":
                    raise self.error("mode not supported for relays", ot)
                fwd.mode = mode
            else:
                break
        tb = self.tables.get(name)
        if tb is None:
            raise self.error(f"unknown table {name}", nt)
        if fwd.port is None:
            fwd.port = self.tableport
            if not fwd.port:
                raise self.error(f"invalid port: forward to <{name}> needs a port "
                                 "or a preceding listen on", nt)
        if len(fwd.instance_name) >= TABLE_NAME_SIZE:
            raise self.error("invalid table name", nt)
        if not fwd.timeout:
            fwd.timeout = tb.timeout
        return fwd

    def _hash_key(self, text: str, tok: Token) -> bytes:
        if text.startswith("0x"):
            if len(text) != 34:
                raise self.error("hex key must be 128 bits (32 hex digits) long", tok)
            try:
                return bytes.fromhex(text[2:])
            except ValueError:
                raise self.error("invalid hex key", tok) from None
        return hashlib.md5(text.encode("utf-8", "surrogateescape")).digest()

    def _instantiate(self, fwd: _Forward) -> None:
        """Attach the table instance `fwd` names, creating it if it is new."""
        tb = self.tables[fwd.table]
        tb.used = True
        key = (fwd.instance_name, fwd.port, fwd.check, fwd.skip, fwd.timeout, fwd.demote)
        inst = self.instance_index.get(key)
        if inst is None:
            self.last_table += 1
            inst = _Instance(id=self.last_table, name=fwd.instance_name, table=tb,
                             port=fwd.port or 0, check=fwd.check, skip=fwd.skip,
                             timeout=fwd.timeout, demote=fwd.demote, where=fwd.where)
            for h in tb.hosts:
                self.last_host += 1
                inst.hosts.append((self.last_host, h))
            self.instances.append(inst)
            self.instance_index[key] = inst
        fwd.inst = inst

    def _check(self) -> CheckConfig:
        t = self.tok
        if self.accept("icmp"):
            return CheckConfig(type="icmp")
        if self.accept("tcp"):
            return CheckConfig(type="tcp")
        if self.accept("tls"):
            return CheckConfig(type="tls", tls=True)
        if self.at("http") or (t.kind in (STRING, WORD) and t.value == "https"):
            https = t.value == "https"
            self.next()
            path = self.string("path")
            host = self.string("host name") if self.accept("host") else None
            kind = "https" if https else "http"
            if self.accept("code"):
                code, ct = self._int("code")
                if code <= 0:
                    raise self.error(f"invalid HTTP code: {code}", ct)
                return CheckConfig(type=kind, tls=https, path=path, host=host, code=code)
            if self.accept("digest"):
                dt = self.tok
                digest = self.string("digest")
                dtype = _digest_type(digest)
                if dtype is None:
                    raise self.error("invalid http digest", dt)
                return CheckConfig(type=kind, tls=https, path=path, host=host,
                                   digest=digest.lower(), digest_type=dtype)
            raise self.syntax_error('"code" or "digest"')
        if self.accept("send"):
            send = None if self.accept("nothing") else self.string("send data")
            self.expect("expect")
            expect = self.string("expect data")
            tls = self.accept("tls")
            return CheckConfig(type="send-expect", tls=tls,
                               send=_bytes(send) if send else None,
                               expect=_translate(expect))
        if self.accept("binary"):
            self.expect("send")
            st = self.tok
            send: bytes | None = None
            if not self.accept("nothing"):
                text = self.string("send data")
                if not text:
                    raise self.error("empty binary send data", st)
                send = _hex2bin(text)
                if send is None:
                    raise self.error("failed in binary send data", st)
            self.expect("expect")
            et = self.tok
            text = self.string("expect data")
            if not text:
                raise self.error("empty binary expect data", et)
            expect = _hex2bin(text)
            if expect is None:
                raise self.error("failed in binary expect data buffer", et)
            tls = self.accept("tls")
            return CheckConfig(type="binary", tls=tls, send=send, expect_binary=expect)
        if self.accept("script"):
            return CheckConfig(type="script", path=self.string("script path"))
        if t.kind in (STRING, WORD, NUMBER):
            raise self.error(f"invalid check type: {t.value}", t)
        raise self.syntax_error("check type")

    # -- redirects -------------------------------------------------------------
    def _st_redirect(self, kw: Token) -> None:
        name, nt = self._name("redirection")
        if any(r.name == name for r in self.redirects):
            raise self.error(f"redirection {name} defined twice", nt)
        if len(name) >= MAX_NAME_SIZE:
            raise self.error(f"redirection name truncated: {name}", nt)
        self.last_rdr += 1
        rdr = _Redirect(id=self.last_rdr, name=name, where=self.where(kw))
        self.tableport = 0
        nerr = len(self.errors.lines)
        try:
            self._body(lambda: self._rdr_item(rdr))
        finally:
            self.tableport = 0
        # A block whose lines failed is incomplete anyway: don't pile
        # "has no table" on top of the real error.
        where, ok = rdr.where, len(self.errors.lines) == nerr
        if not ok:
            pass
        elif rdr.table is None:
            self._add(where, f"redirection {name} has no table")
            ok = False
        elif not rdr.listens:
            self._add(where, f"redirection {name} has no virtual ip")
            ok = False
        elif rdr.backup is not None and rdr.backup.port != rdr.table.port:
            self._add(where, f"redirection {name} uses two different ports "
                      "for its table and backup table")
            ok = False
        if ok:
            self.redirects.append(rdr)

    def _rdr_item(self, rdr: _Redirect) -> None:
        t = self.tok
        if self.accept("listen"):
            self.expect("on")
            ht = self.tok
            host = self.string("address")
            proto = "tcp"
            if self.accept("tcp"):
                pass
            elif self.is_string():
                pt = self.tok
                proto = self.string()
                try:
                    socket.getprotobyname(proto)
                except OSError:
                    raise self.error(f"invalid protocol: {proto}", pt) from None
            lo, hi = self._port(allow_range=True)
            iface = self.string("interface") if self.accept("interface") else None
            pflog = self.accept("pflog")
            addrs = self._resolve(host, ht, f"invalid virtual ip: {host}")
            for a in addrs[:SRV_MAX_VIRTS]:
                rdr.listens.append(RedirectListen(addr=a, port=lo, port_end=hi, proto=proto,
                                                  interface=iface, pflog=pflog,
                                                  where=self.where(t)))
            if not rdr.port:
                rdr.port = lo
            self.tableport = rdr.port
        elif self.at("forward", "route", "transparent"):
            fwdmode = "forward"
            if self.accept("transparent"):
                fwdmode = "transparent"
                self.expect("forward")
            elif self.accept("route"):
                fwdmode = "route"
            else:
                self.expect("forward")
            self.expect("to")
            fwd = self._tablespec("redirect", t)
            iface = self.string("interface") if self.accept("interface") else None
            if fwdmode == "forward" and iface is not None:
                raise self.error("superfluous interface", t)
            if fwdmode == "route" and iface is None:
                raise self.error("missing interface to route to", t)
            if fwdmode == "transparent":
                raise self.error("no transparent forward here", t)
            if fwdmode == "route":          # pfe hook
                self._unimpl(t, UNIMPL_ROUTE_TO)
            if fwd.check.type == "none":
                raise self.error(f"table {fwd.instance_name} has no check", t)
            if rdr.backup is not None:
                raise self.error("only one backup table is allowed", t)
            if rdr.table is not None and fwd.mode != rdr.mode:
                raise self.error(f"backup table for {rdr.name} with different mode", t)
            fwd.route, fwd.interface = fwdmode == "route", iface
            self._instantiate(fwd)
            if fwd.key is not None:
                rdr.key = fwd.key
            if rdr.table is None:
                rdr.table, rdr.mode = fwd, fwd.mode
            else:
                fwd.backup = True
                rdr.backup = fwd
        elif self.accept("disable"):
            rdr.disabled = True
        elif self.accept("sticky-address"):
            rdr.sticky = True
        elif self.at("match", "pftag"):
            match = self.accept("match")
            self.expect("pftag")
            tt = self.tok
            tag = self.string("tag")
            if len(tag) >= TAG_NAME_SIZE:
                raise self.error(f"redirection tag name truncated: {tag}", tt)
            rdr.pftag, rdr.pftag_match = tag, match
        elif self.accept("session"):
            rdr.timeout = self._session_timeout()
        else:
            raise self.syntax_error()

    # -- relays ----------------------------------------------------------------
    def _st_relay(self, kw: Token) -> None:
        name, nt = self._name("relay")
        if len(name) >= MAX_NAME_SIZE:
            raise self.error("relay name truncated", nt)
        self.last_relay += 1
        rl = _Relay(id=self.last_relay, name=name, where=self.where(kw))
        self.tableport = 0
        nerr = len(self.errors.lines)
        try:
            self._body(lambda: self._relay_item(rl))
        finally:
            self.tableport = 0
        failed = len(self.errors.lines) != nerr
        for _, port, _, _ in rl.listens[1:]:
            self.last_relay += 1
            rl.clones.append((self.last_relay, f"{name}{self.last_relay}:{port}"))
        where = rl.where
        names = {r.name for r in self.relays} | {n for r in self.relays for _, n in r.clones}
        taken = {(a, p) for r in self.relays for a, p, _, _ in r.listens}
        mine = [(a, p) for a, p, _, _ in rl.listens]
        if failed:
            pass
        elif (name in names or any(n in names for _, n in rl.clones)
                or any(ap in taken for ap in mine) or len(set(mine)) != len(mine)):
            self._add(where, f"relay {name} or listener defined twice")
        elif not rl.listens:
            self._add(where, f"relay {name} has no listener")
        elif {"natlook", "destination"} <= {f.kind for f in rl.forwards}:
            self._add(where, f"relay {name} with conflicting nat lookup and peer options")
        elif not rl.forwards:
            self._add(where, f"relay {name} has no target, rdr, or table")
        else:
            self.relays.append(rl)

    def _relay_item(self, rl: _Relay) -> None:
        t = self.tok
        if self.accept("listen"):
            self.expect("on")
            ht = self.tok
            host = self.string("address")
            port, _ = self._port()
            tls = self.accept("tls")
            addrs = self._resolve(host, ht, f"invalid listen ip: {host}")
            for a in addrs:
                rl.listens.append((a, port, tls, self.where(t)))
            self.tableport = port
        elif self.at("forward", "route", "transparent"):
            self._relay_forward(rl, t)
        elif self.accept("session"):
            rl.timeout = self._session_timeout()
        elif self.accept("protocol"):
            pt = self.tok
            name = self.string("protocol name")
            if rl.protocol is not None:
                raise self.error("more than one protocol specified", t)
            if name not in self.protocols:
                raise self.error(f"no such protocol: {name}", pt)
            rl.protocol = name
            self.protocols_used.add(name)
        elif self.accept("disable"):
            rl.disabled = True
        else:
            raise self.syntax_error()

    def _relay_forward(self, rl: _Relay, t: Token) -> None:
        transparent = route = False
        if self.accept("transparent"):
            transparent = True
            self.expect("forward")
        elif self.accept("route"):
            route = True
        else:
            self.expect("forward")
        with_tls = False
        if self.accept("with"):
            self.expect("tls")
            with_tls = True
        self.expect("to")
        ft = self.tok
        if self.at_punct("<"):
            fwd = self._tablespec("relay", t)
        elif self.accept("nat"):
            self.expect("lookup")
            fwd = _Forward(kind="natlook", where=self.where(t), retry=self._retry())
        elif self.accept("destination"):
            fwd = _Forward(kind="destination", where=self.where(t), retry=self._retry())
        else:
            host = self.string("address")
            if self.at("port"):
                port, _ = self._port()
            elif self.tableport:
                port = self.tableport
            else:
                raise self.error(f"invalid port: forward to {host} needs a port "
                                 "or a preceding listen on", ft)
            retry = self._retry()
            ip = self._resolve(host, ft, f"invalid forward ip: {host}")[0]
            if any(f.kind == "address" for f in rl.forwards):
                raise self.error(f"relay {rl.name} target or redirection already specified", t)
            fwd = _Forward(kind="address", where=self.where(t), addr=ip, host=host,
                           port=port, retry=retry)
        if self.accept("inet"):
            fwd.inet = True
        elif self.accept("inet6"):
            it = self.tok
            prefix = self.string("ipv6 prefix")
            try:
                ipaddress.IPv6Address(prefix)
            except ValueError:
                raise self.error(f"invalid ipv6 address {prefix}", it) from None
            fwd.inet6 = prefix
        if route:
            raise self.error("no route for relays", t)
        fwd.with_tls = with_tls     # tls hook: implemented (relay_tls)
        if transparent:
            rl.transparent = True
        if fwd.kind == "table":
            fwd.backup = any(f.kind == "table" for f in rl.forwards)
            self._instantiate(fwd)
        rl.forwards.append(fwd)

    # -- protocols -------------------------------------------------------------
    def _st_protocol(self, kw: Token) -> None:
        self._protocol(kw, "tcp")

    def _protocol(self, kw: Token, ptype: str) -> None:
        name, nt = self._name("protocol")
        if name == "default" or name in self.protocols:
            raise self.error(f"protocol {name} defined twice", nt)
        if len(name) >= MAX_NAME_SIZE:
            raise self.error("protocol name truncated", nt)
        self.last_proto += 1
        p = _Protocol(id=self.last_proto, name=name, type=ptype, where=self.where(kw))
        if self.at_punct("{"):
            self._body(lambda: self._proto_item(p))
        if not p.versions:
            raise self.error("invalid TLS protocol", kw)
        self.protocols[name] = p

    def _proto_item(self, p: _Protocol) -> None:
        t = self.tok
        if self.accept("tls"):
            if p.type not in ("tcp", "http"):
                raise self.error("can set tls options only for tcp or http protocols", t)
            self._optlist(lambda: self._tls_opt(p))
        elif self.accept("tcp"):
            if p.type not in ("tcp", "http"):
                raise self.error("can set tcp options only for tcp or http protocols", t)
            self._optlist(lambda: self._tcp_opt(p))
        elif self.accept("http"):
            if p.type != "http":
                raise self.error("can set http options only for http protocol", t)
            self._optlist(lambda: self._http_opt(p))
        elif self.accept("return"):
            self.expect("error")
            p.return_error = True
            if self.at("style") or self.at_punct("{"):
                self._optlist(lambda: self._style(p))
        elif self.at("block", "pass", "match"):
            p.rules.append(self._rule())
        else:
            raise self.syntax_error()

    def _style(self, p: _Protocol) -> None:
        self.expect("style")
        p.style = self.string("style")

    def _tcp_opt(self, p: _Protocol) -> None:
        no = self.accept("no")
        if self.accept("nodelay"):
            p.tcp["nodelay"] = not no
        elif self.accept("sack"):
            p.tcp["sack"] = not no
        elif self.accept("splice"):
            p.tcp["splice"] = not no
        elif no:
            raise self.syntax_error('"nodelay", "sack" or "splice"')
        elif self.accept("backlog"):
            n, nt = self._int("backlog")
            if not 0 <= n <= RELAY_MAX_BACKLOG:
                raise self.error(f"invalid backlog: {n}", nt)
            p.tcp["backlog"] = n
        elif self.accept("socket"):
            self.expect("buffer")
            n, nt = self._int("socket buffer size")
            if n < 0:
                raise self.error(f"invalid socket buffer size: {n}", nt)
            p.tcp["socket_buffer"] = n
        elif self.accept("ip"):
            ft = self.tok
            flag = "ttl" if self.accept("ttl") else self.string("ttl or minttl")
            n, nt = self._int("ttl")
            if n < 0:
                raise self.error(f"invalid ttl: {n}", nt)
            if flag.lower() == "ttl":
                p.tcp["ip_ttl"] = n
            elif flag.lower() == "minttl":
                p.tcp["ip_minttl"] = n
            else:
                raise self.error(f"invalid TCP/IP flag: {flag}", ft)
        else:
            raise self.syntax_error("tcp option")

    def _tls_opt(self, p: _Protocol) -> None:
        if self.accept("no"):
            if self.accept("session"):
                self.expect("tickets")
                p.tls["session_tickets"] = False
            elif self.accept("edh"):
                p.tls["edh"] = "none"
            else:
                flag = self._tls_flag()
                if flag == "cipher-server-preference":
                    p.tls["cipher_server_preference"] = False
                elif flag == "client-renegotiation":
                    p.tls["client_renegotiation"] = False
                else:
                    p.versions = p.versions - TLS_FLAGS[flag]
        elif self.accept("session"):
            self.expect("tickets")
            p.tls["session_tickets"] = True
        elif self.accept("ciphers"):
            p.tls["ciphers"] = self.string("ciphers")
        elif self.accept("ecdhe"):
            p.tls["ecdhe"] = self.string("curves")
        elif self.accept("edh"):
            params = "auto"
            if self.accept("params"):
                pt = self.tok
                params = self.string("edh params")
                if params not in EDH_PARAMS:
                    raise self.error(f"tls edh params {params}: invalid", pt)
            p.tls["edh"] = params
        elif self.accept("ca"):
            if self.accept("file"):
                p.tls["ca_file"] = self.string("path")
            elif self.accept("cert"):
                p.tls["ca_cert"] = self.string("path")
            elif self.accept("key"):
                p.tls["ca_key"] = self.string("path")
                self.expect("password")
                p.tls["ca_key_password"] = self.string("password")
            else:
                raise self.syntax_error('"file", "cert" or "key"')
        elif self.accept("client"):
            self.expect("ca")
            p.tls["client_ca"] = self.string("path")
        elif self.accept("keypair"):
            kt = self.tok
            name = self.string("keypair name")
            if len(name) >= 4096:
                raise self.error("keypair name too long", kt)
            p.keypairs.append(name)
        else:
            flag = self._tls_flag()
            if flag == "cipher-server-preference":
                p.tls["cipher_server_preference"] = True
            elif flag == "client-renegotiation":
                p.tls["client_renegotiation"] = True
            else:
                p.versions = p.versions | TLS_FLAGS[flag]

    def _tls_flag(self) -> str:
        t = self.tok
        flag = self.string("tls option")
        if flag in TLS_FLAGS or flag in ("cipher-server-preference", "client-renegotiation"):
            return flag
        raise self.error(f"invalid TLS flag: {flag}", t)

    def _http_opt(self, p: _Protocol) -> None:
        if self.accept("headerlen"):
            n, nt = self._int("headerlen")
            if not 0 <= n <= RELAY_MAXHEADERLENGTH:
                raise self.error(f"invalid headerlen: {n}", nt)
            p.http["headerlen"] = n
        elif self.accept("websockets"):
            p.http["websockets"] = True
        elif self.accept("no"):
            self.expect("websockets")
            p.http["websockets"] = False
        elif self.accept("http2"):
            p.http["http2"] = True
            # Extension knobs of the HTTP/2 limits (engine.http2.H2Limits).
            while self.at("max-streams", "max-requests"):
                word = self.next().value
                n, nt = self._int(word)
                if not 1 <= n <= 2**31 - 1:
                    raise self.error(f"invalid {word}: {n}", nt)
                p.http["h2_" + word.replace("-", "_")] = n
        else:
            raise self.syntax_error('"headerlen", "http2" or "websockets"')

    # -- filter rules ----------------------------------------------------------
    def _rule(self) -> Rule:
        t = self.next()
        rule: dict = {"action": str(t.value), "where": self.where(t)}
        direction = "request"
        if self.accept("request"):
            direction = "request"
        elif self.accept("response"):
            direction = "response"
        rule["direction"] = direction
        rule["quick"] = self.accept("quick")
        af = "inet" if self.accept("inet") else "inet6" if self.accept("inet6") else None
        rule["af"] = af
        src = self._addrprefix() if self.accept("from") else None
        dst = self._addrprefix() if self.accept("to") else None
        fams = {n.version for n in (src, dst) if n is not None}
        if af is not None:
            fams.add(4 if af == "inet" else 6)
        if len(fams) > 1:
            raise self.error("address family mismatch", t)
        rule["src"], rule["dst"] = src, dst
        entities: dict[str, dict] = {}
        last_type: str | None = None
        file_tok: Token | None = None
        while not self.at_end():
            ot = self.tok
            if self.accept("method"):
                mt = self.tok
                method = self.string("method")
                if method not in HTTP_METHODS:
                    raise self.error("unknown HTTP method currently not supported", mt)
                rule["method"] = method
            elif self.at("cookie", "header", "path", "query", "url"):
                etype = str(self.next().value)
                strip = self._entity(etype, entities, ot)
                if strip is not None:
                    rule["path_strip"] = strip
                last_type = etype
            elif self.accept("forward"):
                self.expect("to")
                name, nt = self._table_name()
                if name not in self.tables:
                    raise self.error("undefined forward table", nt)
                rule["forward_to"] = name
            elif self.accept("tag"):
                rule["tag"] = self._tag_name("tag", rule, ot)
                self.seen_tag = True
            elif self.accept("tagged"):
                rule["tagged"] = self._tag_name("tagged", rule, ot)
            elif self.accept("label"):
                lt = self.tok
                label = self.string("label")
                if "label" in rule:
                    raise self.error("label already defined", ot)
                if not label:
                    raise self.error("invalid label", lt)
                if len(label) >= LABEL_NAME_SIZE:
                    raise self.error("label truncated", lt)
                rule["label"] = label
                self.seen_label = True
            elif self.accept("no"):
                if self.accept("tag"):
                    if not self.seen_tag:
                        raise self.error("no tag defined", ot)
                    rule["no_tag"] = True
                elif self.accept("label"):
                    if not self.seen_label:
                        raise self.error("no label defined", ot)
                    rule["no_label"] = True
                else:
                    raise self.syntax_error('"tag" or "label"')
            elif self.accept("file"):
                ft = self.tok
                path = self.string("file name")
                value = self.string("value") if self.accept("value") else None
                if file_tok is not None:
                    raise self.error("only one file per rule supported", ot)
                if last_type is None:
                    raise self.error("file needs a cookie, header, path, query or url "
                                     "entity before it", ot)
                file_tok = ot
                ent = entities[last_type]
                ent["keys"] = self._load_keys(path, ent.get("digest", False), ft)
                ent["file"], ent["key"], ent["value"] = path, None, value
            else:
                raise self.syntax_error()
        if file_tok is not None and len(entities) > 1:
            raise self.error("file keys with more than one entity type per rule "
                             "are not supported", file_tok)
        ents = []
        for etype, ent in entities.items():
            self._check_entity(etype, ent, direction, t)
            ents.append(Entity(**ent))
        if "path_strip" in rule and direction != "request":
            raise self.error("failed to load rule: path is only available with "
                             "the direction request", t)
        return Rule(entities=tuple(ents), **rule)

    def _tag_name(self, what: str, rule: dict, ot: Token) -> str:
        nt = self.tok
        name = self.string(what)
        if what in rule:
            raise self.error(f"{what} already defined", ot)
        if not name:
            raise self.error("invalid tag", nt)
        if len(name) >= TAG_NAME_SIZE:
            raise self.error(f"{what} truncated", nt)
        return name

    def _entity(self, etype: str, entities: dict[str, dict], ot: Token) -> int | None:
        """`TYPE [option] [[digest] key [value v]]` or `path strip N`."""
        if etype == "path" and self.accept("strip"):
            n, nt = self._int("strip number")
            if n < 0:
                raise self.error("invalid strip number", nt)
            return n
        option = None
        if self.tok.kind == WORD and self.tok.value in KEY_OPTIONS:
            option = str(self.next().value)
        if etype in ("query", "url") and option in ("append", "set", "remove"):
            raise self.error(f"combining {etype} type and the given option is not "
                             "supported", ot)
        ent: dict = {"type": etype, "option": option}
        if etype == "url" and self.accept("digest"):
            ent["digest"] = True
            if self.at("file"):
                entities[etype] = ent
                return None
            kt = self.tok
            key = self.string("digest")
            if _digest_type(key) is None:
                raise self.error(f"invalid url digest: {key} (need 40 or 32 hex digits)", kt)
            ent["key"] = key.lower()
        elif self.accept("pattern"):
            # patterns(7) instead of a glob for the key and the value
            # (newer OpenBSD relayd); checked now, as httpd's.
            ent["pattern"] = True
            ent["key"] = self._rule_pattern("key")
        elif self.is_string() or self.tok.kind == NUMBER:
            ent["key"] = self.string("key")
        if "key" in ent and self.accept("value"):
            ent["value"] = self._rule_pattern("value") if ent.get("pattern") \
                else self.string("value")
        entities[etype] = ent
        return None

    def _rule_pattern(self, what: str) -> str:
        t = self.tok
        text = self.string(what)
        try:
            patterns.check(text)
        except patterns.PatternError as e:
            raise self.error(f"invalid pattern: {e}", t) from None
        return text

    def _check_entity(self, etype: str, ent: dict, direction: str, t: Token) -> None:
        option = ent.get("option")
        if etype in REQUEST_ONLY_ENTITIES and direction != "request":
            raise self.error(f"failed to load rule: {etype} is only available with the "
                             "direction request", t)
        has_key = ent.get("key") is not None or ent.get("file") is not None
        if option == "log" and not has_key:
            ent["key"] = "*"
        if option in ("append", "set", "remove") and not has_key:
            raise self.error(f"{etype} {option} needs a key", t)
        if option in ("append", "set") and ent.get("value") is None:
            raise self.error(f"{etype} {option} needs a value", t)

    def _load_keys(self, path: str, digest: bool, tok: Token) -> tuple[str, ...]:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError:
            raise self.error(f"failed to load rules from {path}", tok) from None
        keys = []
        for line in lines:
            key = re.split(r"[\r\n\t ]", line, maxsplit=1)[0]
            if not key or key.startswith("#"):
                continue
            if digest:
                if _digest_type(key) is None:
                    raise self.error(f"invalid url digest in {path}: {key}", tok)
                key = key.lower()
            keys.append(key)
        return tuple(keys)

    # -- routers ---------------------------------------------------------------
    def _st_router(self, kw: Token) -> None:
        name, nt = self._name("router")
        if any(r.name == name for r in self.routers):
            raise self.error(f"router {name} defined twice", nt)
        if len(name) >= MAX_NAME_SIZE:
            raise self.error("router name truncated", nt)
        self.last_router += 1
        rt = _Router(id=self.last_router, name=name, where=self.where(kw))
        self.tableport = ROUTER_DEFAULT_PORT
        nerr = len(self.errors.lines)
        try:
            self._body(lambda: self._router_item(rt))
        finally:
            self.tableport = 0
        if len(self.errors.lines) != nerr:
            pass
        elif not rt.routes:
            self._add(rt.where, f"router {name} without routes")
        elif rt.forward is None:
            self._add(rt.where, f"router {name} has no table")
        else:
            self.routers.append(rt)

    def _router_item(self, rt: _Router) -> None:
        t = self.tok
        if self.accept("route"):
            net = self._addrprefix()
            if rt.routes and rt.routes[0].version != net.version:
                raise self.error(f"router {rt.name} address family mismatch", t)
            rt.routes.append(net)
        elif self.accept("forward"):
            self.expect("to")
            fwd = self._tablespec("router", t)
            if rt.forward is not None:
                raise self.error(f"router {rt.name} table already specified", t)
            self._instantiate(fwd)
            rt.forward = fwd
        elif self.accept("rtable"):
            n, nt = self._int("rtable")
            if rt.rtable is not None:
                raise self.error(f"router {rt.name} rtable already specified", t)
            if not 0 <= n <= RT_TABLEID_MAX:
                raise self.error(f"invalid rtable id {n}", nt)
            rt.rtable = n
        elif self.accept("rtlabel"):
            lt = self.tok
            label = self.string("label")
            if len(label) >= RT_LABEL_SIZE:
                raise self.error("route label truncated", lt)
            rt.rtlabel = label
        elif self.accept("disable"):
            rt.disabled = True
        else:
            raise self.syntax_error()

    _STATEMENTS: dict[str, Callable[["RelaydParser", Token], None]] = {
        "interval": _st_interval,
        "timeout": _st_timeout,
        "log": _st_log,
        "prefork": _st_prefork,
        "agentx": _st_agentx,
        "socket": _st_socket,
        "metrics": _st_metrics,
        "table": _st_table,
        "redirect": _st_redirect,
        "relay": _st_relay,
        "protocol": _st_protocol,
        "router": _st_router,
    }

    # -- whole file --------------------------------------------------------------
    def _validate(self) -> None:
        if not (self.relays or self.redirects or self.routers):
            self.errors.lines.append(f"{self.path}: no actions, nothing to do")
        if self.timeout >= self.interval * 1000:
            where = self.timeout_where or self.interval_where or self.path
            self._add(where, "global timeout exceeds interval")
        hosts = {hid: h for inst in self.instances for hid, h in inst.hosts}
        bad_parents: set[tuple[str, int]] = set()
        for inst in self.instances:
            for hid, h in inst.hosts:
                if not h.parent:
                    continue
                ph = hosts.get(h.parent)
                if ph is None or h.parent == hid or ph.parent:
                    bad_parents.add((h.where, h.parent))
            if inst.timeout >= self.interval * 1000:
                self._add(inst.where, f"table timeout exceeds interval: {inst.name}")
        for where, pid in sorted(bad_parents, key=lambda x: _line_key(x[0])):
            self._add(where, f"host parent id {pid} invalid")
        for tb in self.tables.values():
            if not tb.used:
                self.errors.warn(tb.where, f"unused table: {tb.name}")
        for p in self.protocols.values():
            if p.name not in self.protocols_used:
                self.errors.warn(p.where, f"unused protocol: {p.name}")
        for rl in self.relays:
            p = self.protocols.get(rl.protocol or "")
            if p is None:
                continue
            tables = {f.table for f in rl.forwards if f.kind == "table"}
            for rule in p.rules:
                if rule.forward_to and rule.forward_to not in tables:
                    self.errors.warn(rl.where, f"relay {rl.name}: protocol {p.name} "
                                     f"forwards to <{rule.forward_to}>, but the relay "
                                     "does not")

    def _build(self) -> RelaydConfig:
        hosts = {hid: h for inst in self.instances for hid, h in inst.hosts}
        insts: dict[int, TableInstance] = {}
        for inst in self.instances:
            ihosts = []
            for hid, h in inst.hosts:
                ph = hosts.get(h.parent)
                ok = ph is not None and h.parent != hid and not ph.parent
                ihosts.append(InstanceHost(id=hid, table_id=inst.id, conf=h,
                                           parent=h.parent if ok else 0))
            insts[inst.id] = TableInstance(
                id=inst.id, name=inst.name, table=inst.table.name, port=inst.port,
                check=inst.check, interval=(inst.skip + 1) * self.interval,
                timeout=inst.timeout, hosts=tuple(ihosts), demote=inst.demote,
                disabled=inst.table.disabled, where=inst.where)

        def fwd(f: _Forward) -> ForwardConfig:
            return ForwardConfig(
                kind=f.kind, where=f.where,
                table=insts[f.inst.id] if f.inst is not None else None,
                mode=f.mode, key=f.key, key_set=f.key_set, addr=f.addr, host=f.host,
                port=f.port, retry=f.retry, with_tls=f.with_tls, backup=f.backup,
                inet=f.inet, inet6=f.inet6, route=f.route, interface=f.interface)

        relays = []
        for rl in self.relays:
            ids = [(rl.id, rl.name)] + rl.clones
            listens = tuple(Listen(addr=a, port=p, tls=tls, id=i, name=n, where=w)
                            for (a, p, tls, w), (i, n) in zip(rl.listens, ids))
            relays.append(RelayConfig(
                id=rl.id, name=rl.name, where=rl.where, listens=listens,
                forwards=tuple(fwd(f) for f in rl.forwards), protocol=rl.protocol,
                session_timeout=rl.timeout, transparent=rl.transparent,
                tls_client=any(f.with_tls for f in rl.forwards), disabled=rl.disabled))
        protocols = []
        for p in self.protocols.values():
            protocols.append(ProtocolConfig(
                id=p.id, name=p.name, type=p.type, where=p.where,
                tcp=TcpOptions(**p.tcp),
                tls=TlsOptions(keypairs=tuple(p.keypairs), versions=p.versions, **p.tls),
                http=HttpOptions(**p.http), return_error=p.return_error, style=p.style,
                rules=tuple(p.rules)))
        redirects = [RedirectConfig(
            id=r.id, name=r.name, where=r.where, listens=tuple(r.listens),
            table=fwd(r.table), backup=fwd(r.backup) if r.backup else None, mode=r.mode,
            key=r.key, pftag=r.pftag, pftag_match=r.pftag_match, session_timeout=r.timeout,
            sticky_address=r.sticky, disabled=r.disabled)
            for r in self.redirects if r.table is not None]
        routers = [RouterConfig(
            id=r.id, name=r.name, where=r.where, routes=tuple(r.routes),
            forward=fwd(r.forward), rtable=r.rtable or 0, rtlabel=r.rtlabel,
            disabled=r.disabled) for r in self.routers if r.forward is not None]
        tables = tuple(TableConfig(name=tb.name, hosts=tuple(tb.hosts), disabled=tb.disabled,
                                   timeout=tb.timeout, where=tb.where)
                       for tb in self.tables.values())
        return RelaydConfig(
            path=self.path, interval=self.interval, timeout=self.timeout,
            prefork=self.prefork, log_state_changes=self.log_state_changes,
            log_host_checks=self.log_host_checks, log_connection=self.log_connection,
            socket=self.socket, agentx=self.agentx, metrics=self.metrics, tables=tables,
            instances=tuple(insts.values()), protocols=tuple(protocols),
            relays=tuple(relays), redirects=tuple(redirects), routers=tuple(routers),
            unimplemented=tuple(self.unimplemented), warnings=tuple(self.errors.warnings))


# -- helpers -------------------------------------------------------------------
def _digest_type(text: str) -> str | None:
    """"sha1"/"md5" by length, as OpenBSD decides; None if not hex of either length."""
    if not re.fullmatch(r"[0-9A-Fa-f]+", text):
        return None
    return {40: "sha1", 32: "md5"}.get(len(text))


def _hex2bin(text: str) -> bytes | None:
    if len(text) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", text):
        return None
    return bytes.fromhex(text)


def _translate(text: str) -> str:
    """OpenBSD's translate_string(): `\\n`, `\\r`, and `\\x` -> x."""
    return re.sub(r"\\(.?)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), text,
                  flags=re.S)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _line_key(where: str) -> tuple[str, int]:
    name, _, line = where.rpartition(":")
    return (name, int(line) if line.isdigit() else 0)


def load(path: str, macros: dict[str, str] | None = None, verbose: int = 0,
         text: str | None = None) -> RelaydConfig:
    """Parse and validate relayd.conf at `path` (or `text`, named `path`).

    `macros` are -D definitions; they override the file's.  Raises
    shared.lexer.ConfigError with every "file:line: message" on failure.
    Warnings (unused tables/protocols, unused macros with verbose) are in
    the result's `warnings`.
    """
    return RelaydParser(path, macros, text=text, verbose=verbose).parse()
