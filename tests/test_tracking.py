"""tracker=mlflow against a real `mlflow server` on 127.0.0.1, read back with MLflow's own
client: the loss arrives while the run trains, a preempted run continues its MLflow run,
the artifacts hold the run's files, and `harness replay` takes the MLflow run id."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    harness,
    losses,
    make_context,
    mlflow_run,
    read_lock,
    run_dir_of,
    running_mlflow_server,
    start_and_interrupt,
)

mlflow = pytest.importorskip("mlflow")  # requirements-dev.txt installs it
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return make_context(tmp_path_factory.mktemp("tracking"))


def replay(ctx, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", "replay", *args, "--runs-dir",
                           str(ctx["runs"])], cwd=ctx["base"], env=ctx["env"],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tracked(ctx, server):
    """A run of 160 steps logged to the server, preempted once MLflow showed its loss while
    it trained, then resumed to the end. Returns (run dir, what MLflow showed live)."""
    client = MlflowClient(server)
    seen = {}

    def once_mlflow_shows_loss(run_dir):
        deadline = time.time() + 60
        while time.time() < deadline:
            run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] \
                if (run_dir / "tracking.json").exists() else None
            history = client.get_metric_history(run_id, "train/loss") if run_id else []
            if history:
                seen.update(steps=len(history), lock=(run_dir / "harness.lock").exists(),
                            state=json.loads((run_dir / "status.json").read_text())["state"],
                            mlflow_status=client.get_run(run_id).info.status)
                pid = json.loads((run_dir / "status.json").read_text())["host_pid"]
                os.kill(pid, signal.SIGTERM)  # the launcher: the training checkpoints, exits 75
                return
            time.sleep(0.1)
        raise AssertionError("MLflow showed no loss within 60 s of the run's first step")

    run_dir, code, output = start_and_interrupt(
        ctx, ["train", "tiny", "+tracker=mlflow", f"tracker.mlflow.tracking_uri={server}",
              "trainer.epochs=20", "trainer.checkpoint_every=8"],
        signal.SIGTERM, at_step=1, send=once_mlflow_shows_loss)
    assert code == 75, output
    seen["preempted_status"] = mlflow_run(client, run_dir.name).info.status
    harness(ctx, "train", "--resume", run_dir.name, check_rc=0)
    return run_dir, seen


@pytest.mark.long
def test_mlflow_shows_the_loss_while_the_run_trains(tracked):
    _, seen = tracked
    assert seen["steps"] >= 1
    assert seen["state"] == "running" and not seen["lock"]  # the run had not ended
    assert seen["mlflow_status"] == "RUNNING"
    assert seen["preempted_status"] == "KILLED"


def test_a_resumed_run_continues_its_mlflow_run_with_every_step_once(tracked, server):
    run_dir, _ = tracked
    client = MlflowClient(server)
    run = mlflow_run(client, run_dir.name)
    assert run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                          "train/loss"))
    assert len(losses(run_dir)) == 160
    assert history == losses(run_dir)  # each step once, the recorded value exactly
    lock = read_lock(run_dir)
    assert run.data.metrics["eval/accuracy"] == lock["results"]["test_accuracy"]


def test_mlflow_run_holds_config_tags_and_files(tracked, server):
    run_dir, _ = tracked
    client = MlflowClient(server)
    run = mlflow_run(client, run_dir.name)
    lock = read_lock(run_dir)
    assert run.data.tags["harness.lock_sha256"] == lock["lock_sha256"]
    assert run.data.tags["harness.backend"] == "local"
    assert run.data.tags["harness.state"] == "succeeded"
    params = run.data.params
    assert params["trainer.epochs"] == "20" and params["seed"] == "0"
    assert params["optim._target_"] == lock["config"]["optim"]["_target_"]
    assert json.loads(params["data.mirrors"]) == []
    files = {a.path for a in client.list_artifacts(run.info.run_id, "harness")}
    assert {"harness/harness.lock", "harness/config.yaml", "harness/metrics.jsonl",
            "harness/model.pt"} <= files
    fetched = Path(client.download_artifacts(run.info.run_id, "harness/model.pt",
                                             str(run_dir.parent.parent / "download")))
    assert hashlib.sha256(fetched.read_bytes()).digest() == \
        hashlib.sha256((run_dir / "model.pt").read_bytes()).digest()


@pytest.mark.long
def test_replay_takes_an_mlflow_run_id_when_the_run_directory_is_gone(tracked, ctx, server):
    run_dir, _ = tracked
    client = MlflowClient(server)
    mlflow_id = mlflow_run(client, run_dir.name).info.run_id
    moved = run_dir.parent.parent / "moved-away"
    shutil.move(str(run_dir), str(moved))
    try:
        done = replay(ctx, mlflow_id, "--tracking-uri", server)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"fetched run {run_dir.name} from MLflow run {mlflow_id}" in done.stdout
        assert "IDENTICAL" in done.stdout
        replay_dir = run_dir_of(done)
        assert read_lock(replay_dir)["replay_of"]["run_id"] == run_dir.name
        replay_run = mlflow_run(client, replay_dir.name)
        assert replay_run.data.tags["harness.replay_of"] == run_dir.name
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.move(str(moved), str(run_dir))


def test_replay_refuses_an_mlflow_run_that_is_not_a_harness_run(ctx, server):
    client = MlflowClient(server)
    other = client.create_run(client.create_experiment("not-harness")).info.run_id
    done = replay(ctx, f"mlflow:{other}", "--tracking-uri", server)
    assert done.returncode == 2, done.stderr
    assert "holds no finished harness run" in done.stderr


@pytest.mark.long
def test_default_store_is_sqlite_in_the_runs_directory(ctx):
    done = harness(ctx, "train", "tiny", "+tracker=mlflow", "trainer.max_steps=4",
                   check_rc=0)
    run_dir = run_dir_of(done)
    client = MlflowClient(f"sqlite:///{ctx['runs'] / '.mlflow' / 'mlflow.db'}")
    run = mlflow_run(client, run_dir.name)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        [1, 2, 3, 4]


def test_unreachable_tracking_server_is_refused_before_anything_is_written(ctx):
    before = set(ctx["runs"].iterdir()) if ctx["runs"].exists() else set()
    done = harness(ctx, "train", "tiny", "+tracker=mlflow",
                   "tracker.mlflow.tracking_uri=http://127.0.0.1:9", "trainer.max_steps=4")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "cannot use the MLflow tracking store http://127.0.0.1:9" in done.stderr
    assert "tracker.mlflow.tracking_uri" in done.stderr
    after = set(ctx["runs"].iterdir()) if ctx["runs"].exists() else set()
    assert after == before


@pytest.mark.long
def test_a_tracking_server_that_dies_mid_run_does_not_fail_the_run(ctx, tmp_path):
    with running_mlflow_server(tmp_path) as (uri, server):
        client = MlflowClient(uri)
        process = subprocess.Popen(
            [sys.executable, "-m", "harness", "train", "tiny", "+tracker=mlflow",
             f"tracker.mlflow.tracking_uri={uri}", "trainer.epochs=15",
             "--config-dir", str(ctx["conf"]), "--runs-dir", str(tmp_path / "runs")],
            cwd=ctx["base"], env=ctx["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        deadline = time.time() + 120
        while True:  # until the server has the run's first losses
            assert process.poll() is None and time.time() < deadline, process.communicate()
            found = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if found and client.get_metric_history(found[0].info.run_id, "train/loss"):
                break
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        started = time.time()
        out, err = process.communicate(timeout=300)
    assert process.returncode == 0, out + err
    assert "harness: tracker mlflow: cannot send metrics" in err
    run_dir = run_dir_of(subprocess.CompletedProcess([], 0, out, err))
    assert read_lock(run_dir)["results"]["steps"] == 120
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
    assert time.time() - started < 120  # the trackers' close is bounded (60 s)
