"""Checkpoints and resume: a run killed at an arbitrary step (SIGKILL) or stopped by a
preemption signal (SIGTERM) and resumed ends bit for bit where the uninterrupted run ends:
same weights_sha256, same loss bits at every step, byte-identical metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TESTS, loss_bits, make_tiny_idx, read_lock, run_dir_of

pytestmark = pytest.mark.slow

REQUEUE_EXIT = 75
# 3 epochs of 8 steps; checkpoints every 5 steps fall mid-epoch; two DataLoader workers;
# one-cycle LR schedule, Adam and dropout: every piece of state a resume must restore.
OVERRIDES = ["trainer.epochs=3", "trainer.checkpoint_every=5", "trainer.num_workers=2",
             "model.channels=[8,16]", "model.hidden=32", "+scheduler=onecycle"]


def make_context(base: Path) -> dict:
    """A config dir with `tiny` (generated IDX data) under `base`, and the env to run in."""
    files = make_tiny_idx(base / "tinydata")
    conf = base / "conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "tiny.yaml").write_text(json.dumps({
        "name": "tiny", "root": str(base / "tinydata"), "mirrors": [], "files": files,
        "dataset": {"_target_": "harness.data.IdxClassification", "mean": 0.1, "std": 0.3}}))
    (conf / "tiny.yaml").write_text(
        "defaults:\n  - model: cnn\n  - data: tiny\n  - optim: adam\n  - trainer: default\n"
        "  - determinism: strict\n  - backend: local\n  - _self_\n"
        "name: tiny\nseed: 0\ntrainer:\n  epochs: 1\n  batch_size: 32\n  log_every: 4\n"
        "  fingerprint_every: 4\n  checkpoint_every: 2\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(base / "cache"),
           "PYTHONPATH": str(TESTS / "fixtures")}
    return {"base": base, "conf": conf, "env": env, "runs": base / "runs"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The context and the uninterrupted reference run."""
    ctx = make_context(tmp_path_factory.mktemp("resume"))
    ctx["reference"] = run_dir_of(harness(ctx, "train", "tiny", *OVERRIDES, check_rc=0))
    return ctx


