"""Data-parallel training on this machine: 2 ranks on CPU (gloo), through the real CLI.

Two 2-rank runs give identical weights; a rank killed mid-epoch stops the whole run at once
and a resume ends bit for bit where the uninterrupted run ends; a preemption signal makes
every rank checkpoint after the same step; replay proves the run IDENTICAL."""

from __future__ import annotations

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
    loss_bits,
    make_context,
    read_lock,
    require,
    run_dir_of,
    run_harness,
    start_and_interrupt,
)
from test_lockfile import documented_fields, lookup
from test_script import runs_in

REQUEUE_EXIT = 75
# 2 ranks × 16 samples = 32 per step: 8 steps per epoch of the 256 tiny samples, 3 epochs;
# checkpoints every 5 steps fall mid-epoch; dropout draws from each rank's own stream.
OVERRIDES = ["trainer.devices=2", "trainer.batch_size=16", "trainer.epochs=3",
             "trainer.checkpoint_every=5", "determinism.threads=1", "model.channels=[8,16]",
             "model.hidden=32", "+scheduler=onecycle"]
TRAIN = ["train", "tiny", *OVERRIDES]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The context and the uninterrupted reference run."""
    ctx = make_context(tmp_path_factory.mktemp("ddp"))
    ctx["reference"] = run_dir_of(harness(ctx, *TRAIN, check_rc=0))
    return ctx


def assert_same_as_reference(ctx, run_dir: Path) -> None:
    reference = ctx["reference"]
    assert read_lock(run_dir)["results"]["weights_sha256"] == \
        read_lock(reference)["results"]["weights_sha256"]
    assert len(loss_bits(run_dir)) == 24
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


def rank_pid(run_dir: Path, rank: int) -> int:
    """The pid of rank `rank` of the run (a `python -m harness.train RUN_DIR` with RANK=N,
    or in a Slurm job SLURM_PROCID=N)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        in_slurm = b"HARNESS_RANKS=slurm" in environ  # srun: one task per rank
        mark = f"{'SLURM_PROCID' if in_slurm else 'RANK'}={rank}".encode()
        if str(run_dir).encode() in cmdline and mark in environ:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} for {run_dir}")


