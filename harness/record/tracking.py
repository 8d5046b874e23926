"""Trackers: a run's loss in TensorBoard and MLflow while it trains, then its config,
lockfile and model when it ends (`tracker=tensorboard`, `tracker=mlflow`).

The launcher tracks, not the training loop: while the backend runs the training, a follower
thread tails metrics.jsonl (metrics.Tail) and hands each new record to the selected
trackers. So the training process and its container image need no tracker library, a slow
or unreachable tracker costs the training nothing (it never waits on a network), and a
tracker shows the recorded values, bit for bit. The follower polls every POLL_S seconds; the
loop writes a record every `trainer.log_every` steps.

tracking.json in the run directory keeps the MLflow run id, so that a resumed run continues
its MLflow run, and the last step sent, so that a resume does not send steps twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from harness import rundir
from harness.errors import ConfigError, EnvironmentProblem, LockfileError, first_line
from harness.record import metrics

POLL_S = 1.0
SEND_BATCH = 500  # records per send: one MLflow call (at most 1000 metrics)
CLOSE_TIMEOUT_S = 60
MLFLOW_DIR = ".mlflow"  # the default MLflow store, in the runs directory
ARTIFACT_DIR = "harness"  # where a run's files go among its MLflow artifacts
ARTIFACTS = (rundir.LOCK, rundir.SIGNATURE, rundir.CONFIG, rundir.OVERRIDES, rundir.METRICS,
             rundir.OP_TRACE, rundir.WEIGHTS, rundir.LOG)
MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}
MAX_PARAM_LENGTH = 6000  # MLflow refuses longer parameter values
# MLflow's HTTP client retries 7 times with backoff (minutes) before it gives up: too long
# for the check before a run and for the end of one. A user's own setting wins.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def selected(cfg: Dict[str, Any]) -> bool:
    """Whether the config sends its runs to any tracker."""
    return bool((cfg.get("tracker") or {}).get("tensorboard") or mlflow_settings(cfg))


def outcome(exit_code: int, lock_written: bool) -> str:
    """How a training process ended, in the trackers' words."""
    from harness.errors import REQUEUE_EXIT

    if exit_code == REQUEUE_EXIT:
        return "preempted"
    return "succeeded" if exit_code == 0 and lock_written else "failed"


def mlflow_settings(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    settings = (cfg.get("tracker") or {}).get("mlflow") or {}
    return settings if settings.get("enabled") else None


def check(cfg: Dict[str, Any], runs_dir: Path) -> None:
    """Before anything is written: the selected trackers can be used (MLflow installed, its
    store reachable, the experiment there)."""
    settings = mlflow_settings(cfg)
    if settings:
        client, uri = mlflow_client(settings["tracking_uri"], runs_dir)
        experiment_id(client, uri, settings, runs_dir)


# ------------------------------------------------------------------------------ follower

class Follower:
    """Sends a running training's new metrics records to the trackers, then its files.

    Nothing a tracker does can fail the training or the run: its errors are warned about
    once and its records kept for the next try. Each tracker's last step sent is saved
    (tracking.json) after every successful send, so a resumed run sends each step once."""

    def __init__(self, run_dir: Path, trackers: List[Any], state: Dict[str, Any]):
        self.run_dir, self.trackers, self.state = run_dir, trackers, state
        self.tail = metrics.Tail(run_dir)
        self.pending: Dict[str, List[Dict[str, Any]]] = {t.name: [] for t in trackers}
        self.warned: set = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="harness-tracking", daemon=True)

    def start(self) -> "Follower":
        if self.trackers:
            self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stopped.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        try:
            fresh = self.tail.new_records()
        except (OSError, ValueError) as exc:  # a torn or unreadable file: read it next time
            self._warn("metrics.jsonl", f"cannot read {self.tail.path} ({exc}); retrying")
            return
        sent = self.state.setdefault("sent_step", {})
        for tracker in self.trackers:
            done = sent.get(tracker.name, 0)
            pending = self.pending[tracker.name] + [
                r for r in fresh if r.get("kind") == "eval" or r.get("step", 0) > done]
            try:
                while pending:  # in batches, so that a failure resends nothing already sent
                    batch, pending = pending[:SEND_BATCH], pending[SEND_BATCH:]
                    tracker.send(batch)
                    steps = [r["step"] for r in batch if r.get("kind") == "train"]
                    sent[tracker.name] = max([sent.get(tracker.name, 0), *steps])
                    save_state(self.run_dir, self.state)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops the training
                pending = batch + pending
                self._warn(tracker.name, f"cannot send metrics ({first_line(exc)}); retrying")
            self.pending[tracker.name] = pending

    def close(self, outcome: str) -> None:
        """After the training ended (outcome: succeeded, failed, preempted): the last
        records, then each tracker's files and final state, within CLOSE_TIMEOUT_S (a
        tracker that does not answer must not hold up the end of the run, or a Slurm job
        past its requeue)."""
        if not self.trackers:
            return
        self.stopped.set()
        self.thread.join()
        closing = threading.Thread(target=self._close, args=(outcome,), daemon=True,
                                   name="harness-tracking-close")
        closing.start()
        closing.join(CLOSE_TIMEOUT_S)
        if closing.is_alive():
            print(f"harness: the trackers did not finish within {CLOSE_TIMEOUT_S} s; the run "
                  f"ends without them", file=sys.stderr, flush=True)

    def _close(self, outcome: str) -> None:
        self.poll()
        for tracker in self.trackers:
            try:
                tracker.close(self.run_dir, outcome)
            except Exception as exc:  # noqa: BLE001 - the run's own outcome stands
                self._warn(tracker.name, f"cannot record the end of the run "
                                         f"({first_line(exc)})")

    def _warn(self, name: str, message: str) -> None:
        if name not in self.warned:
            self.warned.add(name)
            print(f"harness: tracker {name}: {message}", file=sys.stderr, flush=True)


