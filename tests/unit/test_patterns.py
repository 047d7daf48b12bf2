"""shared.patterns: Lua 5.3 string patterns as OpenBSD httpd runs them.

The vectors were cross-checked against lua5.3's string.find (position
captures there are numbers; here they are decimal strings).  Where OpenBSD's
patterns.c and Lua differ, OpenBSD wins and the test says so.
"""

from __future__ import annotations

import re
import string
import sys

import pytest

from shared.patterns import MAXCAPTURES, MAXCCALLS, PatternError, check, find, match

# (subject, pattern, expected match() result; None = no match)
Vector = tuple[str, str, "list[str] | None"]

HTTPD: list[Vector] = [
    ("/~alice/docs/x.html", "/~(%w+)/(.*)", ["/~alice/docs/x.html", "alice", "docs/x.html"]),
    ("/~bob/", "/~(%w+)/(.*)", ["/~bob/", "bob", ""]),
    ("/x/~bob/y", "/~(%w+)/(.*)", ["/~bob/y", "bob", "y"]),
    ("/~/y", "/~(%w+)/(.*)", None),
    ("www.example.com", "^www%d*%.example%.com$", ["www.example.com"]),
    ("www42.example.com", "^www%d*%.example%.com$", ["www42.example.com"]),
    ("wwwx.example.com", "^www%d*%.example%.com$", None),
    ("www.example.com.evil", "^www%d*%.example%.com$", None),
    ("awww.example.com", "^www%d*%.example%.com$", None),
    ("www1.exampleXcom", "^www%d*%.example%.com$", None),
    ("/cgi-bin/index.php", "%.php$", [".php"]),
    ("/index.php/extra", "%.php$", None),
    ("/a/b/c.php", "^/(.*)%.php$", ["/a/b/c.php", "a/b/c"]),
    ("/a.php.php", "^/(.*)%.php$", ["/a.php.php", "a.php"]),
    ("/img/cat.png", "^/img/([^/]+)%.(%a+)$", ["/img/cat.png", "cat", "png"]),
    ("/static/../x", "/%.%./", ["/../"]),
    ("/users/42/edit", "^/users/(%d+)/(%a+)$", ["/users/42/edit", "42", "edit"]),
    ("example.org", "^(%w+)%.(%w+)$", ["example.org", "example", "org"]),
    ("a.b.example.org", "^([%w.-]+)%.example%.org$", ["a.b.example.org", "a.b"]),
    ("my-host.example.org", "^([%w.-]+)%.example%.org$", ["my-host.example.org", "my-host"]),
]

ANCHORS: list[Vector] = [
    ("abc", "^abc$", ["abc"]),
    ("xabc", "^abc", None),
    ("abcx", "abc$", None),
    ("xabcx", "abc", ["abc"]),
    ("", "^$", [""]),
    ("a", "^$", None),
    ("", "^", [""]),
    ("abc", "^", [""]),
    ("abc", "$", [""]),
    ("a^b", "a^b", ["a^b"]),  # '^' is only special at the very start
    ("^b", "^^b", ["^b"]),
    ("a$b", "a$b", ["a$b"]),  # '$' is only special at the very end
    ("a$", "a$$", ["a$"]),
    ("ab", "^a", ["a"]),
    ("ba", "^a", None),  # anchored: no retry at later positions
    ("b", "^a*", [""]),
]

QUANTIFIERS: list[Vector] = [
    ("aaab", "a*", ["aaa"]),
    ("baaa", "a*", [""]),  # empty match at position 0 wins
    ("baaa", "a+", ["aaa"]),
    ("bbb", "a+", None),
    ("aaab", "a-b", ["aaab"]),
    ("aaab", "^a-", [""]),
    ("<a><b>", "<(.-)>", ["<a>", "a"]),
    ("<a><b>", "<(.*)>", ["<a><b>", "a><b"]),
    ("color", "colou?r", ["color"]),
    ("colour", "colou?r", ["colour"]),
    ("colouur", "colou?r", None),
    ("abc123def", "%d+", ["123"]),
    ("-12", "^[+-]?%d+$", ["-12"]),
    ("12", "^[+-]?%d+$", ["12"]),
    ("aaa", "^(a*)(a*)$", ["aaa", "aaa", ""]),
    ("aaa", "^(a-)(a*)$", ["aaa", "", "aaa"]),
    ("aaa", "^(a?)(a*)$", ["aaa", "a", "aa"]),
    ("aaa", "^(a+)(a+)$", ["aaa", "aa", "a"]),
    ("ab", "a?b?c?", ["ab"]),
    ("x", "a?", [""]),
    ("a*", "a**", ["a*"]),  # a quantifier after a quantifier is a literal
    ("*a", "*a", ["*a"]),  # so is one with nothing before it
    ("a+b", "a%+b", ["a+b"]),
    ("a-b", "a%-b", ["a-b"]),
    ("ab", "a.-$", ["ab"]),
    ("key = value", "^(%w+)%s*=%s*(%w+)$", ["key = value", "key", "value"]),
]

