"""What the CPU modes cost: steps/s of the bundled config (fashion_mnist, local backend,
strict) with determinism.cpu_isa=portable (the same bits on Intel and AMD) and avx2 (one
machine class), each over native, in interleaved pairs: one ratio per pair, reported as
the median with its spread. Steps/s is the lockfile's results.steps / timing.train_loop_s.

    .venv/bin/python benchmarks/cpu_modes.py [--steps 100] [--pairs 5]
    .venv/bin/python benchmarks/cpu_modes.py --quick    # smoke test: 10 steps, 1 pair

Prints JSON and merges it into benchmarks/results.json under "cpu_modes" (with the machine
class it ran on: the figure belongs to that CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import record
from core import harness_train
from spread import interleave, paired_ratios, summary

from harness.host import machine_class


def steps_per_s(runs: Path, steps: int, mode: str) -> float:
    lock, _ = harness_train(runs, f"trainer.max_steps={steps}", "trainer.eval_limit=100",
                            f"determinism.cpu_isa={mode}")
    return lock["results"]["steps"] / lock["timing"]["train_loop_s"]


def over_native(runs: Path, steps: int, pairs: int, mode: str) -> dict:
    pinned, native = interleave(lambda: steps_per_s(runs, steps, mode),
                                lambda: steps_per_s(runs, steps, "native"), pairs)
    ratio = summary(paired_ratios(pinned, native), 3)
    return {"steps_per_s": [round(r, 2) for r in pinned],
            "native_steps_per_s": [round(r, 2) for r in native],
            "over_native": ratio["median"], "over_native_spread": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 10 steps, 1 pair; results.json untouched")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.pairs = 10, 1
    facts = machine_class.this_machine()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        result = {mode: over_native(runs, args.steps, args.pairs, mode)
                  for mode in ("portable", "avx2")}
    result.update({"steps": args.steps, "pairs": args.pairs,
                   "machine_class": machine_class.class_id(facts), "target_portable": 0.7,
                   "cores": os.cpu_count(), "python": sys.version.split()[0]})
    if not args.quick:
        record.save("cpu_modes", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
