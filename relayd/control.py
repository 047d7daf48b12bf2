"""relayd.control -- the control socket relayctl talks to.

Four parts, so that the socket can move into its own process (OpenBSD runs
it in pfe) when privilege separation lands:

1. The protocol, sans I/O.  One JSON object per line both ways.  A request
   is {"cmd": C, "args": [...]} with C and args as relayctl's grammar
   spells them, abbreviations resolved:

     show summary|hosts|redirects|relays|routers|sessions
     host|table|redirect disable|enable NAME|ID   (ID: a JSON integer)
     poll | reload | load PATH | monitor | log verbose|brief | stop

   Answers are rows {"type": ...}: `show` sends "redirect", "relay",
   "router", "table", "host", "demote" (summary only: one per carp group,
   its counter) or "session" rows and then {"type": "end"};
   the other commands send {"type": "ok"} or {"type": "fail", "error":
   text}; `monitor` sends {"type": "event", ...} rows until either side
   closes.  A request the server cannot parse gets {"type": "error",
   "error": text} and the connection is closed.  Rows carry raw values
   (states, counters); relayctl lays them out like OpenBSD's relayctl, and
   `relayctl -j` prints them as they come.  Events carry the imsg type,
   length, peer id and pid OpenBSD's monitor prints.

2. ControlBackend: what the socket needs from the rest of relayd (views,
   host/table/redirect switches, poll, reload, log level, an event feed).
   summary() returns the rows in pfe's show() order; the per-kind views
   filter it the way relayctl does.

3. The server: open_socket() makes the socket (mode 0660, owned by root
   when run as root; a stale socket is removed, a live one -- another
   relayd answering -- is refused) and serve() answers connections on trio.

4. InProcessBackend: the backend over one process holding everything (a
   Parent-like object with its RelayProc, RelayState, Stats and Hce): unit
   tests and tools.

5. MessageBackend: the backend of the pfe process under privilege
   separation, where the socket lives: views and switches are commands to
   the parent, which forwards them to hce and the relay processes.

trio is imported inside the functions that need it: relayctl imports the
protocol part and starts faster without it.

Not here: the command-line grammar and the text layout (relayctl), the
checks (hce), the counters (stats).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from relayd.control_rows import (host_row, pfe_row_map, redirect_row, relay_row, router_row,
                                  table_row)
from shared import log, sd

# -- 1. protocol ---------------------------------------------------------------

# Longest request or answer line accepted.
MAX_LINE = 1 << 20
# listen(2) backlog of the control socket.
CONTROL_BACKLOG = 16
# Events a slow `monitor` client may have pending before it is dropped.
MONITOR_BACKLOG = 256

SHOW = ("summary", "hosts", "redirects", "relays", "routers", "sessions")
SWITCHES = ("host", "table", "redirect")
COMMANDS = ("show", "host", "table", "redirect", "poll", "reload", "load",
            "monitor", "log", "stop")

# imsg types and payload sizes OpenBSD's `relayctl monitor` prints
# (relayd.h enum imsg_type; struct ctl_status, struct ctl_id on LP64).
IMSG_HEADER_SIZE = 16
IMSG_CTL_VERBOSE = 3
IMSG_CTL_TABLE_CHANGED = 12
IMSG_CTL_PULL_RULESET = 13
IMSG_CTL_PUSH_RULESET = 14
IMSG_CTL_RDR_ENABLE = 16
IMSG_CTL_RDR_DISABLE = 17
IMSG_CTL_TABLE_ENABLE = 18
IMSG_CTL_TABLE_DISABLE = 19
IMSG_CTL_HOST_ENABLE = 20
IMSG_CTL_HOST_DISABLE = 21
IMSG_HOST_STATUS = 36
IMSG_SYNC = 37
CTL_STATUS_SIZE = 32
CTL_ID_SIZE = 68
# Peer id and pid control_imsg_forward() stamps on what it forwards.
MONITOR_PEERID = 0
MONITOR_PID = 1

_CTL_EVENTS = {
    ("host", False): ("ctl_host_disable", IMSG_CTL_HOST_DISABLE),
    ("host", True): ("ctl_host_enable", IMSG_CTL_HOST_ENABLE),
    ("table", False): ("ctl_table_disable", IMSG_CTL_TABLE_DISABLE),
    ("table", True): ("ctl_table_enable", IMSG_CTL_TABLE_ENABLE),
    ("redirect", False): ("ctl_rdr_disable", IMSG_CTL_RDR_DISABLE),
    ("redirect", True): ("ctl_rdr_enable", IMSG_CTL_RDR_ENABLE),
}


class ProtocolError(Exception):
    """A malformed request or answer."""


class CommandFailed(Exception):
    """A backend's reason for `command failed`."""


