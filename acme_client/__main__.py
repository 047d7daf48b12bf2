"""acme_client -- command line: `acme-client [-Fnrv] [-f configfile] handle`.

-F forces renewal, -n only checks the configuration (-nv prints it), -r
revokes the certificate, -v logs each step (-vv more), -f names the
configuration file (default /etc/acme-client.conf).  Exit status: 0 a
certificate was issued, renewed or revoked; 2 nothing to do; 1 error.
The hidden `-P net -S fd` starts the net process (shared.acme_net).
"""

from __future__ import annotations

import getopt
import os
import sys

from acme_client import PROG, warnx
from shared import acme_conf, log
from shared.lexer import ConfigError

USAGE = f"usage: {PROG} [-Fnrv] [-f configfile] handle\n"


def main(argv: list[str] | None = None) -> int:
    try:
        opts, rest = getopt.getopt(sys.argv[1:] if argv is None else argv, "Fnrvf:P:I:S:")
    except getopt.GetoptError:
        sys.stderr.write(USAGE)
        return 1
    flags = {}
    verbose = 0
    for k, v in opts:
        if k == "-v":
            verbose += 1
        else:
            flags[k] = v
    log.init(debug=True, verbose=verbose, ident=PROG)
    if "-P" in flags:
        return _child(flags)
    path = flags.get("-f", acme_conf.ACME_CONF)
    try:
        conf = acme_conf.load(path, verbose=verbose)
    except ConfigError as e:
        for line in e.lines:
            sys.stderr.write(line + "\n")
        return 1
    if "-n" in flags:
        if verbose:
            sys.stdout.write(acme_conf.format_config(conf))
        return 0
    if len(rest) != 1:
        sys.stderr.write(USAGE)
        return 1
    dom = conf.domain(rest[0])
    if dom is None:
        warnx(f"domain {rest[0]} not found")
        return 1
    auth = conf.authority_for(dom)
    if auth is None:
        warnx(f"authority {dom.sign_with} not found" if dom.sign_with
              else "no authorities configured")
        return 1
    missing = 0
    for d, what in ((os.path.dirname(dom.certfile), "cert"), (dom.challengedir, "challenge")):
        if not os.access(d, os.R_OK):
            warnx(f"{d}: {what} directory must exist")
            missing += 1
    if missing:
        return 1
    from acme_client import parent
    return parent.run(auth, dom, "-F" in flags, "-r" in flags, verbose)


def _child(flags: dict) -> int:
    from shared import proc
    proc.set_title(f"{PROG}: {flags['-P']}")
    if flags["-P"] != "net" or "-S" not in flags:
        sys.stderr.write(f"{PROG}: unknown process {flags['-P']}\n")
        return 1
    from shared import acme_net
    return acme_net.net_main(int(flags["-S"]))


if __name__ == "__main__":
    sys.exit(main())
