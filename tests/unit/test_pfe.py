"""relayd.pfe (with a fake nft and fake routes), relayd.pfe_route's route
planning and relayd.carp's track files: what pfe applies when hosts flip,
backup tables, enable/disable, failures keeping the previous state, demotion,
reload and shutdown.  No root, no kernel."""

from __future__ import annotations

import trio
import trio.testing

import pytest

from relayd import carp, pfe_filter, pfe_route
from relayd.parse import load
from relayd.pfe import NftError, Pfe, has_net_admin
from relayd.pfe_route import RouteKey
from shared import log

B1, B2, B3 = "10.0.0.1", "10.0.0.2", "10.0.0.3"


class FakeNft:
    binary = "nft"

    def __init__(self, version=(1, 0, 6)) -> None:
        self.applied: list[list[dict]] = []
        self.texts: list[str] = []
        self.fail: str | None = None
        self.counts: dict[str, int] = {}
        self._version = version

    def available(self) -> bool:
        return True

    async def version(self):
        return self._version

    async def apply(self, cmds):
        if self.fail:
            raise NftError(self.fail, cmds[0])
        self.applied.append(cmds)

    async def apply_text(self, text):
        self.texts.append(text)

    async def counters(self):
        return dict(self.counts)


class FakeRoutes:
    def __init__(self) -> None:
        self.table: dict[RouteKey, tuple] = {}
        self.fail = False
        self.flushed: list[set] = []

    def replace(self, key, gws):
        if self.fail:
            raise pfe_route.RouteError("Network is unreachable")
        self.table[key] = tuple(gws)

    def delete(self, key):
        self.table.pop(key, None)

    def flush(self, tables):
        self.flushed.append(tables)
        return 0


CONF = f"""
table <web> {{ {B1}, {B2} }}
table <sorry> {{ {B3} }}
table <gw> {{ {B1} priority 5, {B2}, {B3} }}
redirect "www" {{
\tlisten on 192.0.2.1 port 80
\tforward to <web> port 8080 check tcp demote grp
\tforward to <sorry> port 8080 check tcp
}}
redirect "dns" {{
\tlisten on 192.0.2.1 udp port 53
\tforward to <web> port 53 check tcp
\tdisable
}}
router "up" {{
\troute 198.51.100.0/24
\tforward to <gw> check icmp
\trtable 7
\trtlabel "x"
}}
"""


def make(tmp_path, text=CONF, **kw):
    conf = load("relayd.conf", text=text)
    nft, routes = FakeNft(**kw), FakeRoutes()
    pfe = Pfe(conf, nft=nft, routes=routes, demote=carp.Demote(str(tmp_path)), capable=True)
    return conf, pfe, nft, routes


def ids(conf, table):
    return {h.addr: h.id for i in conf.instances if i.name == table for h in i.hosts}


def run(fn):
    trio.run(fn)


@pytest.fixture(autouse=True)
def quiet_log():
    log.init(debug=True, verbose=0)


def test_has_net_admin_reads_capeff():
    assert has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not has_net_admin("CapEff:\t000001fffeffefff\n")
    assert not has_net_admin("CapEff:\t0000000000000000\n")


def test_nothing_to_do_touches_nothing(tmp_path):
    conf = load("relayd.conf", text="relay r {\n listen on 127.0.0.1 port 8080\n"
                                    " forward to 127.0.0.1 port 80\n}\n")
    nft = FakeNft()
    pfe = Pfe(conf, nft=nft, routes=FakeRoutes(), demote=carp.Demote(str(tmp_path)),
              capable=None)
    assert not Pfe.needed(conf)

    async def main():
        await pfe.start()
        await pfe.host_status(1, True)
        await pfe.stop()
    run(main)
    assert nft.applied == [] and nft.texts == [] and list(tmp_path.iterdir()) == []


def test_without_cap_net_admin(tmp_path, capsys):
    conf, pfe, nft, routes = make(tmp_path)
    pfe.capable = False

    async def main():
        await pfe.start()
        await pfe.host_status(ids(conf, "web:8080")[B1], True)
    run(main)
    err = capsys.readouterr().err
    assert err.count("no CAP_NET_ADMIN") == 1 and "running the relays only" in err
    assert nft.applied == [] and routes.table == {}
    assert [r["status"] for r in pfe.snapshot() if r["type"] == "redirect"] == ["down",
                                                                                 "disabled"]


