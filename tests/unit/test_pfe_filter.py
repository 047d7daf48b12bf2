"""relayd.pfe_filter: the nftables JSON of redirections, per mode and option
(pure: no nft, no root).  The same commands are loaded into a real kernel
by tests/regress/test_relayd_netns.py."""

from __future__ import annotations

import json

import pytest

from relayd import pfe_filter as F
from relayd.parse import load
from relayd.pfe_filter import Pool

B1, B2, B3 = "10.0.0.1", "10.0.0.2", "10.0.0.3"


def conf_of(text: str):
    return load("relayd.conf", text=text)


def rdr_conf(body: str, tables: str = f"table <web> {{ {B1}, {B2} }}\n"):
    return conf_of(tables + f'redirect "www" {{\n{body}\n}}\n')


def one(body: str, **kw):
    return rdr_conf(body, **kw).redirects[0]


def pool(rdr, *addrs, backup=False) -> Pool:
    hosts = {h.addr: h.id for f in (rdr.table, rdr.backup) if f for h in f.table.hosts}
    return Pool(True, tuple((hosts[a], a) for a in addrs), backup)


def rules_of(cmds: list[dict], chain: str | None = None) -> list[list[dict]]:
    return [c["add"]["rule"]["expr"] for c in cmds
            if "add" in c and "rule" in c["add"]
            and (chain is None or c["add"]["rule"]["chain"] == chain)]


def stmt(expr: list[dict], kind: str):
    return next((s[kind] for s in expr if isinstance(s, dict) and kind in s), None)


def matches(expr: list[dict]) -> list[tuple]:
    return [(json.dumps(s["match"]["left"], sort_keys=True), s["match"]["right"])
            for s in expr if "match" in s]


DADDR = json.dumps({"payload": {"protocol": "ip", "field": "daddr"}}, sort_keys=True)
TCP_DPORT = json.dumps({"payload": {"protocol": "tcp", "field": "dport"}}, sort_keys=True)
UDP_DPORT = json.dumps({"payload": {"protocol": "udp", "field": "dport"}}, sort_keys=True)
IIF = json.dumps({"meta": {"key": "iifname"}}, sort_keys=True)


# -- helpers ---------------------------------------------------------------------------

def test_names_use_ids():
    r = one("listen on 192.0.2.1 port 80\nforward to <web> check tcp")
    assert (F.chain_name(r), F.sticky_chain_name(r), F.counter_name(r)) == \
        ("rdr_1", "rdr_1_sticky", "rdr_1")
    assert F.hosts_set_name(r, False) == "rdr_1_hosts" and F.hosts_set_name(r, True) == "rdr_1_hosts6"
    assert F.sticky_set_name(r, 7) == "rdr_1_sticky_7"
    assert F.timeout_name(r, False) == "rdr_1_tcp4" and F.timeout_name(r, True) == "rdr_1_tcp6"


@pytest.mark.parametrize("tag,mark", [("16", 16), ("0x10", 16), ("1", 1)])
def test_numeric_pftag_is_the_mark(tag, mark):
    assert F.tag_mark(tag) == mark


def test_named_pftag_is_a_stable_nonzero_mark():
    m = F.tag_mark("REDIRECTED")
    assert m == F.tag_mark("REDIRECTED") and 0 < m < 2 ** 31 and m != F.tag_mark("OTHER")
    assert F.tag_mark("0") > 0           # 0 is "no mark": hashed instead


def test_hash_seed_is_the_first_32_bits_of_the_key():
    assert F.hash_seed(bytes.fromhex("0102030405060708090a0b0c0d0e0f10")) == 0x01020304
    assert F.hash_seed(None) == 0


@pytest.mark.parametrize("listen,forward,port", [
    ("port 80", "", 80),                              # forward port = the listen port
    ("port 80", "port 8080", 8080),
    ("port 8000:8010", "", None),                     # range: keep the original port
    ("port 8000:8010", "port 9000", 9000),            # range to one port
])
def test_target_port(listen, forward, port):
    r = one(f"listen on 192.0.2.1 {listen}\nforward to <web> {forward} check tcp")
    assert F.target_port(r, r.listens[0]) == port


