"""shared.patterns -- Lua 5.3 string patterns, as OpenBSD's patterns.c (httpd, relayd) runs them.

Backs httpd's `server match`, `alias match` and `location match` and
relayd's `pattern` rule keys: check() rejects a malformed pattern when the
config is loaded; find() and match() run one against a host name, a path or
a header.  This is not a regex engine and not a Lua string library: there is no gsub/gmatch/format, no init offset, and nothing
here knows about config syntax or %N expansion in redirect targets.

Each str character counts as one byte would in C.  Classes follow the C
locale (ASCII only), so a non-ASCII character belongs to no class; it is
matched by '.', by the complements (%A, %S, ...), literally, or by a range
in a set whose ends enclose its code point.

Differences from the C code, all deliberate:
- the whole pattern is checked before matching, so a malformed pattern always
  raises, even when C would have failed to match before reaching the fault;
- the step budget (MAXREPETITION) counts every item tried, not only failed
  ones, so that a match in Python never runs for long; running out raises
  "pattern too complex" (C says "max repetition items");
- up to 32 captures are allowed and '()' yields its 1-based position as a
  decimal string, as in Lua (OpenBSD's str_match allows 31 and gives "").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

MAXCAPTURES = 32  # captures per pattern (Lua's LUA_MAXCAPTURES)
MAXCCALLS = 200  # nested matcher calls before "pattern too complex"
MAXREPETITION = 0xFFFFF  # matcher steps per search before "pattern too complex"

_SPECIALS = "^$*+?.([%-"  # a pattern without any of these is a plain substring
_SUFFIXES = "*+-?"

_CAP_UNFINISHED = -1
_CAP_POSITION = -2

# Node kinds of a compiled pattern.  Lua patterns have no alternation, so a
# pattern compiles to a straight list and node i is always followed by i+1.
_END, _DOLLAR, _OPEN, _POSITION, _CLOSE, _BALANCE, _FRONTIER, _BACKREF, _SINGLE = range(9)

_DIGIT = frozenset(range(0x30, 0x3A))
_UPPER = frozenset(range(0x41, 0x5B))
_LOWER = frozenset(range(0x61, 0x7B))
_ALPHA = _UPPER | _LOWER
_ALNUM = _ALPHA | _DIGIT
_GRAPH = frozenset(range(0x21, 0x7F))
_CTYPE: dict[str, frozenset[int]] = {  # <ctype.h> in the C locale
    "a": _ALPHA,
    "c": frozenset(range(0x20)) | {0x7F},
    "d": _DIGIT,
    "g": _GRAPH,
    "l": _LOWER,
    "p": _GRAPH - _ALNUM,
    "s": frozenset(b" \t\n\v\f\r"),
    "u": _UPPER,
    "w": _ALNUM,
    "x": _DIGIT | frozenset(b"abcdefABCDEF"),
}

_ALL = frozenset(map(chr, range(256)))  # what '.' matches below U+0100


class PatternError(ValueError):
    """A malformed pattern, or one too costly to run; str() is OpenBSD's errstr."""


def _match_class(c: int, cl: str) -> bool:
    members = _CTYPE.get(cl.lower()) if cl.isascii() else None
    if members is None:
        return ord(cl) == c  # '%' before anything else escapes it, letters too
    return (c in members) == cl.islower()


def _match_bracket(c: int, pat: str, p: int, ec: int) -> bool:
    # p is at '[', ec at the closing ']'.
    sig = True
    if pat[p + 1] == "^":
        sig = False
        p += 1
    p += 1
    while p < ec:
        ch = pat[p]
        if ch == "%":
            p += 1
            if _match_class(c, pat[p]):
                return sig
        elif pat[p + 1] == "-" and p + 2 < ec:
            if ord(ch) <= c <= ord(pat[p + 2]):
                return sig
            p += 2
        elif ord(ch) == c:
            return sig
        p += 1
    return not sig


