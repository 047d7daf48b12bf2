"""engine.trio_private: trio behaves the same after each shortcut."""

from __future__ import annotations

import socket

import trio

from engine import trio_private
from engine.conn import close_socket


class _Count(trio.abc.Instrument):
    def __init__(self) -> None:
        self.scheduled = 0
        self.steps = 0

    def task_scheduled(self, task) -> None:
        self.scheduled += 1

    def before_task_step(self, task) -> None:
        self.steps += 1


def test_fast_instruments_keeps_trio_instruments_working() -> None:
    seen = {}

    async def main() -> None:
        runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
        trio_private.fast_instruments()
        assert type(runner.instruments) is trio_private._DictInstruments
        assert "task_scheduled" not in runner.instruments
        count = _Count()
        trio.lowlevel.add_instrument(count)
        assert "task_scheduled" in runner.instruments and "before_task_step" in runner.instruments
        async with trio.open_nursery() as n:
            n.start_soon(trio.sleep, 0)
        await trio.sleep(0)
        seen["during"] = (count.scheduled, count.steps)
        trio.lowlevel.remove_instrument(count)
        assert "task_scheduled" not in runner.instruments
        await trio.sleep(0)
        seen["after"] = (count.scheduled, count.steps)

    trio.run(main)
    assert seen["during"][0] > 0 and seen["during"][1] > 0
    assert seen["after"] == seen["during"]        # removed: no more calls


def test_fast_instruments_keeps_instruments_given_to_run() -> None:
    count = _Count()

    async def main() -> None:
        trio_private.fast_instruments()
        await trio.sleep(0)

    trio.run(main, instruments=[count])
    assert count.steps > 0


def test_wait_readable_new_wakes_on_data_and_cleans_up() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        try:
            async with trio.open_nursery() as n:
                async def later() -> None:
                    await trio.sleep(0.01)
                    b.send(b"x")
                n.start_soon(later)
                await trio_private.wait_readable_new(a)
            assert a.recv(10) == b"x"
            # the one-shot event was taken: trio tracks the fd no longer,
            # and a second wait (trio's own path now) still works
            assert not trio_private.watched(a.fileno())
            b.send(b"y")
            await trio.lowlevel.wait_readable(a)
            assert a.recv(10) == b"y"
        finally:
            close_socket(a)
            b.close()

    trio.run(main)


def test_wait_readable_new_cancelled_leaves_no_registration() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        with trio.move_on_after(0.01):
            await trio_private.wait_readable_new(a)
        assert not trio_private.watched(a.fileno())
        close_socket(a)
        # a new socket may get the same fd number: waiting on it works
        c, d = socket.socketpair()
        c.setblocking(False)
        d.send(b"z")
        await trio_private.wait_readable_new(c)
        assert c.recv(1) == b"z"
        for s in (b, c, d):
            close_socket(s)

    trio.run(main)