@dataclass
class Request:
    cmd: str
    args: list = field(default_factory=list)

    def encode(self) -> bytes:
        return encode({"cmd": self.cmd, "args": self.args})


def encode(obj: dict) -> bytes:
    """One protocol line."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    """One protocol line back to an object; raises ProtocolError."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed message: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed message: not an object")
    return obj


def _target(v: Any) -> int | str:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ProtocolError("name or id expected")
    if isinstance(v, int) and not 0 <= v <= 0xFFFFFFFF:
        raise ProtocolError(f"invalid id: {v}")
    return v


def parse_request(line: bytes) -> Request:
    """Validate one request line; raises ProtocolError with the reason."""
    obj = decode(line)
    cmd, args = obj.get("cmd"), obj.get("args", [])
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise ProtocolError(f"unknown command: {cmd}")
    if not isinstance(args, list):
        raise ProtocolError("args must be a list")
    want = {"show": 1, "load": 1, "log": 1}.get(cmd, 2 if cmd in SWITCHES else 0)
    if len(args) != want:
        raise ProtocolError(f"{cmd}: {want} argument{'s' if want != 1 else ''} expected")
    if cmd == "show" and args[0] not in SHOW:
        raise ProtocolError(f"show: unknown argument: {args[0]}")
    if cmd == "log" and args[0] not in ("verbose", "brief"):
        raise ProtocolError(f"log: unknown argument: {args[0]}")
    if cmd == "load" and (not isinstance(args[0], str) or not args[0]):
        raise ProtocolError("load: path expected")
    if cmd in SWITCHES:
        if args[0] not in ("disable", "enable"):
            raise ProtocolError(f"{cmd}: unknown argument: {args[0]}")
        args = [args[0], _target(args[1])]
    return Request(cmd, list(args))


class LineBuffer:
    """Split a byte stream into lines (without the newline)."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines = []
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                break
            lines.append(bytes(self._buf[:i]))
            del self._buf[:i + 1]
        if len(self._buf) > self.limit:
            raise ProtocolError("line too long")
        return lines


OK = {"type": "ok"}
END = {"type": "end"}


def fail(error: str) -> dict:
    return {"type": "fail", "error": error}


def error(text: str) -> dict:
    return {"type": "error", "error": text}


# Which rows each `show` gets (relayctl.c show_summary_msg(), plus demote).
SHOW_TYPES = {
    "summary": frozenset({"redirect", "table", "host", "relay", "router", "demote"}),
    "hosts": frozenset({"table", "host"}),
    "redirects": frozenset({"redirect"}),
    "relays": frozenset({"relay"}),
    "routers": frozenset({"router"}),
}


def event(kind: str, imsg: int, size: int, /, **fields) -> dict:
    """A monitor event as OpenBSD's control_imsg_forward() would send it."""
    return {"type": "event", "event": kind, "imsg": imsg, "len": IMSG_HEADER_SIZE + size,
            "peerid": MONITOR_PEERID, "pid": MONITOR_PID, "time": int(time.time()),
            **fields}


def host_status_event(host_id: int, state: str, name: str = "") -> dict:
    return event("host_status", IMSG_HOST_STATUS, CTL_STATUS_SIZE, id=host_id,
                 state=state, host=name)


