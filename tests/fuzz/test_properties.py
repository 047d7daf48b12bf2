"""Structure-aware properties (hypothesis): valid inputs built from parts,
cut at random points, must parse to exactly those parts.

FUZZ_SCALE sets the examples per property (1000 x FUZZ_SCALE, at least
10; pytest alone runs at 0.02, `make fuzz` at 1 through tests.fuzz).
`CALLS` counts the examples run, for make fuzz's table.
"""

from __future__ import annotations

import os
import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import targets

SCALE = float(os.environ.get("FUZZ_SCALE", "0.02"))
EXAMPLES = max(10, int(1000 * SCALE))
CALLS: Counter = Counter()

fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    return targets._pieces(data, sorted({p % (len(data) + 1) for p in points}))


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
                min_size=1, max_size=12)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                max_size=20)
LE = st.sampled_from([b"\r\n", b"\n"])


# -- chunked ------------------------------------------------------------------------
@fuzz
@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
       ends=st.lists(LE, min_size=20, max_size=20), zeros=st.integers(0, 3),
       ext=st.booleans(), upper=st.booleans(), trailer=st.booleans(),
       points=st.lists(st.integers(0, 10_000), max_size=6), rest=st.binary(max_size=8))
def test_chunked_round_trip(chunks, ends, zeros, ext, upper, trailer, points, rest) -> None:
    CALLS["prop_chunked"] += 1
    parts = []
    for i, c in enumerate(chunks):
        size = "0" * zeros + (f"{len(c):X}" if upper else f"{len(c):x}")
        parts += [size.encode(), b";a=\"b c\"" if ext else b"", ends[i], c, ends[i + 1]]
    parts += [b"0", ends[-1], b"X-T: 1" + ends[-2] if trailer else b"", ends[-3]]
    body = b"".join(parts)
    payload, framing, left, done, err = targets.chunked_run(cut(body + rest, points))
    assert not err and done
    assert payload == b"".join(chunks) and left == rest
    # Framing written back with the payload is the body, line ends made CRLF.
    assert len(framing) + len(payload) >= len(body)


