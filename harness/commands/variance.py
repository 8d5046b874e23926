"""`harness variance CONFIG [-n N] [--sources init,order,augment,dropout,kernel]`: how much
of the spread of a result each source of randomness causes.

For each source, N runs that differ only in that source's seed (`seeds.<source>`, every
other source held at one value) - or, for `kernel`, N runs with every seed held and
determinism off, so that only the kernels' own nondeterminism can differ - then, per
source, the spread of the final metrics: mean, std and a 95 % t interval
(harness/record/stats.py), and a PNG with one strip of points per source. Only a harness that
repeats bit for bit can do this: with everything else fixed, the whole spread of a strip is
that one source's doing.

The runs are a sweep (runs/sweeps/<id>.json, with `variance` and each run's `source`), so
`harness runs` lists them and the record says which run varied what.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness import rundir
from harness.commands import choices, sweep
from harness.errors import ConfigError, HarnessError
from harness.record import stats
from harness.training import seeding

DEFAULT_RUNS = 5
# Not a seed: the kernels' own nondeterminism (atomics in GPU reductions, cuDNN's autotuned
# algorithms). Its runs hold every seed and turn determinism off; on a CPU they usually
# repeat bit for bit, and the report says so.
KERNEL = "kernel"
SOURCES = (*seeding.SOURCES, KERNEL)


def parse_sources(text: str) -> List[str]:
    sources = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        named = ", ".join(unknown) or "(none)"
        raise ConfigError(f"--sources {text!r}: unknown source(s) {named}; "
                          f"choose from {','.join(SOURCES)}.")
    return list(dict.fromkeys(sources))


def plan(cfg: Dict[str, Any], sources: List[str], n: int) -> List[Dict[str, Any]]:
    """The runs: per source, n values of its seed; every other source held at its value
    for the run's seed (dropout held explicitly, so that varying init does not move it)."""
    held = seeding.source_seeds(cfg)
    held["dropout"] = cfg["seed"] if held["dropout"] is None else held["dropout"]
    runs = []
    for source in sources:
        for index in range(n):
            if source == KERNEL:  # the same seeds n times, determinism off
                runs.append({"source": source, "value": index, "overrides": [
                    *(f"++seeds.{k}={v}" for k, v in held.items()), "determinism=off"]})
                continue
            value = seeding.stream_seed(cfg["seed"], "variance", source, index) \
                % seeding.SEED_LIMIT
            seeds = {**held, source: value}
            runs.append({"source": source, "value": value,
                         "overrides": [f"++seeds.{k}={v}" for k, v in seeds.items()]})
    return runs


def prepare(name: str, overrides: List[str], sources: List[str], n: int,
            config_dir: Optional[Path]):
    """(the planned runs, each with its full overrides: the given ones, the seed fixed, and
    its seeds; a new record)."""
    if n < 2:
        raise ConfigError(f"-n {n}: a spread needs at least 2 runs per source.")
    base = choices.compose(name, overrides, config_dir)
    if not any(o.lstrip("+").startswith("seed=") for o in overrides):
        overrides = [*overrides, f"seed={base['seed']}"]  # a drawn seed: the same for all
    record: Dict[str, Any] = {
        "sweep_id": rundir.new_run_id(f"{name}-variance"), "config": name,
        "overrides": overrides, "variance": {"sources": sources, "n": n}, "runs": []}
    print(f"harness: variance {record['sweep_id']}: {len(sources)} source(s) × {n} runs",
          flush=True)
    planned = [{**p, "overrides": [*given(overrides, p["source"]), *p["overrides"]]}
               for p in plan(base, sources, n)]
    return planned, record


def given(overrides: List[str], source: str) -> List[str]:
    """The user's overrides for a run varying `source`: a kernel run sets determinism=off
    itself, in place of the user's choice of the group."""
    if source != KERNEL:
        return overrides
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "determinism"]


def label(entry: Dict[str, Any]) -> str:
    if entry["source"] == KERNEL:
        return f"kernel run {entry['value'] + 1} (determinism=off)"
    return f"seeds.{entry['source']}={entry['value']}"