def follow(run_dir: Path, cfg: Dict[str, Any], backend_name: str) -> Follower:
    """Open the selected trackers for a run about to start (or resume) and follow it.
    Raises EnvironmentProblem when a tracker cannot be opened."""
    state = load_state(run_dir)
    trackers: List[Any] = []
    if (cfg.get("tracker") or {}).get("tensorboard"):
        trackers.append(TensorBoard(run_dir))
    settings = mlflow_settings(cfg)
    if settings:
        trackers.append(Mlflow.open(run_dir, cfg, backend_name, settings, state))
    if trackers:
        save_state(run_dir, state)
    return Follower(run_dir, trackers, state).start()


def load_state(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / rundir.TRACKING
    return rundir.read_json(path) if path.exists() else {}


def save_state(run_dir: Path, state: Dict[str, Any]) -> None:
    rundir.write_json(run_dir / rundir.TRACKING, state)


def read_lock(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / rundir.LOCK
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- TensorBoard

class TensorBoard:
    """Event files in runs/<id>/tensorboard/: the loss as it comes, the evaluation, and the
    run id, config and lockfile as text at the end. Point TensorBoard at runs/."""

    name = "tensorboard"

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise EnvironmentProblem(f"tracker.tensorboard=true needs the tensorboard package "
                                     f"where harness runs ({exc}): pip install tensorboard, "
                                     f"or set tracker.tensorboard=false.") from None

        self.out = run_dir / rundir.TENSORBOARD
        self.writer = SummaryWriter(log_dir=str(self.out))

    def send(self, records: List[Dict[str, Any]]) -> None:
        for record in records:
            if record.get("kind") == "train":
                self.writer.add_scalar("train/loss", record["loss"], record["step"])
            elif record.get("kind") == "eval":
                self.writer.add_scalar("eval/accuracy", record["accuracy"], record["step"])
                self.writer.add_scalar("eval/loss", record["loss"], record["step"])
        self.writer.flush()

    def close(self, run_dir: Path, outcome: str) -> None:
        self.writer.add_text("run_id", run_dir.name)
        self.writer.add_text("state", outcome)
        self.writer.add_text("config", "```\n" + (run_dir / rundir.CONFIG).read_text() + "\n```")
        if (run_dir / rundir.LOCK).exists():
            self.writer.add_text("lockfile", "```\n" + (run_dir / rundir.LOCK).read_text()
                                 + "\n```")
        self.writer.close()
        print(f"harness: TensorBoard events in {self.out}", flush=True)


# -------------------------------------------------------------------------------- MLflow

def default_tracking_uri(runs_dir: Path) -> str:
    return f"sqlite:///{(runs_dir / MLFLOW_DIR).resolve() / 'mlflow.db'}"


def mlflow_client(tracking_uri: Optional[str], runs_dir: Path) -> Tuple[Any, str]:
    """(an MlflowClient, its tracking URI): the given one, or the default store."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise EnvironmentProblem(
            "tracker=mlflow needs the MLflow client where harness runs: "
            "pip install 'harness[mlflow]' (mlflow-skinny, with SQLite support for the "
            "default store), or choose another tracker (tracker=none).") from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its database set-up chatter
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if tracking_uri is None:
        (runs_dir / MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
        tracking_uri = default_tracking_uri(runs_dir)
    return MlflowClient(tracking_uri=tracking_uri), tracking_uri


def experiment_id(client: Any, uri: str, settings: Dict[str, Any], runs_dir: Path) -> str:
    """The experiment's id, created when missing (the default store keeps artifacts beside
    its database)."""
    from mlflow.exceptions import MlflowException

    name = settings["experiment"]
    try:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None if settings["tracking_uri"] else \
            (runs_dir / MLFLOW_DIR / "artifacts").resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)
    except (MlflowException, OSError) as exc:
        raise EnvironmentProblem(
            f"cannot use the MLflow tracking store {uri} (experiment {name!r}): "
            f"{first_line(exc)}. Start the server, or point tracker.mlflow.tracking_uri at "
            f"one that runs, or train without tracker=mlflow.") from None


def flat_params(cfg: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, str]]:
    """The resolved config as MLflow parameters: dotted keys, values as YAML would show."""
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flat_params(value, f"{name}.")
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            yield name, text if len(text) <= MAX_PARAM_LENGTH else \
                text[:MAX_PARAM_LENGTH - 3] + "..."


class Mlflow:
    """One MLflow run per harness run: the resolved config as parameters, `train/loss` live,
    `eval/*` at the end, the run's files as artifacts under `harness/`, tags that link it
    to the lockfile (harness.run_id, harness.lock_sha256, harness.backend, harness.image_id)."""

    name = "mlflow"

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, run_dir: Path, cfg: Dict[str, Any], backend_name: str,
             settings: Dict[str, Any], state: Dict[str, Any]) -> "Mlflow":
        from mlflow.exceptions import MlflowException

        client, uri = mlflow_client(settings["tracking_uri"], run_dir.parent)
        try:
            return cls._open(client, uri, run_dir, cfg, backend_name, settings, state)
        except (MlflowException, OSError) as exc:
            raise EnvironmentProblem(
                f"cannot open the MLflow run of {run_dir.name} at {uri}: {first_line(exc)}. "
                f"Start the tracking server (or point tracker.mlflow.tracking_uri at one "
                f"that runs) and try again.") from None

    @classmethod
    def _open(cls, client: Any, uri: str, run_dir: Path, cfg: Dict[str, Any],
              backend_name: str, settings: Dict[str, Any], state: Dict[str, Any]) -> "Mlflow":
        from mlflow.entities import Param

        if state.get("mlflow_run_id"):  # a resume continues the run's MLflow run
            client.update_run(state["mlflow_run_id"], status="RUNNING")
            return cls(client, state["mlflow_run_id"])
        run = client.create_run(
            experiment_id(client, uri, settings, run_dir.parent), run_name=run_dir.name,
            tags={"harness.run_id": run_dir.name, "harness.backend": backend_name,
                  "harness.config": str(cfg.get("name"))})
        params = [Param(k, v) for k, v in flat_params(cfg)]
        for start in range(0, len(params), 100):  # MLflow takes 100 parameters per call
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        state.update(mlflow_run_id=run.info.run_id, mlflow_tracking_uri=uri)
        print(f"harness: MLflow run {run.info.run_id} at {uri}", flush=True)
        return cls(client, run.info.run_id)

    def send(self, records: List[Dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        values = []
        for record in records:
            if record.get("kind") == "train":
                values.append(Metric("train/loss", record["loss"], now_ms, record["step"]))
            elif record.get("kind") == "eval":
                values += [Metric("eval/accuracy", record["accuracy"], now_ms, record["step"]),
                           Metric("eval/loss", record["loss"], now_ms, record["step"])]
        for start in range(0, len(values), 1000):  # and 1000 metrics
            self.client.log_batch(self.run_id, metrics=values[start:start + 1000])

    def close(self, run_dir: Path, outcome: str) -> None:
        lock = read_lock(run_dir)
        tags = {"harness.state": outcome}
        if lock:
            tags["harness.lock_sha256"] = lock["lock_sha256"]
            if (lock.get("image") or {}).get("id"):
                tags["harness.image_id"] = lock["image"]["id"]
            if lock.get("replay_of"):
                tags["harness.replay_of"] = lock["replay_of"]["run_id"]
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name), ARTIFACT_DIR)
        if (run_dir / rundir.OUTPUTS).is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / rundir.OUTPUTS),
                                      f"{ARTIFACT_DIR}/{rundir.OUTPUTS}")
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[outcome])


# ------------------------------------------------------------------ replay from MLflow

def looks_like_mlflow_run(ref: str) -> bool:
    """An MLflow run id (32 hex digits), or one written `mlflow:ID`."""
    bare = ref[len("mlflow:"):] if ref.startswith("mlflow:") else ref
    return len(bare) == 32 and all(c in "0123456789abcdef" for c in bare)


def fetch_run(ref: str, runs_dir: Path, tracking_uri: Optional[str]) -> Path:
    """The run directory of the harness run an MLflow run logged: the local one when it is
    still there, else one made in `runs_dir` from the MLflow run's artifacts (its lockfile,
    config, metrics and model), checked against the lock_sha256 tag."""
    mlflow_run_id = ref[len("mlflow:"):] if ref.startswith("mlflow:") else ref
    client, uri = mlflow_client(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), runs_dir)
    tags = _harness_tags(client, uri, mlflow_run_id)
    run_id, lock_sha = tags["harness.run_id"], tags["harness.lock_sha256"]
    local = runs_dir / run_id
    if (local / rundir.CONFIG).exists():
        return local
    if local.exists():
        raise ConfigError(f"{local} exists but is not a run directory (no {rundir.CONFIG}): "
                          f"move it away to fetch run {run_id} from MLflow run "
                          f"{mlflow_run_id}.")
    runs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=runs_dir, prefix=".fetch-") as scratch:
        _download(client, uri, mlflow_run_id, scratch)
        fetched = Path(scratch) / ARTIFACT_DIR
        _check_fetched(fetched, mlflow_run_id, lock_sha)
        shutil.move(str(fetched), str(local))
    rundir.write_status(local, "succeeded", fetched_from=f"mlflow:{mlflow_run_id}",
                        tracking_uri=uri)
    print(f"harness: fetched run {run_id} from MLflow run {mlflow_run_id} -> {local}",
          flush=True)
    return local


def _harness_tags(client: Any, uri: str, mlflow_run_id: str) -> Dict[str, str]:
    """The harness tags of a finished, replayable harness run logged to MLflow."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_run(mlflow_run_id).data.tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"no MLflow run {mlflow_run_id} at {uri}: give the tracking URI "
                              f"it was logged to with --tracking-uri (or "
                              f"MLFLOW_TRACKING_URI).") from None
        raise EnvironmentProblem(f"cannot read MLflow run {mlflow_run_id} from {uri}: "
                                 f"{first_line(exc)}") from None
    run_id, lock_sha = tags.get("harness.run_id"), tags.get("harness.lock_sha256")
    if not run_id or not lock_sha:
        raise ConfigError(f"MLflow run {mlflow_run_id} holds no finished harness run (no "
                          f"harness.run_id and harness.lock_sha256 tags): only runs logged by "
                          f"tracker=mlflow that wrote a lockfile can be replayed.")
    if tags.get("harness.state") != "succeeded" or Path(run_id).name != run_id \
            or run_id.startswith("."):
        raise ConfigError(f"MLflow run {mlflow_run_id} (harness run {run_id!r}, state "
                          f"{tags.get('harness.state')!r}) is not a succeeded harness run; "
                          f"only those can be replayed.")
    return tags


