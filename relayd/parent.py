"""relayd.parent -- the privileged parent: config, sockets, children,
message hub, check scripts, signals, reload.

The parent parses and validates the whole configuration, creates the
control socket, binds one listening socket per relay listen address (with
the protocol's `tcp` options) and the metrics sockets -- or takes them
from systemd (socket activation, shared.sd) -- and starts its children by
re-executing relayd (shared.proc; the process table is in
relayd.privsep): `pfe` (nftables, routes, demotion, the control socket,
metrics; keeps CAP_NET_ADMIN only), `hce` (health checks) and `prefork`
`relay` processes (default: one per core), all three chrooted to
/var/empty as `_relayd` (else `nobody`).  As non-root nothing is dropped;
relayd says so once and runs.

The parent is the message hub: hce's host states go to the relays and to
pfe, relayctl's commands come from pfe and go to hce and the relays, their
answers go back through the parent, which never unpickles what a child
sends.  It runs `check script` programs on hce's behalf (only the paths
the configuration names) and writes the keepalived files pfe's demotions
ask for.

Reload (SIGHUP, `relayctl reload` / `load`): the file is parsed into a
*new* configuration; on failure every error is logged as `file:line:
message` and the old configuration keeps running.  On success sockets
whose address is unchanged are kept (never rebound) and new ones bound; a
new generation of relay processes starts on the new configuration with
the current host states (carried over by table and host name, as hce
does); once all of it is ready the old generation stops accepting (and
closes its listening descriptors), hce and pfe switch to the new
configuration, `parent_reload: configuration reloaded` is logged, and the
old relays finish their sessions (RELOAD_DRAIN) and exit: no connection is
refused or reset by a reload, and `prefork` changes take effect.
SIGTERM/SIGINT: relays drain (STOP_DRAIN), `parent terminating, pid N`,
exit 0.  SIGUSR1 is ignored, as in OpenBSD.  A child that dies unexpectedly
is logged (`lost child: ...`) and restarted.  systemd Type=notify: READY,
RELOADING, STOPPING.

Does not relay, check or filter anything itself.
"""

from __future__ import annotations

import os
import signal
import socket

import trio

from engine.listen import bind_tcp, listen, set_options, set_transparent
from relayd import ca, carp, check_script, control, hce, metrics, parse, privsep, protodebug
from relayd import relay_tls   # tls hook
from relayd import relay_udp   # dns hook
from relayd.config import RELAYD_SOCKET, RelaydConfig
from relayd.relay import SockKey, listen_sockets
from relayd.relay_shm import ParentSlots
from shared import log, proc, sd
from shared.imsg import Imsg, ImsgError
from shared.lexer import ConfigError

# Seconds sessions get to finish on SIGTERM/SIGINT.
STOP_DRAIN = 5.0
# Seconds an old generation of relays gets to finish its sessions after a
# reload (then the rest is cut).
RELOAD_DRAIN = 600.0
# Seconds a new generation of relays gets to become ready.
READY_TIMEOUT = 30.0
# Seconds hce / a relay gets to answer a forwarded command.
ANSWER_TIMEOUT = 5.0
# Longest a check script may run, whatever hce asks.
SCRIPT_MAX = 3600.0
# The unprivileged users, in order of preference, and the children's chroot.
RELAYD_USERS = ("_relayd", "nobody")
RELAYD_CHROOT = "/var/empty"

HOST_STATES = ("up", "down", "unknown")

notify = sd.notify   # kept for callers of relayd.parent.notify