def submit(name: str, overrides: List[str], sources: List[str], n: int,
           config_dir: Optional[Path], runs_dir: Optional[Path], wait: bool) -> Path:
    """All planned runs as one Slurm job array; with `wait`, until they end."""
    from harness.commands.submit import submit_combos, wait_all

    runs_dir = (runs_dir or rundir.default_runs_dir()).resolve()
    planned, record = prepare(name, overrides, sources, n, config_dir)
    run_dirs, job_id, cfgs = submit_combos(
        name, [p["overrides"] for p in planned], "slurm", config_dir, runs_dir)
    record["slurm_job_id"] = job_id
    record["runs"] = [{**p, "run_id": d.name, "state": "queued"}
                      for p, d in zip(planned, run_dirs)]
    path = sweep.save(runs_dir, record)
    print(f"variance id:   {record['sweep_id']}\nvariance file: {path}", flush=True)
    if wait:
        wait_all(run_dirs, float(cfgs[0]["backend"]["slurm"].get("poll_s") or 2.0))
    return path


def run(name: str, overrides: List[str], sources: List[str], n: int,
        config_dir: Optional[Path], runs_dir: Optional[Path]) -> Path:
    """Run every planned run in sequence; returns the record's path."""
    planned, record = prepare(name, overrides, sources, n, config_dir)
    return sweep.run_in_sequence(name, record, planned, config_dir, runs_dir, kind="variance",
                                 label=label)


def report(path: Path) -> Dict[str, Any]:
    """Per source: the metrics of its runs (one point per run) and their spread."""
    from harness.record import lockfile

    record = json.loads(path.read_text())
    if "variance" not in record:
        raise ConfigError(f"{path} is a sweep, not a variance record: `harness summary "
                          f"{record['sweep_id']}` reports it.")
    runs_dir = path.parent.parent
    points: Dict[str, Dict[str, List[float]]] = {}
    for entry in record["runs"]:
        lock_path = runs_dir / str(entry.get("run_id")) / rundir.LOCK
        if entry.get("run_id") and lock_path.exists():
            results = lockfile.read(lock_path)["results"]
            source = points.setdefault(entry["source"], {m: [] for m, _ in sweep.METRICS})
            for metric, _ in sweep.METRICS:
                source[metric].append(results[metric])
    if not points:
        raise HarnessError(f"no run of variance {record['sweep_id']} has finished (none has a "
                           f"lockfile); nothing to report yet. `harness runs` shows their "
                           f"states.")
    return {"variance_id": record["sweep_id"], "config": record["config"],
            "points": points,
            "sources": {source: {m: stats.summarize(v).__dict__ for m, v in values.items()}
                        for source, values in points.items()}}


def render(result: Dict[str, Any]) -> str:
    lines = [f"variance {result['variance_id']} (config {result['config']}): the spread each "
             f"source of randomness causes alone"]
    for metric, label in sweep.METRICS:
        lines.append(f"\n{label}")
        for source, metrics in result["sources"].items():
            s = metrics[metric]
            spread = (f"std {s['std']:.4f}  95% CI [{s['ci_low']:.4f}, {s['ci_high']:.4f}]"
                      if s["std"] is not None else "(one run: no spread)")
            lines.append(f"  {source:<8} n={s['n']}  mean {s['mean']:.4f}  {spread}")
    unmoved = [source for source, values in result["points"].items()
               if all(len(set(v)) == 1 for v in values.values()) and len(values["final_loss"]) > 1]
    if unmoved:
        lines.append(f"\n{', '.join(unmoved)}: every run gave the same bits; this source does "
                     f"not touch the result (e.g. augment for a dataset that draws no "
                     f"randomness, dropout for a model without dropout, kernel where the "
                     f"kernels repeat even with determinism off, as on most CPUs).")
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: Path) -> Path:
    """One strip of points per source and metric. The plotted values are stored in the
    PNG's `harness-variance` text chunk, so the picture can be checked against them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(result["points"])
    fig, axes = plt.subplots(1, len(sweep.METRICS), figsize=(6 * len(sweep.METRICS), 4))
    for ax, (metric, label) in zip(axes, sweep.METRICS):
        for position, source in enumerate(sources):
            values = result["points"][source][metric]
            ax.scatter([position] * len(values), values, alpha=0.7)
            ax.boxplot([values], positions=[position], widths=0.4, showfliers=False)
        ax.set_xticks(range(len(sources)), sources)
        ax.set(xlabel="source varied alone", ylabel=label, title=label)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"harness-variance": json.dumps(result["points"])})
    plt.close(fig)
    tmp.replace(path)
    return path
