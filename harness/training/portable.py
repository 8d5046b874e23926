"""determinism.cpu_isa=portable refuses ops it cannot make portable, before any update.

Portable mode pins ATen's kernels (AVX2), MKL's BLAS (COMPATIBLE branch), switches
oneDNN and NNPACK off and computes float32 square roots itself (harness/training/
determinism.py, portable_math.py). Some ops run in libraries those pins do not reach, or
that no measurement has covered across CPU vendors: MKL's FFT, LAPACK (linear algebra
factorizations and solvers), oneDNN ops called by name, FBGEMM, NNPACK, and the
elementwise functions ATen hands to MKL's vector math (VML). A run that hits
one would carry the portable label and still give other bits on another vendor's CPU, so
the first training step runs under a dispatch mode that lists every op; one of these stops
the run before the optimizer steps, naming it.
"""

from __future__ import annotations

import contextlib
from typing import Dict, FrozenSet, Iterable, Iterator, List, Tuple

from harness.errors import ConfigError

# Op name prefix (without the `aten::` namespace) -> the library that would run it.
NOT_PORTABLE: Dict[str, str] = {
    "_fft_": "MKL's FFT", "fft_": "MKL's FFT", "stft": "MKL's FFT", "istft": "MKL's FFT",
    "linalg_": "LAPACK", "_linalg_": "LAPACK", "cholesky": "LAPACK", "svd": "LAPACK",
    "lu_": "LAPACK", "triangular_solve": "LAPACK", "geqrf": "LAPACK", "ormqr": "LAPACK",
    "mkldnn": "oneDNN", "_mkldnn": "oneDNN", "to_mkldnn": "oneDNN",
    "fbgemm": "FBGEMM", "_nnpack": "NNPACK",
}


# Elementwise ops ATen hands to MKL's vector math (VML) for CPU tensors of each dtype: their
# bits change with MKL_CBWR, so MKL picks them per CPU (measured 2026-12-08, torch 2.13).
VECTOR_MATH: Dict[str, FrozenSet[str]] = {
    "float32": frozenset({"acos", "asin", "atan", "erf", "erfc", "erfinv", "exp", "log",
                          "log10", "log2", "sqrt", "tan", "tanh"}),
}
VECTOR_MATH["float64"] = VECTOR_MATH["float32"] | {"cos", "sin"}
# Of those, what portable mode runs: float32 sqrt in its own kernel (portable_math.py), and
# float32 exp and tanh, which an Intel Xeon (Sapphire Rapids class) and an AMD EPYC (Zen 4)
# computed alike on MKL's COMPATIBLE branch (cpu-ops `exp_log_tanh`, 2^20 values of
# N(0, 1); tests/golden/machines/*/cpu-ops.json). MKL's sqrt on the same branch did not.
VECTOR_MATH_PORTABLE: Dict[str, FrozenSet[str]] = {"float32": frozenset({"sqrt", "exp",
                                                                         "tanh"})}


# linalg ops that are ATen reductions or elementwise math, not LAPACK (F.normalize and
# torch.norm use the first).
ATEN_LINALG = ("linalg_vector_norm", "linalg_cross")


def blocked(op_name: str, dtype: str = "") -> str:
    """The library behind an op (`aten::_fft_r2c`, or a packet's name) on tensors of `dtype`
    (`float32`; '' when unknown) that portable mode cannot pin, else ''."""
    namespace, _, name = op_name.rpartition("::")
    if namespace == "quantized":
        return "FBGEMM"
    name = name.split(".")[0]
    if name in ATEN_LINALG:
        return ""
    function = name.removeprefix("_foreach_").rstrip("_")
    unpinned = VECTOR_MATH.get(dtype, frozenset()) - VECTOR_MATH_PORTABLE.get(dtype, frozenset())
    if function in unpinned:
        return "MKL's vector math (VML)"
    return next((lib for prefix, lib in NOT_PORTABLE.items() if name.startswith(prefix)), "")


def _dtype_of(args) -> str:
    """The dtype of an op's first tensor argument (or of the first in a list), as `float32`."""
    first = args[0] if args else None
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    dtype = getattr(first, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def blocked_in_trace(ops: List[Dict]) -> List[Tuple[str, str]]:
    """(op, library) of the ops in op-trace entries (harness/record/op_trace.py's format)
    that portable mode cannot pin, each once, in the order first dispatched."""
    return unpinnable((op["op"], op["in"][0][2] if op.get("in") else "") for op in ops)


def unpinnable(ops: Iterable[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """(op, library) of the (op, dtype) pairs that portable mode cannot pin, each op once,
    in order."""
    found: List[Tuple[str, str]] = []
    for name, dtype in ops:
        library = blocked(name, dtype)
        if library and (name, library) not in found:
            found.append((name, library))
    return found


def refusal(found: List[Tuple[str, str]]) -> str:
    """The message that stops a portable run whose ops include `found`."""
    return ("determinism.cpu_isa=portable cannot pin every op of this model: " +
            "; ".join(f"{name} runs in {library}" for name, library in found) +
            ". These would give other bits on another CPU vendor. Train with "
            "determinism.cpu_isa=native or avx2 (replays on CPUs of this class), or replace "
            "the op.")


@contextlib.contextmanager
def first_step_check(cfg: Dict, step: int) -> Iterator[None]:
    """Around the first step's forward and backward of a portable run: raise ConfigError
    naming the ops portable mode cannot pin. Elsewhere, nothing."""
    if (cfg["determinism"].get("cpu_isa") != "portable") or step != 0:
        yield
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    dispatched: List[Tuple[str, str]] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dispatched.append((func.name(), _dtype_of(args)))
            return func(*args, **(kwargs or {}))

    with Watch():
        yield
    found = unpinnable(dispatched)
    if found:
        raise ConfigError(refusal(found))
