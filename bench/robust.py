"""bench.robust -- the robustness section of `make bench` (issue 16).

Three tests, each for httpd and for relayd (HTTP relay to an nginx backend):

  reload     N SIGHUPs to the daemon's parent while wrk runs, each 1 s
             after the previous reload was logged done (a SIGHUP during a
             reload is ignored); every socket error or non-2xx response,
             or a reload not done, is a FAIL.
  slowloris  `slowhttptest -H` holds C slow-header connections open
             against the daemon while a probe client keeps asking for a
             small file (a new connection each time, 5 s timeout); it
             counts probes ok / failed during the attack.  A failed probe
             is a FAIL.
  idle       N keep-alive connections, each with one completed request,
             held open; the daemon's worker RSS before and after, and
             KiB per connection.  A connection that could not be made or
             answered is a FAIL.

It records `type: "robust"` lines in the same JSONL as bench.py's runs and
prints its own table.  Figures, not targets: no ratio to an anchor.

Not here: the throughput cases and the process/port/wrk helpers (bench.py,
used through the `B` module handle), the Markdown report (report.py).
"""
from __future__ import annotations

import csv
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Full size and --smoke size of each test.
FULL = dict(reloads=10, slow_conns=1000, slow_rate=200, slow_secs=30, idle=10_000)
SMOKE = dict(reloads=2, slow_conns=50, slow_rate=50, slow_secs=6, idle=200)
# Open files for this process and (inherited) the daemons: 10,000 idle
# connections are 10,000 descriptors here, up to 20,000 in a relay
# (client + backend side) and 10,000 in the backend nginx.
NOFILE = 65536
# Source addresses for the idle connections (ephemeral ports per address).
IDLE_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
# Workers: 2 for reload and slowloris; httpd needs 1 per 1,024 idle clients
# (SERVER_MAX_CLIENTS) and some room for an uneven spread.
WORKERS = 2
HTTPD_IDLE_PER_WORKER = 900
PROBE_PATH = "/1k.bin"
PROBE_EVERY = 0.1     # s between two probe requests
PROBE_TIMEOUT = 5.0   # s for one probe request (connect + answer)
RELOAD_EVERY = 1.0    # s from one reload done to the next SIGHUP
RELOAD_MAX = 30.0     # s a reload may take before the test goes on (and fails)


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE (root may raise the hard limit too); returns
    the soft limit in force, inherited by everything started later."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, NOFILE)
    for lim in ((want, max(hard, want)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, lim)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ------------------------------------------------------------------ parsing
def parse_slowhttptest_csv(text: str) -> dict:
    """slowhttptest -g's CSV (`Seconds,Closed,Pending,Connected,Service
    Available`): the most connections held at once, the seconds its own
    probe found the service unavailable, the last row."""
    rows = list(csv.reader(text.splitlines()))
    out = dict(max_connected=0, unavailable_s=0, samples=0, last={})
    if not rows:
        return out
    head = [h.strip().lower() for h in rows[0]]
    for row in rows[1:]:
        if len(row) != len(head):
            continue
        rec = dict(zip(head, (c.strip() for c in row)))
        try:
            conn = int(rec.get("connected", 0))
        except ValueError:
            continue
        out["samples"] += 1
        out["max_connected"] = max(out["max_connected"], conn)
        if rec.get("service available", "").lower() in ("0", "no"):
            out["unavailable_s"] += 1
        out["last"] = {k: rec[k] for k in rec}
    return out


def parse_slowhttptest_out(text: str) -> dict:
    """The summary slowhttptest prints at exit: its exit status line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)       # its colours
    m = re.findall(r"Exit status:\s*(.+)", text)
    return {"exit_status": m[-1].strip() if m else ""}


def http_get(addr: tuple[str, int], path: str, timeout: float,
             sock: socket.socket | None = None, keep: bool = False) -> tuple[int, socket.socket | None]:
    """One HTTP/1.1 GET (Content-Length body); returns (status, socket if
    `keep` else None).  Raises OSError or ValueError."""
    s = sock or socket.create_connection(addr, timeout=timeout)
    try:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = s.recv(65536)
            if not data:
                raise ValueError("connection closed before the response head")
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        left = (int(m.group(1)) if m else 0) - len(body)
        while left > 0:
            data = s.recv(min(left, 65536))
            if not data:
                raise ValueError("connection closed in the body")
            left -= len(data)
        if keep:
            return status, s
        s.close()
        return status, None
    except BaseException:
        s.close()
        raise


class Prober:
    """A thread asking for PROBE_PATH every PROBE_EVERY s, a new connection
    each time, until stopped: counts ok (200) and failed."""

    def __init__(self, addr: tuple[str, int]):
        self.addr = addr
        self.ok = self.failed = 0
        self.errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _ = http_get(self.addr, PROBE_PATH, PROBE_TIMEOUT)
                why = None if status == 200 else f"status {status}"
            except (OSError, ValueError) as e:
                why = type(e).__name__
            if why is None:
                self.ok += 1
            else:
                self.failed += 1
                self.errors[why] = self.errors.get(why, 0) + 1
            self._stop.wait(PROBE_EVERY)

    def start(self) -> "Prober":
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(PROBE_TIMEOUT + 5)


# ------------------------------------------------------------------ /proc
def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def workers(B, root: int, title: str) -> list[int]:
    """PIDs of the daemon's `-P title` children (httpd: server, relayd: relay)."""
    snap, _, _ = B.snapshot()
    out = []
    for pid in B.descendants(snap, [root]):
        argv = cmdline(pid)
        if any(a == "-P" and i + 1 < len(argv) and argv[i + 1] == title
               for i, a in enumerate(argv)):
            out.append(pid)
    return out


# ------------------------------------------------------------------ daemons
@dataclass
class Target:
    label: str          # httpd | relayd
    title: str          # worker process title
    procs: list         # bench.Proc, started in order (backend first)
    port: int
    log: str = ""

    @property
    def sut(self):
        return self.procs[-1]


def build(B, ctx, daemon: str, nworkers: int) -> Target:
    """The daemon (and for relayd its nginx backend) as bench.py's peers
    start it, unpinned (topology "both") with `nworkers` workers."""
    case = B.Case("robust", daemon, PROBE_PATH, B.KIB, [], topo="both", workers=nworkers)
    peer = B.httpd() if daemon == "httpd" else B.relayd("http")
    reason = next((r for r in (req(ctx, case) for req in peer.requires) if r), None)
    if reason:
        raise B.BenchError(reason)
    procs, be_port = B.nginx_backend(ctx, case) if daemon == "relayd" else ([], None)
    sut, port, _ = peer.build(ctx, case, be_port)
    return Target(daemon, "server" if daemon == "httpd" else "relay", procs + sut, port)


def run_daemon(B, ctx, daemon: str, nworkers: int, test) -> dict:
    t = build(B, ctx, daemon, nworkers)
    try:
        B.start_procs(ctx, t.procs)
        B.sanity(f"http://{B.H}:{t.port}{PROBE_PATH}", B.KIB)
        rec = test(B, ctx, t)
        if t.sut.popen.poll() is not None:
            raise B.BenchError(f"{t.sut.name} died: {B.log_tail(t.sut.log)}")
        B.sanity(f"http://{B.H}:{t.port}{PROBE_PATH}", B.KIB)
        return rec
    finally:
        B.stop_procs(t.procs)


# ------------------------------------------------------------------ the tests
def reloads_done(log: str) -> int:
    return len(re.findall(r"parent_reload: .*reloaded", Path(log).read_text(errors="replace")))


def reload_test(n: int):
    def test(B, ctx, t: Target) -> dict:
        url = f"http://{B.H}:{t.port}{PROBE_PATH}"
        # Stopped with SIGINT (wrk then prints its summary) once the last
        # reload is done; -d is only the bound.
        argv = ["wrk", "-t1", "-c50", f"-d{int(n * RELOAD_MAX + 10)}s", url]
        wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True, text=True)
        sent = done = 0
        try:
            time.sleep(1.0)
            # One SIGHUP at a time: a daemon ignores one that comes while it
            # reloads (httpd: "reload already in progress").
            for _ in range(n):
                os.kill(t.sut.popen.pid, signal.SIGHUP)
                sent += 1
                deadline = time.monotonic() + RELOAD_MAX
                while (done := reloads_done(t.sut.log)) < sent and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(RELOAD_EVERY)
        finally:
            try:
                os.killpg(wrk.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                out, _ = wrk.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(wrk.pid, signal.SIGKILL)
                out, _ = wrk.communicate()
        r = B.parse_wrk(out or "")
        errs = sum(r["errors"].values())
        return dict(test="reload", reloads=sent, reloaded=done, requests=r["requests"],
                    rps=r["rps"], socket_errors=errs, errors=r["errors"], non2xx=r["non2xx"],
                    ok=bool(r["requests"]) and errs == 0 and r["non2xx"] == 0 and done == sent,
                    wrk_cmd=" ".join(argv), wrk_out=out)
    return test


def slowloris_test(conns: int, rate: int, secs: int):
    def test(B, ctx, t: Target) -> dict:
        prefix = str(ctx.tmp / "logs" / ctx.name("slowloris"))
        argv = ["slowhttptest", "-H", "-c", str(conns), "-r", str(rate), "-i", "10",
                "-l", str(secs), "-x", "24", "-p", "3", "-g", "-o", prefix,
                "-u", f"http://{B.H}:{t.port}{PROBE_PATH}"]
        probe = Prober((B.H, t.port))
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, text=True)
        # the probe counts only while the attack holds its connections
        time.sleep(min(secs / 3, conns / rate + 1))
        probe.start()
        try:
            out, _ = p.communicate(timeout=secs + 60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        finally:
            probe.stop()
        try:
            stats = parse_slowhttptest_csv(Path(prefix + ".csv").read_text())
        except OSError:
            stats = parse_slowhttptest_csv("")
        stats.update(parse_slowhttptest_out(out or ""))
        return dict(test="slowloris", conns=conns, probe_ok=probe.ok, probe_failed=probe.failed,
                    probe_errors=probe.errors, **stats,
                    ok=probe.ok > 0 and probe.failed == 0,
                    slowhttptest_cmd=" ".join(argv))
    return test


def idle_test(n: int):
    def test(B, ctx, t: Target) -> dict:
        def rss(pids) -> int:       # KiB resident now
            return sum(B.status_kib(x, "VmRSS") for x in pids)

        def tree() -> int:
            return rss(B.descendants(B.snapshot()[0], [t.sut.popen.pid]))

        time.sleep(0.5)
        pids = workers(B, t.sut.popen.pid, t.title)
        before = rss(pids)
        tree_before = tree()
        held: list[socket.socket] = []
        failed: dict[str, int] = {}
        t0 = time.monotonic()
        try:
            for i in range(n):
                try:
                    s = socket.socket()
                    s.bind((IDLE_SOURCES[i % len(IDLE_SOURCES)], 0))
                    s.settimeout(10)
                    s.connect((B.H, t.port))
                    status, s = http_get((B.H, t.port), PROBE_PATH, 10, sock=s, keep=True)
                    if status != 200:
                        raise ValueError(f"status {status}")
                    held.append(s)
                except (OSError, ValueError) as e:
                    why = type(e).__name__ if isinstance(e, OSError) else str(e)
                    failed[why] = failed.get(why, 0) + 1
                    s.close()
            opened_s = time.monotonic() - t0
            time.sleep(1.0)
            after = rss(pids)
            tree_after = tree()
            # still served while they are all held
            status, _ = http_get((B.H, t.port), PROBE_PATH, 10)
            alive = sum(1 for x in pids if B.read_stat(x))
        finally:
            for s in held:
                s.close()
        nfail = sum(failed.values())
        return dict(test="idle", conns=n, held=len(held), failed=nfail, fail_reasons=failed,
                    workers=len(pids), workers_alive=alive,
                    rss_before_kib=before, rss_after_kib=after,
                    tree_rss_before_kib=tree_before, tree_rss_after_kib=tree_after,
                    kib_per_conn=(after - before) / len(held) if held else None,
                    open_s=round(opened_s, 1), probe_status=status,
                    ok=nfail == 0 and status == 200 and alive == len(pids))
    return test


# ------------------------------------------------------------------ section
def fmt(r: dict) -> str:
    if r.get("error"):
        return f"FAILED: {r['error']}"
    flag = "" if r["ok"] else "  FAIL"
    if r["test"] == "reload":
        return (f"{r['reloads']} SIGHUPs ({r['reloaded']} reloaded) under wrk: {r['requests']:,} req, "
                f"{r['socket_errors']} socket errors, {r['non2xx']} non-2xx{flag}")
    if r["test"] == "slowloris":
        return (f"{r['conns']:,} slowloris conns (max {r['max_connected']:,} held): probe "
                f"{r['probe_ok']} ok / {r['probe_failed']} failed{flag}")
    per = f"{r['kib_per_conn']:.1f}" if r["kib_per_conn"] is not None else "-"
    return (f"{r['held']:,}/{r['conns']:,} idle keep-alive conns: worker RSS "
            f"{r['rss_before_kib'] / 1024:.0f} -> {r['rss_after_kib'] / 1024:.0f} MiB "
            f"(~{per} KiB/conn, {r['workers']} workers){flag}")


def missing_tools() -> list[str]:
    return [t for t in ("wrk", "slowhttptest", "nginx") if not shutil.which(t)]


def run(B, ctx, args, emit) -> list[dict]:
    """The section: every test for httpd then relayd; emit(rec) each record
    (bench.py writes it to the JSONL); returns the records."""
    size = SMOKE if args.smoke else FULL
    nofile = raise_nofile()
    print(f"robust: {size['reloads']} reloads, {size['slow_conns']:,} slowloris conns, "
          f"{size['idle']:,} idle conns; RLIMIT_NOFILE {nofile}", flush=True)
    out = []
    missing = missing_tools()
    if missing:
        rec = dict(type="robust", case="robust", group="robust", peer="-", round=1, ok=False,
                   error=f"missing {', '.join(missing)} (apt-get install -y {' '.join(missing)})")
        emit(rec)
        print(f"  robust: {rec['error']}", flush=True)
        return [rec]
    idle_workers = dict(httpd=max(WORKERS, -(-size["idle"] // HTTPD_IDLE_PER_WORKER)),
                        relayd=WORKERS)
    plan = [("reload", lambda d: (WORKERS, reload_test(size["reloads"]))),
            ("slowloris", lambda d: (WORKERS, slowloris_test(size["slow_conns"], size["slow_rate"],
                                                             size["slow_secs"]))),
            ("idle", lambda d: (idle_workers[d], idle_test(size["idle"])))]
    for name, make in plan:
        for daemon in ("httpd", "relayd"):
            nw, test = make(daemon)
            base = dict(type="robust", case=f"robust-{name}", group="robust", peer=daemon,
                        kind="ours", round=1, workers=nw, ts=time.time())
            try:
                rec = {**base, **run_daemon(B, ctx, daemon, nw, test)}
            except B.BenchError as e:
                rec = {**base, "test": name, "ok": False, "error": str(e)}
            emit(rec)
            out.append(rec)
            print(f"[robust] {name:9} {daemon:6} {fmt(rec)}", flush=True)
    return out


def failures(records: list[dict]) -> list[str]:
    """One line per robust record that failed."""
    return [f"{r['case']} {r['peer']}: {r.get('error') or fmt(r)}" for r in records
            if r.get("type") == "robust" and not r.get("ok")]


def table(records: list[dict]) -> str:
    """The section as Markdown (appended to the report)."""
    rows = [r for r in records if r.get("type") == "robust"]
    if not rows:
        return ""
    lines = ["## Robustness", "", "| test | daemon | workers | result |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case'].removeprefix('robust-')} | {r['peer']} | {r.get('workers', '-')} "
                     f"| {fmt(r)} |")
    return "\n".join(lines) + "\n"
