"""tests.fuzz.engine -- a small mutation fuzzer for the parser targets.

Each target (tests.fuzz.targets) is a function of one bytes input, a seed
corpus of valid-ish inputs and a dictionary of tokens.  run() mutates the
seeds (bit flips, interesting bytes, inserted/deleted/duplicated ranges,
dictionary tokens, splices of two seeds), calls the target under a
per-input alarm, and stops at an input count or a time budget, whichever
comes first.  The target's documented errors are part of its contract;
anything else -- another exception, a failed property (AssertionError), an
input that runs longer than the per-input limit -- is a failure: the input
is saved under `crash_dir` and run() stops.

Deterministic for a given seed: a failure found in CI reproduces with
`python -m tests.fuzz replay FILE`.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

# Bytes that matter to the parsers here (line ends, separators, digits).
INTERESTING = b"\x00\x01\x7f\x80\xff\r\n\t :;,=\"'{}[]()%*?\\/.-0179afAFxX#$<>"
# Longest input the mutator grows.
MAX_LEN = 4096


class Hang(Exception):
    """An input ran longer than the per-input limit."""


@dataclass
class Target:
    """One fuzz target: `fn(data)` may raise only `expected` exceptions."""

    name: str
    fn: Callable[[bytes], object]
    seeds: list[bytes]
    expected: tuple[type[BaseException], ...] = ()
    tokens: list[bytes] = field(default_factory=list)
    weight: float = 1.0          # share of the input budget (relative speed)
    per_input: float = 2.0       # seconds before an input counts as a hang


@dataclass
class Result:
    name: str
    inputs: int = 0
    seconds: float = 0.0
    failure: str | None = None
    crash_file: str | None = None
    expected_errors: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None


def _on_alarm(signum, frame):
    raise Hang("input ran past its time limit")


class Mutator:
    def __init__(self, rng: random.Random, seeds: list[bytes], tokens: list[bytes]) -> None:
        self.rng = rng
        self.seeds = seeds or [b""]
        self.tokens = tokens or [bytes([c]) for c in INTERESTING]

    def mutate(self) -> bytes:
        rng = self.rng
        data = bytearray(rng.choice(self.seeds))
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
            self._one(data)
        if len(data) > MAX_LEN:
            del data[MAX_LEN:]
        return bytes(data)

    def _one(self, data: bytearray) -> None:
        rng = self.rng
        n = len(data)
        op = rng.randrange(9)
        pos = rng.randrange(n + 1)
        if op == 0 and n:                                   # bit flip
            i = min(pos, n - 1)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                                 # interesting byte
            data[min(pos, n - 1)] = rng.choice(INTERESTING)
        elif op == 2:                                       # random bytes in
            data[pos:pos] = rng.randbytes(rng.randrange(1, 5))
        elif op == 3 and n:                                 # delete a range
            data[pos:pos + rng.randrange(1, 17)] = b""
        elif op == 4 and n:                                 # duplicate a range
            j = rng.randrange(n)
            piece = data[j:j + rng.randrange(1, 65)]
            data[pos:pos] = piece * rng.choice((1, 1, 2, 16))
        elif op in (5, 6):                                  # dictionary token
            tok = rng.choice(self.tokens)
            if op == 5:
                data[pos:pos] = tok
            else:
                data[pos:pos + len(tok)] = tok
        elif op == 7:                                       # splice another seed
            other = rng.choice(self.seeds)
            j = rng.randrange(len(other) + 1)
            data[pos:] = other[j:]
        elif op == 8 and n:                                 # number-ish edits
            i = min(pos, n - 1)
            data[i:i + 1] = str(rng.choice((0, 1, 9, 10, 255, 256, 65535, 65536,
                                            2**31, 2**63, 2**64, -1))).encode()


def save_crash(crash_dir: str, name: str, data: bytes) -> str:
    os.makedirs(crash_dir, exist_ok=True)
    path = os.path.join(crash_dir, f"{name}-{hashlib.sha1(data).hexdigest()[:12]}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def run_one(t: Target, data: bytes) -> bool:
    """Run one input under the alarm; True if it ended in an expected error.
    Raises Hang or whatever unexpected exception the target raised."""
    signal.setitimer(signal.ITIMER_REAL, t.per_input)
    try:
        t.fn(data)
        return False
    except t.expected:
        return True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run(t: Target, inputs: int, seconds: float, seed: int = 0,
        crash_dir: str = "fuzz-crashes", current: Callable[[bytes], None] | None = None) -> Result:
    """Fuzz `t` with up to `inputs` inputs for at most `seconds`.

    `current(data)` is told each input before it runs (the runner keeps it
    in shared memory: an input stuck in C code, where the alarm cannot
    reach, is still known when the process is killed)."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    res = Result(t.name)
    rng = random.Random(f"{seed}:{t.name}")
    mut = Mutator(rng, t.seeds, t.tokens)
    start = time.monotonic()
    deadline = start + seconds
    pending = list(t.seeds)               # every seed as it is, first
    try:
        while res.inputs < inputs:
            if res.inputs & 63 == 0 and time.monotonic() > deadline:
                break
            data = pending.pop() if pending else mut.mutate()
            res.inputs += 1
            if current is not None:
                current(data)
            try:
                res.expected_errors += run_one(t, data)
            except BaseException as e:     # noqa: BLE001 -- the point of fuzzing
                if isinstance(e, KeyboardInterrupt):
                    raise
                res.failure = "".join(traceback.format_exception_only(type(e), e)).strip()
                res.failure += "\n" + "".join(traceback.format_tb(e.__traceback__)[-3:])
                res.crash_file = save_crash(crash_dir, t.name, data)
                break
    finally:
        signal.signal(signal.SIGALRM, old)
        res.seconds = time.monotonic() - start
    return res
