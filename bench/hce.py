"""bench/hce.py -- what checking 1,000 hosts every 2 s costs relayd.

Starts one TCP listener on 0.0.0.0 (every 127.x.y.z address reaches it),
a relayd whose table has 1,000 hosts 127.1.x.y with `check tcp` every 2 s,
waits for the first rounds, then reads the CPU time of relayd's health
check process (the whole relayd tree when there is no separate `hce`
child) over a measuring window.  Prints the CPU share of one core against
the target (< 20 %).  Every process it starts is stopped by PID.

Usage: python bench/hce.py [--hosts 1000] [--interval 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
TARGET = 20.0   # % of one core


def ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])   # utime + stime


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def backend(stop: threading.Event) -> int:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", 0))
    ls.listen(4096)
    ls.settimeout(0.2)

    def loop() -> None:
        while not stop.is_set():
            try:
                c, _ = ls.accept()
                c.close()
            except OSError:
                continue
        ls.close()
    threading.Thread(target=loop, daemon=True).start()
    return ls.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    stop = threading.Event()
    bport = backend(stop)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rport = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="tandem-hce-"))
    hosts = ", ".join(f"127.1.{i // 250}.{i % 250 + 1}" for i in range(args.hosts))
    conf = tmp / "relayd.conf"
    conf.write_text(f"""interval {args.interval}
timeout 1000
prefork 1
socket "{tmp}/relayd.sock"
table <many> {{ {hosts} }}
relay "r" {{
\tlisten on 127.0.0.1 port {rport}
\tforward to <many> port {bport} mode roundrobin check tcp
}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "-d", "-f", str(conf)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        time.sleep(3 * args.interval + 2)       # start-up and the first rounds
        if proc.poll() is not None:
            print("relayd exited; config:\n" + conf.read_text()[:400])
            return 1
        hce = [p for p in children(proc.pid) if "-P hce" in cmdline(p)]
        pids = hce or [proc.pid] + children(proc.pid)
        what = "hce process" if hce else "relayd process tree"
        a = sum(ticks(p) for p in pids)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        b = sum(ticks(p) for p in pids)
        dt = time.monotonic() - t0
        pct = 100.0 * (b - a) / TICK / dt
        ok = pct < TARGET
        print(f"| health checks | {args.hosts} hosts, check tcp every {args.interval} s | "
              f"{what}: {pct:.1f} % of one core | target < {TARGET:.0f} % "
              f"{'✓' if ok else '✗'} |")
        return 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop.set()


if __name__ == "__main__":
    sys.exit(main())
