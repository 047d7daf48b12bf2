#!/usr/bin/env python3
"""Tandem benchmark: our httpd and relayd against nginx and haproxy, same run.

Every case starts its peers itself (anchor, Tandem daemon, and the bare trio
reference peer from shared/reference/perf/servers when present), drives each
one with wrk, and reports the ratios Tandem / anchor: req/s and CPU efficiency
(anchor µs CPU per request / ours). Rounds are interleaved (round 1 of every
case and peer, then round 2, ...), so a burst of foreign load on this shared
box spoils one run of many peers, not every run of one.

Per run: req/s, MiB/s, p50/p99, server CPU % (user/sys, whole process tree,
from /proc), µs CPU per request, wrk CPU % (rusage), peak RSS (sum of VmHWM),
and the CPU other processes used meanwhile ("foreign"; a run above
--max-foreign % of one core is retried up to --retries times).

Processes: each one is started in its own session (so its own process group)
and stopped by that PID/group, plus any descendant that left the group,
checked by start time. Nothing is ever killed by name.

After the cases, the robustness section (bench/robust.py): reloads under
load, slowloris, idle keep-alive connections; `--no-robust` skips it,
`--robust-only` runs only it.

With --against REV, our daemons also run as of git revision REV (a
worktree in the temp dir, the same generated configs) next to ours in each
round, in alternating order; the report adds ours ÷ REV per round: how a
change moved CPU per request, measured in one run.

usage: bench.py [--rounds 3] [--duration 8] [--cases GLOB ...] [--smoke]
                [--no-ref] [--no-robust | --robust-only] [--list] [--keep]
                [--against REV]
exit: 0 ok; 1 a run failed (start/sanity), a robustness test failed or, with
--smoke, socket errors or non-2xx responses; 2 missing tools; 130
interrupted (SIGINT/SIGTERM).
"""
from __future__ import annotations

import argparse
import fcntl
import fnmatch
import glob
import grp
import http.client
import json
import os
import platform
import pwd
import random
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/report.py)
import robust  # noqa: E402  (bench/robust.py; takes this module as a handle, never imports it)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONF = HERE / "conf"
RESULTS = HERE / "results"
VENV_PY = REPO / ".venv" / "bin" / "python"
REF_DIR = Path(os.environ.get("TANDEM_BENCH_REF",
                              REPO.parent / "shared" / "reference" / "perf" / "servers"))
HZ = os.sysconf("SC_CLK_TCK")
H = "127.0.0.1"
PORTS = range(28000, 29000)
APT = "apt-get install -y nginx-light haproxy wrk slowhttptest"
CLOSE = ("-H", "Connection: close")
KIB, MIB = 1024, 1 << 20
PHP_BODY = 1024

# wrk/server placement: 'pin' = server on core 0, wrk -t1 -c50 on core 1;
# 'both' = nothing pinned, 2 server workers, wrk -t2 -c100;
# 'proxy' = proxy on core 0, backend on core 1 together with wrk -t1 -c50.
TOPO = {
    "pin": dict(server="0", backend="1", wrk="1", t=1, c=50),
    "both": dict(server=None, backend=None, wrk=None, t=2, c=100),
    "proxy": dict(server="0", backend="1", wrk="1", t=1, c=50),
}


class BenchError(Exception):
    """A peer did not start or failed its sanity check."""


# ------------------------------------------------------------------ context
class Ctx:
    """One invocation: temp dir (docroot, certs, configs, logs), ports, caches."""

    def __init__(self, tmp: Path, args):
        self.tmp = tmp
        self.args = args
        self.py = str(VENV_PY)
        self.ref_dir = Path(args.ref_dir)
        self.used_ports: set[int] = set()
        self.checked: dict[tuple, tuple[str | None, bool]] = {}  # (daemon, tpl) -> (reason, fallback)
        self.seq = 0
        self.busy_streak = 0  # consecutive quiet-waits that timed out

    def port(self) -> int:
        """A free port in 28000-28999 with nothing bound to it (not even
        TIME_WAIT leftovers: bind without SO_REUSEADDR), not used before in
        this invocation."""
        cands = [p for p in PORTS if p not in self.used_ports]
        if len(cands) < 50:
            self.used_ports.clear()
            cands = list(PORTS)
        random.shuffle(cands)
        for p in cands:
            s = socket.socket()
            try:
                s.bind((H, p))
            except OSError:
                continue
            finally:
                s.close()
            self.used_ports.add(p)
            return p
        raise BenchError("no free port in 28000-28999")

    def name(self, base: str) -> str:
        self.seq += 1
        return f"{base}-{self.seq}"

    def render(self, template: str, subs: dict, name: str, fallback: bool = False) -> str:
        """Fill @KEY@ in bench/conf/<template>, write it to tmp/conf/<name>.

        Lines starting with ## are dropped; lines ending in #? are dropped in
        the fallback variant, lines ending in #else are only kept in it."""
        out = []
        for line in (CONF / template).read_text().splitlines():
            s = line.rstrip()
            if s.startswith("##"):
                continue
            if s.endswith("#?"):
                if fallback:
                    continue
                s = s[:-2].rstrip()
            elif s.endswith("#else"):
                if not fallback:
                    continue
                s = s[:-5].rstrip()
            out.append(s)
        subs = {"TMP": str(self.tmp), **subs}

        def rep(m):
            if m.group(1) not in subs:
                raise KeyError(f"{template}: no value for @{m.group(1)}@")
            return str(subs[m.group(1)])
        text = re.sub(r"@([A-Z][A-Z0-9_]*)@", rep, "\n".join(out) + "\n")
        path = self.tmp / "conf" / f"{name}{Path(template).suffix}"
        path.write_text(text)
        return str(path)

    def tandem_check(self, daemon: str, template: str, subs: dict,
                     root: Path = REPO) -> tuple[str | None, bool]:
        """`python -m DAEMON -n -f conf` run in `root`, full variant then
        fallback (if the template has one). Returns (reason it is n/a or
        None, use fallback)."""
        key = (daemon, template, root)
        if key in self.checked:
            return self.checked[key]
        text = (CONF / template).read_text()
        variants = [False] + ([True] if re.search(r"#(\?|else)\s*$", text, re.M) else [])
        reason = None
        for fb in variants:
            conf = self.render(template, subs, self.name(f"check-{daemon}"), fallback=fb)
            try:
                p = subprocess.run([self.py, "-m", daemon, "-n", "-f", conf], cwd=root,
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=60)
                rc, msg = p.returncode, (p.stderr + p.stdout).strip()
            except subprocess.TimeoutExpired:
                rc, msg = -1, "config test timed out"
            if rc == 0:
                self.checked[key] = (None, fb)
                return self.checked[key]
            if reason is None:  # report why the full variant failed
                lines = [x for x in msg.splitlines() if x.strip() and x.strip() != "configuration OK"]
                reason = (lines[-1] if lines else f"exit {rc}").strip()
                reason = reason.replace(str(self.tmp / "conf") + "/", "").replace(self.py + ": ", "")[:200]
        self.checked[key] = (f"`{daemon} -n` rejects {template}: {reason}", False)
        return self.checked[key]


