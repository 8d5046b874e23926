"""`harness submit CONFIG --backend slurm [-m] [overrides]`: prepare run directories on
the submitting host (resolved config, train.json, data verified) and hand them to the
batch backend as one batch: one job, or with `-m` one job array whose elements are normal
runs with their own run directories. The backend renders and submits the script
(SlurmBackend.submit, which `harness train backend=slurm` uses for its one job too)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness import backends, config, rundir
from harness.backends import slurm
from harness.backends.base import LaunchSpec
from harness.commands import choices, sweep, train
from harness.errors import ConfigError, RunFailed
from harness.record import tracking
from harness.training import datasets, distributed, perturb
from harness.training.determinism import pinned_environment


def submit(name: str, overrides: List[str], backend: str = "slurm", multirun: bool = False,
           wait: bool = False, config_dir: Optional[Path] = None,
           runs_dir: Optional[Path] = None, command: Optional[List[str]] = None,
           inputs: Sequence[str] = (), outputs: Sequence[str] = (),
           env: Sequence[str] = ()) -> List[Path]:
    """Submit runs of config `name` (with -m, one per sweep combination, as one job array)
    through the batch backend; with `command`, runs of the user's command (as `harness run`
    does, in a batch job)."""
    combos = sweep.expand(overrides) if multirun else [list(overrides)]
    runs_dir = runs_dir or rundir.default_runs_dir()
    run_dirs, job_id, cfgs = submit_combos(name, combos, backend, config_dir, runs_dir,
                                           command, inputs, outputs, env)
    if len(run_dirs) > 1:
        record_sweep(name, overrides, combos, run_dirs, job_id, runs_dir)
    if wait:
        wait_all(run_dirs, float(cfgs[0]["backend"]["slurm"].get("poll_s") or 2.0))
    for run_dir in run_dirs:
        print(f"run dir: {run_dir}", flush=True)
    return run_dirs


def submit_combos(name: str, combos: List[List[str]], backend: str,
                  config_dir: Optional[Path], runs_dir: Path,
                  command: Optional[List[str]] = None, inputs: Sequence[str] = (),
                  outputs: Sequence[str] = (), env: Sequence[str] = ()
                  ) -> Tuple[List[Path], str, List[Dict[str, Any]]]:
    """One run per combination of overrides, as one job (a job array for several):
    (run directories, job id, resolved configs)."""
    batch_backends = [name for name, cls in backends.classes().items() if cls.batch]
    if backend not in batch_backends:
        raise ConfigError(f"harness submit: unknown backend '{backend}'; valid: "
                          f"{', '.join(batch_backends)} (for local or docker runs use harness "
                          f"train)")
    batch = backends.get(backend)
    slurm.tool("sbatch")  # fail before preparing anything when Slurm is missing
    cfgs = compose_all(name, combos, backend, config_dir, command, inputs, outputs, env)
    trackers = {json.dumps(cfg.get("tracker"), sort_keys=True): cfg for cfg in cfgs}
    for cfg in trackers.values():  # each tracker answers, before anything is written
        tracking.check(cfg, runs_dir)
    specs = prepare_all(cfgs, combos, batch, runs_dir)
    run_dirs = [spec.run_dir for spec in specs]
    job_id = batch.submit(specs, log_dir=runs_dir.resolve() / ".slurm")
    array = len(run_dirs) > 1
    kind = f"job array {job_id} ({len(run_dirs)} tasks)" if array else f"job {job_id}"
    print(f"harness: submitted {kind}; script {run_dirs[0] / rundir.SLURM_SCRIPT}", flush=True)
    for index, run_dir in enumerate(run_dirs):
        label = f"{job_id}_{index}" if array else job_id
        print(f"harness: run {run_dir.name} = Slurm {label}: {' '.join(combos[index])}",
              flush=True)
    return run_dirs, job_id, cfgs


def compose_all(name: str, combos: List[List[str]], backend: str,
                config_dir: Optional[Path], command: Optional[List[str]],
                inputs: Sequence[str], outputs: Sequence[str],
                env: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """One resolved config per combination; those of a job array may differ only where
    its one batch script does not care."""
    cfgs = [choices.compose(name, [f"backend={backend}", *combo], config_dir) for combo in combos]
    if command is not None and len(cfgs) > 1:
        raise ConfigError("a sweep (-m) of a command would run its tasks at once in one "
                          "working directory, writing the same output files: submit each "
                          "setting on its own.")
    if command is not None:
        cfgs = [train.with_command(cfg, command, list(inputs), list(outputs), env)
                for cfg in cfgs]
    elif config.is_script(cfgs[0]):
        raise ConfigError(f"config '{name}' runs a command: give it after `--` "
                          f"(harness submit {name} -- python train.py).")
    for cfg in cfgs:
        distributed.check_world(cfg, backend)
    for cfg in cfgs[1:]:
        if distributed.world_size(cfg) != distributed.world_size(cfgs[0]):
            raise ConfigError("a job array shares one batch script: the sweep must not "
                              "change trainer.devices or trainer.nodes (submit those "
                              "separately)")
        for key in ("backend", "determinism", "image"):
            if cfg[key] != cfgs[0][key]:
                raise ConfigError(f"a job array shares one batch script: the sweep must not "
                                  f"change '{key}' (submit those separately)")
    return cfgs


def prepare_all(cfgs: List[Dict[str, Any]], combos: List[List[str]], batch,
                runs_dir: Path) -> List[LaunchSpec]:
    """Check data (or a command's inputs) and the image for every run first, then write
    their run directories: a submission that cannot start leaves none behind."""
    launched = time.time()
    prepared = [(None, {}) if config.is_script(cfg) else datasets.prepare(cfg["data"])
                for cfg in cfgs]
    scripts = [{"script": train.script_facts(cfg, batch.name)} if config.is_script(cfg)
               else {} for cfg in cfgs]
    confs = [config.typed(cfg) for cfg in cfgs]
    image_facts = batch.lock_facts(confs[0])  # one image for the whole array
    env = {**pinned_environment(cfgs[0]["determinism"]),
           **distributed.pinned_environment(cfgs[0]),
           **perturb.environment()}  # a negative control, where asked (harness/training/perturb.py)
    specs = []
    for cfg, conf, combo, (data_root, data_files), script in zip(cfgs, confs, combos, prepared,
                                                                scripts):
        run_dir = rundir.create(runs_dir, cfg["name"])
        host_facts = train.prepare(run_dir, cfg, combo, batch.name, data_root, data_files,
                                   launched, {**image_facts, **script})
        specs.append(LaunchSpec(run_dir=run_dir, conf=conf, lock=host_facts, env=env,
                                data_root=data_root))
    return specs


def record_sweep(name: str, overrides: List[str], combos: List[List[str]],
                 run_dirs: List[Path], job_id: str, runs_dir: Path) -> None:
    record = {"sweep_id": rundir.new_run_id(f"{name}-sweep"), "config": name,
              "overrides": overrides, "slurm_job_id": job_id,
              "runs": [{"overrides": combo, "run_id": d.name, "state": "queued"}
                       for combo, d in zip(combos, run_dirs)]}
    path = sweep.save(runs_dir.resolve(), record)
    print(f"sweep id:   {record['sweep_id']}\nsweep file: {path}", flush=True)


def wait_all(run_dirs: List[Path], poll_s: float) -> None:
    statuses = slurm.wait(run_dirs, poll_s)
    failed = [(d, s) for d, s in zip(run_dirs, statuses) if s["state"] != "succeeded"]
    if failed:
        raise RunFailed("Slurm job(s) failed:\n" + "\n".join(
            slurm.failure_message(d, s) for d, s in failed))
    print(f"harness: all {len(run_dirs)} run(s) succeeded", flush=True)


def status(refs: List[str], runs_dir: Optional[Path] = None, wait: bool = False) -> int:
    """`harness slurm status RUN...`: ask the scheduler, update status.json, print."""
    run_dirs = [rundir.resolve(ref, runs_dir) for ref in refs]
    for run_dir in run_dirs:
        if rundir.read_json(run_dir / rundir.STATUS).get("slurm_job_id") is None:
            raise ConfigError(f"run {run_dir.name} was not submitted to Slurm (no slurm_job_id "
                              f"in its status.json)")
    statuses = (slurm.wait(run_dirs, quiet=True) if wait
                else [slurm.update(d) for d in run_dirs])
    for run_dir, st in zip(run_dirs, statuses):
        print(f"{run_dir.name}  job {slurm.job_ref(st)}  {st['state']}  "
              f"(Slurm {st.get('slurm_state')}, restarts {st.get('slurm_restarts', 0)})")
    failed = [(d, s) for d, s in zip(run_dirs, statuses) if s["state"] == "failed"]
    if failed:
        raise RunFailed("\n".join(slurm.failure_message(d, s) for d, s in failed))
    return 0
