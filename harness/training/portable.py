"""determinism.cpu_isa=portable refuses ops it cannot make portable, before any update.

Portable mode pins ATen's kernels (AVX2), MKL's BLAS (COMPATIBLE branch) and switches
oneDNN and NNPACK off (harness/training/determinism.py). Some ops run in libraries those pins do not
reach, or that no measurement has covered across CPU vendors: MKL's FFT, LAPACK (linear algebra
factorizations and solvers), oneDNN ops called by name, FBGEMM and NNPACK. A run that hits
one would carry the portable label and still give other bits on another vendor's CPU, so
the first training step runs under a dispatch mode that lists every op; one of these stops
the run before the optimizer steps, naming it.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

from harness.errors import ConfigError

# Op name prefix (without the `aten::` namespace) -> the library that would run it.
NOT_PORTABLE: Dict[str, str] = {
    "_fft_": "MKL's FFT", "fft_": "MKL's FFT", "stft": "MKL's FFT", "istft": "MKL's FFT",
    "linalg_": "LAPACK", "_linalg_": "LAPACK", "cholesky": "LAPACK", "svd": "LAPACK",
    "lu_": "LAPACK", "triangular_solve": "LAPACK", "geqrf": "LAPACK", "ormqr": "LAPACK",
    "mkldnn": "oneDNN", "_mkldnn": "oneDNN", "to_mkldnn": "oneDNN",
    "fbgemm": "FBGEMM", "_nnpack": "NNPACK",
}


# linalg ops that are ATen reductions or elementwise math, not LAPACK (F.normalize and
# torch.norm use the first).
ATEN_LINALG = ("linalg_vector_norm", "linalg_cross")


def blocked(op_name: str) -> str:
    """The library behind an op (`aten::_fft_r2c`, or a packet's name) that portable mode
    cannot pin, else ''."""
    namespace, _, name = op_name.rpartition("::")
    if namespace == "quantized":
        return "FBGEMM"
    name = name.split(".")[0]
    if name in ATEN_LINALG:
        return ""
    return next((lib for prefix, lib in NOT_PORTABLE.items() if name.startswith(prefix)), "")


@contextlib.contextmanager
def first_step_check(cfg: Dict, step: int) -> Iterator[None]:
    """Around the first step's forward and backward of a portable run: raise ConfigError
    naming the ops portable mode cannot pin. Elsewhere, nothing."""
    if (cfg["determinism"].get("cpu_isa") != "portable") or step != 0:
        yield
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: List[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if blocked(name) and name not in seen:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with Watch():
        yield
    if seen:
        raise ConfigError(
            "determinism.cpu_isa=portable cannot pin every op of this model: " +
            "; ".join(f"{name} runs in {blocked(name)}" for name in seen) +
            ". These would give other bits on another CPU vendor. Train with "
            "determinism.cpu_isa=native or avx2 (replays on CPUs of this class), or replace "
            "the op.")
