"""shared.acme_files -- every file an ACME key holder writes or removes.

Keys (loaded, or created with mode 0600), the certificate files (installed
as a set: every temp file written and fsynced first, then renamed, so a
failure before the renames changes nothing), http-01 token files in the
challenge directory, and removal after revocation.  Each write is a temp
file in the target's directory, fsync, rename, fsync of the directory.

Never runs in the net process; knows no protocol.  Used by acme-client's
main process and by httpd's parent (built-in ACME).
"""

from __future__ import annotations

import os
import re
import tempfile

from shared import acme_crypto

KEY_MODE = 0o600          # keys: owner only (parse.y refuses anything looser)
CERT_MODE = 0o444         # fileproc.c: certificates are world-readable, read-only
TOKEN_MODE = 0o644        # httpd (user www) must read token files
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}\Z")   # base64url (RFC 8555 section 8.3)


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: str, data: bytes, mode: int) -> str:
    """Write `data` to a fresh temp file beside `path`, fsynced; returns its name."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def install(files: dict[str, tuple[bytes, int]]) -> None:
    """Replace each path with its (data, mode): all written, then renamed."""
    temps: list[tuple[str, str]] = []
    try:
        for path, (data, mode) in files.items():
            temps.append((write_temp(path, data, mode), path))
    except BaseException:
        for tmp, _ in temps:
            os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.rename(tmp, path)
    for d in {os.path.dirname(p) for _, p in temps}:
        _fsync_dir(d)


def load_or_create_key(path: str, keytype: str) -> tuple[acme_crypto.PrivateKey, bool]:
    """The key in `path`, or a new one of `keytype` saved there (0600).
    Returns (key, created)."""
    try:
        with open(path, "rb") as f:
            return acme_crypto.key_from_pem(f.read()), False
    except FileNotFoundError:
        pass
    key = acme_crypto.generate_key(keytype)
    install({path: (acme_crypto.key_to_pem(key), KEY_MODE)})
    return key, True


def valid_token(token: str) -> bool:
    return bool(_TOKEN.match(token))


def token_path(challengedir: str, token: str) -> str:
    if not valid_token(token):
        raise ValueError(f"invalid token {token!r}")
    return os.path.join(challengedir, token)


def write_token(challengedir: str, token: str, keyauth: str) -> None:
    install({token_path(challengedir, token): (keyauth.encode(), TOKEN_MODE)})


def remove_token(challengedir: str, token: str) -> None:
    try:
        os.unlink(token_path(challengedir, token))
    except FileNotFoundError:
        pass


def remove(paths: list[str]) -> list[str]:
    """Unlink each existing path; returns the ones removed."""
    gone = []
    for p in paths:
        try:
            os.unlink(p)
            gone.append(p)
        except FileNotFoundError:
            pass
    return gone
