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
