"""Start and stop real FastCGI servers for the tests and the benchmark.

Each server is a subprocess in a session of its own, listening on a UNIX
socket in a directory the caller owns (or on a loopback TCP port), with its
output in a log file there.  stop() ends it by PID (SIGTERM, then SIGKILL
of the process group the start created: php-fpm's and fcgiwrap's workers).

php_fpm_config() writes a self-contained php-fpm configuration (global
section + one pool), optionally chrooted; the benchmark can reuse it to put
httpd and nginx in front of the same pool:

    conf = php_fpm_config(workdir, listen=str(workdir / "php.sock"), children=8)
    fpm = start_php_fpm(workdir, conf)     # ... then fpm.stop()
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

Address = str | tuple[str, int]     # UNIX socket path, or (host, port)


class FcgiServer:
    """A FastCGI server process; `address` is where it listens."""

    def __init__(self, name: str, cmd: list[str], address: Address, log_path: Path,
                 cwd: Path | None = None, env: dict | None = None) -> None:
        self.name = name
        self.address = address
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> "FcgiServer":
        """Wait until a connect succeeds; raise with the log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if probe(self.address):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} not listening on {self.address}:\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Workers left behind by the master are in the session we created.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait()
        self._log.close()


def probe(address: Address) -> bool:
    """True if something accepts connections at `address`."""
    if isinstance(address, tuple):
        s = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    else:
        if not os.path.exists(address):
            return False
        s = socket.socket(socket.AF_UNIX)
    s.settimeout(1.0)
    try:
        s.connect(address)
        return True
    except OSError:
        return False
    finally:
        s.close()


# -- flup and the stub (Python) ---------------------------------------------------

def _addr_arg(address: Address) -> str:
    if isinstance(address, tuple):
        return f"tcp:{address[0]}:{address[1]}"
    return f"unix:{address}"


def start_flup(address: Address, workdir: Path, marks: Path | None = None) -> FcgiServer:
    """flup_app.py (a WSGI echo app) on `address`; `marks`: where it notes aborts."""
    cmd = [sys.executable, str(HERE / "flup_app.py"), _addr_arg(address)]
    if marks is not None:
        cmd.append(str(marks))
    tag = "tcp" if isinstance(address, tuple) else Path(address).stem
    return FcgiServer(f"flup ({tag})", cmd, address,
                      workdir / f"flup-{tag}.log").wait_ready()


def start_stub(address: Address, workdir: Path, marks: Path) -> FcgiServer:
    """stub.py: a FastCGI server that misbehaves on request (see its docstring)."""
    cmd = [sys.executable, str(HERE / "stub.py"), _addr_arg(address), str(marks)]
    return FcgiServer("fcgi stub", cmd, address, workdir / "stub.log").wait_ready()


# -- php-fpm -------------------------------------------------------------------------

def php_fpm_binary() -> str | None:
    """Debian's php-fpm (`php-fpmX.Y` in /usr/sbin), the newest if several."""
    found = glob.glob("/usr/sbin/php-fpm*") + [p for p in (shutil.which("php-fpm"),) if p]

    def version(path: str) -> tuple[int, ...]:
        m = re.search(r"(\d+)\.(\d+)$", path)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    found = [p for p in found if os.access(p, os.X_OK)]
    return max(found, key=version) if found else None


def php_fpm_config(workdir: Path, listen: str, children: int = 4,
                   pm: str = "static", ini: dict[str, str] | None = None,
                   pool: str = "tandem", chroot: Path | None = None,
                   user: str | None = None, group: str | None = None,
                   name: str = "php-fpm.conf") -> Path:
    """Write `workdir/<name>`: global section and one pool; return its path.

    `listen` is a socket path or `host:port`.  Workers run as `user`/`group`
    if given, else as root when we are root (php-fpm then needs -R, which
    start_php_fpm adds).  `chroot` puts the workers in that directory (then
    SCRIPT_FILENAME is a path inside it, as with a chrooted httpd).  `ini`
    adds php_admin_value entries (e.g. {"memory_limit": "64M"}).
    """
    workdir = Path(workdir)
    values = {
        "post_max_size": "64M",          # the tests POST 10 MiB
        "upload_max_filesize": "64M",
        "output_buffering": "0",         # let flush() reach the client
        "log_errors": "1",               # no error_log: errors go out as FCGI_STDERR
        "display_errors": "0",
    }
    values.update(ini or {})
    lines = [
        "[global]",
        f"pid = {workdir / (Path(name).stem + '.pid')}",
        f"error_log = {workdir / (Path(name).stem + '.log')}",
        "daemonize = no",
        "log_level = notice",
        "",
        f"[{pool}]",
        f"listen = {listen}",
        "listen.mode = 0666",
        "listen.backlog = 511",
        f"pm = {pm}",
        f"pm.max_children = {children}",
    ]
    if pm != "static":
        lines += [f"pm.start_servers = {max(1, children // 2)}",
                  "pm.min_spare_servers = 1",
                  f"pm.max_spare_servers = {children}"]
    if user is not None:
        lines += [f"user = {user}", f"group = {group or user}"]
    elif os.geteuid() == 0:
        lines += ["user = root", "group = root"]
    if chroot is not None:
        lines += [f"chroot = {chroot}", "chdir = /"]
    lines += [
        "catch_workers_output = yes",
        "decorate_workers_output = no",
        "clear_env = yes",
        "request_terminate_timeout = 60",
    ]
    lines += [f"php_admin_value[{k}] = {v}" for k, v in values.items()]
    path = workdir / name
    path.write_text("\n".join(lines) + "\n")
    return path


def start_php_fpm(workdir: Path, conf: Path, address: Address | None = None) -> FcgiServer:
    """Run php-fpm in the foreground with `conf` (from php_fpm_config)."""
    binary = php_fpm_binary()
    if binary is None:
        raise FileNotFoundError("php-fpm is not installed")
    if address is None:
        listen = re.search(r"^listen = (.*)$", Path(conf).read_text(), re.M).group(1)
        host, sep, port = listen.rpartition(":")
        address = (host, int(port)) if sep and port.isdigit() and not listen.startswith("/") \
            else listen
    cmd = [binary, "-F", "-y", str(conf), "-p", str(workdir)]
    if os.geteuid() == 0 and re.search(r"^user = root$", Path(conf).read_text(), re.M):
        cmd.append("-R")
    return FcgiServer("php-fpm", cmd, address,
                      Path(workdir) / (Path(conf).stem + ".out")).wait_ready()


# -- fcgiwrap ------------------------------------------------------------------------

def fcgiwrap_binary() -> str | None:
    return shutil.which("fcgiwrap") or (
        "/usr/sbin/fcgiwrap" if os.access("/usr/sbin/fcgiwrap", os.X_OK) else None)


def start_fcgiwrap(sock: Path, workdir: Path, children: int = 2) -> FcgiServer:
    """fcgiwrap on a UNIX socket; CGI stderr goes over FastCGI (-f)."""
    binary = fcgiwrap_binary()
    if binary is None:
        raise FileNotFoundError("fcgiwrap is not installed")
    cmd = [binary, "-f", "-c", str(children), "-s", f"unix:{sock}"]
    env = {"PATH": "/usr/bin:/bin"}
    return FcgiServer("fcgiwrap", cmd, str(sock), Path(workdir) / "fcgiwrap.log",
                      env=env).wait_ready()
