"""httpd.parse -- the httpd.conf(5) grammar.

Turns a configuration file into the frozen values of httpd.config: global
settings, the media types table and every `server` block with its
locations.  Each block is checked when it closes (listen address, tls
options) and the whole file once at the end (no servers, tls and non-tls on
one socket, tls settings that differ on one socket, a server defined twice).
Every problem is collected as `file:line: message`; load() raises
ConfigError with all of them.

Lexing, macros and `include` are shared.lexer's.  This module never binds a
socket and reads no file but the configuration and its includes (no
certificates, no htpasswd); hosts, interfaces and service names are resolved
here, in the parent, as OpenBSD does.
"""

from __future__ import annotations

import dataclasses
import pwd
from typing import Any, Callable

from shared import patterns
from httpd.config import (HEADER_NAME_MAX, HEADER_VALUE_MAX,
                          HTTPD_CHROOT, HTTPD_DEFAULT_TYPE,
                          HTTPD_FCGI_PORT, HTTPD_PREFORK_MAX,
                          HTTPD_TLS_TICKET_LIFETIME, HTTPD_TLS_TICKET_MIN,
                          HTTPD_USER, LOG_STYLES, SERVER_MAX_CLIENTS,
                          AuthConfig, BlockConfig, Connection, FastcgiConfig,
                          HeaderAction, HstsConfig, HttpdConfig, Listen,
                          Location, LogConfig, NameMatch, ServerConfig,
                          TcpConfig, TlsConfig)
from shared import acme_conf, addr
from shared.lexer import EOF, NL, NUMBER, STRING, WORD, ConfigError, Token
from shared.parser import Parser

# Reserved words (OpenBSD's keyword table plus `set` of `header set`).
KEYWORDS = frozenset("""
    access acme add alias always authenticate auto backlog banner block body buffer
    ca certificate chroot ciphers client combined common config connection crl default
    dhe directory drop ecdhe errdocs error fastcgi forwarded found gzip-static
    header hsts http2 include index ip key lifetime listen location log logdir match
    max max-age no nodelay not ocsp on optional param pass port prefork preload
    protocols remove request requests return rewrite root sack server set
    socket streams strip style subdomains syslog tcp ticket timeout tls type types with
""".split())

TLS_TICKET_MAX = 24 * 3600               # longest `ticket lifetime` (OpenBSD)
HTTP2_STREAMS_MAX = 65536                # `connection max streams` upper bound
TIMEOUT_MAX = 2**31 - 1                  # connection timeouts, in seconds
UNIX_PATH_MAX = 108                      # sun_path on Linux, NUL included
TLS_PROTOCOL_NAMES = {                   # libtls tls_config_parse_protocols()
    "tlsv1.0": {"tlsv1.0"},
    "tlsv1.1": {"tlsv1.1"},
    "tlsv1.2": {"tlsv1.2"},
    "tlsv1.3": {"tlsv1.3"},
    "tlsv1": {"tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"},
    "all": {"tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"},
    "legacy": {"tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"},
    "default": {"tlsv1.2", "tlsv1.3"},
    "secure": {"tlsv1.2", "tlsv1.3"},
}
TLS_DHE = ("none", "auto", "legacy")
REDIRECT_CODES = (301, 302, 303, 307, 308)   # block return codes taking a uri


def load(path: str, macros: dict[str, str] | None = None, verbose: int = 0,
         text: str | None = None) -> HttpdConfig:
    """Parse and validate an httpd.conf.

    `macros` are -D definitions (they win over the file's); `text`, when
    given, is parsed instead of reading `path`, which then only names the
    file in messages.  Raises shared.lexer.ConfigError listing every
    `file:line: message`; warnings (unused macros with `verbose`) go to
    stderr.
    """
    return HttpdParser.load_config(path, macros, verbose=verbose, text=text)


def default_chroot() -> str:
    """Home directory of user www, as OpenBSD's httpd defaults to."""
    try:
        return pwd.getpwnam(HTTPD_USER).pw_dir or HTTPD_CHROOT
    except KeyError:
        return HTTPD_CHROOT


