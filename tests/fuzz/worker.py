"""One fuzz target in this process (run by `python -m tests.fuzz`).

    python -m tests.fuzz.worker TARGET INPUTS SECONDS SEED CRASH_DIR
    python -m tests.fuzz.worker --replay TARGET FILE

Prints its Result as JSON on the last line.  The input being run is kept in
CRASH_DIR/TARGET.cur (shared memory), so the parent can save it if this
process hangs where the per-input alarm cannot interrupt it, or dies.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import signal
import struct
import sys

from tests.fuzz import engine, targets

_LEN = struct.Struct("!I")


def _cur_path(name: str, crash_dir: str) -> str:
    return os.path.join(crash_dir, f"{name}.cur")


def rescue(name: str, crash_dir: str) -> str | None:
    """Save the input a killed worker was running; its path (or None)."""
    try:
        with open(_cur_path(name, crash_dir), "rb") as f:
            raw = f.read()
        n, = _LEN.unpack_from(raw)
        return engine.save_crash(crash_dir, name, raw[4:4 + n])
    except (OSError, struct.error):
        return None


def quiet() -> None:
    # The daemons' log lines (h2 GOAWAY reasons and the like) are noise here.
    import shared.log
    shared.log._emit = lambda *a: None


def properties(crash_dir: str) -> engine.Result:
    """The hypothesis properties (tests/fuzz/test_properties.py) as one
    target: examples run, and the first failure."""
    import time
    import traceback
    from tests.fuzz import test_properties as tp
    res = engine.Result("properties")
    t0 = time.monotonic()
    for name in sorted(n for n in dir(tp) if n.startswith("test_")):
        try:
            getattr(tp, name)()
        except Exception as e:           # noqa: BLE001 -- reported below
            text = "".join(traceback.format_exception(e))
            res.failure = f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            res.crash_file = os.path.join(crash_dir, f"properties-{name}.txt")
            with open(res.crash_file, "w") as f:
                f.write(text)
            break
    res.inputs = sum(tp.CALLS.values())
    res.seconds = time.monotonic() - t0
    return res


def main(argv: list[str]) -> int:
    quiet()
    if argv[0] == "properties":
        os.makedirs(argv[4], exist_ok=True)
        print(json.dumps(dataclasses.asdict(properties(argv[4]))))
        return 0
    if argv[0] == "--replay":
        t, = targets.build([argv[1]])
        with open(argv[2], "rb") as f:
            data = f.read()
        signal.signal(signal.SIGALRM, engine._on_alarm)
        engine.run_one(t, data)
        print("ok")
        return 0
    name, inputs, seconds, seed, crash_dir = argv
    t, = targets.build([name])
    size = 4 + engine.MAX_LEN * 2
    with open(_cur_path(name, crash_dir), "w+b") as f:
        f.truncate(size)
        shm = mmap.mmap(f.fileno(), size)

    def current(data: bytes) -> None:
        n = min(len(data), size - 4)
        shm[:4] = _LEN.pack(n)
        shm[4:4 + n] = data[:n]

    r = engine.run(t, int(inputs), float(seconds), int(seed), crash_dir, current)
    print(json.dumps(dataclasses.asdict(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
