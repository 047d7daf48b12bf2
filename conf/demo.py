"""`make run`: start httpd and relayd on the demo config, in the foreground.

Renders conf/httpd.conf.in and conf/relayd.conf.in into .demo/ with the
absolute path of the demo site, starts both daemons with -d, prints the
URLs, and stops both (by PID) on Ctrl-C or when either exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CONF = Path(__file__).resolve().parent
REPO = CONF.parent
RUN = REPO / ".demo"


def render(name: str) -> Path:
    text = (CONF / f"{name}.in").read_text()
    text = text.replace("@SITE@", str(CONF / "site")).replace("@RUN@", str(RUN))
    out = RUN / name
    out.write_text(text)
    return out


def main() -> int:
    RUN.mkdir(exist_ok=True)
    procs: list[tuple[str, subprocess.Popen]] = []
    for daemon in ("httpd", "relayd"):
        conf = render(f"{daemon}.conf")
        check = subprocess.run([sys.executable, "-m", daemon, "-n", "-f", str(conf)],
                               cwd=REPO, capture_output=True, text=True)
        if check.returncode != 0:
            print(f"{daemon}: not started, its config test failed:\n{check.stderr}",
                  file=sys.stderr)
            continue
        procs.append((daemon, subprocess.Popen(
            [sys.executable, "-m", daemon, "-d", "-f", str(conf)], cwd=REPO)))
    if not procs:
        return 1
    time.sleep(1.0)
    names = [n for n, _ in procs]
    print("\nTandem demo is running (Ctrl-C stops it):")
    if "httpd" in names:
        print("  httpd   http://127.0.0.1:8080/          (also http://[::1]:8080/)")
        print("          http://127.0.0.1:8080/files/    auto index")
        print("          curl -H 'Host: blog.example.test' http://127.0.0.1:8080/")
        print("          http://127.0.0.1:8083/          HTTP/2 (`listen ... http2`): try")
        print("          curl --http2-prior-knowledge -v http://127.0.0.1:8083/files/")
        print(f"          logs in {CONF / 'site' / 'logs'}")
    if "relayd" in names:
        print("  relayd  http://127.0.0.1:8090/          HTTP relay with header rules")
        print("          http://127.0.0.1:8091/          TCP relay to httpd")
        print(f"          .venv/bin/relayctl -s {RUN / 'relayd.sock'} show summary")
    sys.stdout.flush()

    def stop(*_):
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(p.poll() is None for _, p in procs):
            time.sleep(0.3)
    finally:
        stop()
        for _, p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
