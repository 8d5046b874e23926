"""`harness train`: turn a config into a prepared run directory, launch it on a backend,
and record how it ended. Torch is not imported here; it loads in the training process."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness import backends, config, progress, rundir
from harness.commands import choices
from harness.env import AUDIT, PREFIX, PROGRESS_S
from harness.errors import (
    REQUEUE_EXIT,
    CheckpointRefused,
    ConfigError,
    DataError,
    EnvironmentProblem,
    HarnessError,
    Preempted,
    RunBusy,
    RunFailed,
)
from harness.host import gpu
from harness.record import gate, lockfile, tracking
from harness.training import datasets, distributed, perturb
from harness.training.determinism import pinned_environment

# Exit codes of the training process that are a user-facing error, passed on as such.
PASSED_ON = {error.exit_code: error
             for error in (ConfigError, DataError, EnvironmentProblem, CheckpointRefused)}


def train(name: str, overrides: List[str], config_dir: Optional[Path] = None,
          runs_dir: Optional[Path] = None) -> Path:
    cfg = choices.compose(name, overrides, config_dir)
    return start(cfg, overrides, runs_dir)


def run_command(name: str, overrides: List[str], argv: List[str], inputs: List[str],
                outputs: List[str], config_dir: Optional[Path] = None,
                runs_dir: Optional[Path] = None, env: Sequence[str] = ()) -> Path:
    """`harness run`: the user's command as a run of config `name` (default: run)."""
    cfg = with_command(choices.compose(name, overrides, config_dir), argv, inputs, outputs,
                       env)
    return start(cfg, overrides, runs_dir)


def with_command(cfg: Dict[str, Any], argv: List[str], inputs: List[str],
                 outputs: List[str], env: Sequence[str] = ()) -> Dict[str, Any]:
    """A composed command config with the command line's command, inputs, outputs and
    --env NAME[=VALUE] variables."""
    if not config.is_script(cfg):
        raise ConfigError(f"config '{cfg['name']}' trains the built-in loop (it has no "
                          f"`command` section): train it without a command, or use a config "
                          f"made for commands (the bundled `run`, or one that extends it).")
    cfg["command"].update(argv=list(argv), inputs=[*cfg["command"]["inputs"], *inputs],
                          outputs=[*cfg["command"]["outputs"], *outputs],
                          env={**cfg["command"].get("env", {}), **declared_env(env)})
    cfg = config.validate(cfg)
    check_declared_env(cfg)
    return cfg


def declared_env(items: Sequence[str]) -> Dict[str, str]:
    """--env NAME=VALUE, or --env NAME for this shell's value."""
    declared = {}
    for item in items:
        name, has_value, value = item.partition("=")
        if not has_value:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: {name} is not set in this shell. Give its "
                                  f"value: --env {name}=VALUE.")
            value = os.environ[name]
        declared[name] = value
    return declared


def check_declared_env(cfg: Dict[str, Any]) -> None:
    """A declared variable must be a name, and not one the harness sets itself."""
    import re

    from harness.training import determinism

    pinned = {**determinism.pinned_environment(cfg["determinism"]),
              **distributed.pinned_environment(cfg)}
    for name in cfg["command"]["env"]:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--env {name!r}: not a variable name (letters, digits and _, "
                              f"not starting with a digit), e.g. --env "
                              f"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1.")
        if name in pinned or name.startswith(PREFIX):
            raise ConfigError(f"--env {name}: the harness sets {name} itself (from the "
                              f"determinism settings); change those instead, e.g. "
                              f"determinism.threads for OMP_NUM_THREADS.")
        if name == "SOURCE_DATE_EPOCH":
            raise ConfigError("--env SOURCE_DATE_EPOCH: the harness sets it for every "
                              "command; give it as command.source_date_epoch=SECONDS.")


def source_date_epoch() -> int:
    """A new command run's SOURCE_DATE_EPOCH: this shell's, else now."""
    given = os.environ.get("SOURCE_DATE_EPOCH", "")
    if given.isdigit():
        return int(given)
    return int(time.time())


