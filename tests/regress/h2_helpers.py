"""A raw HTTP/2 client for the black-box tests of `listen ... http2`.

H2Client speaks HTTP/2 over a loopback socket (clear text with prior
knowledge, or TLS with ALPN h2) through python-hyper h2 in client mode,
with h2's outbound checks off so that tests can send malformed requests,
and send_raw() for frames built by hand (hyperframe).  Everything the
server answers is kept as h2 events; the helpers read until a stream ends,
is reset, or the server sends GOAWAY and closes.

Nothing here asserts: the tests do.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.connection import ConnectionInputs, ConnectionState


@dataclass
class H2Resp:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: int | None = None        # RST_STREAM error code, if reset
    ended: bool = False


def _lenient_client_table() -> dict:
    # A client of h2 4.4.1 cannot read responses after a GOAWAY
    # (python-hyper/h2 #1181); the tests must, to see the streams the
    # server still answers.
    table = dict(h2.connection.H2ConnectionStateMachine._transitions)
    table[(ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY)] = \
        (None, ConnectionState.CLIENT_OPEN)
    return table


_TABLE = _lenient_client_table()


class H2Client:
    def __init__(self, port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, timeout: float = 10.0,
                 settings: dict | None = None, preface: bool = True) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname)
        self.sock = sock
        self.alpn = sock.selected_alpn_protocol() if tls is not None else None
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="latin-1",
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False,
                                        validate_inbound_headers=False)
        self.h2 = h2.connection.H2Connection(cfg)
        self.h2.state_machine._transitions = _TABLE
        self.responses: dict[int, H2Resp] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.events: list = []
        self.eof = False
        if preface:
            self.h2.initiate_connection()
            if settings:
                self.h2.update_settings(settings)
            self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                self.eof = True

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.eof = True

    def request(self, path: str = "/", method: str = "GET", authority: str = "localhost",
                scheme: str | None = None, headers=(), body: bytes | None = None,
                end: bool = True) -> int:
        """Open a stream; returns its id.  `end`=False leaves it open."""
        sid = self.h2.get_next_available_stream_id()
        if scheme is None:
            scheme = "https" if self.alpn else "http"
        hdrs = [(":method", method), (":path", path), (":scheme", scheme)]
        if authority is not None:
            hdrs.append((":authority", authority))
        hdrs += list(headers)
        self.responses[sid] = H2Resp()
        self.h2.send_headers(sid, hdrs, end_stream=end and not body)
        self.flush()
        if body:
            self.send_body(sid, body, end)
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True, timeout: float = 10.0) -> None:
        """DATA frames as the server's windows allow."""
        deadline = time.monotonic() + timeout
        while body:
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if room <= 0:
                if time.monotonic() > deadline or not self.pump(1.0) and self.eof:
                    return
                continue
            part, body = body[:room], body[room:]
            self.h2.send_data(sid, part, end_stream=end and not body)
            self.flush()

    def pump(self, timeout: float = 5.0) -> bool:
        """Read once (up to `timeout`); False at end of input or timeout."""
        if self.eof:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        for e in self.h2.receive_data(data):
            self.events.append(e)
            r = self.responses.setdefault(getattr(e, "stream_id", 0) or 0, H2Resp())
            if isinstance(e, h2.events.ResponseReceived):
                r.headers = dict(e.headers)
                r.status = int(r.headers.get(":status", 0))
            elif isinstance(e, h2.events.DataReceived):
                r.body += e.data
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded):
                r.ended = True
            elif isinstance(e, h2.events.StreamReset):
                r.reset = e.error_code
            elif isinstance(e, h2.events.ConnectionTerminated):
                self.goaway = e
        self.flush()
        return True

    def ping(self, timeout: float = 10.0) -> bool:
        """PING and wait for the ACK: the server has read all sent before."""
        opaque = b"%08d" % (len(self.events) % 10**8)
        self.h2.ping(opaque)
        self.flush()
        return self.wait(lambda: any(isinstance(e, h2.events.PingAckReceived)
                                     and e.ping_data == opaque for e in self.events), timeout)

    def wait(self, cond, timeout: float = 10.0) -> bool:
        """Read until cond() is true, the server closes, or `timeout`."""
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(min(left, 1.0)) and self.eof:
                return cond()
        return True

    def response(self, sid: int, timeout: float = 10.0) -> H2Resp:
        r = self.responses[sid]
        self.wait(lambda: r.ended or r.reset is not None, timeout)
        return r

    def get(self, path: str = "/", **kw) -> H2Resp:
        return self.response(self.request(path, **kw))

    def closed(self, timeout: float = 10.0) -> bool:
        """Read until the server closes; True if it did within `timeout`."""
        self.wait(lambda: self.eof, timeout)
        return self.eof

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "H2Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tls_client_context(ca_pem: bytes | None = None, alpn=("h2", "http/1.1")) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_pem is not None:
        ctx.load_verify_locations(cadata=ca_pem.decode())
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    return ctx


SETTINGS = h2.settings.SettingCodes


# -- attack material shared by the httpd and relayd HTTP/2 tests -------------------------

# RST_STREAM and GOAWAY codes (RFC 9113 §7).
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 1, 3, 7, 8, 11


def goaway_code(c: H2Client, timeout: float = 15) -> int | None:
    """The error code of the server's GOAWAY (read until it comes)."""
    c.wait(lambda: c.goaway is not None, timeout)
    return c.goaway.error_code if c.goaway is not None else None


def make_you_reset(c: H2Client, sids) -> bool:
    """MadeYouReset: WINDOW_UPDATE overflows make the server reset these
    streams itself (a stream error); True once all are reset so."""
    from hyperframe.frame import WindowUpdateFrame
    for sid in sids:
        f = WindowUpdateFrame(sid)
        f.window_increment = 2**31 - 1
        c.send_raw(f.serialize())
    return c.wait(lambda: all(c.responses[s].reset == FLOW_CONTROL_ERROR for s in sids))