# ------------------------------------------------------------------ processes
@dataclass
class Proc:
    name: str
    argv: list
    cpus: str | None
    ready: tuple               # ("tcp", port) or ("unix", path)
    role: str = "sut"          # sut | backend
    cwd: str | None = None
    pre: Callable | None = None  # called right before starting
    popen: subprocess.Popen | None = None
    log: str = ""

    def cmdline(self) -> list[str]:
        return (["taskset", "-c", self.cpus] if self.cpus is not None else []) + [str(a) for a in self.argv]


LIVE: list[Proc] = []   # started and not yet stopped (for cleanup on errors)


def is_ready(ready) -> bool:
    kind, where = ready
    fam = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
    addr = (H, where) if kind == "tcp" else str(where)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(0.2)
    try:
        s.connect(addr)
        return True
    except OSError:
        return False
    finally:
        s.close()


def log_tail(path: str, n: int = 6) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def start_procs(ctx: Ctx, procs: list[Proc], timeout: float = 20.0) -> None:
    for p in procs:
        if p.pre:
            p.pre()
        p.log = str(ctx.tmp / "logs" / f"{p.name}.log")
        with open(p.log, "ab") as log:
            p.popen = subprocess.Popen(p.cmdline(), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=p.cwd, start_new_session=True)
        LIVE.append(p)
        t0 = time.monotonic()
        while not is_ready(p.ready):
            if p.popen.poll() is not None:
                raise BenchError(f"{p.name} exited with {p.popen.returncode}: {log_tail(p.log)}")
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"{p.name} not ready on {p.ready[1]} after {timeout:.0f}s: "
                                 f"{log_tail(p.log)}")
            time.sleep(0.05)
    time.sleep(0.2)


