"""relayd -- command line: `relayd [-dnUv] [-D macro=value] [-f file]`.

-d stays in the foreground and logs to stderr, -n only checks the
configuration, -U runs the children without syscall filter and Landlock
(debugging; chroot and user change stay), -v is more verbose (repeatable), -D defines a macro that
overrides the file's, -f names the configuration file (/etc/relayd.conf).
"""

from __future__ import annotations

import os
import sys

from relayd import parse
from relayd.config import RELAYD_CONF
from shared import cli, log
from shared.lexer import ConfigError, parse_cmdline_macro


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args("relayd", RELAYD_CONF, argv)
    if args.P:
        return _child(args)
    log.init(debug=args.d or args.n, verbose=args.v, ident="relayd")
    macros: dict[str, str] = {}
    for d in args.D:
        try:
            k, v = parse_cmdline_macro(d)
        except ValueError as e:   # OpenBSD warns and goes on
            log.warn(str(e))
            continue
        macros[k] = v
    try:
        conf = parse.load(args.f, macros, args.v)
    except ConfigError as e:
        for line in e.lines:
            sys.stderr.write(line + "\n")
        return 1
    for line in conf.warnings:
        sys.stderr.write(line + "\n")
    if conf.unimplemented:
        for where, what in conf.unimplemented:
            sys.stderr.write(f"{where}: {what} is not implemented yet\n")
        return 1
    # Relative TLS file names stay relative to where relayd was started,
    # also after daemonize() changed to / (OpenBSD's daemon(1, 0) does not).
    start_dir = os.getcwd()
    from relayd import relay_tls     # tls hook: missing keypairs fail the load
    _, tls_errors = relay_tls.read(conf, start_dir)
    if tls_errors:
        for line in tls_errors:
            sys.stderr.write(line + "\n")
        return 1
    if args.n:
        sys.stderr.write("configuration OK\n")
        return 0
    path = args.f
    if not args.d and not os.environ.get("NOTIFY_SOCKET"):
        # (systemd's Type=notify wants the main process: no fork there)
        path = os.path.abspath(path)   # daemon(3) changes to / before any reload
        from shared.proc import daemonize
        daemonize()
    from relayd import parent
    from shared.proc import set_title
    # The parent's name is `relayd` (children: `relayd: pfe`, ...), also
    # under `python -m relayd`: keepalived finds it with `pgrep -x relayd`
    # or track_process (README, "High availability").
    set_title("relayd")
    return parent.run(conf, path, macros, args.v, debug=args.d, cwd=start_dir)


def _child(args) -> int:
    """A child process: `relayd -P relay|hce|pfe -I n -S fd`."""
    import signal

    from shared import proc
    # A terminal's Ctrl-C or hangup reaches the whole process group: the
    # parent decides how its children stop and reload.
    return proc.child_entry("relayd", args, {"relay": "relayd.relay:child_main",
                                             "hce": "relayd.hce:child_main",
                                             "pfe": "relayd.privsep:pfe_main",
                                             "ca": "relayd.ca:ca_main"},
                            ignore=(signal.SIGINT, signal.SIGHUP, signal.SIGUSR1))


if __name__ == "__main__":
    sys.exit(main())
