"""The run directory `runs/<run-id>/`: the contract between launch, training and replay.

    config.yaml      resolved config (no interpolations left)
    overrides.txt    the overrides the user typed, one per line
    launch.json      facts gathered on the host before launch (source, data, image)
    launch.sigstore.json  the launcher's signature over config, overrides and launch.json
    status.json      running | succeeded | failed, exit code, times, pid
    metrics.jsonl    one record per step (loss also as float.hex) and per evaluation
    op-trace.jsonl.gz  every op of the first steps, hashed bit for bit (harness.record.op_trace)
    op-trace-tensors.pt  their outputs, whole (trainer.op_trace_tensors=true only)
    train.log        what the training printed
    checkpoints/     training state at intervals (the newest two)
    model.pt         final weights
    harness.lock     the lockfile, written last, only by a run that finished
    harness.lock.sigstore.json  its launcher's signature over the lock, weights, metrics,
                     outputs, image and data (harness.record.signing)
    .writer.lock     held (flock) by the one process writing the run, see WriterLock
    replay.json      a replay's comparison with the run it replays
    verify.json      `harness verify`'s comparison of its two runs
    outputs/         a `harness run` command's declared outputs, as it left them
    .script/         reports of the command's Python processes (harness.script.injection.pinning),
                     outputs.txt: the outputs the command recorded (runtime.record_output),
                     and console.log: what the command printed (stdout and stderr)
    audit.jsonl      `harness verify`: per-module tensor digests at audited steps
    nondeterministic.json  the nondeterministic ops torch warned about (determinism warn/off)
    tensorboard/     TensorBoard event files (tracker.tensorboard=true)
    tracking.json    the trackers' state (MLflow run id, last step sent)
    job.sbatch       a Slurm run's batch script
    slurm.out        what its Slurm job printed

Every file is written atomically (temp file + rename), so a reader never sees half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import secrets
import signal
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.env import RUNS
from harness.errors import ConfigError, EnvironmentProblem, RunBusy

# Every backend starts a training process as `python -u -m TRAINING_MODULE RUN_DIR`.
TRAINING_MODULE = "harness.train"
CONFIG = "config.yaml"
OVERRIDES = "overrides.txt"
LAUNCH = "launch.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
OP_TRACE = "op-trace.jsonl.gz"
# trainer.op_trace_tensors: every traced op's outputs, whole (replay --all-divergences)
OP_TRACE_TENSORS = "op-trace-tensors.pt"
LOG = "train.log"
WEIGHTS = "model.pt"
LOCK = "harness.lock"
SIGNATURE = "harness.lock.sigstore.json"  # a Sigstore bundle: DSSE over an in-toto statement
LAUNCH_SIGNATURE = "launch.sigstore.json"  # the same over config, overrides, launch.json
CHECKPOINTS = "checkpoints"
WRITER_LOCK = ".writer.lock"
REPLAY = "replay.json"
VERIFY = "verify.json"
OUTPUTS = "outputs"
DISPLACED = "displaced"  # declared outputs that existed before a command run started
TRACKING = "tracking.json"  # the trackers' state: MLflow run id, last step sent
SCRIPT_REPORTS = ".script"
SCRIPT_OUTPUTS = "outputs.txt"  # in .script/: what harness.runtime.record_output recorded
SCRIPT_STACK = "stack-{pid}.txt"  # in .script/: a process's stack, dumped on STACK_SIGNAL
STACK_SIGNAL = signal.SIGUSR2  # asks a rank that does not exit where it is stuck
SCRIPT_CONSOLE = "console.log"  # in .script/: what the command printed (stdout and stderr)
# per-module tensor digests of a `harness verify` run (harness.training.audit)
AUDIT = "audit.jsonl"
NONDETERMINISTIC = "nondeterministic.json"  # nondeterministic ops torch warned about
TENSORBOARD = "tensorboard"  # event files of tracker.tensorboard=true
SLURM_SCRIPT = "job.sbatch"  # the batch script of a Slurm run
SLURM_LOG = "slurm.out"  # what the Slurm job printed
STATUS_CHECK = "status check"  # the WriterLock purpose of a reader that only looks


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS) or "runs")


def user_cache() -> Path:
    """The harness's directory in the user's cache: ${XDG_CACHE_HOME:-~/.cache}/harness."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "harness"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def out_of_space(exc: BaseException, path: Path, what: str,
                 advice: Optional[str] = None) -> Optional[EnvironmentProblem]:
    """The harness's account of a write that failed for lack of space (ENOSPC, EDQUOT; or
    a RuntimeError of torch's writer, which does not say why, when the disk is then full),
    else None. Call it before removing the partial file: its size is the space
    that was missing."""
    import errno
    import shutil

    try:
        usage = shutil.disk_usage(path if Path(path).is_dir() else Path(path).parent)
    except OSError:
        return None
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or (isinstance(exc, RuntimeError) and usage.free < 1 << 20)
    if not full:
        return None
    advice = advice or ("Nothing written before it was lost: the run's newest complete "
                        "checkpoint is intact. Free space there (or move the runs directory "
                        "to a larger disk), then continue the run with `harness train "
                        "--resume RUN`.")
    return EnvironmentProblem(
        f"no space left on the device of {path}: writing {what} failed with "
        f"{usage.free >> 20} MiB free of {usage.total >> 20} MiB. {advice}")


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, sort_keys=True, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_run_id(config_name: str) -> str:
    """UTC time + config name + random suffix: sorts by time, unique under concurrency
    (the directory is created exclusively, and a clash is retried)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in config_name)[:40]
    return f"{stamp}-{safe}-{secrets.token_hex(3)}"


def create(runs_dir: Path, config_name: str) -> Path:
    """A new, empty run directory with a unique id (created exclusively; a clash of ids,
    possible only under concurrency, is retried)."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            path = runs_dir.resolve() / new_run_id(config_name)
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise EnvironmentProblem(f"cannot create a run directory in {runs_dir}: "
                                 f"{exc.strerror}. Pass --runs-dir DIR (or set HARNESS_RUNS) "
                                 f"to a writable directory.") from None
    raise EnvironmentProblem(f"could not create a unique run directory in {runs_dir} after 10 "
                             f"tries; retry the command.")


