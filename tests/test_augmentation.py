"""A user's dataset that draws random numbers in __getitem__ (torch, numpy and python
generators, in DataLoader workers): each sample's randomness is a pure function of
(seed, epoch, sample index), so results do not depend on num_workers, on which worker built
a sample, or on where a resume started."""

from __future__ import annotations

import re
import signal

import pytest
from conftest import harness, loss_bits, make_context, read_lock, run_dir_of, start_and_interrupt

# 3 epochs of 8 steps, checkpoints mid-epoch.
OVERRIDES = ["trainer.epochs=3", "trainer.checkpoint_every=5", "model.channels=[8,16]",
             "model.hidden=32"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return make_context(tmp_path_factory.mktemp("augment"), dataset="augmenting.AugmentingIdx")


def train(ctx, workers: int):
    done = harness(ctx, "train", "tiny", *OVERRIDES, f"trainer.num_workers={workers}",
                   check_rc=0)
    return run_dir_of(done)


@pytest.fixture(scope="module")
def reference(ctx):
    return train(ctx, 3)


@pytest.mark.long
def test_num_workers_does_not_change_an_augmenting_run(ctx, reference):
    expected = read_lock(reference)["results"]["weights_sha256"]
    for workers in (0, 2):
        run_dir = train(ctx, workers)
        assert read_lock(run_dir)["results"]["weights_sha256"] == expected, workers
        assert loss_bits(run_dir) == loss_bits(reference)


def test_augmentation_is_random_across_samples_and_epochs(ctx, reference):
    """The augmentation really draws random numbers: the plain dataset trains to other
    losses, so the equalities above are not those of a dataset that ignores them."""
    plain = make_context(ctx["base"] / "plain")
    plain_run = run_dir_of(harness(plain, "train", "tiny", *OVERRIDES,
                                   "trainer.num_workers=3", check_rc=0))
    assert loss_bits(plain_run) != loss_bits(reference)


@pytest.mark.long
def test_sigkill_mid_epoch_then_resume_with_three_workers_is_bitwise(ctx, reference):
    args = ["train", "tiny", *OVERRIDES, "trainer.num_workers=3"]
    run_dir, code, _ = start_and_interrupt(ctx, args, signal.SIGKILL, at_step=13)
    assert code == -signal.SIGKILL
    done = harness(ctx, "train", "--resume", run_dir.name, check_rc=0)
    resumed_at = int(re.search(r"resuming from step-(\d{8})\.pt", done.stdout).group(1))
    assert resumed_at in (10, 15)  # mid-epoch 2: the newest checkpoint before the kill
    assert read_lock(run_dir)["results"]["weights_sha256"] == \
        read_lock(reference)["results"]["weights_sha256"]
    assert loss_bits(run_dir) == loss_bits(reference)
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