CAPTURES: list[Vector] = [
    ("ab", "((a)(b))", ["ab", "ab", "a", "b"]),
    ("hello", "(h)(e)(l)(l)(o)", ["hello", "h", "e", "l", "l", "o"]),
    ("hello", "()ll()", ["ll", "3", "5"]),
    ("flaaap", "()aa()", ["aa", "3", "5"]),
    ("", "()", ["", "1"]),
    ("abc", "()$", ["", "4"]),
    ("abc", "a(b*)c", ["abc", "b"]),
    ("ac", "a(b*)c", ["ac", ""]),
    ("ab", "(a)(x?)(b)", ["ab", "a", "", "b"]),
    ("(x)", "%((.)%)", ["(x)", "x"]),
    ("a)b", "(a)%)", ["a)", "a"]),
    ("a)b", "(a)%)b", ["a)b", "a"]),  # after ')' closes the capture, "%)" is a char
    ("a*", "(a)*", ["a*", "a"]),  # a quantifier after ')' is a literal
]

BACKREFS: list[Vector] = [
    ("hello", "(%w)%1", ["ll", "l"]),
    ("abcabc", "^(%a+)%1$", ["abcabc", "abc"]),
    ("abcab", "^(%a+)%1$", None),
    ('say "hi" \'x\'', "([\"'])(.-)%1", ['"hi"', '"', "hi"]),
    ("x = 'a\"b'", "([\"'])(.-)%1", ["'a\"b'", "'", 'a"b']),
    ("aXbXc", "(.)X(.)X", ["aXbX", "a", "b"]),
    ("abba", "(a)(b)%2%1", ["abba", "a", "b"]),
    ("aa", "(a)%1%1", None),
    ("aa?b", "(a)%1?b", ["aa?b", "a"]),  # a back-reference takes no quantifier
    ("abc", "()%1", None),  # a position capture holds no text: never matches
    ("aa", "((a)%2)", ["aa", "aa", "a"]),  # %2 is closed, %1 is still open there
    ("abab", "(a(b))%1", ["abab", "ab", "b"]),
]

BALANCE: list[Vector] = [
    ("f(a(b)c)d", "%b()", ["(a(b)c)"]),
    ("f(a(b)c", "%b()", ["(b)"]),
    ("((", "%b()", None),
    ("x)(y", "%b()", None),
    ("[[x]]y]", "%b[]", ["[[x]]"]),
    ('say "a" and "b"', '%b""', ['"a"']),  # same open/close: pairs quotes
    ("f(a)(b)", "%b()%b()", ["(a)(b)"]),
    ("<<a>>", "^%b<>$", ["<<a>>"]),
    ("<<a>", "^%b<>$", None),
    ("{a}", "(%b{})", ["{a}", "{a}"]),
    ("axxb", "%bab", ["axxb"]),
]

FRONTIER: list[Vector] = [
    ("  hello world", "%f[%w]%w+", ["hello"]),
    ("THE (quick) fox", "%f[%a]%a+%f[%A]", ["THE"]),
    ("THE (quick) fox", "%f[%l]%a+", ["quick"]),
    ("abc", "%w+%f[%W]", ["abc"]),  # the end of the string counts as '\0'
    ("abc", "%f[%w]", [""]),  # so does the start
    ("aa bb", "%f[%S]%S+", ["bb"]),  # the '\0' before the start is in %S too
    ("words", "%f[%d]", None),
    ("a1", "%f[%d]%d", ["1"]),
]

ESCAPES: list[Vector] = [
    ("a.b", "a%.b", ["a.b"]),
    ("axb", "a%.b", None),
    ("100%", "%d+%%", ["100%"]),
    ("a]b", "a%]b", ["a]b"]),
    ("a[b", "a%[b", ["a[b"]),
    ("(x)", "%(x%)", ["(x)"]),
    ("^$", "%^%$", ["^$"]),
    ("*+?", "%*%+%?", ["*+?"]),
    ("a/b", "a%/b", ["a/b"]),
    ("qq", "%q", ["q"]),  # '%' before a letter that names no class: that letter
]