def harness(ctx, *args, check_rc=None):
    full = [*args, "--config-dir", str(ctx["conf"]), "--runs-dir", str(ctx["runs"])]
    done = subprocess.run([sys.executable, "-m", "harness", *full], cwd=ctx["base"],
                          env=ctx["env"], capture_output=True, text=True, timeout=600)
    if check_rc is not None and done.returncode != check_rc:
        raise AssertionError(f"harness {' '.join(full)} exited {done.returncode}, expected "
                             f"{check_rc}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def start_and_interrupt(ctx, sig: int, at_step: int):
    """Start `harness train` in its own process group, wait until metrics.jsonl has
    `at_step` steps, send `sig` to the whole group (launcher, training, DataLoader
    workers). Returns (run_dir, exit code, output)."""
    before = set(ctx["runs"].iterdir()) if ctx["runs"].exists() else set()
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "train", "tiny", *OVERRIDES, "--config-dir",
         str(ctx["conf"]), "--runs-dir", str(ctx["runs"])], cwd=ctx["base"], env=ctx["env"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    run_dir = None
    try:
        while time.time() < deadline:
            assert process.poll() is None, "training ended before it could be interrupted:\n" \
                + process.stdout.read()
            new = [p for p in ctx["runs"].iterdir() if p not in before] \
                if ctx["runs"].exists() else []
            if new:
                run_dir = new[0]
                metrics = run_dir / "metrics.jsonl"
                if metrics.exists() and metrics.read_text().count("\n") >= at_step:
                    os.killpg(process.pid, sig)
                    break
            time.sleep(0.005)
        else:
            raise AssertionError("training did not reach the step in time")
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return run_dir, process.returncode, output


def assert_same_as_reference(ctx, run_dir: Path) -> None:
    reference = ctx["reference"]
    assert read_lock(run_dir)["results"]["weights_sha256"] == \
        read_lock(reference)["results"]["weights_sha256"]
    assert loss_bits(run_dir) == loss_bits(reference)
    assert len(loss_bits(run_dir)) == 24
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


def steps_logged(run_dir: Path) -> int:
    return len(loss_bits(run_dir))


def checkpoint_steps(run_dir: Path) -> list:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(setup):
    run_dir, code, _ = start_and_interrupt(setup, signal.SIGKILL, at_step=13)
    assert code == -signal.SIGKILL
    assert not (run_dir / "harness.lock").exists()
    killed_at = steps_logged(run_dir)
    assert 13 <= killed_at < 24
    assert checkpoint_steps(run_dir)[-1] >= 10  # mid-epoch 2 (8 steps per epoch)
    # `harness runs` must not show a killed run as running: its launcher is gone.
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert "resuming from step-" in done.stdout
    assert run_dir_of(done) == run_dir
    assert_same_as_reference(setup, run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["resumes"] == 1


def test_sigterm_checkpoints_at_step_boundary_exits_requeue_code_and_resumes(setup):
    run_dir, code, output = start_and_interrupt(setup, signal.SIGTERM, at_step=7)
    assert code == REQUEUE_EXIT, output
    stopped_at = steps_logged(run_dir)
    assert 7 <= stopped_at < 24
    # The checkpoint is the step boundary the training stopped at, not an older one.
    assert checkpoint_steps(run_dir)[-1] == stopped_at
    assert f"exiting with code {REQUEUE_EXIT}" in (run_dir / "train.log").read_text()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == REQUEUE_EXIT
    assert "--resume" in output
    done = harness(setup, "train", "tiny", *OVERRIDES, "--resume", run_dir.name, check_rc=0)
    assert f"resuming from step-{stopped_at:08d}.pt" in done.stdout
    assert_same_as_reference(setup, run_dir)


def test_damaged_newest_checkpoint_falls_back_to_the_older_one(setup):
    run_dir, code, _ = start_and_interrupt(setup, signal.SIGKILL, at_step=16)
    older, newest = checkpoint_steps(run_dir)[-2:]
    newest_path = run_dir / "checkpoints" / f"step-{newest:08d}.pt"
    newest_path.write_bytes(newest_path.read_bytes()[: newest_path.stat().st_size // 2])
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert f"skipping damaged checkpoint step-{newest:08d}.pt" in done.stdout
    assert f"resuming from step-{older:08d}.pt" in done.stdout
    assert_same_as_reference(setup, run_dir)


def test_resume_refuses_another_config(setup):
    run_dir, _, _ = start_and_interrupt(setup, signal.SIGKILL, at_step=6)
    done = harness(setup, "train", "tiny", *OVERRIDES, "optim.lr=0.5", "--resume",
                   run_dir.name, check_rc=6)
    assert "differs from the run's config" in done.stderr
    assert "optim.lr: run 0.001, given 0.5" in done.stderr
    assert "Traceback" not in done.stderr


def test_resume_refuses_checkpoint_from_another_environment_or_config(setup):
    import torch

    run_dir, _, _ = start_and_interrupt(setup, signal.SIGKILL, at_step=6)
    path = run_dir / "checkpoints" / f"step-{checkpoint_steps(run_dir)[-1]:08d}.pt"
    state = torch.load(path, weights_only=True)
    state["environment"]["torch"] = "0.0.1"
    state["environment_sha256"] = "0" * 64
    torch.save(state, path)
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=6)
    assert "written in another environment" in done.stderr
    assert "torch: checkpoint '0.0.1'" in done.stderr
    state["config_sha256"] = "f" * 64
    torch.save(state, path)
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=6)
    assert "belongs to another config" in done.stderr


def test_resume_of_a_finished_run_is_refused(setup):
    done = harness(setup, "train", "--resume", setup["reference"].name, check_rc=2)
    assert "already finished" in done.stderr


def test_checkpoint_holds_complete_state(setup):
    import torch

    path = sorted((setup["reference"] / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(path, weights_only=True)
    assert state["format"] == "harness.checkpoint/1"
    assert {"model", "optimizer", "scheduler", "rng", "step", "epoch", "position",
            "config_sha256", "environment_sha256", "environment"} <= set(state)
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["step"] == 20 and state["epoch"] == 2 and state["position"] == 4 * 32
    assert len(list((setup["reference"] / "checkpoints").glob("step-*.pt"))) == 2
    assert state["config_sha256"] == read_lock(setup["reference"])["config_sha256"]
