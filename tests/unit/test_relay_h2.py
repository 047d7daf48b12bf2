"""relayd.relay_h2's pure parts: the HTTP/1 view of a stream's head, the
limits taken from `http { }`, and what a TLS listener offers in ALPN."""

from __future__ import annotations

from types import SimpleNamespace

from engine.http1 import Request
from relayd import relay_h2, relay_tls
from relayd.config import HttpOptions, ProtocolConfig


def _req(headers, host=None) -> Request:
    r = Request()
    r.version = "2.0"
    r.headers = list(headers)
    r.hmap = {}
    for k, v in headers:
        r.hmap[k] = v if k not in r.hmap else r.hmap[k] + ("; " if k == "cookie" else ", ") + v
    if host is not None:
        r.hmap.setdefault("host", host)
    return r


def test_h1_view_host_first_cookies_joined() -> None:
    r = _req([("accept", "*/*"), ("cookie", "a=1"), ("x-a", "1"), ("cookie", "b=2")],
             host="example.com")
    relay_h2._h1_view(r)
    assert r.headers == [("host", "example.com"), ("accept", "*/*"), ("cookie", "a=1; b=2"),
                         ("x-a", "1")]


def test_h1_view_client_host_kept_once() -> None:
    r = _req([("host", "example.com"), ("accept", "*/*")])
    relay_h2._h1_view(r)
    assert r.headers == [("host", "example.com"), ("accept", "*/*")]


def test_h1_view_without_host() -> None:
    r = _req([("accept", "*/*")])
    relay_h2._h1_view(r)
    assert r.headers == [("accept", "*/*")]


def test_limits_from_http_options() -> None:
    proto = SimpleNamespace(http=HttpOptions(headerlen=4096, http2=True, h2_max_streams=10,
                                             h2_max_requests=50))
    lim = relay_h2.limits(proto, 30)
    assert (lim.max_streams, lim.max_requests, lim.max_head) == (10, 50, 4096)
    assert lim.max_header_list == 4096 + 32 * relay_h2._HPACK_FIELDS
    assert lim.idle_timeout == lim.send_timeout == 30.0
    # `headerlen 0` and `session timeout 0` still make valid limits.
    lim = relay_h2.limits(SimpleNamespace(http=HttpOptions(headerlen=0)), 0)
    assert lim.max_head == 1 and lim.max_header_list == 1 + 32 * relay_h2._HPACK_FIELDS
    assert lim.idle_timeout == 1.0


def test_alpn_offers() -> None:
    assert relay_tls.alpn(ProtocolConfig(1, "p", type="http", http=HttpOptions(http2=True))) == \
        ("h2", "http/1.1")
    assert relay_tls.alpn(ProtocolConfig(1, "p", type="http")) == ("http/1.1",)
    assert relay_tls.alpn(ProtocolConfig(1, "p", type="tcp")) == ()