def _classend(pat: str, p: int, p_end: int) -> int:
    # pat carries a '\0' sentinel at p_end, like the C string it mimics.
    ch = pat[p]
    p += 1
    if ch == "%":
        if p == p_end:
            raise PatternError("malformed pattern (ends with '%')")
        return p + 1
    if ch == "[":
        if pat[p] == "^":
            p += 1
        while True:  # the first character is taken as is, so "[]]" holds ']'
            if p == p_end:
                raise PatternError("malformed pattern (missing ']')")
            ch = pat[p]
            p += 1
            if ch == "%" and p < p_end:
                p += 1
            if pat[p] == "]":
                return p + 1
    return p


def _charclass(pat: str, p: int, ep: int) -> tuple[frozenset[str], Callable[[str], bool]]:
    # Returns (members below U+0100, test for anything above); a frozenset
    # lookup keeps the per-character cost low on long subjects.
    ch = pat[p]
    test: Callable[[int], bool]
    if ch == ".":
        return _ALL, lambda c: True
    if ch == "%":
        cl = pat[p + 1]
        test = lambda c: _match_class(c, cl)  # noqa: E731
    elif ch == "[":
        test = lambda c: _match_bracket(c, pat, p, ep - 1)  # noqa: E731
    else:
        o = ord(ch)
        test = lambda c: c == o  # noqa: E731
    lo = frozenset(chr(c) for c in range(256) if test(c))
    return lo, lambda s: test(ord(s))


@dataclass(frozen=True, slots=True)
class _Compiled:
    literal: str | None  # no specials: OpenBSD does a plain substring search
    anchor: bool
    nodes: tuple[tuple, ...]
    ncap: int
    first: str | None = None  # the one char the first item needs, if that is all it is


@lru_cache(maxsize=512)
def _compile(pattern: str) -> _Compiled:
    if not any(ch in _SPECIALS for ch in pattern):
        return _Compiled(pattern, False, (), 0)
    anchor = pattern.startswith("^")
    p = 1 if anchor else 0
    p_end = len(pattern)
    pat = pattern + "\0"
    nodes: list[tuple] = []
    caps: list[bool] = []  # per capture: still open?
    # Walk the pattern the way the matcher will; with no alternation every
    # run visits the items in this order, so faults can be found up front.
    while p < p_end:
        ch = pat[p]
        if ch == "(":
            if len(caps) >= MAXCAPTURES:
                raise PatternError("too many captures")
            if pat[p + 1] == ")":
                nodes.append((_POSITION, len(caps)))
                caps.append(False)
                p += 2
            else:
                nodes.append((_OPEN, len(caps)))
                caps.append(True)
                p += 1
            continue
        if ch == ")":
            for idx in range(len(caps) - 1, -1, -1):
                if caps[idx]:
                    break
            else:
                raise PatternError("invalid pattern capture")
            caps[idx] = False
            nodes.append((_CLOSE, idx))
            p += 1
            continue
        if ch == "$" and p + 1 == p_end:
            nodes.append((_DOLLAR,))
            p += 1
            continue
        if ch == "%":
            nxt = pat[p + 1]
            if nxt == "b":
                if p + 2 >= p_end - 1:
                    raise PatternError("malformed pattern (missing arguments to '%b')")
                nodes.append((_BALANCE, pat[p + 2], pat[p + 3]))
                p += 4
                continue
            if nxt == "f":
                p += 2
                if pat[p] != "[":
                    raise PatternError("missing '[' after '%f' in pattern")
                ep = _classend(pat, p, p_end)
                nodes.append((_FRONTIER, *_charclass(pat, p, ep)))
                p = ep
                continue
            if "0" <= nxt <= "9":
                idx = ord(nxt) - ord("1")
                if idx < 0 or idx >= len(caps) or caps[idx]:
                    raise PatternError("invalid capture index")
                nodes.append((_BACKREF, idx))
                p += 2
                continue
        ep = _classend(pat, p, p_end)
        suffix = pat[ep] if pat[ep] in _SUFFIXES else ""
        nodes.append((_SINGLE, *_charclass(pat, p, ep), suffix))
        p = ep + 1 if suffix else ep
    if any(caps):
        raise PatternError("unfinished capture")
    nodes.append((_END,))
    first = _first_literal(pat, 1 if anchor else 0, p_end)
    return _Compiled(None, anchor, tuple(nodes), len(caps), first)