def tls_protocols(text: str) -> frozenset[str]:
    """The protocol set a libtls `protocols` string selects.

    Keywords (case-insensitive, separated by `,` or `:`): tlsv1.0 .. tlsv1.3,
    tlsv1, all, legacy, default, secure; `!` negates.  Raises ValueError.
    """
    protos: set[str] = set()
    for word in text.replace(":", ",").split(","):
        word = word.strip().lower()
        if not word:
            continue
        negate = word.startswith("!")
        if negate:
            word = word[1:]
            if not protos:
                protos = set(TLS_PROTOCOL_NAMES["all"])
        names = TLS_PROTOCOL_NAMES.get(word)
        if names is None:
            raise ValueError(word)
        protos = protos - names if negate else protos | names
    return frozenset(protos)


class _Block:
    """What one server or location block says, before inheritance.

    Only what the block sets is recorded, so a location can take everything
    else from its server whatever the order in the file.
    """

    def __init__(self, where: str, location: bool) -> None:
        self.where = where
        self.location = location
        self.fields: dict[str, Any] = {}     # plain ServerConfig fields
        self.log: dict[str, Any] = {}        # LogConfig fields
        self.fcgi_on: bool | None = None     # `fastcgi` / `no fastcgi`
        self.fcgi: dict[str, Any] = {}       # FastcgiConfig fields but params
        self.fcgi_params: list[tuple[str, str]] = []
        self.headers: list[HeaderAction] = []
        # server blocks only
        self.connection: dict[str, int] = {}
        self.tcp: dict[str, Any] = {}
        self.tls: dict[str, Any] = {}
        self.tls_where: str | None = None
        self.tls_protocols: frozenset[str] | None = None
        self.acme_where: str | None = None   # `tls acme` (extension)
        self.hsts: dict[str, Any] | None = None
        self.listens: list[Listen] = []
        self.aliases: list[NameMatch] = []
        self.locations: list[_Loc] = []


@dataclasses.dataclass
class _Loc:
    pattern: str
    lua: bool
    found: bool | None
    block: _Block


@dataclasses.dataclass
class _Server:
    name: str
    lua: bool
    block: _Block


