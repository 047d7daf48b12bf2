"""httpd.auth -- HTTP Basic authentication against an htpasswd file.

The file holds `user:hash` lines; hashes are bcrypt (`$2a$`, `$2b$`, `$2y$`,
as made by OpenBSD's htpasswd(1) and `htpasswd -B`), checked with the
bcrypt library like crypt_checkpass(3).  The file is re-read when it
changes.  Answering 401 is server_http's job.
"""

from __future__ import annotations

import base64
import os

import bcrypt

_cache: dict[str, tuple[float, dict[str, bytes]]] = {}


def _load(path: str) -> dict[str, bytes]:
    try:
        st = os.stat(path)
    except OSError:
        return {}
    cached = _cache.get(path)
    if cached is not None and cached[0] == st.st_mtime:
        return cached[1]
    users: dict[str, bytes] = {}
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.strip()
                if not line or line.startswith(b"#") or b":" not in line:
                    continue
                user, _, pw = line.partition(b":")
                users[user.decode("utf-8", "replace")] = pw
    except OSError:
        return {}
    _cache[path] = (st.st_mtime, users)
    return users


def credentials(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) of a `Basic` Authorization header, or None.

    OpenBSD logs the user name of a failed attempt too, so server_http
    needs the name even when check() says no."""
    if not authorization:
        return None
    scheme, _, cred = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(cred.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def check(path: str, authorization: str | None) -> str | None:
    """The authenticated user name, or None."""
    cred = credentials(authorization)
    if cred is None:
        return None
    user, password = cred
    hashed = _load(path).get(user)
    if hashed is None:
        return None
    if hashed.startswith(b"$2y$"):
        hashed = b"$2b$" + hashed[4:]   # same algorithm, other prefix
    try:
        ok = bcrypt.checkpw(password.encode("utf-8"), hashed)
    except ValueError:
        return None
    return user if ok else None