def start(cfg: Dict[str, Any], overrides: List[str], runs_dir: Optional[Path] = None,
          lock_extra: Optional[Dict[str, Any]] = None,
          backend_facts: Optional[Dict[str, Any]] = None) -> Path:
    """Launch a resolved config as a new run and wait for it. Returns the run directory;
    raises RunFailed (with the log path) when training did not succeed. `backend_facts`:
    the backend's lock facts where the caller has just asked for them (a replay's gate)."""
    launched = time.time()
    conf = config.typed(cfg)
    backend = backends.get(conf.backend.name, conf)
    distributed.check_world(cfg, backend.name)
    if str(cfg["trainer"]["device"]).startswith("cuda"):
        gpu.require_gpus(backend.name)  # before any data, image or run directory
    # Data (or a command's inputs) is located and verified before anything is written: a
    # run that cannot start leaves no run directory behind.
    if config.is_script(cfg):
        data_root, data_files = None, {}
        lock_extra = {"script": script_facts(cfg, backend.name), **(lock_extra or {})}
    else:
        data_root, data_files = datasets.prepare(cfg["data"])
    # A backend may add lock facts (docker: image and engine) and check that it can run
    # at all (engine up, image built, GPUs available) before anything is written.
    if backend_facts is None:
        backend_facts = backend.lock_facts(conf)
    lock_extra = {**backend_facts, **(lock_extra or {})}
    runs_dir = runs_dir or rundir.default_runs_dir()
    tracking.check(cfg, runs_dir)
    run_dir = rundir.create(runs_dir, cfg["name"])
    lock, host_facts = prepared(run_dir, cfg, overrides, backend.name, data_root, data_files,
                                launched, lock_extra)
    with lock:
        print(f"harness: run {run_dir.name} ({backend.name} backend) -> {run_dir}", flush=True)
        rundir.write_status(run_dir, "running", backend=backend.name,
                            started_utc=rundir.now_utc(), host_pid=os.getpid())
        return _run(run_dir, cfg, conf, backend, data_root, [], lock, host_facts)


def resume(ref: str, name: Optional[str], overrides: List[str],
           config_dir: Optional[Path] = None, runs_dir: Optional[Path] = None,
           trust: bool = False) -> Path:
    """Continue run `ref` in its own directory from its newest intact checkpoint (the
    training process picks and validates it). With a config name (and overrides), refuse
    when they do not compose to the run's recorded config. A run that no trusted key
    launched is refused unless `trust` (harness/record/trust.py)."""
    run_dir = rundir.resolve(ref, runs_dir)
    with rundir.WriterLock(run_dir).acquire("harness train --resume", wait_s=3) as lock:
        return _resume_locked(run_dir, name, overrides, config_dir, lock, trust)


