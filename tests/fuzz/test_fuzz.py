"""The short fuzz run of `make test`: every target of tests.fuzz.targets for
FUZZ_SECONDS (default 1) in this process, same seed each run.  `make fuzz`
runs them at length (tests/fuzz/__main__.py)."""

from __future__ import annotations

import os

import pytest

from tests.fuzz import engine, targets

SECONDS = float(os.environ.get("FUZZ_SECONDS", "1"))


@pytest.mark.parametrize("name", [m.__name__ for m in targets.ALL])
def test_fuzz_short(name: str, tmp_path) -> None:
    t, = targets.build([name])
    r = engine.run(t, 1_000_000, SECONDS, seed=int(os.environ.get("FUZZ_SEED", "0")),
                   crash_dir=str(tmp_path))
    assert r.ok, f"{r.failure}\ninput: {r.crash_file}"
    assert r.inputs >= len(t.seeds)
