"""Checkpoints and resume: a run killed at an arbitrary step (SIGKILL) or stopped by a
preemption signal (SIGTERM) and resumed ends bit for bit where the uninterrupted run ends:
same weights_sha256, same loss bits at every step, byte-identical metrics.jsonl."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    harness,
    loss_bits,
    make_context,
    read_lock,
    run_dir_of,
    run_harness,
    start_and_interrupt,
)

REQUEUE_EXIT = 75
# 3 epochs of 8 steps; checkpoints every 5 steps fall mid-epoch; two DataLoader workers;
# one-cycle LR schedule, Adam and dropout: every piece of state a resume must restore.
OVERRIDES = ["trainer.epochs=3", "trainer.checkpoint_every=5", "trainer.num_workers=2",
             "model.channels=[8,16]", "model.hidden=32", "+scheduler=onecycle"]
TRAIN = ["train", "tiny", *OVERRIDES]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The context and the uninterrupted reference run."""
    ctx = make_context(tmp_path_factory.mktemp("resume"))
    ctx["reference"] = run_dir_of(harness(ctx, "train", "tiny", *OVERRIDES, check_rc=0))
    return ctx


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
    run_dir, code, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=13)
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
    # Negative control: the same, with one weight bit flipped after the first resumed step.
    flipped, _, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=13)
    perturbed = {**setup, "env": {**setup["env"], "HARNESS_PERTURB": "weight-bit"}}
    harness(perturbed, "train", "--resume", flipped.name, check_rc=0)
    with pytest.raises(AssertionError):
        assert_same_as_reference(setup, flipped)


def test_asynchronous_checkpoints_give_the_same_bits_after_sigterm_and_sigkill(setup):
    """trainer.checkpoint_async=true: each checkpoint is written by a thread of its own while
    training goes on. A preempted run still exits only once its checkpoint is on disk, and
    a resume from either kind of stop gives the uninterrupted (synchronous) run's bits."""
    train = [*TRAIN, "trainer.checkpoint_async=true"]
    run_dir, code, output = start_and_interrupt(setup, train, signal.SIGTERM, at_step=7)
    assert code == REQUEUE_EXIT, output
    stopped_at = steps_logged(run_dir)
    assert checkpoint_steps(run_dir)[-1] == stopped_at
    assert list((run_dir / "checkpoints").glob(".*.tmp")) == []  # renamed, not half-written
    harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert_same_as_reference(setup, run_dir)

    killed, code, _ = start_and_interrupt(setup, train, signal.SIGKILL, at_step=13)
    assert code == -signal.SIGKILL and checkpoint_steps(killed)[-1] >= 5
    done = harness(setup, "train", "--resume", killed.name, check_rc=0)
    assert "resuming from step-" in done.stdout
    assert_same_as_reference(setup, killed)
    # Negative control: one weight bit flipped after the first resumed step is caught.
    flipped, _, _ = start_and_interrupt(setup, train, signal.SIGKILL, at_step=13)
    perturbed = {**setup, "env": {**setup["env"], "HARNESS_PERTURB": "weight-bit"}}
    harness(perturbed, "train", "--resume", flipped.name, check_rc=0)
    with pytest.raises(AssertionError):
        assert_same_as_reference(setup, flipped)


@pytest.mark.long
def test_sigterm_checkpoints_at_step_boundary_exits_requeue_code_and_resumes(setup):
    run_dir, code, output = start_and_interrupt(setup, TRAIN, signal.SIGTERM, at_step=7)
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


@pytest.mark.long
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(setup):
    run_dir, code, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=16)
    older, newest = checkpoint_steps(run_dir)[-2:]
    newest_path = run_dir / "checkpoints" / f"step-{newest:08d}.pt"
    newest_path.write_bytes(newest_path.read_bytes()[: newest_path.stat().st_size // 2])
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert f"skipping damaged checkpoint step-{newest:08d}.pt" in done.stdout
    assert f"resuming from step-{older:08d}.pt" in done.stdout
    assert_same_as_reference(setup, run_dir)


def test_resume_refuses_another_config(setup):
    run_dir, _, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=6)
    done = harness(setup, "train", "tiny", *OVERRIDES, "optim.lr=0.5", "--resume",
                   run_dir.name, check_rc=6)
    assert "differs from the run's config" in done.stderr
    assert "optim.lr: run 0.001, given 0.5" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.long
def test_resume_refuses_checkpoint_from_another_environment_or_config(setup):
    import torch

    run_dir, _, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=6)
    path = run_dir / "checkpoints" / f"step-{checkpoint_steps(run_dir)[-1]:08d}.pt"
    state = torch.load(path, weights_only=True)
    state["environment"]["torch"] = "0.0.1"
    state["environment_sha256"] = "0" * 64
    reseal(path, state)  # intact, but foreign
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=6)
    assert "written in another environment" in done.stderr
    assert "torch: checkpoint '0.0.1'" in done.stderr
    state["config_sha256"] = "f" * 64
    reseal(path, state)
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=6)
    assert "belongs to another config" in done.stderr


def test_resume_of_a_finished_run_is_refused(setup):
    done = harness(setup, "train", "--resume", setup["reference"].name, check_rc=2)
    assert "already finished" in done.stderr


