"""The ops determinism.cpu_isa=portable cannot pin (harness/training/portable.py)."""

import pytest

from harness.training import portable


@pytest.mark.parametrize("name, library", [
    ("aten::_fft_r2c", "MKL's FFT"), ("aten::linalg_svd", "LAPACK"),
    ("aten::_linalg_eigh.default", "LAPACK"), ("aten::mkldnn_convolution", "oneDNN"),
    ("quantized::linear", "FBGEMM"), ("aten::mm", ""), ("aten::convolution_backward", ""),
    ("aten::addmm.default", ""), ("aten::native_batch_norm", ""),
    ("aten::linalg_vector_norm", "")])
def test_which_ops_portable_mode_refuses(name, library):
    assert portable.blocked(name) == library
