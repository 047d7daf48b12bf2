"""httpd.parse: httpd.conf(5) text -> HttpdConfig, or `file:line: message`."""

from __future__ import annotations

import glob
import os
import pwd
import re

import pytest

from httpd import config, parse
from httpd.config import (AuthConfig, BlockConfig, FastcgiConfig, HeaderAction,
                          HstsConfig, Listen, LogConfig, NameMatch)
from shared.lexer import ConfigError

NAME = "t.conf"
LISTEN = "listen on 127.0.0.1 port 8080"


def load(text: str, **kw) -> config.HttpdConfig:
    return parse.load(NAME, text=text, **kw)


def server(body: str, pre: str = "") -> config.ServerConfig:
    """The one server of a config whose block is `body` plus a listen."""
    conf = load(f'{pre}\nserver "s" {{\n{LISTEN}\n{body}\n}}\n')
    assert len(conf.servers) == 1
    return conf.servers[0]


def location(body: str, server_body: str = "") -> config.ServerConfig:
    srv = server(f'{server_body}\nlocation "/x/*" {{\n{body}\n}}')
    return srv.locations[0].conf


def errors(text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(text, **kw)
    return exc.value.lines


def error_at(text: str, line: int, contains: str = "") -> str:
    """Exactly one error, at `line`, mentioning `contains`."""
    lines = errors(text)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{NAME}:{line}: "), lines
    assert contains in lines[0], lines
    return lines[0]


def srv_error(body: str, contains: str = "") -> str:
    """One error in a server block whose body starts at line 3."""
    return error_at(f'\nserver "s" {{\n{body}\n{LISTEN}\n}}\n', 3, contains)


def loc_error(body: str, contains: str = "") -> str:
    """One error in a location block whose body starts at line 5."""
    text = f'\nserver "s" {{\n{LISTEN}\nlocation "/x" {{\n{body}\n}}\n}}\n'
    return error_at(text, 5, contains)


# -- globals ------------------------------------------------------------------

def test_defaults():
    conf = load(f'server "s" {{ {LISTEN} }}')
    try:
        chroot = pwd.getpwnam("www").pw_dir
    except KeyError:
        chroot = "/var/www"
    assert conf.path == NAME
    assert conf.chroot == chroot
    assert conf.logdir is None
    assert conf.prefork is None
    assert conf.default_type == ("application", "octet-stream")
    assert conf.errdocs is None and conf.banner is True
    assert conf.media_types == config.DEFAULT_MEDIA_TYPES
    assert conf.unimplemented == ()
    srv = conf.servers[0]
    assert (srv.id, srv.name, srv.where, srv.name_lua) == (1, "s", f"{NAME}:1", False)
    assert srv.listens == (Listen("127.0.0.1", 8080, False),)
    assert srv.root == "/htdocs" and srv.strip == 0 and srv.rewrite is None
    assert srv.index == "index.html" and srv.auto_index is False
    assert srv.fastcgi is None and srv.block is None and srv.auth is None
    assert srv.connection == config.Connection()
    assert srv.default_type is None and srv.errdocs is None
    assert srv.banner is True and srv.gzip_static is False
    assert srv.headers == () and srv.hsts is None and srv.tls is None
    assert srv.log == LogConfig() and srv.tcp == config.TcpConfig()
    assert srv.locations == ()


def test_globals():
    conf = load(f"""
chroot "/srv/www"
logdir "/var/log/httpd"
prefork 5
default type text/plain
errdocs "/errdocs"
no banner
server "s" {{ {LISTEN} }}
""")
    assert conf.chroot == "/srv/www"
    assert conf.logdir == "/var/log/httpd"
    assert conf.prefork == 5
    assert conf.default_type == ("text", "plain")
    assert conf.errdocs == "/errdocs"
    assert conf.banner is False
    # Servers take the global errdocs and banner ...
    assert conf.servers[0].errdocs == "/errdocs"
    assert conf.servers[0].banner is False


def test_globals_overridden_per_server():
    srv = server("no errdocs\nbanner", pre='errdocs "/e"\nno banner')
    assert srv.errdocs is None and srv.banner is True
    srv = server('errdocs "/mine"', pre='errdocs "/e"\nbanner')
    assert srv.errdocs == "/mine" and srv.banner is True


def test_global_quoted_default_type():
    conf = load(f'default type "text/html"\nserver "s" {{ {LISTEN} }}')
    assert conf.default_type == ("text", "html")


@pytest.mark.parametrize("n", ["0", "33", "-1"])
def test_prefork_range(n):
    error_at(f'prefork {n}\nserver "s" {{ {LISTEN} }}', 1,
             "invalid number of preforked servers")


def test_bad_number():
    error_at(f'prefork many\nserver "s" {{ {LISTEN} }}', 1, "syntax error")


def test_unknown_global_keyword():
    error_at(f'\nfrobnicate 3\nserver "s" {{ {LISTEN} }}', 2,
             'unexpected "frobnicate"')


# -- types --------------------------------------------------------------------

def test_types_block():
    conf = load(f"""
types {{
    text/css css
    text/html HTML htm ;
    text/plain txt log; image/svg+xml svg svgz
    application/x-thing css 3gp
}}
server "s" {{ {LISTEN} }}
""")
    assert conf.media_types == {
        "css": "application/x-thing",     # later entries win
        "html": "text/html",              # extensions folded to lower case
        "htm": "text/html",
        "txt": "text/plain",
        "log": "text/plain",              # keywords are fine as extensions
        "svg": "image/svg+xml",
        "svgz": "image/svg+xml",
        "3gp": "application/x-thing",
    }
    assert "png" not in conf.media_types  # no built-in table with types {}


def test_types_include(tmp_path):
    inc = tmp_path / "mime.types"
    inc.write_text("image/png png\ntext/css css\n")
    conf = load(f"""
types {{
    text/css style
    include "{inc}"
    text/plain txt
}}
server "s" {{ {LISTEN} }}
""")
    assert conf.media_types == {"style": "text/css", "png": "image/png",
                                "css": "text/css", "txt": "text/plain"}


def test_types_bad_entry():
    error_at(f'types {{\n text/css css\n text css\n}}\nserver "s" {{ {LISTEN} }}',
             3, "syntax error")


# -- server names, listen -----------------------------------------------------

def test_server_match_and_alias():
    conf = load(f"""
server match "^www%d*%.example%.com$" {{
    {LISTEN}
    alias "example.com"
    alias match "^static%.(.*)$"
}}
""")
    srv = conf.servers[0]
    assert srv.name == "^www%d*%.example%.com$" and srv.name_lua is True
    assert srv.aliases == (NameMatch("example.com"),
                           NameMatch("^static%.(.*)$", lua=True))


def test_listen_forms():
    srv = server("listen on * tls port 8443\nlisten on ::1 port www\n"
                 "listen on 127.0.0.1 port 8080")    # duplicate is dropped
    assert srv.listens == (Listen("127.0.0.1", 8080, False),
                           Listen("0.0.0.0", 8443, True),
                           Listen("::", 8443, True),
                           Listen("::1", 80, False))


def test_listen_localhost_and_interface():
    srv = server("listen on localhost port 81\nlisten on lo port 82")
    assert Listen("127.0.0.1", 81) in srv.listens
    assert Listen("127.0.0.1", 82) in srv.listens


def test_listen_bad_port():
    srv_error("listen on * port 70000", "invalid port: 70000")
    srv_error("listen on * port nosuchservice", "invalid port: nosuchservice")


def test_listen_bad_address():
    srv_error("listen on no-such-host.invalid port 80",
              "invalid listen ip: no-such-host.invalid")


def test_listen_tls_after_port_is_an_error():
    srv_error("listen on * port 443 tls", "syntax error")


def test_ids_in_file_order():
    conf = load(f"""
server "a" {{ {LISTEN} }}
server "b" {{ {LISTEN} }}
server "c" {{ listen on 127.0.0.1 port 8081 }}
""")
    assert [(s.id, s.name) for s in conf.servers] == [(1, "a"), (2, "b"), (3, "c")]


# -- server options -----------------------------------------------------------

def test_root_and_request():
    srv = server('root "/htdocs/site"\nrequest strip 2\nrequest rewrite "/index.php?q=$REQUEST_URI"')
    assert srv.root == "/htdocs/site" and srv.strip == 2
    assert srv.rewrite == "/index.php?q=$REQUEST_URI"
    srv = server('request { rewrite "/a", no rewrite, strip 1 }')
    assert srv.rewrite is None and srv.strip == 1


def test_legacy_root_strip():
    assert server("root strip 3").strip == 3
    srv = server('root { "/legacy", strip 1 }')
    assert (srv.root, srv.strip) == ("/legacy", 1)


def test_directory():
    srv = server('directory { auto index, index "default.htm" }')
    assert srv.auto_index is True and srv.index == "default.htm"
    srv = server("directory auto index\ndirectory no auto index\ndirectory no index")
    assert srv.auto_index is False and srv.index is None


def test_fastcgi_forms():
    assert server("fastcgi").fastcgi == FastcgiConfig()
    assert server('fastcgi socket "/run/php.sock"').fastcgi == \
        FastcgiConfig(socket="/run/php.sock")
    assert server("fastcgi socket tcp 127.0.0.1").fastcgi == \
        FastcgiConfig(socket=None, host="127.0.0.1", port=9000)
    assert server("fastcgi socket tcp localhost 9001").fastcgi == \
        FastcgiConfig(socket=None, host="127.0.0.1", port=9001)
    assert server("fastcgi socket tcp ::1 www").fastcgi == \
        FastcgiConfig(socket=None, host="::1", port=80)
    srv = server('fastcgi {\n socket "/a.sock"\n param SCRIPT_X "y", param B "2"\n'
                 ' strip 2 }')
    assert srv.fastcgi == FastcgiConfig(socket="/a.sock",
                                        params=(("SCRIPT_X", "y"), ("B", "2")),
                                        strip=2)
    assert server("fastcgi\nno fastcgi").fastcgi is None


def test_fastcgi_errors():
    srv_error('fastcgi socket "/' + "x" * 120 + '"', "socket path too long")
    srv_error("fastcgi socket tcp 127.0.0.1 0", "invalid port: 0")
    srv_error("fastcgi strip -1", "invalid fastcgi strip number")
    srv_error("fastcgi bogus", "syntax error")


def test_block_forms():
    assert server("block").block == BlockConfig("block", 403)
    assert server("block drop").block.action == "drop"
    assert server("block return 404").block == BlockConfig("block", 404)
    assert server("block return").block == BlockConfig("block", 403)
    for code in (301, 302, 303, 307, 308):
        assert server(f'block return {code} "https://$HTTP_HOST$REQUEST_URI"').block == \
            BlockConfig("block", code, "https://$HTTP_HOST$REQUEST_URI")
    assert server("block\npass").block is None


def test_block_return_errors():
    srv_error("block return 199", "invalid return code: 199")
    srv_error("block return 600", "invalid return code: 600")
    srv_error('block return 404 "/x"', "invalid return code for location URI")
    srv_error('block return 300 "/x"', "invalid return code for location URI")


def test_authenticate():
    assert server('authenticate "Members" with "/htpasswd"').auth == \
        AuthConfig("Members", "/htpasswd")
    assert server('authenticate with "/htpasswd"').auth == AuthConfig("", "/htpasswd")
    assert server('authenticate with "/h"\nno authenticate').auth is None
    srv_error('authenticate "realm"', 'expected "with"')


def test_connection():
    srv = server("connection max request body 10\n"
                 "connection { max requests 5, request timeout 7\n timeout 9 }")
    assert srv.connection == config.Connection(max_request_body=10, max_requests=5,
                                               request_timeout=7, timeout=9)


def test_connection_timeouts_positive():
    srv_error("connection timeout 0", "invalid timeout: 0")
    srv_error("connection request timeout -1", "invalid timeout: -1")


def test_default_type_gzip_static():
    srv = server("default type text/html\ngzip-static")
    assert srv.default_type == ("text", "html") and srv.gzip_static is True
    assert server("gzip-static\nno gzip-static").gzip_static is False


def test_headers():
    srv = server('header set X-Frame-Options "DENY"\n'
                 'header add Link "</a.css>; rel=preload" always\n'
                 "header remove Last-Modified")
    assert srv.headers == (HeaderAction("set", "X-Frame-Options", "DENY"),
                           HeaderAction("add", "Link", "</a.css>; rel=preload", True),
                           HeaderAction("remove", "Last-Modified"))


def test_header_limits():
    assert server(f'header set {"N" * 127} "{"v" * 511}"').headers[0].value == "v" * 511
    srv_error(f'header set {"N" * 128} "v"', "header name too long")
    srv_error(f'header add X "{"v" * 512}"', "header value too long")
    srv_error("header remove Server", "no banner")
    srv_error('header replace X "y"', "syntax error")


def test_hsts():
    assert server("hsts").hsts == HstsConfig()
    assert server("hsts max-age 600").hsts == HstsConfig(max_age=600)
    assert server("hsts { max-age 1, subdomains\n preload }").hsts == \
        HstsConfig(1, True, True)
    srv_error("hsts max-age -1", "invalid number of seconds")


def test_log():
    srv = server('log { access "a.log", error "e.log", style combined, syslog }')
    assert srv.log == LogConfig(True, "a.log", "e.log", "combined", True)
    assert server("log style forwarded").log.style == "forwarded"
    assert server("log style connection").log.style == "connection"
    assert server("log syslog\nlog no syslog").log.syslog is False
    assert server("no log").log.enabled is False
    assert server("no log\nlog style common").log.enabled is True
    srv_error("log style fancy", "expected log style")


def test_tcp():
    srv = server("tcp { backlog 50, nodelay, no sack\n socket buffer 65536\n"
                 " ip ttl 64, ip minttl 10 }")
    assert srv.tcp == config.TcpConfig(backlog=50, nodelay=True, sack=False,
                                       socket_buffer=65536, ip_ttl=64, ip_minttl=10)
    srv = server("tcp no nodelay\ntcp sack")
    assert srv.tcp.nodelay is False and srv.tcp.sack is True
    srv_error("tcp backlog 1025", "invalid backlog")
    srv_error("tcp ip hops 3", "invalid TCP/IP flag: hops")


def test_tls_options():
    conf = load(f"""
server "s" {{
    listen on * tls port 443
    tls {{
        certificate "/etc/ssl/s.crt"
        key "/etc/ssl/private/s.key"
        ocsp "/etc/ssl/s.der"
        ciphers "HIGH:!aNULL:!MD5"
        protocols "tlsv1.2,tlsv1.3"
        ecdhe "X25519,P-256"
        dhe auto
        client ca "/etc/ssl/ca.pem" crl "/etc/ssl/crl.pem" optional
        ticket lifetime 3600
    }}
}}
""")
    srv = conf.servers[0]
    assert srv.tls == config.TlsConfig(
        certificate="/etc/ssl/s.crt", key="/etc/ssl/private/s.key",
        ocsp="/etc/ssl/s.der", ciphers="HIGH:!aNULL:!MD5",
        protocols="tlsv1.2,tlsv1.3", ecdhe="X25519,P-256", dhe="auto",
        client_ca="/etc/ssl/ca.pem", crl="/etc/ssl/crl.pem",
        client_optional=True, ticket_lifetime=3600)
    assert conf.unimplemented == ()


def test_tls_defaults_and_inline():
    srv = server("listen on * tls port 443")
    assert srv.tls == config.TlsConfig()
    srv = server('listen on * tls port 443\ntls certificate "/c"\n'
                 "tls ticket lifetime default\ntls protocols default")
    assert srv.tls.certificate == "/c" and srv.tls.ticket_lifetime == 7200
    assert srv.tls.protocols == "default"
    srv = server("listen on * tls port 443\ntls ticket lifetime 600\ntls no ticket")
    assert srv.tls.ticket_lifetime is None


def test_tls_errors():
    tls = "listen on * tls port 443\n"
    error_at(f'server "s" {{\n{tls}tls protocols "tlsv9"\n}}', 3, "invalid tls protocols")
    error_at(f'server "s" {{\n{tls}tls dhe strong\n}}', 3, "invalid dhe parameters")
    error_at(f'server "s" {{\n{tls}tls ticket lifetime 59\n}}', 3, "too small")
    error_at(f'server "s" {{\n{tls}tls ticket lifetime 86401\n}}', 3, "too large")
    error_at(f'server "s" {{\n{tls}tls protocols "!all"\n}}', 1, "no tls protocols")
    error_at(f'server "s" {{\n{LISTEN}\ntls key "/k"\n}}', 3,
             "tls options without tls listener")


def test_tls_protocols_helper():
    assert parse.tls_protocols("secure") == {"tlsv1.2", "tlsv1.3"}
    assert parse.tls_protocols("all:!tlsv1.0,!TLSv1.1") == {"tlsv1.2", "tlsv1.3"}
    assert parse.tls_protocols("!tlsv1.3") == {"tlsv1.0", "tlsv1.1", "tlsv1.2"}
    with pytest.raises(ValueError):
        parse.tls_protocols("sslv3")


def test_unknown_server_option():
    srv_error("rooot /x", 'unexpected "rooot"')


def test_server_include(tmp_path):
    inc = tmp_path / "common.conf"
    inc.write_text('root "/common"\ndirectory auto index\n')
    srv = server(f'include "{inc}"\ngzip-static')
    assert srv.root == "/common" and srv.auto_index and srv.gzip_static


# -- locations ----------------------------------------------------------------

def test_location_forms():
    srv = server('location "/a/*" { pass }\n'
                 'location match "^/b/(%d+)$" { block return 301 "/c/%1" }\n'
                 'location found "/d/*" { directory auto index }\n'
                 'location not found match "%.php$" { block return 404 }')
    got = [(loc.pattern, loc.lua, loc.found, loc.where) for loc in srv.locations]
    assert got == [("/a/*", False, None, f"{NAME}:4"),
                   ("^/b/(%d+)$", True, None, f"{NAME}:5"),
                   ("/d/*", False, True, f"{NAME}:6"),
                   ("%.php$", True, False, f"{NAME}:7")]
    assert srv.locations[1].conf.block == BlockConfig("block", 301, "/c/%1")
    assert srv.locations[0].conf.locations == ()


def test_location_inherits_regardless_of_order():
    conf = load("""
server "s" {
    location "/x/*" { gzip-static }
    listen on 127.0.0.1 port 8080
    root "/late"
    directory auto index
    default type text/plain
    authenticate "r" with "/h"
    fastcgi socket "/run/s.sock"
    log style combined
    block return 403
    connection timeout 5
    hsts
    tcp nodelay
    errdocs "/err"
    no banner
    request strip 1
}
""")
    srv = conf.servers[0]
    loc = srv.locations[0].conf
    assert loc.root == "/late" and loc.auto_index is True
    assert loc.default_type == ("text", "plain")
    assert loc.auth == AuthConfig("r", "/h")
    assert loc.fastcgi == FastcgiConfig(socket="/run/s.sock")
    assert loc.log.style == "combined"
    assert loc.block == BlockConfig("block", 403)
    assert loc.connection.timeout == 5 and loc.hsts == HstsConfig()
    assert loc.tcp.nodelay is True
    assert loc.errdocs == "/err" and loc.banner is False
    assert loc.strip == 1 and loc.gzip_static is True
    assert (loc.id, loc.name, loc.listens) == (srv.id, srv.name, srv.listens)
    assert loc.where == f"{NAME}:3"
    assert srv.gzip_static is False   # the location's override stays there


def test_location_overrides():
    loc = location('root "/other"\ndefault type text/html\nlog { access "x.log", no syslog }\n'
                   "directory no index\nno fastcgi\nno authenticate\npass\n"
                   'request rewrite "/y"\nrequest strip 0',
                   server_body='fastcgi\nauthenticate with "/h"\nblock\n'
                               "log { syslog, style combined }\nrequest strip 2")
    assert loc.root == "/other" and loc.default_type == ("text", "html")
    assert loc.log == LogConfig(True, "x.log", "error.log", "combined", False)
    assert loc.index is None and loc.fastcgi is None and loc.auth is None
    assert loc.block is None and loc.rewrite == "/y" and loc.strip == 0


def test_location_fastcgi_merges_with_server():
    loc = location('fastcgi { param B "loc", param C "3", strip 1 }',
                   server_body='fastcgi { socket "/s.sock", param A "1", param B "srv" }')
    assert loc.fastcgi == FastcgiConfig(socket="/s.sock", strip=1,
                                        params=(("A", "1"), ("B", "loc"), ("C", "3")))
    loc = location('fastcgi socket tcp 127.0.0.1 9100')
    assert loc.fastcgi == FastcgiConfig(socket=None, host="127.0.0.1", port=9100)


def test_location_headers_override_and_remove():
    loc = location('header set x-a "loc"\nheader remove X-B\nheader add X-D "4"',
                   server_body='header set X-A "srv"\nheader add X-B "1"\n'
                               'header add X-B "2"\nheader add X-C "3" always')
    assert loc.headers == (HeaderAction("add", "X-C", "3", True),
                           HeaderAction("set", "x-a", "loc"),
                           HeaderAction("remove", "X-B"),
                           HeaderAction("add", "X-D", "4"))


@pytest.mark.parametrize("body, what", [
    ('alias "other"', "alias inside location"),
    ("banner", "banner inside location"),
    ("no banner", "banner inside location"),
    ("connection timeout 5", "connection options inside location"),
    ('errdocs "/e"', "errdocs inside location"),
    ("no errdocs", "errdocs inside location"),
    ("hsts max-age 5", "hsts inside location"),
    ("listen on * port 80", "listen inside location"),
    ('location "/y" { pass }', "location inside location"),
    ("tcp { nodelay }", "tcp flags inside location"),
    ('tls { certificate "/c" }', "tls configuration inside location"),
])
def test_location_restrictions(body, what):
    loc_error(body, what)


def test_location_defined_twice():
    text = f'server "s" {{\n{LISTEN}\nlocation "/a" {{ pass }}\nlocation "/a" {{ block }}\n}}'
    error_at(text, 4, 'location "/a" defined twice')
    # found/not found make a different location
    srv = server('location "/a" { pass }\nlocation found "/a" { pass }')
    assert len(srv.locations) == 2


# -- Lua patterns ---------------------------------------------------------------

@pytest.mark.parametrize("text, line", [
    ('server match "(" {{ {listen} }}', 1),
    ('server "s" {{ {listen}\nalias match "%" }}', 2),
    ('server "s" {{ {listen}\nlocation match "[a" {{ pass }}\n}}', 2),
])
def test_bad_pattern(text, line):
    error_at(text.format(listen=LISTEN), line)


def test_glob_names_are_not_checked_as_patterns():
    srv = server('alias "(*"\nlocation "(" { pass }')
    assert srv.aliases == (NameMatch("(*"),) and srv.locations[0].pattern == "("


# -- lexical rules, macros, include -----------------------------------------------

def test_macro_expands_to_several_tokens():
    conf = load('where = "127.0.0.1 port 9090"\nserver "s" { listen on $where }')
    assert conf.servers[0].listens == (Listen("127.0.0.1", 9090),)


def test_macro_not_expanded_in_quotes():
    srv = server('root "$docs"', pre='docs = "/x"')
    assert srv.root == "$docs"


def test_macro_value_is_lexed_again():
    assert server("directory index $idx", pre='idx = "home.html"').index == "home.html"
    # as in OpenBSD, `/` in a macro value is a token of its own again
    assert server("default type $t", pre='t = "text/x-c"').default_type == ("text", "x-c")


def test_undefined_macro():
    lines = errors(f'server "s" {{\n{LISTEN}\nroot $nope\n}}')
    # the rest of the line is dropped, so the statement fails as well
    assert lines[0] == f"{NAME}:3: macro 'nope' not defined"
    assert all(line.startswith(f"{NAME}:3: ") for line in lines)


def test_cmdline_macro_overrides_file():
    text = 'p = 80\nserver "s" { listen on 127.0.0.1 port $p }'
    assert load(text).servers[0].listens[0].port == 80
    assert load(text, macros={"p": "9091"}).servers[0].listens[0].port == 9091


def test_unused_macro_warning(capsys):
    load(f'unused = "1"\nserver "s" {{ {LISTEN} }}', verbose=1)
    assert "macro 'unused' not used" in capsys.readouterr().err
    load(f'unused = "1"\nserver "s" {{ {LISTEN} }}')
    assert capsys.readouterr().err == ""


def test_keyword_as_macro_name():
    error_at(f'root = "/x"\nserver "s" {{ {LISTEN} }}', 1, 'keyword "root"')


def test_continuation_and_comments():
    conf = load(f"""# a comment
server "s" {{   # trailing comment
    listen on 127.0.0.1 \\
        port 8080
    # a commented line ending in a backslash swallows the next \\
    root "/never"
    directory \\
      auto index
}}
""")
    srv = conf.servers[0]
    assert srv.listens == (Listen("127.0.0.1", 8080),)
    assert srv.root == "/htdocs" and srv.auto_index is True


def test_error_line_after_continuation():
    error_at('server "s" {\nlisten on 127.0.0.1 \\\nport 8080\nbogus\n}', 4, '"bogus"')


def test_include_nested(tmp_path):
    inner = tmp_path / "inner.conf"
    inner.write_text('server "inner" {\n listen on 127.0.0.1 port 8082\n}\n')
    outer = tmp_path / "outer.conf"
    outer.write_text(f'include "{inner}"\nserver "outer" {{ {LISTEN} }}')
    main = tmp_path / "httpd.conf"
    main.write_text(f'prefork 2\ninclude "{outer}"\nlogdir "/l"\n')
    conf = parse.load(str(main))
    assert [s.name for s in conf.servers] == ["inner", "outer"]
    assert conf.servers[0].where == f"{inner}:1"
    assert conf.prefork == 2 and conf.logdir == "/l"


def test_include_error_names_included_file(tmp_path):
    inc = tmp_path / "bad.conf"
    inc.write_text("\n\nbogus\n")
    lines = errors(f'include "{inc}"\nserver "s" {{ {LISTEN} }}')
    assert len(lines) == 1 and lines[0].startswith(f"{inc}:3: ")


def test_include_loop(tmp_path):
    a, b = tmp_path / "a.conf", tmp_path / "b.conf"
    a.write_text(f'include "{b}"\nserver "s" {{ {LISTEN} }}\n')
    b.write_text(f'\ninclude "{a}"\n')
    with pytest.raises(ConfigError) as exc:
        parse.load(str(a))
    assert exc.value.lines == [f"{b}:2: include loop: {a}"]


def test_include_missing(tmp_path):
    missing = tmp_path / "missing.conf"
    error_at(f'include "{missing}"\nserver "s" {{ {LISTEN} }}', 1, "cannot open")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        parse.load(str(tmp_path / "none.conf"))
    assert str(tmp_path / "none.conf") in exc.value.lines[0]


# -- whole-file validation ----------------------------------------------------------

def test_no_servers():
    assert errors("prefork 3\n") == [f"{NAME}:2: no actions, nothing to do"]
    assert errors("") == [f"{NAME}:1: no actions, nothing to do"]


def test_server_without_listen():
    error_at('\nserver "s" {\nroot "/x"\n}', 2, "listen address not specified")


def test_tls_and_non_tls_on_same_port():
    text = f'server "a" {{ {LISTEN} }}\n\nserver "b" {{ listen on 127.0.0.1 tls port 8080 }}'
    error_at(text, 3, 'server "b": tls and non-tls on same address/port')
    text = 'server "a" {\nlisten on * port 80\nlisten on 0.0.0.0 tls port 80\n}'
    error_at(text, 1, "tls and non-tls")


def test_tls_settings_must_match_on_shared_socket():
    ok = load("""
server "a" { listen on * tls port 443
  tls { certificate "/a.crt", key "/a.key", ocsp "/a.der" } }
server "b" { listen on * tls port 443
  tls { certificate "/b.crt", key "/b.key" } }
""")
    assert len(ok.servers) == 2
    text = ('server "a" { listen on * tls port 443 }\n'
            'server "b" { listen on * tls port 443\ntls protocols "tlsv1.3" }')
    error_at(text, 2, 'server "b": tls configuration mismatch on same address/port')
    # spelt differently, same protocol set
    load('server "a" { listen on * tls port 443 }\n'
         'server "b" { listen on * tls port 443\ntls protocols "tlsv1.2:tlsv1.3" }')


def test_duplicate_server():
    text = f'server "a" {{ {LISTEN} }}\nserver "a" {{ {LISTEN} }}'
    error_at(text, 2, 'server "a" defined twice')
    text = f'server "a" {{ {LISTEN} }}\nserver "b" {{ {LISTEN}\nalias "a" }}'
    error_at(text, 2, 'server "a" defined twice')
    # same name on another port is fine
    load(f'server "a" {{ {LISTEN} }}\nserver "a" {{ listen on 127.0.0.1 port 8081 }}')


def test_missing_brace():
    lines = errors(f'server "s" {{\n{LISTEN}\nroot "/x"\n')
    assert lines[0] == f"{NAME}:4: syntax error: missing '}}'"


def test_every_error_is_reported():
    lines = errors(f"""prefork 99
server "s" {{
    {LISTEN}
    bogus
    block return 42
    location "/x" {{ tcp nodelay }}
}}
""")
    assert [line.split(": ")[0] for line in lines] == \
        [f"{NAME}:1", f"{NAME}:4", f"{NAME}:5", f"{NAME}:6"]


# -- configurations from httpd.conf(5) and /etc/examples ------------------------------

def test_manual_examples():
    conf = load("""
ext_ip="127.0.0.1"
prefork 2
server "example.com" {
	listen on $ext_ip port 80
	listen on * tls port 443
	alias "www.example.com"
	block return 301 "$REQUEST_SCHEME://www.example.com$REQUEST_URI"
	location match "/old/(.*)" {
		request rewrite "/new/%1"
	}
	header set "X-Content-Type-Options" "nosniff" always
	header add "Set-Cookie" "id=23; HttpOnly; Secure"
	header remove "Last-Modified"
	location "/api/*" {
		header add "Access-Control-Allow-Origin" "*"
		header set "Set-Cookie" "id=5; HttpOnly; Secure"
	}
}
server "www.a.example.com" {
	listen on 203.0.113.1 port 80
	root "/htdocs/www.a.example.com"
}
types {
	text/css\t\tcss
	text/html\t\thtml htm
	application/javascript\tjs
	application/xml\t\txml
}
""")
    a, b = conf.servers
    assert a.listens[0] == Listen("127.0.0.1", 80)
    assert a.locations[0].conf.rewrite == "/new/%1"
    assert [h.value for h in a.locations[1].conf.headers] == [
        "nosniff", "", "*", "id=5; HttpOnly; Secure"]
    assert b.listens == (Listen("203.0.113.1", 80),)
    assert conf.media_types["xml"] == "application/xml"


def test_openbsd_example_config():
    conf = load("""
server "example.com" {
	listen on * port 80
	location "/.well-known/acme-challenge/*" {
		root "/acme"
		request strip 2
	}
	location * {
		block return 302 "https://$HTTP_HOST$REQUEST_URI"
	}
}

server "example.com" {
	listen on * tls port 443
	tls {
		certificate "/etc/ssl/example.com.fullchain.pem"
		key "/etc/ssl/private/example.com.key"
	}
	location "/pub/*" {
		directory auto index
	}
	location "/.well-known/acme-challenge/*" {
		root "/acme"
		request strip 2
	}
}
""")
    plain, tls = conf.servers
    assert [loc.pattern for loc in plain.locations] == [
        "/.well-known/acme-challenge/*", "*"]
    assert plain.locations[0].conf.root == "/acme"
    assert plain.locations[0].conf.strip == 2 and plain.strip == 0
    assert plain.locations[1].conf.block.code == 302
    assert tls.tls.certificate == "/etc/ssl/example.com.fullchain.pem"
    assert tls.locations[0].conf.auto_index and not tls.auto_index


# -- shipped samples ----------------------------------------------------------------

SAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..",
                                        "conf", "httpd*.conf*")))


@pytest.mark.parametrize("path", SAMPLES)
def test_sample_configs(path):
    with open(path) as f:
        text = f.read()
    missing = [inc for inc in re.findall(r'include "([^"]+)"', text)
               if not os.path.exists(inc)]
    # /etc/mime.types comes from Debian's media-types (.ci/install-deps).
    assert not missing, f"{path} includes {missing[0]}, absent here: run make deps"
    # `acme config` reads the shipped sample acme-client.conf instead (as
    # `make configtest` does).
    sample = os.path.join(os.path.dirname(path), "acme-client.conf")
    conf = parse.load(path, text=text.replace('"/etc/acme-client.conf"', f'"{sample}"'))
    assert conf.servers