class HttpdParser(Parser):
    """Recursive descent over httpd.conf; parse() returns the HttpdConfig."""

    KEYWORDS = KEYWORDS

    def __init__(self, path: str, cmdline_macros: dict[str, str] | None = None,
                 text: str | None = None, verbose: int = 0) -> None:
        super().__init__(path, cmdline_macros, text=text, verbose=verbose)
        self.globals: dict[str, Any] = {}
        self.media_types: dict[str, str] | None = None   # None: no types {}
        self.servers: list[_Server] = []
        self.unimplemented: list[tuple[str, str]] = []
        self.acme: acme_conf.AcmeConfig | None = None

    # -- driver -------------------------------------------------------------
    def parse(self) -> HttpdConfig:
        self.top_level(self.statement)
        end = self.where()
        self.acme = self.load_acme()
        servers = self.build_servers()
        conf = HttpdConfig(
            path=self.path,
            chroot=self.globals.get("chroot", default_chroot()),
            logdir=self.globals.get("logdir"),
            prefork=self.globals.get("prefork"),
            default_type=self.globals.get("default_type", HTTPD_DEFAULT_TYPE),
            errdocs=self.globals.get("errdocs"),
            banner=self.globals.get("banner", True),
            servers=tuple(servers),
            acme_config=self.globals.get("acme_config", acme_conf.ACME_CONF),
            acme=self.acme,
            unimplemented=tuple(self.unimplemented),
            **({"media_types": self.media_types}
               if self.media_types is not None else {}))
        validate(conf, self.errors.add, end)
        return conf

    # -- helpers --------------------------------------------------------------
    def value(self, what: str) -> str:
        """A string where keywords cannot be meant (`protocols default`)."""
        t = self.tok
        if t.kind in (STRING, WORD, NUMBER):
            self.next()
            return str(t.value)
        raise self.syntax_error(what)

    def media_type(self) -> tuple[str, str]:
        """`type/subtype`: three tokens unquoted, or one quoted string."""
        t = self.tok
        if t.kind == STRING and "/" in str(t.value):
            self.next()
            mtype, _, sub = str(t.value).partition("/")
        else:
            mtype = self.value("media type")
            self.expect_punct("/")
            sub = self.value("media subtype")
        if not mtype or not sub or "/" in sub:
            raise self.error(f"invalid media type: {mtype}/{sub}", t)
        return mtype, sub

    def pattern(self, lua: bool) -> str:
        """A name or path pattern; Lua patterns are checked now."""
        t = self.tok
        text = self.string("pattern")
        if lua:
            try:
                patterns.check(text)
            except patterns.PatternError as e:
                # Recorded, not raised: the block after it is still parsed.
                self.errors.add(t.where(), str(e))
        return text

    def port(self) -> int:
        """A port number or /etc/services name."""
        t = self.tok
        if t.kind not in (NUMBER, STRING, WORD):
            raise self.syntax_error("port")
        self.next()
        try:
            return addr.parse_port(t.value)
        except addr.AddrError as e:
            raise self.error(str(e), t) from None

    def restricted(self, block: _Block, what: str, start: Token) -> None:
        if block.location:
            raise self.error(f"{what} inside location", start)

    def at_word(self) -> str | None:
        return str(self.tok.value) if self.tok.kind == WORD else None

    # -- global statements ----------------------------------------------------
    def statement(self) -> None:
        t = self.tok
        kw = self.at_word()
        if kw == "server":
            self.next()
            self.server(t)
        elif kw == "types":
            self.next()
            self.types()
        elif kw == "chroot":
            self.next()
            self.globals["chroot"] = self.string("directory")
        elif kw == "acme":
            self.next()
            self.expect("config")
            self.globals["acme_config"] = self.string("file")
            self.globals["acme_config_where"] = t.where()
        elif kw == "logdir":
            self.next()
            self.globals["logdir"] = self.string("directory")
        elif kw == "prefork":
            self.next()
            self.globals["prefork"] = self.number(
                "number of preforked servers", 1, HTTPD_PREFORK_MAX)
        elif kw == "default":
            self.next()
            self.expect("type")
            self.globals["default_type"] = self.media_type()
        elif kw == "errdocs":
            self.next()
            self.globals["errdocs"] = self.string("directory")
        elif kw == "banner":
            self.next()
            self.globals["banner"] = True
        elif kw == "no":
            self.next()
            self.expect("banner")
            self.globals["banner"] = False
        else:
            raise self.syntax_error()

    def types(self) -> None:
        if self.media_types is None:
            self.media_types = {}
        table = self.media_types

        def line() -> None:
            if self.accept("include"):
                self.include()
                return
            mtype, sub = self.media_type()
            # Any word names an extension here, keywords included.
            while self.tok.kind in (WORD, STRING, NUMBER):
                table[str(self.next().value).lower()] = f"{mtype}/{sub}"
            if not (self.tok.kind in (NL, EOF) or self.at_punct("}")
                    or self.at_punct(";")):
                raise self.syntax_error("file extension")

        # OpenBSD ends an entry with a newline and an optional `;`; we also
        # take `;` between entries on one line.
        self.block(line, seps=";")

    # -- server ---------------------------------------------------------------
    def server(self, start: Token) -> None:
        lua = self.accept("match")
        name = self.pattern(lua)
        block = _Block(start.where(), location=False)
        self.block(lambda: self.server_option(block), seps="")
        self.check_server(name, block)
        self.servers.append(_Server(name, lua, block))

    def check_server(self, name: str, block: _Block) -> None:
        """Per-block checks when a server block closes."""
        if not block.listens:
            self.errors.add(block.where, f'server "{name}": '
                            "listen address not specified")
        has_tls = any(listen.tls for listen in block.listens)
        if block.tls_where is not None and not has_tls:
            self.errors.add(block.tls_where, "tls options without tls listener")
        if has_tls and block.tls_protocols == frozenset():
            self.errors.add(block.where, f'server "{name}": no tls protocols')

    def server_option(self, b: _Block) -> None:
        t = self.tok
        kw = self.at_word()
        if kw == "no":
            self.next()
            self.no_option(b, t)
            return
        fn = self.OPTIONS.get(kw or "")
        if fn is None:
            raise self.syntax_error("server option")
        self.next()
        fn(self, b, t)

    def no_option(self, b: _Block, start: Token) -> None:
        kw = self.at_word()
        if kw == "fastcgi":
            self.next()
            b.fcgi_on = False
        elif kw == "authenticate":
            self.next()
            b.fields["auth"] = None
        elif kw == "log":
            self.next()
            b.log["enabled"] = False
        elif kw == "gzip-static":
            self.next()
            b.fields["gzip_static"] = False
        elif kw == "errdocs":
            self.restricted(b, "errdocs", start)
            self.next()
            b.fields["errdocs"] = None
        elif kw == "banner":
            self.restricted(b, "no banner", start)
            self.next()
            b.fields["banner"] = False
        else:
            raise self.syntax_error("fastcgi, authenticate, log, gzip-static, "
                                    "errdocs or banner")

    def opt_listen(self, b: _Block, start: Token) -> None:
        self.restricted(b, "listen", start)
        self.expect("on")
        t = self.tok
        host = self.string("address")
        tls = self.accept("tls")
        self.expect("port")
        port = self.port()
        http2 = self.accept("http2")      # extension (issue 14)
        try:
            addrs = addr.resolve_host(host)
        except addr.AddrError:
            raise self.error(f"invalid listen ip: {host}", t) from None
        for a in addrs:
            listen = Listen(a, port, tls, http2)
            if listen not in b.listens:
                b.listens.append(listen)

    def opt_alias(self, b: _Block, start: Token) -> None:
        self.restricted(b, "alias", start)
        lua = self.accept("match")
        b.aliases.append(NameMatch(self.pattern(lua), lua))

    def opt_root(self, b: _Block, start: Token) -> None:
        def item() -> None:
            if self.accept("strip"):        # 2017 syntax, now `request strip`
                b.fields["strip"] = self.number("strip number", 0)
            else:
                b.fields["root"] = self.string("directory")
        self.options(item)

    def opt_request(self, b: _Block, start: Token) -> None:
        def item() -> None:
            if self.accept("strip"):
                b.fields["strip"] = self.number("strip number", 0)
            elif self.accept("rewrite"):
                b.fields["rewrite"] = self.string("path")
            elif self.accept("no"):
                self.expect("rewrite")
                b.fields["rewrite"] = None
            else:
                raise self.syntax_error("strip or rewrite")
        self.options(item)

    def opt_directory(self, b: _Block, start: Token) -> None:
        def item() -> None:
            if self.accept("index"):
                b.fields["index"] = self.string("index file")
            elif self.accept("auto"):
                self.expect("index")
                b.fields["auto_index"] = True
            elif self.accept("no"):
                if self.accept("auto"):
                    self.expect("index")
                    b.fields["auto_index"] = False
                else:
                    self.expect("index")
                    b.fields["index"] = None
            else:
                raise self.syntax_error("directory option")
        self.options(item)

    def opt_fastcgi(self, b: _Block, start: Token) -> None:
        b.fcgi_on = True

        def item() -> None:
            if self.accept("socket"):
                if self.accept("tcp"):
                    ht = self.tok
                    host = self.string("host")
                    port = HTTPD_FCGI_PORT if self.at_end() else self.port()
                    try:
                        resolved = addr.resolve_host(host, wildcard_both=False)[0]
                    except addr.AddrError as e:
                        raise self.error(str(e), ht) from None
                    b.fcgi.update(socket=None, host=resolved, port=port)
                else:
                    pt = self.tok
                    path = self.string("socket path")
                    if len(path.encode("utf-8", "surrogateescape")) >= UNIX_PATH_MAX:
                        raise self.error("socket path too long", pt)
                    b.fcgi.update(socket=path, host=None, port=HTTPD_FCGI_PORT)
            elif self.accept("param"):
                name = self.string("parameter name")
                b.fcgi_params.append((name, self.value("parameter value")))
            elif self.accept("strip"):
                b.fcgi["strip"] = self.number("fastcgi strip number", 0)
            else:
                raise self.syntax_error("fastcgi option")

        if not self.at_end():
            self.options(item)

    def opt_location(self, b: _Block, start: Token) -> None:
        self.restricted(b, "location", start)
        found: bool | None = None
        if self.accept("found"):
            found = True
        elif self.accept("not"):
            self.expect("found")
            found = False
        lua = self.accept("match")
        pattern = self.pattern(lua)
        lb = _Block(start.where(), location=True)
        self.block(lambda: self.server_option(lb), seps="")
        if any(loc.pattern == pattern and loc.found == found
               for loc in b.locations):
            self.errors.add(start.where(), f'location "{pattern}" defined twice')
            return
        b.locations.append(_Loc(pattern, lua, found, lb))

    def opt_block(self, b: _Block, start: Token) -> None:
        if self.accept("drop"):
            b.fields["block"] = BlockConfig(action="drop")
            return
        if not self.accept("return"):
            b.fields["block"] = BlockConfig()        # 403
            return
        code = BlockConfig.code                     # `block return`: 403
        uri = None
        if not self.at_end():
            ct = self.tok
            code = self.number("return code")
            if not 200 <= code <= 599:
                raise self.error(f"invalid return code: {code}", ct)
            if not self.at_end():
                uri = self.string("uri")
                if code not in REDIRECT_CODES:
                    raise self.error("invalid return code for location URI", ct)
        b.fields["block"] = BlockConfig(code=code, uri=uri)

    def opt_pass(self, b: _Block, start: Token) -> None:
        b.fields["block"] = None

    def opt_authenticate(self, b: _Block, start: Token) -> None:
        realm = ""
        if not self.at("with"):
            realm = self.string("realm")
        self.expect("with")
        b.fields["auth"] = AuthConfig(realm, self.string("htpasswd file"))

    def opt_connection(self, b: _Block, start: Token) -> None:
        self.restricted(b, "connection options", start)

        def item() -> None:
            if self.accept("max"):
                if self.accept("requests"):
                    b.connection["max_requests"] = self.number(
                        "max requests", 0)
                elif self.accept("streams"):      # extension: HTTP/2
                    b.connection["max_streams"] = self.number(
                        "max streams", 1, HTTP2_STREAMS_MAX)
                else:
                    self.expect("request")
                    self.expect("body")
                    b.connection["max_request_body"] = self.number(
                        "max request body", 0)
            elif self.accept("request"):
                self.expect("timeout")
                b.connection["request_timeout"] = self.number(
                    "timeout", 1, TIMEOUT_MAX)
            elif self.accept("timeout"):
                b.connection["timeout"] = self.number("timeout", 1, TIMEOUT_MAX)
            else:
                raise self.syntax_error("connection option")
        self.options(item)

    def opt_default(self, b: _Block, start: Token) -> None:
        self.expect("type")
        b.fields["default_type"] = self.media_type()

    def opt_errdocs(self, b: _Block, start: Token) -> None:
        self.restricted(b, "errdocs", start)
        b.fields["errdocs"] = self.string("directory")

    def opt_banner(self, b: _Block, start: Token) -> None:
        self.restricted(b, "banner", start)
        b.fields["banner"] = True

    def opt_gzip_static(self, b: _Block, start: Token) -> None:
        b.fields["gzip_static"] = True

    def opt_header(self, b: _Block, start: Token) -> None:
        op_tok = self.tok
        if self.accept("remove"):
            nt = self.tok
            name = self.string("header name")
            self.check_header_name(name, nt)
            if name.lower() == "server":
                raise self.error("'header remove Server' ignored, "
                                 "use 'no banner'", nt)
            b.headers.append(HeaderAction("remove", name))
            return
        if not (self.accept("set") or self.accept("add")):
            raise self.syntax_error("set, add or remove")
        nt = self.tok
        name = self.string("header name")
        self.check_header_name(name, nt)
        vt = self.tok
        value = self.value("header value")
        if len(value) > HEADER_VALUE_MAX:
            raise self.error("header value too long", vt)
        always = self.accept("always")
        b.headers.append(HeaderAction(str(op_tok.value), name, value, always))

    def check_header_name(self, name: str, tok: Token) -> None:
        if not name or len(name) > HEADER_NAME_MAX:
            raise self.error("header name too long" if name
                             else "empty header name", tok)
        if any(c in name for c in " \t\r\n:"):
            raise self.error(f"invalid header name: {name}", tok)

    def opt_hsts(self, b: _Block, start: Token) -> None:
        self.restricted(b, "hsts", start)
        if b.hsts is None:
            b.hsts = {}
        hsts = b.hsts

        def item() -> None:
            if self.accept("max-age"):
                hsts["max_age"] = self.number("number of seconds", 0)
            elif self.accept("subdomains"):
                hsts["subdomains"] = True
            elif self.accept("preload"):
                hsts["preload"] = True
            else:
                raise self.syntax_error("hsts option")

        if not self.at_end():
            self.options(item)

    def opt_log(self, b: _Block, start: Token) -> None:
        def item() -> None:
            if self.accept("style"):
                style = self.at_word()
                if style not in LOG_STYLES:
                    raise self.syntax_error("log style")
                self.next()
                b.log.update(enabled=True, style=style)
            elif self.accept("syslog"):
                b.log["syslog"] = True
            elif self.accept("no"):
                self.expect("syslog")
                b.log["syslog"] = False
            elif self.accept("access"):
                b.log["access"] = self.log_name()
            elif self.accept("error"):
                b.log["error"] = self.log_name()
            else:
                raise self.syntax_error("log option")
        self.options(item)

    def log_name(self) -> str:
        t = self.tok
        name = self.string("log file")
        if not name:
            raise self.error("empty log file name", t)
        return name

    def opt_tcp(self, b: _Block, start: Token) -> None:
        self.restricted(b, "tcp flags", start)

        def item() -> None:
            if self.accept("backlog"):
                b.tcp["backlog"] = self.number("backlog", 0, SERVER_MAX_CLIENTS)
            elif self.accept("nodelay"):
                b.tcp["nodelay"] = True
            elif self.accept("sack"):
                b.tcp["sack"] = True
            elif self.accept("no"):
                if self.accept("nodelay"):
                    b.tcp["nodelay"] = False
                else:
                    self.expect("sack")
                    b.tcp["sack"] = False
            elif self.accept("socket"):
                self.expect("buffer")
                b.tcp["socket_buffer"] = self.number("socket buffer size", 0)
            elif self.accept("ip"):
                ft = self.tok
                flag = self.string("ttl or minttl").lower()
                if flag not in ("ttl", "minttl"):
                    raise self.error(f"invalid TCP/IP flag: {flag}", ft)
                b.tcp["ip_" + flag] = self.number("ttl", 0, 255)
            else:
                raise self.syntax_error("tcp option")
        self.options(item)

    def opt_tls(self, b: _Block, start: Token) -> None:
        self.restricted(b, "tls configuration", start)
        if b.tls_where is None:
            b.tls_where = start.where()
        tls = b.tls

        def item() -> None:
            if self.accept("certificate"):
                tls["certificate"] = self.string("file")
            elif self.accept("key"):
                tls["key"] = self.string("file")
            elif self.accept("ocsp"):
                tls["ocsp"] = self.string("file")
            elif self.accept("ciphers"):
                tls["ciphers"] = self.value("ciphers")
            elif self.accept("protocols"):
                pt = self.tok
                text = self.value("protocols")
                try:
                    protos = tls_protocols(text)
                except ValueError:
                    raise self.error("invalid tls protocols", pt) from None
                tls["protocols"] = text
                b.tls_protocols = protos
            elif self.accept("ecdhe"):
                tls["ecdhe"] = self.value("curves")
            elif self.accept("dhe"):
                dt = self.tok
                dhe = self.value("dhe parameters").lower()
                if dhe not in TLS_DHE:
                    raise self.error(f"invalid dhe parameters: {dhe}", dt)
                tls["dhe"] = dhe
            elif self.accept("client"):
                self.expect("ca")
                tls["client_ca"] = self.string("file")
                while True:
                    if self.accept("crl"):
                        tls["crl"] = self.string("file")
                    elif self.accept("optional"):
                        tls["client_optional"] = True
                    else:
                        break
            elif self.accept("ticket"):
                self.expect("lifetime")
                if self.accept("default"):
                    life = HTTPD_TLS_TICKET_LIFETIME
                else:
                    lt = self.tok
                    life = self.number("ticket lifetime")
                    if life != 0 and life < HTTPD_TLS_TICKET_MIN:
                        raise self.error("ticket lifetime too small", lt)
                    if life > TLS_TICKET_MAX:
                        raise self.error("ticket lifetime too large", lt)
                tls["ticket_lifetime"] = life or None
            elif self.accept("no"):
                self.expect("ticket")
                tls["ticket_lifetime"] = None
            elif self.at("acme"):
                b.acme_where = self.next().where()
                tls["acme"] = self.string("acme-client.conf domain handle")
            else:
                raise self.syntax_error("tls option")
        self.options(item)

    def opt_include(self, b: _Block, start: Token) -> None:
        self.include()

    OPTIONS: dict[str, Callable[..., None]] = {
        "listen": opt_listen,
        "alias": opt_alias,
        "root": opt_root,
        "request": opt_request,
        "directory": opt_directory,
        "fastcgi": opt_fastcgi,
        "location": opt_location,
        "block": opt_block,
        "pass": opt_pass,
        "authenticate": opt_authenticate,
        "connection": opt_connection,
        "default": opt_default,
        "errdocs": opt_errdocs,
        "banner": opt_banner,
        "gzip-static": opt_gzip_static,
        "header": opt_header,
        "hsts": opt_hsts,
        "log": opt_log,
        "tcp": opt_tcp,
        "tls": opt_tls,
        "include": opt_include,
    }

    # -- built-in ACME (extension) ---------------------------------------------
    def load_acme(self) -> acme_conf.AcmeConfig | None:
        """The acme-client.conf, read only when a server says `tls acme`."""
        if not any(srv.block.acme_where for srv in self.servers):
            return None
        path = self.globals.get("acme_config", acme_conf.ACME_CONF)
        try:
            return acme_conf.load(path)
        except ConfigError as e:
            self.errors.lines.extend(e.lines)
            return None

    def acme_files(self, srv: _Server, tls: dict) -> None:
        """A `tls acme` server's certificate and key: its domain's files;
        every name of the server must be one of the domain's."""
        b = srv.block
        handle = tls["acme"]
        if "certificate" in tls or "key" in tls:
            self.errors.add(b.acme_where, f'server "{srv.name}": tls acme takes the '
                            "certificate and key from the acme domain")
        if self.acme is None:
            return
        dom = self.acme.domain(handle)
        if dom is None:
            self.errors.add(b.acme_where, f'server "{srv.name}": acme domain {handle} '
                            f"not found in {self.acme.path}")
            return
        if self.acme.authority_for(dom) is None:
            self.errors.add(b.acme_where, f"acme domain {handle}: no authority")
        for name in [NameMatch(srv.name, srv.lua), *b.aliases]:
            if name.lua or name.pattern.lower() not in (n.lower() for n in dom.names):
                self.errors.add(b.acme_where, f'server "{srv.name}": name "{name.pattern}" '
                                f"is not a name of acme domain {handle}")
        tls["certificate"] = dom.fullchain or dom.cert
        tls["key"] = dom.key

    # -- building the values --------------------------------------------------
    def build_servers(self) -> list[ServerConfig]:
        out = []
        for sid, srv in enumerate(self.servers, start=1):
            conf = self.server_config(sid, srv)
            locs = tuple(Location(pattern=loc.pattern, lua=loc.lua,
                                  found=loc.found, where=loc.block.where,
                                  conf=location_config(conf, loc.block))
                         for loc in srv.block.locations)
            out.append(dataclasses.replace(conf, locations=locs))
        return out

    def server_config(self, sid: int, srv: _Server) -> ServerConfig:
        b = srv.block
        fields = dict(b.fields)
        # Global errdocs and banner apply unless the server says otherwise.
        fields.setdefault("errdocs", self.globals.get("errdocs"))
        fields.setdefault("banner", self.globals.get("banner", True))
        tls = None
        if any(listen.tls for listen in b.listens):
            if b.tls.get("acme"):
                self.acme_files(srv, b.tls)
            tls = TlsConfig(**b.tls)
        return ServerConfig(
            id=sid, name=srv.name, where=b.where, name_lua=srv.lua,
            aliases=tuple(b.aliases), listens=tuple(b.listens),
            fastcgi=fastcgi_config(None, b),
            connection=Connection(**b.connection),
            headers=tuple(b.headers),
            hsts=HstsConfig(**b.hsts) if b.hsts is not None else None,
            log=LogConfig(**b.log), tcp=TcpConfig(**b.tcp), tls=tls,
            **fields)


