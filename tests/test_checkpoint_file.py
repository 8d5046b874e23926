"""The checkpoint file and its checksum: the checksum computed while writing is the file's
sha256, as `sha256sum` (run here) computes it in a second pass. The in-process checks of
the checkpoint file are in tests/unit/test_checkpoint.py."""

from __future__ import annotations

import subprocess

import torch
from unit.test_checkpoint import training_state

from harness.digest import file_sha256
from harness.training import checkpoint


def test_the_checksum_written_is_the_files_sha256(tmp_path):
    path = checkpoint.save(tmp_path, training_state())
    sums = checkpoint.checksum_path(path)
    assert sums.read_text() == f"{file_sha256(path)}  {path.name}\n"
    checked = subprocess.run(["sha256sum", "-c", sums.name], cwd=path.parent,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    state = checkpoint.load(path)
    assert state["sha256"] == file_sha256(path)
    assert state["format"] == checkpoint.FORMAT
    reference = training_state()["model"]
    assert all(torch.equal(state["model"][k], reference[k]) for k in reference)