def write_status(run_dir: Path, state: str, **fields: Any) -> Dict[str, Any]:
    status = {}
    if (run_dir / STATUS).exists():
        status = read_json(run_dir / STATUS)
    status.update(fields, state=state, updated_utc=now_utc())
    write_json(run_dir / STATUS, status)
    return status


def record_error(run_dir: Path, message: str, exit_code: int) -> None:
    """The training process's own account of why it stopped (its launcher, or `harness
    runs`, reads it here rather than searching the log); the state stays the launcher's."""
    try:
        status = read_json(run_dir / STATUS) if (run_dir / STATUS).exists() else {}
        status["error"] = {"message": message, "exit_code": exit_code, "utc": now_utc()}
        write_json(run_dir / STATUS, status)
    except (OSError, ValueError):
        pass  # no run directory to write to: the message on stderr is all there is


def recorded_error(run_dir: Path) -> Optional[str]:
    """What the training process recorded as the reason it stopped (record_error)."""
    path = Path(run_dir) / STATUS
    return ((read_json(path) if path.exists() else {}).get("error") or {}).get("message")


def read_status(run_dir: Path, check_writer: bool = True) -> Dict[str, Any]:
    """The run's status. A run marked running whose writer is gone (its launcher was
    killed before it could say so) is recorded as failed, with the reason, when it is
    next looked at (check_writer=False: as written, for a caller that holds the lock)."""
    try:
        status = read_json(run_dir / STATUS)
    except (OSError, ValueError):
        return {"state": "unknown"}
    if not check_writer or status.get("state") != "running" or not status.get("host_pid") \
            or status.get("backend") == "slurm":
        return status  # a batch job's state is the scheduler's to tell
    try:
        with WriterLock(run_dir).acquire(STATUS_CHECK):
            status = read_json(run_dir / STATUS)  # as it is now that nobody writes
            if status.get("state") == "running":
                status = write_status(
                    run_dir, "failed", reason="the launcher and its training process are gone "
                    "(killed?); continue it with `harness train --resume`",
                    finished_utc=now_utc())
    except RunBusy:
        pass  # its writer is alive: running is true
    except EnvironmentProblem:  # not ours to lock (read-only, another user): ask the pid
        if not _pid_alive(int(status["host_pid"])):
            status = {**status, "state": "failed", "reason": "launcher process gone"}
    return status


class WriterLock:
    """One writer per run directory: an exclusive flock on `.writer.lock`.

    The launcher takes it before it writes anything and a local training process inherits
    it, so it is held as long as either lives; the kernel drops it when the last of them
    exits, so a killed holder cannot keep it. The holder's pid, host and purpose are written
    into the file for the refusal message of whoever comes second."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / WRITER_LOCK
        self.fd: Optional[int] = None

    def acquire(self, purpose: str, wait_s: float = 0.0) -> "WriterLock":
        """Take the lock; RunBusy naming the holder if another process holds it. A holder
        that is only looking (`harness runs` checking a status holds the lock for a
        moment) is waited for, up to `wait_s`."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot open {self.path} to lock the run ({exc.strerror}); run the harness "
                f"as the user who owns {self.path.parent}.") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder_of(fd)
                if STATUS_CHECK in holder and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                os.close(fd)
                raise RunBusy(self._busy_message(holder)) from None
        holder = {"pid": os.getpid(), "host": platform.node(), "purpose": purpose,
                  "since_utc": now_utc()}
        os.ftruncate(fd, 0)  # written in place: the lock belongs to this inode
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def _busy_message(self, text: str) -> str:
        run = self.path.parent.name
        try:
            holder = json.loads(text)
            who = (f"pid {holder['pid']} on {holder['host']} ({holder['purpose']}, since "
                   f"{holder['since_utc']})")
        except (ValueError, KeyError, TypeError):
            who = "another process"
        return (f"run {run} is being written by {who}, or by the training process it "
                f"started. One process writes a run at a time: wait until it ends, or stop "
                f"it (SIGTERM writes a checkpoint) and then `harness train --resume {run}`.")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _holder_of(fd: int, settle_s: float = 1.0) -> str:
    """The holder's record. A holder that has just taken the lock writes its record a
    moment later: wait for a complete one, up to `settle_s`."""
    deadline = time.monotonic() + settle_s
    while True:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        try:
            json.loads(text)
            return text
        except ValueError:
            if time.monotonic() >= deadline:
                return text
            time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve(ref: str, runs_dir: Optional[Path] = None) -> Path:
    """A run directory from a run id, a unique prefix of one, or a path."""
    path = Path(ref)
    if (path / CONFIG).exists():
        return path
    runs_dir = runs_dir or default_runs_dir()
    exact = runs_dir / ref
    if (exact / CONFIG).exists():
        return exact
    matches = [p for p in list_runs(runs_dir) if p.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"no run '{ref}' in {runs_dir}; `harness runs` lists the runs, or "
                          f"pass a run directory path.")
    names = ", ".join(p.name for p in matches[:5])
    raise ConfigError(f"run prefix '{ref}' is ambiguous ({len(matches)} runs: {names}...); "
                      f"give more characters.")


def list_runs(runs_dir: Path) -> List[Path]:
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and (p / CONFIG).exists())


def elapsed_since(start: float) -> float:
    return round(time.monotonic() - start, 3)
