"""relayd.config -- defaults and the frozen configuration of relayd.

relayd.parse produces these values; nothing here reads files, resolves
names or binds sockets.  The shapes follow relayd.h (2024) closely:

* `table <name> { hosts }` is only a *template* (TableConfig).  Every
  `forward to <name> [port P] options` in a relay, redirect or router makes
  a *table instance* (TableInstance) named `name:P` with its own check,
  interval and timeout, and its own copy of the hosts (InstanceHost) with
  global host ids.  Those instance ids are what relayctl shows, what
  `relayctl host disable N` and a host's `parent N` refer to, and what the
  health checker reports in HOST_STATUS.  Two forwards with the same table,
  port and check options share one instance (OpenBSD's table_findbyconf).
* A relay keeps its forwards in order: the first table forward is the main
  table, later ones are backups; a `destination`/`nat lookup` forward plus
  an address or table forward means "fall back if the lookup fails".
* Filter rules (protocol `block|pass|match ...`) are kept in file order.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterator, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# -- defaults and limits (relayd.h v1.276, relayd.conf(5) 2024) ------------
RELAYD_CONF = "/etc/relayd.conf"         # -f default
RELAYD_SOCKET = "/var/run/relayd.sock"   # control socket default (`socket`)
RELAYD_USER = "_relayd"                  # unprivileged user (checks, relays)
RELAYD_SERVERNAME = "OpenBSD relayd"     # $SERVER_NAME and error page footer
CHECK_INTERVAL = 10                      # seconds between check rounds (`interval`)
CHECK_TIMEOUT = 200                      # ms per check (`timeout`); must be < interval
RELAY_TIMEOUT = 600                      # session timeout (s) of relays and redirects
RELAY_NUMPROC = 3                        # OpenBSD's default relay process count
PREFORK_MAX = 32                         # `prefork` upper bound (PROC_MAX_INSTANCES)
# `tcp backlog` unset is None: engine.listen's default (511), not OpenBSD's
# RELAY_BACKLOG 10, which drops connections under a burst on Linux.
RELAY_MAX_BACKLOG = 512                  # `tcp backlog` upper bound
RELAY_DEFHEADERLENGTH = 8192             # `http headerlen` default (bytes)
RELAY_MAXHEADERLENGTH = 131072           # `http headerlen` upper bound
H2_MAX_STREAMS = 100                     # `http2 max-streams`: streams at once (SETTINGS)
H2_MAX_REQUESTS = 1000                   # `http2 max-requests`: streams per connection, then GOAWAY
RELAY_MAXLOOKUPLEVELS = 5                # url lookups: host/path levels tried
RELAY_MAX_HASH_RETRIES = 5               # hash modes: candidates tried for an up host
RELAY_STATINTERVAL = 60                  # statistics interval (s) for relayctl
TIMEOUT_MAX = 2147483647                 # `session timeout` upper bound (INT_MAX)
TLS_CIPHERS = "HIGH:!aNULL"              # `tls ciphers` default
TLS_ECDHE_CURVES = "default"             # `tls ecdhe` default
TLS_DHPARAMS = "none"                    # `tls edh` default (no edh)
TLS_VERSIONS = ("sslv3", "tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3")  # `tls [no] X` flags
TLS_DEFAULT_VERSIONS = frozenset({"tlsv1.2", "tlsv1.3"})  # enabled unless changed
TLS_SSL_DIR = "/etc/ssl"                 # keypair NAME -> /etc/ssl/NAME[:PORT].crt
TLS_KEY_DIR = "/etc/ssl/private"         # keypair NAME -> /etc/ssl/private/NAME[:PORT].key
AGENTX_MASTER_PATH = "/var/agentx/master"  # `agentx path` default
HASH_KEY_SIZE = 16                       # bytes of a `mode ... key` (128-bit SipHash key)
ROUTER_DEFAULT_PORT = 65535              # router `forward to <t>` without port (OpenBSD quirk)
MAX_NAME_SIZE = 64                       # relay/redirect/router/protocol name limit (incl. NUL)
TABLE_NAME_SIZE = 64                     # table and instance ("name:port") name limit
TAG_NAME_SIZE = 64                       # filter `tag`/`tagged`, redirect `pftag` limit
LABEL_NAME_SIZE = 1024                   # filter `label` limit
RT_LABEL_SIZE = 32                       # router `rtlabel` limit
IFNAMSIZ = 16                            # `interface`, `demote` group name limit
SRV_MAX_VIRTS = 16                       # addresses one redirect `listen on` may expand to
RTP_MAX = 63                             # host `priority` upper bound
RT_TABLEID_MAX = 255                     # router `rtable` upper bound

# Scheduling modes; which of them a relay / a redirect may use.
MODES = ("roundrobin", "random", "hash", "source-hash", "loadbalance", "least-states")
RELAY_MODES = frozenset({"roundrobin", "random", "hash", "source-hash", "loadbalance"})
REDIRECT_MODES = frozenset({"roundrobin", "random", "source-hash", "least-states"})
KEYED_MODES = frozenset({"hash", "source-hash", "loadbalance"})  # take `[key]`
DEFAULT_MODE = "roundrobin"

# Health check types (CheckConfig.type).
CHECK_TYPES = ("none", "icmp", "tcp", "tls", "http", "https", "send-expect",
               "binary", "script")

# Filter rule vocabulary.
RULE_ACTIONS = ("block", "pass", "match")
RULE_DIRECTIONS = ("request", "response")
ENTITY_TYPES = ("cookie", "header", "path", "query", "url")
ENTITY_OPTIONS = ("append", "set", "remove", "hash", "log")
# Cookie rules work both ways (response: Set-Cookie), as parse.y allows.
REQUEST_ONLY_ENTITIES = frozenset({"path", "query", "url"})
# Methods `method NAME` accepts (relayd.conf(5), http.h); case-sensitive.
HTTP_METHODS = frozenset({
    "ACL", "BASELINE-CONTROL", "CHECKIN", "CHECKOUT", "CONNECT", "COPY",
    "DELETE", "GET", "HEAD", "LABEL", "LOCK", "MERGE", "MKACTIVITY", "MKCOL",
    "MKREDIRECTREF", "MKWORKSPACE", "MOVE", "OPTIONS", "ORDERPATCH", "PATCH",
    "POST", "PROPFIND", "PROPPATCH", "PUT", "REPORT", "SEARCH", "TRACE",
    "UNCHECKOUT", "UNLOCK", "UPDATE", "UPDATEREDIRECTREF", "VERSION-CONTROL",
})
# Macros a `set`/`append` value may hold; the relay expands them per session.
VALUE_MACROS = ("$HOST", "$REMOTE_ADDR", "$REMOTE_PORT", "$SERVER_ADDR",
                "$SERVER_PORT", "$SERVER_NAME", "$TIMEOUT")


# -- tables and checks ----------------------------------------------------
@dataclass(frozen=True)
class HostConfig:
    """One host entry of a `table` template, as written."""
    id: int                  # template host id: 1.. over all tables in file order (not relayctl's id)
    name: str                # as written (host name or address); check scripts get this
    addr: str                # resolved once at load: first address, IPv4 preferred
    retry: int = 0           # extra failed checks tolerated; relays: connect retries
    parent: int = 0          # instance host id whose state this host copies; 0: none
    priority: int = 0        # route priority for routers; 0: kernel default (8)
    ip_ttl: int = 0          # TTL of check packets; 0: system default
    where: str = ""          # "file:line" of the entry


@dataclass(frozen=True)
class TableConfig:
    """A `table <name> [disable] { ... }` template."""
    name: str
    hosts: tuple[HostConfig, ...]
    disabled: bool = False   # `disable`: instances start disabled (no checks, empty)
    timeout: int = CHECK_TIMEOUT  # global `timeout` in force where the table was defined (ms)
    where: str = ""


@dataclass(frozen=True)
class CheckConfig:
    """The `check ...` option of a forward (what hce runs per host)."""
    type: str = "none"            # one of CHECK_TYPES; "none" (relays, routers): hce skips
                                  # the instance and the relay treats every host as up
    tls: bool = False             # run the check inside TLS (tls, https, send/binary ... tls)
    path: str | None = None       # http/https: request path; script: program to run
    host: str | None = None       # http/https: Host header (switches to HTTP/1.1)
    code: int | None = None       # http/https: expected status code
    digest: str | None = None     # http/https: expected body digest, lower-case hex
    digest_type: str | None = None  # "sha1" (40 hex) or "md5" (32 hex)
    send: bytes | None = None     # send-expect: bytes sent as written (None: send nothing);
                                  # binary: the decoded bytes
    expect: str | None = None     # send-expect: fnmatch glob, \r \n translated
    expect_binary: bytes | None = None  # binary: decoded bytes the reply must start with

    def http_request(self) -> bytes:
        """The exact bytes an http/https check sends (OpenBSD format)."""
        method = "GET" if self.digest is not None else "HEAD"
        if self.host:
            return (f"{method} {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                    "Connection: close\r\n\r\n").encode()
        return f"{method} {self.path} HTTP/1.0\r\n\r\n".encode()


@dataclass(frozen=True)
class InstanceHost:
    """A host of one table instance; the unit hce checks and relayctl shows."""
    id: int                  # global host id (1.. in instance creation order): relayctl,
                             # `parent N`, HOST_STATUS; stable for a given config
    table_id: int            # TableInstance.id
    conf: HostConfig         # the template entry (name, addr, retry, priority, ttl)
    parent: int = 0          # validated parent host id (0: checked itself)

    @property
    def name(self) -> str:
        return self.conf.name

    @property
    def addr(self) -> str:
        return self.conf.addr

    @property
    def retry(self) -> int:
        return self.conf.retry


@dataclass(frozen=True)
class TableInstance:
    """`<table>:<port>` with its own check: what `forward to <t>` creates."""
    id: int                  # table id (1.. in creation order), shown by relayctl
    name: str                # "table:port", relayctl's table name
    table: str               # template name
    port: int                # port checked and connected to
    check: CheckConfig
    interval: int            # seconds between checks (a multiple of the global interval)
    timeout: int             # ms per check; < global interval
    hosts: tuple[InstanceHost, ...]
    demote: str | None = None  # carp demotion group (`demote`)
    disabled: bool = False   # template `disable`
    where: str = ""          # the forward that created it


@dataclass(frozen=True)
class ForwardConfig:
    """One `forward|route to ...` line of a relay, redirect or router."""
    kind: str                # "table" | "address" | "destination" | "natlook"
    where: str = ""
    table: TableInstance | None = None  # kind "table": the (shared) instance
    mode: str = DEFAULT_MODE  # kind "table": scheduling mode
    key: bytes | None = None  # keyed modes: 16-byte SipHash key (random when not given)
    key_set: bool = False    # key written in the config (vs random per load)
    addr: str | None = None  # kind "address": resolved IP
    host: str | None = None  # kind "address": as written
    port: int | None = None  # kind "address": target port; "table": the instance port
    retry: int = 0           # address/destination/natlook: connect retries
    with_tls: bool = False   # `forward with tls`: TLS towards the backend
    backup: bool = False     # not the first table forward of its block
    inet: bool = False       # `inet`: map an IPv6 original destination to IPv4
    inet6: str | None = None  # `inet6 PREFIX`: map IPv4 destinations into this prefix
    route: bool = False      # redirect `route to` (direct server return)
    interface: str | None = None  # redirect `... interface IF`


# -- relays ---------------------------------------------------------------
@dataclass(frozen=True)
class Listen:
    """One listening address of a relay (one per resolved address)."""
    addr: str
    port: int
    tls: bool = False
    id: int = 0              # relay id relayctl shows for this listener
    name: str = ""           # relay name for it; extra listeners: "<name><id>:<port>"
    where: str = ""


@dataclass(frozen=True)
class RelayConfig:
    """A `relay "name" { ... }` block."""
    id: int
    name: str
    where: str
    listens: tuple[Listen, ...]
    forwards: tuple[ForwardConfig, ...]   # file order: main, then backups / fallbacks
    protocol: str | None = None           # None: the default tcp protocol
    session_timeout: int = RELAY_TIMEOUT  # idle timeout (s)
    transparent: bool = False             # `transparent forward`: connect from client addr
    tls_client: bool = False              # any `forward with tls`: TLS to every backend
    disabled: bool = False                # accept, then close at once

    @property
    def tables(self) -> tuple[ForwardConfig, ...]:
        """Table forwards in order: main table first, then backups."""
        return tuple(f for f in self.forwards if f.kind == "table")


# -- protocols and filter rules ------------------------------------------
@dataclass(frozen=True)
class TcpOptions:
    nodelay: bool | None = None   # None: leave the socket default (= no nodelay)
    sack: bool | None = None      # None: leave the socket default
    socket_buffer: int | None = None  # SO_SNDBUF/SO_RCVBUF bytes
    backlog: int | None = None    # None: engine.listen.default_backlog()
    ip_ttl: int | None = None
    ip_minttl: int | None = None
    splice: bool = True           # False with `no splice` (performance switch only)


@dataclass(frozen=True)
class TlsOptions:
    ciphers: str = TLS_CIPHERS
    ecdhe: str = TLS_ECDHE_CURVES
    edh: str = TLS_DHPARAMS             # "none" | "auto" | "legacy"
    keypairs: tuple[str, ...] = ()      # `keypair NAME` in order (SNI); (): listen address
    ca_file: str | None = None          # verify backends (forward with tls)
    ca_cert: str | None = None          # TLS inspection CA certificate
    ca_key: str | None = None           # TLS inspection CA key
    ca_key_password: str | None = None
    client_ca: str | None = None        # require client certificates signed by it
    session_tickets: bool = False
    versions: frozenset[str] = TLS_DEFAULT_VERSIONS  # subset of TLS_VERSIONS
    cipher_server_preference: bool = True
    client_renegotiation: bool = False


@dataclass(frozen=True)
class HttpOptions:
    headerlen: int = RELAY_DEFHEADERLENGTH  # header block limit (-> 413)
    websockets: bool = False
    # `http2` (extension): HTTP/2 toward clients (ALPN h2 on TLS, prior
    # knowledge on clear text); backends stay HTTP/1.1.
    http2: bool = False
    h2_max_streams: int = H2_MAX_STREAMS     # `http2 max-streams N`
    h2_max_requests: int = H2_MAX_REQUESTS   # `http2 max-requests N`


@dataclass(frozen=True)
class Entity:
    """One `cookie|header|path|query|url [option] [key] [value v]` test."""
    type: str                    # one of ENTITY_TYPES
    option: str | None = None    # one of ENTITY_OPTIONS; None: match only
    key: str | None = None       # glob (hex digest when `digest`); None: any / none given
    value: str | None = None     # match: glob (None = "*"); set/append: new value,
                                 # may hold VALUE_MACROS
    digest: bool = False         # url: key is a SHA1 (40) / MD5 (32) hex digest of the
                                 # lookup string
    keys: tuple[str, ...] = ()   # keys loaded from `file`: the rule behaves like one copy
                                 # per key, in file order (how OpenBSD loads it)
    file: str | None = None      # the `file` the keys came from
    pattern: bool = False        # `TYPE pattern KEY`: key and value are patterns(7)
                                 # (Lua, shared.patterns; case-sensitive), not globs


@dataclass(frozen=True)
class Rule:
    """A filter rule, `(block|pass|match) ...`, kept in file order."""
    action: str                  # "block" | "pass" | "match"
    direction: str = "request"   # "request" | "response" (none written: request)
    where: str = ""
    quick: bool = False
    af: str | None = None        # "inet" | "inet6" | None
    src: IPNetwork | None = None  # `from`: client address
    dst: IPNetwork | None = None  # `to`: address the client connected to
    forward_to: str | None = None  # template table name; the relay's forward to it is used
    tag: str | None = None
    tagged: str | None = None
    label: str | None = None     # shown on the error page (may hold HTML)
    no_tag: bool = False
    no_label: bool = False
    method: str | None = None    # one of HTTP_METHODS
    entities: tuple[Entity, ...] = ()  # all must match; at most one per type
    path_strip: int | None = None  # `path strip N`: drop N leading path components


@dataclass(frozen=True)
class ProtocolConfig:
    """`[tcp|http|dns] protocol "name" { ... }`."""
    id: int
    name: str
    type: str = "tcp"            # "tcp" | "http" | "dns"
    where: str = ""
    tcp: TcpOptions = field(default_factory=TcpOptions)
    tls: TlsOptions = field(default_factory=TlsOptions)
    http: HttpOptions = field(default_factory=HttpOptions)
    return_error: bool = False   # send error pages instead of dropping
    style: str | None = None     # `return error style "css"`
    rules: tuple[Rule, ...] = ()


# The protocol of a relay without `protocol` (OpenBSD's sc_proto_default).
DEFAULT_PROTOCOL = ProtocolConfig(id=0, name="default")


# -- redirects and routers (layer 3) --------------------------------------
@dataclass(frozen=True)
class RedirectListen:
    """One virtual address of a redirect (one per resolved address)."""
    addr: str
    port: int                    # first port
    port_end: int | None = None  # `port P:P2` upper bound (inclusive)
    proto: str = "tcp"           # ip-proto name (tcp, udp, ...)
    interface: str | None = None
    pflog: bool = False
    where: str = ""


@dataclass(frozen=True)
class RedirectConfig:
    """A `redirect "name" { ... }` block (pf rdr-to / route-to)."""
    id: int
    name: str
    where: str
    listens: tuple[RedirectListen, ...]
    table: ForwardConfig                 # main table (always checked)
    backup: ForwardConfig | None = None  # at most one backup table, same port and mode
    mode: str = DEFAULT_MODE
    key: bytes | None = None             # keyed modes (source-hash)
    pftag: str | None = None
    pftag_match: bool = False            # `match pftag`: match rule instead of pass quick
    session_timeout: int = RELAY_TIMEOUT
    sticky_address: bool = False
    disabled: bool = False


@dataclass(frozen=True)
class RouterConfig:
    """A `router "name" { ... }` block (health-checked gateway routes)."""
    id: int
    name: str
    where: str
    routes: tuple[IPNetwork, ...]        # all of one address family
    forward: ForwardConfig               # the gateway table (exactly one)
    rtable: int = 0
    rtlabel: str | None = None
    disabled: bool = False


# -- global ---------------------------------------------------------------
@dataclass(frozen=True)
class AgentxConfig:
    context: str | None = None
    path: str = AGENTX_MASTER_PATH
    where: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    """Extension: `metrics listen on ADDR port N` (Prometheus exporter)."""
    addrs: tuple[str, ...]
    port: int
    where: str = ""


@dataclass(frozen=True)
class RelaydConfig:
    path: str                                   # config file as given on the command line
    interval: int = CHECK_INTERVAL              # seconds between check rounds
    timeout: int = CHECK_TIMEOUT                # default check timeout (ms)
    prefork: int | None = None                  # relay processes; None: one per core
    log_state_changes: bool = False             # `log state changes`
    log_host_checks: bool = False               # `log host checks`
    log_connection: str | None = None           # None | "all" | "errors"
    socket: str = RELAYD_SOCKET                 # control socket
    agentx: AgentxConfig | None = None          # None: no AgentX subagent
    metrics: MetricsConfig | None = None        # None: no Prometheus exporter
    tables: tuple[TableConfig, ...] = ()        # templates, file order
    instances: tuple[TableInstance, ...] = ()   # what hce checks, by id order
    protocols: tuple[ProtocolConfig, ...] = ()  # defined protocols (not the default)
    relays: tuple[RelayConfig, ...] = ()
    redirects: tuple[RedirectConfig, ...] = ()
    routers: tuple[RouterConfig, ...] = ()
    # Features parsed but not implemented yet; -n reports each as an error.
    unimplemented: tuple[tuple[str, str], ...] = ()   # (where, feature)
    warnings: tuple[str, ...] = ()              # non-fatal "file:line: message" lines

    def protocol_of(self, relay: RelayConfig) -> ProtocolConfig:
        """The protocol a relay uses (DEFAULT_PROTOCOL when none is named)."""
        for proto in self.protocols:
            if proto.name == relay.protocol:
                return proto
        return DEFAULT_PROTOCOL

    def hosts(self) -> Iterator[InstanceHost]:
        """Every host of every table instance, by host id."""
        for inst in self.instances:
            yield from inst.hosts

    def host(self, id: int) -> InstanceHost | None:
        return next((h for h in self.hosts() if h.id == id), None)

    def instance(self, name_or_id: str | int) -> TableInstance | None:
        """A table instance by id or by name ("web:80"; first of that name)."""
        for inst in self.instances:
            if inst.id == name_or_id or inst.name == name_or_id:
                return inst
        return None
