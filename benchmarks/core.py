"""Training-core benchmark: time to first step, harness per-step overhead against a bare
loop over the same batches, strict vs off determinism throughput, lockfile capture time,
and (with --accuracy) the default fashion_mnist accuracy.

    .venv/bin/python benchmarks/core.py [--accuracy] [--steps 200] [--pairs 7] [--repeats 3]
    .venv/bin/python benchmarks/core.py --quick     # a smoke test: tiny runs, nothing saved

Comparisons (harness vs bare loop, strict vs off) are made in interleaved pairs: one ratio
per pair, reported as the median of the pair ratios with their spread. The harness's own
account of its bookkeeping in the loop (lockfile timing.harness_s) is reported per step
and as a fraction of the loop time: measured inside the process, load hardly moves it.

Prints JSON and merges it into benchmarks/results.json under "core" (not with --quick).
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

import record
from spread import interleave, paired_ratios, summary, timed


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
from harness import config
from harness.commands import choices
from harness.training import datasets, determinism, seeding
from harness.training.loop import EpochShards, epoch_loader
cfg = choices.compose("fashion_mnist", sys.argv[2:])
root, _ = datasets.prepare(cfg["data"])
determinism.apply(cfg["determinism"]); seeding.seed_everything(cfg["seed"])
dataset = instantiate(cfg["data"]["dataset"], split="train", root=str(root))
model = instantiate(cfg["model"])
optimizer = instantiate(cfg["optim"], params=model.parameters())
steps = int(sys.argv[1])
scheduler = instantiate(cfg["scheduler"], optimizer=optimizer, total_steps=steps)
start, step = time.time(), 0
shards = EpochShards(len(dataset), cfg["seed"], 0, cfg["trainer"]["batch_size"])
for images, labels in epoch_loader(dataset, cfg, 0, shards):
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


def bookkeeping(locks: list) -> dict:
    """The harness's own time in the loop (metrics records, fingerprints, checkpoint saves,
    progress lines: lockfile timing.harness_s), per step and as a fraction of the loop.
    None where the training process does not record it."""
    spent = [lock["timing"].get("harness_s") for lock in locks]
    if None in spent:
        return {"per_step_ms": None, "fraction_of_loop": None,
                "note": "lockfile has no timing.harness_s"}
    per_step = summary([1000 * t / lock["results"]["steps"] for t, lock in zip(spent, locks)])
    fraction = summary([t / lock["timing"]["train_loop_s"] for t, lock in zip(spent, locks)], 6)
    return {"harness_s": spent, "per_step_ms": per_step["median"], "per_step_ms_spread": per_step,
            "fraction_of_loop": fraction["median"], "fraction_of_loop_spread": fraction}


def overhead(runs: Path, steps: int, pairs: int) -> dict:
    """Harness loop vs bare loop over the same batches, in interleaved pairs."""
    common = [f"trainer.max_steps={steps}"]
    locks, bare_s = interleave(lambda: harness_train(runs, *common, "trainer.eval_limit=100")[0],
                               lambda: bare_loop(steps, *common), pairs)
    harness_s = [lock["timing"]["train_loop_s"] for lock in locks]
    pct = summary([(r - 1) * 100 for r in paired_ratios(harness_s, bare_s)], 2)
    return {"steps": steps, "pairs": pairs, "harness_loop_s": harness_s,
            "bare_loop_s": [round(b, 3) for b in bare_s],
            "overhead_pct": pct["median"], "overhead_pct_spread": pct,
            "bookkeeping": bookkeeping(locks), "target_pct": 3.0}


def determinism_cost(runs: Path, steps: int, pairs: int) -> dict:
    """Training-loop time in strict mode vs determinism=off, in interleaved pairs."""
    def loop_s(mode: str) -> float:
        lock, _ = harness_train(runs, f"trainer.max_steps={steps}", "trainer.eval_limit=100",
                                f"determinism={mode}")
        return lock["timing"]["train_loop_s"]

    strict_s, off_s = interleave(lambda: loop_s("strict"), lambda: loop_s("off"), pairs)
    throughput = summary(paired_ratios(off_s, strict_s), 3)
    return {"steps": steps, "pairs": pairs, "strict_loop_s": strict_s, "off_loop_s": off_s,
            "strict_over_off_throughput": throughput["median"],
            "strict_over_off_throughput_spread": throughput}


CAPTURE = r"""
import json, time
t = time.perf_counter()
import torch
from harness.record import lockfile
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


def sample_seeding(pairs: int, batch: int = 64) -> dict:
    """What seeding python, numpy and torch per sample (seeding.SeededSamples) costs:
    a batch fetched through it vs the same batch fetched directly, in interleaved pairs,
    in the main process (so the once-per-batch save/restore of the generators counts)."""
    import torch

    from harness.training.seeding import SeededSamples

    image = torch.zeros(1, 28, 28)

    class Plain:
        def __len__(self):
            return 60000

        def __getitem__(self, index):
            return image, index

    plain, seeded = Plain(), SeededSamples(Plain(), seed=0, epoch=0)
    indices = list(range(batch))

    def fetch_plain() -> float:
        return timed(lambda: [plain[i] for i in indices], repeat=20)[-1]

    def fetch_seeded() -> float:
        return timed(lambda: seeded.__getitems__(indices), repeat=20)[-1]

    seeded_s, plain_s = interleave(fetch_seeded, fetch_plain, pairs * 20)
    extra_us = [(s - p) / batch * 1e6 for s, p in zip(seeded_s, plain_s)]
    per_sample = summary(extra_us, digits=2)
    return {"batch_size": batch, "per_sample_us": per_sample["median"],
            "per_sample_us_spread": per_sample,
            "per_batch_ms": round(per_sample["median"] * batch / 1000, 3)}


def accuracy(runs: Path) -> dict:
    lock, t0 = harness_train(runs)
    return {"config": "fashion_mnist (defaults: 3 epochs)",
            "test_accuracy": lock["results"]["test_accuracy"],
            "steps": lock["results"]["steps"], "weights_sha256": lock["results"]["weights_sha256"],
            "wall_s": round(time.time() - t0, 1), "target": 0.915}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", action="store_true",
                        help="also train the full default config")
    parser.add_argument("--steps", type=int, default=200, help="training steps per compared run")
    parser.add_argument("--pairs", type=int, default=7, help="interleaved pairs per comparison")
    parser.add_argument("--repeats", type=int, default=3, help="samples of the single figures")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 10 steps, 2 pairs, 1 repeat; results.json untouched")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.pairs, args.repeats = 10, 2, 1
    return args


def main() -> None:
    args = arguments()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        result = {"time_to_first_step": time_to_first_step(runs, args.repeats),
                  "overhead": overhead(runs, args.steps, args.pairs),
                  "determinism": determinism_cost(runs, args.steps, args.pairs),
                  "lockfile_capture": lockfile_capture(args.repeats),
                  "sample_seeding": sample_seeding(args.pairs)}
        if args.accuracy:
            result["accuracy"] = accuracy(runs)
    result["machine"] = {"cores": os.cpu_count(), "python": sys.version.split()[0],
                         "load_avg_1m_start": round(load_start, 2),
                         "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    if not args.quick:
        record.save("core", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