def test_two_ranks_repeat_bit_for_bit_and_replay_is_identical(setup):
    reference = setup["reference"]
    lock = read_lock(reference)
    ranks = lock["distributed"]["ranks"]
    assert lock["distributed"]["world_size"] == 2 and lock["distributed"]["backend"] == "gloo"
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["device"] == "cpu" for r in ranks)
    assert lock["results"]["steps"] == 24  # 256 samples / (2 ranks × 16) × 3 epochs
    for field in documented_fields(only="distributed"):
        lookup(lock, field)  # fails naming the documented field the lockfile lacks
    again = run_dir_of(harness(setup, *TRAIN, check_rc=0))
    assert_same_as_reference(setup, again)
    # Negative control: both ranks flip one weight bit after step 1; the comparison sees it.
    perturbed = {**setup, "env": {**setup["env"], "HARNESS_PERTURB": "weight-bit"}}
    flipped = run_dir_of(harness(perturbed, *TRAIN, check_rc=0))
    with pytest.raises(AssertionError):
        assert_same_as_reference(setup, flipped)
    listed = run_harness(["runs", "--runs-dir", str(setup["runs"])], cwd=setup["base"],
                         env=setup["env"], check_rc=0).stdout
    assert "local ×2" in listed, listed
    done = subprocess.run([sys.executable, "-m", "harness", "replay", str(reference)],
                          cwd=setup["base"], env=setup["env"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "IDENTICAL" in done.stdout, done.stdout + done.stderr


@pytest.mark.long
def test_rank_killed_mid_epoch_stops_the_run_and_resume_is_exact(setup):
    killed_at = {}

    def kill_rank_1(run_dir):
        killed_at["time"] = time.monotonic()
        os.kill(rank_pid(run_dir, 1), signal.SIGKILL)

    run_dir, code, output = start_and_interrupt(setup, TRAIN, signal.SIGKILL, at_step=11,
                                                send=kill_rank_1)
    stopped_in = time.monotonic() - killed_at["time"]
    assert code == 1, output
    assert stopped_in < 30, f"the run took {stopped_in:.0f} s to stop after a rank died"
    assert "rank 1 was killed by SIGKILL" in output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed"
    assert "rank 1 was killed by SIGKILL" in status["error"]["message"]
    assert not (run_dir / "harness.lock").exists()
    done = harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert "resuming from step-0000001" in done.stdout  # step 10: mid-epoch 2
    assert_same_as_reference(setup, run_dir)


@pytest.mark.long
def test_preemption_checkpoints_every_rank_at_one_step_and_resumes_exactly(setup):
    # SIGTERM to the launcher alone: it passes it on; ranks agree on a step.
    run_dir, code, output = start_and_interrupt(setup, TRAIN, signal.SIGTERM, at_step=7,
                                                group=False)
    assert code == REQUEUE_EXIT, output
    stopped_at = len(loss_bits(run_dir))
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert saved[-1] == f"step-{stopped_at:08d}.pt"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    harness(setup, "train", "--resume", run_dir.name, check_rc=0)
    assert_same_as_reference(setup, run_dir)
    assert read_lock(run_dir)["resumes"][0]["from_step"] == stopped_at


@pytest.mark.long
def test_resume_with_another_world_size_is_refused_naming_both(setup):
    run_dir, code, _ = start_and_interrupt(setup, TRAIN, signal.SIGTERM, at_step=3, group=False)
    assert code == REQUEUE_EXIT
    done = harness(setup, "train", "tiny", *OVERRIDES, "trainer.devices=1",
                   "--resume", run_dir.name, check_rc=6)
    assert "trainer.devices: run 2, given 1" in done.stderr, done.stderr


@pytest.mark.parametrize("override, message", [
    ("trainer.nodes=2", "trainer.nodes=2 needs backend=slurm"),
    ("trainer.devices=0", "trainer.devices=0; it must be >= 1"),
])
def test_a_world_the_backend_cannot_run_is_refused_before_anything_is_written(
        setup, override, message):
    before = set(setup["runs"].iterdir())
    done = harness(setup, "train", "tiny", override, check_rc=2)
    assert message in done.stderr, done.stderr
    assert set(setup["runs"].iterdir()) == before


# ---------------------------------------------------------------- Slurm: one task per rank

SLURM = [*OVERRIDES, "backend.slurm.cpus_per_task=1"]  # 2 tasks on the 2-CPU test node


@pytest.fixture(scope="module")
def cluster(setup):
    from test_slurm import slurm_up

    require(slurm_up(), "Slurm is not running here (make slurm-env)")
    return setup


@pytest.mark.slurm
@pytest.mark.long
def test_two_task_slurm_job_gives_the_local_two_rank_weights(cluster):
    done = harness(cluster, "submit", "tiny", *SLURM, "--wait", check_rc=0)
    run_dir = run_dir_of(done)
    assert_same_as_reference(cluster, run_dir)
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "srun --kill-on-bad-exit=1" in script
    ranks = read_lock(run_dir)["distributed"]["ranks"]
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 0, 0),
                                                                              (1, 0, 1)]


@pytest.mark.slurm
@pytest.mark.long
def test_requeued_two_task_job_resumes_every_rank_exactly(cluster):
    from test_slurm import status_of, wait_for_steps

    run_dir = run_dir_of(harness(cluster, "submit", "tiny", *SLURM, check_rc=0))
    job_id = status_of(run_dir)["slurm_job_id"]
    wait_for_steps(run_dir, 9)
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # a preempting job
    done = harness(cluster, "slurm", "status", run_dir.name, "--wait", check_rc=0)
    assert "succeeded" in done.stdout
    log = (run_dir / "slurm.out").read_text()
    assert "exiting with code 75" in log and "harness: resuming from step-" in log, log
    assert status_of(run_dir)["slurm_restarts"] >= 1
    assert_same_as_reference(cluster, run_dir)




