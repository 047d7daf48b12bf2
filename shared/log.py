"""shared.log -- OpenBSD log.c for Python: warn/info/debug/fatal.

With -d every line goes to stderr; otherwise to syslog (daemon facility).
`verbose` follows -v: 1 adds informational lines (`log.verbose`), 2 adds
debug lines (`log.debug`).  Lines are printed as they are: the log-format
spec says users' tooling greps them, so nothing is prefixed.

Not for access logs: those are httpd's logger's business.
"""

from __future__ import annotations

import os
import sys
import syslog
import traceback
from typing import NoReturn

_debug = True          # -d: stderr
_verbose = 0
_procname = ""
_opened = False


def init(debug: bool, verbose: int = 0, ident: str = "") -> None:
    """Set the destination (stderr with -d, else syslog) and verbosity."""
    global _debug, _verbose, _opened
    _debug = debug
    _verbose = verbose
    if not debug and not _opened:
        syslog.openlog(ident or os.path.basename(sys.argv[0]), syslog.LOG_PID | syslog.LOG_NDELAY,
                       syslog.LOG_DAEMON)
        _opened = True


def set_verbose(v: int) -> None:
    global _verbose
    _verbose = v


def get_verbose() -> int:
    return _verbose


def procinit(name: str) -> None:
    global _procname
    _procname = name


def _emit(pri: int, msg: str) -> None:
    if _debug:
        try:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
    else:
        syslog.syslog(pri, msg)


def warn(msg: str) -> None:
    """log_warnx: a problem worth an operator's attention."""
    _emit(syslog.LOG_ERR, msg)


def warn_errno(msg: str, exc: OSError) -> None:
    """log_warn: with the system error text appended."""
    _emit(syslog.LOG_ERR, f"{msg}: {exc.strerror or exc}")


def warn_exc(msg: str) -> None:
    """A warning with the traceback at -vv (bugs, not user errors)."""
    _emit(syslog.LOG_ERR, msg)
    if _verbose > 1:
        for line in traceback.format_exc().rstrip().splitlines():
            _emit(syslog.LOG_DEBUG, line)


def info(msg: str) -> None:
    """log_info: always written (state changes, start/stop)."""
    _emit(syslog.LOG_INFO, msg)


def verbose(msg: str) -> None:
    """Written with -v."""
    if _verbose > 0:
        _emit(syslog.LOG_INFO, msg)


def debug(msg: str) -> None:
    """log_debug: written with -vv."""
    if _verbose > 1:
        _emit(syslog.LOG_DEBUG, msg)


def fatalx(msg: str, code: int = 1) -> NoReturn:
    """Broken invariant: log and exit the process."""
    _emit(syslog.LOG_CRIT, f"fatal in {_procname}: {msg}" if _procname else msg)
    os._exit(code)