def fastcgi_config(base: FastcgiConfig | None, b: _Block) -> FastcgiConfig | None:
    """The FastCGI settings of a block, given what it inherits."""
    if b.fcgi_on is None:
        return base
    if not b.fcgi_on:
        return None
    conf = dataclasses.replace(base or FastcgiConfig(), **b.fcgi)
    if b.fcgi_params:
        names = {name for name, _ in b.fcgi_params}
        params = tuple(p for p in conf.params if p[0] not in names)
        conf = dataclasses.replace(conf, params=params + tuple(b.fcgi_params))
    return conf


def merge_headers(base: tuple[HeaderAction, ...],
                  own: list[HeaderAction]) -> tuple[HeaderAction, ...]:
    """A location's headers: its own entries replace the server's entries of
    the same name (case-insensitive); `remove` thereby drops inherited ones."""
    names = {h.name.lower() for h in own}
    return tuple(h for h in base if h.name.lower() not in names) + tuple(own)


def location_config(server: ServerConfig, b: _Block) -> ServerConfig:
    """Effective settings of a location: the server's final settings with the
    location's overrides (OpenBSD's config_getserver_config())."""
    return dataclasses.replace(
        server, where=b.where, locations=(),
        log=dataclasses.replace(server.log, **b.log),
        fastcgi=fastcgi_config(server.fastcgi, b),
        headers=merge_headers(server.headers, b.headers),
        **b.fields)


