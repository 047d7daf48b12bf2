"""acme_client -- acme-client(1): get, renew and revoke certificates with ACME.

The command (`acme-client [-Fnrv] [-f configfile] handle`) in __main__,
the privileged main process in parent (config, keys, signing, CSR, files),
the unprivileged chrooted net process in netproc (HTTPS to the CA), file
writes in files.  The grammar and the protocol live in shared/ (acme_conf,
acme, acme_crypto) so httpd can reuse them; nothing here is imported by a
daemon.
"""

from __future__ import annotations

from shared import log

PROG = "acme-client"


def warnx(msg: str) -> None:
    """A warning, as warnx(3): `acme-client: msg` on stderr."""
    log.warn(f"{PROG}: {msg}")


def dodbg(msg: str) -> None:
    """A -v line (acme-client's dodbg())."""
    log.verbose(f"{PROG}: {msg}")