def _resume_locked(run_dir: Path, name: Optional[str], overrides: List[str],
                   config_dir: Optional[Path], lock: rundir.WriterLock, trust: bool) -> Path:
    from harness.record import signing
    from harness.record.trust import refuse_untrusted

    if (run_dir / rundir.LOCK).exists():
        raise ConfigError(f"run {run_dir.name} already finished (it has a lockfile); there is "
                          f"nothing to resume. Start a new run instead.")
    cfg = config.load_yaml(run_dir / rundir.CONFIG)
    signature = signing.intact(run_dir, None, "Its config or launch facts were changed "
                               "after it was launched; restore them, or start a new run.",
                               refusal=CheckpointRefused)
    launched = rundir.read_json(run_dir / rundir.LAUNCH)
    refuse_untrusted(run_dir.name, signature, cfg, launched["lock"].get("script"), "resume", trust)
    recorded_sha = launched["config_sha256"]
    if config.config_sha256(cfg) != recorded_sha:
        raise CheckpointRefused(f"{run_dir / rundir.CONFIG} no longer matches the config the "
                                f"run was launched with (launch.json); it was edited. Restore "
                                f"it, or start a new run.")
    if name:
        if not any(o.lstrip("+").startswith("seed=") for o in overrides):
            # A config without a seed draws one at launch: the run's own is the one it had.
            overrides = [*overrides, f"seed={cfg['seed']}"]
        asked = choices.compose(name, overrides, config_dir)
        if config.config_sha256(asked) != recorded_sha:
            diffs = [f"{d.key}: run {d.a!r}, given {d.b!r}"
                     for d in gate.differences(cfg, asked, ignore=())]
            raise CheckpointRefused(
                f"cannot resume run {run_dir.name} with config '{name}' "
                f"{' '.join(overrides)}: it differs from the run's config ({'; '.join(diffs)}). "
                f"Resume with the run's own config: `harness train --resume {run_dir.name}`.")
    previous = rundir.read_status(run_dir, check_writer=False)
    _refuse_while_slurm_owns(run_dir, previous)
    if config.is_script(cfg) and previous.get("state") != "preempted":
        raise CheckpointRefused(
            f"run {run_dir.name} ran a command that was not preempted (its status: "
            f"{previous.get('state', 'unknown')}"
            f"{', exit code ' + str(previous['exit_code']) if previous.get('exit_code') else ''}"
            f"): a resume would start the command again from its beginning, over what the "
            f"killed attempt left, and no replay could repeat that. Start a new run. A "
            f"command resumes only after it exited {REQUEUE_EXIT} (it checkpointed on SIGTERM "
            f"or SIGUSR1 and asked to go on; see docs/your-script.md).")
    # The backend the run started on (status.json), not a new choice by backend=auto: the
    # checkpoint's environment must match.
    backend = backends.get(_resume_backend(previous.get("backend") or cfg["backend"]["name"]))
    if str(cfg["trainer"]["device"]).startswith("cuda"):
        gpu.require_gpus(backend.name)
    data_root = None if config.is_script(cfg) else datasets.prepare(cfg["data"])[0]
    conf = config.typed(cfg)
    for line in backend.clean_up(run_dir, conf):
        print(f"harness: {line}", flush=True)
    if previous.get("state") == "running":  # we hold the lock: its writer is gone
        print(f"harness: run {run_dir.name} was left 'running' by a launcher that is gone",
              flush=True)
    print(f"harness: resuming run {run_dir.name} ({backend.name} backend) -> {run_dir}",
          flush=True)
    rundir.write_status(run_dir, "running", backend=backend.name, host_pid=os.getpid(),
                        resumed_utc=rundir.now_utc(), resumes=previous.get("resumes", 0) + 1,
                        error=None)  # an earlier attempt's error is not this one's
    return _run(run_dir, cfg, conf, backend, data_root, ["--resume"], lock, launched["lock"])


def _refuse_while_slurm_owns(run_dir: Path, status: Dict[str, Any]) -> None:
    """A batch job the scheduler still holds (pending, running or requeued) resumes by
    itself; a resume by hand now would be a second writer on the run."""
    if status.get("backend") != "slurm" or not status.get("slurm_job_id") \
            or status.get("state") in ("succeeded", "failed"):
        return
    from harness.backends import slurm

    now = slurm.update(run_dir)
    if now.get("slurm_state") == "PENDING" or now.get("slurm_state") in slurm.RUNNING \
            | slurm.REQUEUED:
        raise RunBusy(
            f"run {run_dir.name} is Slurm job {slurm.job_ref(now)}, still "
            f"{now['slurm_state']}: the scheduler runs it and resumes it after a preemption. "
            f"Wait for it (`harness slurm status {run_dir.name} --wait`) or cancel it "
            f"(scancel {now['slurm_job_id']}) before resuming it here.")


def _resume_backend(name: str) -> str:
    # A batch job resumes by itself when the scheduler restarts it; `--resume` by hand
    # continues such a run right here.
    return "local" if name == "slurm" else name


