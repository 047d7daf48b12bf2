"""shared.glob -- fnmatch(3) patterns (flags 0) as Python regular expressions.

relayd matches them in two places: `expect` of send/expect health checks
(relayd.check_tcp) and the protocol rules' header, path, query, cookie and
url values (relayd.rules).  Python's fnmatch module differs from the C one:
it has no backslash quoting.  This module only translates; callers compile
with the flags they need (DOTALL always: `*` matches newlines too).
"""

from __future__ import annotations

import re


def translate(pat: str) -> str:
    """The regex text of fnmatch(3) pattern `pat`, without anchors.

    `*` and `?` match any character, `/` and a leading `.` included;
    `[...]` with `!` or `^` negation, ranges and `]` first taken literally;
    a backslash quotes the next character, also inside brackets; a `[`
    without its `]` is a literal."""
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        i += 1
        if c == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\" and i < n:
            out.append(re.escape(pat[i]))
            i += 1
        elif c == "[":
            j = i
            neg = j < n and pat[j] in "!^"
            if neg:
                j += 1
            items = []
            first = True
            while j < n and (pat[j] != "]" or first):
                first = False
                ch = pat[j]
                if ch == "\\" and j + 1 < n:
                    j += 1
                    ch = pat[j]
                if j + 2 < n and pat[j + 1] == "-" and pat[j + 2] != "]":
                    hi = pat[j + 2]
                    if hi == "\\" and j + 3 < n:
                        hi = pat[j + 3]
                        j += 1
                    # fnmatch(3) tests lo <= c <= hi: a reversed range
                    # matches nothing (and would not compile as a regex).
                    if ch <= hi:
                        items.append(re.escape(ch) + "-" + re.escape(hi))
                    j += 3
                else:
                    items.append(re.escape(ch))
                    j += 1
            if j >= n:            # no closing bracket: a literal "["
                out.append(re.escape("["))
                continue
            i = j + 1
            if items:
                out.append("[" + ("^" if neg else "") + "".join(items) + "]")
            else:                 # only reversed ranges: any or no character
                out.append(r"[\s\S]" if neg else "(?!)")
        else:
            out.append(re.escape(c))
    if ".*" not in out:
        return "".join(out)
    # Every segment between stars matches a fixed number of characters, so
    # each middle one can take its leftmost place for good (an atomic group,
    # as CPython's fnmatch): "*a*a*a*b" on "aaaa..." stays linear instead of
    # backtracking exponentially on a header value from the network.
    segs = [[]]
    for item in out:
        if item == ".*":
            segs.append([])
        else:
            segs[-1].append(item)
    mid = "".join(f"(?>.*?{''.join(seg)})" for seg in segs[1:-1])
    return "".join(segs[0]) + mid + ".*" + "".join(segs[-1])
