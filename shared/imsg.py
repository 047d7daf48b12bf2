"""shared.imsg -- typed, length-prefixed messages between the processes.

OpenBSD's imsg for Python: a 16-byte header (type, peer id, pid, payload
length) then the payload, with at most one file descriptor passed along by
SCM_RIGHTS.  Payloads that go *down* from the privileged parent (configs)
are pickled; anything that goes *up* to the parent, or between children, is
JSON, so an unprivileged child can never make the parent run code by what
it sends.  A message over the size limit, of an unknown type or with a
malformed payload raises ImsgError: the receiver treats it as fatal.

Channel is the async (trio) end; the blocking helpers serve the children's
start-up before trio runs.
"""

from __future__ import annotations

import array
import json
import os
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any

import trio

_HDR = struct.Struct("!IIII")          # type, peerid, pid, len
# Largest payload (configs with many servers stay far below it).
MAX_IMSG = 64 << 20
# Bytes asked of one recvmsg().
RECV_SIZE = 1 << 16

# Payload encodings, kept in the top bit of the type field.
_PICKLE = 0x80000000


class ImsgError(Exception):
    """A desynchronised or malformed message stream."""


@dataclass
class Msg:
    type: int
    payload: Any = None
    fd: int = -1
    peerid: int = 0
    pid: int = 0


def encode(mtype: int, payload: Any = None, peerid: int = 0, trusted: bool = False) -> bytes:
    """Frame one message; `trusted` (parent → child only) allows pickle."""
    if trusted:
        body = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        mtype |= _PICKLE
    else:
        body = json.dumps(payload, separators=(",", ":")).encode() if payload is not None else b""
    if len(body) > MAX_IMSG:
        raise ImsgError(f"message too large: {len(body)}")
    return _HDR.pack(mtype, peerid, os.getpid(), len(body)) + body


class Reader:
    """Sans-I/O decoder: feed bytes (+ received fds), get messages."""

    def __init__(self, allow_pickle: bool = False) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []
        self.allow_pickle = allow_pickle
        # Messages decoded (before trio) but not consumed yet: a Channel
        # made with this reader delivers them first.
        self.leftover: list[Msg] = []

    def feed(self, data: bytes, fds: list[int] | None = None) -> list[Msg]:
        self.buf += data
        if fds:
            self.fds.extend(fds)
        out = []
        while len(self.buf) >= _HDR.size:
            mtype, peerid, pid, length = _HDR.unpack_from(self.buf)
            if length > MAX_IMSG:
                raise ImsgError(f"message too large: {length}")
            if len(self.buf) < _HDR.size + length:
                break
            body = bytes(self.buf[_HDR.size:_HDR.size + length])
            del self.buf[:_HDR.size + length]
            if mtype & _PICKLE:
                if not self.allow_pickle:
                    raise ImsgError("pickled payload from an untrusted peer")
                try:
                    payload = pickle.loads(body)
                except Exception as e:
                    raise ImsgError(f"bad payload: {e}") from None
            else:
                try:
                    payload = json.loads(body) if body else None
                except ValueError as e:
                    raise ImsgError(f"bad payload: {e}") from None
            out.append(Msg(mtype & ~_PICKLE, payload, -1, peerid, pid))
        return out


class Channel:
    """One end of a socketpair, under trio.  Sends are serialised."""

    def __init__(self, sock: socket.socket, allow_pickle: bool = False,
                 trusted_send: bool = False, reader: Reader | None = None,
                 accept_fds: bool = True) -> None:
        sock.setblocking(False)
        # False (the parent's end): descriptors a child sends are closed
        # unread; nothing goes up with one.
        self.accept_fds = accept_fds
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.reader = reader or Reader(allow_pickle)
        self.trusted_send = trusted_send
        self.pending: list[Msg] = list(self.reader.leftover)
        self.reader.leftover.clear()
        self._lock = trio.Lock()
        self.closed = False

    async def send(self, mtype: int, payload: Any = None, fd: int = -1, peerid: int = 0) -> None:
        data = encode(mtype, payload, peerid, self.trusted_send)
        async with self._lock:
            if fd >= 0:
                # The fd travels with the first byte of the message.
                await trio.lowlevel.wait_writable(self.sock)
                n = self.sock._sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                data = data[n:]
            view = memoryview(data)
            while view:
                n = await self.sock.send(view)
                view = view[n:]

    async def recv(self) -> Msg | None:
        """The next message, or None when the peer closed the channel."""
        if not self.pending and self.reader.buf:
            self._take(b"", [])
        while not self.pending:
            if self.closed:
                return None
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data, fds = _recv_fds(self.sock._sock)
            except BlockingIOError:
                continue
            except OSError:
                data, fds = b"", []
            if not data:
                self.closed = True
                for fd in fds:
                    os.close(fd)
                return None
            self._take(data, fds)
        return self.pending.pop(0)

    def _take(self, data: bytes, fds: list[int]) -> None:
        if fds and not self.accept_fds:
            for fd in fds:
                os.close(fd)
            fds = []
        msgs = self.reader.feed(data, fds)
        for m in msgs:
            # One fd per message at most, in order.
            m.fd = self.reader.fds.pop(0) if self.reader.fds and _wants_fd(m) else -1
        self.pending.extend(msgs)

    def close(self) -> None:
        self.sock.close()


_FD_TYPES: set[int] = set()


def carries_fd(*types: int) -> None:
    """Declare message types that carry a file descriptor."""
    _FD_TYPES.update(types)