def bind_all(conf: RelaydConfig, old: dict[SockKey, socket.socket] | None = None
             ) -> dict[SockKey, socket.socket]:
    """A listening socket per relay (addr, port) of `conf`, reusing `old`
    ones (their options are updated) and sockets systemd passed; raises
    OSError."""
    old = old or {}
    out: dict[SockKey, socket.socket] = {}
    key = None
    try:
        for key, ctx in listen_sockets(conf).items():
            tcp = ctx.proto.tcp
            # `forward to destination`: a TPROXY rule hands this socket
            # connections to other addresses (OpenBSD: divert-to).
            tproxy = any(f.kind == "destination" for f in ctx.relay.forwards)
            sock = old.get(key) or sd.take(key[0], key[1])
            if sock is not None:
                out[key] = sock
                try:
                    set_options(sock, sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                                ttl=tcp.ip_ttl, minttl=tcp.ip_minttl)
                    if tproxy:
                        set_transparent(sock)
                    listen(sock, tcp.backlog, inherited=sd.was_inherited(sock))
                except OSError:
                    pass
                continue
            out[key] = bind_tcp(key[0], key[1], backlog=tcp.backlog,
                                sndbuf=tcp.socket_buffer, rcvbuf=tcp.socket_buffer,
                                ttl=tcp.ip_ttl, minttl=tcp.ip_minttl, transparent=tproxy)
        for key, (_, _, proto) in relay_udp.udp_listens(conf).items():   # dns hook
            out[key] = old.get(key) or relay_udp.bind_udp(key[1], key[2], proto)
    except OSError as e:
        for k, s in out.items():
            if k not in old:
                s.close()
        e.relay_key = key   # type: ignore[attr-defined]
        raise
    return out


def _bind_error(e: OSError) -> str:
    key = getattr(e, "relay_key", None)
    where = f" {key[-2]}:{key[-1]}" if key else ""   # dns hook: ("udp", addr, port) keys
    return f"relay_privinit: failed to bind{where}: {e.strerror or e}"


def script_paths(conf: RelaydConfig) -> set[str]:
    return {i.check.path for i in conf.instances if i.check.type == "script" and i.check.path}


def host_names(conf: RelaydConfig) -> set[str]:
    return {h.name for h in conf.hosts()}


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"integer expected: {v!r}")
    return v


def _dict(v) -> dict:
    if not isinstance(v, dict):
        raise ValueError("object expected")
    return v


