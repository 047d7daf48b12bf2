"""httpd.config -- defaults and the frozen configuration of httpd.

httpd.parse produces these values; nothing here reads files or binds
sockets.  A Location carries its *effective* configuration: the server's
settings with the location's overrides applied when the server block closed
(OpenBSD does the same inheritance in config_getserver_config()).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.acme_conf import ACME_CONF, AcmeConfig

# -- defaults (httpd.h and httpd.conf(5)) ---------------------------------
HTTPD_CONF = "/etc/httpd.conf"           # -f default
HTTPD_USER = "www"                       # chroot owner; its home is the default chroot
HTTPD_CHROOT = "/var/www"                # chroot when user www does not exist
HTTPD_LOGDIR = "/logs"                   # relative to the chroot
HTTPD_DOCROOT = "/htdocs"                # root of a server without `root`
HTTPD_INDEX = "index.html"               # directory index file
HTTPD_ACCESS_LOG = "access.log"          # log access default name
HTTPD_ERROR_LOG = "error.log"            # log error default name
HTTPD_DEFAULT_TYPE = ("application", "octet-stream")  # unknown extension
HTTPD_PREFORK_MAX = 32                   # prefork upper bound (OpenBSD: 32)
HTTPD_TLS_CERT = "/etc/ssl/server.crt"   # tls certificate default
HTTPD_TLS_KEY = "/etc/ssl/private/server.key"  # tls key default
HTTPD_TLS_CIPHERS = "secure"             # libtls keyword: AEAD + forward secrecy (engine.tls)
HTTPD_TLS_PROTOCOLS = "tlsv1.2,tlsv1.3"  # libtls "secure" protocols
HTTPD_TLS_ECDHE = "default"              # curves
HTTPD_TLS_DHE = "none"                   # no DHE unless asked
HTTPD_TLS_TICKET_LIFETIME = 7200         # `ticket lifetime default` (2 h)
HTTPD_TLS_TICKET_MIN = 60                # shortest ticket lifetime allowed
HTTPD_FCGI_SOCKET = "/run/slowcgi.sock"  # fastcgi socket default (in the chroot)
HTTPD_FCGI_PORT = 9000                   # fastcgi socket tcp default port
HSTS_MAX_AGE = 31536000                  # one year
SERVER_MAXHEADERLENGTH = 8192            # request head limit -> 413
SERVER_MAXREQUESTS = 100                 # requests per persistent connection
SERVER_MAXREQUESTBODY = 1048576          # request body limit -> 413
SERVER_TIMEOUT = 600                     # connection timeout (s)
SERVER_REQUESTTIMEOUT = 60               # request timeout (s)
# `tcp backlog` unset is None: engine.listen's default (511), not OpenBSD's
# SERVER_BACKLOG 10, which drops connections under a burst on Linux.
SERVER_MAX_CLIENTS = 1024                # clients per worker; then accept pauses (Worker.evict_reader)
HTTP2_MAX_STREAMS = 100                  # SETTINGS_MAX_CONCURRENT_STREAMS (nginx 128, HAProxy 100)
SERVER_MAXRANGES = 4                     # byte ranges per request before 416
HEADER_NAME_MAX = 127                    # header set/add name length
HEADER_VALUE_MAX = 511                   # header set/add value length
LOG_STYLES = ("common", "combined", "forwarded", "connection")
# Built-in ACME (extension, httpd.acme): `acme config` defaults to
# shared.acme_conf.ACME_CONF.  After a failure the next attempt waits
# ACME_BACKOFF_STEPS[n] x the base (60 s: 1 min, 10 min, 100 min, then
# daily); the base is also how often the certificate files are checked for
# another instance's renewal.  HTTPD_ACME_BASE (seconds, environment)
# shortens it for tests.
ACME_BASE = 60.0                         # seconds
ACME_BACKOFF_STEPS = (1, 10, 100, 1440)  # x base; the last repeats
ACME_JITTER = 0.1                        # renewal starts up to 10% of the window late
ACME_LOCK_WAIT = 10                      # x base: another instance's lock is given up on after this

# Built-in media types when no `types {}` block is given (httpd.conf(5)).
DEFAULT_MEDIA_TYPES: dict[str, str] = {
    "css": "text/css",
    "html": "text/html",
    "txt": "text/plain",
    "gif": "image/gif",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "png": "image/png",
    "svg": "image/svg+xml",
    "js": "application/javascript",
}


@dataclass(frozen=True)
class Listen:
    """One `listen on` address after resolution (one per address)."""
    addr: str            # IP literal, "0.0.0.0" or "::" for wildcards
    port: int
    tls: bool = False
    http2: bool = False  # extension: ALPN h2 (tls) or h2 by prior knowledge


@dataclass(frozen=True)
class NameMatch:
    """A server name or alias: shell glob, or Lua pattern with `match`."""
    pattern: str
    lua: bool = False


@dataclass(frozen=True)
class FastcgiConfig:
    socket: str | None = HTTPD_FCGI_SOCKET  # UNIX socket path (in chroot), or None for TCP
    host: str | None = None                 # `socket tcp HOST [PORT]`
    port: int = HTTPD_FCGI_PORT
    params: tuple[tuple[str, str], ...] = ()  # `param NAME VALUE`, in order
    strip: int = 0


@dataclass(frozen=True)
class BlockConfig:
    action: str = "block"  # "block" (error page), "drop" (close), "pass" (none)
    code: int = 403
    uri: str | None = None  # Location for 3xx, macros expanded per request


@dataclass(frozen=True)
class AuthConfig:
    realm: str
    htpasswd: str           # path inside the chroot


@dataclass(frozen=True)
class HeaderAction:
    op: str                 # "set" | "add" | "remove"
    name: str
    value: str = ""
    always: bool = False


@dataclass(frozen=True)
class HstsConfig:
    max_age: int = HSTS_MAX_AGE
    subdomains: bool = False
    preload: bool = False


@dataclass(frozen=True)
class LogConfig:
    enabled: bool = True            # `no log` turns every log off
    access: str = HTTPD_ACCESS_LOG  # file name under logdir
    error: str = HTTPD_ERROR_LOG
    style: str = "common"
    syslog: bool = False            # `log syslog`: lines go to syslog instead


@dataclass(frozen=True)
class TcpConfig:
    backlog: int | None = None      # None: engine.listen.default_backlog()
    nodelay: bool | None = None
    sack: bool | None = None
    socket_buffer: int | None = None
    ip_ttl: int | None = None
    ip_minttl: int | None = None


@dataclass(frozen=True)
class TlsConfig:
    certificate: str = HTTPD_TLS_CERT
    key: str = HTTPD_TLS_KEY
    ocsp: str | None = None
    ciphers: str = HTTPD_TLS_CIPHERS
    protocols: str = HTTPD_TLS_PROTOCOLS
    ecdhe: str = HTTPD_TLS_ECDHE
    dhe: str = HTTPD_TLS_DHE
    client_ca: str | None = None
    crl: str | None = None
    client_optional: bool = False
    ticket_lifetime: int | None = None  # None: session tickets off
    acme: str | None = None             # extension: `tls acme "HANDLE"` (certificate and key
                                        # are then that acme-client.conf domain's files)


@dataclass(frozen=True)
class Connection:
    max_request_body: int = SERVER_MAXREQUESTBODY
    max_requests: int = SERVER_MAXREQUESTS
    request_timeout: int = SERVER_REQUESTTIMEOUT
    timeout: int = SERVER_TIMEOUT
    max_streams: int = HTTP2_MAX_STREAMS    # extension: HTTP/2 streams at once


@dataclass(frozen=True)
class ServerConfig:
    """One `server` block, or the effective settings of one of its locations."""
    id: int
    name: str
    where: str                              # "file:line" of the block
    name_lua: bool = False                  # `server match`
    aliases: tuple[NameMatch, ...] = ()
    listens: tuple[Listen, ...] = ()
    root: str = HTTPD_DOCROOT
    strip: int = 0                          # `request strip n`
    rewrite: str | None = None              # `request rewrite "path"`
    index: str | None = HTTPD_INDEX         # None: `directory no index`
    auto_index: bool = False
    fastcgi: FastcgiConfig | None = None
    block: BlockConfig | None = None        # None: not blocked
    auth: AuthConfig | None = None
    connection: Connection = field(default_factory=Connection)
    default_type: tuple[str, str] | None = None   # None: the global one
    errdocs: str | None = None              # resolved: server's, else global's
    banner: bool = True
    gzip_static: bool = False
    headers: tuple[HeaderAction, ...] = ()
    hsts: HstsConfig | None = None
    log: LogConfig = field(default_factory=LogConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)
    tls: TlsConfig | None = None
    locations: tuple["Location", ...] = ()


@dataclass(frozen=True)
class Location:
    pattern: str
    lua: bool = False           # `location match`
    found: bool | None = None   # `location found` / `location not found`
    where: str = ""
    conf: ServerConfig | None = None   # effective settings (server + overrides)


@dataclass(frozen=True)
class HttpdConfig:
    path: str                               # config file as given on the command line
    chroot: str = HTTPD_CHROOT
    logdir: str | None = None               # full path; None: <chroot>/logs
    prefork: int | None = None              # None: one worker per core
    default_type: tuple[str, str] = HTTPD_DEFAULT_TYPE
    errdocs: str | None = None
    banner: bool = True
    media_types: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MEDIA_TYPES))
    servers: tuple[ServerConfig, ...] = ()
    acme_config: str = ACME_CONF            # extension: `acme config "file"`
    acme: AcmeConfig | None = None          # that file, when a server says `tls acme`
    # Features parsed but not implemented yet; -n reports each as an error.
    unimplemented: tuple[tuple[str, str], ...] = ()   # (where, feature)

    def __hash__(self) -> int:  # media_types is a dict; identity is enough
        return id(self)