def _first_literal(pat: str, p: int, p_end: int) -> str | None:
    # The char an unquantified literal or escaped item at p matches, if any.
    if p == p_end:
        return None
    ch = pat[p]
    if ch in "().[$" or (ch == "%" and (pat[p + 1] in "bf" or pat[p + 1].isalnum())):
        return None  # '$' could be the end anchor; %b, %f, classes, back-refs
    if ch == "%":
        ch = pat[p + 1]
        p += 1
    return None if pat[p + 1] in _SUFFIXES else ch


def _too_complex() -> PatternError:
    return PatternError("pattern too complex")


class _Matcher:
    # One search of one subject; mirrors match() in patterns.c, with the
    # tail calls there turned into `continue` here.
    __slots__ = ("subj", "n", "nodes", "init", "length", "depth", "steps")

    def __init__(self, subj: str, comp: _Compiled) -> None:
        self.subj = subj
        self.n = len(subj)
        self.nodes = comp.nodes
        self.init = [0] * comp.ncap
        self.length = [_CAP_UNFINISHED] * comp.ncap
        self.depth = MAXCCALLS
        self.steps = MAXREPETITION

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _too_complex()

    def quick_fail(self, s: int, node: tuple) -> bool:
        # True if calling run(s, ...) on `node` would fail at once having cost
        # one step; lets backtracking skip the call.  Only valid while a call
        # would not hit the depth limit, which callers check.
        if node[0] != _SINGLE or node[3] not in ("", "+"):
            return False
        if s < self.n:
            c = self.subj[s]
            if c in node[1] or (c > "\xff" and node[2](c)):
                return False
        self.step()
        return True

    def run(self, s: int, i: int) -> int:
        # End of the match of nodes[i:] starting at s, or -1.
        if self.depth == 0:
            raise _too_complex()
        self.depth -= 1
        subj = self.subj
        n = self.n
        nodes = self.nodes
        while True:
            self.steps -= 1
            if self.steps < 0:
                raise _too_complex()
            node = nodes[i]
            kind = node[0]
            if kind == _SINGLE:
                lo, hi, suffix = node[1], node[2], node[3]
                if s < n and ((c := subj[s]) in lo or (c > "\xff" and hi(c))):
                    if not suffix:
                        s += 1
                        i += 1
                        continue
                    if suffix == "?":
                        res = self.run(s + 1, i + 1)
                        if res >= 0:
                            s = res
                            break
                        i += 1
                        continue
                    if suffix == "-":
                        s = self.min_expand(s, i, lo, hi)
                    else:
                        s = self.max_expand(s + 1 if suffix == "+" else s, i, lo, hi)
                    break
                if suffix and suffix != "+":  # zero repetitions are fine
                    i += 1
                    continue
                s = -1
                break
            if kind == _END:
                break
            if kind == _DOLLAR:
                if s != n:
                    s = -1
                break
            if kind == _OPEN or kind == _POSITION:
                # No undo on failure is needed: each capture has one OPEN and
                # one CLOSE node, so any path reaching a reader rewrote it.
                self.init[node[1]] = s
                self.length[node[1]] = _CAP_UNFINISHED if kind == _OPEN else _CAP_POSITION
                s = self.run(s, i + 1)
                break
            if kind == _CLOSE:
                self.length[node[1]] = s - self.init[node[1]]
                s = self.run(s, i + 1)
                break
            if kind == _BACKREF:
                ln = self.length[node[1]]
                start = self.init[node[1]]
                # a position capture has no text and never matches (as in C)
                if ln != _CAP_POSITION and subj.startswith(subj[start : start + ln], s):
                    s += ln
                    i += 1
                    continue
                s = -1
                break
            if kind == _BALANCE:
                s = self.balance(s, node[1], node[2])
                if s < 0:
                    break
                i += 1
                continue
            # _FRONTIER: the string is taken as framed by '\0' on both sides.
            prev = subj[s - 1] if s > 0 else "\0"
            cur = subj[s] if s < n else "\0"
            lo, hi = node[1], node[2]
            if not (prev in lo or (prev > "\xff" and hi(prev))) and (
                cur in lo or (cur > "\xff" and hi(cur))
            ):
                i += 1
                continue
            s = -1
            break
        self.depth += 1
        return s

    def balance(self, s: int, b: str, e: str) -> int:
        subj = self.subj
        n = self.n
        if s >= n or subj[s] != b:
            return -1
        cont = 1
        j = s + 1
        while j < n:
            ch = subj[j]
            if ch == e:  # tested first, so %b"" pairs quotes
                cont -= 1
                if cont == 0:
                    break
            elif ch == b:
                cont += 1
            j += 1
        # The scan is charged to the step budget; unlike C, it runs in Python.
        self.steps -= j - s
        if self.steps < 0:
            raise _too_complex()
        return j + 1 if j < n else -1

    def max_expand(self, s: int, i: int, lo: frozenset[str], hi: Callable[[str], bool]) -> int:
        subj = self.subj
        n = self.n
        if lo is _ALL:
            j = n
        else:
            j = s
            while j < n and ((c := subj[j]) in lo or (c > "\xff" and hi(c))):
                j += 1
        nxt = self.nodes[i + 1]
        while j >= s:
            if not (self.depth > 0 and self.quick_fail(j, nxt)):
                res = self.run(j, i + 1)
                if res >= 0:
                    return res
            j -= 1
        return -1

    def min_expand(self, s: int, i: int, lo: frozenset[str], hi: Callable[[str], bool]) -> int:
        subj = self.subj
        n = self.n
        nxt = self.nodes[i + 1]
        while True:
            if not (self.depth > 0 and self.quick_fail(s, nxt)):
                res = self.run(s, i + 1)
                if res >= 0:
                    return res
            if s < n and ((c := subj[s]) in lo or (c > "\xff" and hi(c))):
                s += 1
            else:
                return -1


