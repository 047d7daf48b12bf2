"""httpd -- command line: `httpd [-dnUv] [-D macro=value] [-f file]`.

-d stays in the foreground and logs to stderr, -n only checks the
configuration, -U runs the children without syscall filter and Landlock
(debugging; chroot and user change stay), -v is more verbose (repeatable), -D defines a macro that
overrides the file's, -f names the configuration file.
"""

from __future__ import annotations

import sys

from httpd import parse
from httpd.config import HTTPD_CONF
from shared import cli, log
from shared.lexer import ConfigError, parse_cmdline_macro


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args("httpd", HTTPD_CONF, argv)
    if args.P:
        return _child(args)
    macros: dict[str, str] = {}
    for d in args.D:
        try:
            k, v = parse_cmdline_macro(d)
        except ValueError as e:
            sys.stderr.write(f"httpd: {e}\n")
            return 1
        macros[k] = v
    log.init(debug=args.d or args.n, verbose=args.v, ident="httpd")
    try:
        conf = parse.load(args.f, macros, args.v)
    except ConfigError as e:
        for line in e.lines:
            sys.stderr.write(line + "\n")
        return 1
    if conf.unimplemented:
        for where, what in conf.unimplemented:
            sys.stderr.write(f"{where}: {what} is not implemented yet\n")
        return 1
    # Certificates, keys and the rest must load (parse.y does it too).
    from httpd import server_tls
    errors = server_tls.read_files(conf)[2]
    if errors:
        for line in errors:
            sys.stderr.write(line + "\n")
        return 1
    if args.n:
        sys.stderr.write("configuration OK\n")
        return 0
    if not args.d:
        from shared.proc import daemonize
        daemonize()
    from httpd import parent
    return parent.run(conf, args.f, macros, args.v, debug=args.d)


def _child(args) -> int:
    import signal

    from shared import proc
    # A terminal's Ctrl-C reaches the whole process group: the parent
    # decides how its children stop.
    return proc.child_entry("httpd", args, {"server": "httpd.server:child_main",
                                            "logger": "httpd.logger:logger_main",
                                            "acme": "shared.acme_net:net_main"},
                            ignore=(signal.SIGINT,))


if __name__ == "__main__":
    sys.exit(main())
