"""relayctl -- control relayd: `relayctl [-j] [-s socket] command [argument ...]`.

The command grammar is OpenBSD's parser.c: each word may be abbreviated to
any prefix that names one keyword (`sh su` is `show summary`); a wrong,
ambiguous, missing or superfluous word prints what is valid there and
exits 1.  The request goes to relayd's control socket (-s, default
/var/run/relayd.sock) as one JSON line (relayd.control); the answer is laid
out exactly as OpenBSD's relayctl prints it, or, with -j (our extension),
printed as the JSON rows relayd sent, one per line.

Differences to OpenBSD, all additions: a failing switch also says why on
stderr next to `command failed`; `reload` and `load` wait for relayd and
print `command failed` (exit 1) when the new file was refused; `load`
sends an absolute path; `stop` answers `command succeeded`.
"""

from __future__ import annotations

import errno
import getopt
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from relayd.config import RELAYD_SOCKET
from relayd.control import LineBuffer, ProtocolError, Request, decode

PROG = "relayctl"
USAGE = f"usage: {PROG} [-j] [-s socket] command [argument ...]\n"
# Pause between connect attempts while `monitor` waits for relayd.
MONITOR_RETRY = 0.1

# -- the grammar (parser.c) ------------------------------------------------------

KEYWORD, HOSTID, TABLEID, RDRID, PATH = "keyword", "hostid", "tableid", "redirectid", "path"


@dataclass(frozen=True)
class Token:
    type: str
    keyword: str = ""
    action: str | None = None
    next: tuple | None = None


_ID = lambda kind: (Token(kind),)   # noqa: E731

T_SHOW = (
    Token(KEYWORD, "summary", "show summary"),
    Token(KEYWORD, "hosts", "show hosts"),
    Token(KEYWORD, "redirects", "show redirects"),
    Token(KEYWORD, "relays", "show relays"),
    Token(KEYWORD, "routers", "show routers"),
    Token(KEYWORD, "sessions", "show sessions"),
)
T_RDR = (
    Token(KEYWORD, "disable", "redirect disable", _ID(RDRID)),
    Token(KEYWORD, "enable", "redirect enable", _ID(RDRID)),
)
T_TABLE = (
    Token(KEYWORD, "disable", "table disable", _ID(TABLEID)),
    Token(KEYWORD, "enable", "table enable", _ID(TABLEID)),
)
T_HOST = (
    Token(KEYWORD, "disable", "host disable", _ID(HOSTID)),
    Token(KEYWORD, "enable", "host enable", _ID(HOSTID)),
)
T_LOG = (
    Token(KEYWORD, "verbose", "log verbose"),
    Token(KEYWORD, "brief", "log brief"),
)
T_MAIN = (
    Token(KEYWORD, "monitor", "monitor"),
    Token(KEYWORD, "show", None, T_SHOW),
    Token(KEYWORD, "load", "load", (Token(PATH),)),
    Token(KEYWORD, "poll", "poll"),
    Token(KEYWORD, "reload", "reload"),
    Token(KEYWORD, "stop", "stop"),
    Token(KEYWORD, "redirect", None, T_RDR),
    Token(KEYWORD, "table", None, T_TABLE),
    Token(KEYWORD, "host", None, T_HOST),
    Token(KEYWORD, "log", None, T_LOG),
)


class ParseError(Exception):
    """What relayctl prints on stderr before exiting 1."""


@dataclass
class Parsed:
    action: str
    target: int | str | None = None   # host/table/redirect id or name
    path: str | None = None

    def request(self) -> Request:
        words = self.action.split()
        if self.target is not None:
            return Request(words[0], words[1:] + [self.target])
        if self.path is not None:
            return Request("load", [self.path])
        return Request(words[0], words[1:])


def _strtonum(word: str) -> int | None:
    """strtonum(word, 0, UINT_MAX): an id, or None for a name."""
    w = word.lstrip(" \t\n\v\f\r")
    if w.startswith("+"):
        w = w[1:]
    if not w.isascii() or not w.isdigit():
        return None
    n = int(w)
    return n if n <= 0xFFFFFFFF else None


