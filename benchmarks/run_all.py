"""`make bench`: run every benchmark, merge their JSON into benchmarks/results.json and
write the table in benchmarks/README.md. Each comparison is a ratio measured in one run.

    .venv/bin/python benchmarks/run_all.py [--skip container]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
SCRIPTS = {
    "core": ["core.py", "--accuracy"],
    "container": ["container.py"],
    "checkpoint": ["checkpoint_cost.py"],
    "replay": ["replay_overhead.py"],
    "images": ["images.py"],
    "data_parallel": ["data_parallel.py"],
    "tracking": ["tracking.py"],
    "cpu_modes": ["cpu_modes.py"],
}


def last_json(stdout: str) -> dict:
    """The JSON object a benchmark prints last (it may print progress before it)."""
    start = stdout.rfind("\n{") + 1 if not stdout.startswith("{") else 0
    return json.loads(stdout[start:])


def get(data: dict, path: str):
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


# (figure, results.json path, unit, target). A figure that is the median of several
# samples (pair ratios, per-run values) has their spread (spread.summary) at its path +
# "_spread", shown after the value.
TABLE = [
    ("default fashion_mnist test accuracy (3 epochs)", "core.accuracy.test_accuracy", "", ">= 0.915"),
    ("time to first step, local backend", "core.time_to_first_step.median_s", "s", "< 5"),
    ("harness overhead vs bare loop", "core.overhead.overhead_pct", "%", "< 3"),
    ("harness bookkeeping per step (in-process)", "core.overhead.bookkeeping.per_step_ms", "ms", ""),
    ("harness bookkeeping, fraction of loop time (in-process)",
     "core.overhead.bookkeeping.fraction_of_loop", "", ""),
    ("throughput strict / determinism off", "core.determinism.strict_over_off_throughput", "x", ""),
    ("lockfile capture (software+hardware)", "core.lockfile_capture.capture_s", "s", ""),
    ("per-sample seeding of augmentation randomness, per sample (in-process)",
     "core.sample_seeding.per_sample_us", "us", ""),
    ("container vs bare steps/s", "container.container_vs_bare_ratio", "x", ">= 0.97"),
    ("container start to first step", "container.container_start_to_first_step_s", "s", "< 4"),
    ("cached image build", "container.cached_build_s", "s", "< 2"),
    ("cpu image: cold build (no cache)", "images.cpu.cold_build_s", "s", "<= 86"),
    ("cpu image: rebuilt to the same id", "images.cpu.same_id_twice", "", "True"),
    ("cpu image: size", "images.cpu.image_size_gb", "GB", ""),
    ("cuda image: cold build (no cache)", "images.cuda.cold_build_s", "s", "<= 359"),
    ("cuda image: rebuilt to the same id", "images.cuda.same_id_twice", "", "True"),
    ("cuda image: size", "images.cuda.image_size_gb", "GB", "<= 6"),
    ("cuda image: cached build", "images.cuda.cached_build_s", "s", "<= 2"),
    ("cuda image: container start to first step (CPU run)",
     "images.cuda.container_start_to_first_step_s", "s", "<= 5"),
    ("checkpoint write", "checkpoint.checkpoint_write_s", "s", "< 0.2"),
    ("checkpointing cost at default interval (fraction)", "checkpoint.overhead_fraction", "", "< 0.02"),
    ("resume to first step", "checkpoint.resume_to_first_step_s", "s", "< 5"),
    ("checkpoint write / torch.save, 120 M parameters, on disk", "checkpoint.scale.120M.save_over_torch_save.median", "x", "<= 1.1"),
    ("checkpoint write / torch.save, 50 M parameters, in memory", "checkpoint.scale_in_memory.50M.save_over_torch_save.median", "x", "<= 1.1"),
    ("replay fixed cost: gate + comparison (in-process)", "replay.replay.fixed_cost_s", "s", "<= 1"),
    ("replay fixed cost, environment captured afresh (HARNESS_REHASH=1)",
     "replay.replay.fixed_cost_cold_s", "s", ""),
    ("replay overhead vs original training, 300-step run (fraction)",
     "replay.replay.overhead_vs_original_paired", "", "< 0.05"),
    ("fingerprint cost per step at default interval", "replay.fingerprint.per_step_ms_default_interval", "ms", ""),
    ("op trace: the traced first step over an untraced step", "replay.op_trace.traced_over_plain", "x", ""),
    ("op trace of one step: size on disk", "replay.op_trace.size_kb", "KB", ""),
    ("2 ranks × 1 thread over 1 rank × 2 threads, samples/s (global batch 64)",
     "data_parallel.two_ranks_over_one_throughput", "x", ">= 0.9"),
    ("2 ranks: share of a bare 2-rank loop's time lost to the gradient all-reduce",
     "data_parallel.allreduce_share", "", ""),
    ("2 ranks: two runs give the same weights", "data_parallel.repeat_identical.2.identical", "", "True"),
    ("3 ranks: two runs give the same weights", "data_parallel.repeat_identical.3.identical", "", "True"),
    ("4 ranks: two runs give the same weights", "data_parallel.repeat_identical.4.identical", "", "True"),
    ("tracker=mlflow (live, real server): per-step training time over tracker=none, minus 1",
     "tracking.mlflow_step_cost", "", "<= 0.02"),
    ("tracker=mlflow: time added after the training ends (artifacts, last metrics)",
     "tracking.mlflow_end_s", "s", ""),
    ("cpu_isa=portable over native, steps/s (bundled config, on cpu_modes.machine_class)",
     "cpu_modes.portable.over_native", "x", ">= 0.7"),
    ("cpu_isa=avx2 over native, steps/s (same machine)", "cpu_modes.avx2.over_native", "x", ""),
]


def spread_text(spread) -> str:
    if not isinstance(spread, dict):
        return ""
    return f" (range {spread['min']} to {spread['max']}, n={spread['n']})"


def render(results: dict) -> str:
    rows = ["| figure | value | target |", "|---|---|---|"]
    for label, path, unit, target in TABLE:
        value = get(results, path)
        shown = "not measured" if value is None else f"{value}{(' ' + unit) if unit else ''}"
        if value is not None:
            shown += spread_text(get(results, path + "_spread"))
        rows.append(f"| {label} | {shown} | {target} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(SCRIPTS))
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name, command in SCRIPTS.items():
        if name in args.skip:
            continue
        print(f"bench: {name} ...", flush=True)
        started = time.time()
        done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench: {name} failed:\n{done.stderr[-3000:]}")
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else results
        results[name] = last_json(done.stdout)
        results[name]["wall_s"] = round(time.time() - started, 1)
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else ""
    marker = "<!-- table -->"
    head = text.split(marker)[0] if marker in text else text
    readme.write_text(head + marker + "\n" + render(results) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
