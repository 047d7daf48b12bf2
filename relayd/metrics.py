"""metrics -- Prometheus exporter (our extension, off by default).

`metrics listen on ADDR port N` serves GET /metrics in the Prometheus text
format from a prometheus_client registry:

  relayd_host_state{table,host,id}             1 up, 0 unknown, -1 down
  relayd_host_up{table,host,id}                1 when up, else 0
  relayd_host_check_latency_seconds{...}       duration of the last check
  relayd_host_checks_total{...}                checks that found up or down
  relayd_host_checks_up_total{...}             of which up
  relayd_table_hosts_up{table}                 hosts up per table instance
  relayd_relay_sessions_total{relay}           sessions ended
  relayd_relay_session_errors_total{relay}     sessions that did not end `done`
  relayd_relay_sessions_active{relay}          sessions open now
  relayd_demote{group}                         demote counter of a carp group
                                               (tables demoting it now)

Host values are read from hce's snapshot and open sessions from the relay
state at scrape time, so checks and sessions pay nothing for them; the
relay counts each ended session with session_done().  The HTTP side is a tiny server on engine.serve and
engine.http1 (keep-alive, GET/HEAD only, 404 elsewhere).

Under privilege separation the exporter runs in the pfe process
(Metrics(remote=True)): before each scrape `refresh` asks the parent for
hce's snapshot and the relay processes' counters, and the session
counters are the sums over every relay process (plus what processes that
have exited counted), so they never go backwards across a reload.
"""

from __future__ import annotations

import socket

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine import listen, serve
from engine.conn import CLOSED, Transport
from engine.http1 import REASONS, HttpError, ServerConn, http_date
from shared import log

# Seconds a metrics client may stay idle between requests.
IDLE_TIMEOUT = 30.0

_STATE_VALUE = {"up": 1, "unknown": 0, "down": -1}


