"""Shared test fixtures: free ports, and real daemons started as subprocesses.

Daemons run as `python -m httpd|relayd -d -f CONF` from the repo root, the
way users start them; tests talk to them over loopback only.  Every process
a test starts is stopped by PID when the test ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _port_slice() -> range:
    """This test process's own ports: below the kernel's ephemeral range
    (where bind-to-0 and every client connect() draw theirs, so a port
    handed out here cannot be taken by a client socket before the daemon
    binds it), split between the xdist workers (so two workers never hand
    out the same port)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = 20000 if low > 21000 else 1024
    last = max(low, first + 1000)
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
    size = (last - first) // max(count, 1)
    return range(first + worker * size, first + (worker + 1) * size)


_PORTS = _port_slice()
# start at a random place in the slice: a port of the previous run may still
# be in TIME_WAIT
_next_port = [int.from_bytes(os.urandom(2), "big") % len(_PORTS)]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody uses right now, from this process's slice (see
    _port_slice); never the same port twice in a row."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port[0] % len(_PORTS)]
        _next_port[0] += 1
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


def listen_backlog(port: int, host: str = "127.0.0.1") -> int:
    """The listen queue length of the socket listening on host:port, as
    ss(8) shows it (Send-Q of a LISTEN socket)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        local = f[3].rsplit(":", 1)[0].strip("[]")
        if f[0] == "LISTEN" and local == host:
            return int(f[2])
    raise AssertionError(f"nothing listens on {host}:{port}: {out!r}")


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0,
              proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect((host, port))
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not listening after {timeout}s")


class Daemon:
    """A daemon subprocess in -d mode with its stderr captured to a file."""

    def __init__(self, module: str, conf: Path, args: list[str] | None = None,
                 env: dict | None = None, cwd: Path | None = None) -> None:
        self.module = module
        self.conf = conf
        self.errpath = conf.with_suffix(".stderr")
        self.errfile = open(self.errpath, "wb")
        cmd = [PYTHON, "-m", module, "-d", "-f", str(conf)] + (args or [])
        if cwd is not None:         # started elsewhere: the code still comes from REPO
            env = {**(env or os.environ), "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, cwd=cwd or REPO, stdout=self.errfile,
                                     stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.errfile.flush()
        return self.errpath.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not in output:\n{self.output()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.errfile.close()
        return self.proc.returncode


def probe_kills(d: Daemon, pid: int, timeout: float = 30.0) -> None:
    """Fire the pledge probe (shared.pledge: TANDEM_PLEDGE_PROBE, SIGUSR2) in
    child `pid` of daemon `d` and see it end by SIGSYS -- the seccomp
    filter, before the call did anything -- and the parent log it."""
    with open(f"/proc/{pid}/status") as f:
        assert "\nSeccomp:\t2\n" in f.read()
    os.kill(pid, signal.SIGUSR2)
    d.wait_output(f"lost child: pid {pid} terminated; signal {signal.SIGSYS}", timeout)
    assert "pledge probe" not in d.output()


@pytest.fixture
def daemons():
    """Factory: daemons(module, conf_path, ports=[...]) -> Daemon; all stopped at the end."""
    started: list[Daemon] = []

    def start(module: str, conf: Path, ports: list[int] | None = None,
              args: list[str] | None = None, env: dict | None = None,
              host: str = "127.0.0.1") -> Daemon:
        d = Daemon(module, conf, args, env)
        started.append(d)
        for p in ports or []:
            try:
                wait_port(p, host, proc=d.proc)
            except Exception:
                raise RuntimeError(f"{module} did not start:\n{d.output()}")
        return d

    yield start
    for d in started:
        d.stop()


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/PID/stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """The live (not zombie) children of `pid`, sorted."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_state(int(d))
            if st is not None and st[1] == pid and st[0] != "Z":
                out.append(int(d))
    return sorted(out)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as {field: value}."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def status_ids(st: dict, key: str) -> list[int]:
    """The numbers of a proc_status() field (Uid, Gid: real, effective, ...)."""
    return [int(x) for x in st[key].split()]


def sandboxed(pid: int, filtered: bool = True) -> bool:
    """The process has its sandbox in place: its seccomp filter (Seccomp: 2,
    installed after start-up, so later than its title and no_new_privs), or
    with `filtered=False` (a daemon run with -U) no_new_privs alone."""
    try:
        st = proc_status(pid)
        return st.get("Seccomp") == "2" if filtered else st.get("NoNewPrivs") == "1"
    except OSError:
        return False


def procs_by_title(pid: int, daemon: str) -> dict[str, list[int]]:
    """The live children of a daemon's parent `pid` by process title
    ("httpd: server" -> "server")."""
    out: dict[str, list[int]] = {}
    for c in children(pid):
        try:
            with open(f"/proc/{c}/comm") as f:
                title = f.read().strip()
        except OSError:
            continue
        if title.startswith(daemon + ": "):
            out.setdefault(title[len(daemon) + 2:], []).append(c)
    return out


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a process we started, SIGKILL it if it is still there after
    `timeout`, and reap it (None: nothing started)."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run a command to completion, its output captured as text."""
    return subprocess.run(list(args), capture_output=True, text=True, check=check,
                          timeout=timeout)


def wait_for(fn, timeout: float = 15.0, what: str = "condition", detail=None,
             every: float = 0.05):
    """Poll fn() until it returns something truthy (files written after the
    response was sent, processes exiting, states logged) and return that;
    after `timeout` an AssertionError naming `what`, with detail() (logs)
    appended when given."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + (f"\n{detail()}" if detail is not None else ""))
        time.sleep(every)


def run_cmd(module: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `python -m module args` to completion (e.g. -n config tests)."""
    return subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