def _download(client: Any, uri: str, mlflow_run_id: str, into: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.download_artifacts(mlflow_run_id, ARTIFACT_DIR, into)
    except (MlflowException, OSError) as exc:
        raise EnvironmentProblem(f"cannot download the artifacts of MLflow run "
                                 f"{mlflow_run_id} from {uri}: {first_line(exc)}") from None


def _check_fetched(fetched: Path, mlflow_run_id: str, lock_sha: str) -> None:
    from harness.record import lockfile

    try:
        lock = lockfile.read(fetched / rundir.LOCK)
    except LockfileError as exc:
        raise LockfileError(f"MLflow run {mlflow_run_id}: {exc}") from None
    if lock["lock_sha256"] != lock_sha:
        raise LockfileError(f"MLflow run {mlflow_run_id}: its lockfile artifact has "
                            f"lock_sha256 {lock['lock_sha256'][:12]}..., its tag says "
                            f"{lock_sha[:12]}...: one of them was changed; it cannot be "
                            f"trusted.")


# ------------------------------------------------------------------ in a Slurm job

def follow_job(run_dir: Path) -> int:
    """`python -m harness.record.tracking follow RUN_DIR`, started by a Slurm job script beside
    the training (no launcher waits for a submitted job): follows the run until the script
    writes the training's exit code on this process's stdin."""
    from harness import config

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        # Slurm's stop signals are the training's to act on; the exit code that follows
        # (75: preempted) is what this process waits for.
        signal.signal(signum, signal.SIG_IGN)
    try:
        follower = follow(run_dir, config.load_yaml(run_dir / rundir.CONFIG), "slurm")
    except Exception as exc:  # noqa: BLE001 - the training runs on, untracked
        print(f"harness: tracking is off for this job: {first_line(exc)}", file=sys.stderr,
              flush=True)
        sys.stdin.read()  # until the script is done with us: it writes the exit code here
        return 0
    line = sys.stdin.readline().strip()
    code = int(line) if line.isdigit() else 1  # no code: the job script was killed
    follower.close(outcome(code, (run_dir / rundir.LOCK).exists()))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "follow":
        sys.exit("usage: python -m harness.record.tracking follow RUN_DIR")
    sys.exit(follow_job(Path(sys.argv[2])))