def _run(run_dir: Path, cfg: Dict[str, Any], conf: config.RunConfig, backend,
         data_root: Optional[Path], extra_args: List[str], lock: rundir.WriterLock,
         host_facts: Dict[str, Any]) -> Path:
    """Start the prepared run on its backend and wait for it. `host_facts`: the lock's
    facts from launch.json, as prepare wrote them (or a resume read them)."""
    env = {**pinned_environment(cfg["determinism"]), **distributed.pinned_environment(cfg)}
    if os.environ.get(AUDIT):  # `harness verify`'s module audit, on any backend
        env[AUDIT] = os.environ[AUDIT]
    env.update(perturb.environment())  # `harness replay --negative-control`, on any backend
    interval = progress.live_interval()
    if interval:  # a terminal: ask the training for frequent lines to draw a live bar
        env[PROGRESS_S] = interval
    try:
        # A batch job follows itself (its script starts `harness.record.tracking follow`).
        follower = tracking.Follower(run_dir, [], {}) if backend.tracks_itself else \
            tracking.follow(run_dir, cfg, backend.name)
    except HarnessError as exc:
        rundir.write_status(run_dir, "failed", exit_code=exc.exit_code, reason=str(exc),
                            finished_utc=rundir.now_utc())
        raise
    try:
        handle = backend.launch(backends.LaunchSpec(
            run_dir=run_dir, conf=conf, lock=host_facts, env=env, data_root=data_root,
            extra_args=extra_args, lock_fd=lock.fd))
    except BaseException:
        follower.close("failed")
        raise

    def forward(signum, frame):
        # SIGTERM/SIGUSR1 to the launcher: the training checkpoints at its next step
        # boundary and exits with REQUEUE_EXIT; the launcher waits for that and records it.
        handle.signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal() works only there
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = handle.wait()
    except KeyboardInterrupt:
        handle.stop()
        follower.close("failed")
        rundir.write_status(run_dir, "failed", exit_code=130, reason="interrupted",
                            finished_utc=rundir.now_utc())
        raise RunFailed(f"run {run_dir.name} interrupted; it is marked failed.") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return finish(run_dir, cfg, code, follower)


def prepared(run_dir: Path, *facts) -> Tuple[rundir.WriterLock, Dict[str, Any]]:
    """The new run directory held (WriterLock) and prepared (`prepare(run_dir, *facts)`),
    with the lock facts prepare wrote to launch.json.
    On a full disk nothing half-made is left: the directory is removed, and the error
    says so."""
    lock = None
    try:
        lock = rundir.WriterLock(run_dir).acquire("harness train")
        return lock, prepare(run_dir, *facts)
    except OSError as exc:
        if lock is not None:
            lock.release()
        full = rundir.out_of_space(exc, run_dir, "the new run's config and launch facts",
                                   "Nothing was started, and the half-made run directory was "
                                   "removed. Free space there, or pass --runs-dir on a "
                                   "larger disk.")
        if full is None:
            raise
    shutil.rmtree(run_dir, ignore_errors=True)
    raise full


def prepare(run_dir: Path, cfg: Dict[str, Any], overrides: List[str], backend_name: str,
            data_root: Optional[Path], data_files: Dict, launched: float,
            lock_extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Write config.yaml, overrides.txt and launch.json: the host's facts for the lockfile,
    which it returns."""
    rundir.atomic_write_text(run_dir / rundir.CONFIG, config.to_yaml(cfg))
    rundir.atomic_write_text(run_dir / rundir.OVERRIDES, "".join(f"{o}\n" for o in overrides))
    lock = lockfile.host_facts(run_dir.name, cfg, overrides, backend_name, data_root,
                               data_files, lock_extra)
    rundir.write_json(run_dir / rundir.LAUNCH, {
        "launched_unix": launched, "config_sha256": lock["config_sha256"], "lock": lock})
    sign(run_dir, launching=True)
    return lock


def script_facts(cfg: Dict[str, Any], backend_name: str) -> Dict[str, Any]:
    """A command run's launch facts: where it runs and what it reads (hashed now, before it
    starts). Checks the command line first: nothing is written for one that cannot run.
    A new run's command.source_date_epoch is drawn here, once, like its seed."""
    from harness.script import files

    if cfg["command"].get("source_date_epoch") is None:
        cfg["command"]["source_date_epoch"] = source_date_epoch()
    argv = cfg["command"]["argv"]
    if not argv:
        raise ConfigError("no command to run: give it after `--`, e.g. "
                          "`harness run -- python train.py --epochs 3`.")
    if backend_name == "slurm" and str(cfg["backend"]["slurm"]["runtime"]) != "none":
        raise ConfigError(f"a command runs in a Slurm job with backend.slurm.runtime=none "
                          f"(the job runs it in this directory, on a shared filesystem); "
                          f"runtime={cfg['backend']['slurm']['runtime']} is not available "
                          f"for commands yet.")
    if backend_name == "slurm" and cfg["command"]["nproc"] > 1:
        raise ConfigError(f"command.nproc={cfg['command']['nproc']} starts the processes on "
                          f"one machine (local or docker backend); in a Slurm job, start them "
                          f"with srun in your job, or use the built-in loop's "
                          f"trainer.devices/trainer.nodes.")
    workdir = Path.cwd()
    if backend_name in ("local", "slurm") and not _findable(argv[0], workdir):
        raise ConfigError(f"command not found: {argv[0]!r} is neither on PATH nor a file in "
                          f"{workdir}. Install it, or give its path.")
    files.check_output_patterns(cfg["command"]["outputs"])
    command_files = files.command_files(argv, workdir, cfg["command"]["outputs"])
    if backend_name == "docker":
        files.check_container_outputs(cfg["command"]["outputs"],
                                      [*cfg["command"]["inputs"], *command_files], workdir)
    return {"argv": list(argv), "workdir": str(workdir),
            "inputs": files.hash_inputs([*cfg["command"]["inputs"], *command_files], workdir),
            "command_files": command_files,
            # Names only: values can be secrets. A failed replay names what differs.
            "environment_names": sorted(os.environ)}


