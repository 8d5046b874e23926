"""Data-parallel training on this machine's cores (gloo, CPU), the default fashion_mnist
model and a global batch of 64 either way:

  two_ranks_over_one_throughput   samples/s of 2 ranks × 1 thread (32 per rank) over
                                  1 rank × 2 threads (64), from the training loop time in
                                  each lockfile (timing.train_loop_s); interleaved pairs,
                                  median of the pair ratios (goal >= 0.9)
  allreduce_share                 where the difference goes: a bare 2-rank loop of the same
                                  model (in this script's own processes, 150 steps) with
                                  DDP over one without any communication; 1 - their
                                  samples/s ratio, 5 interleaved pairs, median
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
ROOT = Path(__file__).resolve().parent.parent

BARE_RANKS = r"""
import os, sys, time, torch, torch.distributed as dist, torch.multiprocessing as mp
from harness.training.models import SmallCNN

def rank_loop(rank, ddp, port):
    torch.set_num_threads(1); torch.set_num_interop_threads(1); torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    model = SmallCNN()
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters())
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for _ in range(10):
        step()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(150):
        step()
    if rank == 0:
        print(150 * 64 / (time.perf_counter() - started), flush=True)
    dist.barrier()
    os._exit(0)  # see harness/training/distributed.py, _HELD

if __name__ == "__main__":
    mp.start_processes(rank_loop, args=(sys.argv[1] == "ddp", int(sys.argv[2])), nprocs=2,
                       start_method="fork")
"""


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


def bare_samples_per_s(mode: str) -> float:
    sys.path.insert(0, str(ROOT))
    from harness.training.distributed import free_port

    done = subprocess.run([sys.executable, "-c", BARE_RANKS, mode, str(free_port())],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"bare 2-rank loop failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def allreduce_share(pairs: int) -> dict:
    ddp, alone = interleave(lambda: bare_samples_per_s("ddp"),
                            lambda: bare_samples_per_s("alone"), pairs)
    spread = summary([1 - r for r in paired_ratios(ddp, alone)])
    return {"allreduce_share": spread["median"], "allreduce_share_spread": spread,
            "bare_ddp_samples_per_s": [round(x, 1) for x in ddp],
            "bare_alone_samples_per_s": [round(x, 1) for x in alone]}


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
        results.update(allreduce_share(pairs))
        results["repeat_identical"] = repeats(runs, 20 if args.quick else 100,
                                              (2,) if args.quick else (2, 3, 4))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