SETS: list[Vector] = [
    ("xbx", "[abc]", ["b"]),
    ("abcx", "[^abc]", ["x"]),
    ("abc", "[^abc]", None),
    ("hello", "[e-k]+", ["he"]),
    ("x_1", "^[%d_x]+$", ["x_1"]),
    ("a-b", "^[%a-]+$", ["a-b"]),  # class, then a literal '-'
    ("a1", "[%a-]+", ["a"]),
    ("a]b", "[]]", ["]"]),  # ']' first in the set is a member
    ("]a", "[^]]", ["a"]),
    ("-", "[a-]", ["-"]),  # '-' last is a member
    ("-", "[-a]", ["-"]),  # '-' first is a member
    ("b", "[a-]", None),
    ("z", "[%a-z]", ["z"]),  # no range after a class: '-' and 'z' are members
    ("-", "[%a-z]", ["-"]),
    ("c", "[a-c-e]", ["c"]),
    ("-", "[a-c-e]", ["-"]),
    ("d", "[a-c-e]", None),
    ("b", "[z-a]", None),  # an inverted range holds nothing
    ("-", "[a%-z]", ["-"]),  # an escaped '-' is no range
    ("b", "[a%-z]", None),
    ("]", "[%]]", ["]"]),
    ("x.", "[.]", ["."]),  # '.' in a set is a dot
    ("%", "[%%]", ["%"]),
    ("[", "[[]", ["["]),
    ("^", "[%^]", ["^"]),
    ("^", "[a^]", ["^"]),  # '^' not first is a member
    ("a b", "[%s]", [" "]),
    ("a b", "[^%s]+", ["a"]),
    ("ab1", "[%W%d]", ["1"]),
    ("\u00e9", "[\u0080-\u00ff]", ["\u00e9"]),
    ("\u03a9", "[\u0391-\u03a9]", ["\u03a9"]),
]

ANY: list[Vector] = [
    ("abc", "a.c", ["abc"]),
    ("a\nc", "a.c", ["a\nc"]),
    ("a\0c", "a.c", ["a\0c"]),
    ("ac", "a.c", None),
    ("\u00e9\u03a9", "^..$", ["\u00e9\u03a9"]),
]

SEARCH: list[Vector] = [
    ("abc", "x*$", [""]),
    ("abcabc", "b", ["b"]),
    ("aaa", "b*", [""]),
    ("abc", "c", ["c"]),
    ("", "a*", [""]),
    ("", "a", None),
    ("", ".", None),
]

PLAIN: list[Vector] = [
    # No special character at all: OpenBSD does a substring search, so ')'
    # and ']' need no escaping (Lua's string.match would reject "a)b").
    ("xa)b", "a)b", ["a)b"]),
    ("xa]b", "a]b", ["a]b"]),
    ("abc", "", [""]),
    ("hello", "ll", ["ll"]),
    ("hello", "lll", None),
]

ALL_VECTORS = (
    HTTPD + ANCHORS + QUANTIFIERS + CAPTURES + BACKREFS + BALANCE + FRONTIER + ESCAPES + SETS
    + ANY + SEARCH + PLAIN
)


@pytest.mark.parametrize(("subject", "pattern", "expected"), ALL_VECTORS)
def test_vectors(subject: str, pattern: str, expected: list[str] | None) -> None:
    check(pattern)
    assert match(subject, pattern) == expected
    found = find(subject, pattern)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        start, end = found
        assert subject[start:end] == expected[0]


@pytest.mark.parametrize(
    ("subject", "pattern", "span"),
    [
        ("hello", "l+", (2, 4)),
        ("hello", "", (0, 0)),
        ("hello", "$", (5, 5)),
        ("hello", "o$", (4, 5)),
        ("hello", "^h", (0, 1)),
        ("abcabc", "bc", (1, 3)),
        ("abcabc", "b(c)", (1, 3)),
        ("/~alice/docs", "/~(%w+)/", (0, 8)),
        ("f(a(b)c)d", "%b()", (1, 8)),
    ],
)
def test_find_span(subject: str, pattern: str, span: tuple[int, int]) -> None:
    assert find(subject, pattern) == span


ASCII = "".join(map(chr, range(128)))
CLASSES = {
    "a": string.ascii_letters,
    "c": "".join(map(chr, range(32))) + "\x7f",
    "d": string.digits,
    "g": "".join(map(chr, range(33, 127))),
    "l": string.ascii_lowercase,
    "p": string.punctuation,
    "s": " \t\n\v\f\r",
    "u": string.ascii_uppercase,
    "w": string.ascii_letters + string.digits,
    "x": string.hexdigits,
}
NON_ASCII = "\x80\xa0\xe9\xff\u03a9\u4e2d\U0001f600"