def _search(s: str, pattern: str) -> tuple[int, int, _Matcher | None] | None:
    comp = _compile(pattern)
    if comp.literal is not None:
        k = s.find(comp.literal)
        return None if k < 0 else (k, k + len(comp.literal), None)
    m = _Matcher(s, comp)
    first = comp.nodes[0]
    start = 0
    try:
        while True:
            # Every start position is tried, the one past the end included.
            if comp.first is not None and not comp.anchor:
                # Jump to the next place the first item can match; every
                # position skipped still costs its step, as it would in C.
                k = s.find(comp.first, start)
                skip = (m.n + 1 if k < 0 else k) - start
                m.steps -= skip
                if m.steps < 0:
                    raise _too_complex()
                if k < 0:
                    return None
                start = k
            if not m.quick_fail(start, first):
                end = m.run(start, 0)
                if end >= 0:
                    return start, end, m
            start += 1
            if comp.anchor or start > m.n:
                return None
    except RecursionError:
        # MAXCCALLS keeps our own depth near 200 frames; this only trips if
        # the caller was already deep in the stack.
        raise _too_complex() from None


def check(pattern: str) -> None:
    """Raise PatternError if `pattern` is malformed (used at config-load time).

    Catches a trailing '%', a missing ']', unbalanced '(' / ')', more than
    MAXCAPTURES captures, a back-reference %N to a capture that is not closed
    yet, '%b' without two characters and '%f' without '['.  A pattern with no
    special characters is a plain string and always valid, as in OpenBSD.
    """
    _compile(pattern)


def find(s: str, pattern: str) -> tuple[int, int] | None:
    """Return (start, end) of the first match of `pattern` in `s`, or None.

    The search is unanchored unless the pattern starts with '^'; end is
    exclusive.  Raises PatternError for a malformed or too costly pattern.
    """
    found = _search(s, pattern)
    return None if found is None else (found[0], found[1])


def match(s: str, pattern: str) -> list[str] | None:
    """Like find(), but return [whole match, capture 1, capture 2, ...].

    A position capture '()' gives its 1-based position as a decimal string,
    as Lua does.  None if there is no match; PatternError as for find().
    """
    found = _search(s, pattern)
    if found is None:
        return None
    start, end, m = found
    out = [s[start:end]]
    if m is not None:
        for idx in range(len(m.init)):
            first = m.init[idx]
            if m.length[idx] == _CAP_POSITION:
                out.append(str(first + 1))
            else:
                out.append(s[first : first + m.length[idx]])
    return out
