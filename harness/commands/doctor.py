"""`harness doctor CONFIG [overrides]`: what each determinism setting costs and buys, on
this machine and this config.

For each setting — determinism strict, warn and off; strict with one thread against the
configured count; strict with the CPU kernels pinned (determinism.cpu_isa avx2, and
portable: the same bits on Intel and AMD) against native —
it trains two short prefixes of the config, one after the other, on the local backend
(the same machinery as `harness verify`, without its audit). It reports each setting's
throughput (optimizer steps per second over the training loop, from the lockfiles'
timing), whether its two runs are bitwise identical, and, from the warn runs, the
nondeterministic operations the model hits with the module that called them. It ends with
the cheapest setting that still reproduces here, as a table and as JSON
(RUNS/doctor-<time>.json). On a GPU host (trainer.device=cuda) the modes also cover cuDNN
and cuBLAS: strict and warn pin deterministic kernels with benchmark and TF32 off, off
lets cuDNN autotune.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness import config, rundir
from harness.commands import choices, verify
from harness.env import AUDIT, WATCH_NONDETERMINISM
from harness.errors import HarnessError
from harness.record import bitwise, lockfile, op_trace
from harness.training import nondeterminism
from harness.training.determinism import cpu_supports


def settings(cfg: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """(name, determinism overrides) of each setting to measure; strict first."""
    threads = cfg["determinism"]["threads"]
    found = [("strict", {"mode": "strict"}), ("warn", {"mode": "warn"}),
             ("off", {"mode": "off"})]
    if threads != 1:
        found.append(("strict, threads=1", {"mode": "strict", "threads": 1}))
    pin = pinnable_isa()
    if pin and cfg["determinism"]["cpu_isa"] == "native":
        found.append((f"strict, cpu_isa={pin}", {"mode": "strict", "cpu_isa": pin}))
        # What replaying on any x86-64 CPU, Intel or AMD, costs against native.
        found.append(("strict, cpu_isa=portable", {"mode": "strict", "cpu_isa": "portable"}))
    return found


def pinnable_isa() -> Optional[str]:
    """The most portable CPU pin this machine can run besides `default`: avx2 where the CPU
    has it (most x86 machines of the last decade), else none."""
    return "avx2" if cpu_supports("avx2", lockfile.capture_cpu()["isa_flags"]) else None


def variant(cfg: Dict[str, Any], changes: Dict[str, Any], steps: int) -> Dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg["determinism"].update(changes)
    cfg["backend"]["name"] = "local"
    trainer = cfg["trainer"]
    trainer["max_steps"] = min(steps, trainer["max_steps"] or steps)
    trainer["checkpoint_every"] = max(trainer["checkpoint_every"], trainer["max_steps"] + 1)
    trainer["op_trace_steps"] = min(trainer["max_steps"], DOCTOR_TRACED_STEPS)
    return config.validate(cfg)


DOCTOR_TRACED_STEPS = 2  # the ops each setting computes differently, from its first steps


def measure(name: str, cfg: Dict[str, Any], overrides: List[str],
            runs_dir: Path) -> Dict[str, Any]:
    """Two runs of one setting: throughput, identical or not, nondeterministic ops."""
    env = {AUDIT: "0", WATCH_NONDETERMINISM: "1"}
    try:
        dirs = verify.run_twice(cfg, overrides, runs_dir, parallel=False, env_extra=env)
    except HarnessError as exc:  # strict mode stops on an op without a deterministic kernel
        said = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in reversed(said) if "Error" in line), said[-1])
        return {"setting": name, "determinism": cfg["determinism"], "error": reason[:300],
                "steps_per_s": None, "steps_per_s_runs": [], "identical": False,
                "first_diverging_step": None, "nondeterministic_ops": [],
                "weights_sha256": None, "runs": []}
    locks = [lockfile.read(d / rundir.LOCK) for d in dirs]
    rates = [lock["results"]["steps"] / max(lock["timing"]["train_loop_s"], 1e-9)
             for lock in locks]
    report = bitwise.compare_runs(dirs[0], dirs[1], locks[0], locks[1])
    return {"setting": name, "determinism": cfg["determinism"],
            "steps": locks[0]["results"]["steps"],
            "steps_per_s": round(statistics.mean(rates), 2),
            "steps_per_s_runs": [round(r, 2) for r in rates],
            "identical": report["verdict"] == bitwise.IDENTICAL,
            "first_diverging_step": report["first_diverging_step"],
            "nondeterministic_ops": nondeterminism.read(dirs[0]),
            "weights_sha256": locks[0]["results"]["weights_sha256"],
            "runs": [d.name for d in dirs]}


def doctor(name: str, overrides: List[str], config_dir: Optional[Path] = None,
           runs_dir: Optional[Path] = None, steps: int = 50, as_json: bool = False) -> int:
    cfg = choices.compose(name, overrides, config_dir)
    runs_dir = runs_dir or rundir.default_runs_dir()
    chosen = settings(cfg)
    print(f"harness: doctor {name}: {len(chosen)} settings x 2 runs of {steps} steps "
          f"(seed {cfg['seed']}, device {cfg['trainer']['device']}, local backend)",
          flush=True)
    rows = []
    for label, changes in chosen:
        print(f"harness: doctor: {label} ...", flush=True)
        rows.append(measure(label, variant(cfg, changes, steps), overrides, runs_dir))
    ops_computing_differently(rows, runs_dir)
    report = summarize(name, overrides, rows)
    path = runs_dir / f"doctor-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    rundir.write_json(path, report)
    print(json.dumps(report, indent=2) if as_json else render(report))
    print(f"report: {path}", flush=True)
    return 0


def ops_computing_differently(rows: List[Dict[str, Any]], runs_dir: Path) -> None:
    """Per setting, the ops of the model that compute other bits than under the first
    setting that trained (strict, unless it stopped): same inputs, other outputs, in the
    traced first steps (harness/record/op_trace.py). Set as row["ops_computing_differently"]."""
    reference = next((row for row in rows if row["runs"]), None)
    trace = op_trace.read(runs_dir / reference["runs"][0]) if reference else None
    for row in rows:
        other = op_trace.read(runs_dir / row["runs"][0]) if row["runs"] else None
        if trace is None or other is None or row is reference:
            row["ops_computing_differently"] = None
            continue
        seen: List[str] = []
        for op in op_trace.kernel_differences(trace, other):
            where = f"{op['op']} ({op['phase']}) in {op['module']}"
            if where not in seen:
                seen.append(where)
        row["ops_computing_differently"] = seen


def summarize(name: str, overrides: List[str], rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    base, native = rows[0]["steps_per_s"], rows[0]["weights_sha256"]
    for row in rows:
        row["vs_strict"] = round(row["steps_per_s"] / base, 3) \
            if base and row["steps_per_s"] else None
        row["same_weights_as_strict"] = row["weights_sha256"] == native \
            if native and row["weights_sha256"] else None
    noise = noise_of(rows)
    cheapest = cheapest_reproducing(rows, noise)
    return {"config": name, "overrides": overrides, "settings": rows,
            "noise": round(noise, 3),
            "cheapest_reproducing": cheapest["setting"] if cheapest else None,
            "nondeterministic_ops": next((r["nondeterministic_ops"] for r in rows
                                          if r["setting"] == "warn"), [])}


def noise_of(rows: List[Dict[str, Any]]) -> float:
    """How far apart two runs of one setting are in throughput (relative): differences
    between settings smaller than this (and than 5 %) are not differences."""
    spreads = [abs(a - b) / max((a + b) / 2, 1e-9)
               for a, b in (r["steps_per_s_runs"] for r in rows if r["steps_per_s_runs"])]
    return max(0.05, 2 * statistics.median(spreads)) if spreads else 0.05


def cheapest_reproducing(rows: List[Dict[str, Any]], noise: float) -> Optional[Dict]:
    """The strictest setting (rows are in order of strictness, strict first) that
    reproduces here and is as fast as the fastest reproducing one, within the noise."""
    reproducing = [row for row in rows if row["identical"]]
    if not reproducing:
        return None
    fastest = max(row["steps_per_s"] for row in reproducing)
    return next(row for row in reproducing if row["steps_per_s"] >= fastest * (1 - noise))


def render(report: Dict[str, Any]) -> str:
    from harness.progress import table

    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    def verdict(row):
        if row.get("error"):
            error = row["error"].split("Error: ", 1)[-1]
            if " does not have a deterministic implementation" in error:
                return f"stops: {error.split(' does not')[0]} has no deterministic kernel"
            return "stops: " + error[:70]
        return "yes" if row["identical"] else f"NO (step {row['first_diverging_step']})"

    lines = [[r["setting"], cell(r["steps_per_s"], "{:.2f}"), cell(r["vs_strict"], "{:.3f}"),
              verdict(r), cell({True: "yes", False: "no"}.get(r["same_weights_as_strict"]),
                               "{}")] for r in report["settings"]]
    text = [table(lines, ["setting", "steps/s", "vs strict", "reproduces here",
                          "same result as strict"])]
    reference = next((r["setting"] for r in report["settings"] if r["runs"]), None)
    changed = [r for r in report["settings"] if r.get("ops_computing_differently")]
    text.append(f"\nops that compute other bits than under {reference} (identical inputs, "
                f"first {DOCTOR_TRACED_STEPS} steps):" + (" none" if not changed else ""))
    for row in changed:
        ops = row["ops_computing_differently"]
        text.append(f"  {row['setting']}: {'; '.join(ops[:6])}"
                    f"{f' (+{len(ops) - 6} more)' if len(ops) > 6 else ''}")
    ops = report["nondeterministic_ops"]
    text.append("\nnondeterministic operations the model hits (warn mode): " +
                ("none" if not ops else ""))
    for op in ops:
        text.append(f"  {op['operation']} in {op['module']} ({op['count']} time(s))")
    cheapest = report["cheapest_reproducing"]
    text.append(f"\ncheapest setting that reproduces here: {cheapest} (throughput "
                f"differences under {report['noise']:.0%} are run-to-run noise here)"
                if cheapest else
                "\nno setting reproduced here: see `harness verify` for where runs part")
    return "\n".join(text)
