"""Data-parallel training on this machine's cores (gloo, CPU), the default fashion_mnist
model and a global batch of 64 either way:

  two_ranks_over_one_throughput   samples/s of 2 ranks × 1 thread (32 per rank) over
                                  1 rank × 2 threads (64), from the training loop time in
                                  each lockfile (timing.train_loop_s); interleaved pairs,
                                  median of the pair ratios (goal >= 0.9)
  repeat_identical                per world size (2, 3, 4 ranks × 1 thread): whether two runs
                                  gave the same weights_sha256 (gloo's all-reduce on CPU is
                                  reported nondeterministic in pytorch#36871: measured here)

Run: .venv/bin/python benchmarks/data_parallel.py [--quick]   (prints JSON)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from spread import interleave, paired_ratios, summary

GLOBAL_BATCH = 64


def train(runs: Path, devices: int, threads: int, steps: int) -> dict:
    """`harness train fashion_mnist` with `devices` ranks; its lockfile."""
    done = subprocess.run(
        [sys.executable, "-m", "harness", "train", "fashion_mnist", "backend=local",
         f"trainer.devices={devices}", f"determinism.threads={threads}",
         f"trainer.batch_size={GLOBAL_BATCH // devices}", f"trainer.max_steps={steps}",
         "trainer.eval_limit=500", "--runs-dir", str(runs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"harness train failed:\n{done.stdout}\n{done.stderr}")
    run_dir = next(line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                   if line.startswith("run dir:"))
    return json.loads((Path(run_dir) / "harness.lock").read_text())


def samples_per_s(lock: dict) -> float:
    steps = lock["results"]["steps"]
    return steps * GLOBAL_BATCH / lock["timing"]["train_loop_s"]


def throughput(runs: Path, steps: int, pairs: int) -> dict:
    two, one = interleave(lambda: samples_per_s(train(runs, 2, 1, steps)),
                          lambda: samples_per_s(train(runs, 1, 2, steps)), pairs)
    ratios = paired_ratios(two, one)
    spread = summary(ratios)
    return {"two_ranks_over_one_throughput": spread["median"],
            "two_ranks_over_one_throughput_spread": spread,
            "two_ranks_samples_per_s": [round(x, 1) for x in two],
            "one_rank_samples_per_s": [round(x, 1) for x in one], "steps": steps}


def repeats(runs: Path, steps: int, worlds) -> dict:
    found = {}
    for world in worlds:
        hashes = [train(runs, world, 1, steps)["results"]["weights_sha256"] for _ in range(2)]
        found[str(world)] = {"identical": hashes[0] == hashes[1],
                             "weights_sha256": [h[:16] for h in hashes]}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny runs; nothing recorded")
    args = parser.parse_args()
    steps, pairs = (20, 1) if args.quick else (300, 5)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        runs = Path(tmp)
        results = throughput(runs, steps, pairs)
        results["repeat_identical"] = repeats(runs, 20 if args.quick else 100,
                                              (2,) if args.quick else (2, 3, 4))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
