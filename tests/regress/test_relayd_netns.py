"""relayd redirections (nftables) and routers (netlink), black-box, in network
namespaces the test makes (R31-R37, R83-R85, K03, K05, K09).

Topology (addresses 10.231.x.y exist only inside these namespaces):

    client ns  c0 10.231.1.2, .3 ---- r0 10.231.1.1   relayd ns
                                      r1 10.231.2.1 ---- b0 10.231.2.2   backend ns 1
                                      r2 10.231.3.1 ---- b0 10.231.3.2   backend ns 2

The virtual address 10.231.100.1 is routed by the client to relayd's
namespace, which forwards (ip_forward=1 there only).  relayd runs inside
its namespace with `ip netns exec`; each backend namespace runs small
Python servers (web on tcp 8080 + tcp/udp 5353, gateway stub on tcp 7000)
the test kills and restarts to flip health checks.  A client helper in the
client namespace makes the connections.  Every process is stopped by pid
and every namespace deleted when the module ends, even on failure; the
host's own nftables and routes are never touched (nft and ip run inside
the namespaces).

Run alone: `pytest -m netns`.  Needs root, ip(8) and nft(8).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import REPO, sh

pytestmark = [
    pytest.mark.netns, pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(not (shutil.which("ip") and shutil.which("nft")),
                       reason="needs ip(8) and nft(8)"),
]

PY = sys.executable
VIP = "10.231.100.1"
B1, B2 = "10.231.2.2", "10.231.3.2"
CLIENT1, CLIENT2 = "10.231.1.2", "10.231.1.3"
ROUTE = "10.231.200.0/24"
STALE = "10.231.201.0/24"
RTABLE = 42
INTERVAL = 1          # relayd `interval`: state flips within ~2 s
NATLOOK_PORT, TPROXY_PORT, TRANSP_PORT, PLAIN_PORT = 9101, 9102, 9103, 9104
# What a firewall in front of a transparent relayd does, in relayd's namespace
# (a table of the test's own): the client's connections to b1:8080 are
# REDIRECTed to relay "natlook", those to b2:8080 go to relay "tproxy" by
# TPROXY, and what belongs to a transparent socket (relay "transp"'s
# connections from the client's address) is marked; mark 1 has a policy
# route that delivers it locally.
INTERCEPT = f"""
table ip tdmtest {{
    chain nat {{
        type nat hook prerouting priority -100;
        iifname "r0" ip daddr {B1} tcp dport 8080 counter redirect to :{NATLOOK_PORT}
    }}
    chain divert {{
        type filter hook prerouting priority -150;
        meta l4proto tcp socket transparent 1 meta mark set 1 accept
        iifname "r0" ip daddr {B2} tcp dport 8080 counter tproxy to 10.231.1.1:{TPROXY_PORT} meta mark set 1 accept
    }}
}}
"""

SERVER = r'''
import socket, sys, threading
name = sys.argv[1]
def tcp(port, peer=False):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, a = s.accept()
        threading.Thread(target=serve, args=(c, a[0] if peer else name), daemon=True).start()
def serve(c, hello):
    try:
        c.sendall(hello.encode() + b"\n")
        while True:
            d = c.recv(4096)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    finally:
        c.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        d, a = s.recvfrom(4096)
        s.sendto(name.encode() + b" " + d, a)
for spec in sys.argv[2:]:
    kind, port = spec.split(":")       # tcp, udp, or peer: tcp that says who called
    threading.Thread(target=udp if kind == "udp" else tcp,
                     args=(int(port),) + ((True,) if kind == "peer" else ()),
                     daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

CLIENT = r'''
import json, socket, sys
keep = {}
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    try:
        if op == "conn":
            s = socket.create_connection((req["addr"], req["port"]), timeout=3,
                                         source_address=(req.get("src") or "", 0))
            f = s.makefile("rb")
            name = f.readline().decode().strip()
            if req.get("keep"):
                keep[req["keep"]] = (s, f)
            else:
                f.close()       # the file holds the socket open too
                s.close()
            out = {"name": name}
        elif op == "echo":
            s, f = keep[req["id"]]
            s.sendall(req["data"].encode() + b"\n")
            out = {"data": f.readline().decode().strip()}
        elif op == "close":
            s, f = keep.pop(req["id"])
            f.close()
            s.close()
            out = {}
        elif op == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.sendto(req["data"].encode(), (req["addr"], req["port"]))
            out = {"data": s.recvfrom(4096)[0].decode()}
            s.close()
    except (OSError, KeyError) as e:
        out = {"error": repr(e)}
    print(json.dumps(out), flush=True)
'''


class Net:
    """The namespaces, links, backends, client helper and relayd of one module."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tag = f"tdm-{os.getpid()}"
        self.c, self.r, self.b1, self.b2 = (f"{tag}-{n}" for n in ("c", "r", "b1", "b2"))
        self.namespaces: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.relayd: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        (tmp / "server.py").write_text(SERVER)
        (tmp / "client.py").write_text(CLIENT)
        self.sock = str(tmp / "relayd.sock")
        self.demote_dir = tmp / "demote"
        self.log = tmp / "relayd.log"

    # -- plumbing ---------------------------------------------------------------------
    def ns(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, *cmd, check=check)

    def setup(self) -> None:
        for ns in (self.c, self.r, self.b1, self.b2):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            self.ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "c0", "netns", self.c, "type", "veth", "peer", "name", "r0",
           "netns", self.r)
        sh("ip", "link", "add", "b0", "netns", self.b1, "type", "veth", "peer", "name", "r1",
           "netns", self.r)
        sh("ip", "link", "add", "b0", "netns", self.b2, "type", "veth", "peer", "name", "r2",
           "netns", self.r)
        for ns, dev, addrs in ((self.c, "c0", (CLIENT1 + "/24", CLIENT2 + "/24")),
                               (self.r, "r0", ("10.231.1.1/24",)),
                               (self.r, "r1", ("10.231.2.1/24",)),
                               (self.r, "r2", ("10.231.3.1/24",)),
                               (self.b1, "b0", (B1 + "/24",)),
                               (self.b2, "b0", (B2 + "/24",))):
            for a in addrs:
                self.ns(ns, "ip", "addr", "add", a, "dev", dev)
            self.ns(ns, "ip", "link", "set", dev, "up")
        self.ns(self.c, "ip", "route", "add", "default", "via", "10.231.1.1")
        self.ns(self.b1, "ip", "route", "add", "default", "via", "10.231.2.1")
        self.ns(self.b2, "ip", "route", "add", "default", "via", "10.231.3.1")
        self.ns(self.r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for name in ("web1", "web2", "gw1", "gw2"):
            self.start_backend(name)
        self.client = subprocess.Popen(["ip", "netns", "exec", self.c, PY, "-u",
                                        str(self.tmp / "client.py")],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)

    def start_backend(self, name: str) -> None:
        """web1/web2: tcp 8080 + tcp/udp 5353 named b1/b2; gw1/gw2: tcp 7000."""
        ns = self.b1 if name.endswith("1") else self.b2
        label = "b1" if name.endswith("1") else "b2"
        specs = (["tcp:8080", "tcp:5353", "udp:5353", "peer:8081"] if name.startswith("web")
                 else ["tcp:7000"])
        p = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-u", str(self.tmp / "server.py"),
                              label, *specs], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        self.procs[name] = p

    def kill_backend(self, name: str) -> None:
        p = self.procs.pop(name)
        p.kill()
        p.wait(10)

    def start_relayd(self, conf: str) -> None:
        path = self.tmp / "relayd.conf"
        path.write_text(conf)
        env = dict(os.environ, RELAYD_DEMOTE_DIR=str(self.demote_dir))
        self.logf = open(self.log, "wb")
        self.relayd = subprocess.Popen(["ip", "netns", "exec", self.r, PY, "-m", "relayd",
                                        "-d", "-f", str(path)], cwd=REPO, env=env,
                                       stdout=self.logf, stderr=subprocess.STDOUT)

    def stop_relayd(self) -> int | None:
        if self.relayd is None:
            return None
        if self.relayd.poll() is None:
            self.relayd.send_signal(signal.SIGTERM)
            try:
                self.relayd.wait(20)
            except subprocess.TimeoutExpired:
                self.relayd.kill()
                self.relayd.wait()
        self.logf.close()
        rc, self.relayd = self.relayd.returncode, None
        return rc

    def teardown(self) -> None:
        try:
            self.stop_relayd()
        finally:
            procs = list(self.procs.values()) + ([self.client] if self.client else [])
            for p in procs:
                if p.poll() is None:
                    p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            for ns in self.namespaces:
                sh("ip", "netns", "del", ns, check=False)

    # -- probes ---------------------------------------------------------------------------
    def call(self, **req) -> dict:
        self.client.stdin.write(json.dumps(req) + "\n")
        self.client.stdin.flush()
        return json.loads(self.client.stdout.readline())

    def conn(self, port: int, src: str | None = None, keep: str | None = None) -> str:
        out = self.call(op="conn", addr=VIP, port=port, src=src, keep=keep)
        return out.get("name") or out["error"]

    def nft_table(self) -> list[dict] | None:
        r = self.ns(self.r, "nft", "-j", "list", "table", "inet", "relayd", check=False)
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)["nftables"]

    def nft_chain_text(self, chain: str) -> str:
        return self.ns(self.r, "nft", "list", "chain", "inet", "relayd", chain,
                       check=False).stdout

    def set_elems(self, name: str) -> list:
        for obj in self.nft_table() or []:
            s = obj.get("set")
            if s and s["name"] == name:      # dynamic entries: {"elem": {"val": ...}}
                return sorted(e["elem"]["val"] if isinstance(e, dict) else e
                              for e in s.get("elem", []))
        raise KeyError(name)

    def routes(self) -> str:
        return self.ns(self.r, "ip", "route", "show", "table", str(RTABLE)).stdout

    def ctl(self, *args: str) -> str:
        r = sh(PY, "-m", "relayctl", "-s", self.sock, *args, check=False)
        return r.stdout + r.stderr

    def output(self) -> str:
        if not self.logf.closed:
            self.logf.flush()
        return self.log.read_text(errors="replace")