def _wants_fd(m: Msg) -> bool:
    return m.type in _FD_TYPES


def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(RECV_SIZE, socket.CMSG_LEN(16 * fds.itemsize))
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - (len(cdata) % fds.itemsize)])
    return data, list(fds)


# -- blocking helpers (before trio runs) ------------------------------------

def send_blocking(sock: socket.socket, mtype: int, payload: Any = None, fd: int = -1,
                  trusted: bool = False) -> None:
    data = encode(mtype, payload, 0, trusted)
    if fd >= 0:
        n = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        data = data[n:]
    sock.sendall(data)


class Imsg:
    """Message types of both daemons, grouped by prefix as OpenBSD's."""
    CTL_READY = 1        # child -> parent: configured and serving
    CTL_STOP = 2         # parent -> child: stop accepting, drain {"drain": s}, exit
    CTL_VERBOSE = 3      # parent -> child: {"verbose": n}
    CTL_REOPEN = 4       # parent -> logger: log files follow (LOG_FILE), old ones close
    CTL_COMMAND = 5      # control -> parent: a relayctl command to carry out
    CTL_REPLY = 6        # parent -> control: its answer
    CTL_QUIESCE = 7      # parent -> server/relay (reload): stop accepting, close the listeners
    CTL_QUIESCED = 8     # server/relay -> parent: done, nothing more is accepted here
    CFG_CONFIG = 10      # parent -> child: the child's slice of the config (pickled)
    CFG_SOCKET = 11      # parent -> child: a listening socket (fd) {"key": [addr, port]}
    CFG_LOGSOCK = 12     # parent -> child: the datagram socket to the logger (fd)
    CFG_DONE = 13        # parent -> child: configuration complete
    CFG_CONTROL = 14     # parent -> pfe: the control socket, listening (fd)
    CFG_METRICS = 15     # parent -> pfe: a metrics listening socket (fd) {"key": [addr, port]}
    CFG_SHM = 16         # parent -> relay: the relays' shared counters (memfd)
    CFG_RELOAD = 17      # parent -> hce, pfe: a new configuration {"conf", "gen"} (pickled)
    LOG_FILE = 20        # parent -> logger: an open log file (fd) {"name": n}
    HOST_STATUS = 30     # hce -> parent -> relays, control: {"id": n, "up": bool|None}
    HOST_SNAPSHOT = 31   # hce -> parent -> control: hosts and tables (relayctl show)
    HCE_COMMAND = 32     # parent -> hce: poll / enable / disable
    SCRIPT_RUN = 40      # hce -> parent: run a check script {"path", "host", "timeout", "seq"}
    SCRIPT_RESULT = 41   # parent -> hce: {"seq": n, "status": int}
    RELAY_STATS = 50     # relay -> parent -> control: session counters
    RELAY_SESSIONS = 51  # relay -> parent -> control: live sessions
    EVENT = 60           # any -> parent -> control: a monitor event
    DEMOTE = 61          # pfe -> parent: {"group": g, "level": n} (carp track file)
    CFG_TLS_KEY = 70     # parent -> server: a private key (memfd) {"id": server id}
    TLS_TICKET_KEYS = 71  # parent -> servers: session-ticket keys, newest first (pickled)
    CFG_CA_SOCK = 72     # parent -> relayd ca {"gen"} / relay {}: a ca<->relay socketpair end (fd)
    CA_FORGET = 73       # parent -> relayd ca: drop the keys of {"gen": n}
    # ACME: the unprivileged net process asks the key-holding parent; every
    # request is answered (ACME_OK unless said otherwise) before the next.
    ACME_SIGN = 80       # net -> parent: {"url", "nonce", "payload", "kid"}; answer ACME_SIGNED
    ACME_SIGNED = 81     # parent -> net: {"jws": flattened JWS}
    ACME_RESOLVE = 82    # net -> parent: {"host", "port"}; answer ACME_RESOLVED
    ACME_RESOLVED = 83   # parent -> net: {"addrs": getaddrinfo() tuples}
    ACME_TOKEN_ADD = 84  # net -> parent: {"token", "keyauth"}: publish an http-01 answer
    ACME_TOKEN_DEL = 85  # net -> parent: {"token"}: remove it
    ACME_CSR = 86        # net -> parent: {}; answer ACME_CSR {"der": base64url}
    ACME_CERT = 87       # net -> parent: {"pem": the chain as downloaded}: install it
    ACME_REVOKED = 88    # net -> parent: {}: the CA revoked the certificate
    ACME_OK = 89         # parent -> net: {"error": null or a message}
    ACME_ERROR = 90      # net -> parent: {"error", "type", "retry_after"}: why it gives up
    # httpd's built-in ACME: http-01 answers live in the server processes.
    ACME_CHALLENGE = 91  # parent -> servers: {"seq", "add": {token: [keyauth, names]}, "del": [token]}
    ACME_CHALLENGE_OK = 92  # server -> parent: {"seq"}: the answers above are served


carries_fd(Imsg.CFG_SOCKET, Imsg.CFG_LOGSOCK, Imsg.LOG_FILE, Imsg.CFG_CONTROL,
           Imsg.CFG_METRICS, Imsg.CFG_SHM)


def type_names() -> dict[int, str]:
    """Imsg values -> names (for log lines about unknown messages)."""
    return {v: k for k, v in vars(Imsg).items() if k.isupper() and isinstance(v, int)}


carries_fd(Imsg.CFG_TLS_KEY, Imsg.CFG_CA_SOCK)