@pytest.mark.parametrize("cl", sorted(CLASSES))
def test_class_members(cl: str) -> None:
    members = set(CLASSES[cl])
    for ch in ASCII + NON_ASCII:
        inside = ch in members
        assert (find(ch, "%" + cl) is not None) == inside, (cl, ch)
        assert (find(ch, "%" + cl.upper()) is not None) == (not inside), (cl.upper(), ch)
        assert (find(ch, "[%" + cl + "]") is not None) == inside, (cl, ch)
        assert (find(ch, "[^%" + cl + "]") is not None) == (not inside), (cl, ch)


def test_classes_are_c_locale() -> None:
    # Python's str.isalpha() etc. would say yes to all of these.
    for ch in "\u00e9\u00c9\u00aa\u0661\u00a0\u2028\u03a9":
        assert find(ch, "[%a%d%s%w%l%u%p%g%x]") is None
        assert find(ch, "%c") is None


def test_dot_matches_everything() -> None:
    for ch in ASCII + NON_ASCII:
        assert find(ch, "^.$") == (0, 1)


def test_percent_escapes_every_punctuation() -> None:
    for ch in string.punctuation:
        assert match("x" + ch + "y", "%" + ch) == [ch], ch


def test_percent_z() -> None:
    # OpenBSD dropped Lua's deprecated %z (NUL): it is the letter z.
    assert match("a\0z", "%z") == ["z"]
    assert match("a\0", "%z") is None


MALFORMED: list[tuple[str, str]] = [
    ("abc%", "malformed pattern (ends with '%')"),
    ("%", "malformed pattern (ends with '%')"),
    ("[a%", "malformed pattern (missing ']')"),
    ("[abc", "malformed pattern (missing ']')"),
    ("[", "malformed pattern (missing ']')"),
    ("[]", "malformed pattern (missing ']')"),
    ("[^]", "malformed pattern (missing ']')"),
    ("[a%]", "malformed pattern (missing ']')"),
    ("x[^", "malformed pattern (missing ']')"),
    ("%f[a", "malformed pattern (missing ']')"),
    ("(abc", "unfinished capture"),
    ("((a)", "unfinished capture"),
    ("(()", "unfinished capture"),
    ("a(", "unfinished capture"),
    ("a.)", "invalid pattern capture"),
    ("(a))", "invalid pattern capture"),
    (")(", "invalid pattern capture"),
    ("%1", "invalid capture index"),
    ("%0", "invalid capture index"),
    ("(a)%0", "invalid capture index"),
    ("(a)%2", "invalid capture index"),
    ("(a%1)", "invalid capture index"),  # capture 1 is still open at %1
    ("(a)%9", "invalid capture index"),
    ("%b", "malformed pattern (missing arguments to '%b')"),
    ("%bx", "malformed pattern (missing arguments to '%b')"),
    ("a%b(", "malformed pattern (missing arguments to '%b')"),
    ("%f", "missing '[' after '%f' in pattern"),
    ("%fa", "missing '[' after '%f' in pattern"),
    ("%f%w", "missing '[' after '%f' in pattern"),
    ("()" * (MAXCAPTURES + 1), "too many captures"),
    ("(a)" * (MAXCAPTURES + 1), "too many captures"),
]


@pytest.mark.parametrize(("pattern", "message"), MALFORMED)
def test_check_rejects(pattern: str, message: str) -> None:
    with pytest.raises(PatternError) as exc:
        check(pattern)
    assert str(exc.value) == message


@pytest.mark.parametrize(("pattern", "message"), MALFORMED)
def test_find_and_match_reject(pattern: str, message: str) -> None:
    # Also when the match would fail before reaching the fault (C and Lua
    # only notice it there): a broken pattern is broken for every subject.
    for subject in ("", "zzz", "a" * 40):
        with pytest.raises(PatternError, match="^" + re.escape(message) + "$"):
            find(subject, pattern)
        with pytest.raises(PatternError):
            match(subject, pattern)


def test_pattern_error_is_value_error() -> None:
    assert issubclass(PatternError, ValueError)


@pytest.mark.parametrize(
    "pattern",
    [
        "", "abc", "a)b", "a]b", "^", "$", "^$", "()", "[]]", "[^]]", "[%]]", "%%", "%]",
        "%bxy", "%f[%w]", "(a)%1", "((a)%2)", "%q", "a**", "[a-]", "[%a-]", "(a)*",
        "()" * MAXCAPTURES, "(a)" * MAXCAPTURES, "^/~(%w+)/(.*)$", "%.php$",
    ],
)
def test_check_accepts(pattern: str) -> None:
    check(pattern)


