"""relayd.rules: filter rule evaluation and actions, without sockets.

Rules come from relayd.conf snippets through the real parser, so what is
tested is what a configuration produces."""

from __future__ import annotations

import hashlib

import pytest

from relayd import rules as R
from relayd.parse import load

TABLES = """
table <web> { 127.0.0.1 }
table <other> { 127.0.0.2 }
"""
RELAY = """
relay "r" {
\tlisten on 127.0.0.1 port 9999
\tprotocol "p"
\tforward to <web> port 80
\tforward to <other> port 81
}
"""


def proto_rules(lines: str):
    text = TABLES + 'http protocol "p" {\n' + lines + "\n}\n" + RELAY
    conf = load("relayd.conf", text=text)
    return conf.protocols[0].rules


def req(target="/", headers=(("Host", "www.example.com"),), method="GET"):
    return R.Message.request(method, target, list(headers))


def resp(status=200, headers=(("Server", "x"),)):
    return R.Message.response(status, list(headers))


ENV = R.Env("192.0.2.7", 40000, "127.0.0.1", 9999, 600)


def run(lines, msg=None, ctx=None, direction=R.REQUEST):
    msg = msg if msg is not None else req()
    ctx = ctx or R.Ctx("192.0.2.7", "127.0.0.1")
    v = R.evaluate(proto_rules(lines), direction, msg, ctx)
    applied = R.apply_actions(v, msg, ENV) if v.result in (R.RES_PASS, R.RES_DROP) else None
    return v, msg, applied


# -- glob --------------------------------------------------------------------------
@pytest.mark.parametrize("pat,s,fold,ok", [
    ("*", "/a/b", False, True),             # no FNM_PATHNAME: * crosses /
    ("/a*", "/abc/d", False, True),
    ("/a?c", "/abc", False, True),
    ("/a?c", "/ac", False, False),
    ("[ab]x", "bx", False, True),
    ("[!ab]x", "bx", False, False),
    ("[^ab]x", "cx", False, True),
    ("[a-c]", "b", False, True),
    ("\\*", "*", False, True),
    ("\\*", "a", False, False),
    ("X-Foo", "x-foo", True, True),
    ("X-Foo", "x-foo", False, False),
    ("x-*", "X-Bar", True, True),
    ("[x", "[x", False, True),              # unclosed bracket: literal
    ("a.b", "aXb", False, False),           # regex characters are literal
])
def test_glob(pat, s, fold, ok):
    assert R.fnmatch(pat, s, fold) is ok


# -- url lookups -------------------------------------------------------------------------
def test_url_lookups_manual_example():
    got = R.url_lookups("www.example.com:81", "/1/2/3/4/5.html", "query=yes")
    assert got == [
        "www.example.com/1/2/3/4/5.html?query=yes",
        "www.example.com/1/2/3/4/5.html",
        "www.example.com/",
        "www.example.com/1/",
        "www.example.com/1/2/",
        "www.example.com/1/2/3/",
        "example.com/1/2/3/4/5.html?query=yes",
        "example.com/1/2/3/4/5.html",
        "example.com/",
        "example.com/1/",
        "example.com/1/2/",
        "example.com/1/2/3/",
    ]


def test_host_levels_at_most_five():
    assert R.host_levels("a.b.c.d.e.f.com") == [
        "a.b.c.d.e.f.com", "c.d.e.f.com", "d.e.f.com", "e.f.com", "f.com"]
    assert R.host_levels("localhost") == ["localhost"]
    assert R.host_levels("example.com") == ["example.com"]


@pytest.mark.parametrize("host,out", [
    ("WWW.Example.COM", "www.example.com"),
    ("www..example.com.", "www.example.com"),
    ("example.com:8080", "example.com"),
    ("[::1]:80", "::1"),
    ("127.0.0.1", "127.0.0.1"),
    ("...", None),
    ("", None),
])
def test_canonicalize_host(host, out):
    assert R.canonicalize_host(host) == out