def test_checkpoint_holds_complete_state(setup):
    import torch

    path = sorted((setup["reference"] / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(path, weights_only=True)
    assert state["format"] == "harness.training.checkpoint/3"
    assert {"model", "optimizer", "scheduler", "rng", "step", "epoch", "position",
            "config_sha256", "environment_sha256", "environment", "resumes"} <= set(state)
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["step"] == 20 and state["epoch"] == 2 and state["position"] == 4 * 32
    assert len(list((setup["reference"] / "checkpoints").glob("step-*.pt"))) == 2
    assert state["config_sha256"] == read_lock(setup["reference"])["config_sha256"]


def test_a_bit_flip_anywhere_in_a_checkpoint_is_detected_and_skipped(setup):
    """The integrity hash covers every part a resume restores (optimizer moments, RNG
    states, positions), not only the model: one bit flipped in the middle of the newest
    checkpoint (where the Adam moments lie) is skipped like a torn file, and the resume is
    still bit for bit."""
    run_dir, _, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=16)
    older, newest = checkpoint_steps(run_dir)[-2:]
    newest_path = run_dir / "checkpoints" / f"step-{newest:08d}.pt"
    data = bytearray(newest_path.read_bytes())
    data[len(data) // 2] ^= 0x10
    newest_path.write_bytes(bytes(data))
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert f"skipping damaged checkpoint step-{newest:08d}.pt" in done.stdout
    assert f"resuming from step-{older:08d}.pt" in done.stdout
    assert_same_as_reference(setup, run_dir)
    lock = read_lock(run_dir)
    assert [r["from_step"] for r in lock["resumes"]] == [older]


@pytest.mark.long
def test_resume_removes_partial_checkpoint_writes(setup):
    run_dir, _, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=6)
    leftover = run_dir / "checkpoints" / ".step-00000010.pt.12345.tmp"
    leftover.write_bytes(b"half a checkpoint")
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert not leftover.exists()
    assert ".step-00000010.pt.12345.tmp" in done.stdout
    assert_same_as_reference(setup, run_dir)


@pytest.mark.long
def test_checkpoint_of_an_older_format_is_refused_not_resumed_inexactly(setup):
    import torch

    run_dir, _, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=6)
    path = run_dir / "checkpoints" / f"step-{checkpoint_steps(run_dir)[-1]:08d}.pt"
    state = torch.load(path, weights_only=True)
    state["format"] = "harness.training.checkpoint/1"
    reseal(path, state)
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=6)
    assert "harness.training.checkpoint/1" in done.stderr and "exact resume" in done.stderr
    assert "Traceback" not in done.stderr


def reseal(path: Path, state: dict) -> None:
    """Write an edited state where it was, with a matching checksum, as the harness would."""
    import torch

    from harness.digest import file_blake3
    from harness.training import checkpoint

    torch.save(state, path)
    checkpoint.checksum_path(path).write_text(f"{file_blake3(path)}  {path.name}\n")


def wait_until_unlocked(run_dir: Path, timeout: float = 60.0) -> float:
    """Seconds until no process holds the run's writer lock (its writers are gone)."""
    from harness import rundir
    from harness.errors import RunBusy

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            rundir.WriterLock(run_dir).acquire("test").release()
            return time.monotonic() - started
        except RunBusy:
            time.sleep(0.1)
    raise AssertionError(f"{run_dir} still locked after {timeout} s")


@pytest.mark.long
def test_a_killed_launcher_takes_its_training_down_and_the_status_says_so(setup):
    """SIGKILL of the launcher alone: the training process does not live on as a second,
    unseen writer; it checkpoints and stops. The run is then recorded as failed (not left
    'running') when it is next looked at, and resumes bit for bit."""
    run_dir, code, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=6,
                                           group=False)
    assert code == -signal.SIGKILL
    assert wait_until_unlocked(run_dir) < 30
    # It stopped as on a preemption: a checkpoint at the step boundary after the kill, and
    # its last words in the log (its stdout pipe had no reader any more).
    assert checkpoint_steps(run_dir)[-1] >= 6
    assert "SIGTERM received: checkpoint" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    listed = run_harness(["runs", "--runs-dir", str(setup["runs"])], cwd=setup["base"],
                         env=setup["env"], check_rc=0)
    line = next(line for line in listed.stdout.splitlines() if run_dir.name[:20] in line)
    assert "failed" in line
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "launcher" in status["reason"]
    harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert_same_as_reference(setup, run_dir)


@pytest.mark.long
def test_two_resumes_at_once_one_writes_the_other_is_refused(setup):
    run_dir, _, _ = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=6)
    command = [sys.executable, "-m", "harness", "train", "--resume", run_dir.name,
               "--config-dir", str(setup["conf"]), "--runs-dir", str(setup["runs"])]
    both = [subprocess.Popen(command, cwd=setup["base"], env=setup["env"], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in both]
    codes = [process.returncode for process in both]
    assert sorted(codes) == [0, 6], outputs
    refused = outputs[codes.index(6)][1]
    assert f"run {run_dir.name} is being written by pid" in refused
    assert "Traceback" not in refused
    assert_same_as_reference(setup, run_dir)
    assert json.loads((run_dir / "status.json").read_text())["resumes"] == 1