def _valid(table: tuple) -> str:
    out = ["valid commands/args:\n"]
    for t in table:
        out.append(f"  {t.keyword}\n" if t.type == KEYWORD else f"  <{t.type}>\n")
    return "".join(out)


def _match(word: str | None, table: tuple, res: Parsed) -> Token:
    matched: list[Token] = []
    for t in table:
        if t.type == KEYWORD:
            if word is not None and t.keyword.startswith(word):
                matched.append(t)
                if t.action:
                    res.action = t.action
        elif t.type in (HOSTID, TABLEID, RDRID):
            if word is not None:
                n = _strtonum(word)
                res.target = word if n is None else n
                matched.append(t)
        elif t.type == PATH:
            if not matched and word:
                res.path = word
                matched.append(t)
    if len(matched) != 1:
        if word is None:
            raise ParseError("missing argument:\n" + _valid(table))
        if matched:
            raise ParseError(f"ambiguous argument: {word}\n" + _valid(table))
        raise ParseError(f"unknown argument: {word}\n" + _valid(table))
    return matched[0]


def parse(args: list[str]) -> Parsed:
    """relayctl's command words -> what to ask; raises ParseError."""
    res = Parsed(action="")
    table = T_MAIN
    i = 0
    while True:
        word = args[i] if i < len(args) else None
        t = _match(word, table, res)
        i += 1
        if t.next is None:
            break
        table = t.next
    if i < len(args):
        raise ParseError(f"superfluous argument: {args[i]}\n")
    return res


# -- output (relayctl.c) -----------------------------------------------------------

HEADER = f"{'Id':<4}\t{'Type':<8}\t{'Name':<24}\t{'Avlblty':<7}\tStatus\n"
_PAD = f"\t{'':8}\t"          # "\t%8s\t" with ""

_STATE = {"up", "down", "unknown"}


def availability(check_cnt: int, up_cnt: int) -> str:
    if not check_cnt:
        return ""
    return f"{up_cnt / check_cnt * 100:.2f}%"


def _line(id: int, kind: str, name: str, avail: str, status: str) -> str:
    return f"{id:<4}\t{kind:<8}\t{name:<24}\t{avail:<7}\t{status}\n"


def rdr_status(row: dict) -> str:
    if row.get("disabled"):
        return "disabled"
    if row.get("down"):
        return "down"
    if row.get("backup"):
        return "active (using backup table)"
    return "active"


def table_status(row: dict) -> str:
    if row.get("disabled"):
        return "disabled"
    if not row.get("up"):
        return "empty"
    return f"active ({row['up']} hosts)"


def host_status(row: dict) -> str:
    if row.get("disabled"):
        return "disabled"
    state = row.get("state", "unknown")
    if state not in _STATE:
        raise ProtocolError(f"invalid status: {state}")
    return state


def relay_status(row: dict) -> str:
    return "disabled" if row.get("disabled") else "active"


def format_stats(stats: list[dict]) -> str:
    """print_statistics(): summed over relay processes, nothing before the
    first session."""
    keys = ("cnt", "last", "avg", "last_hour", "avg_hour", "last_day", "avg_day")
    tot = {k: sum(int(s.get(k, 0)) for s in stats) for k in keys}
    if not tot["cnt"]:
        return ""
    iv = int(stats[0].get("interval", 0))
    return (f"{_PAD}total: {tot['cnt']} sessions\n"
            f"{_PAD}last: {tot['last']}/{iv}s {tot['last_hour']}/h {tot['last_day']}/d sessions\n"
            f"{_PAD}average: {tot['avg']}/{iv}s {tot['avg_hour']}/h {tot['avg_day']}/d sessions\n")


