"""relayd.parse: relayd.conf(5) snippets -> RelaydConfig values or "file:line: msg"."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from relayd import config as C
from relayd.parse import load
from shared import addr
from shared.lexer import ConfigError

NAME = "relayd.conf"

# A relay that makes a snippet a complete configuration.
RELAY = """
relay "zz" {
\tlisten on 127.0.0.1 port 9999
\tforward to 127.0.0.1 port 80
}
"""

# Names from the manual's examples, resolved without DNS.
FAKE_HOSTS = {
    "www.example.com": ["192.0.2.10"],
    "www6.example.com": ["2001:db8::10"],
    "front-www1.private.example.com": ["10.0.0.1"],
    "front-www2.private.example.com": ["10.0.0.2"],
    "front-www3.private.example.com": ["10.0.0.3"],
    "front-www4.private.example.com": ["10.0.0.4"],
    "sorryhost.private.example.com": ["10.0.0.99"],
    "dns.example.com": ["192.0.2.53"],
    "shell.example.com": ["192.0.2.22"],
    "two.example.com": ["192.0.2.1", "192.0.2.2"],
}


@pytest.fixture(autouse=True)
def fake_resolver(monkeypatch):
    real = addr.resolve_host

    def resolve(host: str, wildcard_both: bool = True) -> list[str]:
        if host in FAKE_HOSTS:
            return FAKE_HOSTS[host]
        if host.endswith(".invalid"):
            raise addr.AddrError(f"invalid address: {host}")
        return real(host, wildcard_both)

    monkeypatch.setattr(addr, "resolve_host", resolve)


def parse(text: str, **kw) -> C.RelaydConfig:
    return load(NAME, text=text, **kw)


def errors(text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(text, **kw)
    return exc.value.lines


def relay_with(forward: str, extra: str = "", listen: str = "listen on 127.0.0.1 port 8080"):
    return parse(f"{extra}\nrelay \"r\" {{\n\t{listen}\n\t{forward}\n}}\n").relays[0]


def proto_with(body: str, ptype: str = "http", tables: str = "") -> C.ProtocolConfig:
    conf = parse(f"{tables}\n{ptype} protocol \"p\" {{\n{body}\n}}\n"
                 "relay \"r\" {\n\tlisten on 127.0.0.1 port 8080\n\tprotocol \"p\"\n"
                 "\tforward to 127.0.0.1 port 80\n}\n")
    return conf.protocols[0]


def rule(line: str, tables: str = "") -> C.Rule:
    return proto_with(line, tables=tables).rules[0]


# -- globals ---------------------------------------------------------------------
def test_defaults():
    conf = parse(RELAY)
    assert conf.path == NAME
    assert conf.interval == 10 and conf.timeout == 200
    assert conf.prefork is None
    assert not conf.log_state_changes and not conf.log_host_checks
    assert conf.log_connection is None
    assert conf.socket == "/var/run/relayd.sock"
    assert conf.agentx is None and conf.metrics is None
    assert conf.tables == conf.instances == conf.protocols == ()
    assert conf.redirects == conf.routers == ()
    assert conf.unimplemented == () and conf.warnings == ()


def test_global_directives():
    conf = parse("interval 5\ntimeout 1000\nprefork 4\nlog state changes\n"
                 "log host checks\nlog connection\nsocket \"/run/relayd.sock\"\n"
                 "metrics listen on 127.0.0.1 port 9100\n" + RELAY)
    assert (conf.interval, conf.timeout, conf.prefork) == (5, 1000, 4)
    assert conf.log_state_changes and conf.log_host_checks
    assert conf.log_connection == "all"
    assert conf.socket == "/run/relayd.sock"
    assert conf.metrics == C.MetricsConfig(addrs=("127.0.0.1",), port=9100,
                                           where=f"{NAME}:8")


def test_log_connection_errors():
    assert parse("log connection errors\n" + RELAY).log_connection == "errors"


def test_agentx():
    conf = parse('agentx context "ctx" path "/var/run/agentx.sock"\n' + RELAY)
    assert conf.agentx == C.AgentxConfig(context="ctx", path="/var/run/agentx.sock",
                                         where=f"{NAME}:1")
    assert conf.unimplemented == ((f"{NAME}:1", "agentx"),)
    assert parse("agentx\n" + RELAY).agentx.path == "/var/agentx/master"


# -- tables and instances ----------------------------------------------------------
def test_table_hosts_separators_and_options():
    conf = parse("table <web> disable { 127.0.0.1 retry 2, 127.0.0.2 parent 1\n"
                 "  127.0.0.3 priority 5 ip ttl 1 127.0.0.4 }\n"
                 "relay r {\n listen on 127.0.0.1 port 80\n forward to <web> check tcp\n}\n")
    tb = conf.tables[0]
    assert tb.name == "web" and tb.disabled and tb.where == f"{NAME}:1"
    assert [(h.id, h.name, h.addr, h.retry, h.parent, h.priority, h.ip_ttl)
            for h in tb.hosts] == [
        (1, "127.0.0.1", "127.0.0.1", 2, 0, 0, 0),
        (2, "127.0.0.2", "127.0.0.2", 0, 1, 0, 0),
        (3, "127.0.0.3", "127.0.0.3", 0, 0, 5, 1),
        (4, "127.0.0.4", "127.0.0.4", 0, 0, 0, 0)]
    assert [h.where for h in tb.hosts] == [f"{NAME}:1", f"{NAME}:1", f"{NAME}:2", f"{NAME}:2"]
    inst = conf.instances[0]
    assert inst.disabled
    assert [(h.id, h.parent, h.name) for h in inst.hosts] == [
        (1, 0, "127.0.0.1"), (2, 1, "127.0.0.2"), (3, 0, "127.0.0.3"), (4, 0, "127.0.0.4")]


def test_host_name_kept_as_written():
    conf = parse("table <w> { www.example.com }\n"
                 "relay r {\n listen on 127.0.0.1 port 80\n forward to <w> check tcp\n}\n")
    h = conf.instances[0].hosts[0]
    assert (h.name, h.addr) == ("www.example.com", "192.0.2.10")


def test_instances_shared_and_separate():
    conf = parse("table <web> { 127.0.0.1, 127.0.0.2 }\n"
                 "relay a {\n listen on 127.0.0.1 port 8001\n"
                 " forward to <web> port 80 check tcp\n}\n"
                 "relay b {\n listen on 127.0.0.1 port 8002\n"
                 " forward to <web> port 80 check tcp\n}\n"
                 "relay c {\n listen on 127.0.0.1 port 8003\n"
                 " forward to <web> port 80 check icmp\n"
                 " forward to <web> port 81 check tcp\n}\n")
    a, b, c = conf.relays
    assert a.forwards[0].table is b.forwards[0].table      # same options: one instance
    assert [(i.id, i.name, i.check.type) for i in conf.instances] == [
        (1, "web:80", "tcp"), (2, "web:80", "icmp"), (3, "web:81", "tcp")]
    assert [[h.id for h in i.hosts] for i in conf.instances] == [[1, 2], [3, 4], [5, 6]]
    assert conf.instance("web:81").id == 3 and conf.instance(2).check.type == "icmp"
    assert conf.host(4).name == "127.0.0.2" and conf.host(4).table_id == 2
    assert c.forwards[1].backup and not c.forwards[0].backup


def test_instance_port_from_listen_and_timeouts():
    conf = parse("table <web> { 127.0.0.1 }\n"
                 "timeout 300\n"
                 "table <late> { 127.0.0.2 }\n"
                 "interval 5\n"
                 "relay r {\n listen on 127.0.0.1 port 8080\n"
                 " forward to <web> check tcp\n"
                 " forward to <late> check tcp interval 15\n"
                 " forward to <web> port 81 check tcp timeout 700\n}\n")
    web, late, web81 = conf.instances
    assert web.name == "web:8080" and web.port == 8080
    assert web.timeout == 200          # global timeout after the table: not applied
    assert late.timeout == 300
    assert (web.interval, late.interval) == (5, 15)
    assert web81.timeout == 700
    assert conf.tables[0].timeout == 200 and conf.tables[1].timeout == 300


def test_table_include(tmp_path):
    inc = tmp_path / "hosts.conf"
    inc.write_text("127.0.0.2\n127.0.0.3 retry 1\n")
    conf = parse(f'table <web> {{ 127.0.0.1\ninclude "{inc}"\n127.0.0.4 }}\n'
                 "relay r {\n listen on 127.0.0.1 port 80\n forward to <web> check tcp\n}\n")
    assert [h.name for h in conf.tables[0].hosts] == [
        "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert conf.tables[0].hosts[2].where == f"{inc}:2"


# -- checks ------------------------------------------------------------------------
def check(opts: str) -> C.CheckConfig:
    return relay_with(f"forward to <web> port 80 {opts}",
                      extra="table <web> { 127.0.0.1 }").forwards[0].table.check


def test_check_none_icmp_tcp_tls_script():
    assert check("") == C.CheckConfig(type="none")
    assert check("check icmp") == C.CheckConfig(type="icmp")
    assert check("check tcp") == C.CheckConfig(type="tcp")
    assert check("check tls") == C.CheckConfig(type="tls", tls=True)
    assert check('check script "/usr/local/bin/check.sh"') == C.CheckConfig(
        type="script", path="/usr/local/bin/check.sh")


def test_check_http_code():
    c = check('check http "/health" code 200')
    assert c == C.CheckConfig(type="http", path="/health", code=200)
    assert c.http_request() == b"HEAD /health HTTP/1.0\r\n\r\n"
    c = check('check http "/" host "www.example.com" code 302')
    assert (c.host, c.code) == ("www.example.com", 302)
    assert c.http_request() == (b"HEAD / HTTP/1.1\r\nHost: www.example.com\r\n"
                                b"Connection: close\r\n\r\n")


def test_check_https_digest():
    sha1 = hashlib.sha1(b"ok").hexdigest().upper()
    c = check(f'check https "/" digest "{sha1}"')
    assert c == C.CheckConfig(type="https", tls=True, path="/", digest=sha1.lower(),
                              digest_type="sha1")
    assert c.http_request() == b"GET / HTTP/1.0\r\n\r\n"
    md5 = hashlib.md5(b"ok").hexdigest()
    assert check(f'check http "/" digest {md5}').digest_type == "md5"


def test_check_send_expect():
    c = check(r'check send "HELO x\r\n" expect "220 *\r\n" tls')
    assert c == C.CheckConfig(type="send-expect", tls=True, send=b"HELO x\\r\\n",
                              expect="220 *\r\n")
    assert check('check send nothing expect "SSH-2.0*"').send is None
    assert check('check send "" expect "+OK*"').send is None


def test_check_binary():
    c = check('check binary send "300c0201" expect "3084" tls')
    assert c == C.CheckConfig(type="binary", tls=True, send=bytes.fromhex("300c0201"),
                              expect_binary=b"\x30\x84")
    assert check('check binary send nothing expect "aB"').send is None


def test_demote_is_parsed():
    conf = parse("table <web> { 127.0.0.1 }\n" + R + "\tforward to <web> check tcp demote carp\n}\n")
    assert conf.instances[0].demote == "carp"
    assert conf.unimplemented == ()      # relayd/carp.py


# -- modes and keys -----------------------------------------------------------------
def fwd(opts: str) -> C.ForwardConfig:
    return relay_with(f"forward to <web> port 80 {opts}",
                      extra="table <web> { 127.0.0.1 }").forwards[0]


def test_modes_and_keys():
    assert fwd("").mode == "roundrobin" and fwd("").key is None
    assert fwd("mode random").mode == "random"
    assert fwd("mode roundrobin").mode == "roundrobin"
    f = fwd("mode hash 0x00112233445566778899aabbccddeeff")
    assert (f.mode, f.key, f.key_set) == (
        "hash", bytes.fromhex("00112233445566778899aabbccddeeff"), True)
    f = fwd('mode source-hash "secret"')
    assert (f.mode, f.key, f.key_set) == ("source-hash", hashlib.md5(b"secret").digest(), True)
    f = fwd("mode loadbalance check tcp")
    assert f.mode == "loadbalance" and len(f.key) == 16 and not f.key_set
    assert f.table.check.type == "tcp"


# -- relays ---------------------------------------------------------------------------
def test_relay_minimal_defaults():
    conf = parse(RELAY)
    r = conf.relays[0]
    assert (r.id, r.name, r.where) == (1, "zz", f"{NAME}:2")
    assert r.listens == (C.Listen("127.0.0.1", 9999, False, 1, "zz", f"{NAME}:3"),)
    assert r.forwards == (C.ForwardConfig(kind="address", where=f"{NAME}:4",
                                          addr="127.0.0.1", host="127.0.0.1", port=80),)
    assert r.protocol is None and conf.protocol_of(r) is C.DEFAULT_PROTOCOL
    assert (r.session_timeout, r.transparent, r.tls_client, r.disabled) == (
        600, False, False, False)


def test_relay_directives():
    conf = parse('tcp protocol "t" { tcp nodelay }\n'
                 "relay r {\n"
                 "\tlisten on 127.0.0.1 port 8080\n"
                 "\tlisten on two.example.com port 8443 tls\n"
                 "\tprotocol t\n"
                 "\tforward with tls to 127.0.0.2 port 443 retry 3 inet6 64:ff9b::\n"
                 "\tsession timeout 30\n"
                 "\tdisable\n"
                 "}\n"
                 "relay s {\n\tlisten on 127.0.0.1 port 8081\n\tforward to 127.0.0.1 port 80\n}\n")
    r, s = conf.relays
    assert [(l.addr, l.port, l.tls, l.id, l.name) for l in r.listens] == [
        ("127.0.0.1", 8080, False, 1, "r"),
        ("192.0.2.1", 8443, True, 2, "r2:8443"),
        ("192.0.2.2", 8443, True, 3, "r3:8443")]
    assert s.id == 4
    f = r.forwards[0]
    assert (f.kind, f.addr, f.port, f.retry, f.with_tls, f.inet6) == (
        "address", "127.0.0.2", 443, 3, True, "64:ff9b::")
    assert r.tls_client and r.disabled and r.session_timeout == 30
    assert conf.protocol_of(r).name == "t" and conf.protocol_of(r).tcp.nodelay
    assert conf.unimplemented == ()      # relayd/relay_tls.py


def test_relay_forward_address_port_defaults_to_listen_port():
    assert relay_with("forward to 127.0.0.2").forwards[0].port == 8080


def test_relay_destination_natlook_transparent():
    r = relay_with("transparent forward to destination retry 2 inet",
                   listen="listen on 127.0.0.1 port 8080\n\tforward to 127.0.0.9 port 80")
    assert [f.kind for f in r.forwards] == ["address", "destination"]
    assert r.forwards[1].retry == 2 and r.forwards[1].inet and r.transparent
    conf = parse('relay r {\n\tlisten on 127.0.0.1 port 8080\n'
                 '\tforward to nat lookup retry 1\n}\n')
    assert conf.relays[0].forwards[0].kind == "natlook"
    assert conf.unimplemented == ()
    conf = parse('relay r {\n\tlisten on 127.0.0.1 port 8080\n'
                 '\ttransparent forward to destination\n}\n')
    assert conf.unimplemented == () and conf.relays[0].transparent


def test_relay_backup_tables_in_order():
    r = relay_with("forward to <a> port 80 check tcp\n\tforward to <b> port 80 check tcp\n"
                   "\tforward to <c> port 80 check icmp",
                   extra="table <a> { 127.0.0.1 }\ntable <b> { 127.0.0.2 }\n"
                         "table <c> { 127.0.0.3 }")
    assert [(f.table.name, f.backup) for f in r.tables] == [
        ("a:80", False), ("b:80", True), ("c:80", True)]


def test_relay_include(tmp_path):
    inc = tmp_path / "fwd.conf"
    inc.write_text("forward to 127.0.0.2 port 81\n")
    conf = parse(f'relay r {{\n\tlisten on 127.0.0.1 port 8080\n\tinclude "{inc}"\n'
                 "\tsession timeout 5\n}\n")
    r = conf.relays[0]
    assert r.forwards[0].port == 81 and r.forwards[0].where == f"{inc}:1"
    assert r.session_timeout == 5


# -- protocols ----------------------------------------------------------------------
def test_protocol_tcp_options():
    p = proto_with("tcp { nodelay, no sack, socket buffer 65536\n backlog 512 ip ttl 64,"
                   " ip minttl 250, no splice }", ptype="tcp")
    assert p.type == "tcp"
    assert p.tcp == C.TcpOptions(nodelay=True, sack=False, socket_buffer=65536,
                                 backlog=512, ip_ttl=64, ip_minttl=250, splice=False)
    assert proto_with("tcp sack").tcp.sack is True


def test_protocol_tls_options():
    p = proto_with("tls { ciphers \"HIGH:!aNULL:!MD5\", ecdhe \"X25519,P-256\"\n"
                   " edh params legacy, keypair www.example.com, keypair other\n"
                   " ca file \"/etc/ssl/cert.pem\", client ca \"/etc/ssl/clients.pem\"\n"
                   " ca cert \"/etc/ssl/ca.crt\"\n"
                   " ca key \"/etc/ssl/private/ca.key\" password \"pw\"\n"
                   " session tickets, no tlsv1.3, tlsv1.1, no cipher-server-preference,"
                   " client-renegotiation }")
    assert p.tls == C.TlsOptions(
        ciphers="HIGH:!aNULL:!MD5", ecdhe="X25519,P-256", edh="legacy",
        keypairs=("www.example.com", "other"), ca_file="/etc/ssl/cert.pem",
        ca_cert="/etc/ssl/ca.crt", ca_key="/etc/ssl/private/ca.key", ca_key_password="pw",
        client_ca="/etc/ssl/clients.pem", session_tickets=True,
        versions=frozenset({"tlsv1.1", "tlsv1.2"}), cipher_server_preference=False,
        client_renegotiation=True)
    assert proto_with("tls edh").tls.edh == "auto"
    assert proto_with("tls { edh, no edh }").tls.edh == "none"
    assert proto_with("tls { no tlsv1, tlsv1.3 }").tls.versions == {"tlsv1.3"}
    assert proto_with("tls sslv3").tls.versions == {"sslv3", "tlsv1.2", "tlsv1.3"}
    assert proto_with("tls no session tickets").tls.session_tickets is False


def test_protocol_tls_is_implemented():
    conf = parse('http protocol p {\n tls keypair x\n tls ca cert "/c"\n'
                 ' tls ca key "/k" password "x"\n}\n' + RELAY)
    assert conf.unimplemented == ()      # relayd/relay_tls.py
    p = conf.protocols[0]
    assert p.tls.keypairs == ("x",) and p.tls.ca_cert == "/c" and p.tls.ca_key == "/k"


def test_protocol_http_options_and_return_error():
    p = proto_with("http { headerlen 131072, websockets }\nreturn error style \"b { }\"")
    assert p.http == C.HttpOptions(headerlen=131072, websockets=True)
    assert p.return_error and p.style == "b { }"
    p = proto_with("http headerlen 0\nhttp no websockets\nreturn error { style \"x\" }")
    assert p.http == C.HttpOptions(headerlen=0, websockets=False) and p.style == "x"
    # extension: HTTP/2 toward clients, with its limit knobs
    assert proto_with("http http2").http == C.HttpOptions(http2=True)
    p = proto_with("http { http2 max-streams 10 max-requests 50, headerlen 4096 }")
    assert p.http == C.HttpOptions(headerlen=4096, http2=True, h2_max_streams=10,
                                   h2_max_requests=50)
    p = proto_with("return error")
    assert p.return_error and p.style is None


def test_protocol_forms_and_defaults():
    conf = parse('protocol plain\ntcp protocol "t2" { }\ndns protocol "d" {\n}\n'
                 'http protocol h\n' + RELAY)
    assert [(p.id, p.name, p.type) for p in conf.protocols] == [
        (1, "plain", "tcp"), (2, "t2", "tcp"), (3, "d", "dns"), (4, "h", "http")]
    p = conf.protocols[0]
    assert p.tcp == C.TcpOptions() and p.tls == C.TlsOptions() and p.http == C.HttpOptions()
    assert p.tls.versions == {"tlsv1.2", "tlsv1.3"} and p.tls.cipher_server_preference
    assert p.http.headerlen == 8192 and not p.return_error and p.rules == ()
    assert conf.unimplemented == ()      # relayd/relay_udp.py
    assert conf.warnings == tuple(f"{NAME}:{n}: unused protocol: {name}"
                                  for n, name in ((1, "plain"), (2, "t2"), (3, "d"),
                                                  (5, "h")))


# -- filter rules ----------------------------------------------------------------------
def ent(**kw) -> tuple[C.Entity, ...]:
    return (C.Entity(**kw),)


def test_rule_header_set_value_keeps_macro():
    r = rule('match request header set "X-Forwarded-For" value "$REMOTE_ADDR"')
    assert (r.action, r.direction, r.quick) == ("match", "request", False)
    assert r.entities == ent(type="header", option="set", key="X-Forwarded-For",
                             value="$REMOTE_ADDR")
    assert r.where == f"{NAME}:3"


def test_rule_block_quick_path():
    r = rule('block request quick path "/admin*"')
    assert (r.action, r.quick) == ("block", True)
    assert r.entities == ent(type="path", key="/admin*")


def test_rule_pass_url():
    r = rule('pass request url "example.com/"')
    assert r.action == "pass" and r.entities == ent(type="url", key="example.com/")


def test_rule_header_log_and_response_remove():
    assert rule('match request header log "Host"').entities == ent(
        type="header", option="log", key="Host")
    assert rule("match request header log").entities[0].key == "*"
    r = rule('match response header remove "Server"')
    assert r.direction == "response"
    assert r.entities == ent(type="header", option="remove", key="Server")


def test_rule_default_direction_is_request():
    assert rule("pass").direction == "request"
    assert rule('block header "X-Bad"').direction == "request"


def test_response_cookie_rule():
    # parse.y has no direction check for cookies: Set-Cookie in responses.
    r = rule('match response cookie append "a" value "b" tag "cookie"')
    assert r.direction == "response"
    assert r.entities == ent(type="cookie", option="append", key="a", value="b")


def test_rule_append_cookie_query_hash():
    assert rule('match header append "Via" value "relayd"').entities == ent(
        type="header", option="append", key="Via", value="relayd")
    assert rule('block request cookie "session" value "*evil*"').entities == ent(
        type="cookie", key="session", value="*evil*")
    assert rule('match request query hash "sessid"').entities == ent(
        type="query", option="hash", key="sessid")
    assert rule('block path "/cgi-bin/t.cgi" value "foo=bar*"').entities == ent(
        type="path", key="/cgi-bin/t.cgi", value="foo=bar*")


def test_rule_url_digest():
    sha1 = hashlib.sha1(b"example.com/").hexdigest()
    r = rule(f"block request url digest {sha1.upper()} label \"<b>x</b>\"")
    assert r.entities == ent(type="url", key=sha1, digest=True)
    assert r.label == "<b>x</b>"


def test_rule_file_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# blocked hosts\nexample.com/ trailing words\n\n  indented\n"
                    "other.org/x\n")
    r = rule(f'block request url file "{keys}" value "*"')
    assert r.entities == ent(type="url", keys=("example.com/", "other.org/x"),
                             file=str(keys), value="*")
    dig = tmp_path / "digests"
    sha1, md5 = hashlib.sha1(b"a").hexdigest(), hashlib.md5(b"b").hexdigest()
    dig.write_text(f"{sha1.upper()}\n{md5}\n")
    r = rule(f'block request url digest file "{dig}"')
    assert r.entities == ent(type="url", digest=True, keys=(sha1, md5), file=str(dig))
    r = rule(f'match request header log file "{keys}"')
    assert r.entities[0].keys == ("example.com/", "other.org/x")
    assert r.entities[0].key is None and r.entities[0].option == "log"


def test_rule_file_errors(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("a\n")
    assert errors(f'http protocol p {{\n\tblock url file "{keys}" file "{keys}"\n}}\n'
                  + RELAY) == ["relayd.conf:2: only one file per rule supported"]
    assert errors(f'http protocol p {{\n\tblock header "X" url file "{keys}"\n}}\n'
                  + RELAY) == ["relayd.conf:2: file keys with more than one entity type "
                               "per rule are not supported"]
    assert errors(f'http protocol p {{\n\tblock url digest file "{keys}"\n}}\n'
                  + RELAY) == [f"relayd.conf:2: invalid url digest in {keys}: a"]


def test_rule_tags_labels_method_forward_strip():
    p = proto_with('match request tag "api" path "/api/*"\n'
                   'pass request tagged "api" method POST label "posted"\n'
                   "match request no tag no label\n"
                   "match request path strip 2 forward to <web>",
                   tables="table <web> { 127.0.0.1 }")
    tagr, tagged, notag, fwd_ = p.rules
    assert tagr.tag == "api" and tagr.entities == ent(type="path", key="/api/*")
    assert (tagged.tagged, tagged.method, tagged.label) == ("api", "POST", "posted")
    assert notag.no_tag and notag.no_label
    assert fwd_.path_strip == 2 and fwd_.forward_to == "web" and fwd_.entities == ()


def test_rule_addresses_and_several_entities():
    r = rule('block request quick inet from 10.0.0.0/8 to 127.0.0.1 header "A" '
             'value "1" query "q" cookie "c"')
    assert r.af == "inet"
    assert r.src == ipaddress.ip_network("10.0.0.0/8")
    assert r.dst == ipaddress.ip_network("127.0.0.1/32")
    assert [e.type for e in r.entities] == ["header", "query", "cookie"]
    r = rule("pass response inet6 from ::1")
    assert r.src == ipaddress.ip_network("::1/128") and r.af == "inet6"


def test_rules_keep_file_order():
    p = proto_with("pass\nblock request path \"/x\"\nmatch response header log \"A\"")
    assert [r.action for r in p.rules] == ["pass", "block", "match"]


# -- redirects and routers ---------------------------------------------------------------
def test_redirect_directives():
    conf = parse("table <web> { 127.0.0.1 }\ntable <sorry> { 127.0.0.2 }\n"
                 'redirect "www" {\n'
                 "\tlisten on 192.0.2.1 udp port 8000:8010 interface em0 pflog\n"
                 "\tlisten on 192.0.2.2 port 80\n"
                 "\tforward to <web> check icmp mode source-hash 0x000102030405060708090a0b0c0d0e0f\n"
                 "\tforward to <sorry> timeout 300 check tcp mode source-hash\n"
                 "\tmatch pftag REDIRECTED\n"
                 "\tsession timeout 90\n"
                 "\tsticky-address\n"
                 "\tdisable\n"
                 "}\n")
    rd = conf.redirects[0]
    assert (rd.id, rd.name, rd.where) == (1, "www", f"{NAME}:3")
    assert rd.listens == (
        C.RedirectListen("192.0.2.1", 8000, 8010, "udp", "em0", True, f"{NAME}:4"),
        C.RedirectListen("192.0.2.2", 80, None, "tcp", None, False, f"{NAME}:5"))
    assert rd.table.table.name == "web:8000" and rd.backup.table.name == "sorry:8000"
    assert rd.backup.backup and rd.backup.table.timeout == 300
    assert rd.mode == "source-hash" and len(rd.key) == 16
    assert (rd.pftag, rd.pftag_match, rd.session_timeout) == ("REDIRECTED", True, 90)
    assert rd.sticky_address and rd.disabled
    assert conf.unimplemented == ()      # relayd/pfe.py


def test_redirect_route_to_and_least_states():
    conf = parse("table <b> { 10.100.42.71 10.100.42.72 }\n"
                 'redirect "xmpp" {\n\tlisten on 10.100.42.2 tcp port 5222\n'
                 "\troute to <b> port 5222 check tcp mode least-states interface em0\n}\n")
    f = conf.redirects[0].table
    assert (f.route, f.interface, f.mode) == (True, "em0", "least-states")
    assert conf.unimplemented == ((f"{NAME}:4", "redirect route to (direct server return)"),)


def test_router():
    conf = parse("table <gw> { 192.0.2.1 ip ttl 1 priority 52, 192.0.2.2 ip ttl 1 }\n"
                 'router "uplinks" {\n\troute 0.0.0.0/0\n\troute 10.0.0.0/8\n'
                 "\tforward to <gw> check icmp\n\trtable 5\n\trtlabel \"wan\"\n}\n")
    rt = conf.routers[0]
    assert rt.routes == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("10.0.0.0/8"))
    assert rt.forward.table.name == "gw:65535" and rt.forward.table.check.type == "icmp"
    assert (rt.rtable, rt.rtlabel) == (5, "wan")
    assert [h.conf.priority for h in rt.forward.table.hosts] == [52, 0]
    assert conf.unimplemented == ()      # relayd/pfe_route.py


# -- macros and includes -----------------------------------------------------------------
def test_macros():
    conf = parse('lo = "127.0.0.1"\nports = "port 8080"\n'
                 "relay r {\n\tlisten on $lo $ports\n\tforward to $lo port 80\n}\n")
    assert conf.relays[0].listens[0].port == 8080
    conf = parse('lo = "127.0.0.1"\nrelay r {\n\tlisten on $lo port 8080\n'
                 "\tforward to $lo port 80\n}\n", macros={"lo": "127.0.0.2"})
    assert conf.relays[0].listens[0].addr == "127.0.0.2"


def test_dollar_in_quotes_is_not_a_macro():
    r = rule('match request header set "X-Server" value "$SERVER_ADDR:$SERVER_PORT"')
    assert r.entities[0].value == "$SERVER_ADDR:$SERVER_PORT"


def test_include_top_level(tmp_path):
    inc = tmp_path / "tables.conf"
    inc.write_text("table <web> { 127.0.0.1 }\n")
    conf = parse(f'include "{inc}"\nrelay r {{\n\tlisten on 127.0.0.1 port 80\n'
                 "\tforward to <web> check tcp\n}\n")
    assert conf.tables[0].where == f"{inc}:1"
    assert conf.relays[0].where == f"{NAME}:2"


def test_warnings():
    conf = parse('x = "1"\ntable <unused> { 127.0.0.1 }\n' + RELAY, verbose=1)
    assert conf.warnings == (f"{NAME}:2: unused table: unused",
                             "warning: macro 'x' not used")


def test_rule_forward_table_not_forwarded_by_relay_warns():
    conf = parse("table <web> { 127.0.0.1 }\ntable <api> { 127.0.0.2 }\n"
                 "http protocol p {\n\tmatch request forward to <api>\n}\n"
                 "relay r {\n\tlisten on 127.0.0.1 port 80\n\tprotocol p\n"
                 "\tforward to <web> check tcp\n}\n")
    assert conf.warnings == (f"{NAME}:2: unused table: api",
                             f"{NAME}:6: relay r: protocol p forwards to <api>, "
                             "but the relay does not")


# -- the manual's EXAMPLES section (relayd.conf(5), 2024) -----------------------------------
EXAMPLES = r"""
www1=front-www1.private.example.com
www2=front-www2.private.example.com
www3=front-www3.private.example.com
www4=front-www4.private.example.com

