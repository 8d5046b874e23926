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


@pytest.mark.parametrize("name, dtype, library", [
    ("aten::sqrt", "float32", ""), ("aten::_foreach_sqrt_", "float32", ""),
    ("aten::exp.default", "float32", ""), ("aten::tanh", "float32", ""),
    ("aten::log", "float32", "MKL's vector math (VML)"),
    ("aten::erf_", "float32", "MKL's vector math (VML)"),
    ("aten::_foreach_log.default", "float32", "MKL's vector math (VML)"),
    ("aten::sqrt", "float64", "MKL's vector math (VML)"),
    ("aten::sin", "float64", "MKL's vector math (VML)"), ("aten::sin", "float32", ""),
    ("aten::log", "bfloat16", ""), ("aten::log_softmax", "float32", "")])
def test_vector_math_ops_are_refused_by_dtype_unless_portable(name, dtype, library):
    assert portable.blocked(name, dtype) == library