def test_start_loads_timeouts_as_text_then_the_table(tmp_path):
    conf, pfe, nft, routes = make(tmp_path)
    run(pfe.start)
    assert nft.texts == ["add table inet relayd\ndelete table inet relayd\n"
                         "add table inet relayd\n" + pfe_filter.ct_timeouts_text(conf)]
    assert nft.applied[0][0] == {"add": {"table": {"family": "inet", "name": "relayd"}}}
    assert pfe.nft_active and routes.flushed == [{7}]
    assert (tmp_path / "grp").read_text() == "0\n"
    # newer nft: one JSON transaction with the timeout objects in it
    conf, pfe, nft, routes = make(tmp_path, version=(1, 1, 0))
    run(pfe.start)
    assert nft.texts == [] and nft.applied[0][:3] == pfe_filter.table_reset()
    assert any("ct timeout" in c.get("add", {}) for c in nft.applied[0])


def test_pool_follows_hosts_and_backup(tmp_path):
    conf, pfe, nft, routes = make(tmp_path)
    web, sorry = ids(conf, "web:8080"), ids(conf, "sorry:8080")
    www = conf.redirects[0]

    async def main():
        await pfe.start()
        assert pfe.redirect_status(www) == "down"
        n = len(nft.applied)
        await pfe.host_status(web[B1], True)
        await pfe.host_status(web[B2], True)
        assert len(nft.applied) == n + 2
        assert pfe.applied[www.id].addrs == (B1, B2)
        assert pfe.redirect_status(www) == "active"
        await pfe.host_status(web[B2], True)          # no change: no transaction
        assert len(nft.applied) == n + 2
        await pfe.host_status(sorry[B3], True)
        assert pfe.applied[www.id].addrs == (B1, B2)  # backup unused while main has hosts
        pfe.set_host(web[B1], False)
        pfe.set_host(web[B2], None)
        await pfe.sync()
        assert pfe.applied[www.id] == pfe_filter.Pool(True, ((sorry[B3], B3),), True)
        assert pfe.redirect_status(www) == "active (using backup table)"
        row = pfe.snapshot()[0]
        assert (row["type"], row["name"], row["backup"], row["down"]) == \
            ("redirect", "www", True, False)
        assert row["hosts"] == [B3]
    run(main)
    last = nft.applied[-1]
    assert last[0] == {"flush": {"chain": {"family": "inet", "table": "relayd",
                                           "name": "rdr_1"}}}


def test_nft_failure_keeps_the_previous_state(tmp_path, capsys):
    conf, pfe, nft, routes = make(tmp_path)
    web = ids(conf, "web:8080")
    www = conf.redirects[0]

    async def main():
        await pfe.start()
        await pfe.host_status(web[B1], True)
        nft.fail = "Error: Could not process rule: No such file or directory"
        await pfe.host_status(web[B2], True)
        assert pfe.applied[www.id].addrs == (B1,)
        assert pfe.redirect_status(www) == "active"
        nft.fail = None
        await pfe.sync()                                # the next change retries
        assert pfe.applied[www.id].addrs == (B1, B2)
    run(main)
    err = capsys.readouterr().err
    assert ("pfe_sync: cannot update redirect www: Error: Could not process rule: "
            "No such file or directory; keeping the previous rules") in err
    assert "pfe: failed command: flush chain inet relayd rdr_1" in err


def test_failed_table_load_leaves_redirects_down(tmp_path, capsys):
    conf, pfe, nft, routes = make(tmp_path)
    nft.fail = "Error: syntax error"

    async def main():
        await pfe.start()
        await pfe.host_status(ids(conf, "web:8080")[B1], True)
    run(main)
    assert not pfe.nft_active
    assert "pfe_init: cannot load table inet relayd" in capsys.readouterr().err
    assert pfe.redirect_status(conf.redirects[0]) == "down"


def test_redirect_enable_disable(tmp_path):
    conf, pfe, nft, routes = make(tmp_path)
    web = ids(conf, "web:53")
    dns = conf.redirects[1]

    async def main():
        await pfe.start()
        await pfe.host_status(web[B1], True)
        assert pfe.redirect_status(dns) == "disabled" and not pfe.applied[dns.id].enabled
        assert await pfe.redirect_set("dns", True)
        assert pfe.redirect_status(dns) == "active"
        rules = [c for c in nft.applied[-1] if "rule" in c.get("add", {})]
        assert rules and all(c["add"]["rule"]["chain"] == "rdr_2" for c in rules)
        assert await pfe.redirect_set(2, False)
        assert pfe.redirect_status(dns) == "disabled"
        assert not [c for c in nft.applied[-1] if "rule" in c.get("add", {})]
        assert not await pfe.redirect_set("nosuch", True)
        assert await pfe.redirect_set("2", False)        # already: nothing applied
    run(main)


