"""Cost of live tracking (tracker=mlflow against a real `mlflow server` on 127.0.0.1) to the
training: the default fashion_mnist model, `harness train ... backend=local`, 300 steps.

  mlflow_step_cost    per-step training time with tracker=mlflow over tracker=none, minus 1
                      (timing.train_loop_s / steps from each lockfile); interleaved pairs,
                      median of the pair ratios (goal <= 0.02). The follower thread lives in
                      the launcher, so what it costs the training is CPU taken from the
                      training process on the same cores, nothing in the loop itself.
  mlflow_end_s        what tracking adds after the training ended: the launcher's time from
                      the lockfile's train end to its exit, with tracker=mlflow minus
                      without (the artifact upload, the final metrics), median of the pairs

Run: .venv/bin/python benchmarks/tracking.py [--quick]   (prints JSON)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spread import interleave, paired_ratios, summary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
import mlflow_server


def train(runs: Path, steps: int, tracking: list) -> dict:
    """One run; (seconds per training step, seconds from the training's end to exit)."""
    done = subprocess.run(
        [sys.executable, "-m", "harness", "train", "fashion_mnist", "backend=local",
         f"trainer.max_steps={steps}", "trainer.eval_limit=500", *tracking,
         "--runs-dir", str(runs)], capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"harness train failed:\n{done.stdout}\n{done.stderr}")
    run_dir = Path(next(line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                        if line.startswith("run dir:")))
    lock = json.loads((run_dir / "harness.lock").read_text())
    tail = ended - (run_dir / "harness.lock").stat().st_mtime
    return {"step_s": lock["timing"]["train_loop_s"] / lock["results"]["steps"], "tail_s": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny runs; nothing recorded")
    args = parser.parse_args()
    steps, pairs = (20, 1) if args.quick else (300, 5)
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        with mlflow_server.running(Path(tmp)) as (uri, _):
            # A fresh server imports its handlers on its first requests (seconds of CPU on
            # the cores the training uses): a real one is long-running, so warm it first.
            train(Path(tmp) / "runs", 10, ["tracker=mlflow", f"tracker.mlflow.tracking_uri={uri}"])
            tracked, plain = interleave(
                lambda: train(Path(tmp) / "runs", steps,
                              ["tracker=mlflow", f"tracker.mlflow.tracking_uri={uri}"]),
                lambda: train(Path(tmp) / "runs", steps, ["tracker=none"]), pairs)
    costs = [r - 1 for r in paired_ratios([t["step_s"] for t in tracked],
                                          [p["step_s"] for p in plain])]
    ends = [t["tail_s"] - p["tail_s"] for t, p in zip(tracked, plain)]
    cost, end = summary(costs), summary(ends, 3)
    print(json.dumps({
        "mlflow_step_cost": cost["median"], "mlflow_step_cost_spread": cost,
        "mlflow_end_s": end["median"], "mlflow_end_s_spread": end,
        "step_ms_mlflow": [round(t["step_s"] * 1000, 2) for t in tracked],
        "step_ms_none": [round(p["step_s"] * 1000, 2) for p in plain], "steps": steps},
        indent=2))


if __name__ == "__main__":
    main()