def _tls_shared(tls: TlsConfig | None) -> tuple:
    """TLS settings that servers on one socket must agree on (all but the
    SNI-selected certificate, key and OCSP staple)."""
    if tls is None:
        return ()
    return (tls_protocols(tls.protocols), tls.ciphers, tls.ecdhe, tls.dhe,
            tls.client_ca, tls.crl, tls.client_optional, tls.ticket_lifetime)


def validate(conf: HttpdConfig, add: Callable[[str, str], None],
             end: str) -> None:
    """Whole-file checks; `add(where, msg)` records an error, `end` is the
    position reported for problems of the file as a whole."""
    if not conf.servers:
        add(end, "no actions, nothing to do")
        return
    first: dict[tuple[str, int], tuple[bool, ServerConfig]] = {}
    names: dict[tuple[str, int], set[str]] = {}
    for srv in conf.servers:
        errors: list[str] = []
        for listen in srv.listens:
            key = (listen.addr, listen.port)
            tls, other = first.setdefault(key, (listen.tls, srv))
            if tls != listen.tls:
                errors.append(f'server "{srv.name}": tls and non-tls on same '
                              "address/port")
            elif tls and other is not srv and \
                    _tls_shared(other.tls) != _tls_shared(srv.tls):
                errors.append(f'server "{srv.name}": tls configuration '
                              "mismatch on same address/port")
        for key in dict.fromkeys((ln.addr, ln.port) for ln in srv.listens):
            seen = names.setdefault(key, set())
            for name in [srv.name] + [a.pattern for a in srv.aliases]:
                if name in seen:
                    errors.append(f'server "{name}" defined twice')
                seen.add(name)
        for msg in dict.fromkeys(errors):
            add(srv.where, msg)
