"""IDX reading (harness/data.py): raw and gzip files, and a truncated one refused."""

import numpy as np
import pytest

from conftest import write_idx
from harness import data
from harness.errors import DataError


def test_idx_reader_reads_raw_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array, compress=True)
    write_idx(tmp_path / "b", array, compress=False)
    assert (data.read_idx(tmp_path / "a.gz") == array).all()
    assert (data.read_idx(tmp_path / "b") == array).all()
    assert data.content_sha256(tmp_path / "a.gz") == data.content_sha256(tmp_path / "b")


def test_idx_reader_rejects_truncated_file(tmp_path):
    write_idx(tmp_path / "a", np.zeros((4, 28, 28)), compress=False)
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(tmp_path / "a")
