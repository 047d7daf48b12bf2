"""engine.h2_private -- the places Tandem reaches into the HTTP/2 library.

h2 4.4.1 (pinned in pyproject.toml) is a sound HTTP/2 state machine with
three gaps a server cannot live with (../shared/spec/http2.md §2), and so
has jh2 5.0.15, its fork with a Rust HPACK codec, which is what runs by
default (LIBRARY below; README: 1.8x the requests per CPU second):

- close_connection() moves h2 to CLOSED, after which the streams in flight
  can no longer be answered (python-hyper/h2 issue #1181), and a GOAWAY
  from the client does the same.  So the server writes its GOAWAY frames
  itself with hyperframe (goaway()), and a connection gets a copy of the
  transition table in which (SERVER_OPEN, RECV_GOAWAY) stays SERVER_OPEN.
- More streams than the advertised SETTINGS_MAX_CONCURRENT_STREAMS are a
  connection error in h2 (TooManyStreamsError → GOAWAY); nginx refuses the
  stream instead, and so does engine.http2, which counts running handlers
  itself.  The enforced value is raised past anything reachable once the
  advertised SETTINGS frame is queued.
- The HPACK decoder's list limit and the connection's receive window are
  set at creation, not through a SETTINGS round trip.

Everything here checks what it touches; new_server() runs a self-test once
at import, so a different library version fails loudly at start rather than at the first
GOAWAY.  This module holds no policy and no I/O.
"""

from __future__ import annotations

import collections
import os

# The library: jh2 (python-hyper h2's fork with a Rust HPACK codec: 1.8x the
# requests per CPU second here, README) unless TANDEM_H2_LIB=h2 asks for
# python-hyper h2 itself.  Both are pinned in pyproject.toml and pass the
# self-test below and the same regress tests.
LIBRARY = "h2" if os.environ.get("TANDEM_H2_LIB") == "h2" else "jh2"
if LIBRARY == "jh2":
    import jh2 as h2
    import jh2.config
    import jh2.connection
    import jh2.events
    import jh2.exceptions
    import jh2.settings
    from jh2.connection import ConnectionInputs, ConnectionState
    from jh2.errors import ErrorCodes
    from jh2.hyperframe.frame import (ContinuationFrame, DataFrame, GoAwayFrame,
                                      HeadersFrame, PingFrame)
    from jh2.settings import SettingCodes
else:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
    import h2.settings
    from h2.connection import ConnectionInputs, ConnectionState
    from h2.errors import ErrorCodes
    from h2.settings import SettingCodes
    from hyperframe.frame import (ContinuationFrame, DataFrame, GoAwayFrame,
                                  HeadersFrame, PingFrame)

# What engine.http2 uses of h2, re-exported so that it imports h2 nowhere.
events = h2.events
exceptions = h2.exceptions
ErrorCodes = ErrorCodes
PROTOCOL_ERROR = ErrorCodes.PROTOCOL_ERROR
# The largest stream id (RFC 9113 §5.1.1): "every stream" in a GOAWAY.
MAX_STREAM_ID = 2**31 - 1
# h2 enforces this instead of the advertised limit (engine.http2 refuses).
_UNENFORCED = 2**31 - 1

_OPEN_TABLE = dict(h2.connection.H2ConnectionStateMachine._transitions)
_OPEN_TABLE[(ConnectionState.SERVER_OPEN, ConnectionInputs.RECV_GOAWAY)] = \
    (None, ConnectionState.SERVER_OPEN)

_CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None,
    # engine.http2 checks requests itself (RFC 9113 §8.2, one pass, a stream
    # error): h2 4.4.1 ends the connection, jh2 5.0.15 lets CR/LF/NUL by.
    validate_inbound_headers=False, normalize_inbound_headers=False,
    # Heads are built by engine.http2 (lower-case names, no connection
    # fields): h2's outbound checks cost a tenth of a response.
    validate_outbound_headers=False, normalize_outbound_headers=False,
    split_outbound_cookies=False)


def new_server(max_streams: int, max_header_list: int, stream_window: int,
               conn_window: int, max_frame: int = 16384) -> h2.connection.H2Connection:
    """A server connection with its preface (SETTINGS, WINDOW_UPDATE) queued."""
    c = h2.connection.H2Connection(config=_CONFIG)
    c.state_machine._transitions = _OPEN_TABLE
    c.local_settings = h2.settings.Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list,
        SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
        SettingCodes.MAX_FRAME_SIZE: max_frame,
        SettingCodes.ENABLE_PUSH: 0,
    })
    c.decoder.max_header_list_size = max_header_list
    c.max_inbound_frame_size = max_frame
    c._inbound_flow_control_window_manager.max_window_size = stream_window
    c._inbound_flow_control_window_manager.current_window_size = stream_window
    c.initiate_connection()
    if conn_window > 65535:
        c.increment_flow_control_window(conn_window - 65535)
    # Advertised above; engine.http2 refuses streams past it itself.
    c.local_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = \
        collections.deque([_UNENFORCED])
    return c


# Frames that carry a request (the rest is control: PING, SETTINGS, ...).
PAYLOAD_FRAMES = (DataFrame, HeadersFrame, ContinuationFrame)


def on_frame(c: h2.connection.H2Connection, fn) -> None:
    """Call fn(frame) for every frame received, before h2 handles it (h2
    emits no event for some: DATA on a closed stream, WINDOW_UPDATE of 0
    on the connection, unknown types; floods of them must still count)."""
    handle = c._receive_frame

    def receive_frame(frame):
        fn(frame)
        return handle(frame)
    c._receive_frame = receive_frame


def goaway(last_stream_id: int, code: int = 0, debug: bytes = b"") -> bytes:
    """A GOAWAY frame, made without h2 (which would close itself)."""
    f = GoAwayFrame(0)
    f.last_stream_id = last_stream_id
    f.error_code = int(code)
    f.additional_data = debug
    return f.serialize()


def ping(opaque: bytes) -> bytes:
    """A PING frame (8 bytes of opaque data), to time the two-step GOAWAY."""
    f = PingFrame(0)
    f.opaque_data = opaque
    return f.serialize()


def queue_raw(c: h2.connection.H2Connection, frame: bytes) -> None:
    """Append a frame made elsewhere to what h2 has to send."""
    c._data_to_send += frame


def pending(c: h2.connection.H2Connection) -> int:
    """Bytes h2 has queued and data_to_send() has not taken yet."""
    return len(c._data_to_send)


def _self_test() -> None:
    # The workarounds above rely on these private names and behaviours.
    c = new_server(2, 16384, 65535, 1 << 20)
    c.data_to_send()
    cl = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    cl.initiate_connection()
    hdrs = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]
    for sid in (1, 3, 5):
        cl.send_headers(sid, hdrs, end_stream=True)
    cl.close_connection()
    got = c.receive_data(cl.data_to_send())
    assert sum(isinstance(e, h2.events.RequestReceived) for e in got) == 3
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in got)
    c.send_headers(1, [(b":status", b"200")], end_stream=True)   # still open
    seen = []
    on_frame(c, seen.append)
    c.receive_data(PingFrame(0).serialize())
    assert seen and not isinstance(seen[0], PAYLOAD_FRAMES)
    queue_raw(c, goaway(5))
    assert pending(c) > 0
    assert c.local_settings.max_concurrent_streams == _UNENFORCED


_self_test()
