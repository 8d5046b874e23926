"""Replay overhead and fingerprint cost, on Fashion-MNIST.

    .venv/bin/python benchmarks/replay_overhead.py [--steps 300] [--pairs 3] [--keep DIR]
    .venv/bin/python benchmarks/replay_overhead.py --quick    # smoke test: tiny runs

Prints JSON:
- replay.fixed_cost_s: what a replay adds to the training it repeats, in absolute seconds,
  measured in this process: the gate (lockfile check + environment capture + gate) and the
  bitwise comparison, each the median of several calls. It does not depend on the length
  of the run. The capture is remembered for an unchanged environment
  (harness/record/facts_cache.py); replay.fixed_cost_cold_s is the same with HARNESS_REHASH=1,
  the capture child importing torch every time (a replay's first after a change).
- replay.overhead_vs_original_paired: that cost relative to the original run, measured with
  the two interleaved: `harness train`, then `harness replay` of it, in pairs. Per pair,
  (replay wall - the replay's own training) / original training wall; median of the pairs
  with their spread. Being a fixed cost over a run's time, it shrinks as runs get longer:
  the figure holds for runs of --steps steps.
- op_trace: one training step traced (every op's inputs and outputs hashed, as
  trainer.op_trace_steps does for the first step) against the same step untraced, and the
  trace's size on disk.
- fingerprint: the cost of one parameter fingerprint (tensor_digests of the model's state
  dict, as the training loop calls it) measured directly, median of many calls, times the
  fingerprints per step at the default interval (1 / trainer.fingerprint_every).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spread import summary, timed

FASHION = Path("/usr/share/datasets/fashion-mnist")


def harness(*args: str, cwd: Path):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"harness {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    run_dir = next(Path(line.split(":", 1)[1].strip())
                   for line in reversed(done.stdout.splitlines()) if line.startswith("run dir:"))
    return run_dir, wall


def replay_pair(common: list, work: Path) -> dict:
    """Train a run, replay it straight after; the replay's overhead against that run."""
    original, train_wall = harness("train", *common, cwd=work)
    replayed, replay_wall = harness("replay", str(original), cwd=work)
    record = json.loads((replayed / "replay.json").read_text())
    overhead = replay_wall - record["timing"]["train_s"]
    return {"original": str(original), "replay": str(replayed), "verdict": record["verdict"],
            "train_wall_s": round(train_wall, 3), "replay_wall_s": round(replay_wall, 3),
            "replay_split_s": record["timing"], "overhead_s": round(overhead, 3),
            "ratio": round(overhead / train_wall, 4)}


def gate_seconds(original: Path, repeat: int, cold: bool = False) -> list:
    """Seconds per replay gate on `original`, called here as `harness replay` calls it;
    `cold`: with HARNESS_REHASH=1, so the environment is captured afresh each time (the
    first replay after the interpreter, packages, machine or harness changed)."""
    if cold:
        os.environ["HARNESS_REHASH"] = "1"
    try:
        return _gate_seconds(original, repeat)
    finally:
        os.environ.pop("HARNESS_REHASH", None)


def _gate_seconds(original: Path, repeat: int) -> list:
    from harness.commands import replay
    from harness.record import gate

    def call():
        run_dir, lock, cfg = replay.load_original(str(original), original.parent)
        here, _ = replay.captured(run_dir, lock, cfg)
        current, skip = replay.current_environment(cfg, here)
        gate.gate(lock, current, skip)

    return timed(call, repeat)


def compare_seconds(original: Path, replayed: Path, repeat: int) -> list:
    """Seconds per bitwise comparison of a run and its replay (lockfiles read included)."""
    from harness import rundir
    from harness.record import bitwise, lockfile

    def call():
        bitwise.compare_runs(original, replayed, lockfile.read(original / rundir.LOCK),
                             lockfile.read(replayed / rundir.LOCK))

    return timed(call, repeat)


