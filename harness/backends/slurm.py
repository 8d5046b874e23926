"""Slurm: submit a rendered batch script, ask the scheduler how its jobs are, and record
that in each run's status.json (fields `slurm_job_id`, `slurm_array_task_id`,
`slurm_state`, read by `harness runs`).

Where the scheduler keeps a job: `squeue` while it is queued or running, `scontrol show
job` until MinJobAge after it ended, then only the job-completion log (`sacct -c`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from harness import config, rundir
from harness.backends import sbatch
from harness.backends.base import Backend, LaunchSpec
from harness.config import RunConfig
from harness.errors import REQUEUE_EXIT, EnvironmentProblem, HarnessError, RunFailed
from harness.record import tracking

RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STAGE_OUT", "SIGNALING",
           "RESIZING"}
REQUEUED = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
          "BOOT_FAIL", "DEADLINE", "REVOKED"}
TERMINAL = {"succeeded", "failed"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise EnvironmentProblem(
            f"`{name}` not found on PATH: the Slurm client tools are not installed here. Run "
            f"`harness submit` on a login node of the cluster, or for a local single-node "
            f"cluster run `make slurm-env` (slurm/env.sh).")
    return path


def _run(args: List[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"`{' '.join(args)}` did not answer in {timeout:.0f} s: is "
                                 f"slurmctld up? (`scontrol ping`, `make slurm-env`)") from None


def submit_script(script: Path) -> str:
    """`sbatch --parsable SCRIPT`; returns the job id. A rejection is an EnvironmentProblem
    carrying sbatch's own words."""
    done = _run([tool("sbatch"), "--parsable", str(script)])
    if done.returncode != 0:
        words = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise EnvironmentProblem(f"sbatch rejected the job: {words}\n(script: {script}; fix "
                                 f"the backend.slurm.* options, e.g. partition or time, or "
                                 f"the cluster limits they exceed)")
    return done.stdout.strip().split(";")[0]


def job_ref(status: Dict) -> str:
    """The scheduler's name for a run's job: JOBID, or ARRAYJOBID_TASK for array tasks."""
    task = status.get("slurm_array_task_id")
    return f"{status['slurm_job_id']}_{task}" if task is not None else str(status["slurm_job_id"])


def query(ref: str) -> Optional[Dict[str, str]]:
    """JobState, ExitCode, Restarts, Reason, JobId of job `ref`, or None when the
    scheduler no longer knows it."""
    done = _run([tool("scontrol"), "show", "job", "-o", ref])
    if done.returncode == 0 and done.stdout.strip():
        # One line per job; for an array id that has not been split yet, the pending rest.
        line = done.stdout.strip().splitlines()[0]
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        return {"state": fields.get("JobState", "UNKNOWN"),
                "exit_code": fields.get("ExitCode", ""),
                "restarts": fields.get("Restarts", "0"), "reason": fields.get("Reason", ""),
                "raw_job_id": fields.get("JobId", "")}
    return _from_jobcomp(ref)


def _from_jobcomp(ref: str) -> Optional[Dict[str, str]]:
    """The job-completion record (`sacct -c`), for jobs older than MinJobAge."""
    done = _run([tool("sacct"), "-c", "-n", "-P", "-j", ref.split("_")[0],
                 "-o", "JobID,State,ExitCode"])
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") >= 2]
    if done.returncode != 0 or not rows:
        return None
    job_id, state, exit_code = rows[-1][:3]
    return {"state": state.split()[0], "exit_code": exit_code, "restarts": "0", "reason": "",
            "raw_job_id": job_id}


def exit_code_of(text: str) -> int:
    """Slurm's ExitCode "CODE:SIGNAL"."""
    code, _, signal = (text or "0:0").partition(":")
    try:
        return int(code) or (128 + int(signal) if signal and int(signal) else 0)
    except ValueError:
        return 1


def sign_finished(run_dir: Path) -> None:
    """A job's run is signed when its end is first seen here, by the user who launched it
    (harness.record.signing.sign_own_finished)."""
    from harness.record import signing

    try:
        signing.sign_own_finished(run_dir)
    except HarnessError as exc:
        print(f"harness: warning: run {run_dir.name} is not signed: {exc}", flush=True)


