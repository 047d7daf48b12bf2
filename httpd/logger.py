"""httpd.logger -- access and error log lines, and the files they go to.

format_access() builds one line in the server's `log style` (common,
combined, forwarded) exactly as log-formats.md gives it; format_conn() the
per-connection line (`connection` style and the -vv error log).  Logs owns
the open files by name under logdir and reopens them on SIGUSR1; lines of a
server with `log syslog` go to syslog instead.

This module does not decide *when* to log: server_http calls it.
"""

from __future__ import annotations

import json
import os
import re
import syslog
import time

from shared import log

# Bytes escaped C-style in values taken from request headers (vis(3)).
_VIS = {9: "\\t", 10: "\\n", 13: "\\r", 11: "\\v", 12: "\\f", 8: "\\b", 7: "\\a",
        92: "\\\\"}

# Text vis() leaves alone: printable ASCII without backslashes.
_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]*")

_ts_sec = -1
_ts_str = ""


def vis(s: str | None) -> str:
    """vis(3)-style escaping so one request always stays one line."""
    if s is None:
        return "-"
    if _PLAIN.fullmatch(s):
        return s
    try:
        raw = s.encode("latin-1")       # header values: one char per byte
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "surrogateescape")
    out = []
    for ch in raw:
        if ch in _VIS:
            out.append(_VIS[ch])
        elif ch < 32 or ch >= 127:
            out.append("\\%03o" % ch)
        else:
            out.append(chr(ch))
    return "".join(out)


def timestamp() -> str:
    """[dd/Mon/yyyy:HH:MM:SS +zzzz] in local time, cached per second."""
    global _ts_sec, _ts_str
    now = int(time.time())
    if now != _ts_sec:
        _ts_sec = now
        _ts_str = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
    return _ts_str


def format_access(style: str, server: str, ip: str, user: str | None,
                  method: str | None, path: str | None, query: str | None,
                  version: str | None, status: int, size: int,
                  referer: str | None = None, agent: str | None = None,
                  xff: str | None = None, xfport: str | None = None,
                  encode=lambda s: s) -> str:
    """One access-log line (no newline); path/query/referer get `encode`."""
    req = ""
    if method:
        req = method
        if path is not None:
            req += " " + encode(path)
            if query is not None:
                req += "?" + encode(query)
        if version:
            req += " " + vis(version)
    line = (f"{server} {ip} - {vis(user) if user else '-'} [{timestamp()}] "
            f"\"{req}\" {status:03d} {size}")
    if style in ("combined", "forwarded"):
        # OpenBSD prints an absent Referer or User-Agent as "" (not "-")
        ref = encode(referer) if referer is not None else ""
        ua = vis(agent) if agent is not None else ""
        line += f" \"{ref}\" \"{ua}\""
    if style == "forwarded":
        line += f" \"{vis(xff)}\" \"{vis(xfport)}\""
    return line


def format_conn(server: str, cid: int, active: int, peer: tuple[str, int],
                local: str, msg: str, requests: str = "") -> str:
    """`server <name>, client <id> (<n> active), <ip>:<port> -> <local>, <msg>[, ...]`.

    `local` is already formatted (`ip:port`, see server_http.local_host)."""
    line = (f"server {server}, client {cid} ({active} active), "
            f"{peer[0]}:{peer[1]} -> {local}, {vis(msg)}")
    if requests:
        line += "," + requests
    return line


