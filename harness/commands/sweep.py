"""Sweeps: `harness train CONFIG -m seed=0,1,2 optim.lr=0.001,0.002` expands Hydra's sweep
grammar into one run per combination, runs them in sequence, and records them in
`runs/sweeps/<sweep-id>.json`. `harness summary SWEEP` groups the runs into configurations
(everything but the seed) and reports seed statistics per configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from harness import config, rundir
from harness.commands import choices
from harness.errors import ConfigError, HarnessError, RunFailed
from harness.record import stats

SWEEPS = "sweeps"
METRICS = (("test_accuracy", "accuracy"), ("final_loss", "final loss"))
HIGHER_IS_BETTER = ("test_accuracy",)  # for the others (a loss) lower is better


def expand(overrides: List[str]) -> List[List[str]]:
    """Every combination of the sweep overrides (Hydra's basic sweeper semantics)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    config.check_override_syntax(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as exc:
        raise ConfigError(f"cannot expand sweep {' '.join(overrides)}: {exc}") from None
    return [list(combo) for batch in batches for combo in batch]


def sweep_path(runs_dir: Path, sweep_id: str) -> Path:
    return runs_dir / SWEEPS / f"{sweep_id}.json"


def run(name: str, overrides: List[str], config_dir: Optional[Path],
        runs_dir: Optional[Path]) -> Path:
    """Run every combination in sequence; returns the sweep record. A failed run is
    recorded and the sweep goes on; the sweep fails at the end if any run failed."""
    combos = expand(overrides)
    sweep_id = rundir.new_run_id(f"{name}-sweep")
    record: Dict[str, Any] = {"sweep_id": sweep_id, "config": name, "overrides": overrides,
                              "runs": []}
    print(f"harness: sweep {sweep_id}: {len(combos)} runs", flush=True)
    return run_in_sequence(name, record, [{"overrides": combo} for combo in combos],
                           config_dir, runs_dir)


def run_in_sequence(name: str, record: Dict[str, Any], entries: List[Dict[str, Any]],
                    config_dir: Optional[Path], runs_dir: Optional[Path], kind: str = "sweep",
                    label: Callable[[Dict[str, Any]], str] = lambda e: " ".join(e["overrides"])
                    ) -> Path:
    """Run `entries` (each with its full `overrides`) one after another, each recorded in
    `record.runs` with its run id and state, the record saved after every run. A failed
    run is recorded and the rest go on; RunFailed at the end if any failed."""
    from harness.commands import train

    runs_dir = (runs_dir or rundir.default_runs_dir()).resolve()
    # Compose them all first: a typo in the last combination should not surface an hour in.
    configs = [choices.compose(name, entry["overrides"], config_dir) for entry in entries]
    for index, (entry, cfg) in enumerate(zip(entries, configs), start=1):
        print(f"harness: {kind} run {index}/{len(entries)}: {label(entry)}", flush=True)
        result = {**entry, "run_id": None, "state": "failed"}
        try:
            run_dir = train.start(cfg, entry["overrides"], runs_dir)
            result.update(run_id=run_dir.name, state="succeeded")
        except RunFailed as exc:
            result["error"] = str(exc)
            print(f"harness: {exc}", flush=True)
        record["runs"].append(result)
        path = save(runs_dir, record)
    failed = [r for r in record["runs"] if r["state"] != "succeeded"]
    print(f"{kind} id:   {record['sweep_id']}\n{kind} file: {path}", flush=True)
    if failed:
        raise RunFailed(f"{len(failed)} of {len(entries)} {kind} runs failed; see {path}")
    return path


def save(runs_dir: Path, record: Dict[str, Any]) -> Path:
    """Write the sweep record `runs/sweeps/<sweep-id>.json` (atomically)."""
    path = sweep_path(runs_dir, record["sweep_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json(path, record)
    return path


def resolve(ref: str, runs_dir: Optional[Path]) -> Path:
    """A sweep record from its id, a unique prefix, or a path."""
    if Path(ref).is_file():
        return Path(ref)
    directory = (runs_dir or rundir.default_runs_dir()) / SWEEPS
    matches = sorted(directory.glob(f"{ref}*.json")) if directory.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"no sweep '{ref}' in {directory}; a sweep is made by "
                          f"`harness train CONFIG -m seed=0,1,2`.")
    raise ConfigError(f"sweep prefix '{ref}' is ambiguous: "
                      + ", ".join(p.stem for p in matches[:5]))


def configuration_key(overrides: List[str]) -> str:
    """What identifies a configuration: the overrides other than the seed."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed"]
    return " ".join(sorted(kept)) or "(base config)"


def collect(record: Dict[str, Any], runs_dir: Path) -> Dict[str, Dict[str, List[float]]]:
    """{configuration: {metric: [value per seed]}} from the runs' lockfiles."""
    from harness.record import lockfile

    groups: Dict[str, Dict[str, List[float]]] = {}
    for entry in record["runs"]:
        # A run counts once it has its lockfile (a batch job finishes after the record
        # was written at submit time).
        lock_path = runs_dir / str(entry.get("run_id")) / rundir.LOCK
        if not entry.get("run_id") or not lock_path.exists():
            continue
        lock = lockfile.read(lock_path)
        group = groups.setdefault(configuration_key(entry["overrides"]),
                                  {m: [] for m, _ in METRICS})
        for metric, _ in METRICS:
            group[metric].append(lock["results"][metric])
    if not groups:
        raise HarnessError("no run of this sweep has finished (none has a lockfile); nothing "
                           "to summarise yet. `harness runs` shows their states.")
    return groups


def summary(ref: str, runs_dir: Optional[Path]) -> Dict[str, Any]:
    path = resolve(ref, runs_dir)
    record = json.loads(path.read_text())
    groups = collect(record, path.parent.parent)
    report: Dict[str, Any] = {"sweep_id": record["sweep_id"], "configurations": {}}
    for key, values in groups.items():
        report["configurations"][key] = {m: stats.summarize(v).__dict__ for m, v in values.items()}
    keys = list(groups)
    report["comparisons"] = [
        {"a": keys[0], "b": other,
         **{m: stats.compare(groups[keys[0]][m], groups[other][m]).__dict__ for m, _ in METRICS},
         "p_b_better": {m: stats.probability_of_improvement(
             groups[keys[0]][m], groups[other][m], higher_is_better=m in HIGHER_IS_BETTER
         ).__dict__ for m, _ in METRICS}}
        for other in keys[1:]]
    return report


def render(report: Dict[str, Any]) -> str:
    lines = [f"sweep {report['sweep_id']}"]
    for key, metrics in report["configurations"].items():
        lines.append(f"\n{key}")
        for metric, label in METRICS:
            s = metrics[metric]
            spread = (f"std {s['std']:.4f}  95% CI [{s['ci_low']:.4f}, {s['ci_high']:.4f}]"
                      if s["std"] is not None else "(one seed: no spread)")
            lines.append(f"  {label:<11} n={s['n']}  mean {s['mean']:.4f}  {spread}")
    for comp in report["comparisons"]:
        lines.append(f"\n{comp['b']}  vs  {comp['a']}")
        for metric, label in METRICS:
            d = comp[metric]
            if d["ci_low"] is None:
                lines.append(f"  {label:<11} diff {d['diff']:+.4f}  (need 2+ seeds per side)")
                continue
            verdict = "larger than seed noise" if d["beyond_noise"] else "within seed noise"
            lines.append(f"  {label:<11} diff {d['diff']:+.4f}  95% CI [{d['ci_low']:+.4f}, "
                         f"{d['ci_high']:+.4f}]  {verdict}")
        for metric, label in METRICS:
            p = comp.get("p_b_better", {}).get(metric)
            if p is None:
                continue
            noise = ("beyond the seed noise" if p["beyond_noise"] else
                     "inside the seed noise (the interval contains 50%)")
            lines.append(f"  P(better {label}) {p['p']:.0%}  95% CI [{p['ci_low']:.0%}, "
                         f"{p['ci_high']:.0%}]: a seed of this configuration beats one of "
                         f"{comp['a']!r} that often; {noise}")
    return "\n".join(lines)
