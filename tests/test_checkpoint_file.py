"""The checkpoint file and its checksum: the checksum computed while writing is the file's
BLAKE3, as the reference implementation computes it in a second pass; a checkpoint from
before BLAKE3, with `sha256sum`'s checksum beside it (run here), is still read and checked.
The in-process checks of the checkpoint file are in tests/unit/test_checkpoint.py."""

from __future__ import annotations

import subprocess

import blake3
import pytest
import torch
from unit.test_checkpoint import training_state

from harness.digest import file_sha256
from harness.training import checkpoint


def test_the_checksum_written_is_the_files_blake3(tmp_path):
    path = checkpoint.save(tmp_path, training_state())
    sums = checkpoint.checksum_path(path)
    assert sums.name == path.name + ".b3"
    # b3sum's format, with the hash the reference implementation's bindings compute anew.
    expected = blake3.blake3(path.read_bytes()).hexdigest()
    assert sums.read_text() == f"{expected}  {path.name}\n"
    state = checkpoint.load(path)
    assert state["checksum"] == {"blake3": expected}
    assert state["format"] == checkpoint.FORMAT
    reference = training_state()["model"]
    assert all(torch.equal(state["model"][k], reference[k]) for k in reference)


def test_a_checkpoint_with_a_sha256_beside_it_is_still_read_and_checked(tmp_path):
    # As a harness before 2026-12-08 left it: the same file, `sha256sum`'s line beside it.
    path = checkpoint.save(tmp_path, training_state())
    checkpoint.checksum_path(path).unlink()
    sums = path.with_name(path.name + ".sha256")
    sums.write_text(f"{file_sha256(path)}  {path.name}\n")
    checked = subprocess.run(["sha256sum", "-c", sums.name], cwd=path.parent,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checkpoint.load(path)["checksum"] == {"sha256": file_sha256(path)}
    intact = path.read_bytes()
    flipped = bytearray(intact)
    flipped[len(flipped) // 2] ^= 0x01  # the negative control: one bit in a weight
    path.write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.Damaged, match=r"does not match its checksum \(.*\.sha256\)"):
        checkpoint.load(path)
