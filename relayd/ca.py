"""relayd.ca -- the ca process: the relays' private keys (ca.c), and the
relays' side of it.

The parent reads every relay's keys (`tls keypair`, the inspection
`ca key`) and sends them, each in a sealed memfd, to the one `ca` process
only: relay processes get certificates and key ids.  Their server
contexts are keyless (engine.tls): each private operation of a full
handshake -- and the CA's signature on a forged certificate of TLS
inspection -- is a synchronous request on the relay's own socketpair to
ca, which signs and answers.  ca is chrooted, unprivileged, and pledged
"stdio" (no file, no network, no new sockets); it never unpickles what a
relay sends.

Wire format (SOCK_SEQPACKET, one datagram each way, network order):

  request   cookie u64, op u8, padding i32, key id length u16, key id, data
  answer    cookie u64, status u8 (0: done, 1: refused), result

Keys are kept by (generation, key id), and a relay's socket is bound to
its generation when the parent hands it over (CFG_CA_SOCK {"gen"}): a
relay can use the keys of its own configuration only.  ca checks the key
id, the operation against the key's type, the input length and the
padding (engine.tls.PrivateKey), and logs each refusal.  A reload sends
the new generation's keys (CFG_TLS_KEY {"id", "gen"}); CA_FORGET {"gen"}
drops an old one's.

The relay side (CaClient) waits at most TIMEOUT for its answer (the event
loop waits too: OpenSSL cannot defer the operation) and skips stale
answers by cookie; no answer fails that handshake only.  To keep that wait
short, ca readies an ECDSA key's next nonce once it has answered
(engine.tls.PrivateKey.prepare): a request then waits for the end of a
signature only, not for its scalar multiplication.

Messages from the parent: CFG_CONFIG {"user", "chroot"}, CFG_TLS_KEY,
CFG_CA_SOCK, CFG_DONE, then at any time CFG_TLS_KEY, CFG_CA_SOCK,
CA_FORGET, CTL_VERBOSE, CTL_STOP.  ca runs no trio loop: poll(2) over
its sockets, an answer per request, in one thread.
"""

from __future__ import annotations

import itertools
import select
import socket
import struct
import time

from engine import tls
from shared import log, pledge, proc
from shared.imsg import Imsg, send_blocking