def ctl_event(kind: str, enable: bool, id: int, name: str = "") -> dict:
    """ctl_{host,table,rdr}_{disable,enable}: `name` is what the command
    named (empty when it gave an id)."""
    ev, imsg = _CTL_EVENTS[(kind, enable)]
    return event(ev, imsg, CTL_ID_SIZE, id=id, name=name)


def verbose_event(level: int) -> dict:
    """IMSG_CTL_VERBOSE, which pfe also forwards to monitors (relayctl shows
    it as <unknown> and stops monitoring)."""
    return event("<unknown>", IMSG_CTL_VERBOSE, 4, level=level)


# -- 2. the backend interface --------------------------------------------------

class ControlBackend(ABC):
    """What the control socket asks of relayd.  Views return protocol rows;
    switches return False (or raise CommandFailed) when the target does not
    exist or cannot be switched."""

    @abstractmethod
    async def summary(self) -> list[dict]:
        """Redirect, table, host, relay and router rows in pfe's show() order."""

    async def hosts(self) -> list[dict]:
        return [r for r in await self.summary() if r["type"] in SHOW_TYPES["hosts"]]

    async def relays(self) -> list[dict]:
        return [r for r in await self.summary() if r["type"] == "relay"]

    async def redirects(self) -> list[dict]:
        return [r for r in await self.summary() if r["type"] == "redirect"]

    async def routers(self) -> list[dict]:
        return [r for r in await self.summary() if r["type"] == "router"]

    @abstractmethod
    async def sessions(self) -> list[dict]:
        """Session rows of every relay process."""

    @abstractmethod
    async def host_set(self, key: int | str, enable: bool) -> bool: ...

    @abstractmethod
    async def table_set(self, key: int | str, enable: bool) -> bool: ...

    @abstractmethod
    async def redirect_set(self, key: int | str, enable: bool) -> bool: ...

    @abstractmethod
    async def poll(self) -> None:
        """Check every host now."""

    @abstractmethod
    async def reload(self, path: str | None = None) -> bool:
        """Load the configuration file again (or `path` once); False when
        the new configuration was refused."""

    @abstractmethod
    async def log_verbose(self, verbose: bool) -> None: ...

    @abstractmethod
    def subscribe(self):
        """An async iterator of event rows (a trio receive channel); close
        it to unsubscribe."""

    async def stop(self) -> None:
        """Shut relayd down (`relayctl stop`)."""
        os.kill(os.getpid(), signal.SIGTERM)


class EventHub:
    """Fan events out to monitor subscribers; a subscriber that falls
    MONITOR_BACKLOG events behind is dropped."""

    def __init__(self) -> None:
        self._subs: list = []

    def subscribe(self):
        import trio
        send, recv = trio.open_memory_channel(MONITOR_BACKLOG)
        self._subs.append(send)
        return recv

    def publish(self, ev: dict) -> None:
        import trio
        for s in list(self._subs):
            try:
                s.send_nowait(ev)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._subs.remove(s)
                s.close()

    @property
    def subscribers(self) -> int:
        return len(self._subs)


# -- 3. the server -------------------------------------------------------------

class ControlError(Exception):
    """The control socket cannot be set up."""


# socket -> (path, dev, ino) of what open_socket() made, for close_socket().
_owned: "weakref.WeakKeyDictionary[socket.socket, tuple[str, int, int]]" = \
    weakref.WeakKeyDictionary()