def _findable(program: str, workdir: Path) -> bool:
    import shutil
    import sys

    if "/" in program:
        return (workdir / program).is_file()
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which(program, path=search) is not None


def finish(run_dir: Path, cfg: Dict[str, Any], code: int, follower: tracking.Follower) -> Path:
    """Record how the run ended, then let the trackers record it too (the run's status
    never waits on a tracker)."""
    lock_written = (run_dir / rundir.LOCK).exists()
    try:
        return _record_end(run_dir, code, lock_written, config.is_script(cfg))
    finally:
        follower.close(tracking.outcome(code, lock_written))


def sign(run_dir: Path, launching: bool = False) -> None:
    """Sign a run with this user's key (made on first use): as launched, or as finished.
    A run that cannot be signed still runs: it is said, and a resume or replay of it will
    ask for --trust."""
    from harness.record import signing

    try:
        if launching:
            keyid, path, made = signing.sign_launch(run_dir)
        else:
            keyid, path, made = signing.sign(run_dir, lockfile.read(run_dir / rundir.LOCK))
    except HarnessError as exc:
        print(f"harness: warning: run {run_dir.name} is not signed: {exc}", flush=True)
        return
    if made:
        print(f"harness: made a signing key for your runs: {path} (keep it private; "
              f"`harness keys show` prints its public key for others to trust)", flush=True)
    if not launching:
        print(f"harness: signed {run_dir.name} with key {keyid[:16]} ({signing.BUNDLE})",
              flush=True)


def _record_end(run_dir: Path, code: int, lock_written: bool, is_script: bool) -> Path:
    if code == REQUEUE_EXIT:
        rundir.write_status(run_dir, "preempted", exit_code=code, finished_utc=rundir.now_utc(),
                            reason="stopped on a signal after writing a checkpoint")
        raise Preempted(f"run {run_dir.name} was preempted: it wrote a checkpoint and stopped "
                        f"(exit code {REQUEUE_EXIT}). Continue it with `harness train --resume "
                        f"{run_dir.name}`.")
    if code == 0 and lock_written:
        sign(run_dir)
        rundir.write_status(run_dir, "succeeded", exit_code=0, finished_utc=rundir.now_utc())
        print(f"harness: run {run_dir.name} succeeded", flush=True)
        print(f"run id:  {run_dir.name}\nrun dir: {run_dir}", flush=True)
        return run_dir
    reason = "no lockfile written" if code == 0 else f"exit code {code}"
    rundir.write_status(run_dir, "failed", exit_code=code or 1, reason=reason,
                        finished_utc=rundir.now_utc())
    said = rundir.recorded_error(run_dir)
    if is_script:
        # The user's command: its exit code is the run's, whatever it means to the command.
        raise RunFailed(f"run {run_dir.name} failed: {said or reason}; see "
                        f"{run_dir / rundir.LOG}", exit_code=code or 1)
    if said and code in PASSED_ON:
        # The training stopped on a user-facing error (data, environment, a refused
        # checkpoint): its own words and exit code, rather than a generic failure.
        raise PASSED_ON[code](f"{said} (run {run_dir.name}, marked failed)")
    raise RunFailed(f"run {run_dir.name} failed ({reason}); see {run_dir / rundir.LOG}")