def replay_figures(common: list, work: Path, pairs: int, repeat: int) -> dict:
    runs = [replay_pair(common, work) for _ in range(pairs)]
    original, replayed = Path(runs[0]["original"]), Path(runs[0]["replay"])
    gate_s = summary(gate_seconds(original, repeat))
    gate_cold_s = summary(gate_seconds(original, repeat, cold=True))
    compare_s = summary(compare_seconds(original, replayed, repeat))
    ratio = summary([r["ratio"] for r in runs])
    return {
        "verdicts": sorted({r["verdict"] for r in runs}),
        "fixed_cost_s": round(gate_s["median"] + compare_s["median"], 3),
        "gate_s": gate_s, "compare_s": compare_s,
        "fixed_cost_cold_s": round(gate_cold_s["median"] + compare_s["median"], 3),
        "gate_cold_s": gate_cold_s,
        "overhead_vs_original_paired": round(ratio["median"], 3),
        "overhead_vs_original_paired_spread": ratio,
        "pairs": runs,
    }


def fingerprint_figures(repeat: int) -> dict:
    """One fingerprint call on the bundled CNN, measured directly; per step at the default
    interval. A median of call times: it cannot come out negative."""
    import torch
    from hydra.utils import instantiate

    from harness.config import compose
    from harness.training.loop import tensor_digests

    torch.set_num_threads(2)
    bundled = compose("fashion_mnist", [])  # defaults live in the typed schema, not YAML
    model = instantiate(bundled["model"])
    every = bundled["trainer"]["fingerprint_every"]
    call_ms = summary([1000 * s for s in timed(lambda: tensor_digests(model.state_dict()),
                                                repeat)])
    return {"default_every": every, "digest_call_ms": call_ms,
            "fingerprints_per_step": 1 / every,
            "per_step_ms_default_interval": round(call_ms["median"] / every, 4)}


def op_trace_figures(repeat: int) -> dict:
    """The op trace of the first step (trainer.op_trace_steps=1): one traced training step
    of the bundled CNN (batch 64) against an untraced one, medians of several, and the
    trace's size on disk."""
    import torch
    from hydra.utils import instantiate

    from harness.config import compose
    from harness.training import op_tracer

    torch.set_num_threads(2)
    bundled = compose("fashion_mnist", [])
    model = instantiate(bundled["model"])
    optimizer = instantiate(bundled["optim"], params=model.parameters())
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step(tracer=None):
        optimizer.zero_grad(set_to_none=True)
        with tracer.step(1) if tracer else contextlib.nullcontext():
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()

    plain = summary([1000 * s for s in timed(step, repeat)])
    traced = summary([1000 * s for s in timed(lambda: step(op_tracer.Tracer(model, 1)),
                                              repeat)])
    tracer = op_tracer.Tracer(model, 1)
    step(tracer)
    with tempfile.TemporaryDirectory() as tmp:
        size = tracer.write(Path(tmp)).stat().st_size
    return {"plain_step_ms": plain, "traced_step_ms": traced,
            "traced_over_plain": round(traced["median"] / plain["median"], 2),
            "ops": len(tracer.ops), "size_kb": round(size / 1024, 1)}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=3, help="train + replay pairs")
    parser.add_argument("--repeat", type=int, default=5, help="in-process gate/compare calls")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in DIR")
    parser.add_argument("--quick", action="store_true", help="smoke test: 10 steps, 1 pair")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.pairs, args.repeat = 10, 1, 2
    return args


def main() -> int:
    args = arguments()
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"needs Debian's Fashion-MNIST in {FASHION}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="harness-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["fashion_mnist", "backend=local", f"trainer.max_steps={args.steps}",
              "trainer.eval_limit=2000", "--runs-dir", str(work / "runs")]
    load_start = os.getloadavg()[0]
    out = {
        "steps": args.steps,
        "replay": replay_figures(common, work, args.pairs, args.repeat),
        "fingerprint": fingerprint_figures(args.repeat * 40),
        "op_trace": op_trace_figures(args.repeat * 4),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_start": round(load_start, 2),
                    "load_avg_1m_end": round(os.getloadavg()[0], 2)},
    }
    if args.keep:
        out["runs_dir"] = str(work / "runs")
    else:
        shutil.rmtree(work)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