def test_listen_match_tcp_udp_range_interface():
    r = one("listen on 192.0.2.1 port 80 interface eth1\n"
            "listen on 192.0.2.2 udp port 5000:5010\nforward to <web> port 53 check tcp")
    assert matches(F.listen_match(r.listens[0])) == [(IIF, "eth1"), (DADDR, "192.0.2.1"),
                                                     (TCP_DPORT, 80)]
    assert matches(F.listen_match(r.listens[1])) == [(DADDR, "192.0.2.2"),
                                                     (UDP_DPORT, {"range": [5000, 5010]})]


def test_listen_match_ipv6_and_other_protocols():
    r = one('listen on 2001:db8::1 port 80\nlisten on 192.0.2.1 "sctp" port 9\n'
            "forward to <web> port 80 check tcp")
    ((left, right), _) = matches(F.listen_match(r.listens[0]))[:2]
    assert json.loads(left) == {"payload": {"protocol": "ip6", "field": "daddr"}}
    assert right == "2001:db8::1"
    assert (json.dumps({"payload": {"protocol": "sctp", "field": "dport"}}, sort_keys=True),
            9) in matches(F.listen_match(r.listens[1]))


# -- modes -------------------------------------------------------------------------------

def dnat_of(r, p: Pool, i: int = -1) -> dict:
    return stmt(rules_of(F.redirect_rules(r, p), "rdr_1")[i], "dnat")


@pytest.mark.parametrize("mode,expr", [
    ("", {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}),
    ("mode roundrobin", {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}),
    ("mode random", {"numgen": {"mode": "random", "mod": 2, "offset": 0}}),
    ("mode least-states", {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}),
    ("mode source-hash 0x0000002a000000000000000000000000",
     {"jhash": {"mod": 2, "seed": 42, "offset": 0,
                "expr": {"payload": {"protocol": "ip", "field": "saddr"}}}}),
])
def test_mode_selector_maps_to_the_up_hosts(mode, expr):
    r = one(f"listen on 192.0.2.1 port 80\nforward to <web> port 8080 {mode} check tcp")
    d = dnat_of(r, pool(r, B1, B2))
    assert d == {"family": "ip", "port": 8080,
                 "addr": {"map": {"key": expr, "data": {"set": [[0, B1], [1, B2]]}}}}


def test_source_hash_without_key_uses_the_random_key():
    r = one("listen on 192.0.2.1 port 80\nforward to <web> mode source-hash check tcp")
    seed = dnat_of(r, pool(r, B1, B2))["addr"]["map"]["key"]["jhash"]["seed"]
    assert seed == F.hash_seed(r.key)


def test_the_map_follows_the_pool():
    r = one(f"listen on 192.0.2.1 port 80\nforward to <web> check tcp",
            tables=f"table <web> {{ {B1}, {B2}, {B3} }}\n")
    d = dnat_of(r, pool(r, B1, B3))
    assert d["addr"]["map"]["key"]["numgen"]["mod"] == 2
    assert d["addr"]["map"]["data"] == {"set": [[0, B1], [1, B3]]}
    assert dnat_of(r, pool(r, B2)) == {"family": "ip", "addr": B2, "port": 80}


def test_empty_pool_drops_and_disabled_has_no_rules():
    r = one("listen on 192.0.2.1 port 80\nforward to <web> check tcp")
    rules = rules_of(F.redirect_rules(r, Pool(True, ())))
    assert len(rules) == 2 and rules[1][-1] == {"drop": None}
    assert stmt(rules[0], "counter") == "rdr_1"
    assert F.redirect_rules(r, Pool(enabled=False)) == []


def test_range_keeps_port():
    r = one("listen on 192.0.2.1 udp port 5000:5010\nforward to <web> check tcp")
    assert "port" not in dnat_of(r, pool(r, B1))


# -- options -----------------------------------------------------------------------------