def stop_procs(procs: list[Proc], grace: float = 10.0) -> None:
    """SIGTERM each peer's own process group, SIGKILL after `grace`; then
    SIGKILL leftovers of its process tree (same start time only)."""
    for p in reversed(procs):
        if p.popen is None:
            continue
        snap, _, _ = snapshot()
        tree = {pid: snap[pid]["start"] for pid in descendants(snap, [p.popen.pid])}
        try:
            os.killpg(p.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.popen.wait()
        deadline = time.monotonic() + grace
        while True:
            alive = []
            for pid, st in tree.items():
                now = read_stat(pid)
                if now and now["start"] == st and now["state"] != "Z":
                    alive.append(pid)
            if not alive:
                break
            if time.monotonic() > deadline:
                for pid in alive:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5
            time.sleep(0.05)
        p.popen = None
        if p in LIVE:
            LIVE.remove(p)


# ------------------------------------------------------------------ /proc
def read_stat(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read().decode("latin-1")
    except OSError:
        return None
    rp = s.rindex(")")
    f = s[rp + 2:].split()
    return dict(pid=pid, state=f[0], ppid=int(f[1]), utime=int(f[11]), stime=int(f[12]),
                start=int(f[19]), kthread=(int(f[1]) == 2 or pid == 2))


def snapshot():
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = read_stat(int(d))
            if st:
                procs[st["pid"]] = st
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return procs, cpu, time.monotonic()


def descendants(procs: dict, roots) -> set[int]:
    kids: dict[int, list[int]] = {}
    for p in procs.values():
        kids.setdefault(p["ppid"], []).append(p["pid"])
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in out:
            out.add(pid)
            todo.extend(kids.get(pid, []))
    return out


def tree_ticks(a: dict, b: dict, pids) -> tuple[int, int]:
    """(user, sys) ticks used between snapshots a and b by `pids`."""
    u = s = 0
    for pid in pids:
        if pid not in b:
            continue
        if pid in a and a[pid]["start"] == b[pid]["start"]:
            u += b[pid]["utime"] - a[pid]["utime"]
            s += b[pid]["stime"] - a[pid]["stime"]
        else:  # started during the run
            u += b[pid]["utime"]
            s += b[pid]["stime"]
    return u, s


def status_kib(pid: int, key: str = "VmHWM") -> int:
    """A KiB field of /proc/PID/status (VmHWM: peak RSS, VmRSS: now); 0
    when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def busy_pct(cpu_a, cpu_b, dt) -> float:
    """Whole-box busy CPU in % of ONE core."""
    d = [y - x for x, y in zip(cpu_a, cpu_b)]
    return 100.0 * (sum(d[:8]) - d[3] - d[4]) / HZ / dt


def wait_quiet(limit=12.0, max_wait=20.0) -> tuple[float, float]:
    t0 = time.monotonic()
    while True:
        _, a, ta = snapshot()
        time.sleep(1.0)
        _, b, tb = snapshot()
        pct = busy_pct(a, b, tb - ta)
        if pct < limit or time.monotonic() - t0 > max_wait:
            return pct, time.monotonic() - t0


# ------------------------------------------------------------------ wrk
UNITS = {"B": 1, "KB": KIB, "MB": MIB, "GB": 1 << 30, "TB": 1 << 40}


def to_ms(s: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def parse_wrk(out: str) -> dict:
    r: dict = {"requests": 0, "bytes": 0.0}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    if m:
        r["requests"] = int(m.group(1))
        r["bytes"] = float(m.group(4)) * UNITS[m.group(5)]
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    r["mibps"] = float(m.group(1)) * UNITS[m.group(2)] / MIB if m else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            r[f"p{pct}_ms"] = to_ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    return r


def parse_h2load(out: str) -> dict:
    """h2load's summary in parse_wrk()'s terms (no percentiles: h2load
    prints none); failed/errored streams count as socket errors."""
    r: dict = {"requests": 0, "bytes": 0.0, "rps": 0.0, "mibps": 0.0}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s, ([\d.]+)(\w+)/s", out)
    if m:
        r["rps"] = float(m.group(1))
        r["mibps"] = float(m.group(2)) * UNITS[m.group(3)] / MIB
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if m:
        r["requests"] = int(m.group(2))
        r["errors"] = {"failed": int(m.group(3)), "errored": int(m.group(4)),
                       "timeout": int(m.group(5))}
    else:
        r["errors"] = {}
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    r["non2xx"] = sum(int(x) for x in m.groups()[2:]) if m else 0
    m = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if m:
        r["p50_ms"] = to_ms(m.group(1))        # the mean: h2load has no median
    return r


def parse_out(case: "Case", out: str) -> dict:
    return parse_h2load(out) if case.client == "h2load" else parse_wrk(out)


def wrk_argv(case: "Case", url: str, duration: int, latency: bool = True) -> list[str]:
    topo = TOPO[case.topo]
    if case.client == "h2load":
        # HTTP/2: one client thread, 10 connections x 10 streams (ALPN h2 on https).
        cmd = ["h2load", "-t1", "-c10", "-m10", "-D", str(duration), url]
        return (["taskset", "-c", topo["wrk"]] if topo["wrk"] is not None else []) + cmd
    cmd = ["wrk", f"-t{topo['t']}", f"-c{topo['c']}", f"-d{duration}s"]
    cmd += ["--latency"] if latency else []
    cmd += list(case.headers) + [url]
    return (["taskset", "-c", topo["wrk"]] if topo["wrk"] is not None else []) + cmd


def run_wrk(argv: list[str], duration: int) -> tuple[str, float, float, int]:
    """Run wrk; returns (output, user s, sys s, exit code) with rusage via wait4."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    chunks, deadline = [], time.monotonic() + duration + 30
    try:
        fd = p.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(p.pid, signal.SIGKILL)
                break
            r, _, _ = select.select([fd], [], [], left)
            if r:
                data = os.read(fd, 65536)
                if not data:
                    break
                chunks.append(data)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    finally:
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
    return b"".join(chunks).decode(errors="replace"), ru.ru_utime, ru.ru_stime, p.returncode


# ------------------------------------------------------------------ sanity
def sanity(url: str, size: int) -> None:
    """One GET outside wrk: status 200 and exactly `size` body bytes."""
    m = re.match(r"(https?)://([^:/]+):(\d+)(/.*)", url)
    scheme, host, port, path = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    try:
        if scheme == "https":
            tls = ssl.create_default_context()
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(host, port, context=tls, timeout=10)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        raise BenchError(f"sanity GET {url}: {type(e).__name__}: {e}") from None
    if resp.status != 200 or len(body) != size:
        raise BenchError(f"sanity GET {url}: status {resp.status}, {len(body)} bytes (want 200, {size})")


# ------------------------------------------------------------------ cases
Req = Callable[[Ctx, "Case"], "str | None"]   # prerequisite: reason it is n/a, or None


@dataclass
class Peer:
    label: str                  # in tables: httpd, nginx, trio-fileserver ...
    kind: str                   # ours | anchor | ref | base (ours at --against REV)
    build: Callable             # (ctx, case, backend_port) -> (procs, port, note)
    requires: list = field(default_factory=list)
    daemon: str = ""            # ours: httpd | relayd, and its config template
    template: Callable | None = None


@dataclass
class Case:
    name: str
    group: str                  # httpd | relayd
    path: str
    size: int
    peers: list
    headers: tuple = ()
    topo: str = "pin"
    workers: int = 1
    variant: str = "plain"      # plain | tls | h2 | fcgi (which server config)
    client: str = "wrk"         # wrk | h2load (HTTP/2)
    backend: Callable | None = None  # (ctx, case) -> (procs, port or None)
    requires: list = field(default_factory=list)
    target: float | None = None
    target_metric: str = "rps"  # rps | cpu_eff
    note: str = ""

    @property
    def scheme(self) -> str:
        return "https" if self.variant in ("tls", "h2") else "http"


# -- prerequisites
def need_tool(tool: str, hint: str) -> Req:
    return lambda ctx, case: None if shutil.which(tool) else f"{tool} not installed ({hint})"


def need_venv(ctx, case):
    return None if os.access(ctx.py, os.X_OK) else f"{ctx.py} missing (make venv)"


def need_ref(script: str) -> Req:
    def check(ctx, case):
        if ctx.args.no_ref:
            return "--no-ref"
        if not (ctx.ref_dir / script).is_file():
            return f"reference peer {ctx.ref_dir / script} not found"
        return need_venv(ctx, case)
    return check


def php_fpm_bin() -> str | None:
    for b in sorted(glob.glob("/usr/sbin/php-fpm*"), reverse=True):
        if os.access(b, os.X_OK):
            return b
    return shutil.which("php-fpm")


def need_php(ctx, case):
    return None if php_fpm_bin() else "php-fpm not installed (apt-get install -y php-fpm)"


# -- anchors
def nginx_proc(ctx: Ctx, case: Case, cpus, role="sut", workers=1):
    name = ctx.name("nginx" if role == "sut" else "nginx-backend")
    port, tls_port = ctx.port(), ctx.port()
    conf = ctx.render("nginx.conf", dict(NAME=name, WORKERS=workers, PORT=port, TLS_PORT=tls_port), name)
    argv = ["nginx", "-p", str(ctx.tmp), "-e", str(ctx.tmp / "logs" / f"{name}-error.log"), "-c", conf]
    use = tls_port if (role == "sut" and case.variant in ("tls", "h2")) else port
    return Proc(name, argv, cpus, ("tcp", use), role), use


def nginx() -> Peer:
    def build(ctx, case, be):
        p, port = nginx_proc(ctx, case, TOPO[case.topo]["server"], workers=case.workers)
        return [p], port, ""
    return Peer("nginx", "anchor", build, [need_tool("nginx", APT)])


def haproxy(mode: str) -> Peer:
    """mode: http | rules | h2 | tcp | splice | tls (one frontend of conf/haproxy.cfg)."""
    def build(ctx, case, be):
        name = ctx.name("haproxy")
        ports = {k: ctx.port() for k in ("HTTP_PORT", "RULES_PORT", "H2_PORT", "TCP_PORT",
                                         "SPLICE_PORT", "TLS_PORT")}
        conf = ctx.render("haproxy.cfg", dict(BACKEND=be, **ports), name)
        port = ports[f"{mode.upper()}_PORT"]
        return [Proc(name, ["haproxy", "-db", "-f", conf], TOPO[case.topo]["server"], ("tcp", port))], port, ""
    return Peer(f"haproxy {mode}", "anchor", build, [need_tool("haproxy", APT)])


# -- Tandem
def tandem(daemon: str, template: Callable[[Case], str], root: Path = REPO,
           label: str = "", kind: str = "ours") -> Peer:
    """Our daemon: `<repo>/.venv/bin/python -m DAEMON -d -f <generated conf>`,
    run in `root` (the tree, or with --against the base revision's worktree:
    `-m` imports the packages of the working directory first)."""
    def subs(case, port, be):
        return dict(PORT=port, WORKERS=case.workers, BACKEND=be or 1)

    def check(ctx, case):
        return need_venv(ctx, case) or \
            ctx.tandem_check(daemon, template(case), subs(case, 1, 1), root)[0]

    def build(ctx, case, be):
        _, fallback = ctx.tandem_check(daemon, template(case), subs(case, 1, 1), root)
        name = ctx.name(daemon)
        port = ctx.port()
        conf = ctx.render(template(case), subs(case, port, be), name, fallback=fallback)
        note = f"fallback config (without the #? lines of {template(case)})" if fallback else ""
        argv = [ctx.py, "-m", daemon, "-d", "-f", conf]
        return [Proc(name, argv, TOPO[case.topo]["server"], ("tcp", port), cwd=str(root))], port, note
    return Peer(label or daemon, kind, build, [check], daemon=daemon, template=template)


def httpd() -> Peer:
    return tandem("httpd", lambda c: {"plain": "httpd.conf", "tls": "httpd-tls.conf",
                                      "h2": "httpd-h2.conf", "fcgi": "httpd-fcgi.conf"}[c.variant])


def relayd(kind: str) -> Peer:
    return tandem("relayd", lambda c: f"relayd-{kind}.conf")


# -- bare trio reference peers (shared/reference/perf/servers), repo venv python
def ref(script: str, label: str, args: Callable) -> Peer:
    def build(ctx, case, be):
        port = ctx.port()
        argv = [ctx.py, str(ctx.ref_dir / script), "--port", port, *args(ctx, case, be)]
        if case.workers > 1:
            argv += ["--workers", case.workers]
        return [Proc(ctx.name(label), argv, TOPO[case.topo]["server"], ("tcp", port),
                     cwd=str(ctx.ref_dir))], port, ""
    return Peer(label, "ref", build, [need_ref(script)])


def ref_file():
    return ref("trio_fileserver.py", "trio-fileserver", lambda ctx, c, be: ["--root", ctx.tmp / "www"])


def ref_tls():
    return ref("trio_tls.py", "trio-tls", lambda ctx, c, be: ["--cert", ctx.tmp / "tls/ec.crt",
                                                              "--key", ctx.tmp / "tls/ec.key"])


def ref_httpproxy():
    return ref("trio_httpproxy.py", "trio-httpproxy", lambda ctx, c, be: ["--backend", f"{H}:{be}"])


def ref_relay():
    return ref("trio_relay.py", "trio-relay-splice", lambda ctx, c, be: ["--backend", f"{H}:{be}",
                                                                         "--mode", "splice"])


# -- backends
def nginx_backend(ctx, case):
    p, port = nginx_proc(ctx, case, TOPO[case.topo]["backend"], role="backend")
    return [p], port


def php_backend(ctx, case):
    name = ctx.name("php-fpm")
    try:
        user = pwd.getpwnam("www-data")
    except KeyError:
        user = pwd.getpwnam("nobody")
    conf = ctx.render("php-fpm.conf", dict(USER=user.pw_name, GROUP=grp.getgrgid(user.pw_gid).gr_name), name)
    sock = ctx.tmp / "run" / "php.sock"
    return [Proc(name, [php_fpm_bin(), "-F", "-y", conf], TOPO[case.topo]["backend"], ("unix", sock),
                 role="backend", pre=lambda: sock.unlink(missing_ok=True))], None


def define_cases() -> list[Case]:
    """The case table. A case: one URL, one wrk profile, its peers in run
    order (anchor first), its target for Tandem / anchor (from the issues)."""
    ng = need_tool("nginx", APT)
    return [
        # httpd vs nginx, server on core 0, wrk on core 1
        Case("1k-ka", "httpd", "/1k.bin", KIB, [nginx(), httpd(), ref_file()], target=0.40),
        Case("1k-close", "httpd", "/1k.bin", KIB, [nginx(), httpd(), ref_file()], headers=CLOSE,
             target=0.30),
        Case("1m-ka", "httpd", "/1m.bin", MIB, [nginx(), httpd(), ref_file()], target=0.90),
        Case("1k-ka-2w", "httpd", "/1k.bin", KIB, [nginx(), httpd(), ref_file()], topo="both",
             workers=2, target=0.40, note="prefork 2 / worker_processes 2, unpinned, wrk -t2 -c100"),
        Case("tls-ec-close", "httpd", "/1k.bin", KIB, [nginx(), httpd(), ref_tls()], headers=CLOSE,
             variant="tls", target=0.90, note="TLS full handshakes/s, ECDSA P-256, no tickets"),
        Case("tls-ec-ka", "httpd", "/1k.bin", KIB, [nginx(), httpd(), ref_tls()], variant="tls",
             target=0.35),
        Case("h2-tls-1k", "httpd", "/1k.bin", KIB, [nginx(), httpd()], variant="h2",
             client="h2load", requires=[need_tool("h2load", "apt-get install -y nghttp2-client")],
             note="HTTP/2 over TLS (ALPN h2), h2load -c 10 -m 10; floor: httpd >= 0.3x its own "
                  "tls-ec-ka req/s in the same run"),
        Case("fcgi-php", "httpd", "/bench.php", PHP_BODY, [nginx(), httpd()], variant="fcgi",
             backend=php_backend, requires=[need_php], target=0.70,
             note="same php-fpm (pm static 4, chrooted) on core 1 with wrk"),
        # relayd vs haproxy: proxy on core 0; backend nginx and wrk on core 1
        Case("http-1k", "relayd", "/1k.bin", KIB, [haproxy("http"), relayd("http"), ref_httpproxy()],
             topo="proxy", backend=nginx_backend, requires=[ng], target=0.45),
        Case("http-1k-close", "relayd", "/1k.bin", KIB,
             [haproxy("http"), relayd("http"), ref_httpproxy()], headers=CLOSE, topo="proxy",
             backend=nginx_backend, requires=[ng],
             note="a new client connection per request (listen backlog under a burst)"),
        Case("http-1k-rules", "relayd", "/1k.bin", KIB, [haproxy("rules"), relayd("rules")],
             topo="proxy", backend=nginx_backend, requires=[ng],
             note="3 request header rules (relayd match ... set / haproxy http-request set-header)"),
        Case("http-h2-1k", "relayd", "/1k.bin", KIB, [haproxy("h2"), relayd("h2")], topo="proxy",
             variant="h2", client="h2load", backend=nginx_backend,
             requires=[ng, need_tool("h2load", "apt-get install -y nghttp2-client")],
             note="HTTP/2 over TLS to the proxy (ALPN h2), HTTP/1.1 to nginx; h2load -c 10 -m 10; "
                  "anchor: haproxy bind ... alpn h2,http/1.1"),
        Case("http-1m", "relayd", "/1m.bin", MIB, [haproxy("http"), relayd("http"), ref_httpproxy()],
             topo="proxy", backend=nginx_backend, requires=[ng]),
        Case("tls-1k-close", "relayd", "/1k.bin", KIB, [haproxy("tls"), relayd("tls")],
             headers=CLOSE, variant="tls", topo="proxy", backend=nginx_backend, requires=[ng],
             note="TLS termination, full handshakes/s (ECDSA P-256, no tickets); relayd signs "
                  "in its ca process"),
        Case("tcp-1k", "relayd", "/1k.bin", KIB, [haproxy("tcp"), relayd("tcp"), ref_relay()],
             topo="proxy", backend=nginx_backend, requires=[ng]),
        Case("tcp-1m", "relayd", "/1m.bin", MIB, [haproxy("splice"), relayd("tcp"), ref_relay()],
             topo="proxy", backend=nginx_backend, requires=[ng], target=0.95,
             note="anchor: haproxy mode tcp with splice-request/splice-response"),
    ]


# ------------------------------------------------------------------ setup
def check_tools() -> None:
    missing = [t for t in ("nginx", "haproxy", "wrk") if not shutil.which(t)]
    if missing:
        print(f"bench: missing {', '.join(missing)}; install with:\n  {APT}", file=sys.stderr)
        sys.exit(2)
    for t, pkg in (("taskset", "util-linux"), ("openssl", "openssl")):
        if not shutil.which(t):
            print(f"bench: missing {t}; install with:\n  apt-get install -y {pkg}", file=sys.stderr)
            sys.exit(2)
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        print(f"bench: needs CPUs 0 and 1 (have {sorted(cpus)})", file=sys.stderr)
        sys.exit(2)


def make_tmp(keep: bool) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    os.chmod(tmp, 0o755)  # chroot for httpd and php-fpm; workers may drop privileges
    for d in ("www", "tls", "conf", "logs", "run"):
        (tmp / d).mkdir(mode=0o755)
    (tmp / "www" / "1k.bin").write_bytes(os.urandom(KIB))
    (tmp / "www" / "1m.bin").write_bytes(os.urandom(MIB))
    (tmp / "www" / "bench.php").write_text(f'<?php echo str_repeat("x", {PHP_BODY});\n')
    for f in (tmp / "www").iterdir():
        os.chmod(f, 0o644)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", tmp / "tls/ec.key", "-out", tmp / "tls/ec.crt", "-days", "30",
                    "-subj", "/CN=localhost"], check=True, capture_output=True)
    # relayd's keypair "ec" (RELAYD_SSL_DIR/ec.crt, private/ec.key); haproxy's crt file.
    (tmp / "tls" / "private").mkdir(mode=0o700)
    key, crt = (tmp / "tls/ec.key").read_bytes(), (tmp / "tls/ec.crt").read_bytes()
    (tmp / "tls/private/ec.key").write_bytes(key)
    (tmp / "tls/ec.pem").write_bytes(crt + key)
    os.environ["RELAYD_SSL_DIR"] = str(tmp / "tls")
    return tmp


