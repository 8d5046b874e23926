"""`harness submit CONFIG --backend slurm [-m] [overrides]`: prepare run directories on
the submitting host (resolved config, launch.json, data verified), render one batch
script and submit it: one job, or with `-m` one job array whose elements are normal runs
with their own run directories."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from harness import config, data, launch, rundir, sbatch, sweep
from harness.backends import slurm as slurm_backend
from harness.determinism import pinned_environment
from harness.errors import ConfigError, RunFailed

BACKENDS = ("slurm",)


def submit(name: str, overrides: List[str], backend: str = "slurm", multirun: bool = False,
           wait: bool = False, config_dir: Optional[Path] = None,
           runs_dir: Optional[Path] = None, command: Optional[List[str]] = None,
           inputs: Sequence[str] = (), outputs: Sequence[str] = ()) -> List[Path]:
    """Submit runs of config `name`; with `command`, runs of the user's command (as
    `harness run` does, in a batch job)."""
    if backend not in BACKENDS:
        raise ConfigError(f"harness submit: unknown backend '{backend}'; valid: "
                          f"{', '.join(BACKENDS)} (for local or docker runs use harness train)")
    slurm_backend.tool("sbatch")  # fail before preparing anything when Slurm is missing
    combos = sweep.expand(overrides) if multirun else [list(overrides)]
    cfgs = [config.compose(name, [f"backend={backend}", *combo], config_dir) for combo in combos]
    if command is not None and len(cfgs) > 1:
        raise ConfigError("a sweep (-m) of a command would run its tasks at once in one "
                          "working directory, writing the same output files: submit each "
                          "setting on its own.")
    if command is not None:
        cfgs = [launch.with_command(cfg, command, list(inputs), list(outputs)) for cfg in cfgs]
    elif config.is_script(cfgs[0]):
        raise ConfigError(f"config '{name}' runs a command: give it after `--` "
                          f"(harness submit {name} -- python train.py).")
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for key in ("backend", "determinism", "image"):
            if cfg[key] != first[key]:
                raise ConfigError(f"a job array shares one batch script: the sweep must not "
                                  f"change '{key}' (submit those separately)")
    launched = time.time()
    prepared = [(None, {}) if config.is_script(cfg) else data.prepare(cfg["data"])
                for cfg in cfgs]
    scripts = [{"script": launch.script_facts(cfg, backend)} if config.is_script(cfg) else {}
               for cfg in cfgs]
    image_facts = slurm_backend.job_image_facts(first)  # one image for the whole array
    runs_dir = runs_dir or rundir.default_runs_dir()
    run_dirs = []
    for cfg, combo, (data_root, data_files), script in zip(cfgs, combos, prepared, scripts):
        run_dir = rundir.create(runs_dir, cfg["name"])
        launch.prepare(run_dir, cfg, combo, backend, data_root, data_files, launched,
                       {**image_facts, **script})
        run_dirs.append(run_dir)
    slurm_cfg = slurm_backend.job_image(first["backend"]["slurm"], image_facts)
    spec = sbatch.JobSpec(
        job_name=f"harness-{first['name']}", run_dirs=run_dirs,
        data_roots=[root for root, _ in prepared], env=pinned_environment(first["determinism"]),
        slurm=slurm_cfg, device=first["trainer"]["device"], sandbox=first["backend"]["docker"],
        python=slurm_cfg.get("python") or sys.executable,
        log_dir=runs_dir.resolve() / ".slurm", job_env=sbatch.job_environment())
    text = sbatch.render(spec)
    if len(run_dirs) > 1:
        spec.log_dir.mkdir(parents=True, exist_ok=True)
    for run_dir in run_dirs:
        rundir.atomic_write_text(run_dir / sbatch.SCRIPT_NAME, text)
    script = run_dirs[0] / sbatch.SCRIPT_NAME
    try:
        job_id = slurm_backend.submit_script(script)
    except BaseException:  # whatever stopped the submission: no run may claim to be queued
        for run_dir in run_dirs:
            rundir.write_status(run_dir, "failed", backend=backend, reason="submission failed")
        raise
    array = len(run_dirs) > 1
    for index, run_dir in enumerate(run_dirs):
        rundir.write_status(run_dir, "queued", backend=backend, submitted_utc=rundir.now_utc(),
                            slurm_job_id=job_id, slurm_array_task_id=index if array else None,
                            slurm_state="PENDING", slurm_script=str(run_dir / sbatch.SCRIPT_NAME),
                            slurm_log=str(run_dir / sbatch.LOG_NAME))
    kind = f"job array {job_id} ({len(run_dirs)} tasks)" if array else f"job {job_id}"
    print(f"harness: submitted {kind}; script {script}", flush=True)
    for index, run_dir in enumerate(run_dirs):
        label = f"{job_id}_{index}" if array else job_id
        print(f"harness: run {run_dir.name} = Slurm {label}: {' '.join(combos[index])}",
              flush=True)
    if array:
        record = {"sweep_id": rundir.new_run_id(f"{name}-sweep"), "config": name,
                  "overrides": overrides, "slurm_job_id": job_id,
                  "runs": [{"overrides": combo, "run_id": d.name, "state": "queued"}
                           for combo, d in zip(combos, run_dirs)]}
        path = sweep.save(runs_dir.resolve(), record)
        print(f"sweep id:   {record['sweep_id']}\nsweep file: {path}", flush=True)
    if wait:
        statuses = slurm_backend.wait(run_dirs, float(slurm_cfg.get("poll_s") or 2.0))
        failed = [(d, s) for d, s in zip(run_dirs, statuses) if s["state"] != "succeeded"]
        if failed:
            raise RunFailed("Slurm job(s) failed:\n" + "\n".join(
                slurm_backend.failure_message(d, s) for d, s in failed))
        print(f"harness: all {len(run_dirs)} run(s) succeeded", flush=True)
    for run_dir in run_dirs:
        print(f"run dir: {run_dir}", flush=True)
    return run_dirs


def status(refs: List[str], runs_dir: Optional[Path] = None, wait: bool = False) -> int:
    """`harness slurm status RUN...`: ask the scheduler, update status.json, print."""
    run_dirs = [rundir.resolve(ref, runs_dir) for ref in refs]
    for run_dir in run_dirs:
        if rundir.read_json(run_dir / rundir.STATUS).get("slurm_job_id") is None:
            raise ConfigError(f"run {run_dir.name} was not submitted to Slurm (no slurm_job_id "
                              f"in its status.json)")
    statuses = (slurm_backend.wait(run_dirs, quiet=True) if wait
                else [slurm_backend.update(d) for d in run_dirs])
    for run_dir, st in zip(run_dirs, statuses):
        print(f"{run_dir.name}  job {slurm_backend.job_ref(st)}  {st['state']}  "
              f"(Slurm {st.get('slurm_state')}, restarts {st.get('slurm_restarts', 0)})")
    failed = [(d, s) for d, s in zip(run_dirs, statuses) if s["state"] == "failed"]
    if failed:
        raise RunFailed("\n".join(slurm_backend.failure_message(d, s) for d, s in failed))
    return 0