def test_accounting_rule_counter_pflog_pftag_timeout():
    r = one("listen on 192.0.2.1 port 80 pflog\nforward to <web> check tcp\n"
            "pftag WEB\nsession timeout 90")
    acct = rules_of(F.redirect_rules(r, pool(r, B1, B2)))[0]
    assert stmt(acct, "counter") == "rdr_1"
    assert stmt(acct, "log") == {"prefix": "relayd/www ", "group": 0}
    mangles = [s["mangle"] for s in acct if "mangle" in s]
    assert mangles == [{"key": {"meta": {"key": "mark"}}, "value": F.tag_mark("WEB")},
                       {"key": {"ct": {"key": "mark"}}, "value": F.tag_mark("WEB")}]
    assert stmt(acct, "ct timeout") == "rdr_1_tcp4"
    assert stmt(acct, "dnat") is None               # does not translate
    no_to = rules_of(F.redirect_rules(r, pool(r, B1), ct_timeouts=False))[0]
    assert stmt(no_to, "ct timeout") is None


def test_no_log_without_pflog_and_no_ct_timeout_for_udp():
    r = one("listen on 192.0.2.1 udp port 53\nforward to <web> check tcp")
    acct = rules_of(F.redirect_rules(r, pool(r, B1)))[0]
    assert stmt(acct, "log") is None and stmt(acct, "ct timeout") is None
    assert stmt(acct, "mangle") is None
    assert F.ct_timeout_objects(rdr_conf("listen on 192.0.2.1 udp port 53\n"
                                         "forward to <web> check tcp")) == []


def test_sticky_address_rules_and_refresh_chain():
    r = one("listen on 192.0.2.1 port 80\nforward to <web> port 8080 check tcp\n"
            "sticky-address\nsession timeout 300")
    ids = [h.id for h in r.table.table.hosts]
    cmds = F.redirect_rules(r, pool(r, B1, B2))
    main = rules_of(cmds, "rdr_1")
    assert len(main) == 4                         # accounting, sticky x2, selection
    for expr, hid, addr in zip(main[1:3], ids, (B1, B2)):
        assert (json.dumps({"payload": {"protocol": "ip", "field": "saddr"}}, sort_keys=True),
                f"@rdr_1_sticky_{hid}") in matches(expr)
        assert stmt(expr, "dnat") == {"family": "ip", "addr": addr, "port": 8080}
    refresh = rules_of(cmds, "rdr_1_sticky")
    assert len(refresh) == 2
    assert stmt(refresh[0], "set") == {"op": "update", "set": f"@rdr_1_sticky_{ids[0]}",
                                       "elem": {"payload": {"protocol": "ip", "field": "saddr"}}}
    m = dict(matches(refresh[0]))
    assert m[json.dumps({"ct": {"key": "direction"}}, sort_keys=True)] == "original"
    assert m[json.dumps({"ct": {"dir": "original", "key": "ip daddr"}}, sort_keys=True)] == \
        "192.0.2.1"
    assert m[json.dumps({"ct": {"dir": "original", "key": "proto-dst"}}, sort_keys=True)] == 80
    assert m[DADDR] == B1


def test_ipv6_listen_uses_ipv6_hosts_only():
    r = one("listen on 2001:db8::1 port 80\nlisten on 192.0.2.1 port 80\n"
            "forward to <web> check tcp",
            tables=f"table <web> {{ {B1}, 2001:db8::10 }}\n")
    cmds = F.redirect_rules(r, pool(r, B1, "2001:db8::10"))
    dnats = [stmt(e, "dnat") for e in rules_of(cmds) if stmt(e, "dnat")]
    assert dnats == [{"family": "ip6", "addr": "2001:db8::10", "port": 80},
                     {"family": "ip", "addr": B1, "port": 80}]
    assert [n for n, _, _ in F.ct_timeout_objects(conf_of(
        f"table <web> {{ {B1}, 2001:db8::10 }}\n"
        'redirect "www" {\nlisten on 2001:db8::1 port 80\nlisten on 192.0.2.1 port 80\n'
        "forward to <web> check tcp\n}\n"))] == ["rdr_1_tcp4", "rdr_1_tcp6"]


# -- updates ------------------------------------------------------------------------------

