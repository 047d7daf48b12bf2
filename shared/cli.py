"""shared.cli -- the command line both daemons share.

`NAME [-dnUv] [-D macro=value] [-f file]`, plus the hidden `-P title -I n -S fd`
a privileged parent uses to re-execute its children (proc.c).  A bad flag
prints OpenBSD's usage line and exits 1.  What the flags mean is each
daemon's business, except -U (no syscall filter, no Landlock: shared.pledge),
which this module sets for the whole process.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(prog: str, default_conf: str, argv: list[str] | None) -> argparse.Namespace:
    usage = f"usage: {prog} [-dnUv] [-D macro=value] [-f file]\n"

    class _Args(argparse.ArgumentParser):
        def error(self, message: str) -> None:
            sys.stderr.write(usage)
            sys.exit(1)

    ap = _Args(prog=prog, add_help=False)
    ap.add_argument("-d", action="store_true")
    ap.add_argument("-n", action="store_true")
    # -U: children run without syscall filter and Landlock (shared.pledge).
    ap.add_argument("-U", action="store_true")
    ap.add_argument("-v", action="count", default=0)
    ap.add_argument("-D", action="append", default=[])
    ap.add_argument("-f", default=default_conf)
    # Privilege separation: a child re-executed by the parent.
    ap.add_argument("-P", default=None, help=argparse.SUPPRESS)
    ap.add_argument("-I", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("-S", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # The one switch read in every process of the daemon: the parent passes
    # -U on to its children (proc.spawn).
    from shared import pledge
    pledge.enabled = not args.U
    return args