@pytest.mark.slurm
@pytest.mark.long
def test_rank_killed_in_a_slurm_job_fails_it_and_resume_is_exact(cluster):
    from test_slurm import status_of, wait_for_steps

    run_dir = run_dir_of(harness(cluster, "submit", "tiny", *SLURM, check_rc=0))
    wait_for_steps(run_dir, 11)
    started = time.monotonic()
    os.kill(rank_pid(run_dir, 1), signal.SIGKILL)
    done = harness(cluster, "slurm", "status", run_dir.name, "--wait", check_rc=1)
    assert time.monotonic() - started < 60, "the job did not end after a rank died"
    status = status_of(run_dir)
    assert status["state"] == "failed", (status, done.stdout)
    assert not (run_dir / "harness.lock").exists()
    resumed = harness(cluster, "train", "--resume", run_dir.name, check_rc=0)
    assert "resuming from step-0000001" in resumed.stdout  # step 10: mid-epoch 2
    assert_same_as_reference(cluster, run_dir)


def pair_up() -> bool:
    """The test cluster's two extra nodes (partition pair, slurm/two-nodes.sh) are idle."""
    done = subprocess.run(["sinfo", "-h", "-p", "pair", "-o", "%T"], capture_output=True,
                          text=True)
    return done.returncode == 0 and set(done.stdout.split()) <= {"idle", "mixed"} \
        and bool(done.stdout.split())


@pytest.mark.slurm
def test_two_node_job_gives_the_local_two_rank_weights(cluster):
    """Nodes n1 and n2 are network namespaces of this machine, each with its own slurmd,
    address and host name: the ranks rendezvous over the network between them."""
    require(pair_up(), "the test cluster's nodes n1, n2 are not up (make slurm-env)")
    overrides = [o for o in SLURM if not o.startswith("trainer.devices")]
    done = harness(cluster, "submit", "tiny", *overrides, "trainer.devices=1", "trainer.nodes=2",
                   "backend.slurm.partition=pair", "--wait", check_rc=0)
    run_dir = run_dir_of(done)
    assert_same_as_reference(cluster, run_dir)  # world 2 either way: the same bits
    ranks = read_lock(run_dir)["distributed"]["ranks"]
    assert [(r["rank"], r["node_rank"], r["host"]) for r in ranks] == [(0, 0, "n1"),
                                                                        (1, 1, "n2")]


# ---------------------------------------------------------------- harness run --nproc N

DDP_SCRIPT = Path(__file__).resolve().parent / "fixtures" / "user_ddp_train.py"
RUN_DDP = ["run", "backend=local", "--nproc", "2", "--input", "data.npz", "--output",
           "out/model.pt", "--", "python", "train.py", "--data", "data.npz"]


@pytest.fixture
def ddp_project(project):
    directory, harness = project
    shutil.copy(DDP_SCRIPT, directory / "train.py")
    return directory, harness


@pytest.mark.long
def test_nproc_starts_torchrun_style_ranks_that_repeat_bit_for_bit(ddp_project):
    directory, harness = ddp_project
    first = run_dir_of(harness(*RUN_DDP, check_rc=0))
    second = run_dir_of(harness(*RUN_DDP, check_rc=0))
    assert "rank 0 of 2: saved out/model.pt" in (first / "train.log").read_text()
    outputs = read_lock(first)["results"]["outputs"]
    assert outputs == read_lock(second)["results"]["outputs"]
    assert read_lock(first)["config"]["command"]["nproc"] == 2
    assert len(read_lock(first)["script"]["processes"]) == 2  # both seeded and pinned


@pytest.mark.long
def test_nproc_rank_that_fails_stops_the_others_and_is_named(ddp_project):
    directory, harness = ddp_project
    done = harness(*RUN_DDP, "--fail-rank", "1", check_rc=3)
    assert "rank 1 exited with code 3" in done.stdout + done.stderr
    run_dir = directory / "runs" / runs_in(directory)[-1]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "rank 1 exited with code 3" in \
        status["error"]["message"]