def open_socket(path: str) -> socket.socket:
    """Bind and listen on the control socket `path` (control_init()).

    A socket file nobody answers on is removed; one a running relayd
    answers on is refused, as is anything that is not a socket."""
    if len(os.fsencode(path)) >= 108:
        raise ControlError(f"control_init: {path} name too long")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ControlError(f"control_init: {path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control_init: {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlError(f"control_init: {path}: {e.strerror or e}") from None
        else:
            raise ControlError(f"control_init: {path}: in use by a running relayd")
        finally:
            probe.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ControlError(f"control_init: unlink {path}: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ControlError(f"control_init: bind: {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    try:
        os.chmod(path, 0o660)
        if os.geteuid() == 0:
            os.chown(path, 0, 0)
        sock.listen(CONTROL_BACKLOG)
        st = os.stat(path)
    except OSError as e:
        sock.close()
        _unlink(path)
        raise ControlError(f"control_init: {path}: {e.strerror or e}") from None
    sock.setblocking(False)
    _owned[sock] = (path, st.st_dev, st.st_ino)
    return sock


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def close_socket(sock: socket.socket) -> None:
    """Close a socket from open_socket() and remove its file if it is
    still ours (not replaced by another relayd's)."""
    entry = _owned.pop(sock, None)
    sock.close()
    if entry is None:
        return
    path, dev, ino = entry
    try:
        st = os.lstat(path)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == (dev, ino):
        _unlink(path)


async def dispatch(backend: ControlBackend, req: Request) -> list[dict]:
    """The answer rows of one request (monitor aside)."""
    cmd, args = req.cmd, req.args
    if cmd == "show":
        return list(await getattr(backend, args[0])()) + [END]
    if cmd in SWITCHES:
        enable = args[0] == "enable"
        setter = {"host": backend.host_set, "table": backend.table_set,
                  "redirect": backend.redirect_set}[cmd]
        try:
            ok = await setter(args[1], enable)
        except CommandFailed as e:
            return [fail(str(e))]
        if not ok:
            what = "id" if isinstance(args[1], int) else "name"
            return [fail(f"no {cmd} with {what} {args[1]}")]
        return [OK]
    if cmd == "poll":
        await backend.poll()
        return [OK]
    if cmd in ("reload", "load"):
        ok = await backend.reload(args[0] if cmd == "load" else None)
        return [OK] if ok else [fail("configuration refused, see the log")]
    if cmd == "log":
        await backend.log_verbose(args[0] == "verbose")
        return [OK]
    if cmd == "stop":
        return [OK]
    return [error(f"unknown command: {cmd}")]


async def _send(stream, obj: dict) -> None:
    await stream.send_all(encode(obj))


async def _monitor(backend: ControlBackend, stream) -> None:
    """Stream events until the client goes away or falls behind."""
    import trio
    events = backend.subscribe()
    async with events, trio.open_nursery() as nursery:
        async def watch_eof() -> None:
            try:
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()
        nursery.start_soon(watch_eof)
        async for ev in events:
            await _send(stream, ev)
        nursery.cancel_scope.cancel()


async def handle(backend: ControlBackend, stream) -> None:
    """One control connection: requests in, answers out."""
    import trio
    buf = LineBuffer()
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            for line in buf.feed(data):
                if not line.strip():
                    continue
                req = parse_request(line)
                if req.cmd == "monitor":
                    await _monitor(backend, stream)
                    return
                for row in await dispatch(backend, req):
                    await _send(stream, row)
                if req.cmd == "stop":
                    log.info("control: stop requested")
                    await backend.stop()
    except ProtocolError as e:
        try:
            await _send(stream, error(str(e)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve(sock: socket.socket, backend: ControlBackend,
                task_status=None) -> None:
    """Answer control connections on `sock` (from open_socket()) until
    cancelled; the socket is closed and its file removed on the way out."""
    import trio
    if task_status is None:
        task_status = trio.TASK_STATUS_IGNORED
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def client(stream) -> None:
        async with stream:
            try:
                await handle(backend, stream)
            except Exception as e:         # one client's bug must not stop the socket
                log.warn_exc(f"control: {e!r}")

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, client, [listener])
            task_status.started()
    finally:
        close_socket(sock)


# -- views shared by the backends ----------------------------------------------

def snapshot_tables(snapshot: list[dict]) -> dict[int, tuple[dict, list[dict]]]:
    """Table instance id -> (table row, host rows) from hce's snapshot()."""
    out: dict[int, tuple[dict, list[dict]]] = {}
    for t in snapshot:
        hosts = [host_row(h["id"], h["name"], h["state"], parent=h["parent"],
                          table=t["id"], disabled=h["disabled"],
                          check_cnt=h["check_cnt"], up_cnt=h["up_cnt"],
                          retry_cnt=h["retry_cnt"], error=h["error"],
                          addr=h["addr"], availability=h["availability"])
                 for h in t["hosts"]]
        out[t["id"]] = (table_row(t["id"], t["name"], t["up"], t["disabled"],
                                  port=t["port"], check=t["check"]), hosts)
    return out


def summary_rows(conf, tables: dict, rdr_disabled: set, relay_stats,
                 pfe_rows: dict) -> list[dict]:
    """Rows in pfe's show() order.  `relay_stats(name)`: the ctl_stats
    list of one relay; `pfe_rows`: redirect/router rows pfe made, by
    (type, id)."""
    rows: list[dict] = []

    def add_table(inst) -> None:
        if inst is None or inst.id not in tables:
            return
        trow, hrows = tables[inst.id]
        rows.append(trow)
        if not trow["disabled"]:
            rows.extend(hrows)

    for rdr in conf.redirects:
        disabled = rdr.disabled or rdr.name in rdr_disabled
        main = tables.get(rdr.table.table.id) if rdr.table.table else None
        bak = tables.get(rdr.backup.table.id) if rdr.backup and rdr.backup.table else None
        main_up = main[0]["up"] if main and not main[0]["disabled"] else 0
        bak_up = bak[0]["up"] if bak and not bak[0]["disabled"] else 0
        rows.append(pfe_rows.get(("redirect", rdr.id)) or  # pfe hook
                    redirect_row(rdr.id, rdr.name, disabled,
                                 down=disabled or (not main_up and not bak_up),
                                 backup=not main_up and bak_up > 0))
        if disabled:
            continue
        add_table(rdr.table.table)
        if rdr.backup is not None:
            add_table(rdr.backup.table)
    for rl in conf.relays:
        for lis in rl.listens or (None,):
            rid = (lis.id if lis is not None else 0) or rl.id
            name = (lis.name if lis is not None else "") or rl.name
            rows.append(relay_row(rid, name, rl.disabled, relay_stats(name)))
            for fwd in rl.tables:
                add_table(fwd.table)
    for rt in conf.routers:
        rows.append(pfe_rows.get(("router", rt.id)) or  # pfe hook
                    router_row(rt.id, rt.name, rt.disabled, rtable=rt.rtable,
                               rtlabel=rt.rtlabel,
                               routes=[[str(n.network_address), n.prefixlen]
                                       for n in rt.routes]))
        if rt.disabled:
            continue
        add_table(rt.forward.table)
    rows.extend(sorted((r for r in pfe_rows.values() if r["type"] == "demote"),
                       key=lambda r: r["name"]))
    return rows


# -- 4. the in-process backend -------------------------------------------------

class InProcessBackend(ControlBackend):
    """relayctl over the single relayd process of today.

    `parent` is relayd.parent.Parent: .conf, .proc (RelayProc: .state,
    .stats), .hce (hce.Hce or None) and .reload(path).  Host state events
    come from hce's notify callback, which this backend tees."""

    def __init__(self, parent) -> None:
        self.parent = parent
        self.hub = EventHub()
        self._rdr_disabled: set[str] = set()   # redirect names disabled at run time
        self._quiet = False                    # no host_status events while switching
        self._hce = None
        self.attach()

    def attach(self) -> None:
        """Tee hce's host state notifications into the monitor feed."""
        engine = getattr(self.parent, "hce", None)
        if engine is None or engine is self._hce:
            return
        self._hce = engine
        inner = engine.notify

        def notify(host_id, state) -> None:
            if inner is not None:
                inner(host_id, state)
            self._host_status(host_id, state)
        engine.notify = notify

    def _host_status(self, host_id: int, state) -> None:
        if self._quiet or not self.hub.subscribers:
            return
        h = self._hce.hosts.get(host_id) if self._hce is not None else None
        self.hub.publish(host_status_event(host_id, str(state), h.name if h else ""))

    def subscribe(self):
        self.attach()
        return self.hub.subscribe()

    # -- views -----------------------------------------------------------------
    def _tables(self) -> dict[int, tuple[dict, list[dict]]]:
        """Table instance id -> (table row, host rows)."""
        conf = self.parent.conf
        engine = getattr(self.parent, "hce", None)
        out: dict[int, tuple[dict, list[dict]]] = {}
        if engine is not None:
            out = snapshot_tables(engine.snapshot())
            return out
        state = self.parent.proc.state if self.parent.proc is not None else None
        for inst in conf.instances:
            hosts = []
            for h in inst.hosts:
                up = state.host_up(h.id) if state is not None else None
                hosts.append(host_row(h.id, h.name, "up" if up else "unknown",
                                      parent=h.parent, table=inst.id, addr=h.addr))
            n = sum(1 for h in hosts if h["state"] == "up")
            out[inst.id] = (table_row(inst.id, inst.name, n, inst.disabled, port=inst.port,
                                      check=inst.check.type), hosts)
        return out

    async def _pfe_rows(self) -> dict:   # pfe hook: redirect/router rows from pfe
        pfe = getattr(self.parent, "pfe", None)
        if pfe is None:
            return {}
        await pfe.refresh_stats()
        return pfe_row_map(pfe.snapshot())

    async def summary(self) -> list[dict]:
        tables = self._tables()
        pfe_rows = await self._pfe_rows()   # pfe hook
        stats = getattr(self.parent.proc, "stats", None)
        return summary_rows(self.parent.conf, tables, self._rdr_disabled,
                            lambda name: [stats.relay(name)] if stats is not None else [],
                            pfe_rows)

    async def sessions(self) -> list[dict]:
        stats = getattr(self.parent.proc, "stats", None)
        return stats.session_rows() if stats is not None else []

    # -- switches --------------------------------------------------------------
    def _event(self, kind: str, enable: bool, id: int, key: int | str) -> None:
        self.hub.publish(ctl_event(kind, enable, id, key if isinstance(key, str) else ""))

    async def host_set(self, key: int | str, enable: bool) -> bool:
        engine = self.parent.hce
        h = engine.find_host(key) if engine is not None else None
        if h is None:
            return False
        if h.parent:
            raise CommandFailed(f"host {h.name} (id {h.id}) follows its parent host "
                                f"{h.parent}; switch that one")
        state = self.parent.proc.state
        disabled_hosts = getattr(state, "disabled_hosts", None)   # relay.py control hook
        if h.disabled != (not enable):
            self._quiet = True
            try:
                for x in [h] + list(h.children):
                    engine.set_disabled(host=x.id, disabled=not enable)
                    if disabled_hosts is not None:
                        (disabled_hosts.discard if enable else disabled_hosts.add)(x.id)
            finally:
                self._quiet = False
            log.debug(f"{'enable' if enable else 'disable'}_host: host {h.id}")
        self._event("host", enable, h.id, key)
        return True

    async def table_set(self, key: int | str, enable: bool) -> bool:
        engine = self.parent.hce
        t = engine.find_table(key) if engine is not None else None
        if t is None:
            return False
        self._switch_table(t, enable)
        self._event("table", enable, t.conf.id, key)
        return True

    def _switch_table(self, t, enable: bool) -> None:
        if t.disabled == (not enable):
            return
        self._quiet = True
        try:
            self.parent.hce.set_disabled(table=t.conf.id, disabled=not enable)
        finally:
            self._quiet = False
        self.parent.proc.state.set_table(t.conf.id, not enable)
        log.debug(f"{'enable' if enable else 'disable'}_table: table {t.conf.id}")

    async def redirect_set(self, key: int | str, enable: bool) -> bool:
        conf = self.parent.conf
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        rdr = next((r for r in conf.redirects
                    if (r.id == key if isinstance(key, int) else r.name == key)), None)
        if rdr is None:
            return False
        engine = self.parent.hce
        insts = [rdr.table.table] + ([rdr.backup.table] if enable and rdr.backup else [])
        if enable:
            self._rdr_disabled.discard(rdr.name)
        else:
            self._rdr_disabled.add(rdr.name)
        if engine is not None:
            for inst in insts:
                t = engine.find_table(inst.id) if inst is not None else None
                if t is not None:
                    self._switch_table(t, enable)
        pfe = getattr(self.parent, "pfe", None)   # pfe hook: add/remove the rules
        if pfe is not None:
            await pfe.redirect_set(rdr.id, enable)
        self._event("redirect", enable, rdr.id, key)
        return True

    # -- actions ---------------------------------------------------------------
    async def poll(self) -> None:
        if self.parent.hce is not None:
            self.parent.hce.poll()

    async def reload(self, path: str | None = None) -> bool:
        log.info(f"control: {'load ' + path if path else 'reload'} requested")
        sd.notify("RELOADING=1")
        try:
            ok = self.parent.reload(path) if path else self.parent.reload()
        finally:
            sd.notify("READY=1")
        self._rdr_disabled.clear()
        self.attach()
        return bool(ok)

    async def log_verbose(self, verbose: bool) -> None:
        level = 2 if verbose else 0
        log.set_verbose(level)
        self.hub.publish(verbose_event(level))


# -- 5. the backend of the pfe process ----------------------------------------

# Seconds the pfe process waits for the parent's answer to a command; a
# reload starts a new generation of relay processes and waits for them.
ASK_TIMEOUT = 10.0
RELOAD_TIMEOUT = 120.0


class MessageBackend(ControlBackend):
    """relayctl under privilege separation, in the pfe process.

    Everything is asked of the parent, which forwards to hce or to the
    relay processes and answers: `ask(cmd: dict, timeout) -> result or
    None` (None: no answer).  Commands (all JSON):

      {"cmd": "snapshot"}                    hce's snapshot() (tables, hosts)
      {"cmd": "stats"}                       {"workers": [RelayProc.status()...],
                                              "retired": {"relays": {name: n}, ...}}
      {"cmd": "sessions"}                    session rows of every relay process
      {"cmd": "host"|"table", "key", "enable"}  hce's switch, then the relays'
      {"cmd": "poll"} | {"cmd": "reload", "path"} | {"cmd": "log", "level"}
      {"cmd": "stop"}

    Host state changes come in as HOST_STATUS (host_status()); the last
    snapshot is kept for when hce does not answer (restarting).  `pfe` is
    the relayd.pfe.Pfe this process runs (redirect/router rows, redirect
    switches), or None."""

    def __init__(self, conf, ask, pfe=None) -> None:
        self.conf = conf
        self.ask = ask
        self.pfe = pfe
        self.hub = EventHub()
        self._rdr_disabled: set[str] = set()
        self.snapshot: list[dict] = []

    def configure(self, conf) -> None:
        """A reload: the new file decides what is disabled."""
        self.conf = conf
        self._rdr_disabled.clear()

    def host_status(self, host_id: int, state: str, name: str = "", quiet: bool = False) -> None:
        """A HOST_STATUS the parent forwarded: a monitor event."""
        if quiet or not self.hub.subscribers:
            return
        self.hub.publish(host_status_event(host_id, state, name))

    def subscribe(self):
        return self.hub.subscribe()

    # -- views -----------------------------------------------------------------
    async def tables(self) -> dict:
        snap = await self.ask({"cmd": "snapshot"}, ASK_TIMEOUT)
        if isinstance(snap, list):
            self.snapshot = snap
        return snapshot_tables(self.snapshot)

    async def relay_stats(self) -> dict:
        r = await self.ask({"cmd": "stats"}, ASK_TIMEOUT)
        return r if isinstance(r, dict) else {"workers": [], "retired": {}}

    async def _pfe_rows(self) -> dict:
        if self.pfe is None:
            return {}
        await self.pfe.refresh_stats()
        return pfe_row_map(self.pfe.snapshot())

    async def summary(self) -> list[dict]:
        tables = await self.tables()
        st = await self.relay_stats()
        workers = sorted(st.get("workers") or [], key=lambda w: (w.get("instance", 0),
                                                                 w.get("pid", 0)))
        retired = (st.get("retired") or {}).get("relays") or {}

        def stats(name: str) -> list[dict]:
            out = [w["relays"][name] for w in workers if name in w.get("relays", {})]
            if retired.get(name):
                iv = out[0].get("interval", 0) if out else 0
                out.append({"cnt": retired[name], "interval": iv})
            return out
        return summary_rows(self.conf, tables, self._rdr_disabled, stats,
                            await self._pfe_rows())

    async def sessions(self) -> list[dict]:
        rows = await self.ask({"cmd": "sessions"}, ASK_TIMEOUT)
        if not isinstance(rows, list):
            return []
        return sorted(rows, key=lambda r: (r.get("id", 0), r.get("proc", 0)))

    # -- switches --------------------------------------------------------------
    def _event(self, kind: str, enable: bool, id: int, key: int | str) -> None:
        self.hub.publish(ctl_event(kind, enable, id, key if isinstance(key, str) else ""))

    async def _switch(self, kind: str, key: int | str, enable: bool) -> dict | None:
        r = await self.ask({"cmd": kind, "key": key, "enable": enable}, ASK_TIMEOUT)
        if r is None:
            raise CommandFailed("no answer from the health check engine")
        if not r.get("found"):
            return None
        if r.get("error"):
            raise CommandFailed(r["error"])
        return r

    async def host_set(self, key: int | str, enable: bool) -> bool:
        r = await self._switch("host", key, enable)
        if r is None:
            return False
        self._event("host", enable, r["id"], key)
        return True

    async def table_set(self, key: int | str, enable: bool) -> bool:
        r = await self._switch("table", key, enable)
        if r is None:
            return False
        self._event("table", enable, r["id"], key)
        return True

    async def redirect_set(self, key: int | str, enable: bool) -> bool:
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        rdr = next((r for r in self.conf.redirects
                    if (r.id == key if isinstance(key, int) else r.name == key)), None)
        if rdr is None:
            return False
        insts = [rdr.table.table] + ([rdr.backup.table] if enable and rdr.backup else [])
        if enable:
            self._rdr_disabled.discard(rdr.name)
        else:
            self._rdr_disabled.add(rdr.name)
        for inst in insts:
            if inst is not None:
                await self.ask({"cmd": "table", "key": inst.id, "enable": enable},
                               ASK_TIMEOUT)
        if self.pfe is not None:   # pfe hook: add/remove the rules
            await self.pfe.redirect_set(rdr.id, enable)
        self._event("redirect", enable, rdr.id, key)
        return True

    # -- actions ---------------------------------------------------------------
    async def poll(self) -> None:
        await self.ask({"cmd": "poll"}, ASK_TIMEOUT)

    async def reload(self, path: str | None = None) -> bool:
        log.info(f"control: {'load ' + path if path else 'reload'} requested")
        ok = await self.ask({"cmd": "reload", "path": path}, RELOAD_TIMEOUT)
        return bool(ok)

    async def log_verbose(self, verbose: bool) -> None:
        level = 2 if verbose else 0
        await self.ask({"cmd": "log", "level": level}, ASK_TIMEOUT)
        log.set_verbose(level)
        self.hub.publish(verbose_event(level))

    async def stop(self) -> None:
        await self.ask({"cmd": "stop"}, ASK_TIMEOUT)
