"""A child for test_privsep: `python -m tests.unit.privsep_child -P mode -I n -S fd`.

mode "junk": after set-up, sends a message of a type the parent does not
know; "bad": a known type with a malformed payload; "good": answers
CTL_READY and waits for CTL_STOP."""

from __future__ import annotations

import sys

import trio

from shared import proc
from shared.imsg import Channel, Imsg


def main() -> int:
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    mode, fd = args["-P"], int(args["-S"])
    sock = proc.child_socket(fd)
    setup = proc.recv_setup(sock)

    async def run() -> None:
        chan = Channel(sock, allow_pickle=True, reader=setup.reader)
        await chan.send(Imsg.CTL_READY)
        if mode == "junk":
            await chan.send(999, {"x": 1})
        elif mode == "bad":
            await chan.send(Imsg.HOST_STATUS, {"id": "not a number"})
        while True:
            msg = await chan.recv()
            if msg is None or msg.type == Imsg.CTL_STOP:
                return
    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
