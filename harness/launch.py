"""`harness train`: turn a config into a prepared run directory, launch it on a backend,
and record how it ended. Torch is not imported here; it loads in the training process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness import __version__, backends, config, data, lockfile, rundir
from harness.determinism import pinned_environment
from harness.errors import RunFailed


def train(name: str, overrides: List[str], config_dir: Optional[Path] = None,
          runs_dir: Optional[Path] = None) -> Path:
    cfg = config.compose(name, overrides, config_dir)
    return start(cfg, overrides, runs_dir)


def start(cfg: Dict[str, Any], overrides: List[str], runs_dir: Optional[Path] = None,
          lock_extra: Optional[Dict[str, Any]] = None) -> Path:
    """Launch a resolved config as a new run and wait for it. Returns the run directory;
    raises RunFailed (with the log path) when training did not succeed."""
    launched = time.time()
    backend = backends.get(cfg["backend"]["name"])
    # Data is located and verified before anything is written: a run that cannot start
    # leaves no run directory behind.
    data_root, data_files = data.prepare(cfg["data"])
    run_dir = rundir.create(runs_dir or rundir.default_runs_dir(), cfg["name"])
    prepare(run_dir, cfg, overrides, backend.name, data_root, data_files, launched, lock_extra)
    print(f"harness: run {run_dir.name} ({backend.name} backend) -> {run_dir}", flush=True)
    rundir.write_status(run_dir, "running", backend=backend.name, started_utc=rundir.now_utc(),
                        host_pid=os.getpid())
    handle = backend.launch(backends.LaunchSpec(
        run_dir=run_dir, env=pinned_environment(cfg["determinism"]), data_root=data_root))
    try:
        code = handle.wait()
    except KeyboardInterrupt:
        handle.stop()
        rundir.write_status(run_dir, "failed", exit_code=130, reason="interrupted",
                            finished_utc=rundir.now_utc())
        raise RunFailed(f"run {run_dir.name} interrupted; it is marked failed.") from None
    return finish(run_dir, code)


def prepare(run_dir: Path, cfg: Dict[str, Any], overrides: List[str], backend_name: str,
            data_root: Optional[Path], data_files: Dict, launched: float,
            lock_extra: Optional[Dict[str, Any]]) -> None:
    """Write config.yaml, overrides.txt and launch.json: the host's facts for the lockfile."""
    rundir.atomic_write_text(run_dir / rundir.CONFIG, config.to_yaml(cfg))
    rundir.atomic_write_text(run_dir / rundir.OVERRIDES, "".join(f"{o}\n" for o in overrides))
    config_sha = config.config_sha256(cfg)
    lock = {
        "schema": lockfile.SCHEMA,
        "run_id": run_dir.name,
        "created_utc": rundir.now_utc(),
        "harness": {"version": __version__, "source_sha256": lockfile.harness_source_sha256()},
        "config": cfg,
        "config_sha256": config_sha,
        "seed": cfg["seed"],
        "overrides": list(overrides),
        "backend": {"name": backend_name},
        "source": lockfile.capture_source(Path.cwd()),
        "data": {"name": cfg["data"].get("name"), "root": str(data_root) if data_root else None,
                 "files": data_files},
        **(lock_extra or {}),
    }
    rundir.write_json(run_dir / rundir.LAUNCH, {
        "launched_unix": launched, "config_sha256": config_sha, "lock": lock})


def finish(run_dir: Path, code: int) -> Path:
    lock_written = (run_dir / rundir.LOCK).exists()
    if code == 0 and lock_written:
        rundir.write_status(run_dir, "succeeded", exit_code=0, finished_utc=rundir.now_utc())
        print(f"harness: run {run_dir.name} succeeded", flush=True)
        print(f"run id:  {run_dir.name}\nrun dir: {run_dir}", flush=True)
        return run_dir
    reason = "no lockfile written" if code == 0 else f"exit code {code}"
    rundir.write_status(run_dir, "failed", exit_code=code or 1, reason=reason,
                        finished_utc=rundir.now_utc())
    raise RunFailed(f"run {run_dir.name} failed ({reason}); see {run_dir / rundir.LOG}")