LOCK = "/tmp/tandem-bench.lock"


def take_lock():
    """One benchmark at a time on this box: runs from other sessions would
    spoil each other. Waits for the holder; released when we exit."""
    f = open(LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        print(f"bench: waiting for another bench run to finish ({f.read().strip() or '?'})", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}, cwd {os.getcwd()}\n")
    f.flush()
    return f


def add_base_peers(cases: list[Case], tmp: Path, rev: str) -> tuple[Path, str]:
    """--against REV: a worktree of REV in the temp dir, and after each of
    our peers the same daemon run from it (kind "base", label DAEMON@REV),
    with the same generated config.  Returns (worktree, short revision)."""
    short = subprocess.run(["git", "rev-parse", "--short", f"{rev}^{{commit}}"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    if not short:
        raise BenchError(f"--against {rev}: no such revision")
    wt = tmp / f"base-{short}"
    p = subprocess.run(["git", "worktree", "add", "--detach", str(wt), short], cwd=REPO,
                       capture_output=True, text=True)
    if p.returncode:
        raise BenchError(f"--against {rev}: git worktree add: {p.stderr.strip()}")
    for c in cases:
        peers = []
        for peer in c.peers:
            peers.append(peer)
            if peer.kind == "ours":
                peers.append(tandem(peer.daemon, peer.template, root=wt,
                                    label=f"{peer.daemon}@{short}", kind="base"))
        c.peers = peers
    return wt, short


def interleave(peers: list[Peer], rnd: int) -> list[Peer]:
    """A round's run order: ours and base swap places every other round, so
    a drift of the box's speed does not favour one of them."""
    if rnd % 2:
        return peers
    out = list(peers)
    for i, p in enumerate(out[:-1]):
        if p.kind == "ours" and out[i + 1].kind == "base":
            out[i], out[i + 1] = out[i + 1], p
    return out


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "?"


# ------------------------------------------------------------------ one run
QUIET = 12.0      # % of one core: below this the box counts as quiet
BUSY_STREAK = 3   # quiet-waits in a row that time out: the box is persistently busy


def measure(ctx: Ctx, case: Case, procs: list[Proc], url: str, args) -> dict:
    argv = wrk_argv(case, url, args.duration)
    best = None
    pinned = TOPO[case.topo]["wrk"] is not None
    for attempt in range(args.retries + 1):
        # A persistently busy box (other sessions' jobs) makes waiting and
        # retrying pointless: sample 1 s, run once, and flag the run.
        busy = ctx.busy_streak >= BUSY_STREAK
        if args.quiet_wait > 0:
            quiet, waited = wait_quiet(QUIET, min(args.quiet_wait, 1.0) if busy else args.quiet_wait)
            if quiet >= QUIET:
                ctx.busy_streak += 1
                if ctx.busy_streak == BUSY_STREAK:
                    print(f"      box busy ({quiet:.0f}% of a core) for {BUSY_STREAK} waits in a row: "
                          "no more waiting or retrying until it is quiet", flush=True)
            else:
                ctx.busy_streak = 0
            busy = ctx.busy_streak >= BUSY_STREAK
        else:
            quiet, waited = 0.0, 0.0
        a, ca, ta = snapshot()
        self_a = resource.getrusage(resource.RUSAGE_SELF)
        out, wu, ws, rc = run_wrk(argv, args.duration)
        self_b = resource.getrusage(resource.RUSAGE_SELF)
        b, cb, tb = snapshot()
        dt = tb - ta
        r = parse_out(case, out)
        mine: set[int] = set()
        ticks = {"sut": [0, 0], "backend": [0, 0]}
        for p in procs:
            pids = descendants(a, [p.popen.pid]) | descendants(b, [p.popen.pid])
            mine |= pids
            u, s = tree_ticks(a, b, pids)
            ticks[p.role][0] += u
            ticks[p.role][1] += s
        # foreign load: other processes seen in both snapshots, plus the
        # /proc/stat user time nobody of ours accounts for (short-lived ones)
        scan = 0
        for pid, st in b.items():
            if pid in mine or pid == os.getpid() or st["kthread"] or pid not in a \
                    or a[pid]["start"] != st["start"]:
                continue
            scan += st["utime"] + st["stime"] - a[pid]["utime"] - a[pid]["stime"]
        du = [y - x for x, y in zip(ca, cb)]
        mine_user = sum(b[pid]["utime"] - a[pid]["utime"] for pid in mine
                        if pid in a and pid in b and a[pid]["start"] == b[pid]["start"])
        self_user = self_b.ru_utime - self_a.ru_utime
        user_est = (du[0] + du[1]) - mine_user - (wu + self_user) * HZ
        pct = lambda t: t / HZ / dt * 100
        sut = sum(ticks["sut"])
        r.update(
            wall_s=round(dt, 3), wrk_rc=rc, attempt=attempt,
            sut_cpu_pct=pct(sut), sut_user_pct=pct(ticks["sut"][0]), sut_sys_pct=pct(ticks["sut"][1]),
            backend_cpu_pct=pct(sum(ticks["backend"])),
            wrk_cpu_pct=(wu + ws) / dt * 100, wrk_user_pct=wu / dt * 100,
            box_busy_pct=busy_pct(ca, cb, dt),
            foreign_pct=pct(max(scan, 0)), foreign_user_est_pct=pct(max(user_est, 0)),
            pre_quiet_pct=quiet, waited_s=round(waited, 1),
            wrk_out=out,
        )
        r["us_per_req"] = sut / HZ / r["requests"] * 1e6 if r["requests"] else None
        # the user-time estimate is noisy when both cores are saturated (unpinned runs)
        r["foreign_max_pct"] = max(r["foreign_pct"], r["foreign_user_est_pct"] if pinned else 0)
        r["spoiled"] = r["foreign_max_pct"] > args.max_foreign
        r["client_bound"] = r["wrk_cpu_pct"] >= 95 * TOPO[case.topo]["t"]
        if best is None or r["foreign_max_pct"] < best["foreign_max_pct"]:
            best = r
        if not r["spoiled"] or busy:
            break
        if attempt < args.retries:
            print(f"      foreign load {r['foreign_max_pct']:.0f}% of a core, retrying", flush=True)
    return best


def run_one(ctx: Ctx, case: Case, peer: Peer, rnd: int, args) -> dict:
    rec = dict(type="run", case=case.name, group=case.group, peer=peer.label, kind=peer.kind,
               round=rnd, workers=case.workers, ts=time.time())
    procs: list[Proc] = []
    try:
        be_port = None
        if case.backend:
            be_procs, be_port = case.backend(ctx, case)
            procs += be_procs
        pprocs, port, note = peer.build(ctx, case, be_port)
        procs += pprocs
        url = f"{case.scheme}://{H}:{port}{case.path}"
        rec.update(url=url, note=note, wrk_cmd=" ".join(wrk_argv(case, url, args.duration)),
                   server_cmds=[(f"(in {p.cwd}) " if p.cwd and Path(p.cwd) != REPO else "")
                                + " ".join(p.cmdline()) for p in procs])
        start_procs(ctx, procs)
        sanity(url, case.size)
        if args.warmup:
            run_wrk(wrk_argv(case, url, args.warmup, latency=False), args.warmup)
        rec.update(measure(ctx, case, procs, url, args))
        snap, _, _ = snapshot()
        for role in ("sut", "backend"):
            pids = set().union(*[descendants(snap, [p.popen.pid]) for p in procs if p.role == role])
            rec[f"{role}_rss_kib"] = sum(status_kib(x) for x in pids)
            rec[f"{role}_nproc"] = len(pids)
        # the peer must still be alive and well after the load
        for p in procs:
            if p.popen.poll() is not None:
                raise BenchError(f"{p.name} died during the run: {log_tail(p.log)}")
        sanity(url, case.size)
    except BenchError as e:
        rec.update(type="fail", error=str(e))
    finally:
        stop_procs(procs)
    return rec


# ------------------------------------------------------------------ main
def fmt_run(r: dict) -> str:
    if r["type"] == "fail":
        return f"FAILED: {r['error']}"
    us = f"{r['us_per_req']:.1f}" if r.get("us_per_req") else "-"
    err = sum(r["errors"].values())
    flags = "".join([" ⚑client-bound" if r["client_bound"] else "",
                     " ⚑spoiled" if r["spoiled"] else "",
                     f" ⚑{err} sock err" if err else "", f" ⚑{r['non2xx']} non-2xx" if r["non2xx"] else ""])
    return (f"{r['rps']:>10,.0f} req/s {r['mibps']:8.1f} MiB/s  {us:>6} µs/req  "
            f"cpu {r['sut_cpu_pct']:3.0f}%  wrk {r['wrk_cpu_pct']:3.0f}%  "
            f"p99 {r.get('p99_ms', 0):6.2f} ms  foreign {r['foreign_max_pct']:2.0f}%{flags}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds of each measured wrk run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up (0: none)")
    ap.add_argument("--cases", nargs="+", default=["*"], metavar="GLOB",
                    help="case names or groups (httpd, relayd) to run")
    ap.add_argument("--smoke", action="store_true",
                    help="1 round of 2 s, no warm-up or quiet wait; exit 1 on socket errors, "
                         "non-2xx or a failed sanity check")
    ap.add_argument("--no-ref", action="store_true", help="skip the bare trio reference peers")
    ap.add_argument("--ref-dir", default=str(REF_DIR), help="reference peers (default: %(default)s)")
    ap.add_argument("--max-foreign", type=float, default=10.0,
                    help="%% of one core used by other processes that spoils a run")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a spoiled run")
    ap.add_argument("--quiet-wait", type=float, default=20.0, metavar="S",
                    help="before each run, wait up to S s for the box to be quiet (0: don't)")
    ap.add_argument("--out", help="JSONL file (default: bench/results/<time>.jsonl)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--against", metavar="REV",
                    help="also run our daemons as of git revision REV (a worktree in the temp "
                         "dir), next to ours in every round; adds the before/after table")
    rob = ap.add_mutually_exclusive_group()
    rob.add_argument("--no-robust", action="store_true",
                     help="skip the robustness section (reloads, slowloris, idle connections)")
    rob.add_argument("--robust-only", action="store_true",
                     help="run only the robustness section")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.retries, args.quiet_wait = 1, 2, 0, 0, 0

    cases = [c for c in define_cases() if not args.robust_only
             and any(fnmatch.fnmatch(c.name, g) or fnmatch.fnmatch(c.group, g) for g in args.cases)]
    if args.list:
        for c in cases:
            print(f"{c.name:14} {c.group:7} {c.topo:6} target {c.target or '-'}  "
                  f"peers: {', '.join(p.label for p in c.peers)}  {c.note}")
        return 0
    if not cases and not args.robust_only:
        print(f"bench: no case matches {args.cases}", file=sys.stderr)
        return 2
    check_tools()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        lock = take_lock()  # noqa: F841  (held until exit)
    except KeyboardInterrupt:
        return 130

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / f"{stamp}{'-smoke' if args.smoke else ''}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp(args.keep)
    ctx = Ctx(tmp, args)
    base = None
    if args.against:
        try:
            base = add_base_peers(cases, tmp, args.against)
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
            return 2
    failed = interrupted = False
    records: list[dict] = []

    def emit(rec):
        records.append(rec)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    try:
        emit(dict(type="meta", ts=time.time(), git=git_rev(), against=base and base[1],
                  host=platform.node(),
                  kernel=platform.release(), cpus=os.cpu_count(), python=ctx.py,
                  args={k: v for k, v in vars(args).items()},
                  cases={c.name: dict(group=c.group, topo=c.topo, target=c.target,
                                      target_metric=c.target_metric, note=c.note, path=c.path,
                                      headers=list(c.headers),
                                      peers=[dict(label=p.label, kind=p.kind) for p in c.peers])
                         for c in cases}))
        print(f"bench: {len(cases)} case(s), {args.rounds} round(s) of {args.duration}s; "
              f"tmp {tmp}; results {out}", flush=True)
        # prerequisites, once: a case or peer that lacks one is n/a
        active: dict[str, list[Peer]] = {}
        for c in cases:
            reason = next((r for r in (req(ctx, c) for req in c.requires) if r), None)
            peers = []
            for p in c.peers:
                why = reason or next((r for r in (req(ctx, c) for req in p.requires) if r), None)
                if why:
                    emit(dict(type="na", case=c.name, group=c.group, peer=p.label, kind=p.kind, reason=why))
                    print(f"  n/a {c.name} {p.label}: {why}", flush=True)
                elif p.kind == "anchor" or peers:
                    peers.append(p)
            # without its anchor a case has nothing to compare against
            if any(p.kind == "anchor" for p in peers) and len(peers) > 1:
                active[c.name] = peers
            elif peers:
                for p in peers:
                    emit(dict(type="na", case=c.name, group=c.group, peer=p.label, kind=p.kind,
                              reason="no peer to compare it with"))
                print(f"  skip {c.name}: no peer to compare with the anchor", flush=True)
        for rnd in range(1, args.rounds + 1):
            for c in cases:
                anchor_rec = None
                for p in interleave(active.get(c.name, []), rnd):
                    rec = run_one(ctx, c, p, rnd, args)
                    emit(rec)
                    line = f"[{rnd}/{args.rounds}] {c.name:13} {p.label:18} {fmt_run(rec)}"
                    if rec["type"] == "fail":
                        failed = True
                    elif p.kind == "anchor":
                        anchor_rec = rec
                    elif anchor_rec and anchor_rec.get("rps") and rec.get("rps"):
                        line += f"\n{'':34}÷ {anchor_rec['peer']}: {rec['rps'] / anchor_rec['rps']:.2f} req/s"
                        if rec.get("us_per_req") and anchor_rec.get("us_per_req"):
                            line += f", {anchor_rec['us_per_req'] / rec['us_per_req']:.2f} CPU-eff"
                        if p.kind == "ours" and c.target:
                            line += f" (target ≥ {c.target:.2f})"
                    print(line, flush=True)
        if not args.no_robust:
            robust.run(sys.modules[__name__], ctx, args, emit)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        interrupted = True
    finally:
        stop_procs(list(LIVE))
        if base:
            subprocess.run(["git", "worktree", "remove", "--force", str(base[0])], cwd=REPO,
                           capture_output=True)
        if args.keep or failed:
            print(f"bench: kept {tmp} (configs, logs)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    md = "" if args.robust_only else report.render(records)
    md += "" if args.no_robust else ("\n" if md else "") + robust.table(records)
    md_path = out.with_suffix(".md")
    md_path.write_text(md)
    print("\n" + md)
    print(f"bench: wrote {out} and {md_path}")
    bad = [r for r in records if r["type"] == "fail"]
    if args.smoke:
        bad += [r for r in records if r["type"] == "run" and (sum(r["errors"].values()) or r["non2xx"])]
    for r in bad:
        why = r.get("error") or f"{sum(r['errors'].values())} socket errors, {r['non2xx']} non-2xx"
        print(f"bench: FAIL {r['case']} {r['peer']} round {r['round']}: {why}", file=sys.stderr)
    rbad = robust.failures(records)
    for line in rbad:
        print(f"bench: FAIL {line}", file=sys.stderr)
    return 130 if interrupted else 1 if bad or rbad else 0


if __name__ == "__main__":
    sys.exit(main())