@pytest.mark.parametrize("path,n,out", [
    ("/a/b/c", 0, "/a/b/c"),
    ("/a/b/c", 1, "/b/c"),
    ("/a/b/c", 2, "/c"),
    ("/a/b/c", 5, "/c"),                     # the last component stays
    ("/a/b/", 2, "/"),
    ("/", 1, "/"),
])
def test_strip_path(path, n, out):
    assert R.strip_path(path, n) == out


def test_path_prefixes():
    assert R.path_prefixes("/1/2/3/4/5.html") == ["/", "/1/", "/1/2/", "/1/2/3/"]
    assert R.path_prefixes("/") == []
    assert R.path_prefixes("/1/") == ["/"]


# -- verdicts ---------------------------------------------------------------------------
def test_default_pass():
    v, _, _ = run('match request header log "Nope"')
    assert v.result == R.RES_PASS


def test_last_match_wins():
    v, _, _ = run('block request path "/a*"\npass request path "/ab*"', req("/abc"))
    assert v.result == R.RES_PASS
    v, _, _ = run('pass request path "/ab*"\nblock request path "/a*"', req("/abc"))
    assert v.result == R.RES_DROP


def test_quick_stops():
    v, _, _ = run('pass request quick path "/a*"\nblock request', req("/a"))
    assert v.result == R.RES_PASS
    v, _, _ = run('pass request quick path "/a*"\nblock request', req("/b"))
    assert v.result == R.RES_DROP


def test_match_never_decides_but_accumulates():
    lines = ('block request\n'
             'match request header set "X-A" value "1"\n'
             'match request header set "X-B" value "2"')
    v, msg, _ = run(lines)
    assert v.result == R.RES_DROP
    assert ("X-A", "1") in msg.items() and ("X-B", "2") in msg.items()


def test_only_deciding_rule_actions_apply():
    lines = ('pass request header set "X-First" value "1"\n'
             'pass request header set "X-Second" value "2"')
    _, msg, _ = run(lines)
    names = [k for k, _ in msg.items()]
    assert "X-Second" in names and "X-First" not in names


def test_direction():
    lines = 'block response header "Server"'
    v, _, _ = run(lines)
    assert v.result == R.RES_PASS
    v, _, _ = run(lines, resp(), direction=R.RESPONSE)
    assert v.result == R.RES_DROP


def test_method():
    v, _, _ = run('block request method PUT', req(method="PUT"))
    assert v.result == R.RES_DROP
    v, _, _ = run('block request method PUT', req(method="GET"))
    assert v.result == R.RES_PASS


def test_from_to_and_af():
    v, _, _ = run('block request from 192.0.2.0/24')
    assert v.result == R.RES_DROP
    v, _, _ = run('block request from 10.0.0.0/8')
    assert v.result == R.RES_PASS
    v, _, _ = run('block request to 127.0.0.1')
    assert v.result == R.RES_DROP
    v, _, _ = run('block request inet6')
    assert v.result == R.RES_PASS
    v, _, _ = run('block request inet')
    assert v.result == R.RES_DROP


def test_tag_tagged_instant_for_match_rules():
    v, _, _ = run('match request tag "t1"\nblock request tagged "t1"')
    assert v.result == R.RES_DROP and v.tag == "t1"
    # a pass rule's tag is only applied once it decided: `tagged` misses it
    v, _, _ = run('pass request tag "t1"\nblock request tagged "t1"')
    assert v.result == R.RES_PASS and v.tag == "t1"


def test_tag_is_session_state():
    ctx = R.Ctx("192.0.2.7", "127.0.0.1", tag="old")
    v, _, _ = run('block request tagged "old"', ctx=ctx)
    assert v.result == R.RES_DROP
    v, _, _ = run('match request tag "old"\nmatch request no tag', ctx=ctx)
    assert v.tag is None


def test_label_and_no_label():
    v, _, _ = run('block request label "go away"')
    assert v.label == "go away"
    ctx = R.Ctx("192.0.2.7", "127.0.0.1", label="x")
    v, _, _ = run('match request label "x"\nmatch request no label', ctx=ctx)
    assert v.label is None


