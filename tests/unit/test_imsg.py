"""shared.imsg: framing, trust rules and descriptor passing."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from shared import imsg


def test_reader_splits_and_reassembles():
    data = imsg.encode(1, {"a": 1}) + imsg.encode(2, [1, 2, 3]) + imsg.encode(3)
    r = imsg.Reader()
    out = []
    for i in range(len(data)):          # byte by byte
        out += r.feed(data[i:i + 1])
    assert [(m.type, m.payload) for m in out] == [(1, {"a": 1}), (2, [1, 2, 3]), (3, None)]


def test_pickle_only_from_trusted_side():
    data = imsg.encode(5, {"x": frozenset({1})}, trusted=True)
    assert imsg.Reader(allow_pickle=True).feed(data)[0].payload == {"x": frozenset({1})}
    with pytest.raises(imsg.ImsgError):
        imsg.Reader(allow_pickle=False).feed(data)


def test_oversized_header_is_rejected():
    import struct
    bad = struct.pack("!IIII", 1, 0, 0, imsg.MAX_IMSG + 1)
    with pytest.raises(imsg.ImsgError):
        imsg.Reader().feed(bad)


def test_channel_passes_fds(tmp_path):
    imsg.carries_fd(77)
    path = tmp_path / "f"
    path.write_text("hello")

    async def main():
        a, b = socket.socketpair()
        ca = imsg.Channel(a, trusted_send=True)
        cb = imsg.Channel(b, allow_pickle=True)
        fd = os.open(path, os.O_RDONLY)
        await ca.send(77, {"name": "f"}, fd=fd)
        os.close(fd)
        await ca.send(1, "no fd")
        m1 = await cb.recv()
        m2 = await cb.recv()
        assert m1.type == 77 and m1.payload == {"name": "f"} and m1.fd >= 0
        assert os.read(m1.fd, 5) == b"hello"
        os.close(m1.fd)
        assert m2.type == 1 and m2.fd == -1
        ca.close()
        assert await cb.recv() is None
        cb.close()

    trio.run(main)