def test_32_captures() -> None:
    subject = "abcdefghijklmnopqrstuvwxyzABCDEF"
    assert len(subject) == MAXCAPTURES == 32
    pattern = "(.)" * 32
    assert match(subject, pattern) == [subject, *subject]
    with pytest.raises(PatternError, match="^too many captures$"):
        match(subject + "G", pattern + "(.)")


def test_position_captures_are_one_based() -> None:
    assert match("abc", "()a()b()c()") == ["abc", "1", "2", "3", "4"]
    assert match("xxabc", "()abc") == ["abc", "3"]
    assert match("abc", "b()") == ["b", "3"]


def test_captures_reset_between_start_positions() -> None:
    # The first start position opens capture 1 and fails; the reported
    # capture must be the one of the successful start.
    assert match("xa:b", "(%a):b") == ["a:b", "a"]
    assert match("xaab", "(%a)%1b") == ["aab", "a"]


DEPTH_OK = "a?" * (MAXCCALLS - 1)


def test_recursion_depth_limit() -> None:
    # Each 'a?' that matched nests one matcher call, as in C.
    assert find("a" * (MAXCCALLS - 1), DEPTH_OK) == (0, MAXCCALLS - 1)
    with pytest.raises(PatternError, match="^pattern too complex$"):
        find("a" * MAXCCALLS, "a?" * MAXCCALLS)
    # The same pattern is fine where it does not nest that deep.
    assert find("b", "a?" * MAXCCALLS) == (0, 0)


def test_depth_limit_counts_captures() -> None:
    # Opening and closing a capture each nest one call.
    pattern = "(a)" * 32 + "a?" * (MAXCCALLS - 1 - 64)
    assert find("a" * 200, pattern) == (0, 32 + MAXCCALLS - 1 - 64)
    with pytest.raises(PatternError, match="^pattern too complex$"):
        find("a" * 200, pattern + "a?")


def test_deep_recursion_never_leaks_recursion_error() -> None:
    def nest(k: int) -> tuple[int, int] | None:
        return find("a" * MAXCCALLS, DEPTH_OK) if k == 0 else nest(k - 1)

    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 150)  # room for the caller, not for the matcher
    try:
        with pytest.raises(PatternError, match="^pattern too complex$"):
            nest(20)
    finally:
        sys.setrecursionlimit(old)


def test_step_budget() -> None:
    # OpenBSD caps repetition work at MAXREPETITION (0xfffff).  ".*%.php$"
    # re-expands '.*' from every start position: quadratic in the length.
    short = "/" + "x" * 999
    assert find(short, ".*%.php$") is None
    long = "/" + "x" * 8191
    with pytest.raises(PatternError, match="^pattern too complex$"):
        find(long, ".*%.php$")
    with pytest.raises(PatternError, match="^pattern too complex$"):
        find("(" * 4000, "(.-)%b()")
    with pytest.raises(PatternError, match="^pattern too complex$"):
        find("a" * 30 + "b", "a*a*a*a*a*a*a*$")


LONG_PATH = "/" + "/".join(f"dir{i}" for i in range(2000))[:8190] + ".html"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("^/(.*)$", [LONG_PATH, LONG_PATH[1:]]),
        ("%.html$", [".html"]),
        ("%.php$", None),
        ("^/(.*)%.html$", [LONG_PATH, LONG_PATH[1:-5]]),
        ("^/(.-)/", ["/dir0/", "dir0"]),
        ("([^/]*)$", [LONG_PATH.rsplit("/", 1)[1], LONG_PATH.rsplit("/", 1)[1]]),
        ("^/[%w/]+%.html$", [LONG_PATH]),
        ("/~(%w+)/(.*)", None),
        ("%f[%w]%w+%.html$", [LONG_PATH.rsplit("/", 1)[1]]),
    ],
)
def test_long_subjects(pattern: str, expected: list[str] | None) -> None:
    assert len(LONG_PATH) > 8192
    assert match(LONG_PATH, pattern) == expected


def test_very_long_greedy_item_uses_no_recursion() -> None:
    s = "a" * 100_000
    assert find(s, "^a*$") == (0, 100_000)
    assert find(s, "^.*$") == (0, 100_000)
    assert find(s + "b", "^a+b$") == (0, 100_001)
    assert find(s + "b", "^a-b") == (0, 100_001)