def update(run_dir: Path) -> Dict:
    """Ask the scheduler about the run's job and record it in status.json."""
    status = rundir.read_json(run_dir / rundir.STATUS)
    if status.get("state") in TERMINAL:
        return status
    info = query(job_ref(status))
    log = run_dir / rundir.SLURM_LOG
    if info is None:
        return rundir.write_status(run_dir, status.get("state", "unknown"),
                                   slurm_state="UNKNOWN")
    slurm_state = info["state"]
    fields = {"slurm_state": slurm_state, "slurm_restarts": int(info["restarts"] or 0),
              "slurm_reason": info["reason"], "slurm_log": str(log)}
    if slurm_state == "PENDING":
        state = "preempted" if fields["slurm_restarts"] else "queued"
    elif slurm_state in RUNNING:
        state = "running"
    elif slurm_state in REQUEUED:
        state = "preempted"
    elif slurm_state == "COMPLETED":
        if (run_dir / rundir.LOCK).exists():
            sign_finished(run_dir)
            return rundir.write_status(run_dir, "succeeded", exit_code=0,
                                       finished_utc=rundir.now_utc(), **fields)
        return rundir.write_status(run_dir, "failed", exit_code=1, finished_utc=rundir.now_utc(),
                                   reason=f"job COMPLETED but wrote no lockfile; see {log}",
                                   **fields)
    elif slurm_state in FAILED:
        code = exit_code_of(info["exit_code"])
        recorded = (status.get("error") or {}).get("exit_code")
        if recorded and code != REQUEUE_EXIT:
            # The training's own exit code: srun reports a task it killed (-K) over it.
            code = recorded
        if code == REQUEUE_EXIT:
            reason = (f"Slurm {slurm_state} after the training checkpointed (exit {code}); "
                      f"continue with `harness train --resume {run_dir.name}`")
        else:
            reason = f"Slurm {slurm_state}, ExitCode {info['exit_code']}; see {log}"
        return rundir.write_status(run_dir, "failed", exit_code=code or 1, reason=reason,
                                   finished_utc=rundir.now_utc(), **fields)
    else:
        state = status.get("state", "queued")
    return rundir.write_status(run_dir, state, **fields)


def failure_message(run_dir: Path, status: Dict, tail: int = 12) -> str:
    log = run_dir / rundir.SLURM_LOG
    lines = []
    try:
        lines = log.read_text(errors="replace").splitlines()[-tail:]
    except OSError:
        pass
    shown = "\n".join(f"    {line}" for line in lines) or "    (no output)"
    return (f"run {run_dir.name} (job {job_ref(status)}): {status.get('reason')}\n"
            f"  last lines of {log}:\n{shown}")


def wait(run_dirs: List[Path], poll_s: float = 2.0, timeout_s: Optional[float] = None,
         quiet: bool = False) -> List[Dict]:
    """Poll until every run's job ended; print each change of state."""
    started, seen = time.monotonic(), {}
    while True:
        statuses = [update(d) for d in run_dirs]
        for run_dir, status in zip(run_dirs, statuses):
            key = (status["state"], status.get("slurm_state"), status.get("slurm_restarts"))
            if seen.get(run_dir) != key and not quiet:
                print(f"harness: {run_dir.name} job {job_ref(status)}: {status['state']} "
                      f"(Slurm {status.get('slurm_state')}, restarts "
                      f"{status.get('slurm_restarts', 0)})", flush=True)
            seen[run_dir] = key
        if all(s["state"] in TERMINAL for s in statuses):
            return statuses
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise RunFailed(f"gave up waiting after {timeout_s:.0f} s; the jobs go on "
                            f"(`harness slurm status RUN`, `squeue`)")
        time.sleep(poll_s)


def cancel(status: Dict) -> None:
    _run([tool("scancel"), job_ref(status)])


# ---------------------------------------------------------------- backend interface


class SlurmHandle:
    def __init__(self, run_dir: Path, poll_s: float):
        self.run_dir, self.poll_s = run_dir, poll_s

    def wait(self) -> int:
        status = wait([self.run_dir], self.poll_s)[0]
        return 0 if status["state"] == "succeeded" else int(status.get("exit_code") or 1)

    def signal(self, signum: int) -> None:
        """Nothing: the scheduler signals the job itself (time limit, preemption)."""

    def stop(self) -> None:
        cancel(rundir.read_json(self.run_dir / rundir.STATUS))