def test_routes_follow_gateways(tmp_path, capsys):
    conf, pfe, nft, routes = make(tmp_path)
    gw = ids(conf, "gw:65535")
    net = "198.51.100.0/24"

    async def main():
        await pfe.start()
        assert routes.table == {}
        for a in (B1, B2, B3):
            await pfe.host_status(gw[a], True)
        assert routes.table == {RouteKey(7, net, 5): (B1,), RouteKey(7, net, 8): (B2, B3)}
        await pfe.host_status(gw[B2], False)
        assert routes.table[RouteKey(7, net, 8)] == (B3,)
        await pfe.host_status(gw[B3], False)
        assert RouteKey(7, net, 8) not in routes.table
        routes.fail = True
        await pfe.host_status(gw[B2], True)
        assert RouteKey(7, net, 8) not in pfe.routes_applied
        routes.fail = False
        await pfe.sync()
        assert routes.table[RouteKey(7, net, 8)] == (B2,)
        row = [r for r in pfe.snapshot() if r["type"] == "router"][-1]
        assert row["type"] == "router" and row["rtable"] == 7 and row["rtlabel"] == "x"
        assert row["routes"] == [["198.51.100.0", 24]]
        assert row["installed"] == [[net, 5, [B1]], [net, 8, [B2]]]
        await pfe.stop()
        assert routes.table == {}
    run(main)
    err = capsys.readouterr().err
    assert err.count("rtlabel has no Linux equivalent") == 1
    assert ("pfe_route: cannot add route 198.51.100.0/24 via 10.0.0.2 table 7 metric 8: "
            "Network is unreachable") in err


def test_desired_routes_main_table_and_disabled():
    conf = load("relayd.conf", text=f"table <gw> {{ {B1}, {B2} }}\nrouter r {{\n"
                "route 0.0.0.0/0\nroute 10.0.0.0/8\nforward to <gw> check icmp\n}\n")
    rt = conf.routers[0]
    h1, h2 = (h.id for h in rt.forward.table.hosts)
    assert pfe_route.desired_routes(rt, {h1, h2}) == {
        RouteKey(254, "0.0.0.0/0", 8): (B1, B2), RouteKey(254, "10.0.0.0/8", 8): (B1, B2)}
    assert pfe_route.desired_routes(rt, set()) == {}
    assert pfe_route.describe(RouteKey(254, "0.0.0.0/0", 8), (B1, B2)) == \
        f"0.0.0.0/0 via {B1} via {B2} table 254 metric 8"


def test_demote_when_all_hosts_down(tmp_path, capsys):
    conf, pfe, nft, routes = make(tmp_path)
    web = ids(conf, "web:8080")
    f = tmp_path / "grp"

    async def main():
        await pfe.start()
        assert f.read_text() == "0\n"
        await pfe.host_status(web[B1], False)       # B2 still unknown: demoted
        assert f.read_text() == "1\n"
        await pfe.host_status(web[B2], True)
        assert f.read_text() == "0\n"
        await pfe.host_status(web[B2], False)
        assert f.read_text() == "1\n"
        await pfe.stop()
        assert f.read_text() == "0\n"
    run(main)
    err = capsys.readouterr().err
    inc = "carp_demote_set: incremented the demote state of group 'grp' (demote counter 0 -> 1)"
    dec = "carp_demote_set: decremented the demote state of group 'grp' (demote counter 1 -> 0)"
    # Every change is logged: down, up, down again, and the undo at stop.
    assert err.count(inc) == 2 and err.count(dec) == 2, err


def test_demote_rows_in_pfe_snapshot(tmp_path):
    conf, pfe, nft, routes = make(tmp_path)
    web = ids(conf, "web:8080")

    async def main():
        await pfe.start()
        rows = [r for r in pfe.snapshot() if r["type"] == "demote"]
        assert rows == [{"type": "demote", "name": "grp", "counter": 0,
                         "file": str(tmp_path / "grp")}]
        await pfe.host_status(web[B1], False)
        assert [r["counter"] for r in pfe.snapshot() if r["type"] == "demote"] == [1]
        assert pfe.demote.levels() == {"grp": 1}
        await pfe.stop()
    run(main)