class Parent:
    def __init__(self, conf: RelaydConfig, path: str, macros: dict[str, str],
                 verbose: int, debug: bool = True, cwd: str | None = None) -> None:
        self.conf = conf
        self.cwd = cwd or os.getcwd()   # relative TLS file names, start and reload
        self.path = path
        self.macros = macros
        self.verbose = verbose
        self.debug = debug
        self.root = os.geteuid() == 0
        self.user = proc.find_user(RELAYD_USERS) if self.root else None
        self.chroot = RELAYD_CHROOT if self.root else None
        self.sockets: dict[SockKey, socket.socket] = {}
        self.metric_socks: dict[SockKey, socket.socket] = {}
        self.control_sock: socket.socket | None = None
        self.sup: proc.Supervisor | None = None
        self.slots: ParentSlots | None = None
        self.pending = proc.Pending()
        # Configuration generation: the relays of generation g run the
        # configuration hce and pfe were given with g.
        self.generation = 1
        self.states: dict[int, dict[int, str]] = {1: {}}      # gen -> host id -> state
        self.switched: dict[int, dict] = {1: self._no_switches()}  # gen -> relayctl switches
        self.rr_base: dict[int, int] = {}
        self.worker_slot: dict[int, int] = {}                  # relay pid -> shm worker slot
        self.retired: dict[str, dict[str, int]] = {"relays": {}, "ended": {}, "errors": {}}
        self.scripts = script_paths(conf)
        self.hosts = host_names(conf)
        self.hce_ports: set[int] = set()     # check ports the running hce may connect to
        self.demoted: dict[str, int] = {}
        self._reload_lock = trio.Lock()
        self._hup_queued = False
        self._stopping = False
        self.tls: dict[int, relay_tls.Material] = {}   # tls hook: gen -> certificates, keys

    @staticmethod
    def _no_switches() -> dict:
        return {"hosts": set(), "tables": {}}

    def child_args(self) -> list[str]:
        return (["-d"] if self.debug else []) + (["-v"] * self.verbose)

    def nrelays(self, conf: RelaydConfig) -> int:
        return conf.prefork or os.cpu_count() or 1

    def _user(self) -> str | None:
        return self.user.pw_name if self.user else None

    # -- the control socket ----------------------------------------------------
    def _control_open(self) -> bool:
        """Create the socket; False (do not start) when a configured `socket`
        cannot be had.  The default path only warns: several daemons (tests,
        non-root runs) may share it, the first one wins."""
        try:
            self.control_sock = control.open_socket(self.conf.socket)
        except control.ControlError as e:
            if self.conf.socket == RELAYD_SOCKET:
                log.warn(f"{e}; running without a control socket")
                return True
            log.warn(str(e))
            log.warn("control socket setup failed")
            return False
        return True

    # -- children's set-up -----------------------------------------------------
    def _pfe_setup(self):
        async def setup(child: proc.Child) -> None:
            c = child.chan
            await c.send(Imsg.CFG_CONFIG, {
                "conf": self.conf, "gen": self.generation, "user": self._user(),
                "chroot": self.chroot, "states": dict(self.states.get(self.generation, {}))})
            if self.control_sock is not None:
                await c.send(Imsg.CFG_CONTROL, None, fd=self.control_sock.fileno())
            for key, s in self.metric_socks.items():
                await c.send(Imsg.CFG_METRICS, {"key": list(key)}, fd=s.fileno())
            await c.send(Imsg.CFG_DONE)
        return setup

    def _hce_setup(self):
        """hce: the current configuration and, for a new hce after a reload
        or a crash, the host states and switches known so far."""
        async def setup(child: proc.Child) -> None:
            gen = self.generation
            sw = self.switched.get(gen) or self._no_switches()
            # What its Landlock domain will allow, for good (see _reload).
            self.hce_ports = set(hce.check_ports(self.conf))
            await child.chan.send(Imsg.CFG_CONFIG, {
                "conf": self.conf, "gen": gen, "user": self._user(),
                "chroot": self.chroot, "states": dict(self.states.get(gen, {})),
                "disabled_hosts": sorted(sw["hosts"]), "tables": dict(sw["tables"])})
            await child.chan.send(Imsg.CFG_DONE)
        return setup

    def _ca_setup(self):
        """ca: every generation's keys, and (when it is restarted) a new
        socket to each relay."""
        async def setup(child: proc.Child) -> None:
            c = child.chan
            await c.send(Imsg.CFG_CONFIG, {"user": self._user(), "chroot": self.chroot})
            for gen, mat in sorted(self.tls.items()):
                await self._send_keys(child, gen, mat)
            for r in self._relays():
                mine, theirs = ca.socketpair()
                try:
                    await c.send(Imsg.CFG_CA_SOCK, {"gen": r.generation}, fd=mine.fileno())
                    await self.sup.send(r, Imsg.CFG_CA_SOCK, {}, fd=theirs.fileno())
                finally:
                    mine.close()
                    theirs.close()
            await c.send(Imsg.CFG_DONE)
        return setup

    @staticmethod
    async def _send_keys(child: proc.Child, gen: int, mat: relay_tls.Material) -> None:
        # Private keys go by memfd, never in a message a buffer keeps.
        for kid, key in mat.keys.items():
            fd = relay_tls.tls.key_to_fd(key)
            try:
                await child.chan.send(Imsg.CFG_TLS_KEY, {"id": kid, "gen": gen}, fd=fd)
            finally:
                os.close(fd)

    async def _to_ca(self, mtype: int, payload: dict, fd: int = -1) -> None:
        c = self._one("ca")
        if c is not None:
            await self.sup.send(c, mtype, payload, fd=fd)

    def _relay_setup(self, conf: RelaydConfig, sockets: dict[SockKey, socket.socket],
                     gen: int):
        rr_base = self.rr_base.setdefault(gen, self.slots.rr_block(conf))
        mat = self.tls.get(gen)      # tls hook

        async def setup(child: proc.Child) -> None:
            w = self.slots.worker()
            self.worker_slot[child.pid] = w
            sw = self.switched.get(gen) or self._no_switches()
            c = child.chan
            await c.send(Imsg.CFG_CONFIG, {
                "conf": conf, "gen": gen, "instance": child.instance, "user": self._user(),
                "chroot": self.chroot, "states": dict(self.states.get(gen, {})),
                "disabled_hosts": sorted(sw["hosts"]), "tables": dict(sw["tables"]),
                "shm": self.slots.setup(conf, w, rr_base),
                "tls": mat.payload() if mat else None})     # tls hook
            for key, sock in sockets.items():
                await c.send(Imsg.CFG_SOCKET, {"key": list(key)}, fd=sock.fileno())
            # tls hook: no keys, a socket to ca (which has them).
            mine, theirs = ca.socketpair()
            try:
                await self._to_ca(Imsg.CFG_CA_SOCK, {"gen": gen}, fd=mine.fileno())
                await c.send(Imsg.CFG_CA_SOCK, {}, fd=theirs.fileno())
            finally:
                mine.close()
                theirs.close()
            await c.send(Imsg.CFG_SHM, None, fd=self.slots.fd)
            await c.send(Imsg.CFG_DONE)
        return setup

    async def start_relays(self, conf: RelaydConfig, sockets, gen: int) -> list[proc.Child]:
        setup = self._relay_setup(conf, sockets, gen)
        return [await self.sup.start("relay", i, gen, setup) for i in range(self.nrelays(conf))]

    def _relays(self, gen: int | None = None) -> list[proc.Child]:
        """Relay processes alive (draining ones too), of generation `gen`."""
        return [c for c in self.sup.children if c.title == "relay"
                and (gen is None or c.generation == gen)]

    def _one(self, title: str) -> proc.Child | None:
        kids = self.sup.of(title)
        return kids[0] if kids else None

    def _on_exit(self, child: proc.Child, code) -> None:
        if child.title == "relay":
            self.slots.release(self.worker_slot.pop(child.pid, -1))
        self.pending.fail_peer(child.pid)

    # -- main ------------------------------------------------------------------
    async def run(self) -> int:
        # Signals are caught before the sockets are bound: a client may
        # connect, and send SIGHUP, as soon as a port accepts.
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR1,
                                       signal.SIGTERM, signal.SIGINT) as sigs:
            if not self._control_open():
                return 1
            mat, errors = relay_tls.read(self.conf, self.cwd)   # tls hook: keys read before the drop
            if errors:
                for line in errors:
                    log.warn(line)
                if self.control_sock is not None:
                    control.close_socket(self.control_sock)
                return 1
            self.tls[self.generation] = mat
            try:
                self.sockets = bind_all(self.conf)
            except OSError as e:
                log.warn(_bind_error(e))
                if self.control_sock is not None:
                    control.close_socket(self.control_sock)
                return 1
            _dump(self.conf)
            self.metric_socks = metrics.bind(self.conf.metrics)
            if self.root:
                proc.make_empty_dir(RELAYD_CHROOT)
                if self.user is None:
                    log.warn(f"no user {' or '.join(RELAYD_USERS)}: "
                             "children are chrooted but stay root")
            else:
                proc.warn_not_sandboxed("relayd")
            self.slots = ParentSlots()
            try:
                async with trio.open_nursery() as nursery:
                    self.sup = proc.Supervisor("relayd", self.child_args(), nursery,
                                               on_message=self._on_message,
                                               on_exit=self._on_exit)
                    nursery.start_soon(self._start)
                    await self._signals(sigs, nursery)
                    nursery.cancel_scope.cancel()
            finally:
                for s in [*self.sockets.values(), *self.metric_socks.values()]:
                    s.close()
                if self.control_sock is not None:
                    control.close_socket(self.control_sock)
                self._undemote()
        return 0

    async def _start(self) -> None:
        """Start the children; signals are handled meanwhile."""
        async with self._reload_lock:
            if self._stopping:
                return
            await self.sup.start("pfe", 0, 0, self._pfe_setup())
            await self.sup.start("hce", 0, 0, self._hce_setup())
            await self.sup.start("ca", 0, 0, self._ca_setup())
            await self.start_relays(self.conf, self.sockets, self.generation)
            if not await self._wait_ready(self.generation, self.nrelays(self.conf),
                                          READY_TIMEOUT, ("pfe", "hce", "ca")):
                log.warn("parent: children did not start")
            if self._stopping:
                return
            # Sockets were bound before; now the relays accept too.
            log.info("startup")
            notify("READY=1")

    async def _wait_ready(self, gen: int, nrelays: int, timeout: float,
                          titles: tuple[str, ...] = ()) -> bool:
        """Wait until `nrelays` relays of generation `gen` (and one of each
        of `titles`) are ready, counting children restarted meanwhile."""
        with trio.move_on_after(timeout):
            while not self._stopping:
                relays = self.sup.of("relay", gen)
                if (len(relays) >= nrelays and all(c.ready.is_set() for c in relays)
                        and all(any(c.ready.is_set() for c in self.sup.of(t)) for t in titles)):
                    return True
                await trio.sleep(0.02)
        return False

    async def _signals(self, sigs, nursery: trio.Nursery) -> None:
        async for sig in sigs:
            if sig == signal.SIGHUP:
                log.info("parent_sig_handler: reload requested with SIGHUP")
                if not self._hup_queued:
                    self._hup_queued = True
                    nursery.start_soon(self._hup)
            elif sig == signal.SIGUSR1:
                pass
            else:
                await self.shutdown()
                return

    async def _hup(self) -> None:
        async with self._reload_lock:
            self._hup_queued = False     # a SIGHUP from now on reads the file again
            if self._stopping:
                return
            await self.reload()

    async def shutdown(self) -> None:
        self._stopping = True
        log.info(f"parent terminating, pid {os.getpid()}")
        notify("STOPPING=1")
        self.sup.stopping = True
        # All at once: relays drain their sessions; pfe removes its rules,
        # routes and demotions on the way out.
        async with trio.open_nursery() as n:
            n.start_soon(self.sup.stop, self._relays(), STOP_DRAIN)
            n.start_soon(self.sup.stop, [c for c in self.sup.children
                                         if c.title not in ("relay", "ca")], 8.0)
        # ca last: draining relays may still need it.
        await self.sup.stop([c for c in self.sup.children if c.title == "ca"], 1.0)
        await self.sup.stop(list(self.sup.children), 1.0)     # started meanwhile

    # -- reload ----------------------------------------------------------------
    async def reload(self, path: str | None = None) -> bool:
        """Load the file again (`relayctl load`: `path`, this once); switch
        to it only if it is valid and its relays start."""
        notify("RELOADING=1")
        try:
            return await self._reload(path)
        finally:
            notify("READY=1")

    async def _reload(self, path: str | None) -> bool:
        try:
            new = parse.load(path or self.path, self.macros, self.verbose)
        except ConfigError as e:
            for line in e.lines:
                log.warn(line)
            log.warn("parent_reload: configuration failed, keeping the current one")
            return False
        for line in new.warnings:
            log.warn(line)
        if new.unimplemented:
            for where, what in new.unimplemented:
                log.warn(f"{where}: {what} is not implemented yet")
            log.warn("parent_reload: configuration failed, keeping the current one")
            return False
        mat, errors = relay_tls.read(new, self.cwd)     # tls hook: renewed certificates too
        if errors:
            for line in errors:
                log.warn(line)
            log.warn("parent_reload: configuration failed, keeping the current one")
            return False
        try:
            sockets = bind_all(new, self.sockets)
        except OSError as e:
            log.warn(_bind_error(e) + "; keeping the current configuration")
            return False
        metric_socks = metrics.bind(new.metrics, self.metric_socks)
        _dump(new)
        old_gen, gen = self.generation, self.generation + 1
        self.states[gen] = hce.carry_states(self.conf, new, self.states.get(old_gen, {}))
        self.switched[gen] = self._no_switches()
        old_relays = self._relays(old_gen)
        self.tls[gen] = mat      # tls hook: the new keys to ca (only)
        ca_child = self._one("ca")
        if ca_child is not None:
            await self._send_keys(ca_child, gen, mat)
        await self.start_relays(new, sockets, gen)
        if not await self._wait_ready(gen, self.nrelays(new), READY_TIMEOUT):
            log.warn("parent_reload: new relays did not start, keeping the current configuration")
            await self.sup.stop(self._relays(gen), 0)
            self._forget_gen(gen)
            for key, s in sockets.items():
                if self.sockets.get(key) is not s:
                    s.close()
            for key, s in metric_socks.items():
                if self.metric_socks.get(key) is not s:
                    s.close()
            return False
        # The old generation stops accepting before anything says "reloaded".
        await self.sup.quiesce(old_relays)
        old_conf, old_sockets, old_metric = self.conf, self.sockets, self.metric_socks
        self.conf, self.sockets, self.metric_socks = new, sockets, metric_socks
        self.generation = gen
        self.scripts = script_paths(old_conf) | script_paths(new)
        self.hosts = host_names(old_conf) | host_names(new)
        for key, s in old_sockets.items():
            if sockets.get(key) is not s:
                s.close()
        # pfe first: hce's reports on the new ids must find it reloaded.
        pfe = self._one("pfe")
        if pfe is not None:
            await self.sup.send(pfe, Imsg.CFG_RELOAD, {
                "conf": new, "gen": gen, "metrics": [list(k) for k in metric_socks]})
            for key, s in metric_socks.items():
                if old_metric.get(key) is not s:
                    await self.sup.send(pfe, Imsg.CFG_METRICS, {"key": list(key)},
                                        fd=s.fileno())
        for key, s in old_metric.items():
            if metric_socks.get(key) is not s:
                s.close()
        hce_child = self._one("hce")
        if hce_child is not None and not set(hce.check_ports(new)) <= self.hce_ports:
            # hce may connect only to the check ports it started with
            # (Landlock cannot widen a domain): a new hce, seeded with the
            # states carried to this generation.
            log.info("parent_reload: new check ports, restarting hce")
            await self.sup.stop([hce_child], 1.0)
            # What the old hce reported since the carry at the top.
            self.states[gen].update(hce.carry_states(old_conf, new, self.states.get(old_gen, {})))
            await self.sup.start("hce", 0, 0, self._hce_setup())
        elif hce_child is not None:
            await self.sup.send(hce_child, Imsg.CFG_RELOAD, {"conf": new, "gen": gen})
        log.info("parent_reload: configuration reloaded")

        async def retire() -> None:
            await self.sup.stop(old_relays, RELOAD_DRAIN)
            if self.generation != old_gen:
                self._forget_gen(old_gen)
        self.sup.nursery.start_soon(retire)
        return True

    def _forget_gen(self, gen: int) -> None:
        self.states.pop(gen, None)
        self.switched.pop(gen, None)
        self.rr_base.pop(gen, None)
        if self.tls.pop(gen, None) is not None:      # tls hook: ca drops its keys
            self.sup.nursery.start_soon(self._to_ca, Imsg.CA_FORGET, {"gen": gen})

    # -- messages --------------------------------------------------------------
    async def _on_message(self, child: proc.Child, msg) -> None:
        """Everything a child sends but CTL_READY.  Raising ImsgError (or
        KeyError/TypeError/ValueError on a malformed payload) kills it."""
        t, p = msg.type, msg.payload
        if t == Imsg.CTL_REPLY:
            self.pending.answer(p, child.pid)
        elif child.title == "hce" and t == Imsg.HOST_STATUS:
            await self._host_status(p)
        elif child.title == "hce" and t == Imsg.SCRIPT_RUN:
            self._script(child, p)
        elif child.title == "relay" and t == Imsg.RELAY_STATS:
            self._retire_stats(p)
        elif child.title == "pfe" and t == Imsg.CTL_COMMAND:
            cmd = self._command_check(p)
            self.sup.nursery.start_soon(self._command, child, cmd)
        elif child.title == "pfe" and t == Imsg.DEMOTE:
            group, level = privsep.valid_demote(_dict(p))
            self._demote(group, level)
        else:
            raise ImsgError(f"unexpected message type {t} from {child.title}")

    async def _host_status(self, p) -> None:
        p = _dict(p)
        gen, hid, state = _int(p["gen"]), _int(p["id"]), p["state"]
        if state not in HOST_STATES:
            raise ValueError(f"bad host state {state!r}")
        fwd = {"gen": gen, "id": hid, "state": state, "name": str(p.get("name", "")),
               "quiet": bool(p.get("quiet"))}
        if gen in self.states:
            self.states[gen][hid] = state
        for c in self._relays(gen):
            await self.sup.send(c, Imsg.HOST_STATUS, {"id": hid, "state": state})
        pfe = self._one("pfe")
        if pfe is not None:
            await self.sup.send(pfe, Imsg.HOST_STATUS, fwd)

    def _script(self, child: proc.Child, p) -> None:
        p = _dict(p)
        seq, path, host = _int(p["seq"]), p["path"], p["host"]
        timeout = float(p["timeout"])
        if path not in self.scripts or host not in self.hosts:
            raise ValueError(f"script {path!r} for {host!r} is not in the configuration")

        async def run() -> None:
            deadline = trio.current_time() + max(0.0, min(timeout, SCRIPT_MAX))
            status = await check_script.run(path, host, deadline)
            await self.sup.send(child, Imsg.SCRIPT_RESULT, {"seq": seq, "result": status})
        self.sup.nursery.start_soon(run)

    def _retire_stats(self, p) -> None:
        """A relay process's counters when it exits: kept in the totals."""
        p = _dict(p)
        for name, st in _dict(p.get("relays", {})).items():
            n = _int(_dict(st).get("cnt", 0))
            self.retired["relays"][str(name)] = self.retired["relays"].get(str(name), 0) + n
        for what in ("ended", "errors"):
            for name, n in _dict(p.get(what, {})).items():
                self.retired[what][str(name)] = self.retired[what].get(str(name), 0) + _int(n)

    def _demote(self, group: str, level: int) -> None:
        err = carp.Demote()._write(group, level)
        if err:
            log.warn(err)
        else:
            self.demoted[group] = level

    def _undemote(self) -> None:
        """Whatever pfe could not undo (it died): back to 0."""
        for group, level in list(self.demoted.items()):
            if level:
                self._demote(group, 0)

    # -- relayctl (commands from pfe) -------------------------------------------
    @staticmethod
    def _command_check(p) -> dict:
        p = _dict(p)
        _int(p["seq"])
        cmd = p["cmd"]
        if cmd in ("host", "table"):
            if isinstance(p["key"], bool) or not isinstance(p["key"], (int, str)):
                raise ValueError("bad key")
            p["enable"] = bool(p["enable"])
        elif cmd == "reload":
            if p.get("path") is not None and not isinstance(p["path"], str):
                raise ValueError("bad path")
        elif cmd == "log":
            _int(p["level"])
        elif cmd not in ("snapshot", "stats", "sessions", "poll", "stop"):
            raise ValueError(f"unknown command {cmd!r}")
        return p

    async def _command(self, pfe: proc.Child, p: dict) -> None:
        try:
            result = await self._do(p)
        except Exception as e:       # a bug here must not take the parent down
            log.warn_exc(f"parent: command {p['cmd']}: {e!r}")
            result = None
        await self.sup.send(pfe, Imsg.CTL_REPLY, {"seq": p["seq"], "result": result})

    async def _ask(self, child: proc.Child, mtype: int, payload: dict,
                   timeout: float = ANSWER_TIMEOUT):
        seq, wait = self.pending.new(child.pid)
        if not await self.sup.send(child, mtype, {**payload, "seq": seq}):
            self.pending.cancel(seq)
            return None
        return await wait(timeout)

    async def _ask_all(self, children: list[proc.Child], payload: dict) -> list:
        results: list = [None] * len(children)

        async def one(i: int, c: proc.Child) -> None:
            results[i] = await self._ask(c, Imsg.CTL_COMMAND, payload)
        async with trio.open_nursery() as n:
            for i, c in enumerate(children):
                n.start_soon(one, i, c)
        return [r for r in results if r is not None]

    async def _ask_hce(self, payload: dict):
        c = self._one("hce")
        return await self._ask(c, Imsg.HCE_COMMAND, payload) if c is not None else None

    async def _do(self, p: dict):
        cmd = p["cmd"]
        if cmd == "snapshot":
            r = await self._ask_hce({"cmd": "snapshot"})
            return r if isinstance(r, list) else None
        if cmd == "stats":
            workers = [w for w in await self._ask_all(self._relays(), {"cmd": "stats"})
                       if isinstance(w, dict)]
            return {"workers": workers, "retired": self.retired}
        if cmd == "sessions":
            rows: list = []
            for r in await self._ask_all(self._relays(), {"cmd": "sessions"}):
                if isinstance(r, list):
                    rows.extend(x for x in r if isinstance(x, dict))
            return rows
        if cmd in ("host", "table"):
            return await self._switch(cmd, p["key"], p["enable"])
        if cmd == "poll":
            return await self._ask_hce({"cmd": "poll"})
        if cmd == "reload":
            log.info("parent: reload requested by relayctl")
            async with self._reload_lock:
                if self._stopping:
                    return False
                return await self.reload(p.get("path"))
        if cmd == "log":
            level = p["level"]
            log.set_verbose(level)
            await self.sup.broadcast(Imsg.CTL_VERBOSE, {"verbose": level})
            return True
        if cmd == "stop":
            os.kill(os.getpid(), signal.SIGTERM)
            return True
        return None

    async def _switch(self, kind: str, key, enable: bool):
        """host|table enable|disable: hce first (it finds the target and
        knows `parent` hosts), then every relay process, then the answer."""
        gen = self.generation
        r = await self._ask_hce({"cmd": kind, "key": key, "enable": enable})
        if not isinstance(r, dict):
            return None
        if not r.get("found") or r.get("error") or not r.get("changed"):
            return r
        sw = self.switched.setdefault(gen, self._no_switches())
        if kind == "host":
            ids = [_int(i) for i in r.get("ids", [])]
            (sw["hosts"].difference_update if enable else sw["hosts"].update)(ids)
            cmd = {"cmd": "host", "ids": ids, "disabled": not enable}
        else:
            tid = _int(r["id"])
            sw["tables"][tid] = not enable
            cmd = {"cmd": "table", "id": tid, "disabled": not enable}
        await self._ask_all(self._relays(gen), cmd)
        return r


def _dump(conf: RelaydConfig) -> None:
    # -vv: what OpenBSD's parent prints as config_setrelay() binds each relay
    if log.get_verbose() > 1:
        for line in protodebug.lines(conf):
            log.debug(line)


def run(conf: RelaydConfig, path: str, macros: dict[str, str], verbose: int,
        debug: bool = True, cwd: str | None = None) -> int:
    return proc.run_parent(Parent(conf, path, macros, verbose, debug, cwd))