def job_image_facts(conf: RunConfig) -> Dict:
    """The lockfile's `image` section for a containerized job (runtime docker, apptainer or
    pyxis), {} otherwise. With backend.slurm.image unset, the config's own image profile
    (cuda for GPU runs on a GPU host, else cpu) is built or found, and pushed to
    image.registry: the job pulls it by that repo digest, never by a tag."""
    from harness.containers import image

    slurm = conf.backend.slurm
    if slurm.runtime.value == "none" or slurm.image:
        return {}
    facts = image.build(config.plain(conf.image), push=True)
    if not facts["repo_digest"]:
        raise EnvironmentProblem(
            f"the {conf.image.profile} image was pushed but the engine reports no repo "
            f"digest for {conf.image.registry}; set backend.slurm.image=REPO@sha256:... "
            f"to an image the nodes can pull.")
    return {"image": facts}


def job_image(slurm: Dict, lock: Dict) -> Dict:
    """backend.slurm.* with `image` set to what the job runs: the configured image, else
    the repo digest job_image_facts recorded in the run's lock."""
    pushed = (lock.get("image") or {}).get("repo_digest")
    return {**slurm, "image": slurm.get("image") or pushed}


class SlurmBackend(Backend):
    """`harness train CONFIG backend=slurm`: one batch job, waited for."""

    name = "slurm"
    trains_elsewhere = True  # on a batch node (in its image, for a container runtime)
    tracks_itself = True  # the job script starts the tracking follower (harness/record/tracking.py)
    batch = True

    def lock_facts(self, conf: RunConfig) -> Dict:
        return job_image_facts(conf)

    def launch(self, spec: LaunchSpec) -> SlurmHandle:
        job_id = self.submit([spec])
        print(f"harness: submitted Slurm job {job_id}; log {spec.run_dir / rundir.SLURM_LOG}",
              flush=True)
        poll_s = float(spec.conf.backend.slurm.poll_s or 2.0)
        return SlurmHandle(spec.run_dir, poll_s)

    def submit(self, specs: List[LaunchSpec], log_dir: Optional[Path] = None) -> str:
        """One batch script for prepared runs (several: a job array, sharing the first
        run's backend, determinism and image), written into each run directory and
        submitted; each run is marked queued. Returns the job id. A submission that fails
        leaves every run marked failed, none claiming to be queued."""
        first = specs[0]
        slurm = job_image(config.plain(first.conf.backend.slurm), first.lock)
        trainer = first.conf.trainer
        job = sbatch.JobSpec(
            job_name=f"harness-{first.conf.name}", run_dirs=[s.run_dir for s in specs],
            data_roots=[s.data_root for s in specs], env=first.env, slurm=slurm,
            device=trainer.device, python=slurm.get("python") or sys.executable,
            log_dir=log_dir, sandbox=first.conf.backend.docker,
            extra_train_args=list(first.extra_args), job_env=sbatch.job_environment(),
            devices=getattr(trainer, "devices", 1), nodes=getattr(trainer, "nodes", 1),
            tracked=any(tracking.selected(config.plain(s.conf)) for s in specs))
        text = sbatch.render(job)
        if len(specs) > 1 and log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            rundir.atomic_write_text(spec.run_dir / rundir.SLURM_SCRIPT, text)
        try:
            job_id = submit_script(first.run_dir / rundir.SLURM_SCRIPT)
        except BaseException:
            for spec in specs:
                rundir.write_status(spec.run_dir, "failed", backend=self.name,
                                    reason="submission failed")
            raise
        for index, spec in enumerate(specs):
            rundir.write_status(
                spec.run_dir, "queued", backend=self.name, submitted_utc=rundir.now_utc(),
                slurm_job_id=job_id, slurm_array_task_id=index if len(specs) > 1 else None,
                slurm_state="PENDING", slurm_script=str(spec.run_dir / rundir.SLURM_SCRIPT),
                slurm_log=str(spec.run_dir / rundir.SLURM_LOG))
        return job_id
