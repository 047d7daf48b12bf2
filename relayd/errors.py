"""relayd.errors -- exceptions shared by the relay modules.

A floor below relayd.relay and the protocol modules (relay_http,
relay_h2), so that they can raise and catch them without importing each
other.  Holds no logic.
"""

from __future__ import annotations


class BackendError(Exception):
    """No backend could be reached: 502 connect failed or refused, 503 no
    host up, 504 connect timeout.  `msg` is the session's close reason."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
