"""The checkpoint file (harness/training/checkpoint.py): damage, old and partial files, format 2."""

from __future__ import annotations

import pytest
import torch

from harness.training import checkpoint


def training_state(step: int = 3, width: int = 600) -> dict:
    """A real state: a model of ~1 M parameters (blocks above CONCURRENT_BLOCK, hashed in
    the second thread, and small ones) and its Adam moments."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 10),
                                torch.nn.Linear(10, width, bias=False))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return {"step": step, "epoch": 0, "position": 64, "config_sha256": "c" * 64,
            "environment_sha256": "e" * 64, "environment": {"torch": str(torch.__version__)},
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": None, "rng": {"torch": torch.get_rng_state()}, "resumes": []}


def test_a_flipped_bit_or_a_missing_checksum_is_damage(tmp_path):
    path = checkpoint.save(tmp_path, training_state())
    intact = path.read_bytes()
    flipped = bytearray(intact)
    flipped[len(flipped) // 2] ^= 0x01  # inside a weight: torch.load alone reads it happily
    path.write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.Damaged, match="does not match its checksum"):
        checkpoint.load(path)
    path.write_bytes(intact)
    checkpoint.load(path)  # the control: the same file, restored, is intact
    checkpoint.checksum_path(path).unlink()
    with pytest.raises(checkpoint.Damaged, match="no checksum beside it"):
        checkpoint.load(path)


def test_old_checkpoints_and_their_checksums_are_removed_together(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, training_state(step, width=20), keep=2)
    names = sorted(p.name for p in checkpoint.directory(tmp_path).iterdir())
    assert names == ["step-00000002.pt", "step-00000002.pt.b3",
                     "step-00000003.pt", "step-00000003.pt.b3"]


def test_partial_writes_and_orphaned_checksums_are_removed(tmp_path):
    path = checkpoint.save(tmp_path, training_state(width=20))
    folder = path.parent
    leftovers = [folder / ".step-00000009.pt.123.tmp", folder / ".step-00000009.pt.b3.123.tmp",
                 folder / "step-00000009.pt.b3", folder / "step-00000008.pt.sha256"]
    for leftover in leftovers:
        leftover.write_text("cut short")
    assert checkpoint.remove_partial_writes(tmp_path) == sorted(p.name for p in leftovers)
    assert sorted(p.name for p in folder.iterdir()) == [path.name, path.name + ".b3"]


def test_a_format_2_checkpoint_is_still_read_and_checked(tmp_path):
    """Written as the harness did before checksums: the hash inside, no file beside it."""
    state = {**training_state(width=20), "format": checkpoint.SEALED_INSIDE}
    state["state_sha256"] = checkpoint.state_sha256(state)
    path = checkpoint.path_for(tmp_path, state["step"])
    path.parent.mkdir()
    torch.save(state, path)
    assert checkpoint.load(path)["checksum"] == {"sha256": state["state_sha256"]}
    state["position"] += 1  # an edit the hash inside does not cover any more
    torch.save(state, path)
    with pytest.raises(checkpoint.Damaged, match="state_sha256"):
        checkpoint.load(path)


def test_a_background_save_writes_what_the_state_was_when_it_was_asked(tmp_path):
    """trainer.checkpoint_async: the state is copied when `save` returns, so a training step
    taken while the thread writes does not reach the file; the file equals a synchronous
    save's, and a failed write is raised by the next wait."""
    state = training_state(step=4)
    for run_dir in ("sync", "async"):
        (tmp_path / run_dir).mkdir()
    synchronous = checkpoint.load(checkpoint.save(tmp_path / "sync", state))
    saver = checkpoint.saver(tmp_path / "async", asynchronous=True)
    path = saver.save(state)
    with torch.no_grad():  # the next step changes the live tensors in place
        for tensor in state["model"].values():
            tensor.add_(1.0)
        state["rng"]["torch"].fill_(0)
    saver.wait()
    written = checkpoint.load(path)
    for key, tensor in synchronous["model"].items():
        assert torch.equal(written["model"][key], tensor)
        assert not torch.equal(state["model"][key], tensor)  # the control: they did change
    assert torch.equal(written["rng"]["torch"], synchronous["rng"]["torch"])
    assert written["optimizer"]["state"][0]["exp_avg"].equal(
        synchronous["optimizer"]["state"][0]["exp_avg"])

    broken = checkpoint.saver(tmp_path / "missing" / "dir", asynchronous=True)
    broken.save(training_state(step=5, width=20))
    with pytest.raises(OSError):
        broken.wait()


def test_host_copy_rebuilds_namedtuples_and_leaves_other_values():
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    tensor = torch.ones(2)
    copied = checkpoint.host_copy({"pair": Pair(tensor, 3), "list": [tensor], "n": None})
    assert isinstance(copied["pair"], Pair) and copied["pair"].b == 3
    assert copied["pair"].a is not tensor and torch.equal(copied["pair"].a, tensor)
    assert copied["list"][0] is not tensor and copied["n"] is None