def format_row(mode: str, row: dict) -> str:
    """One `show` row as show_summary_msg() prints it in `mode` (summary,
    hosts, redirects, relays, routers); "" when that mode skips it."""
    kind = row.get("type")
    summary = mode == "summary"
    if kind == "redirect":
        if not (summary or mode == "redirects"):
            return ""
        out = _line(row["id"], "redirect", row["name"], "", rdr_status(row))
        if mode == "redirects":
            out += format_stats(row.get("stats") or [])
        return out
    if kind == "table":
        if not (summary or mode == "hosts"):
            return ""
        return _line(row["id"], "table", row["name"], "", table_status(row))
    if kind == "host":
        if not (summary or mode == "hosts"):
            return ""
        name = row["name"]
        if row.get("parent"):
            name = f"{name} parent {row['parent']}"
        checks, ups = int(row.get("check_cnt", 0)), int(row.get("up_cnt", 0))
        out = _line(row["id"], "host", name, availability(checks, ups), host_status(row))
        if mode == "hosts" and checks:
            out += f"{_PAD}total: {ups}/{checks} checks"
            if row.get("retry_cnt"):
                out += f", {row['retry_cnt']} retries"
            err = row.get("error") or "none"
            if err != "none" and row.get("state") == "down":
                out += f", error: {err}"
            out += "\n"
        return out
    if kind == "relay":
        if not (summary or mode == "relays"):
            return ""
        out = _line(row["id"], "relay", row["name"], "", relay_status(row))
        if mode == "relays":
            out += format_stats(row.get("stats") or [])
        return out
    if kind == "router":
        if not (summary or mode == "routers"):
            return ""
        out = _line(row["id"], "router", row["name"], "", relay_status(row))
        if mode == "routers" and not row.get("disabled"):
            if row.get("rtable"):
                out += f"{_PAD}rtable: {row['rtable']}\n"
            if row.get("rtlabel"):
                out += f"{_PAD}rtlabel: {row['rtlabel']}\n"
            for addr, plen in row.get("routes") or []:
                out += f"{_PAD}route: {addr}/{plen}\n"
        return out
    if kind == "demote":
        # Ours: relayd's demote counter of a carp group (keepalived track file).
        if not summary:
            return ""
        return _line("", "demote", row["name"], "", f"counter {int(row.get('counter', 0))}")
    raise ProtocolError(f"wrong message in summary: {kind}")


def format_show(mode: str, rows: list[dict]) -> str:
    """The whole output of `show <mode>` (header included)."""
    return HEADER + "".join(format_row(mode, r) for r in rows)


def print_time(secs: float) -> str:
    s = max(int(secs), 0)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_session(row: dict) -> str:
    """show_session_msg()."""
    caddr, cport = row["client"]
    baddr, bport = row.get("backend") or ("", 0)
    out = (f"session {row.get('proc', 0)}:{row['id']} {caddr}:{cport} -> {baddr}:{bport}"
           f"\t{'DONE' if row.get('done') else 'RUNNING'}\n")
    out += (f"\tage {print_time(row.get('age', 0))}, idle {print_time(row.get('idle', 0))}, "
            f"relay {row['relay']}, pid {row['pid']}")
    if row.get("tag"):
        out += f", tag (id) {row['tag']}"
    return out + "\n"


# imsg type -> (name, payload printer) as relayctl's monitor knows them.
_MONITOR = {
    36: ("host_status", "status"),
    17: ("ctl_rdr_disable", "id"),
    16: ("ctl_rdr_enable", "id"),
    19: ("ctl_table_disable", "id"),
    18: ("ctl_table_enable", "id"),
    21: ("ctl_host_disable", "id"),
    20: ("ctl_host_enable", "id"),
    12: ("ctl_table_changed", "id"),
    13: ("ctl_pull_ruleset", "id"),
    14: ("ctl_push_ruleset", "id"),
    37: ("sync", None),
}


