"""relayd.balance: host selection per mode, SipHash-2-4, fallback to up hosts."""

from __future__ import annotations

import struct
from collections import Counter

import pytest

from relayd.balance import MAX_HASH_RETRIES, RoundRobin, addr_bytes, pick, siphash24

HOSTS = ["h1", "h2", "h3"]
ALL_UP = [True, True, True]
KEY = bytes(range(16))
CLIENTS = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(300)]


# -- SipHash-2-4 (reference vectors, Aumasson & Bernstein, vectors.h) ------------

@pytest.mark.parametrize("n,expected", [
    (0, 0x726FDB47DD0E0E31),
    (1, 0x74F839C593DC67FD),
    (8, 0x93F5F5799A932462),
    (15, 0xA129CA6149BE45E5),
])
def test_siphash_reference_vectors(n, expected):
    assert siphash24(KEY, bytes(range(n))) == expected


def test_siphash_depends_on_key():
    assert siphash24(KEY, b"abc") != siphash24(bytes(16), b"abc")


def test_addr_bytes():
    assert addr_bytes("10.0.0.1") == bytes([10, 0, 0, 1])
    assert len(addr_bytes("2001:db8::1")) == 16
    assert addr_bytes("::ffff:10.0.0.1") == addr_bytes("::ffff:10.0.0.1")


# -- roundrobin -----------------------------------------------------------------

def test_roundrobin_even_and_in_order():
    rr = RoundRobin()
    seen = [pick("roundrobin", HOSTS, ALL_UP, rr) for _ in range(300)]
    assert seen[:4] == ["h1", "h2", "h3", "h1"]
    assert Counter(seen) == {"h1": 100, "h2": 100, "h3": 100}


def test_roundrobin_skips_down_hosts():
    rr = RoundRobin()
    seen = [pick("roundrobin", HOSTS, [True, False, True], rr) for _ in range(6)]
    assert seen == ["h1", "h3"] * 3


def test_roundrobin_positions_are_independent():
    a, b = RoundRobin(), RoundRobin()
    assert pick("roundrobin", HOSTS, ALL_UP, a) == "h1"
    assert pick("roundrobin", HOSTS, ALL_UP, a) == "h2"
    assert pick("roundrobin", HOSTS, ALL_UP, b) == "h1"


def test_roundrobin_host_coming_back():
    rr = RoundRobin()
    assert pick("roundrobin", HOSTS, [False, False, True], rr) == "h3"
    assert pick("roundrobin", HOSTS, ALL_UP, rr) == "h1"


# -- random -----------------------------------------------------------------------

def test_random_touches_all_hosts():
    seen = Counter(pick("random", HOSTS, ALL_UP, RoundRobin()) for _ in range(600))
    assert set(seen) == set(HOSTS)
    assert min(seen.values()) > 100


def test_random_only_up_hosts():
    seen = {pick("random", HOSTS, [False, True, False], RoundRobin()) for _ in range(100)}
    assert seen == {"h2"}


# -- keyed modes -----------------------------------------------------------------------

def _pick(mode, client="10.0.0.1", up=ALL_UP, key=KEY, **kw):
    kw.setdefault("relay_addr", "192.0.2.1")
    kw.setdefault("relay_port", 80)
    return pick(mode, HOSTS, up, RoundRobin(), key=key, client=client, **kw)


@pytest.mark.parametrize("mode", ["source-hash", "loadbalance"])
def test_client_hash_stable_and_spread(mode):
    first = {c: _pick(mode, c) for c in CLIENTS}
    assert first == {c: _pick(mode, c) for c in CLIENTS}
    spread = Counter(first.values())
    assert set(spread) == set(HOSTS) and min(spread.values()) > 50


def test_source_hash_is_the_siphash_of_the_client_address():
    for c in CLIENTS[:20]:
        assert _pick("source-hash", c) == HOSTS[siphash24(KEY, addr_bytes(c)) % 3]


def test_source_hash_ignores_the_relay_address():
    assert ({c: _pick("source-hash", c, relay_port=80) for c in CLIENTS}
            == {c: _pick("source-hash", c, relay_port=8080) for c in CLIENTS})


def test_loadbalance_includes_relay_address_and_port():
    data = addr_bytes("10.0.0.7") + addr_bytes("192.0.2.1") + struct.pack("!H", 80)
    assert _pick("loadbalance", "10.0.0.7") == HOSTS[siphash24(KEY, data) % 3]
    moved = sum(_pick("loadbalance", c, relay_port=80) != _pick("loadbalance", c, relay_port=81)
                for c in CLIENTS)
    assert moved > 0


def test_hash_uses_inputs_then_relay_address():
    data = b"Host: a" + addr_bytes("192.0.2.1") + struct.pack("!H", 80)
    assert _pick("hash", hash_input=b"Host: a") == HOSTS[siphash24(KEY, data) % 3]
    # the client address does not matter, the inputs do
    assert {_pick("hash", c, hash_input=b"x") for c in CLIENTS} == {_pick("hash", hash_input=b"x")}
    assert len({_pick("hash", hash_input=b"v%d" % i) for i in range(50)}) == 3


def test_keys_change_the_mapping():
    a = [_pick("source-hash", c, key=KEY) for c in CLIENTS]
    b = [_pick("source-hash", c, key=bytes(16)) for c in CLIENTS]
    assert a != b


def test_missing_key_means_zero_key():
    assert ([_pick("source-hash", c, key=None) for c in CLIENTS]
            == [_pick("source-hash", c, key=bytes(16)) for c in CLIENTS])


# -- fallback when hosts are down --------------------------------------------------------

@pytest.mark.parametrize("mode", ["source-hash", "loadbalance", "hash"])
def test_hash_modes_pick_only_up_hosts(mode):
    up = [False, True, False]
    assert {_pick(mode, c, up=up) for c in CLIENTS} == {"h2"}


def test_hash_candidates_shift_the_hash():
    """A down first choice moves the client to the host of hash >> 1."""
    for c in CLIENTS:
        h = siphash24(KEY, addr_bytes(c))
        first, second = h % 3, (h >> 1) % 3
        if first == second:
            continue
        up = [True] * 3
        up[first] = False
        assert _pick("source-hash", c, up=up) == HOSTS[second]
        return
    pytest.fail("no client with two distinct candidates")


def test_hash_falls_back_after_max_retries():
    hosts = [f"h{i}" for i in range(8)]
    up = [False] * 8
    up[5] = True
    for c in CLIENTS[:50]:
        assert pick("source-hash", hosts, up, RoundRobin(), key=KEY, client=c) == "h5"
    assert MAX_HASH_RETRIES == 5


def test_stable_clients_keep_their_host_when_another_goes_down():
    before = {c: _pick("source-hash", c) for c in CLIENTS}
    after = {c: _pick("source-hash", c, up=[True, True, False]) for c in CLIENTS}
    for c in CLIENTS:
        if before[c] != "h3":
            assert after[c] == before[c]
        else:
            assert after[c] in ("h1", "h2")


@pytest.mark.parametrize("mode", ["roundrobin", "random", "source-hash", "loadbalance", "hash"])
def test_no_host_up(mode):
    assert _pick(mode, up=[False, False, False]) is None
    assert pick(mode, [], [], RoundRobin()) is None


def test_least_states_behaves_like_roundrobin_for_relays():
    rr = RoundRobin()
    assert [pick("least-states", HOSTS, ALL_UP, rr) for _ in range(4)] == ["h1", "h2", "h3", "h1"]
