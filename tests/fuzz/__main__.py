"""make fuzz: every target of tests.fuzz.targets in worker processes.

    python -m tests.fuzz [--jobs N] [--seconds S] [--inputs N] [TARGET ...]

FUZZ_SCALE (default 1) multiplies the time and input budget of each target
(scale 1: 65 s and at most 500000 inputs a target, two at a time: about 9
minutes for the 14 targets) and the examples of each hypothesis property
(tests/fuzz/test_properties.py: 1000 at scale 1), run as one more target.  Prints "target: inputs, seconds, result" for
each and exits 1 if any failed; failing inputs land in fuzz-crashes/
(replay one with `python -m tests.fuzz.worker --replay TARGET FILE`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tests.fuzz.targets import ALL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Seconds and inputs a target gets at FUZZ_SCALE=1.
SECONDS = 65.0
INPUTS = 500_000


def run_worker(name: str, inputs: int, seconds: float, seed: int, crash_dir: str) -> dict:
    cmd = [sys.executable, "-m", "tests.fuzz.worker", name, str(inputs), str(seconds),
           str(seed), crash_dir]
    log = os.path.join(crash_dir, f"{name}.log")
    # FUZZ_SCALE also sizes the hypothesis properties (test_properties.py).
    env = dict(os.environ, RUST_BACKTRACE="0", PYTHONHASHSEED="0",
               FUZZ_SCALE=os.environ.get("FUZZ_SCALE", "1"))
    t0 = time.monotonic()
    with open(log, "wb") as err:
        try:
            p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, env=env,
                               timeout=seconds * 2 + 120)
        except subprocess.TimeoutExpired:
            from tests.fuzz.worker import rescue
            path = rescue(name, crash_dir)
            return {"name": name, "inputs": -1, "seconds": time.monotonic() - t0,
                    "failure": "hang in native code (worker killed)", "crash_file": path}
    lines = p.stdout.decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        from tests.fuzz.worker import rescue
        return {"name": name, "inputs": -1, "seconds": time.monotonic() - t0,
                "failure": f"worker died (exit {p.returncode}); see {log}",
                "crash_file": rescue(name, crash_dir)}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")))
    scale = float(os.environ.get("FUZZ_SCALE", "1"))
    ap.add_argument("--seconds", type=float, default=SECONDS * scale)
    ap.add_argument("--inputs", type=int, default=int(INPUTS * scale))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", "0")))
    ap.add_argument("--crash-dir", default=os.path.join(ROOT, "fuzz-crashes"))
    ap.add_argument("targets", nargs="*")
    a = ap.parse_args()
    names = [n for n in [m.__name__ for m in ALL] + ["properties"]
             if not a.targets or n in a.targets]
    os.makedirs(a.crash_dir, exist_ok=True)
    t0 = time.monotonic()
    with ThreadPoolExecutor(a.jobs) as pool:
        futs = [pool.submit(run_worker, n, a.inputs, a.seconds, a.seed, a.crash_dir)
                for n in names]
        results = []
        for f in futs:
            r = f.result()
            results.append(r)
            print(f"  {r['name']}: {r['inputs']} inputs, {r['seconds']:.1f} s, "
                  f"{'ok' if not r['failure'] else 'FAILED'}", flush=True)
    total = sum(max(r["inputs"], 0) for r in results)
    print()
    print(f"{'target':<14} {'inputs':>9} {'seconds':>8}  result")
    for r in results:
        res = "ok" if not r["failure"] else f"FAILED: {r['failure'].splitlines()[0][:160]}"
        print(f"{r['name']:<14} {r['inputs']:>9} {r['seconds']:>8.1f}  {res}")
        if r["failure"]:
            print(f"{'':<14} input saved in {r['crash_file']}")
    print(f"{'total':<14} {total:>9} {time.monotonic() - t0:>8.1f}  (wall clock, "
          f"{a.jobs} jobs)")
    return 1 if any(r["failure"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