def format_event(ev: dict, now: int | None = None) -> tuple[str, bool]:
    """monitor(): the event's lines and whether monitoring ends (an imsg
    type relayctl does not know)."""
    now = int(time.time()) if now is None else now
    name, kind = _MONITOR.get(ev.get("imsg"), ("<unknown>", None))
    out = (f"{name}: imsg type {ev.get('imsg', 0)} len {ev.get('len', 0)} "
           f"peerid {ev.get('peerid', 0)} pid {ev.get('pid', 0)}\n"
           f"\ttimestamp: {now}, {time.ctime(now)}\n")
    if kind == "status":
        state = ev.get("state")
        out += f"\tid: {ev['id']}\n\tstate: {state if state in ('up', 'down') else 'unknown'}\n"
    elif kind == "id":
        out += f"\tid: {ev['id']}\n"
        if ev.get("name"):
            out += f"\tname: {ev['name']}\n"
    return out, name == "<unknown>"


# -- main -------------------------------------------------------------------------

class Exit(Exception):
    def __init__(self, code: int, msg: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _errx(msg: str) -> Exit:
    return Exit(1, f"{PROG}: {msg}\n")


def _connect(path: str, monitor: bool) -> socket.socket:
    if len(os.fsencode(path)) >= 108:
        raise _errx(f"socket `{path}' too long")
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError as e:
            s.close()
            # Keep retrying if running in monitor mode
            if monitor and e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                time.sleep(MONITOR_RETRY)
                continue
            raise _errx(f"connect: {path}: {os.strerror(e.errno) if e.errno else e}")


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = LineBuffer()
        self.lines: list[bytes] = []

    def next(self) -> dict:
        while not self.lines:
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                raise _errx(f"read error: {e.strerror or e}")
            if not data:
                raise _errx("pipe closed")
            self.lines += [ln for ln in self.buf.feed(data) if ln.strip()]
        return decode(self.lines.pop(0))


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(parsed: Parsed, sockname: str, as_json: bool) -> int:
    req = parsed.request()
    if req.cmd == "load":
        req.args = [os.path.abspath(req.args[0])]
    sock = _connect(sockname, req.cmd == "monitor")
    with sock:
        if req.cmd == "show" and req.args[0] != "sessions" and not as_json:
            _out(HEADER)
        try:
            sock.sendall(req.encode())
        except OSError as e:
            raise _errx(f"write error: {e.strerror or e}")
        rd = _Reader(sock)
        mode = req.args[0] if req.cmd == "show" else None
        while True:
            row = rd.next()
            kind = row.get("type")
            if kind == "error":
                raise _errx(str(row.get("error")))
            if as_json and kind != "end":
                _out(json.dumps(row) + "\n")
            if req.cmd == "show":
                if kind == "end":
                    return 0
                if not as_json:
                    _out(format_session(row) if mode == "sessions" else format_row(mode, row))
                continue
            if req.cmd == "monitor":
                if kind != "event":
                    continue
                text, done = format_event(row)
                if not as_json:
                    _out(text)
                if done:
                    return 0
                continue
            if kind == "ok":
                if not as_json:
                    if req.cmd == "log":
                        _out("logging request sent.\n")
                    elif req.cmd not in ("reload", "load"):
                        _out("command succeeded\n")
                return 0
            if kind == "fail":
                if not as_json:
                    _out("command failed\n")
                    if row.get("error"):
                        sys.stderr.write(f"{PROG}: {row['error']}\n")
                return 1
            raise _errx(f"wrong message in summary: {kind}")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # A command-line tool: die quietly on a closed pipe (| head) and ^C.
        # Not when called in-process (tests): the caller's handlers stay.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "js:")
    except getopt.GetoptError as e:
        if "requires argument" in e.msg:
            sys.stderr.write(f"{PROG}: option requires an argument -- {e.opt}\n")
        else:
            sys.stderr.write(f"{PROG}: unknown option -- {e.opt}\n")
        sys.stderr.write(USAGE)
        return 1
    sockname, as_json = RELAYD_SOCKET, False
    for o, v in opts:
        if o == "-s":
            sockname = v
        elif o == "-j":
            as_json = True
    try:
        parsed = parse(args)
    except ParseError as e:
        sys.stderr.write(str(e))
        return 1
    try:
        return run(parsed, sockname, as_json)
    except Exit as e:
        sys.stdout.flush()
        sys.stderr.write(e.msg)
        return e.code
    except ProtocolError as e:
        sys.stdout.flush()
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