# -- HTTP/1 -------------------------------------------------------------------------
@st.composite
def request(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    target = "/" + draw(st.text(alphabet="abc/._-~%?=&0123456789", max_size=30))
    headers = [("Host", draw(TOKEN))]
    for _ in range(draw(st.integers(0, 5))):
        name = draw(TOKEN)
        if name.lower() in ("host", "content-length", "transfer-encoding", "connection",
                            "upgrade", "expect", "proxy-connection", "keep-alive"):
            continue
        headers.append((name, draw(VALUE).strip()))
    body = draw(st.binary(max_size=60))
    chunked = draw(st.booleans())
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        wire = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        headers.append(("Content-Length", str(len(body))))
        wire = body
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (method, target, tuple(headers), body, chunked), head.encode() + b"\r\n" + wire


@fuzz
@given(reqs=st.lists(request(), min_size=1, max_size=3),
       points=st.lists(st.integers(0, 10_000), max_size=8),
       mode=st.sampled_from(["httpd", "relayd", "strict"]))
def test_http1_pipelined_requests(reqs, points, mode) -> None:
    CALLS["prop_http1"] += 1
    data = b"".join(w for _, w in reqs)
    evs = targets.http1_events(mode, cut(data, points))
    got = []
    for e in evs:
        if e[0] == "req":
            got.append([e[1], e[2], e[4], b"", e[6]])
        elif e[0] == "data":
            got[-1][3] += e[1]
        else:
            assert e[0] in ("end", "frame"), evs
    assert [tuple(g) for g in got] == [r for r, _ in reqs]


@fuzz
@given(status=st.integers(200, 599), body=st.binary(max_size=80),
       how=st.sampled_from(["length", "chunked", "close"]),
       points=st.lists(st.integers(0, 10_000), max_size=6))
def test_http1_response(status, body, how, points) -> None:
    CALLS["prop_http1_response"] += 1
    if status in (204, 304):
        body = b""
    head = f"HTTP/1.1 {status} X\r\n".encode()
    if how == "length":
        head += f"Content-Length: {len(body)}\r\n".encode()
        wire = body
    elif how == "chunked":
        head += b"Transfer-Encoding: chunked\r\n"
        wire = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        wire = body
    if status in (204, 304):
        wire = b""        # no body, whatever the framing headers say (RFC 9112 6.3)
    evs = targets.http1_events("client", cut(head + b"\r\n" + wire, points))
    assert evs[0][0] == "resp" and evs[0][1] == status
    assert b"".join(e[1] for e in evs if e[0] == "data") == body
    assert evs[-1] == ("end",)


# -- FastCGI ------------------------------------------------------------------------
PAIR = st.tuples(st.binary(max_size=300), st.binary(max_size=300))


@fuzz
@given(pairs=st.lists(PAIR, max_size=6), out=st.lists(st.binary(max_size=200), max_size=4),
       rid=st.integers(1, 65535), points=st.lists(st.integers(0, 100_000), max_size=8))
def test_fcgi_round_trip(pairs, out, rid, points) -> None:
    from httpd import fcgi
    CALLS["prop_fcgi"] += 1
    params = fcgi.encode_params(pairs, rid)
    stream = params + b"".join(fcgi.encode(fcgi.STDOUT, o, rid) for o in out if o)
    r = fcgi.RecordReader()
    recs = []
    for p in cut(stream, points):
        recs += r.feed(p)
    r.eof()
    got = b"".join(rec.content for rec in recs if rec.type == fcgi.PARAMS)
    assert fcgi.decode_params(got) == pairs
    assert all(rec.request_id == rid for rec in recs)
    assert b"".join(rec.content for rec in recs if rec.type == fcgi.STDOUT) == b"".join(out)


@fuzz
@given(headers=st.lists(st.tuples(TOKEN, VALUE), max_size=5), body=st.binary(max_size=50),
       le=LE, points=st.lists(st.integers(0, 10_000), max_size=6))
def test_cgi_head(headers, body, le, points) -> None:
    from httpd import fcgi
    CALLS["prop_cgi_head"] += 1
    block = b"".join(f"{k}: {v}".encode() + le for k, v in headers
                     if k.lower() not in ("status", "location"))
    p = fcgi.CgiHeaderParser()
    got = None
    try:
        for piece in cut(block + le + body, points):
            if got is None:
                h, rest = p.feed(piece)
                if h is not None:
                    got = (h, rest)
            else:
                got = (got[0], got[1] + piece)
    except fcgi.FcgiError:
        return            # a value the CGI reader refuses (fine: documented)
    assert got is not None and got[1] == body


# -- Lua patterns and globs -----------------------------------------------------------
PAT_ALPHA = "ab.%()[]^$*+-?%dw1"


@fuzz
@given(pat=st.text(alphabet=PAT_ALPHA, max_size=16), subj=st.text(alphabet="ab.(]1 ", max_size=40))
def test_pattern_accepted_never_raises_but_pattern_error(pat, subj) -> None:
    CALLS["prop_patterns"] += 1
    targets.patterns().fn(pat.encode("latin-1") + b"\0" + subj.encode("latin-1"))


@fuzz
@given(pat=st.text(alphabet="ab*?[]!^-\\", max_size=12), subj=st.text(alphabet="ab[]-\\!^", max_size=12))
def test_glob_is_fnmatch(pat, subj) -> None:
    from relayd.rules import Glob
    CALLS["prop_glob"] += 1
    assert Glob(pat)(subj) == targets.ref_fnmatch(pat, subj)


# -- DNS --------------------------------------------------------------------------------
LABEL = st.binary(min_size=1, max_size=63).filter(lambda b: True)


@fuzz
@given(qid=st.integers(0, 65535), labels=st.lists(LABEL, min_size=0, max_size=4),
       qtype=st.integers(0, 65535), opcode=st.sampled_from([0, 1, 2, 4, 5, 6]),
       edns=st.booleans(), new=st.integers(1, 65535))
def test_dns_query_accepted_and_id_restored(qid, labels, qtype, opcode, edns, new) -> None:
    from relayd import relay_udp as U
    CALLS["prop_dns"] += 1
    name = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
    ar = b"\0" + struct.pack("!HHIH", 41, 4096, 0, 0) if edns else b""
    q = struct.pack("!HBBHHHH", qid, opcode << 3, 0, 1, 0, 0, int(edns)) + name \
        + struct.pack("!HH", qtype, 1) + ar
    assert U.check_query(q) is None
    out = U.set_id(q, new)
    assert U.dns_header(out).id == new and U.set_id(out, qid) == q
    # Any cut of it is refused, not a crash.
    for n in range(len(q)):
        assert U.check_query(q[:n]) is not None


# -- configs -----------------------------------------------------------------------------
@fuzz
@given(servers=st.lists(st.tuples(TOKEN, st.integers(1, 65535),
                                  st.lists(st.text(alphabet="abc/*.", min_size=1, max_size=10),
                                           max_size=3, unique=True)),
                        min_size=1, max_size=3, unique_by=lambda s: s[0]))
def test_httpd_conf_built(servers) -> None:
    from httpd import parse
    CALLS["prop_httpd_conf"] += 1
    text = ""
    for name, port, locs in servers:
        text += f'server "{name}" {{\n\tlisten on 127.0.0.1 port {port}\n'
        for loc in locs:
            text += f'\tlocation "{loc}" {{ block }}\n'
        text += "}\n"
    conf = parse.load("t.conf", text=text)
    assert [s.name for s in conf.servers] == [s[0] for s in servers]
    for s, (_, port, locs) in zip(conf.servers, servers):
        assert [(x.addr, x.port) for x in s.listens] == [("127.0.0.1", port)]
        assert [loc.pattern for loc in s.locations] == locs


@fuzz
@given(domains=st.lists(TOKEN, min_size=1, max_size=3, unique=True),
       alts=st.lists(TOKEN, max_size=3, unique=True), ecdsa=st.booleans())
def test_acme_conf_format_round_trip(domains, alts, ecdsa) -> None:
    from shared import acme_conf as ac
    CALLS["prop_acme_conf"] += 1
    text = ('authority ca {\n\tapi url "https://ca.example/dir"\n'
            f'\taccount key "/k.pem"{" ecdsa" if ecdsa else ""}\n}}\n')
    for d in domains:
        text += (f"domain {d}.example {{\n\tdomain key \"/{d}.key\"\n"
                 f"\tdomain full chain certificate \"/{d}.crt\"\n")
        if alts:
            text += "\talternative names { " + " ".join(f"{a}.example" for a in alts) + " }\n"
        text += "\tsign with ca\n}\n"
    targets.acme_conf().fn(text.encode())