def test_update_rewrites_chain_and_refills_the_host_set():
    r = one("listen on 192.0.2.1 port 80\nforward to <web> check tcp")
    cmds = F.redirect_update(r, pool(r, B2), pool(r, B1, B2))
    assert cmds[0] == {"flush": {"chain": {"family": "inet", "table": "relayd",
                                           "name": "rdr_1"}}}
    assert {"flush": {"set": {"family": "inet", "table": "relayd",
                              "name": "rdr_1_hosts"}}} in cmds
    assert {"add": {"element": {"family": "inet", "table": "relayd", "name": "rdr_1_hosts",
                                "elem": [B2]}}} in cmds
    assert dnat_of(r, pool(r, B2)) == {"family": "ip", "addr": B2, "port": 80}


def test_update_forgets_sticky_clients_of_hosts_that_left():
    r = one("listen on 192.0.2.1 port 80\nforward to <web> check tcp\nsticky-address")
    h1, h2 = (h.id for h in r.table.table.hosts)
    cmds = F.redirect_update(r, pool(r, B2), pool(r, B1, B2))
    flushed = [c["flush"]["set"]["name"] for c in cmds if "flush" in c and "set" in c["flush"]]
    assert flushed == ["rdr_1_hosts", f"rdr_1_sticky_{h1}"]
    assert {"flush": {"chain": {"family": "inet", "table": "relayd",
                                "name": "rdr_1_sticky"}}} in cmds
    # back: nothing to forget; disabled: everyone's clients are forgotten
    cmds = F.redirect_update(r, pool(r, B1, B2), pool(r, B2))
    assert [c for c in cmds if "flush" in c and "set" in c["flush"]
            and "sticky" in c["flush"]["set"]["name"]] == []
    cmds = F.redirect_update(r, Pool(enabled=False), pool(r, B1, B2))
    assert rules_of(cmds) == []
    assert {f"rdr_1_sticky_{h1}", f"rdr_1_sticky_{h2}"} <= {
        c["flush"]["set"]["name"] for c in cmds if "flush" in c and "set" in c["flush"]}


def test_backup_hosts_and_their_sticky_sets():
    c = conf_of(f"table <web> {{ {B1} }}\ntable <sorry> {{ {B3} }}\n"
                'redirect "www" {\nlisten on 192.0.2.1 port 80\nforward to <web> check tcp\n'
                "forward to <sorry> check tcp\nsticky-address\n}\n")
    r = c.redirects[0]
    assert F.redirect_hosts(r) == [(1, B1), (2, B3)]
    sets = [x["add"]["set"]["name"] for x in F.ruleset(c, {}) if "set" in x.get("add", {})]
    assert sets == ["rdr_1_hosts", "rdr_1_sticky_1", "rdr_1_sticky_2"]
    assert dnat_of(r, pool(r, B3, backup=True)) == {"family": "ip", "addr": B3, "port": 80}


# -- the whole table ------------------------------------------------------------------------

FULL = f"""
table <web> {{ {B1}, {B2} }}
table <dns> {{ {B3} }}
redirect "www" {{
\tlisten on 192.0.2.1 port 80 pflog
\tforward to <web> port 8080 check tcp
\tmatch pftag WEB
\tsticky-address
\tsession timeout 60
}}
redirect "dns" {{
\tlisten on 192.0.2.1 udp port 53
\tforward to <dns> check tcp
\tdisable
}}
"""


