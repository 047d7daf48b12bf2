"""acme_client -- acme-client(1): get, renew and revoke certificates with ACME.

The command (`acme-client [-Fnrv] [-f configfile] handle`) in __main__,
the privileged main process in parent (what to do, token files,
revocation).  The rest lives in shared/ so httpd's built-in ACME reuses
it: the grammar (acme_conf), the protocol (acme), keys and JWS
(acme_crypto), the key holder's answers (acme_main), the unprivileged
chrooted net process (acme_net) and file writes (acme_files).  Nothing
here is imported by a daemon.
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