def test_carp_change_text():
    assert carp.change_text("carp", 0, None) is None           # the first 0: no change
    assert carp.change_text("carp", 1, 1) is None
    assert carp.change_text("carp", 2, None) == (
        "carp_demote_set: incremented the demote state of group 'carp' (demote counter 0 -> 2)")
    assert carp.change_text("carp", 1, 2) == (
        "carp_demote_set: decremented the demote state of group 'carp' (demote counter 2 -> 1)")


def test_carp_levels(tmp_path):
    d = carp.Demote(str(tmp_path))
    d.configure({"b", "a"})
    assert d.levels() == {"a": 0, "b": 0}                       # before any write
    d.set("a", 1, True)
    d.commit()
    assert d.levels() == {"a": 1, "b": 0}
    d.configure({"b"})                                          # a stays until written 0
    d.commit()
    assert d.levels() == {"a": 0, "b": 0}


def test_carp_counts_tables_per_group(tmp_path):
    d = carp.Demote(str(tmp_path))
    d.configure({"a"})
    assert d.commit() == [("a", 0, None, None)]
    d.set("a", 1, True)
    d.set("a", 2, True)
    assert d.commit() == [("a", 2, 0, None)] and (tmp_path / "a").read_text() == "2\n"
    d.set("a", 1, False)
    assert d.commit() == [("a", 1, 2, None)]
    assert d.commit() == []
    d.configure({"b"})                                   # a left the config: back to 0
    assert [x[:2] for x in d.commit()] == [("a", 0), ("b", 0)]
    bad = carp.Demote(str(tmp_path / "f"))
    (tmp_path / "f").write_text("not a dir")
    bad.configure({"x"})
    (_, _, _, err), = bad.commit()
    assert err.startswith("carp_demote: cannot write ")


def test_reload_carries_host_states_and_rebuilds(tmp_path):
    conf, pfe, nft, routes = make(tmp_path)
    web = ids(conf, "web:8080")
    new = load("relayd.conf", text=f"table <other> {{ 10.9.9.9 }}\n" + CONF.replace(
        'redirect "www"', 'redirect "w2" {\nlisten on 192.0.2.9 port 1\n'
        'forward to <other> port 1 check tcp\n}\nredirect "www"'))

    async def main():
        await pfe.start()
        await pfe.host_status(web[B1], True)
        await pfe.reload(new)
        nweb = ids(new, "web:8080")
        assert nweb[B1] != web[B1] and pfe.states[nweb[B1]] is True
        www = next(r for r in new.redirects if r.name == "www")
        assert pfe.applied[www.id].addrs == (B1,)
        assert nft.applied[-1][0] == {"add": {"table": {"family": "inet", "name": "relayd"}}}
        assert len(nft.texts) == 2                        # table rebuilt
        relay_only = load("relayd.conf", text="relay r {\n listen on 127.0.0.1 port 8080\n"
                                              " forward to 127.0.0.1 port 80\n}\n")
        await pfe.reload(relay_only)
        assert nft.applied[-1] == pfe_filter.table_delete() and not pfe.nft_active
        assert routes.table == {}
    run(main)


def test_stats_from_counters(tmp_path):
    conf, pfe, nft, routes = make(tmp_path)

    async def main():
        await pfe.start()
        nft.counts = {"rdr_1": 5}
        await pfe.refresh_stats()
        nft.counts = {"rdr_1": 8}
        await pfe.refresh_stats()
    run(main)
    row = pfe.snapshot()[0]
    assert row["stats"][0]["cnt"] == 8 and row["stats"][0]["interval"] == 60


def test_run_batches_notifications_and_stops(tmp_path):
    conf, pfe, nft, routes = make(tmp_path)
    web = ids(conf, "web:8080")

    async def main():
        async with trio.open_nursery() as nursery:
            p = await nursery.start(pfe.run)
            n = len(nft.applied)
            p.notify(web[B1], 1)                          # hce.HostStatus values
            p.notify(web[B2], 1)
            await trio.testing.wait_all_tasks_blocked()
            assert len(nft.applied) == n + 1              # one transaction for both
            assert pfe.applied[1].addrs == (B1, B2)
            nursery.cancel_scope.cancel()
        assert nft.applied[-1] == pfe_filter.table_delete()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