def wait_for(pred, what: str, net: Net, timeout: float = 10.0):
    return conftest.wait_for(pred, timeout, what, lambda: f"--- relayd log ---\n{net.output()}",
                             every=0.1)


CONF = f"""
interval {INTERVAL}
timeout 300
log state changes
log connection
socket "{{sock}}"
table <web> {{ {B1}, {B2} }}
table <gw> {{ {B1}, {B2} }}
table <web1> {{ {B1} }}
table <web2> {{ {B2} }}

redirect "www" {{
\tlisten on {VIP} port 80
\tforward to <web> port 8080 check tcp
}}
redirect "hash" {{
\tlisten on {VIP} tcp port 81
\tforward to <web> port 8080 mode source-hash check tcp
\tmatch pftag SLB
}}
redirect "sticky" {{
\tlisten on {VIP} port 82 pflog
\tforward to <web> port 8080 mode random check tcp
\tsticky-address
\tsession timeout 120
}}
redirect "dns" {{
\tlisten on {VIP} udp port 53
\tforward to <web> port 5353 check tcp demote tdmcarp
}}
redirect "bak" {{
\tlisten on {VIP} port 83
\tforward to <web1> port 8080 check tcp
\tforward to <web2> port 8080 check tcp
}}
relay "natlook" {{
\tlisten on 10.231.1.1 port {NATLOOK_PORT}
\tforward to nat lookup
\tforward to {B2} port 8080
}}
relay "transp" {{
\tlisten on 10.231.1.1 port {TRANSP_PORT}
\ttransparent forward to {B1} port 8081
}}
relay "plain" {{
\tlisten on 10.231.1.1 port {PLAIN_PORT}
\tforward to {B1} port 8081
}}
relay "tproxy" {{
\tlisten on 10.231.1.1 port {TPROXY_PORT}
\tforward to destination
}}
router "uplink" {{
\troute {ROUTE}
\tforward to <gw> port 7000 check tcp
\trtable {RTABLE}
\trtlabel "wan"
}}
"""


