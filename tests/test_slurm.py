"""`harness submit --backend slurm` against the real single-node Slurm (make slurm-env):
a job's results equal a local run's bit for bit, a preempted job is requeued and resumes
to the same weights, a sweep is one job array, a secret in the submitting environment stays
out of the job, and the rendered scripts are golden-tested. (The script's rules alone, in
process: tests/unit/test_sbatch.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TESTS, loss_bits, losses, mlflow_run, read_lock, require, run_dir_of
from test_resume import OVERRIDES, harness, make_context
from unit.test_sbatch import golden_spec

GOLDEN = TESTS / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return done.returncode == 0 and "UP" in done.stdout


# ---------------------------------------------------------------- golden scripts


# GPU jobs run the CUDA image, by digest.
CUDA_IMAGE = "127.0.0.1:5000/harness/train-cuda@sha256:" + "cd" * 32
CASES = {
    "none": dict(),
    "none-array": dict(),
    "docker-gpu": dict(gpus=1, gpu_type="h100", image=CUDA_IMAGE),
    "apptainer-gpu": dict(gpus=1, gpu_type="h100", image=CUDA_IMAGE),
    "pyxis-gpu": dict(gpus=2, gpu_type="h200", constraint="ib", image=CUDA_IMAGE),
    # Data-parallel: 2 nodes × 2 GPUs, one srun task per rank.
    "none-ddp": dict(gpu_type="h100"),
    # tracker=mlflow: a follower beside the training.
    "none-tracked": dict(),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_sbatch_script_matches_golden(case):
    from harness.backends import sbatch

    spec = golden_spec(case.split("-")[0], **CASES[case])
    if case == "none-array":
        spec.run_dirs = [Path(f"/shared/runs/RUN-{c}") for c in "ABC"]
        spec.data_roots = [Path("/shared/data/mnist")] * 3
        spec.log_dir = Path("/shared/runs/.slurm")
    if case == "none-ddp":
        spec.device, spec.devices, spec.nodes = "cuda", 2, 2
    if case == "none-tracked":
        spec.tracked = True
    text = sbatch.render(spec)
    path = GOLDEN / f"sbatch-{case}.sh"
    if UPDATE or not path.exists():
        require(not os.environ.get("CI"), f"golden file {path} missing")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"rendered script differs from {path} (UPDATE_GOLDEN=1)"
    # The shell accepts it.
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


# ---------------------------------------------------------------- the real cluster


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    require(slurm_up(), "Slurm is not running here (make slurm-env)")
    return make_context(tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="module")
def cluster(context):
    """The context and the local reference run that jobs must match bit for bit."""
    context["reference"] = run_dir_of(harness(context, "train", "tiny", *OVERRIDES, check_rc=0))
    return context


def same_results(run_dir: Path, reference: Path) -> None:
    assert read_lock(run_dir)["results"]["weights_sha256"] == \
        read_lock(reference)["results"]["weights_sha256"]
    assert loss_bits(run_dir) == loss_bits(reference)
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.mark.slurm
def test_slurm_job_matches_local_run(cluster):
    done = harness(cluster, "submit", "tiny", *OVERRIDES, "--wait", check_rc=0)
    run_dir = run_dir_of(done)
    same_results(run_dir, cluster["reference"])
    job, local = read_lock(run_dir), read_lock(cluster["reference"])
    assert job["backend"]["name"] == "slurm"
    for key in ("software", "determinism"):
        assert job[key] == local[key]
    assert job["hardware"]["cpu"] == local["hardware"]["cpu"]
    assert job["environment"]["SLURM_JOB_ID"] == status_of(run_dir)["slurm_job_id"]
    status = status_of(run_dir)
    assert status["state"] == "succeeded" and status["slurm_state"] == "COMPLETED"
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in script and "#SBATCH --requeue" in script
    assert f"--output={run_dir}/slurm.out" in script
    # Negative control: the same job with one weight bit flipped after step 1 is told apart.
    perturbed = {**cluster, "env": {**cluster["env"], "HARNESS_PERTURB": "weight-bit"}}
    flipped = run_dir_of(harness(perturbed, "submit", "tiny", *OVERRIDES, "--wait",
                                 check_rc=0))
    with pytest.raises(AssertionError):
        same_results(flipped, cluster["reference"])


def wait_for_steps(run_dir: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= steps:
            return
        time.sleep(0.05)
    out = run_dir / "slurm.out"
    raise AssertionError(f"{run_dir} did not reach step {steps}: "
                         f"{out.read_text() if out.exists() else ''}")


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["usr1", pytest.param("scontrol-requeue", marks=pytest.mark.long)])
def test_preempted_job_is_requeued_and_resumes_to_identical_weights(cluster, how):
    done = harness(cluster, "submit", "tiny", *OVERRIDES, check_rc=0)
    run_dir = run_dir_of(done)
    job_id = status_of(run_dir)["slurm_job_id"]
    wait_for_steps(run_dir, 9)
    if how == "usr1":  # what --signal=B:USR1@N does before the time limit
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    else:  # an administrator or a preempting job
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    done = harness(cluster, "slurm", "status", run_dir.name, "--wait", check_rc=0)
    assert "succeeded" in done.stdout
    log = (run_dir / "slurm.out").read_text()
    assert "exiting with code 75" in log, log
    assert "harness: resuming from step-" in log, log
    if how == "usr1":
        assert f"requeueing job {job_id}" in log
    status = status_of(run_dir)
    assert status["slurm_restarts"] >= 1 and status["state"] == "succeeded"
    assert read_lock(run_dir)["environment"]["SLURM_RESTART_COUNT"] == "1"
    same_results(run_dir, cluster["reference"])


@pytest.mark.slurm
@pytest.mark.long
def test_submitted_job_is_tracked_live_and_across_a_requeue(cluster, mlflow_server):
    """No launcher waits for a submitted job: its script runs the tracking follower."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    longer = [o for o in OVERRIDES if not o.startswith("trainer.epochs")] + ["trainer.epochs=20"]
    done = harness(cluster, "submit", "tiny", *longer, "+tracker=mlflow",
                   f"tracker.mlflow.tracking_uri={mlflow_server}", check_rc=0)
    run_dir = run_dir_of(done)
    job_id = status_of(run_dir)["slurm_job_id"]
    deadline = time.time() + 180
    history = []
    while not history:
        assert time.time() < deadline, (run_dir / "slurm.out").read_text()
        time.sleep(0.2)
        state = json.loads((run_dir / "tracking.json").read_text()) \
            if (run_dir / "tracking.json").exists() else {}
        if state.get("mlflow_run_id"):
            history = client.get_metric_history(state["mlflow_run_id"], "train/loss")
    assert not (run_dir / "harness.lock").exists()  # live: the job is still training
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    done = harness(cluster, "slurm", "status", run_dir.name, "--wait", check_rc=0)
    assert "succeeded" in done.stdout
    assert status_of(run_dir)["slurm_restarts"] >= 1
    run = mlflow_run(client, run_dir.name)
    assert run.info.status == "FINISHED"
    assert run.data.tags["harness.backend"] == "slurm"
    assert run.data.tags["harness.lock_sha256"] == read_lock(run_dir)["lock_sha256"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                          "train/loss"))
    assert history == losses(run_dir) and len(history) == 160  # each step once, as recorded