def test_ruleset_replaces_the_table_in_one_transaction():
    c = conf_of(FULL)
    cmds = F.ruleset(c, {1: pool(c.redirects[0], B1, B2)})
    t = {"table": {"family": "inet", "name": "relayd"}}
    assert cmds[:3] == [{"add": t}, {"delete": t}, {"add": t}]
    json.dumps(F.document(cmds))                         # serialisable as is
    chains = {x["add"]["chain"]["name"]: x["add"]["chain"] for x in cmds
              if "chain" in x.get("add", {})}
    assert chains["prerouting"] == {"family": "inet", "table": "relayd", "name": "prerouting",
                                    "type": "nat", "hook": "prerouting", "prio": -100,
                                    "policy": "accept"}
    assert chains["mangle"]["prio"] == -150 and chains["sticky"]["prio"] == -90
    assert {"rdr_1", "rdr_1_sticky", "rdr_2"} <= set(chains)
    counters = [x["add"]["counter"]["name"] for x in cmds if "counter" in x.get("add", {})]
    assert counters == ["rdr_1", "rdr_2"]
    sticky_sets = [x["add"]["set"] for x in cmds if "set" in x.get("add", {})
                   and "sticky" in x["add"]["set"]["name"]]
    assert all(s["timeout"] == 60 and s["flags"] == ["timeout"] for s in sticky_sets)
    jumps = [stmt(e, "jump")["target"] for e in rules_of(cmds, "prerouting")]
    assert jumps == ["rdr_1", "rdr_2"]
    assert [stmt(e, "jump")["target"] for e in rules_of(cmds, "sticky")] == ["rdr_1_sticky"]
    mangle = rules_of(cmds, "mangle")
    assert mangle == [[{"match": {"op": "==", "left": {"ct": {"key": "mark"}},
                                  "right": F.tag_mark("WEB")}},
                       {"mangle": {"key": {"meta": {"key": "mark"}},
                                   "value": {"ct": {"key": "mark"}}}}]]
    assert rules_of(cmds, "rdr_2") == []                 # `disable`: no rules
    assert {"add": {"element": {"family": "inet", "table": "relayd", "name": "rdr_1_hosts",
                                "elem": [B1, B2]}}} in cmds
    assert not any("ct timeout" in x.get("add", {}) for x in cmds)


def test_ruleset_without_tags_or_sticky_has_only_the_nat_base_chain():
    c = conf_of(f"table <web> {{ {B1} }}\n"
                'redirect "www" {\nlisten on 192.0.2.1 port 80\nforward to <web> check tcp\n}\n')
    cmds = F.ruleset(c, {}, reset=False)
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": "relayd"}}}
    chains = [x["add"]["chain"]["name"] for x in cmds if "chain" in x.get("add", {})]
    assert chains == ["prerouting", "rdr_1"]
    # no pool given: enabled and empty until hce reports
    assert rules_of(cmds, "rdr_1")[-1][-1] == {"drop": None}


def test_ct_timeout_objects_json_and_text():
    c = conf_of(FULL)
    assert F.ct_timeout_objects(c) == [("rdr_1_tcp4", "ip", 60)]
    assert F.ct_timeouts_text(c) == ("add ct timeout inet relayd rdr_1_tcp4 { protocol tcp; "
                                     "l3proto ip; policy = { established: 60 }; }\n")
    cmds = F.ruleset(c, {}, timeout_objects=True)
    assert {"add": {"ct timeout": {"family": "inet", "table": "relayd", "name": "rdr_1_tcp4",
                                   "protocol": "tcp", "l3proto": "ip",
                                   "policy": {"established": 60}}}} in cmds
    assert not any("ct timeout" in x.get("add", {})
                   for x in F.ruleset(c, {}, timeout_objects=True, ct_timeouts=False))


def test_table_delete_never_fails_on_a_missing_table():
    t = {"table": {"family": "inet", "name": "relayd"}}
    assert F.table_delete() == [{"add": t}, {"delete": t}]


def test_counters_from_listing_and_describe():
    listing = {"nftables": [{"metainfo": {}},
                            {"counter": {"family": "inet", "name": "rdr_1", "table": "relayd",
                                         "packets": 7, "bytes": 420}},
                            {"counter": {"family": "inet", "name": "x", "table": "other",
                                         "packets": 1}}]}
    assert F.counters_from_listing(listing) == {"rdr_1": 7}
    r = one("listen on 192.0.2.1 port 80\nforward to <web> check tcp")
    cmd = F.redirect_rules(r, pool(r, B1))[1]
    assert F.describe(cmd) == "add rule inet relayd rdr_1 (redirect www)"
    assert F.describe(F.table_delete()[1]) == "delete table inet relayd"