def max_requests_answers(c: H2Client, sids) -> tuple[list, list]:
    """Read the answers to `sids`: (statuses, reset codes)."""
    c.wait(lambda: all(c.responses[s].ended or c.responses[s].reset for s in sids))
    return [c.responses[s].status for s in sids], [c.responses[s].reset for s in sids]


def rapid_reset(c: H2Client, path: str, authority: str, n: int = 300) -> None:
    """Rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, n times, at once."""
    for _ in range(n):
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "http"),
                                (":authority", authority)], end_stream=True)
        c.h2.reset_stream(sid, CANCEL)
    c.flush()


def control_flood(kind: str, sid: int = 0, n: int = 3000) -> bytes:
    """n control frames of one kind (ping, settings, window-update on the
    connection, or empty DATA on stream `sid`: kind "empty-data")."""
    from hyperframe.frame import DataFrame, PingFrame, SettingsFrame, WindowUpdateFrame
    frames = []
    for i in range(n):
        if kind == "ping":
            f = PingFrame(0)
            f.opaque_data = i.to_bytes(8, "big")
        elif kind == "settings":
            f = SettingsFrame(0)
        elif kind == "window-update":
            f = WindowUpdateFrame(0)
            f.window_increment = 1
        else:
            f = DataFrame(sid)
        frames.append(f.serialize())
    return b"".join(frames)


def continuation_flood(n: int = 200) -> bytes:
    """HEADERS without END_HEADERS, then n CONTINUATION frames that never end it."""
    import hpack
    from hyperframe.frame import ContinuationFrame, HeadersFrame
    f = HeadersFrame(1)
    f.data = hpack.Encoder().encode([(":method", "GET")])
    data = [f.serialize()]
    for _ in range(n):
        cf = ContinuationFrame(1)
        cf.data = b"\x40\x01a\x01b"        # literal x: y, never ending
        data.append(cf.serialize())
    return b"".join(data)


# HPACK bomb: 4 KB once into the dynamic table, then referenced by index:
# about 4 KB on the wire, 400 KB decoded.
HPACK_BOMB = [("x-bomb", "a" * 4000)] * 100

# Malformed requests (RFC 9113 §8.2, §8.3): extra fields of a request ...
MALFORMED = {
    "connection-header": [("connection", "keep-alive")],
    "upper-case-name": [("X-Upper", "1")],
    "cr-in-value": [("x-v", "a\rb")],
    "lf-in-value": [("x-v", "a\nb")],
    "nul-in-value": [("x-v", "a\x00b")],
    "te-gzip": [("te", "gzip")],
    "transfer-encoding": [("transfer-encoding", "chunked")],
    "host-differs": [("host", "evil.example")],
}
# ... bodies that break their content-length ...
MALFORMED_BODIES = {"content-length-mismatch": b"12345", "content-length-short": b"x" * 20}


# ... and pseudo-header blocks (path: the request's; "h" the authority).
def malformed_pseudo(kind: str, path: str, authority: str) -> list:
    bad = {"no-path": [(":method", "GET"), (":scheme", "http")],
           "relative-path": [(":method", "GET"), (":path", path.lstrip("/")),
                             (":scheme", "http")],
           "unknown-pseudo": [(":method", "GET"), (":path", path), (":scheme", "http"),
                              (":foo", "x")],
           "double-method": [(":method", "GET"), (":method", "POST"), (":path", path),
                             (":scheme", "http")],
           "pseudo-after-regular": [(":method", "GET"), ("x-a", "1"), (":path", path),
                                    (":scheme", "http")],
           "scheme-https-on-clear": [(":method", "GET"), (":path", path),
                                     (":scheme", "https")],
           "space-in-path": [(":method", "GET"), (":path", path + " x"), (":scheme", "http")],
           "authority-userinfo": [(":method", "GET"), (":path", path), (":scheme", "http"),
                                  (":authority", "u@" + authority)],
           "bad-method": [(":method", "G T"), (":path", path), (":scheme", "http")],
           }[kind]
    if kind != "authority-userinfo":
        bad.append((":authority", authority))
    return bad


MALFORMED_PSEUDO = ["no-path", "relative-path", "unknown-pseudo", "double-method",
                    "pseudo-after-regular", "scheme-https-on-clear", "space-in-path",
                    "authority-userinfo", "bad-method"]
MALFORMED_KINDS = list(MALFORMED) + list(MALFORMED_BODIES) + MALFORMED_PSEUDO


def send_malformed(c: H2Client, kind: str, path: str, authority: str,
                   mark: list) -> tuple[int | None, int | None]:
    """Send the malformed request `kind` (one of MALFORMED_KINDS) with the
    fields `mark`; (RST code, GOAWAY code) once the server answered.
    Raises AssertionError if it got a response."""
    if kind in MALFORMED:
        sid = c.request(path, authority=authority, headers=mark + MALFORMED[kind])
    elif kind in MALFORMED_BODIES:
        sid = c.request(path, authority=authority, method="POST", body=MALFORMED_BODIES[kind],
                        headers=mark + [("content-length", "10")])
    else:
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, malformed_pseudo(kind, path, authority) + mark, end_stream=True)
        c.responses[sid] = H2Resp()
        c.flush()
    r = c.responses[sid]
    c.wait(lambda: r.reset is not None or c.goaway is not None or r.ended, 10)
    assert r.status == 0, f"{kind}: answered {r.status}"
    return r.reset, (c.goaway.error_code if c.goaway is not None else None)