@pytest.mark.slurm
@pytest.mark.long
def test_sweep_is_one_job_array_of_normal_runs(cluster):
    # One CPU per task: two tasks run at once on the 2-CPU test node (the training still
    # pins 2 threads; task/none does not bind, so the bits do not change).
    small = [o for o in OVERRIDES if not o.startswith("trainer.epochs")] + [
        "trainer.epochs=1", "backend.slurm.cpus_per_task=1"]
    done = harness(cluster, "submit", "tiny", *small, "seed=0,1,2", "-m", "--wait", check_rc=0)
    run_dirs = [Path(line.split(":", 1)[1].strip()) for line in done.stdout.splitlines()
                if line.startswith("run dir:")]
    assert len(run_dirs) == 3
    statuses = [status_of(d) for d in run_dirs]
    assert len({s["slurm_job_id"] for s in statuses}) == 1  # one array
    assert [s["slurm_array_task_id"] for s in statuses] == [0, 1, 2]
    locks = [read_lock(d) for d in run_dirs]
    assert [lock["seed"] for lock in locks] == [0, 1, 2]
    assert len({lock["results"]["weights_sha256"] for lock in locks}) == 3
    for run_dir in run_dirs:
        check = subprocess.run([sys.executable, "-m", "harness", "lock", "check", str(run_dir)],
                               capture_output=True, text=True, env=cluster["env"])
        assert check.returncode == 0, check.stderr
        assert "harness-job:" in (run_dir / "slurm.out").read_text()
        assert len(loss_bits(run_dir)) == 8
    # The array is a seed study: `harness summary` reports it like a local sweep.
    sweep_id = next(line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                    if line.startswith("sweep id:"))
    summary = subprocess.run([sys.executable, "-m", "harness", "summary", sweep_id, "--json",
                              "--runs-dir", str(run_dirs[0].parent)],
                             capture_output=True, text=True, env=cluster["env"])
    assert summary.returncode == 0, summary.stderr
    (metrics,) = json.loads(summary.stdout)["configurations"].values()
    assert metrics["test_accuracy"]["n"] == 3


@pytest.mark.slurm
def test_rejected_submission_gives_schedulers_words_and_exit_4(cluster):
    done = harness(cluster, "submit", "tiny", "backend.slurm.partition=nosuchpartition",
                   check_rc=4)
    assert "sbatch rejected the job" in done.stderr
    assert "invalid partition" in done.stderr.lower()
    assert "Traceback" not in done.stderr


@pytest.mark.slurm
def test_failed_job_gives_log_path_and_exit_1(cluster):
    done = harness(cluster, "submit", "tiny", "backend.slurm.python=/nonexistent/python",
                   "--wait", check_rc=1)
    assert "Slurm job(s) failed" in done.stderr and "slurm.out" in done.stderr
    assert "FAILED" in done.stderr


