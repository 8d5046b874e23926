"""Training-core benchmark: time to first step, harness per-step overhead against a bare
loop over the same batches, strict vs off determinism throughput, lockfile capture time,
and (with --accuracy) the default fashion_mnist accuracy.

    .venv/bin/python benchmarks/core.py [--accuracy] [--steps 300] [--repeats 3]

Prints JSON and merges it into benchmarks/results.json under "core".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"


def harness_train(runs: Path, *overrides: str) -> tuple[dict, float]:
    """Run `harness train fashion_mnist`; return its lockfile and the launch wall time."""
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "harness", "train", "fashion_mnist",
                           "backend=local", *overrides,
                           "--runs-dir", str(runs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"harness train failed:\n{done.stdout}\n{done.stderr}")
    run_dir = next(line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                   if line.startswith("run dir:"))
    return json.loads((Path(run_dir) / "harness.lock").read_text()), t0


BARE_LOOP = r"""
import json, sys, time, torch
from hydra.utils import instantiate
from harness import config, data, determinism
from harness.train import epoch_loader
cfg = config.compose("fashion_mnist", sys.argv[2:])
root, _ = data.prepare(cfg["data"])
determinism.apply(cfg["determinism"]); determinism.seed_everything(cfg["seed"])
dataset = instantiate(cfg["data"]["dataset"], split="train", root=str(root))
model = instantiate(cfg["model"])
optimizer = instantiate(cfg["optim"], params=model.parameters())
steps = int(sys.argv[1])
scheduler = instantiate(cfg["scheduler"], optimizer=optimizer, total_steps=steps)
start, step = time.time(), 0
for images, labels in epoch_loader(dataset, cfg, 0):
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward(); optimizer.step(); scheduler.step()
    step += 1
    if step == steps:
        break
print(json.dumps({"loop_s": time.time() - start}))
"""


def bare_loop(steps: int, *overrides: str) -> float:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    done = subprocess.run([sys.executable, "-c", BARE_LOOP, str(steps), *overrides],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bare loop failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])["loop_s"]


def time_to_first_step(runs: Path, repeats: int) -> dict:
    samples = []
    for _ in range(repeats):
        lock, t0 = harness_train(runs, "trainer.max_steps=3", "trainer.eval_limit=100")
        samples.append(lock["timing"]["first_step_unix"] - t0)
    return {"median_s": round(statistics.median(samples), 3),
            "samples_s": [round(s, 3) for s in samples], "target_s": 5.0}


def overhead(runs: Path, steps: int, repeats: int) -> dict:
    """Interleave harness and bare runs; compare the fastest of each (least disturbed)."""
    common = [f"trainer.max_steps={steps}"]
    harness_s, bare_s = [], []
    for _ in range(repeats):
        lock, _ = harness_train(runs, *common, "trainer.eval_limit=100")
        harness_s.append(lock["timing"]["train_loop_s"])
        bare_s.append(bare_loop(steps, *common))
    ratio = min(harness_s) / min(bare_s)
    return {"steps": steps, "harness_loop_s": harness_s, "bare_loop_s": [round(b, 3) for b in bare_s],
            "overhead_pct": round((ratio - 1) * 100, 2), "target_pct": 3.0}


def determinism_cost(runs: Path, steps: int, repeats: int) -> dict:
    """Training-loop time in strict mode vs determinism=off, interleaved, fastest of each."""
    strict_s, off_s = [], []
    for _ in range(repeats):
        for mode, into in (("strict", strict_s), ("off", off_s)):
            lock, _ = harness_train(runs, f"trainer.max_steps={steps}", "trainer.eval_limit=100",
                                    f"determinism={mode}")
            into.append(lock["timing"]["train_loop_s"])
    return {"steps": steps, "strict_loop_s": strict_s, "off_loop_s": off_s,
            "strict_over_off_throughput": round(min(off_s) / min(strict_s), 3)}


CAPTURE = r"""
import json, time
t = time.perf_counter()
import torch
from harness import lockfile
t_import = time.perf_counter()
lockfile.capture_software(); lockfile.capture_hardware(); lockfile.capture_environment()
print(json.dumps({"capture_s": time.perf_counter() - t_import, "torch_import_s": t_import - t}))
"""


def lockfile_capture(repeats: int) -> dict:
    samples = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", CAPTURE], capture_output=True, text=True,
                              check=True)
        samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"capture_s": round(statistics.median(s["capture_s"] for s in samples), 4),
            "torch_import_s": round(statistics.median(s["torch_import_s"] for s in samples), 3)}


def accuracy(runs: Path) -> dict:
    lock, t0 = harness_train(runs)
    return {"config": "fashion_mnist (defaults: 3 epochs)", "test_accuracy": lock["results"]["test_accuracy"],
            "steps": lock["results"]["steps"], "weights_sha256": lock["results"]["weights_sha256"],
            "wall_s": round(time.time() - t0, 1), "target": 0.915}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", action="store_true", help="also train the full default config")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        result = {"time_to_first_step": time_to_first_step(runs, args.repeats),
                  "overhead": overhead(runs, args.steps, args.repeats),
                  "determinism": determinism_cost(runs, args.steps, args.repeats),
                  "lockfile_capture": lockfile_capture(args.repeats)}
        if args.accuracy:
            result["accuracy"] = accuracy(runs)
    result["machine"] = {"cores": os.cpu_count(), "python": sys.version.split()[0]}
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged["core"] = result
    RESULTS.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