def both_up(net: Net) -> bool:
    try:
        return (net.set_elems("rdr_1_hosts") == [B1, B2]
                and net.set_elems("rdr_4_hosts") == [B1, B2]
                and net.set_elems("rdr_5_hosts") == [B1]
                and f"nexthop via {B1}" in net.routes() and f"nexthop via {B2}" in net.routes())
    except KeyError:
        return False


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = Net(tmp_path_factory.mktemp("netns"))
    try:
        n.setup()
        # What a killed relayd would leave: relayd replaces both at start.
        n.ns(n.r, "nft", "add table inet relayd; add chain inet relayd stale")
        n.ns(n.r, "ip", "route", "add", STALE, "via", B1, "table", str(RTABLE),
             "proto", "245")
        (n.tmp / "intercept.nft").write_text(INTERCEPT)
        n.ns(n.r, "nft", "-f", str(n.tmp / "intercept.nft"))
        n.ns(n.r, "ip", "rule", "add", "fwmark", "1", "lookup", "100")
        n.ns(n.r, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        n.start_relayd(CONF.replace("{sock}", n.sock))
        wait_for(lambda: both_up(n), "both backends and gateways up", n, 20)
        yield n
    finally:
        n.teardown()
    r = sh("ip", "netns", "list")
    assert not any(ns in r.stdout for ns in n.namespaces), r.stdout


def restore(net: Net, *names: str) -> None:
    """Restart killed backends and wait until relayd has them again."""
    for name in names:
        if name not in net.procs:
            net.start_backend(name)
    wait_for(lambda: both_up(net), "backends back up", net, 15)


# -- the ruleset ------------------------------------------------------------------------

def test_nft_table_matches_the_config(net):
    objs = net.nft_table()
    chains = {o["chain"]["name"]: o["chain"] for o in objs if "chain" in o}
    assert chains["prerouting"]["type"] == "nat" and chains["prerouting"]["hook"] == "prerouting"
    assert chains["prerouting"]["prio"] == -100
    assert {"rdr_1", "rdr_2", "rdr_3", "rdr_4", "rdr_3_sticky", "mangle", "sticky"} <= set(chains)
    assert "stale" not in chains and STALE not in net.routes()
    sets = {o["set"]["name"]: o["set"] for o in objs if "set" in o}
    assert sets["rdr_3_sticky_1"]["timeout"] == 120          # session timeout
    counters = {o["counter"]["name"] for o in objs if "counter" in o}
    assert counters == {"rdr_1", "rdr_2", "rdr_3", "rdr_4", "rdr_5"}
    text = net.nft_chain_text("rdr_1")
    assert f"ip daddr {VIP} tcp dport 80" in text
    assert "numgen inc mod 2 map" in text and f"{B1}" in text and ":8080" in text
    assert "jhash ip saddr mod 2" in net.nft_chain_text("rdr_2")
    assert "meta mark set" in net.nft_chain_text("rdr_2")
    rdr3 = net.nft_chain_text("rdr_3")
    assert "numgen random mod 2" in rdr3 and 'log prefix "relayd/sticky " group 0' in rdr3
    assert "ct timeout set" in rdr3
    assert "udp dport 53" in net.nft_chain_text("rdr_4") and ":5353" in net.nft_chain_text("rdr_4")


# -- traffic --------------------------------------------------------------------------

def test_round_robin_reaches_both_backends(net):
    names = [net.conn(80) for _ in range(6)]
    assert set(names) == {"b1", "b2"}, names
    assert all(a != b for a, b in zip(names, names[1:])), names       # alternating


def test_source_hash_is_stable_per_client(net):
    for src in (CLIENT1, CLIENT2):
        names = {net.conn(81, src=src) for _ in range(5)}
        assert len(names) == 1 and names <= {"b1", "b2"}, (src, names)


def test_sticky_address(net):
    for src in (CLIENT1, CLIENT2):
        first = net.conn(82, src=src)
        assert first in ("b1", "b2")
        assert {net.conn(82, src=src) for _ in range(5)} == {first}
    elems = net.set_elems("rdr_3_sticky_1") + net.set_elems("rdr_3_sticky_2")
    assert sorted(elems) == [CLIENT1, CLIENT2], elems


def _session_line(net: Net, relay: str, backend: str) -> str:
    return wait_for(lambda: next((line for line in net.output().splitlines()
                                  if line.startswith(f"relay {relay}, session ")
                                  and f" -> {backend}:8080, " in line), None),
                    f"relay {relay}'s session line", net)


def test_nat_lookup_connects_to_the_original_destination(net):
    """R46: a REDIRECTed connection to b1:8080 reaches b1 through relay
    "natlook", which found b1 with SO_ORIGINAL_DST (its fallback is b2)."""
    out = net.call(op="conn", addr=B1, port=8080, src=CLIENT1)
    assert out.get("name") == "b1", out
    line = _session_line(net, "natlook", B1)
    assert f", {CLIENT1} -> {B1}:8080, " in line, line


def test_nat_lookup_falls_back_without_nat(net):
    """A connection straight to the relay has no original destination: the
    relay's other forward (b2) takes it."""
    out = net.call(op="conn", addr="10.231.1.1", port=NATLOOK_PORT, src=CLIENT2)
    assert out.get("name") == "b2", out
    line = _session_line(net, "natlook", B2)
    assert f", {CLIENT2} -> {B2}:8080, " in line, line


def test_forward_to_destination_with_tproxy(net):
    """R45: a connection to b2:8080 diverted by TPROXY is accepted by relay
    "tproxy" (IP_TRANSPARENT listener) and forwarded to where it was going."""
    out = net.call(op="conn", addr=B2, port=8080, src=CLIENT1)
    assert out.get("name") == "b2", (out, net.output()[-3000:])
    line = _session_line(net, "tproxy", B2)
    assert f", {CLIENT1} -> {B2}:8080, " in line, line


def test_transparent_forward_connects_from_the_client_address(net):
    """R44: the backend sees the client's address, not the relay's."""
    assert net.call(op="conn", addr="10.231.1.1", port=PLAIN_PORT, src=CLIENT1) == \
        {"name": "10.231.2.1"}                       # a plain relay: its own address
    out = net.call(op="conn", addr="10.231.1.1", port=TRANSP_PORT, src=CLIENT2)
    assert out == {"name": CLIENT2}, (out, net.output()[-3000:])
    line = wait_for(lambda: next((ln for ln in net.output().splitlines()
                                  if ln.startswith("relay transp, session ")), None),
                    "relay transp's session line", net)
    assert f", {CLIENT2} -> {B1}:8081, done" in line, line


def test_udp_redirect(net):
    seen = set()
    for i in range(4):
        out = net.call(op="udp", addr=VIP, port=53, data=f"q{i}")
        name, _, data = out["data"].partition(" ")
        assert data == f"q{i}"
        seen.add(name)
    assert seen == {"b1", "b2"}


def test_backend_down_leaves_the_map_and_other_connections_continue(net):
    kept = {}
    for i in range(4):                                 # connections to both backends
        kept[f"k{i}"] = net.conn(80, keep=f"k{i}")
    assert set(kept.values()) == {"b1", "b2"}
    net.kill_backend("web1")
    wait_for(lambda: net.set_elems("rdr_1_hosts") == [B2], "b1 out of the pool", net)
    assert B1 not in net.nft_chain_text("rdr_1")
    assert {net.conn(80) for _ in range(4)} == {"b2"}
    wait_for(lambda: net.set_elems("rdr_5_hosts") == [B2], "backup table in use", net)
    assert net.conn(83) == "b2"
    assert f"\t{'bak':<24}\t{'':<7}\tactive (using backup table)\n" in \
        net.ctl("show", "redirects")
    for k, name in kept.items():
        if name == "b2":
            assert net.call(op="echo", id=k, data=f"still {k}") == {"data": f"still {k}"}
        net.call(op="close", id=k)
    restore(net, "web1")
    assert {net.conn(80) for _ in range(4)} == {"b1", "b2"}
    assert net.conn(83) == "b1"


def test_all_down_drops_and_demotes(net):
    net.kill_backend("web1")
    net.kill_backend("web2")
    try:
        wait_for(lambda: "drop" in net.nft_chain_text("rdr_4"), "empty pool", net)
        wait_for(lambda: (net.demote_dir / "tdmcarp").exists()
                 and (net.demote_dir / "tdmcarp").read_text() == "1\n", "demote file 1", net)
        out = net.ctl("show", "redirects")
        assert f"\t{'www':<24}\t{'':<7}\tdown\n" in out, out
        assert ("carp_demote_set: incremented the demote state of group 'tdmcarp' "
                "(demote counter 0 -> 1)") in net.output()
    finally:
        restore(net, "web1", "web2")
    wait_for(lambda: (net.demote_dir / "tdmcarp").read_text() == "0\n", "undemoted", net)


# -- routers ---------------------------------------------------------------------------

def test_router_routes_follow_the_gateways(net):
    text = net.routes()
    assert text.startswith(ROUTE) and "proto 245" in text and "metric 8" in text, text
    assert f"nexthop via {B1}" in text and f"nexthop via {B2}" in text, text
    net.kill_backend("gw1")
    wait_for(lambda: f"{ROUTE} via {B2}" in net.routes() and B1 not in net.routes(),
             "gateway 1 removed", net)
    net.kill_backend("gw2")
    wait_for(lambda: ROUTE not in net.routes(), "route removed", net)
    restore(net, "gw1", "gw2")
    assert "rtlabel has no Linux equivalent" in net.output()


# -- relayctl -----------------------------------------------------------------------------

def test_relayctl_show_redirects_and_routers(net):
    net.conn(80)
    out = net.ctl("show", "redirects")
    lines = out.splitlines()
    assert lines[0].split() == ["Id", "Type", "Name", "Avlblty", "Status"]
    for rid, name in ((1, "www"), (2, "hash"), (3, "sticky"), (4, "dns"), (5, "bak")):
        assert any(l.split("\t")[0].strip() == str(rid) and l.split()[2] == name
                   and l.endswith("\tactive") for l in lines), out
    assert any(l.strip().startswith("total:") and l.strip().endswith("sessions")
               for l in lines), out
    out = net.ctl("show", "routers")
    assert "uplink" in out and f"rtable: {RTABLE}" in out and "rtlabel: wan" in out
    assert f"route: {ROUTE}" in out


def test_redirect_disable_enable(net):
    assert net.ctl("redirect", "disable", "www") == "command succeeded\n"
    wait_for(lambda: "dnat" not in net.nft_chain_text("rdr_1"), "rules removed", net)
    assert "disabled" in net.ctl("show", "redirects").split("www")[1].splitlines()[0]
    assert "error" in net.call(op="conn", addr=VIP, port=80)     # nothing maps the VIP now
    assert net.ctl("redirect", "enable", "1") == "command succeeded\n"
    wait_for(lambda: "dnat" in net.nft_chain_text("rdr_1") and both_up(net),
             "rules back", net, 15)
    assert {net.conn(80) for _ in range(4)} == {"b1", "b2"}


# -- shutdown (last: stops relayd) ------------------------------------------------------

def test_zz_shutdown_removes_table_and_routes(net):
    assert net.stop_relayd() == 0
    assert net.nft_table() is None
    assert ROUTE not in net.routes()
    assert (net.demote_dir / "tdmcarp").read_text() == "0\n"


# -- tests with a namespace of their own -------------------------------------------------

class Scratch:
    """One namespace for one test, deleted (after its processes) at the end."""

    def __init__(self, suffix: str) -> None:
        self.name = f"tdm-{os.getpid()}-{suffix}"
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Scratch":
        sh("ip", "netns", "add", self.name)
        sh("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        sh("ip", "netns", "del", self.name, check=False)
        assert self.name not in sh("ip", "netns", "list").stdout

    def run(self, *cmd: str, input: str | None = None, check: bool = False):
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], input=input,
                              capture_output=True, text=True, timeout=30, check=check)


