"""`make bench`: run every benchmark, merge their JSON into benchmarks/results.json and
write the table in benchmarks/README.md. Each comparison is a ratio measured in one run.

    .venv/bin/python benchmarks/run_all.py [--skip container]
    .venv/bin/python benchmarks/run_all.py --quick [--results PATH]
    .venv/bin/python benchmarks/run_all.py --table     # the README table from results.json

--quick runs every script in its smoke-test mode (tiny runs, no cold image builds) to show
that each still runs and writes its figures; their values mean nothing. It leaves
benchmarks/results.json and README.md alone, writes what it got to --results, and exits 1
when a figure of the table is missing that the quick mode measures (all but QUICK_SKIPS).
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
    "scale": ["scale.py"],
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
    ("checkpoint write / torch.save, 350 M parameters, on disk", "scale.models.350M.checkpoint_save.median", "x", "<= 1.1"),
    ("checkpoint load (verified) / torch.load, 350 M parameters", "scale.models.350M.checkpoint_load.median", "x", "<= 1.1"),
    ("parameter fingerprint per step at the default interval, 350 M (fraction of a step)", "scale.models.350M.fingerprint_per_step_default", "", "<= 0.02"),
    ("peak RSS of the scale benchmark at 350 M parameters (state 4.2 GB)", "scale.models.350M.peak_rss_gb", "GB", ""),
    ("launch: hashing an unchanged 10 GB input again", "scale.data.10GB.launch_s", "s", "<= 1"),
    ("launch: hashing an unchanged input of 1 M small files again", "scale.data.1000000files.launch_s", "s", "<= 1"),
    ("full hash pass over 10 GB / reading it", "scale.data.10GB.full_pass", "x", "<= 1.1"),
]


# Figures the --quick mode does not measure: the full-config accuracy, the image builds
# that take minutes (cold builds, the CUDA image), 3 and 4 ranks, the large scales (the
# quick scale run measures 1 M parameters, 10 MB and 1000 files).
QUICK_SKIPS = ("core.accuracy.", "images.cpu.cold_build_s", "images.cpu.same_id_twice",
               "images.cpu.image_size_gb", "images.cuda.", "data_parallel.repeat_identical.3.",
               "data_parallel.repeat_identical.4.", "checkpoint.scale.",
               "checkpoint.scale_in_memory.", "scale.")


def missing_figures(results: dict, skipped: list) -> list:
    """The table's figures a --quick run should have measured and did not (those of the
    scripts it skipped, and QUICK_SKIPS, aside)."""
    return [label for label, path, _, _ in TABLE
            if get(results, path) is None and path.split(".")[0] not in skipped and
            not any(path.startswith(skip) for skip in QUICK_SKIPS)]


def spread_text(spread) -> str:
    if not isinstance(spread, dict):
        return ""
    return f" (range {spread['min']} to {spread['max']}, n={spread['n']})"


def grows_as(values: list) -> str:
    """The shape of a row across sizes, for the scale table."""
    values = [v for v in values if isinstance(v, (int, float))]
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    if high <= 1.5 * low or high - low < 0.05:
        return "flat"
    return "rises" if values[-1] > values[0] else "falls"


def render_scale(scale: dict) -> str:
    """The costs against model and data size (benchmarks/scale.py), one column per size."""
    models = dict(sorted(scale.get("models", {}).items(),
                         key=lambda item: item[1]["parameters"]))
    data = dict(sorted(scale.get("data", {}).items(),  # files by size, then the small files
                       key=lambda item: (item[0].endswith("files"),
                                         float(item[0].rstrip("GBfiles") or 0))))
    rows = []
    if models:
        rows += ["| cost / its bare counterpart | " + " | ".join(models) + " | grows as |",
                 "|---" * (len(models) + 2) + "|"]
        for label, key in (("checkpoint.save / torch.save (disk, fsync)", "checkpoint_save"),
                           ("checkpoint.load (verified) / torch.load", "checkpoint_load"),
                           ("one fingerprint / one training step", "fingerprint_step")):
            values = [m[key]["median"] for m in models.values()]
            rows.append(f"| {label} | " + " | ".join(map(str, values)) +
                        f" | {grows_as(values)} |")
        for label, key in (("fingerprint per step at the default interval", "fingerprint_per_step_default"),
                           ("peak RSS, GB", "peak_rss_gb")):
            values = [m[key] for m in models.values()]
            rows.append(f"| {label} | " + " | ".join(map(str, values)) +
                        f" | {grows_as(values)} |")
    if data:
        rows += ["", "| data | " + " | ".join(data) + " | grows as (GB files) |",
                 "|---" * (len(data) + 2) + "|"]
        for label, key in (("launch: unchanged input hashed again, s", "launch_s"),
                           ("full hash pass / reading the bytes", "full_pass")):
            values = [d[key] for d in data.values()]
            by_size = [d[key] for name, d in data.items() if name.endswith("GB")]
            rows.append(f"| {label} | " + " | ".join(map(str, values)) +
                        f" | {grows_as(by_size)} |")
    return "\n".join(rows)


def render(results: dict) -> str:
    rows = ["| figure | value | target |", "|---|---|---|"]
    for label, path, unit, target in TABLE:
        value = get(results, path)
        shown = "not measured" if value is None else f"{value}{(' ' + unit) if unit else ''}"
        if value is not None:
            shown += spread_text(get(results, path + "_spread"))
        rows.append(f"| {label} | {shown} | {target} |")
    return "\n".join(rows)


def run(name: str, command: list, quick: bool) -> dict:
    print(f"bench: {name} ...", flush=True)
    started = time.time()
    arguments = [a for a in command[1:] if not (quick and a == "--accuracy")]
    done = subprocess.run([sys.executable, str(HERE / command[0]), *arguments,
                           *(["--quick"] if quick else [])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: {name} failed:\n{done.stderr[-3000:]}")
    result = last_json(done.stdout)
    result["wall_s"] = round(time.time() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(SCRIPTS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke test of every script; results.json and README untouched")
    parser.add_argument("--results", type=Path, default=None,
                        help="where --quick writes what it got (default: nowhere)")
    parser.add_argument("--table", action="store_true",
                        help="only write the README table from results.json (after a "
                             "script was run on its own)")
    args = parser.parse_args()
    if args.quick:
        results = {name: run(name, command, quick=True)
                   for name, command in SCRIPTS.items() if name not in args.skip}
        if args.results:
            args.results.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        missing = missing_figures(results, args.skip)
        print(json.dumps({"scripts": sorted(results), "missing_figures": missing}, indent=2))
        raise SystemExit(1 if missing else 0)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name, command in SCRIPTS.items():
        if name in args.skip or args.table:
            continue
        fresh = run(name, command, quick=False)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else results
        results[name] = fresh
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else ""
    marker = "<!-- table -->"
    head = text.split(marker)[0] if marker in text else text
    scale = render_scale(results.get("scale", {}))
    readme.write_text(head + marker + "\n" + render(results) + "\n" +
                      (f"\nScale (benchmarks/scale.py, curves in scale.png):\n\n{scale}\n"
                       if scale else ""))


if __name__ == "__main__":
    main()