# Seconds a relay waits for ca's answer (OpenBSD: RELAY_TLS_PRIV_TIMEOUT).
TIMEOUT = 1.0
# Largest request and answer: an RSA-16384 block plus headers.
MAX_MESSAGE = 4096
_REQ = struct.Struct("!QBiH")
_ANS = struct.Struct("!QB")
DONE, REFUSED = 0, 1
OP_NAMES = tls.OPS


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(ca's end, the relay's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# -- the relay side -----------------------------------------------------------------

class CaClient:
    """A relay's link to ca: signer(key id) makes engine.tls Signers."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = None
        self._cookies = itertools.count(1)
        if sock is not None:
            self.replace(sock)

    def replace(self, sock: socket.socket) -> None:
        """A new socket (ca was restarted)."""
        old, self.sock = self.sock, sock
        if old is not None:
            old.close()
        # A blocking recv() bounded by SO_RCVTIMEO waits for the answer:
        # one system call where poll() + recv() took two.
        sock.setblocking(True)
        _recv_timeout(sock, TIMEOUT)

    def signer(self, key_id: str) -> tls.Signer:
        def sign(op: int, data: bytes, padding: int) -> bytes | None:
            return self.call(key_id, op, data, padding)
        return sign

    def call(self, key_id: str, op: int, data: bytes, padding: int) -> bytes | None:
        """One private operation; None when ca refuses, is gone or late."""
        sock = self.sock
        if sock is None:
            log.warn(f"ca: no ca process for key {key_id}")
            return None
        cookie = next(self._cookies)
        kid = key_id.encode()
        try:
            sock.send(_REQ.pack(cookie, op, padding, len(kid)) + kid + data)
            ans = self._answer(sock, cookie)
        except OSError as e:
            log.warn(f"ca: key {key_id}: {e.strerror or e}")
            return None
        if ans is None:
            log.warn(f"ca: no answer for key {key_id} in {TIMEOUT:g} s")
            return None
        if len(ans) < _ANS.size:
            log.warn("ca: connection to ca lost")
            return None
        if _ANS.unpack_from(ans)[1] != DONE:
            log.warn(f"ca: key {key_id}: {OP_NAMES.get(op, op)} refused")
            return None
        return ans[_ANS.size:]

    @staticmethod
    def _answer(sock: socket.socket, cookie: int) -> bytes | None:
        """The answer to `cookie` (b"" when ca is gone), None when late."""
        deadline, stale = time.monotonic() + TIMEOUT, False
        try:
            while True:
                try:
                    ans = sock.recv(MAX_MESSAGE)
                except BlockingIOError:          # SO_RCVTIMEO ran out
                    return None
                if len(ans) < _ANS.size or _ANS.unpack_from(ans)[0] == cookie:
                    return ans
                # The late answer of an earlier request: wait for ours
                # only as long as is left of TIMEOUT.
                left, stale = deadline - time.monotonic(), True
                if left <= 0:
                    return None
                _recv_timeout(sock, left)
        finally:
            if stale:
                _recv_timeout(sock, TIMEOUT)


def _recv_timeout(sock: socket.socket, seconds: float) -> None:
    us = max(int(seconds * 1e6), 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", *divmod(us, 1000000)))


# -- the ca process ---------------------------------------------------------------

class Keys:
    """Private keys by (generation, key id), and the answer to a request."""

    def __init__(self) -> None:
        self.keys: dict[tuple[int, str], tls.PrivateKey] = {}
        self.used: tls.PrivateKey | None = None      # by the last answer

    def prepare(self) -> None:
        """Ready the next signature of the key the last answer used (an
        ECDSA nonce, engine.tls.PrivateKey.prepare): done once the answer
        is sent, so the relay waits only for the rest of the signature."""
        key, self.used = self.used, None
        if key is not None:
            key.prepare()

    def add(self, gen: int, key_id: str, pem: bytearray) -> None:
        try:
            old = self.keys.pop((gen, key_id), None)
            if old is not None:
                old.close()
            key = self.keys[(gen, key_id)] = tls.PrivateKey(pem)
            key.prepare()
        except tls.TlsError as e:
            log.warn(f"ca: key {key_id}: {e}")
        finally:
            tls.wipe([pem])

    def forget(self, gen: int) -> None:
        for k in [k for k in self.keys if k[0] == gen]:
            self.keys.pop(k).close()

    def answer(self, gen: int, req: bytes) -> bytes:
        """The answer datagram to `req` from a relay of generation `gen`."""
        if len(req) < _REQ.size:
            log.warn(f"ca: relay (generation {gen}): short request")
            return _ANS.pack(0, REFUSED)
        cookie, op, padding, n = _REQ.unpack_from(req)
        kid = req[_REQ.size:_REQ.size + n].decode(errors="replace")
        data = req[_REQ.size + n:]
        key = self.keys.get((gen, kid))
        try:
            if key is None or len(kid) != n:
                raise ValueError("unknown key")
            self.used = key
            return _ANS.pack(cookie, DONE) + key.op(op, data, padding)
        except ValueError as e:
            log.warn(f"ca: relay (generation {gen}): key {kid}: "
                     f"{OP_NAMES.get(op, op)} refused: {e}")
            return _ANS.pack(cookie, REFUSED)


class Ca:
    """The ca process's loop: one thread, poll(2) over the parent's socket
    and the relays' sockets, each request answered as it comes (a trio
    loop cost more per request than the signature itself)."""

    def __init__(self, sock: socket.socket, reader, keys: Keys) -> None:
        self.sock = sock
        self.reader = reader
        self.keys = keys
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.relays: dict[int, tuple[socket.socket, int]] = {}    # fd -> (socket, generation)

    def add(self, sock: socket.socket, gen: int) -> None:
        # Non-blocking: a relay that does not read its answers loses them
        # and holds up nobody else.
        sock.setblocking(False)
        self.relays[sock.fileno()] = (sock, gen)
        self.poller.register(sock, select.POLLIN)

    def _drop(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.relays.pop(fd)[0].close()

    def _parent(self, msg) -> None:
        p = msg.payload
        if msg.type == Imsg.CFG_TLS_KEY:
            self.keys.add(int(p["gen"]), str(p["id"]), tls.key_from_fd(msg.fd))
        elif msg.type == Imsg.CFG_CA_SOCK:
            self.add(socket.socket(fileno=msg.fd), int(p["gen"]))
        elif msg.type == Imsg.CA_FORGET:
            self.keys.forget(int(p["gen"]))
        else:
            raise ValueError(f"unknown message type {msg.type}")

    def _from_parent(self, msgs: list) -> int | None:
        for m in msgs:
            status = proc.parent_message(m, "ca", self._parent)
            if status is not None:
                return status
        return None

    def _answer(self, fd: int, s: socket.socket, gen: int) -> None:
        try:
            req = s.recv(MAX_MESSAGE)
            if req:
                s.send(self.keys.answer(gen, req))
                self.keys.prepare()
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop(fd)       # the relay has exited

    def run(self) -> int:
        """Until CTL_STOP or the parent is gone: the exit status."""
        parent = self.sock.fileno()
        status = self._from_parent(self.reader.leftover)    # read along with CFG_DONE
        self.reader.leftover.clear()
        while status is None:
            for fd, ev in self.poller.poll():
                if fd == parent:
                    msgs = proc.recv_nowait(self.sock, self.reader)
                    if not msgs and ev & (select.POLLHUP | select.POLLERR):
                        return 0
                    status = self._from_parent(msgs)
                    if status is not None:
                        break
                    continue
                if fd in self.relays:
                    self._answer(fd, *self.relays[fd])
        return status


def ca_main(fd: int) -> int:
    """`relayd -P ca`: hold the keys, sign for the relays."""
    sock = proc.child_socket(fd)
    setup = proc.recv_setup(sock)
    cfg = setup.config
    ca = Ca(sock, setup.reader, Keys())
    for m in setup.msgs:
        ca._parent(m)
    user = proc.find_user((cfg["user"],)) if cfg.get("user") else None
    proc.drop_privileges(cfg.get("chroot"), user)
    # OpenBSD: pledge("stdio recvfd"); recvmsg is in stdio here.
    pledge.pledge("ca", ("stdio",), connect=())
    send_blocking(sock, Imsg.CTL_READY)
    return ca.run()