SECRET_NAME = "AWS_SECRET_ACCESS_KEY"


def stored_job_environment(job_id: str) -> bytes:
    """The environment slurmctld stored for the job (StateSaveLocation/hash.N/job.ID/
    environment, kept until MinJobAge after the job ended); readable by SlurmUser only."""
    done = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                          check=True)
    state = next(line.split("=", 1)[1].strip() for line in done.stdout.splitlines()
                 if line.startswith("StateSaveLocation"))
    path = Path(state) / f"hash.{int(job_id) % 10}" / f"job.{job_id}" / "environment"
    require(os.access(path, os.R_OK), f"cannot read the job's stored environment {path} "
                                      f"(run the test as SlurmUser)")
    return path.read_bytes()


@pytest.mark.slurm
def test_submitting_environment_does_not_reach_the_job(context):
    """A secret in the environment of `harness submit` must not be copied into the job:
    not into Slurm's stored job environment, not into the training process, not into any
    file of the run directory. The allow-listed variables still arrive."""
    secret = f"planted-secret-{os.getpid()}-{time.time_ns()}"
    ctx = {**context, "env": {**context["env"], SECRET_NAME: secret}}
    small = [o for o in OVERRIDES if not o.startswith("trainer.epochs")] + [
        "trainer.epochs=1", "data.dataset._target_=harness_testkit.env_probe_idx"]
    done = harness(ctx, "submit", "tiny", *small, "--wait", check_rc=0)
    run_dir = run_dir_of(done)
    assert status_of(run_dir)["state"] == "succeeded"

    # (Booleans first: a failing assertion must not print the environments it searched.)
    stored = stored_job_environment(status_of(run_dir)["slurm_job_id"])
    stored_leak = secret.encode() in stored or SECRET_NAME.encode() in stored
    assert not stored_leak, "the secret is in the environment Slurm stored for the job"

    seen = json.loads((run_dir / "env-probe.json").read_text())
    process_leak = SECRET_NAME in seen
    assert not process_leak, "the secret reached the training process"
    # What the run needs arrives: the pinned variables, the import path of the testkit
    # (else the job would have failed), the cache directory.
    assert seen["PYTHONHASHSEED"] == "0" and seen["OMP_NUM_THREADS"]
    assert seen["PYTHONPATH"] == ctx["env"]["PYTHONPATH"]
    assert seen["XDG_CACHE_HOME"] == ctx["env"]["XDG_CACHE_HOME"]
    assert seen["SLURM_JOB_ID"] == status_of(run_dir)["slurm_job_id"]

    leaked = [path for path in run_dir.rglob("*")
              if path.is_file() and secret.encode() in path.read_bytes()]
    assert leaked == []
    assert "#SBATCH --export=NONE" in (run_dir / "job.sbatch").read_text()


def test_missing_sbatch_is_an_environment_problem(cli, tiny_conf):
    env = {"PATH": str(Path(os.sys.executable).parent)}
    done = cli("submit", "tiny", "--config-dir", str(tiny_conf), env=env, check_rc=4)
    assert "`sbatch` not found" in done.stderr and "make slurm-env" in done.stderr


@pytest.mark.slurm
@pytest.mark.long
def test_train_with_backend_slurm_runs_one_job_and_waits(cluster):
    small = [o for o in OVERRIDES if not o.startswith("trainer.epochs")] + ["trainer.epochs=1"]
    done = harness(cluster, "train", "tiny", *small, "backend=slurm", check_rc=0)
    run_dir = run_dir_of(done)
    assert "submitted Slurm job" in done.stdout
    status = status_of(run_dir)
    assert status["state"] == "succeeded" and status["slurm_state"] == "COMPLETED"
    assert read_lock(run_dir)["backend"]["name"] == "slurm"
    assert len(loss_bits(run_dir)) == 8


@pytest.mark.slurm
@pytest.mark.docker
@pytest.mark.long
def test_containerized_job_runs_the_configs_image_pulled_by_digest(cluster):
    """runtime=docker with no backend.slurm.image: submit builds (or finds) the config's
    image, pushes it, and the job runs `docker run` of that repo digest; the results match
    the local run bit for bit, and the lock names the image."""
    from test_docker import _engine

    engine = _engine()
    require(engine is not None, "no Docker engine answers (run `make docker-env`)")
    done = harness(cluster, "submit", "tiny", *OVERRIDES, "backend.slurm.runtime=docker",
                   "--wait", check_rc=0)
    run_dir = run_dir_of(done)
    lock = read_lock(run_dir)
    digest = lock["image"]["repo_digest"]
    assert digest.startswith("127.0.0.1:5000/harness/train-cpu@sha256:")
    assert digest in engine.api.inspect_image(lock["image"]["id"])["RepoDigests"]
    script = (run_dir / "job.sbatch").read_text()
    assert "docker run" in script and digest in script
    assert "pytest" not in lock["software"]["packages"]  # captured inside the container
    same_results(run_dir, cluster["reference"])