def test_forward_to_table():
    v, _, _ = run('match request header "Host" value "www.*" forward to <other>')
    assert v.table == "other"
    v, _, _ = run('match request header "Host" value "ftp.*" forward to <other>')
    assert v.table is None


# -- patterns(7) keys (args-http-pattern-case.pl, args-http-value-default.pl) ---------
def test_path_pattern_is_case_sensitive():
    rules = 'match request path pattern "^/api" tag LOW\nmatch request path pattern "^/API" tag UP'
    v, _, _ = run(rules, req("/API/foo/bar"))
    assert v.tag == "UP"
    v, _, _ = run(rules, req("/api/x"))
    assert v.tag == "LOW"


def test_header_pattern_key_value_defaults_to_any():
    msg = req(headers=[("Host", "h"), ("X-Test", "whatever")])
    v, _, _ = run('match request header "X-Test" tag VALGLOB\n'
                  'match request header pattern "^X%-Test$" tagged VALGLOB tag VALPAT', msg)
    assert v.tag == "VALPAT"
    # always case-sensitive, unlike a header glob
    v, _, _ = run('block request header pattern "^x%-test$"', req(
        headers=[("Host", "h"), ("X-Test", "a")]))
    assert v.result == R.RES_PASS


def test_pattern_value_query_and_cookie():
    v, _, _ = run('block request header pattern "^X%-T" value "^wh.*r$"', req(
        headers=[("Host", "h"), ("X-Token", "whatever")]))
    assert v.result == R.RES_DROP
    v, _, _ = run('block request header pattern "^X%-T" value "^wh.*r$"', req(
        headers=[("Host", "h"), ("X-Token", "whatevers")]))
    assert v.result == R.RES_PASS
    v, _, _ = run('block request query pattern "^id%d+$" value "^%d+$"', req("/p?id42=7"))
    assert v.result == R.RES_DROP
    v, _, _ = run('block request query pattern "^id%d+$" value "^%d+$"', req("/p?id42=x"))
    assert v.result == R.RES_PASS
    v, _, _ = run('block request cookie pattern "^sess"', req(
        headers=[("Host", "h"), ("Cookie", "a=1; session=2")]))
    assert v.result == R.RES_DROP


def test_bad_pattern_is_a_config_error():
    with pytest.raises(Exception) as e:
        proto_rules('match request path pattern "[a" tag X')
    assert "relayd.conf:" in str(e.value) and "invalid pattern: malformed pattern" in str(e.value)


# -- entities -------------------------------------------------------------------------
def test_header_name_case_insensitive_value_case_sensitive():
    msg = req(headers=[("Host", "h"), ("x-token", "Secret")])
    v, _, _ = run('block request header "X-Token" value "Secret"', msg)
    assert v.result == R.RES_DROP
    v, _, _ = run('block request header "X-Token" value "secret"', req(
        headers=[("Host", "h"), ("x-token", "Secret")]))
    assert v.result == R.RES_PASS


def test_header_any_occurrence():
    msg = req(headers=[("Host", "h"), ("X", "a"), ("X", "evil")])
    v, _, _ = run('block request header "X" value "evil"', msg)
    assert v.result == R.RES_DROP


def test_header_missing_does_not_match():
    v, _, _ = run('block request header "X-Missing"')
    assert v.result == R.RES_PASS


def test_header_set_append_remove():
    msg = req(headers=[("Host", "h"), ("X-A", "1"), ("X-A", "2"), ("X-B", "b"), ("X-C", "c")])
    lines = ('match request header set "X-A" value "new"\n'
             'match request header append "X-B" value "more"\n'
             'match request header append "X-New" value "n"\n'
             'match request header remove "X-C"')
    _, msg, _ = run(lines, msg)
    assert msg.items() == [("Host", "h"), ("X-A", "new"), ("X-B", "b"), ("X-B", "more"),
                           ("X-New", "n")]