class Logs:
    """Open log files by path; write lines; reopen on SIGUSR1."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.fds: dict[str, int] = {}

    def _path(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(self.logdir, name)

    def _fd(self, name: str) -> int | None:
        path = self._path(name)
        fd = self.fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                log.warn_errno(f"logger: cannot open {path}", e)
                self.fds[path] = -1
                return None
            self.fds[path] = fd
        return fd if fd >= 0 else None

    def write(self, name: str, line: str, use_syslog: bool = False,
              pri: int = syslog.LOG_INFO) -> None:
        if use_syslog:
            syslog.syslog(syslog.LOG_DAEMON | pri, line)
            return
        fd = self._fd(name)
        if fd is None:
            return
        try:
            os.write(fd, (line + "\n").encode("utf-8", "surrogateescape"))
        except OSError as e:
            log.warn_errno("logger: write failed", e)

    def open_all(self, names: list[str]) -> None:
        """Open (create) every file the config names, at start and reload."""
        for name in names:
            self._fd(name)

    def reopen(self) -> None:
        """Close every file; the next line opens it again (log rotation)."""
        for fd in self.fds.values():
            if fd >= 0:
                os.close(fd)
        self.fds.clear()

    def close(self) -> None:
        self.reopen()


# -- privilege separation: workers send lines, the logger process writes -----

# Bytes of log entries packed into one datagram at most (a datagram socket's
# send buffer holds about 200 KiB); the logger reads up to LOG_DGRAM_MAX.
LOG_BATCH_BYTES = 32768
LOG_DGRAM_MAX = 1 << 18
# Entries a server process keeps while the logger does not keep up.
LOG_BACKLOG = 65536


class LogSender:
    """A server process's Logs: lines go to the logger over a datagram
    socket.  Same interface as Logs; files are the logger's business.

    The lines written during one pass of the scheduler go out together:
    write() only queues, flusher() (woken by the first line of a pass, so it
    runs once the pass is over) sends them as one datagram, a JSON list of
    entries.  One send and one wakeup of the logger per batch instead of per
    line: that cost about 90 µs a logged request, twice what serving a
    small file costs.  A datagram holds whole lines only, so lines of
    different workers never interleave."""

    def __init__(self, sock) -> None:
        import collections
        sock.setblocking(False)
        self.sock = sock
        self.batch: list[tuple[str, str, bool, int]] = []
        self.pending = collections.deque()     # datagrams not sent yet
        self.logdir = ""
        self._wake = None

    def write(self, name: str, line: str, use_syslog: bool = False,
              pri: int = syslog.LOG_INFO) -> None:
        batch = self.batch
        if len(batch) >= LOG_BACKLOG:
            return                              # the logger is gone or stuck
        batch.append((name, line, bool(use_syslog), pri))
        if len(batch) == 1 and self._wake is not None:
            self._wake.set()

    def _pack(self) -> None:
        """Encode the queued entries into datagrams of LOG_BATCH_BYTES at
        most (a longer single entry goes alone)."""
        batch, self.batch = self.batch, []
        start, size = 0, 0
        for i, entry in enumerate(batch):
            n = len(entry[0]) + len(entry[1]) + 16
            if size and size + n > LOG_BATCH_BYTES:
                self.pending.append(json.dumps(batch[start:i]).encode())
                start, size = i, 0
            size += n
        if start < len(batch):
            self.pending.append(json.dumps(batch[start:] if start else batch).encode())

    def _send_pending(self) -> bool:
        """Send what can go without blocking; False if the socket is full."""
        pending = self.pending
        while pending:
            try:
                self.sock.send(pending[0])
            except BlockingIOError:
                return False
            except OSError:
                pass                            # the logger is gone: dropped
            pending.popleft()
        return True

    async def flusher(self) -> None:
        """Send the queued lines, a batch per scheduler pass."""
        import trio
        try:
            while True:
                self._wake = trio.Event()
                if not self.batch:
                    await self._wake.wait()
                self._pack()
                while not self._send_pending():
                    await trio.lowlevel.wait_writable(self.sock)
        finally:
            # Cancelled when the process stops: what is left, if it fits.
            self._pack()
            self._send_pending()

    def open_all(self, names) -> None:
        pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


def logger_main(fd: int) -> int:
    """`httpd -P logger`: write the workers' lines to the files the parent
    opened (passed as descriptors); new descriptors replace old ones on
    SIGUSR1 and reload."""
    import socket

    import trio

    from shared import pledge, proc
    from shared.imsg import Channel, Imsg

    sock = proc.child_socket(fd)
    setup = proc.recv_setup(sock)
    cfg = setup.config
    files: dict[str, int] = {m.payload["name"]: m.fd for m in setup.fds(Imsg.LOG_FILE)}
    lsock = socket.socket(fileno=setup.fds(Imsg.CFG_LOGSOCK)[0].fd)
    user = proc.find_user((cfg["user"],)) if cfg.get("user") else None
    proc.drop_privileges(cfg.get("chroot"), user)
    # OpenBSD: pledge("stdio recvfd"): it writes to descriptors it was given.
    pledge.pledge("logger", ("stdio",), connect=())

    def write_batch(raw: bytes) -> None:
        # A datagram: a list of [name, line, use_syslog, pri] entries.  One
        # write per file.
        try:
            entries = json.loads(raw)
        except (ValueError, TypeError):
            return
        if not isinstance(entries, list):
            return
        out: dict[str, list[str]] = {}
        echo = log.get_verbose() > 1
        for entry in entries:
            try:
                name, line, use_syslog, pri = entry
            except (ValueError, TypeError):
                continue
            if use_syslog:
                syslog.syslog(syslog.LOG_DAEMON | int(pri), str(line))
            elif name in files:
                out.setdefault(name, []).append(str(line) + "\n")
                if echo:
                    log.debug(str(line))    # logger_log(): "For debug output"
        for name, lines in out.items():
            try:
                os.write(files[name], "".join(lines).encode("utf-8", "surrogateescape"))
            except OSError as e:
                log.warn_errno(f"logger: write to {name} failed", e)

    async def main() -> None:
        chan = Channel(sock, allow_pickle=True, reader=setup.reader)
        lsock.setblocking(False)
        tl = trio.socket.from_stdlib_socket(lsock)

        async def lines() -> None:
            while True:
                write_batch(await tl.recv(LOG_DGRAM_MAX))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lines)
            await chan.send(Imsg.CTL_READY)
            while True:
                msg = await chan.recv()
                if msg is None or msg.type == Imsg.CTL_STOP:
                    break
                if msg.type == Imsg.LOG_FILE and msg.fd >= 0:
                    old = files.get(msg.payload["name"])
                    files[msg.payload["name"]] = msg.fd
                    if old is not None and old != msg.fd:
                        os.close(old)
                elif msg.type == Imsg.CTL_VERBOSE:
                    log.set_verbose(int(msg.payload.get("verbose", 0)))
            # Write what the workers sent before they stopped.
            with trio.move_on_after(0.5):
                while True:
                    try:
                        write_batch(lsock.recv(LOG_DGRAM_MAX))
                    except BlockingIOError:
                        await trio.sleep(0.05)
                        try:
                            write_batch(lsock.recv(LOG_DGRAM_MAX))
                        except BlockingIOError:
                            break
            nursery.cancel_scope.cancel()

    trio.run(main)
    return 0