VARIANTS = """
table <v4> { 10.231.2.2, 10.231.3.2, 10.231.4.2 }
table <v6> { fd00:231::2, fd00:231::3 }
table <mix> { 10.231.5.2, fd00:231::5 }
redirect "v6" {
\tlisten on fd00:231::100 port 443 interface lo pflog
\tforward to <v6> port 8443 mode source-hash "key" check tcp
\tsticky-address
\tpftag 0x20
}
redirect "range" {
\tlisten on 10.231.100.2 udp port 6000:6010
\tforward to <v4> mode random check icmp
\tmatch pftag RANGE
}
redirect "least" {
\tlisten on 10.231.100.3 tcp port 25
\tlisten on fd00:231::103 tcp port 25
\tforward to <mix> port 2525 mode least-states check tcp
\tsession timeout 30
}
redirect "sctp" {
\tlisten on 10.231.100.4 "sctp" port 9
\tforward to <v4> port 9 check icmp
}
"""


def test_every_rule_shape_loads_into_a_kernel(tmp_path):
    """The builder's variants (IPv6, ranges, modes, sticky, tags, pflog,
    mixed families, updates) go through nft into a scratch namespace."""
    from relayd import pfe_filter as F
    from relayd.parse import load
    conf = load(str(tmp_path / "v.conf"), text=VARIANTS)
    pools = {}
    for r in conf.redirects:
        hosts = tuple((h.id, h.addr) for h in r.table.table.hosts)
        pools[r.id] = F.Pool(not r.disabled, hosts)
    with Scratch("v") as ns:
        r = ns.run("nft", "-f", "-", input="add table inet relayd\n" + F.ct_timeouts_text(conf))
        assert r.returncode == 0, r.stderr
        doc = json.dumps(F.document(F.ruleset(conf, pools, reset=False)))
        r = ns.run("nft", "-j", "-f", "-", input=doc)
        assert r.returncode == 0, r.stderr
        text = ns.run("nft", "list", "table", "inet", "relayd").stdout
        assert "ip6 daddr fd00:231::100 tcp dport 443" in text
        assert "jhash ip6 saddr mod 2" in text and "ip6 saddr @rdr_1_sticky_1" in text
        assert "update @rdr_1_sticky_2 { ip6 saddr }" in text
        assert "sctp dport 9" in text and "dnat ip6 to [fd00:231::5]:2525" in text
        assert "udp dport 6000-6010" in text and "numgen random mod 3" in text
        assert "ct timeout set \"rdr_3_tcp6\"" in text and 'iifname "lo"' in text
        assert "meta mark set 0x00000020" in text
        # pool changes for every redirect in one transaction, then the whole
        # table replaced again
        upd = []
        for r_ in conf.redirects:
            upd += F.redirect_update(r_, F.Pool(True, pools[r_.id].hosts[:1]), pools[r_.id])
        r = ns.run("nft", "-j", "-f", "-", input=json.dumps(F.document(upd)))
        assert r.returncode == 0, r.stderr
        r = ns.run("nft", "-j", "-f", "-",
                   input=json.dumps(F.document(F.ruleset(conf, pools, ct_timeouts=False))))
        assert r.returncode == 0, r.stderr
        r = ns.run("nft", "-j", "-f", "-", input=json.dumps(F.document(F.table_delete())))
        assert r.returncode == 0 and ns.run("nft", "list", "tables").stdout == ""