def test_header_append_is_a_line_of_its_own_and_log_sees_the_first():
    # regress args-http-append-header.pl: appended values are separate
    # lines; `log` logs the header the rule test found, as it arrived.
    msg = req(headers=[("Host", "h"), ("X-Header-Client", "ABC")])
    lines = ('match request header append "X-Header-Client" value "abc"\n'
             'match request header log "X-Header*"')
    _, msg, a = run(lines, msg)
    assert msg.items() == [("Host", "h"), ("X-Header-Client", "ABC"),
                           ("X-Header-Client", "abc")]
    assert a.log == [" [X-Header-Client: ABC]"]
    msg = req(headers=[("Host", "h"), ("X-A", "1"), ("X-A", "2")])
    _, msg, _ = run('match request header append "X-A" value "$REMOTE_ADDR"', msg)
    assert msg.items() == [("Host", "h"), ("X-A", "1"), ("X-A", "2"), ("X-A", "192.0.2.7")]


def test_header_log_picks_like_kv_find():
    # The first line of the first matching name in case-insensitive order.
    msg = req(headers=[("Host", "h"), ("X-Zed", "z"), ("x-abc", "1"), ("X-ABC", "2")])
    _, _, a = run('match request header log "X-*"', msg)
    assert a.log == [" [x-abc: 1]"]
    msg = req(headers=[("Host", "h"), ("X-Foo", "foo"), ("X-Bar", "bar")])
    _, _, a = run('match response header remove "X-Foo"\nmatch response header log "*Foo"',
                  R.Message.response(200, msg.items()), direction=R.RESPONSE)
    assert a.log == [" {X-Foo: foo (removed)}"]


def test_header_remove_glob():
    msg = req(headers=[("Host", "h"), ("X-A", "1"), ("X-B", "2"), ("Y", "3")])
    _, msg, _ = run('match request header remove "X-*"', msg)
    assert msg.items() == [("Host", "h"), ("Y", "3")]


def test_macros():
    lines = ('match request header set "X-Forwarded-For" value "$REMOTE_ADDR"\n'
             'match request header set "X-Port" value "$REMOTE_PORT"\n'
             'match request header set "X-Srv" value "$SERVER_ADDR:$SERVER_PORT"\n'
             'match request header set "X-Name" value "$SERVER_NAME"\n'
             'match request header set "X-Host" value "$HOST"\n'
             'match request header set "X-T" value "$TIMEOUT"')
    _, msg, _ = run(lines)
    h = dict(msg.items())
    assert h["X-Forwarded-For"] == "192.0.2.7"
    assert h["X-Port"] == "40000"
    assert h["X-Srv"] == "127.0.0.1:9999"
    assert h["X-Name"] == "OpenBSD relayd"
    assert h["X-Host"] == "www.example.com"
    assert h["X-T"] == "600"


def test_macro_host_fallback_and_no_reexpansion():
    msg = req(headers=[])
    _, msg, _ = run('match request header set "X-Host" value "$HOST"', msg)
    assert dict(msg.items())["X-Host"] == "127.0.0.1"
    msg = req(headers=[("Host", "$REMOTE_ADDR")])
    _, msg, _ = run('match request header set "X-Host" value "$HOST"', msg)
    assert dict(msg.items())["X-Host"] == "$REMOTE_ADDR"


def test_path_and_query_value():
    v, _, _ = run('block request path "/a/*" value "*debug*"', req("/a/b?x=DEBUG"))
    assert v.result == R.RES_DROP                   # query value: case-insensitive
    v, _, _ = run('block request path "/a/*" value "*debug*"', req("/a/b"))
    assert v.result == R.RES_PASS
    v, _, _ = run('block request path "/A/*"', req("/a/b"))
    assert v.result == R.RES_PASS                   # path: case-sensitive