interval 5

table <phphosts> { $www1, $www2, $www3, $www4 }
table <sorryhost> disable { sorryhost.private.example.com }

redirect "www" {
	listen on www.example.com port 8080 interface trunk0
	listen on www6.example.com port 80 interface trunk0

	pftag REDIRECTED

	forward to <phphosts> port 8080 timeout 300 \
		check http "/" digest "630aa3c2f8c3a5a6e2a2b1a1b2c3d4e5f6a7b8c9"
	forward to <sorryhost> port 8080 timeout 300 check icmp
}

table <dnshosts> { 192.0.2.53 }
redirect "dns" {
	listen on dns.example.com tcp port 53
	listen on dns.example.com udp port 53

	forward to <dnshosts> port 53 check tcp
}

table <backends> { 10.100.42.71 10.100.42.72 10.100.42.73 }

redirect "xmpp" {
	listen on 10.100.42.2 tcp port 5222

	route to <backends> port 5222 check tcp interface em0
}

http protocol "https" {
	match header set "X-Forwarded-For" \
		value "$REMOTE_ADDR"
	match header set "X-Forwarded-By" \
		value "$SERVER_ADDR:$SERVER_PORT"
	match header set "Keep-Alive" value "$TIMEOUT"

	match query hash "sessid"

	pass
	block path "/cgi-bin/index.cgi" value "*command=*"

	tls { no tlsv1.0, ciphers "HIGH" }
}

