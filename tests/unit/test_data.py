"""IDX reading (harness/datasets.py): raw and gzip files, and a truncated one refused."""

import numpy as np
import pytest
from conftest import write_idx

from harness.errors import DataError
from harness.training import datasets


def test_idx_reader_reads_raw_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array, compress=True)
    write_idx(tmp_path / "b", array, compress=False)
    assert (datasets.read_idx(tmp_path / "a.gz") == array).all()
    assert (datasets.read_idx(tmp_path / "b") == array).all()
    assert datasets.content_sha256(tmp_path / "a.gz") == datasets.content_sha256(tmp_path / "b")


def test_idx_reader_rejects_truncated_file(tmp_path):
    write_idx(tmp_path / "a", np.zeros((4, 28, 28)), compress=False)
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        datasets.read_idx(tmp_path / "a")