def test_path_set_append_remove_strip():
    _, msg, _ = run('match request path set "*" value "/new"', req("/old?q=1"))
    assert msg.target == "/new?q=1"
    _, msg, _ = run('match request path append "*" value ".bak"', req("/f"))
    assert msg.target == "/f.bak"
    _, msg, _ = run('match request path remove "/x*"', req("/xyz"))
    assert msg.target == "/"
    _, msg, _ = run('match request path strip 1', req("/api/v1/x?a=b"))
    assert msg.target == "/v1/x?a=b"


def test_query():
    v, _, a = run('block request query "debug" value "1*"', req("/?a=b&debug=10"))
    assert v.result == R.RES_DROP
    v, _, _ = run('block request query "debug"', req("/?a=b&debug"))
    assert v.result == R.RES_PASS          # a variable without "=" is skipped
    v, _, _ = run('block request query "debug"', req("/"))
    assert v.result == R.RES_PASS
    _, _, a = run('match request query log "a*"', req("/?x=1&ab=2&ac=3"))
    assert a.log == [" [ab: 2]"]


def test_cookie_match_and_log():
    msg = req(headers=[("Host", "h"), ("Cookie", 'a=1; SessID="xyz"; $Path=/')])
    v, _, _ = run('block request cookie "sessid" value "X*"', msg)
    assert v.result == R.RES_DROP                   # names and values case-insensitive
    msg = req(headers=[("Host", "h"), ("Cookie", "a=1; b=2")])
    _, _, a = run('match request cookie log "b"', msg)
    assert a.log == [" [Cookie: a=1; b=2]"]         # the whole header, as OpenBSD
    v, _, _ = run('block request cookie "c"', req(headers=[("Host", "h"), ("Cookie", "a=1")]))
    assert v.result == R.RES_PASS


def test_cookie_set_remove():
    msg = req(headers=[("Host", "h"), ("Cookie", "a=1; b=2; c=3")])
    _, msg, _ = run('match request cookie remove "b"', msg)
    assert dict(msg.items())["Cookie"] == "a=1; c=3"
    msg = req(headers=[("Host", "h"), ("Cookie", "a=1; b=2")])
    _, msg, _ = run('match request cookie set "b" value "9"', msg)
    assert dict(msg.items())["Cookie"] == "a=1; b=9"
    msg = req(headers=[("Host", "h")])
    _, msg, _ = run('match request cookie set "s" value "v"', msg)
    assert dict(msg.items())["Cookie"] == "s=v;"


def test_url_suffix_prefix():
    lines = 'block request url "example.com/private/"'
    v, _, _ = run(lines, req("/private/x/y.html", [("Host", "www.Example.com:8080")]))
    assert v.result == R.RES_DROP
    v, _, _ = run(lines, req("/public/private/", [("Host", "www.example.com")]))
    assert v.result == R.RES_PASS
    v, _, _ = run(lines, req("/private/", headers=[]))
    assert v.result == R.RES_PASS                   # no Host: no lookup


def test_url_full_with_query():
    lines = 'block request url "www.example.com/a?x=1"'
    v, _, _ = run(lines, req("/a?x=1"))
    assert v.result == R.RES_DROP
    v, _, _ = run(lines, req("/a?x=2"))
    assert v.result == R.RES_PASS


def test_url_digest():
    d = hashlib.sha1(b"example.com/secret/").hexdigest()
    lines = f'block request url digest "{d}"'
    v, _, _ = run(lines, req("/secret/file"))
    assert v.result == R.RES_DROP
    md = hashlib.md5(b"www.example.com/x").hexdigest()
    v, _, _ = run(f'block request url digest "{md}"', req("/x"))
    assert v.result == R.RES_DROP


def test_url_digest_file_mixed(tmp_path):
    f = tmp_path / "digests"
    f.write_text(hashlib.md5(b"www.example.com/a").hexdigest() + "\n"
                 + hashlib.sha1(b"example.com/b/").hexdigest().upper() + "\n")
    lines = f'block request url digest file "{f}"'
    assert run(lines, req("/a"))[0].result == R.RES_DROP
    assert run(lines, req("/b/c"))[0].result == R.RES_DROP
    assert run(lines, req("/c"))[0].result == R.RES_PASS


