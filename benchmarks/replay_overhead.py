"""Replay overhead and fingerprint cost, measured through the real CLI on Fashion-MNIST.

    .venv/bin/python benchmarks/replay_overhead.py [--steps 300] [--keep DIR]

Prints JSON:
- replay: wall time of `harness train` vs `harness replay` of that run, and the replay's own
  split (gate = lockfile check + environment capture child + gate; train = the re-run;
  compare = bitwise comparison), with the overhead (replay wall - its training) relative to
  the original training wall time;
- fingerprint: per-step cost of parameter digests, end to end (training-loop time with
  trainer.fingerprint_every = default 100, 1, and 10**9) and measured directly (one
  tensor_digests call on the model's state dict, amortised over the default interval).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FASHION = Path("/usr/share/datasets/fashion-mnist")


def harness(*args: str, cwd: Path):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"harness {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    run_dir = next(Path(l.split(":", 1)[1].strip()) for l in reversed(done.stdout.splitlines())
                   if l.startswith("run dir:"))
    return run_dir, wall


def lock_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "harness.lock").read_text())


def loop_seconds(lock: dict) -> float:
    timing = lock["timing"]
    return timing.get("train_loop_s", timing["train_process_s"])


def digest_microbenchmark(repeat: int = 20) -> float:
    """Seconds per tensor_digests call on the bundled CNN's state dict."""
    import torch
    from hydra.utils import instantiate

    from harness.config import load_yaml
    from harness.train import tensor_digests

    torch.set_num_threads(2)
    model = instantiate(load_yaml(Path(__file__).resolve().parent.parent / "conf" / "model" /
                                  "cnn.yaml"))
    state = model.state_dict()
    tensor_digests(state)
    started = time.perf_counter()
    for _ in range(repeat):
        tensor_digests(state)
    return (time.perf_counter() - started) / repeat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in DIR")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"needs Debian's Fashion-MNIST in {FASHION}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="harness-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["fashion_mnist", "backend=local", f"trainer.max_steps={args.steps}", "trainer.eval_limit=2000",
              "--runs-dir", str(work / "runs")]

    original, train_wall = harness("train", *common, cwd=work)
    replay, replay_wall = harness("replay", str(original), cwd=work)
    record = json.loads((replay / "replay.json").read_text())
    split = record["timing"]
    default_every = lock_of(original)["config"]["trainer"]["fingerprint_every"]
    never, _ = harness("train", *common, "trainer.fingerprint_every=1000000000", cwd=work)
    every, _ = harness("train", *common, "trainer.fingerprint_every=1", cwd=work)
    loops = {"default": loop_seconds(lock_of(original)), "replay": loop_seconds(lock_of(replay)),
             "never": loop_seconds(lock_of(never)), "every_step": loop_seconds(lock_of(every))}
    per_call = digest_microbenchmark()
    steps = args.steps
    out = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "steps": steps,
        "replay": {
            "verdict": record["verdict"],
            "original_train_wall_s": round(train_wall, 2),
            "replay_wall_s": round(replay_wall, 2),
            "replay_gate_s": split["gate_s"],
            "replay_train_s": split["train_s"],
            "replay_compare_s": split["compare_s"],
            "overhead_s": round(replay_wall - split["train_s"], 2),
            "overhead_vs_original_train": round((replay_wall - split["train_s"]) / train_wall, 3),
            "gate_plus_compare_vs_original_train":
                round((split["gate_s"] + split["compare_s"]) / train_wall, 3),
        },
        "fingerprint": {
            "default_every": default_every,
            "train_loop_s": {k: round(v, 3) for k, v in loops.items()},
            "per_step_cost_every_step_ms":
                round(1000 * (loops["every_step"] - loops["never"]) / steps, 3),
            "per_step_cost_default_ms":
                round(1000 * (loops["default"] - loops["never"]) / steps, 3),
            "digest_call_ms": round(1000 * per_call, 3),
            "per_step_cost_default_from_call_ms": round(1000 * per_call / default_every, 4),
            "train_step_ms_no_fingerprint": round(1000 * loops["never"] / steps, 3),
        },
        "runs_dir": str(work / "runs"),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
