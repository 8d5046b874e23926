"""The float32 square root of determinism.cpu_isa=portable: correctly rounded, in ATen's own
kernels, so Intel and AMD CPUs give the same bits.

torch.sqrt of a float32 or float64 CPU tensor runs in MKL's vector math library (VML), not
in ATen: its bits change with MKL_CBWR, so MKL picks them per CPU. Measured on 2026-12-08:
under MKL_CBWR=COMPATIBLE,STRICT (the portable pin) an Intel Xeon (Sapphire Rapids class)
and an AMD EPYC (Zen 4) gave other bits for Adam's `exp_avg_sq.sqrt()` from identical
inputs (`harness replay` named aten::sqrt, step 1), and on the Intel CPU 17 % of float32
square roots on that branch were 1 ulp away from the correctly rounded value.

IEEE 754 defines one correctly rounded square root, so a kernel that always returns it
gives the same bits on every CPU. This one is float64 arithmetic in ATen's own kernels:
x * rsqrt(x), where ATen's float64 rsqrt is 1 / sqrt, each step rounded by IEEE 754. The
float64 result is within 2 ulp (float64) of sqrt(x), while sqrt of a float32 lies at least
2^-50 (relative) from any point halfway between two float32s, so rounding it to float32
gives the correctly rounded result. Checked for every float32 in [1, 4) and every subnormal
(every other input is one of those times a power of 4, which scales the float64 steps
exactly): identical to numpy's float32 sqrt (the CPU's sqrt instruction) under
ATEN_CPU_CAPABILITY default, avx2 and avx512 (tests/unit/test_portable_math.py samples it).
Zero and infinity take IEEE's results; NaN and negative numbers give NaN.

Cost: about 1.7x torch.sqrt (10 M floats, 2 threads: 33 ms against 20 ms; one Adam step
of 10 M parameters is 46 ms), worked through in blocks that stay in the CPU's cache.

`install` makes it the CPU kernel of aten::sqrt, and of aten::pow with exponent 0.5 (ATen
hands that to the same MKL kernel), with their out= and in-place forms, for float32, in
portable mode only; other dtypes and exponents call the kernel it replaced. determinism.audit
records it (in_effect.sqrt_kernel), so a portable run from before it is told apart at replay.
"""

from __future__ import annotations

import math

# The value determinism.audit records under in_effect.sqrt_kernel while installed.
NAME = "harness-correctly-rounded-float32"
# Elements per block: the float64 temporaries of a block stay in a core's L2 cache.
BLOCK = 1 << 16

_library = None  # the torch.library registration, kept alive while installed


def correctly_rounded_sqrt(x):
    """sqrt of a float32 tensor, correctly rounded (to nearest, ties to even)."""
    import torch

    flat = x.reshape(-1)
    if flat.numel() <= BLOCK:
        return _block(flat).view(x.shape)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), BLOCK):
        out[start:start + BLOCK] = _block(flat[start:start + BLOCK])
    return out.view(x.shape)


def _block(x):
    import torch

    wide = x.double()
    y = wide.rsqrt().mul_(wide).float()
    # x * rsqrt(x) is NaN at 0 and infinity, where sqrt returns x itself.
    return torch.where((x == 0) | (x == math.inf), x, y)


def install() -> None:
    """Make aten::sqrt on float32 CPU tensors correctly rounded in this process, and
    aten::pow with exponent 0.5, which ATen hands to the same MKL kernel."""
    global _library
    if _library is not None:
        return
    import warnings

    import torch

    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": meant
        warnings.simplefilter("ignore", UserWarning)
        for overload, form in FORMS.items():
            original = torch.library.get_kernel(f"aten::{overload}", "CPU")
            library.impl(overload, _kernel(original, form, overload.startswith("pow")), "CPU")
    _library = library


def installed() -> bool:
    return _library is not None


# The overloads replaced, and where each takes its result: returned, in out=, in self.
FORMS = {"sqrt": "functional", "sqrt.out": "out", "sqrt_": "inplace",
         "pow.Tensor_Scalar": "functional", "pow.Tensor_Scalar_out": "out",
         "pow_.Scalar": "inplace"}


def _kernel(original, form: str, is_pow: bool):
    """The replacement kernel of one overload: `form` as in FORMS; `is_pow` for aten::pow's,
    whose second argument is the exponent."""
    import torch

    def kernel(*args, **kwargs):
        x = args[0]
        if x.dtype != torch.float32 or (is_pow and args[1] != 0.5):
            return original.call_boxed(torch._C._dispatch_keyset_full(), *args, **kwargs)
        result = correctly_rounded_sqrt(x)
        if form == "functional":
            return result
        target = x if form == "inplace" else kwargs.get("out", args[-1])
        return target.resize_(result.shape).copy_(result)

    return kernel