def test_url_bad_host():
    v, _, _ = run('block request url "example.com/"', req("/", [("Host", "...")]))
    assert v.result == R.RES_BAD


def test_url_log():
    _, _, a = run('match request url log "*"', req("/p?q=1"))
    assert a.log == [" [www.example.com/p: q=1]"]


def test_file_keys_one_copy_per_key(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nexample.com/bad/\n\nother.org/ trailing words\n")
    lines = f'block request url file "{f}"'
    v, _, _ = run(lines, req("/bad/x"))
    assert v.result == R.RES_DROP
    v, _, _ = run(lines, req("/", [("Host", "www.other.org")]))
    assert v.result == R.RES_DROP
    v, _, _ = run(lines, req("/good/"))
    assert v.result == R.RES_PASS
    hf = tmp_path / "hdrs"
    hf.write_text("X-One\nX-Two\n")
    msg = req(headers=[("Host", "h"), ("X-Two", "2"), ("X-One", "1")])
    _, _, a = run(f'match request header log file "{hf}"', msg)
    assert a.log == [" [X-One: 1]", " [X-Two: 2]"]      # file order


def test_log_items_and_label():
    msg = req(headers=[("Host", "foo.bar"), ("X-Gone", "v")])
    lines = ('match request header remove "X-Gone"\n'
             'match request header log "X-Gone"\n'
             'match request header log "Host" label "L"')
    v, _, a = run(lines, msg)
    assert a.log == [" [L, X-Gone: v (removed)]", " [L, Host: foo.bar]"]
    _, _, a = run('match response header log "Server"', resp(), direction=R.RESPONSE)
    assert a.log == [" {Server: x}"]


def test_path_log_and_change_path():
    lines = ('match request path set "*" value "/foopath"\n'
             'match request url log "*"')
    _, msg, a = run(lines, req("/251", [("Host", "foo.bar")]))
    assert a.log == [" [foo.bar/foopath]"]
    _, _, a = run('match request path log "*"', req("/query?foobar"))
    assert a.log == [" [/query: foobar]"]


def test_hash_inputs():
    msg = req(headers=[("Host", "h"), ("X-User", "alice")])
    _, _, a = run('match request header hash "X-User"\nmatch request path hash "*"',
                  req("/p", [("Host", "h"), ("X-User", "alice")]))
    assert a.hash == [b"alice", b"/p"]


def test_compile_cached():
    rs = proto_rules('block request path "/x"')
    assert R.compile_rules(rs) is R.compile_rules(rs)


def test_response_cookie_rules_on_set_cookie():
    # regress args-http-filter-cookie.pl: response cookie rules look at and
    # add Set-Cookie lines.
    msg = resp(headers=[("Server", "x"), ("Set-Cookie", "sid=abc; Path=/")])
    v, msg, a = run('match response cookie log "sid" value "a*"\n'
                    'match response cookie append "a" value "b" tag "cookie"', msg,
                    direction=R.RESPONSE)
    assert v.tag == "cookie"
    assert a.log == [" {Set-Cookie: sid=abc; Path=/}"]
    assert msg.items() == [("Server", "x"), ("Set-Cookie", "sid=abc; Path=/"),
                           ("Set-Cookie", "a=b;")]
    v, _, _ = run('block response cookie "sid" value "x*"', resp(
        headers=[("Set-Cookie", "sid=abc")]), direction=R.RESPONSE)
    assert v.result == R.RES_PASS
    v, _, _ = run('block response cookie "sid"', resp(
        headers=[("Set-Cookie", "sid=abc")]), direction=R.RESPONSE)
    assert v.result == R.RES_DROP
    v, msg, _ = run('match response cookie set "sid" value "new"', resp(
        headers=[("Set-Cookie", "sid=abc"), ("Set-Cookie", "o=1")]), direction=R.RESPONSE)
    assert msg.items() == [("Set-Cookie", "o=1"), ("Set-Cookie", "sid=new;")]