relay "tlsaccel" {
	listen on www.example.com port 443 tls
	protocol "https"
	forward to <phphosts> port 8080 mode loadbalance check tcp
}

protocol "myssh" {
	tcp { nodelay, socket buffer 65536 }
}

relay "sshforward" {
	listen on www.example.com port 2222
	protocol "myssh"
	forward to shell.example.com port 22
}

http protocol httpfilter {
	return error

	pass
	match label "Prohibited!"
	block url "social.network.example.com/"

	# New configuration directives for TLS Interception
	tls ca key "/etc/ssl/private/ca.key" password "password123"
	tls ca cert "/etc/ssl/ca.crt"
}

relay tlsinspect {
	listen on 127.0.0.1 port 8443 tls
	protocol httpfilter
	forward with tls to destination
}

table <gateways> { $gw1 ip ttl 1, $gw2 ip ttl 1 }
router "uplinks" {
	route 0.0.0.0/0
	forward to <gateways> check icmp
}
"""


def test_manual_examples():
    # The manual abbreviates the digest ("630aa3c2f..."); a full one is used here.
    conf = parse(EXAMPLES, macros={"gw1": "192.0.2.1", "gw2": "192.0.2.2"})
    assert conf.interval == 5
    assert [t.name for t in conf.tables] == ["phphosts", "sorryhost", "dnshosts",
                                             "backends", "gateways"]
    assert [h.addr for h in conf.tables[0].hosts] == [
        "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    www, dns, xmpp = conf.redirects
    assert [(l.addr, l.port, l.interface) for l in www.listens] == [
        ("192.0.2.10", 8080, "trunk0"), ("2001:db8::10", 80, "trunk0")]
    assert www.pftag == "REDIRECTED" and not www.pftag_match
    assert www.table.table.check == C.CheckConfig(
        type="http", path="/", digest="630aa3c2f8c3a5a6e2a2b1a1b2c3d4e5f6a7b8c9",
        digest_type="sha1")
    assert www.table.table.timeout == 300
    assert www.backup.table.name == "sorryhost:8080" and www.backup.table.disabled
    assert [l.proto for l in dns.listens] == ["tcp", "udp"]
    assert xmpp.table.route and xmpp.table.interface == "em0"
    https, myssh, httpfilter = conf.protocols
    assert [r.entities[0].key for r in https.rules[:4]] == [
        "X-Forwarded-For", "X-Forwarded-By", "Keep-Alive", "sessid"]
    assert https.rules[4].action == "pass" and https.rules[4].entities == ()
    assert https.rules[5].entities == ent(type="path", key="/cgi-bin/index.cgi",
                                          value="*command=*")
    assert https.tls.ciphers == "HIGH" and https.tls.versions == {"tlsv1.2", "tlsv1.3"}
    assert myssh.tcp.nodelay and myssh.tcp.socket_buffer == 65536
    assert httpfilter.return_error and httpfilter.rules[1].label == "Prohibited!"
    assert httpfilter.tls.ca_key_password == "password123"
    tlsaccel, ssh, inspect = conf.relays
    assert tlsaccel.listens[0].tls and tlsaccel.forwards[0].mode == "loadbalance"
    # Same table and port but another check: a second instance with the same name.
    assert tlsaccel.forwards[0].table.name == "phphosts:8080"
    assert tlsaccel.forwards[0].table is not www.table.table
    assert ssh.forwards[0].addr == "192.0.2.22" and ssh.forwards[0].port == 22
    assert inspect.forwards[0].kind == "destination" and inspect.tls_client
    router = conf.routers[0]
    assert router.forward.table.name == "gateways:65535"
    assert [h.conf.ip_ttl for h in router.forward.table.hosts] == [1, 1]
    assert {f for _, f in conf.unimplemented} == {"redirect route to (direct server return)"}
    assert conf.warnings == ()


def test_manual_tables_example():
    conf = parse("table <service> { 192.168.1.1, 192.168.1.2, 192.168.2.3 }\n"
                 "table <fallback> disable { 10.1.5.1 retry 2 }\n\n"
                 'redirect "www" {\n\tlisten on www.example.com port 80\n'
                 '\tforward to <service> check http "/" code 200\n'
                 '\tforward to <fallback> check http "/" code 200\n}\n')
    rd = conf.redirects[0]
    assert rd.table.table.name == "service:80" and rd.backup.table.name == "fallback:80"
    assert [h.id for h in rd.backup.table.hosts] == [4]
    assert rd.backup.table.hosts[0].retry == 2


# -- errors: one case per message, exact "file:line: " -----------------------------------
TB = "table <web> { 127.0.0.1 }\n"
R = 'relay r {\n\tlisten on 127.0.0.1 port 8080\n'   # lines 1-2 of a relay; body from 3


ERROR_CASES = [
    # globals
    ("interval 0\n", ["relayd.conf:1: invalid interval: 0"]),
    ("timeout -1\n", ["relayd.conf:1: invalid timeout: -1"]),
    ("prefork 33\n", ["relayd.conf:1: invalid number of preforked relays: 33"]),
    ("interval 1\ntimeout 1000\n", ["relayd.conf:2: global timeout exceeds interval"]),
    ("log bogus\n", ['relayd.conf:1: syntax error: unexpected "bogus", expected '
                     '"state changes", "host checks" or "connection"']),
    ("metrics listen on 127.0.0.1 port 1\nmetrics listen on 127.0.0.1 port 2\n",
     ["relayd.conf:2: metrics already specified"]),
    ('foo protocol "x"\n', ["relayd.conf:1: invalid protocol type: foo"]),
    ("bogus 1\n", ['relayd.conf:1: syntax error: unexpected "bogus"']),
    # tables and hosts
    (TB + TB, ["relayd.conf:2: table web defined twice"]),
    ("table <web> { }\n", ["relayd.conf:1: table web has no hosts"]),
    ("table <" + "a" * 64 + "> { 127.0.0.1 }\n", ["relayd.conf:1: invalid table name"]),
    ("table <web> { nohost.invalid }\n", ["relayd.conf:1: invalid host nohost.invalid"]),
    ("table <web> { 127.0.0.1 retry 1 retry 2 }\n",
     ["relayd.conf:1: retry value already set"]),
    ("table <web> { 127.0.0.1 parent 1 parent 2 }\n",
     ["relayd.conf:1: parent value already set"]),
    ("table <web> { 127.0.0.1 priority 1 priority 2 }\n",
     ["relayd.conf:1: priority already set"]),
    ("table <web> { 127.0.0.1 ip ttl 1 ip ttl 2 }\n",
     ["relayd.conf:1: ttl value already set"]),
    ("table <web> { 127.0.0.1 retry -1 }\n", ["relayd.conf:1: invalid retry value: -1"]),
    ("table <web> { 127.0.0.1 parent -1 }\n", ["relayd.conf:1: invalid parent value: -1"]),
    ("table <web> { 127.0.0.1 priority 64 }\n",
     ["relayd.conf:1: invalid priority value: 64"]),
    ("table <web> { 127.0.0.1 ip ttl -1 }\n", ["relayd.conf:1: invalid ttl value: -1"]),
    ("table <web> { " + "a" * 256 + " }\n", ["relayd.conf:1: host name truncated"]),
    # parent ids (instance host ids)
    ("table <web> {\n127.0.0.1\n127.0.0.2 parent 7\n}\n" + R
     + "\tforward to <web> check tcp\n}\n", ["relayd.conf:3: host parent id 7 invalid"]),
    ("table <web> {\n127.0.0.1 parent 2\n127.0.0.2 parent 1\n}\n" + R
     + "\tforward to <web> check tcp\n}\n",
     ["relayd.conf:2: host parent id 2 invalid", "relayd.conf:3: host parent id 1 invalid"]),
    ("table <web> { 127.0.0.1 parent 1 }\n" + R + "\tforward to <web> check tcp\n}\n",
     ["relayd.conf:1: host parent id 1 invalid"]),
    # forward to <table> options
    (R + "\tforward to <nope> port 80\n}\n", ["relayd.conf:3: unknown table nope"]),
    (TB + 'relay r {\n\tforward to <web>\n\tlisten on 127.0.0.1 port 80\n}\n',
     ["relayd.conf:3: invalid port: forward to <web> needs a port or a preceding listen on"]),
    ("interval 5\n" + TB + R + "\tforward to <web> check tcp interval 7\n}\n",
     ["relayd.conf:5: table interval must be divisible by global interval"]),
    (TB + R + "\tforward to <web> mode hash mode loadbalance\n}\n",
     ["relayd.conf:4: key already specified"]),
    (TB + R + '\tforward to <web> mode random "k"\n}\n',
     ["relayd.conf:4: key not supported by mode"]),
    (TB + R + "\tforward to <web> mode least-states\n}\n",
     ["relayd.conf:4: mode not supported for relays"]),
    (TB + R + "\tforward to <web> mode hash 0x1234\n}\n",
     ["relayd.conf:4: hex key must be 128 bits (32 hex digits) long"]),
    (TB + R + "\tforward to <web> mode hash 0x" + "g" * 32 + "\n}\n",
     ["relayd.conf:4: invalid hex key"]),
    (TB + R + "\tforward to <web> demote carpgroupnameislong\n}\n",
     ["relayd.conf:4: demote group name too long"]),
    (TB + R + "\tforward to <web> check tcp timeout 10000\n}\n",
     ["relayd.conf:4: table timeout exceeds interval: web:8080"]),
    (TB + R + "\tforward to <web> port 0\n}\n", ["relayd.conf:4: invalid port: 0"]),
    (TB + R + "\tforward to <web> port nosuchservice\n}\n",
     ["relayd.conf:4: unknown port nosuchservice"]),
    (TB + R + "\tforward to <web> port 80:90\n}\n", ["relayd.conf:4: invalid port"]),
    # checks
    (TB + R + '\tforward to <web> check http "/" code 0\n}\n',
     ["relayd.conf:4: invalid HTTP code: 0"]),
    (TB + R + '\tforward to <web> check http "/" digest "abc"\n}\n',
     ["relayd.conf:4: invalid http digest"]),
    (TB + R + '\tforward to <web> check http "/"\n}\n',
     ['relayd.conf:4: syntax error: unexpected newline, expected "code" or "digest"']),
    (TB + R + '\tforward to <web> check binary send "" expect "00"\n}\n',
     ["relayd.conf:4: empty binary send data"]),
    (TB + R + '\tforward to <web> check binary send "abc" expect "00"\n}\n',
     ["relayd.conf:4: failed in binary send data"]),
    (TB + R + '\tforward to <web> check binary send nothing expect ""\n}\n',
     ["relayd.conf:4: empty binary expect data"]),
    (TB + R + '\tforward to <web> check binary send nothing expect "zz"\n}\n',
     ["relayd.conf:4: failed in binary expect data buffer"]),
    (TB + R + '\tforward to <web> check ftp\n}\n', ["relayd.conf:4: invalid check type: ftp"]),
    # redirects
    (TB + 'redirect w {\n\tlisten on 127.0.0.1 port 80\n\tforward to <web> check tcp\n}\n'
     'redirect w {\n}\n', ["relayd.conf:6: redirection w defined twice"]),
    ('redirect "' + "r" * 64 + '" {\n}\n',
     ["relayd.conf:1: redirection name truncated: " + "r" * 64]),
    ('redirect w {\n\tlisten on 127.0.0.1 port 80\n}\n',
     ["relayd.conf:1: redirection w has no table"]),
    (TB + 'redirect w {\n\tforward to <web> port 80 check tcp\n}\n',
     ["relayd.conf:2: redirection w has no virtual ip"]),
    (TB + 'table <b> { 127.0.0.2 }\nredirect w {\n\tlisten on 127.0.0.1 port 80\n'
     '\tforward to <web> check tcp\n\tforward to <b> port 81 check tcp\n}\n',
     ["relayd.conf:3: redirection w uses two different ports for its table and "
      "backup table"]),
    (TB + 'redirect w {\n\tlisten on 127.0.0.1 port 80\n'
     '\tforward to <web> check tcp interface em0\n}\n',
     ["relayd.conf:4: superfluous interface"]),
    (TB + 'redirect w {\n\tlisten on 127.0.0.1 port 80\n\troute to <web> check tcp\n}\n',
     ["relayd.conf:4: missing interface to route to"]),
    (TB + 'redirect w {\n\tlisten on 127.0.0.1 port 80\n'
     '\ttransparent forward to <web> check tcp\n}\n',
     ["relayd.conf:4: no transparent forward here"]),
    (TB + 'redirect w {\n\tlisten on 127.0.0.1 port 80\n\tforward to <web>\n}\n',
     ["relayd.conf:4: table web:80 has no check"]),
    (TB + 'redirect w {\n\tlisten on 127.0.0.1 port 80\n\tforward to <web> check tcp\n'
     '\tforward to <web> check icmp\n\tforward to <web> check tls\n}\n',
     ["relayd.conf:6: only one backup table is allowed"]),
    (TB + 'redirect w {\n\tlisten on 127.0.0.1 port 80\n\tforward to <web> check tcp\n'
     '\tforward to <web> check icmp mode random\n}\n',
     ["relayd.conf:5: backup table for w with different mode"]),
    (TB + 'redirect w {\n\tlisten on 127.0.0.1 port 80\n'
     '\tforward to <web> check tcp mode hash\n}\n',
     ["relayd.conf:4: mode not supported for redirections"]),
    ('redirect w {\n\tpftag ' + "t" * 64 + '\n}\n',
     ["relayd.conf:2: redirection tag name truncated: " + "t" * 64]),
    ('redirect w {\n\tlisten on vip.invalid port 80\n}\n',
     ["relayd.conf:2: invalid virtual ip: vip.invalid"]),
    ('redirect w {\n\tlisten on 127.0.0.1 bogusproto port 80\n}\n',
     ["relayd.conf:2: invalid protocol: bogusproto"]),
    ('redirect w {\n\tlisten on 127.0.0.1 port 90:80\n}\n',
     ["relayd.conf:2: invalid port range: 90:80"]),
    ('redirect w {\n\tsession timeout 2147483648\n}\n',
     ["relayd.conf:2: timeout too large: 2147483648"]),
    # relays
    (R + "\tforward to 127.0.0.1 port 80\n}\n" + R + "\tforward to 127.0.0.1 port 80\n}\n",
     ["relayd.conf:5: relay r or listener defined twice"]),
    (R + "\tforward to 127.0.0.1 port 80\n}\n"
     'relay s {\n\tlisten on 127.0.0.1 port 8080\n\tforward to 127.0.0.1 port 80\n}\n',
     ["relayd.conf:5: relay s or listener defined twice"]),
    ('relay r {\n\tforward to 127.0.0.1 port 80\n}\n', ["relayd.conf:1: relay r has no listener"]),
    (R + "\tforward to nat lookup\n\tforward to destination\n}\n",
     ["relayd.conf:1: relay r with conflicting nat lookup and peer options"]),
    (R + "\tsession timeout 5\n}\n", ["relayd.conf:1: relay r has no target, rdr, or table"]),
    (R + "\tforward to 127.0.0.1 port 80\n\tforward to 127.0.0.2 port 80\n}\n",
     ["relayd.conf:4: relay r target or redirection already specified"]),
    (R + "\troute to 127.0.0.1 port 80\n}\n",
     ["relayd.conf:3: no route for relays"]),
    ('relay r {\n\tlisten on nowhere.invalid port 80\n}\n',
     ["relayd.conf:2: invalid listen ip: nowhere.invalid"]),
    (R + "\tforward to backend.invalid port 80\n}\n",
     ["relayd.conf:3: invalid forward ip: backend.invalid"]),
    ('relay r {\n\tforward to 127.0.0.1\n}\n',
     ["relayd.conf:2: invalid port: forward to 127.0.0.1 needs a port or a preceding listen on"]),
    (R + "\tforward to 127.0.0.1 port 80 inet6 10.0.0.1\n}\n",
     ["relayd.conf:3: invalid ipv6 address 10.0.0.1"]),
    (R + "\tforward to 127.0.0.1 port 80 retry -1\n}\n",
     ["relayd.conf:3: invalid retry value: -1"]),
    ("protocol p\n" + 'relay r {\n\tlisten on 127.0.0.1 port 8080\n\tprotocol p\n\tprotocol p\n'
     "\tforward to 127.0.0.1 port 80\n}\n", ["relayd.conf:5: more than one protocol specified"]),
    (R + "\tprotocol nope\n\tforward to 127.0.0.1 port 80\n}\n",
     ["relayd.conf:3: no such protocol: nope"]),
    ('relay "' + "r" * 64 + '" {\n}\n', ["relayd.conf:1: relay name truncated"]),
    (R + "\tlisten on 127.0.0.1 port 8081 bogus\n\tforward to 127.0.0.1 port 80\n}\n",
     ['relayd.conf:3: syntax error: unexpected "bogus"']),
    # protocols
    ("protocol p\nprotocol p\n", ["relayd.conf:2: protocol p defined twice"]),
    ("protocol default\n", ["relayd.conf:1: protocol default defined twice"]),
    ('protocol "' + "p" * 64 + '"\n', ["relayd.conf:1: protocol name truncated"]),
    ("protocol p {\n\ttls { no tlsv1.2, no tlsv1.3 }\n}\n",
     ["relayd.conf:1: invalid TLS protocol"]),
    ("dns protocol p {\n\ttls ciphers x\n}\n",
     ["relayd.conf:2: can set tls options only for tcp or http protocols"]),
    ("dns protocol p {\n\ttcp nodelay\n}\n",
     ["relayd.conf:2: can set tcp options only for tcp or http protocols"]),
    ("protocol p {\n\thttp websockets\n}\n",
     ["relayd.conf:2: can set http options only for http protocol"]),
    ("protocol p {\n\ttcp backlog 513\n}\n", ["relayd.conf:2: invalid backlog: 513"]),
    ("protocol p {\n\ttcp socket buffer -1\n}\n",
     ["relayd.conf:2: invalid socket buffer size: -1"]),
    ("protocol p {\n\ttcp ip ttl -1\n}\n", ["relayd.conf:2: invalid ttl: -1"]),
    ("protocol p {\n\ttcp ip maxttl 5\n}\n", ["relayd.conf:2: invalid TCP/IP flag: maxttl"]),
    ("protocol p {\n\ttls tlsv9\n}\n", ["relayd.conf:2: invalid TLS flag: tlsv9"]),
    ("protocol p {\n\ttls edh params huge\n}\n", ["relayd.conf:2: tls edh params huge: invalid"]),
    ("http protocol p {\n\thttp headerlen 131073\n}\n",
     ["relayd.conf:2: invalid headerlen: 131073"]),
    ("http protocol p {\n\thttp http2 max-streams 0\n}\n",
     ["relayd.conf:2: invalid max-streams: 0"]),
    ("protocol p {\n\thttp http2\n}\n",
     ["relayd.conf:2: can set http options only for http protocol"]),
    # filter rules
    ("http protocol p {\n\tblock inet from ::1\n}\n", ["relayd.conf:2: address family mismatch"]),
    ("http protocol p {\n\tblock from 10.0.0.0/33\n}\n", ["relayd.conf:2: invalid prefixlen 33"]),
    ("http protocol p {\n\tblock from x.invalid\n}\n", ["relayd.conf:2: invalid host x.invalid"]),
    ("http protocol p {\n\tblock method get\n}\n",
     ["relayd.conf:2: unknown HTTP method currently not supported"]),
    ("http protocol p {\n\tmatch forward to <nope>\n}\n",
     ["relayd.conf:2: undefined forward table"]),
    ('http protocol p {\n\tmatch tag "a" tag "b"\n}\n', ["relayd.conf:2: tag already defined"]),
    ('http protocol p {\n\tmatch tagged "a" tagged "b"\n}\n',
     ["relayd.conf:2: tagged already defined"]),
    ('http protocol p {\n\tmatch tag ""\n}\n', ["relayd.conf:2: invalid tag"]),
    ('http protocol p {\n\tmatch tag "' + "t" * 64 + '"\n}\n', ["relayd.conf:2: tag truncated"]),
    ('http protocol p {\n\tmatch label "a" label "b"\n}\n',
     ["relayd.conf:2: label already defined"]),
    ('http protocol p {\n\tmatch label ""\n}\n', ["relayd.conf:2: invalid label"]),
    ('http protocol p {\n\tmatch label "' + "l" * 1024 + '"\n}\n',
     ["relayd.conf:2: label truncated"]),
    ("http protocol p {\n\tmatch no tag\n}\n", ["relayd.conf:2: no tag defined"]),
    ("http protocol p {\n\tmatch no label\n}\n", ["relayd.conf:2: no label defined"]),
    ('http protocol p {\n\tblock file "/a"\n}\n',
     ["relayd.conf:2: file needs a cookie, header, path, query or url entity before it"]),
    ('http protocol p {\n\tblock url file "/nonexistent/keys"\n}\n',
     ["relayd.conf:2: failed to load rules from /nonexistent/keys"]),
    ('http protocol p {\n\tblock response path "/x"\n}\n',
     ["relayd.conf:2: failed to load rule: path is only available with the direction request"]),
    ('http protocol p {\n\tblock response query "q"\n}\n',
     ["relayd.conf:2: failed to load rule: query is only available with the direction "
      "request"]),
    ('http protocol p {\n\tblock response url "u/"\n}\n',
     ["relayd.conf:2: failed to load rule: url is only available with the direction request"]),
    ('http protocol p {\n\tmatch response path strip 1\n}\n',
     ["relayd.conf:2: failed to load rule: path is only available with the direction request"]),
    ("http protocol p {\n\tmatch path strip -1\n}\n", ["relayd.conf:2: invalid strip number"]),
    ("http protocol p {\n\tmatch header set\n}\n", ["relayd.conf:2: header set needs a key"]),
    ('http protocol p {\n\tmatch header append "X"\n}\n',
     ["relayd.conf:2: header append needs a value"]),
    ('http protocol p {\n\tblock url digest "abc"\n}\n',
     ["relayd.conf:2: invalid url digest: abc (need 40 or 32 hex digits)"]),
    ('http protocol p {\n\tmatch query set "q" value "v"\n}\n',
     ["relayd.conf:2: combining query type and the given option is not supported"]),
    ('http protocol p {\n\tmatch url remove "u"\n}\n',
     ["relayd.conf:2: combining url type and the given option is not supported"]),
    ('http protocol p {\n\tblock request quick path\n\tbogus\n}\n',
     ['relayd.conf:3: syntax error: unexpected "bogus"']),
    # routers
    (TB + 'router g {\n\troute 10.0.0.0/8\n\tforward to <web> check icmp\n}\nrouter g {\n}\n',
     ["relayd.conf:6: router g defined twice"]),
    (TB + 'router g {\n\tforward to <web> check icmp\n}\n',
     ["relayd.conf:2: router g without routes"]),
    (TB + 'router g {\n\troute 10.0.0.0/8\n}\n', ["relayd.conf:2: router g has no table"]),
    (TB + 'router g {\n\troute 10.0.0.0/8\n\troute ::/0\n\tforward to <web> check icmp\n}\n',
     ["relayd.conf:4: router g address family mismatch"]),
    (TB + 'router g {\n\troute 10.0.0.0/8\n\tforward to <web> check icmp\n'
     '\tforward to <web> check tcp\n}\n', ["relayd.conf:5: router g table already specified"]),
    (TB + 'router g {\n\troute 10.0.0.0/8\n\tforward to <web>\n\trtable 1\n\trtable 2\n}\n',
     ["relayd.conf:6: router g rtable already specified"]),
    (TB + 'router g {\n\troute 10.0.0.0/8\n\tforward to <web>\n\trtable 256\n}\n',
     ["relayd.conf:5: invalid rtable id 256"]),
    (TB + 'router g {\n\troute 10.0.0.0/8\n\tforward to <web>\n\trtlabel "' + "l" * 32
     + '"\n}\n', ["relayd.conf:5: route label truncated"]),
    ('router "' + "g" * 64 + '" {\n}\n', ["relayd.conf:1: router name truncated"]),
    # lexer/macros through the relayd grammar
    ("relay r {\n\tlisten on $nope port 80\n}\n",
     ["relayd.conf:2: macro 'nope' not defined",
      "relayd.conf:2: syntax error: unexpected newline, expected address"]),
    ("table = \"x\"\n", ['relayd.conf:1: syntax error: cannot use keyword "table" as a macro name']),
]


@pytest.mark.parametrize("text,expected", ERROR_CASES,
                         ids=[e[1][0].split(": ", 1)[1][:50] for e in ERROR_CASES])
def test_error_messages(text, expected):
    assert errors(text + RELAY) == expected


def test_no_actions():
    assert errors("interval 5\n") == ["relayd.conf: no actions, nothing to do"]
    assert errors("") == ["relayd.conf: no actions, nothing to do"]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(str(tmp_path / "nope.conf"))
    assert exc.value.lines == [f"{tmp_path / 'nope.conf'}: No such file or directory"]


def test_every_error_is_reported():
    text = ("interval 0\n" + TB + TB + "protocol p {\n\ttcp backlog 999\n\ttls tlsv9\n}\n"
            'relay r {\n\tlisten on 127.0.0.1 port 80\n\tforward to <nope>\n}\n')
    assert errors(text) == [
        "relayd.conf:1: invalid interval: 0",
        "relayd.conf:3: table web defined twice",
        "relayd.conf:5: invalid backlog: 999",
        "relayd.conf:6: invalid TLS flag: tlsv9",
        "relayd.conf:10: unknown table nope",
        "relayd.conf: no actions, nothing to do",
    ]


def test_include_in_error_location(tmp_path):
    inc = tmp_path / "bad.conf"
    inc.write_text("\n\nprefork 99\n")
    assert errors(f'include "{inc}"\n' + RELAY) == [
        f"{inc}:3: invalid number of preforked relays: 99"]