class _Collector:
    """A prometheus_client custom collector reading a Metrics at each
    scrape; describe() is empty, so registering it does not run collect()."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def describe(self):
        return []


class _HceCollector(_Collector):
    """Host and table gauges from an Hce snapshot, built per scrape."""

    def collect(self):
        hce = self.metrics.hce
        if hce is None:
            return
        labels = ["table", "host", "id"]
        state = GaugeMetricFamily("relayd_host_state",
                                  "Host state: 1 up, 0 unknown, -1 down", labels=labels)
        up = GaugeMetricFamily("relayd_host_up", "1 when the host is up", labels=labels)
        latency = GaugeMetricFamily("relayd_host_check_latency_seconds",
                                    "Duration of the host's last check", labels=labels)
        checks = CounterMetricFamily("relayd_host_checks",
                                     "Checks that found the host up or down", labels=labels)
        ups = CounterMetricFamily("relayd_host_checks_up",
                                  "Checks that found the host up", labels=labels)
        tables = GaugeMetricFamily("relayd_table_hosts_up", "Hosts up in the table",
                                   labels=["table"])
        for t in hce.snapshot():
            tables.add_metric([t["name"]], t["up"])
            for h in t["hosts"]:
                lv = [t["name"], h["name"], str(h["id"])]
                state.add_metric(lv, _STATE_VALUE[h["state"]])
                up.add_metric(lv, 1 if h["state"] == "up" else 0)
                if h["latency_ms"] >= 0:
                    latency.add_metric(lv, h["latency_ms"] / 1000)
                checks.add_metric(lv, h["check_cnt"])
                ups.add_metric(lv, h["up_cnt"])
        yield from (state, up, latency, checks, ups, tables)


class _RelayCollector(_Collector):
    """Open sessions per relay, read from a relay_session.RelayState per scrape."""

    def collect(self):
        state = self.metrics.relay_state
        if state is None:
            return
        g = GaugeMetricFamily("relayd_relay_sessions_active", "Relay sessions open now",
                              labels=["relay"])
        for name, n in sorted(getattr(state, "active", {}).items()):
            g.add_metric([name], n)
        yield g


class _TotalsCollector(_Collector):
    """Session counters summed over relay processes (remote mode)."""

    def collect(self):
        t = self.metrics.totals
        ended = CounterMetricFamily("relayd_relay_sessions", "Relay sessions ended",
                                    labels=["relay"])
        errors = CounterMetricFamily("relayd_relay_session_errors",
                                     "Relay sessions that did not end normally",
                                     labels=["relay"])
        for name, n in sorted(t.get("ended", {}).items()):
            ended.add_metric([name], n)
        for name, n in sorted(t.get("errors", {}).items()):
            errors.add_metric([name], n)
        yield ended
        yield errors


class _DemoteCollector(_Collector):
    """relayd's demote counter per carp group, from a carp.Demote (pfe's)."""

    def collect(self):
        demote = self.metrics.demote
        if demote is None:
            return
        g = GaugeMetricFamily("relayd_demote",
                              "Demote counter of the carp group: tables demoting it now",
                              labels=["group"])
        for group, n in demote.levels().items():
            g.add_metric([group], n)
        yield g


class Snapshot:
    """Stands for an Hce (snapshot()) and a RelayState (active) in the pfe
    process: the last values the parent sent."""

    def __init__(self) -> None:
        self.tables: list[dict] = []
        self.active: dict[str, int] = {}

    def snapshot(self) -> list[dict]:
        return self.tables


class Metrics:
    """The registry of one relayd process, with its relay counters.

    `remote`: the pfe process's exporter; `refresh` (async, set by the
    owner) updates `view` (hce snapshot, open sessions) and `totals`
    ({"ended": {relay: n}, "errors": {relay: n}}) before each scrape."""

    def __init__(self, remote: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.hce = None
        self.relay_state = None
        self.refresh = None
        self.demote = None          # a carp.Demote (levels()) once attached
        self.totals: dict[str, dict[str, int]] = {}
        if remote:
            self.view = Snapshot()
            self.hce = self.relay_state = self.view
            self.registry.register(_TotalsCollector(self))
        else:
            self.sessions = Counter("relayd_relay_sessions", "Relay sessions ended",
                                    ["relay"], registry=self.registry)
            self.errors = Counter("relayd_relay_session_errors",
                                  "Relay sessions that did not end normally",
                                  ["relay"], registry=self.registry)
        self.registry.register(_HceCollector(self))
        self.registry.register(_RelayCollector(self))
        self.registry.register(_DemoteCollector(self))

    def attach_demote(self, demote) -> None:
        """Export the demote counters of this carp.Demote."""
        self.demote = demote

    def attach_hce(self, hce) -> None:
        """Export the host states of this Hce (replaces any previous one)."""
        self.hce = hce

    def attach_relay(self, state) -> None:
        """Export the open sessions of this relay_session.RelayState."""
        self.relay_state = state

    def session_done(self, relay: str, error: bool = False) -> None:
        """Count a relay session that ended (`error`: not a normal end)."""
        self.sessions.labels(relay).inc()
        if error:
            self.errors.labels(relay).inc()

    def render(self) -> bytes:
        """The exposition text of everything registered."""
        return generate_latest(self.registry)


def _head(status: int, ctype: str, length: int, keep_alive: bool) -> bytes:
    return (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n"
            f"Date: {http_date()}\r\nServer: relayd\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()


async def handle(t: Transport, metrics: Metrics) -> None:
    """Serve /metrics requests on one connection."""
    conn = ServerConn(t)
    while True:
        req = None
        with trio.move_on_after(IDLE_TIMEOUT):
            try:
                req = await conn.next_request()
            except HttpError as e:
                body = f"{e.status} {REASONS.get(e.status, '')}\n".encode()
                await t.send_all(_head(e.status, "text/plain", len(body), False) + body)
                return
        if req is None:
            return
        keep = req.keep_alive
        path = req.target.split("?", 1)[0]
        if req.method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", b"405 Method Not Allowed\n"
        elif path != "/metrics":
            status, ctype, body = 404, "text/plain", b"404 Not Found\n"
        else:
            if metrics.refresh is not None:
                try:
                    await metrics.refresh()
                except Exception as e:     # stale values rather than no answer
                    log.warn_exc(f"metrics: refresh failed: {e!r}")
            status, ctype, body = 200, CONTENT_TYPE_LATEST, metrics.render()
        data = _head(status, ctype, len(body), keep)
        if req.method != "HEAD":
            data += body
        await t.send_all(data)
        if not keep:
            return


def bind(mconf, old: dict | None = None) -> dict[tuple[str, int], socket.socket]:
    """A listening socket per address of MetricsConfig `mconf` (None: no
    exporter), reusing `old` ones and sockets systemd passed; binding
    errors are logged and leave that address out."""
    from shared import sd
    old = old or {}
    out = {}
    if mconf is None:
        return out
    for addr in mconf.addrs:
        key = (addr, mconf.port)
        if key in old:
            out[key] = old[key]
            continue
        try:
            out[key] = sd.take(addr, mconf.port) or listen.bind_tcp(addr, mconf.port)
        except OSError as e:
            log.warn_errno(f"metrics: cannot listen on {addr} port {mconf.port}", e)
    return out


async def serve_metrics(mconf, metrics: Metrics,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every address of MetricsConfig `mconf` and serve until
    cancelled.  Binding errors are logged and leave the exporter off."""
    socks = bind(mconf)
    if not socks:
        task_status.started()
        return
    await serve_sockets(list(socks.values()), metrics, task_status=task_status)


def make_server(metrics: Metrics) -> serve.Server:
    """A metrics Server to hang listeners on (add_listener/remove_listener)."""
    async def handler(t: Transport, lis) -> None:
        try:
            await handle(t, metrics)
        except CLOSED:
            pass
    return serve.Server(handler, max_clients=64)


async def serve_sockets(socks: list, metrics: Metrics,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics on listening sockets bound elsewhere until cancelled."""
    listeners = [serve.Listener(s) for s in socks]

    server = make_server(metrics)
    try:
        await server.run(listeners, task_status=task_status)
    finally:
        for lis in listeners:
            lis.sock.close()