def test_without_cap_net_admin_relays_still_run(tmp_path):
    (tmp_path / "server.py").write_text(SERVER)
    conf = tmp_path / "relayd.conf"
    conf.write_text(f"""
socket "{tmp_path / 'relayd.sock'}"
table <web> {{ 127.0.0.1 }}
redirect "www" {{
\tlisten on 10.231.100.1 port 80
\tforward to <web> port 8080 check tcp
}}
relay "r" {{
\tlisten on 127.0.0.1 port 9000
\tforward to 127.0.0.1 port 8080
}}
""")
    log_path = tmp_path / "relayd.log"
    with Scratch("nocap") as ns, open(log_path, "wb") as logf:
        srv = subprocess.Popen(["ip", "netns", "exec", ns.name, PY, "-u",
                                str(tmp_path / "server.py"), "bx", "tcp:8080"],
                               stdout=subprocess.PIPE, text=True)
        ns.procs.append(srv)
        assert srv.stdout.readline().strip() == "ready"
        d = subprocess.Popen(["ip", "netns", "exec", ns.name, "setpriv", "--bounding-set",
                              "-net_admin", "--inh-caps", "-net_admin", PY, "-m", "relayd",
                              "-d", "-f", str(conf)], cwd=REPO, stdout=logf,
                             stderr=subprocess.STDOUT)
        ns.procs.append(d)
        deadline = time.monotonic() + 15
        out = ""
        while time.monotonic() < deadline:
            r = ns.run(PY, "-c", "import socket; s = socket.create_connection(('127.0.0.1', "
                       "9000), timeout=2); print(s.makefile().readline().strip())")
            out = r.stdout.strip()
            if out == "bx":
                break
            time.sleep(0.2)
        assert out == "bx", log_path.read_text()
        assert ns.run("nft", "list", "tables").stdout == ""
        d.send_signal(signal.SIGTERM)
        assert d.wait(20) == 0
    text = log_path.read_text()
    assert text.count("pfe_init: no CAP_NET_ADMIN: redirections and routers are not "
                      "installed, running the relays only") == 1, text
