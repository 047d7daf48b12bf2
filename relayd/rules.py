"""relayd.rules -- filter rules: which rule decides, and what it changes.

Pure: gets a protocol's rules, one HTTP head (Message) and what the session
knows (Ctx: addresses, tag, label); returns a Verdict.  apply_actions() then
changes the Message (set/append/remove on headers, cookies and the path,
`path strip`), expands the value macros, and returns the log items and the
`hash` input.  No sockets, no HTTP parsing (relay_http does both).

Semantics follow relay_http.c's relay_test(), relay_match_actions() and
relay_apply_actions():

* Rules are tested in file order for one direction.  A rule matches when
  all of its conditions hold: address family, `from` (client address),
  `to` (the address the client connected to), `method`, `tagged`, then the
  entities header, query, path, url and cookie.
* `match` rules never decide; when one matches, its tag, label and
  `forward to` take effect at once (a later `tagged` sees the tag) and its
  entity actions are queued.  `block`/`pass`: the last matching one decides
  (default pass), `quick` stops at it; only the deciding rule's tag, label,
  table and actions are applied, after the match rules' actions.
* Every test looks at the head as it arrived; actions run afterwards in
  queue order, so a `log` queued after a `remove` logs "value (removed)".
* A rule with `file` keys behaves like one copy of the rule per key, in
  file order (OpenBSD's rule_add()).

As in OpenBSD, header `append` adds a line of its own (the header's other
lines stay as they are), `log` logs one header -- the one kv_find() would
pick: the first line of the first matching name in case-insensitive name
order -- and a cookie `log` logs the whole Cookie (response: Set-Cookie)
header the cookie was found in.

Deliberate differences from OpenBSD, where its behaviour is accidental:
a header test looks at every header of that name (not only the first),
`remove` removes every header it matched, cookie `remove`/`hash`/`set`/
`append` work on the one cookie in a request (OpenBSD: the whole Cookie
header, and set/append add a second Cookie line), a response cookie `set`
replaces the Set-Cookie line of that name, and a `url` test without a Host
header does not match.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Sequence

from relayd.config import RELAYD_SERVERNAME, Entity, Rule
from shared import glob, patterns

REQUEST = "request"
RESPONSE = "response"

# Verdict.result (relayd.h RES_*): relay_http maps them to 403/400/500.
RES_PASS = "pass"
RES_DROP = "drop"          # blocked: 403
RES_BAD = "bad"            # a lookup found the request malformed: 400
RES_INTERNAL = "internal"  # 500

# Lookup levels of `url` (RELAY_MAXLOOKUPLEVELS): host suffixes and path prefixes.
MAX_LOOKUP_LEVELS = 5
# Longest host name a url lookup canonicalises (HOST_NAME_MAX).
HOST_NAME_MAX = 255

_GLOB_CHARS = frozenset("*?[\\")


# -- glob matching (fnmatch(3) without flags, or with FNM_CASEFOLD) -------------
class Glob:
    """A compiled fnmatch pattern; `casefold` is FNM_CASEFOLD."""

    __slots__ = ("pattern", "casefold", "plain", "_re", "_low")

    def __init__(self, pattern: str, casefold: bool = False) -> None:
        self.pattern = pattern
        self.casefold = casefold
        self.plain = not (_GLOB_CHARS & set(pattern))
        self._low = pattern.lower()
        self._re = None if self.plain else re.compile(
            glob.translate(pattern), re.DOTALL | (re.IGNORECASE if casefold else 0))

    def __call__(self, s: str) -> bool:
        if self.plain:
            return s.lower() == self._low if self.casefold else s == self.pattern
        return self._re.fullmatch(s) is not None


class Pattern:
    """A `pattern` key or value: patterns(7), found anywhere unless anchored
    (str_find()), always case-sensitive; checked when the config loads."""

    __slots__ = ("pattern",)
    plain = False
    casefold = False

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __call__(self, s: str) -> bool:
        try:
            return patterns.find(s, self.pattern) is not None
        except patterns.PatternError:       # too costly for this input
            return False


def fnmatch(pattern: str, s: str, casefold: bool = False) -> bool:
    """fnmatch(3) as relayd uses it (no FNM_PATHNAME: `*` matches `/`)."""
    return Glob(pattern, casefold)(s)


# -- the message the rules look at ------------------------------------------------
class Message:
    """One HTTP head as the rules see it; actions change it in place.

    `headers` keeps the arrival order as [name, value, removed] lists;
    removed headers stay (a later `log` shows them as removed) but are not
    written.  Lines `header append` adds go to the end of `headers` (the
    positions actions hold stay valid) and are written after the last line
    of their name.  Requests have `method`, `path` and `query` (None: no
    `?`)."""

    __slots__ = ("direction", "method", "path", "query", "status", "headers",
                 "_index", "_lookups", "_appended")

    def __init__(self, direction: str, headers: Sequence[tuple[str, str]],
                 method: str | None = None, path: str | None = None,
                 query: str | None = None, status: int = 0) -> None:
        self.direction = direction
        self.method = method
        self.path = path
        self.query = query
        self.status = status
        self.headers: list[list] = [[k, v, False] for k, v in headers]
        self._index: dict[str, list[int]] | None = None
        self._lookups: dict[str, set[str]] | None = None
        self._appended: list[int] | None = None

    @classmethod
    def request(cls, method: str, target: str, headers: Sequence[tuple[str, str]]) -> "Message":
        path, sep, query = target.partition("?")
        return cls(REQUEST, headers, method, path, query if sep else None)

    @classmethod
    def response(cls, status: int, headers: Sequence[tuple[str, str]]) -> "Message":
        return cls(RESPONSE, headers, status=status)

    @property
    def target(self) -> str:
        """The request target to forward: path and query."""
        return self.path if self.query is None else f"{self.path}?{self.query}"

    def index(self) -> dict[str, list[int]]:
        """Lower-case header name -> positions (built on first use)."""
        idx = self._index
        if idx is None:
            idx = {}
            for i, h in enumerate(self.headers):
                idx.setdefault(h[0].lower(), []).append(i)
            self._index = idx
        return idx

    def get(self, name: str) -> str | None:
        """Value of the first header `name` (lower-case) not removed."""
        for i in self.index().get(name, ()):
            h = self.headers[i]
            if not h[2]:
                return h[1]
        return None

    def joined(self, name: str) -> str | None:
        """Every live header `name` (lower-case), joined with ", "."""
        found = self.index().get(name)
        if not found:
            return None
        vals = [self.headers[i][1] for i in found if not self.headers[i][2]]
        return ", ".join(vals) if vals else None

    def add(self, name: str, value: str) -> int:
        self.headers.append([name, value, False])
        pos = len(self.headers) - 1
        if self._index is not None:
            self._index.setdefault(name.lower(), []).append(pos)
        return pos

    def append(self, name: str, value: str) -> None:
        """A line of its own, written with the other lines of `name`
        (OpenBSD's kv_add() makes it a child of the name's first line)."""
        if self._appended is None:
            self._appended = []
        self._appended.append(self.add(name, value))

    def items(self) -> list[tuple[str, str]]:
        """The headers to write, in order."""
        if self._appended is None:
            return [(h[0], h[1]) for h in self.headers if not h[2]]
        extra: dict[str, list[list]] = {}
        for i in self._appended:
            extra.setdefault(self.headers[i][0].lower(), []).append(self.headers[i])
        appended = set(self._appended)
        last = {h[0].lower(): i for i, h in enumerate(self.headers) if i not in appended}
        out = []
        for i, h in enumerate(self.headers):
            if i in appended:
                continue
            if not h[2]:
                out.append((h[0], h[1]))
            low = h[0].lower()
            if last[low] == i:
                out += [(x[0], x[1]) for x in extra.pop(low, ()) if not x[2]]
        for rest in extra.values():
            out += [(x[0], x[1]) for x in rest if not x[2]]
        return out


class Ctx:
    """What a session tells the rules: addresses, and its tag and label."""

    __slots__ = ("client", "local", "tag", "label")

    def __init__(self, client: str, local: str, tag: str | None = None,
                 label: str | None = None) -> None:
        self.client = _ip(client)
        self.local = _ip(local)
        self.tag = tag
        self.label = label


def _ip(addr: str):
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None


# -- compiled rules ---------------------------------------------------------------------
class _Test:
    """One entity of a rule, compiled."""

    __slots__ = ("ent", "type", "option", "key", "key_low", "keyglob", "value", "valglob",
                 "digest", "macro", "keyset")

    def __init__(self, ent: Entity, key: str | None) -> None:
        self.ent = ent
        self.type = ent.type
        self.option = ent.option
        self.key = key
        self.key_low = (key or "").lower()
        self.value = ent.value
        self.digest = ent.digest
        self.macro = ent.value is not None and "$" in ent.value
        self.keyset: dict[str, list[str]] | None = None
        t = ent.type
        # Case rules per type (relay_http.c): header names and cookie names
        # are case-insensitive, query and path keys are not.
        self.keyglob = None
        if ent.pattern:
            self.keyglob = Pattern(key) if key is not None else None
            self.valglob = Pattern(ent.value) \
                if ent.value is not None and ent.option not in ("set", "append") else None
            return
        if key is not None and t in ("header", "query", "path"):
            self.keyglob = Glob(key, casefold=(t == "header"))
        elif key is not None and t == "url" and not ent.digest:
            self.keyglob = Glob(key, casefold=True)    # `url log` path test
        self.valglob = None
        if ent.value is not None and ent.option not in ("set", "append"):
            # header and query values are case-sensitive; path (query part)
            # and cookie values are not.
            self.valglob = Glob(ent.value, casefold=t in ("path", "cookie"))


class _Rule:
    __slots__ = ("rule", "action", "quick", "af", "src", "dst", "method", "tagged",
                 "tests", "plan", "strip", "conds", "static", "instant")

    def __init__(self, rule: Rule, tests: list[_Test]) -> None:
        self.rule = rule
        self.action = rule.action
        self.quick = rule.quick
        self.af = 4 if rule.af == "inet" else 6 if rule.af == "inet6" else 0
        self.src = rule.src
        self.dst = rule.dst
        self.method = rule.method
        self.tagged = rule.tagged
        self.conds = bool(self.af or self.src or self.dst or self.method or self.tagged)
        # relay_test()'s order: header, query, path, url, cookie
        order = {"header": 0, "query": 1, "path": 2, "url": 3, "cookie": 4}
        self.tests = sorted(tests, key=lambda t: order[t.type])
        self.plan = [(_TESTS[t.type], t) for t in self.tests]
        self.strip = rule.path_strip
        # _instant() would change something (else evaluate() skips it)
        self.instant = (rule.forward_to is not None or rule.no_tag or rule.tag is not None
                        or rule.no_label or rule.label is not None)
        # _test_rule()'s answer when it cannot depend on the message: no
        # tests, or only header set/append of a plain name (those match
        # always and look the header up when applied).  Shared, never changed.
        self.static = None
        if all(t.type == "header" and t.option in ("set", "append") and t.keyset is None
               and (t.keyglob is None or t.keyglob.plain) for t in self.tests):
            acts: list = [(t, ()) for t in self.tests]
            if self.strip is not None:
                acts.append((_STRIP, self.strip))
            self.static = [acts]


def _compile_rule(rule: Rule) -> list[_Rule]:
    ents = list(rule.entities)
    filed = [e for e in ents if e.keys]
    if not filed:
        return [_Rule(rule, [_Test(e, e.key) for e in ents])]
    fe = filed[0]
    others = [_Test(e, e.key) for e in ents if e is not fe]
    if fe.type == "url":
        # One rule with a key set instead of thousands of copies (block lists).
        t = _Test(fe, None)
        t.keyset = {}
        for k in fe.keys:
            t.keyset.setdefault(k.lower(), []).append(k)
        t.key = fe.keys[0] if fe.keys else None
        return [_Rule(rule, others + [t])] if fe.keys else []
    return [_Rule(rule, others + [_Test(fe, k)]) for k in fe.keys]


_cache: dict[int, tuple[Sequence[Rule], dict[str, list[_Rule]]]] = {}


def compile_rules(rules: Sequence[Rule]) -> dict[str, list[_Rule]]:
    """Rules per direction, compiled once per rules tuple (a config's)."""
    hit = _cache.get(id(rules))
    if hit is not None and hit[0] is rules:
        return hit[1]
    out: dict[str, list[_Rule]] = {REQUEST: [], RESPONSE: []}
    for r in rules:
        out.setdefault(r.direction, []).extend(_compile_rule(r))
    if len(_cache) > 64:
        _cache.clear()
    _cache[id(rules)] = (rules, out)
    return out


# -- evaluation -------------------------------------------------------------------------
class Verdict:
    """What evaluate() decided.

    `result`: RES_*.  `actions`: (test, what it matched) in application order.
    `table`: `forward to` table name chosen (None: the relay's default).
    `tag`/`label`: the session's tag and label after this evaluation."""

    __slots__ = ("result", "actions", "table", "tag", "label", "rule")

    def __init__(self, tag: str | None, label: str | None) -> None:
        self.result = RES_PASS
        self.actions: list[tuple[_Test, object]] = []
        self.table: str | None = None
        self.tag = tag
        self.label = label
        self.rule: Rule | None = None


def _instant(v: Verdict, rule: Rule) -> None:
    # relay_match_actions(): the options applied as soon as a rule counts.
    if rule.forward_to is not None:
        v.table = rule.forward_to
    if rule.no_tag:
        v.tag = None
    elif rule.tag is not None:
        v.tag = rule.tag
    if rule.no_label:
        v.label = None
    elif rule.label is not None:
        v.label = rule.label


def evaluate(rules: Sequence[Rule] | dict, direction: str, msg: Message, ctx: Ctx) -> Verdict:
    """relay_test(): last matching block/pass rule wins, `quick` stops,
    `match` rules only add actions.  Does not change `msg` or `ctx`."""
    compiled = rules if isinstance(rules, dict) else compile_rules(rules)
    v = Verdict(ctx.tag, ctx.label)
    final: _Rule | None = None
    final_acts: list = []
    for r in compiled.get(direction, ()):
        if r.conds:
            if r.af and ctx.client is not None and ctx.client.version != r.af:
                continue
            if r.src is not None and not _in(ctx.client, r.src):
                continue
            if r.dst is not None and not _in(ctx.local, r.dst):
                continue
            if r.method is not None and (direction != REQUEST or msg.method != r.method):
                continue
            if r.tagged is not None and v.tag != r.tagged:
                continue
        variants = r.static if r.static is not None else _test_rule(r, msg)
        if variants is None:
            continue
        if isinstance(variants, str):          # RES_BAD / RES_INTERNAL
            v.result = variants
            return v
        if r.action == "match":
            for acts in variants:
                if r.instant:
                    _instant(v, r.rule)
                v.actions.extend(acts)
            continue
        acts = variants[0] if r.quick else variants[-1]
        v.result = RES_DROP if r.action == "block" else RES_PASS
        final, final_acts = r, acts
        if r.quick:
            break
    if final is not None:
        _instant(v, final.rule)
        v.actions.extend(final_acts)
        v.rule = final.rule
    return v


def _in(addr, net) -> bool:
    return addr is not None and addr.version == net.version and addr in net


def _test_rule(r: _Rule, msg: Message):
    """None: no match; RES_BAD/RES_INTERNAL; else a list of action lists,
    one per matching copy (a rule without file keys has one)."""
    acts: list = []
    hits = None
    for fn, t in r.plan:
        m = fn(t, r, msg)
        if m is _NO:
            return None
        if type(m) is str:
            return m
        if t.keyset is not None:
            hits, kt = m, t
        elif t.option is not None:
            acts.append((t, m))
    if r.strip is not None:
        acts.append((_STRIP, r.strip))
    if hits is None:
        return [acts]
    if kt.option is None:
        return [acts] * len(hits)
    return [acts + [(kt, k)] for k in hits]


_NO = object()


class _StripTest:
    type = "strip"
    option = "strip"


_STRIP = _StripTest()


def _header_test(t: _Test, r: _Rule, msg: Message):
    headers = msg.headers
    g = t.keyglob
    if t.option in ("set", "append") and (g is None or g.plain):
        return ()                       # looked up when applied
    if g is None or not g.plain:
        idx = [i for i, h in enumerate(headers) if not h[2] and (g is None or g(h[0]))]
    else:
        idx = [i for i in msg.index().get(t.key.lower(), ()) if not headers[i][2]]
    if t.option in ("set", "append"):
        return idx                      # a missing header is created later
    if not idx:
        return _NO
    vg = t.valglob
    if vg is not None:
        idx = [i for i in idx if vg(headers[i][1])]
        if not idx:
            return _NO
    return idx


def _query_test(t: _Test, r: _Rule, msg: Message):
    if msg.direction != REQUEST or t.key is None:
        return None
    if msg.query is None:
        return _NO
    vg = t.valglob
    for pair in msg.query.split("&"):
        k, sep, val = pair.partition("=")
        if not sep:
            continue
        if t.keyglob(k) and (vg is None or vg(val)):
            return (k, val)
    return _NO


def _path_test(t: _Test, r: _Rule, msg: Message):
    if msg.direction != REQUEST or t.key is None:
        return None
    if not t.keyglob(msg.path):
        return _NO
    if t.valglob is not None and t.option is None:
        if not t.valglob(msg.query or ""):
            return _NO
    return None


def _url_test(t: _Test, r: _Rule, msg: Message):
    if msg.direction != REQUEST or (t.key is None and t.keyset is None):
        return None
    host = msg.get("host")
    if host is None:
        return _NO
    if t.keyset is None and r.action != "block" and t.option == "log" \
            and t.keyglob is not None and t.keyglob(msg.path):
        return None                     # a glob over the path, only for logging
    if t.keyset is not None and t.digest:
        # a file may mix SHA1 (40 hex) and MD5 (32 hex) digests
        looked = set()
        for kind in {len(k) for k in t.keyset}:
            got = _lookups(msg, host, True, "x" * kind)
            if got is None:
                return RES_BAD
            looked |= got
    else:
        looked = _lookups(msg, host, t.digest, t.key)
    if looked is None:
        return RES_BAD
    if t.keyset is not None:
        hits = sorted((k for low, ks in t.keyset.items() if low in looked for k in ks),
                      key=t.ent.keys.index)
        return hits if hits else _NO
    if t.ent.pattern:
        return None if any(t.keyglob(s) for s in looked) else _NO
    return None if t.key.lower() in looked else _NO


def _cookie_test(t: _Test, r: _Rule, msg: Message):
    name = "cookie" if msg.direction == REQUEST else "set-cookie"
    if t.option in ("set", "append"):
        return None
    idx = [i for i in msg.index().get(name, ()) if not msg.headers[i][2]]
    if not idx:
        return _NO
    if t.key is None:
        return (idx[0], None, None)
    key = t.key.lower()
    pat = t.keyglob if t.ent.pattern else None
    vg = t.valglob
    for i in idx:
        for k, val in _cookies(msg.headers[i][1]):
            if (pat(k) if pat is not None else k.lower() == key) and (vg is None or vg(val)):
                return (i, k, val)
    return _NO


_TESTS = {"header": _header_test, "query": _query_test, "path": _path_test,
          "url": _url_test, "cookie": _cookie_test}


def _cookies(value: str) -> list[tuple[str, str]]:
    """(name, value) pairs of a Cookie or Set-Cookie value (relay_lookup_cookie)."""
    out = []
    for part in value.split(";"):
        if part.startswith(" "):
            part = part[1:]
        if not part or part.startswith("$"):
            continue
        k, sep, val = part.partition("=")
        if not sep:
            continue
        if val.startswith('"'):
            val = val[1:]
        if val.endswith('"'):
            val = val[:-1]
        out.append((k, val))
    return out


# -- url lookups ---------------------------------------------------------------------------
def canonicalize_host(host: str) -> str | None:
    """Host without port, lower case, no repeated/leading/trailing dots;
    addresses in their canonical text form.  None: not a host name."""
    h = host.strip()
    if h.startswith("["):
        end = h.find("]")
        if end < 0:
            return None
        h = h[1:end]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    out = []
    for c in h.lower():
        if c == "." and (not out or out[-1] == "."):
            continue
        out.append(c)
    name = "".join(out).rstrip(".")
    if not name or len(name) > HOST_NAME_MAX:
        return None
    return name


def host_levels(host: str) -> list[str]:
    """The host, then its parent domains (at least two labels), at most
    MAX_LOOKUP_LEVELS names, longest first."""
    hi: list[str | None] = [None] * MAX_LOOKUP_LEVELS
    dots = -1
    for i in range(len(host) - 1, 0, -1):
        if host[i] == ".":
            dots += 1
            if dots:
                hi[dots - 1] = host[i + 1:]
        if dots > MAX_LOOKUP_LEVELS - 2:
            break
    hi[max(dots, 0)] = host
    return [h for h in reversed(hi) if h is not None]


def path_prefixes(path: str) -> list[str]:
    """`/`, `/1/`, `/1/2/`, `/1/2/3/` of /1/2/3/4/5.html (at most 4)."""
    out = []
    j = 0
    p = path.find("/")
    while p != -1:
        if j > MAX_LOOKUP_LEVELS - 2 or p + 1 >= len(path):
            break
        p += 1
        out.append(path[:p])
        p = path.find("/", p)
        j += 1
    return out


def url_lookups(host: str, path: str, query: str | None) -> list[str] | None:
    """Every string a `url` key is compared with, in relay_lookup_url()'s
    order; None when the host cannot be canonicalised."""
    ph = canonicalize_host(host)
    if ph is None:
        return None
    prefixes = path_prefixes(path)
    out = []
    for h in host_levels(ph):
        if query is not None:
            out.append(f"{h}{path}?{query}")
        out.append(h + path)
        out.extend(h + p for p in prefixes)
    return out


def _lookups(msg: Message, host: str, digest: bool, key: str | None) -> set[str] | None:
    # Cached per message: plain strings (lower-case) and per digest type.
    cache = msg._lookups
    if cache is None:
        cache = msg._lookups = {}
    kind = "plain"
    if digest:
        kind = "md5" if key is not None and len(key) == 32 else "sha1"
    got = cache.get(kind)
    if got is None:
        strs = url_lookups(host, msg.path or "/", msg.query)
        if strs is None:
            return None
        if kind == "plain":
            got = {s.lower() for s in strs}
        else:
            h = hashlib.md5 if kind == "md5" else hashlib.sha1
            got = {h(s.encode("latin-1", "replace")).hexdigest() for s in strs}
        cache[kind] = got
    return got


# -- actions -----------------------------------------------------------------------------
class Env:
    """Values of the macros a set/append value may hold (relay_expand_http)."""

    __slots__ = ("remote_addr", "remote_port", "server_addr", "server_port", "timeout")

    def __init__(self, remote_addr: str, remote_port: int, server_addr: str,
                 server_port: int, timeout: int) -> None:
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.server_addr = server_addr
        self.server_port = server_port
        self.timeout = timeout


_MACRO = re.compile(r"\$(HOST|REMOTE_ADDR|REMOTE_PORT|SERVER_ADDR|SERVER_PORT|SERVER_NAME|TIMEOUT)")


def expand(value: str, msg: Message, env: Env) -> str:
    """Replace the value macros ($HOST is the Host header, else the relay
    address).  One pass: text a macro expands to is not expanded again."""
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name == "HOST":
            host = msg.get("host")
            return host if host is not None else env.server_addr
        if name == "REMOTE_ADDR":
            return env.remote_addr
        if name == "REMOTE_PORT":
            return str(env.remote_port)
        if name == "SERVER_ADDR":
            return env.server_addr
        if name == "SERVER_PORT":
            return str(env.server_port)
        if name == "SERVER_NAME":
            return RELAYD_SERVERNAME
        return str(env.timeout)
    return _MACRO.sub(sub, value)


class Applied:
    """What apply_actions() reports: log items (" [k: v]" / " {k: v}") and
    the bytes the `hash` options fed (mode hash input)."""

    __slots__ = ("log", "hash")

    def __init__(self) -> None:
        self.log: list[str] = []
        self.hash: list[bytes] = []


def strip_path(path: str, n: int) -> str:
    """Drop n leading path components (server_root_strip): "/a/b/c", 1 ->
    "/b/c"; the last component always stays ("/a", 1 -> "/a")."""
    i = 0
    while n > 0 and i < len(path):
        p = path.find("/", i + 1)
        if p >= 0:
            i = p
        n -= 1
    return path[i:]


def apply_actions(v: Verdict, msg: Message, env: Env) -> Applied:
    """relay_apply_actions(): run the verdict's actions on `msg` in order.

    Log items carry the session label `v.label` (" [label, Key: Value]")."""
    out = Applied()
    for t, m in v.actions:
        _ACTIONS[t.type](t, m, msg, env, v, out)
    return out


def _log(out: Applied, msg: Message, v: Verdict, key: str, value: str | None) -> None:
    o, c = ("[", "]") if msg.direction == REQUEST else ("{", "}")
    label = f"{v.label}, " if v.label else ""
    val = "" if value is None else f": {value}"
    out.log.append(f" {o}{label}{key}{val}{c}")


def _value(t: _Test, msg: Message, env: Env) -> str:
    return expand(t.value, msg, env) if t.macro else (t.value or "")


def _act_header(t: _Test, idx: list[int], msg: Message, env: Env, v: Verdict, out: Applied) -> None:
    headers = msg.headers
    opt = t.option
    if opt in ("set", "append"):
        value = _value(t, msg, env)
        if opt == "append":
            # relay_apply_actions() kv_add()s a line of its own, named as
            # the rule's key (a later test or log does not see it).
            msg.append(t.key or "", value)
            return
        g = t.keyglob
        if g is None or g.plain:
            # Looked up again: an earlier action may have added or removed it.
            found = msg.index().get(t.key_low)
            if not found:
                msg.add(t.key or "", value)     # the common case: a new header
                return
            live = [i for i in found if not headers[i][2]]
        else:
            live = [i for i in idx if not headers[i][2]]
        if not live:
            msg.add(t.key or "", value)
            return
        # The first line of each name gets the value, repeats go (kv_set).
        seen: set[str] = set()
        for i in live:
            h = headers[i]
            low = h[0].lower()
            if low in seen:
                h[2] = True
            else:
                seen.add(low)
                h[1] = value
    elif opt == "remove":
        for i in idx:
            headers[i][2] = True
    elif opt == "hash":
        for i in idx[:1]:
            out.hash.append(headers[i][1].encode("latin-1", "replace"))
    elif opt == "log" and idx:
        # kv_find(): the tree is ordered by name (strcasecmp), a name's
        # first line is the node, later lines hang off it.
        i = min(idx, key=lambda i: (headers[i][0].lower(), i))
        _log_header(out, msg, v, headers[i])


def _log_header(out: Applied, msg: Message, v: Verdict, h: list) -> None:
    _log(out, msg, v, h[0], f"{h[1]} (removed)" if h[2] else h[1])


def _act_query(t: _Test, m, msg: Message, env: Env, v: Verdict, out: Applied) -> None:
    if m is None:
        return
    k, val = m
    if t.option == "hash":
        out.hash.append(val.encode("latin-1", "replace"))
    elif t.option == "log":
        _log(out, msg, v, k, val)


def _act_path(t: _Test, m, msg: Message, env: Env, v: Verdict, out: Applied) -> None:
    opt = t.option
    if opt == "set":
        msg.path = _value(t, msg, env)
    elif opt == "append":
        msg.path = (msg.path or "") + _value(t, msg, env)
    elif opt == "remove":
        msg.path = "/"
    elif opt == "hash":
        out.hash.append((msg.path or "").encode("latin-1", "replace"))
    elif opt == "log":
        _log(out, msg, v, msg.path or "", msg.query)


def _act_strip(t, n: int, msg: Message, env: Env, v: Verdict, out: Applied) -> None:
    if msg.path is not None:
        msg.path = strip_path(msg.path, n)


def _act_url(t: _Test, m, msg: Message, env: Env, v: Verdict, out: Applied) -> None:
    host = msg.get("host")
    if t.option == "hash":
        out.hash.append(f"{host or ''}{msg.path or ''}".encode("latin-1", "replace"))
    elif t.option == "log":
        if t.digest:
            key = m if isinstance(m, str) else (t.key or "")
        else:
            key = f"{host or ''}{msg.path or ''}"
        _log(out, msg, v, key, msg.query)


def _act_cookie(t: _Test, m, msg: Message, env: Env, v: Verdict, out: Applied) -> None:
    opt = t.option
    name = "Cookie" if msg.direction == REQUEST else "Set-Cookie"
    if opt in ("set", "append"):
        _cookie_set(t, msg, env, name, opt)
        return
    if m is None:
        return
    i, k, val = m
    h = msg.headers[i]
    if opt == "remove":
        if k is None or msg.direction == RESPONSE:
            h[2] = True
            return
        left = [p for p in h[1].split(";") if _cookie_name(p) != k.lower()]
        rest = ";".join(left).strip()
        if rest.strip(" ;"):
            h[1] = rest.lstrip()
        else:
            h[2] = True
    elif opt == "hash":
        out.hash.append((val if val is not None else h[1]).encode("latin-1", "replace"))
    elif opt == "log":
        _log_header(out, msg, v, h)        # OpenBSD logs the header, not the cookie


def _cookie_name(part: str) -> str:
    return part.strip().partition("=")[0].lower()


def _cookie_set(t: _Test, msg: Message, env: Env, name: str, opt: str) -> None:
    key = t.key or ""
    value = _value(t, msg, env)
    pair = f"{key}={value}"
    low = key.lower()
    idx = [i for i in msg.index().get(name.lower(), ()) if not msg.headers[i][2]]
    if msg.direction == RESPONSE:
        if opt == "set":
            for i in idx:
                if _cookie_name(msg.headers[i][1].split(";", 1)[0]) == low:
                    msg.headers[i][2] = True
        msg.append(name, pair + ";")
        return
    if not idx:
        msg.add(name, pair + ";")
        return
    h = msg.headers[idx[0]]
    if opt == "set":
        parts = h[1].split(";")
        for n, p in enumerate(parts):
            if _cookie_name(p) == low:
                lead = p[:len(p) - len(p.lstrip())]
                parts[n] = lead + pair
                h[1] = ";".join(parts)
                return
    sep = "" if h[1].rstrip().endswith(";") else ";"
    h[1] = f"{h[1].rstrip()}{sep} {pair}"


_ACTIONS = {"header": _act_header, "query": _act_query, "path": _act_path,
            "url": _act_url, "cookie": _act_cookie, "strip": _act_strip}
