"""Portable mode's float32 square root (harness/training/portable_math.py) is the correctly
rounded one. The reference is numpy's float32 sqrt: the CPU's IEEE sqrt instruction."""

import math
import subprocess
import sys

import numpy as np
import torch

from harness.training import portable_math


def bits_differ(found: torch.Tensor, x: torch.Tensor) -> int:
    with np.errstate(invalid="ignore"):
        reference = np.sqrt(x.numpy())
    found = found.numpy()
    same = (found.view(np.int32) == reference.view(np.int32)) | (np.isnan(found) &
                                                                 np.isnan(reference))
    return int((~same).sum())


def in_child(code: str, tmp_path, **env) -> object:
    """Run `code` (which saves `result`) in a fresh interpreter: installing the kernel, or an
    MKL branch, is for the whole process."""
    out = tmp_path / "result.pt"
    program = f"import torch\n{code}\ntorch.save(result, {str(out)!r})"
    subprocess.run([sys.executable, "-c", program], check=True,
                   env={"PATH": "/usr/bin:/bin", **env})
    return torch.load(out)


def test_it_is_correctly_rounded_where_mkls_sqrt_is_not(tmp_path):
    # Every 61st float32 in [1, 4) (any other normal float32 is one of those times a power
    # of 4), every 61st subnormal, a sweep over the whole range, and IEEE's special values.
    every_61st = torch.arange(0x3F800000, 0x40800000, 61, dtype=torch.int64)
    subnormal = torch.arange(1, 0x00800000, 61, dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    sweep = torch.rand(1 << 18, generator=generator) * torch.logspace(-44, 38, 1 << 18)
    x = torch.cat([every_61st.to(torch.int32).view(torch.float32),
                   subnormal.to(torch.int32).view(torch.float32), sweep.float(),
                   torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -1.0, 3.4e38])])
    assert bits_differ(portable_math.correctly_rounded_sqrt(x), x) == 0
    # The negative control: MKL's sqrt on the portable pin's branch misses for some of
    # these, so the comparison can fail.
    torch.save(x, tmp_path / "x.pt")
    mkl = in_child(f"result = torch.sqrt(torch.load({str(tmp_path / 'x.pt')!r}))", tmp_path,
                   MKL_CBWR="COMPATIBLE,STRICT")
    assert bits_differ(mkl, x) > 1000


FORMS = {"function": "torch.sqrt(x)", "method": "x.sqrt()", "power": "x ** 0.5",
         "foreach": "torch._foreach_sqrt([x])[0]", "in-place": "x.clone().sqrt_()",
         "power in-place": "x.clone().pow_(0.5)", "out=": "torch.sqrt(x, out=torch.empty(0))",
         "strided": "torch.sqrt(x.view(64, -1).t()).t().reshape(-1)"}


def test_once_installed_every_form_of_sqrt_takes_it_and_other_dtypes_do_not(tmp_path):
    found = in_child(f"""
from harness.training import portable_math
portable_math.install()
x = torch.rand(1 << 14, generator=torch.Generator().manual_seed(2)) * 1e-3
forms = {{{", ".join(f"{name!r}: {expr}" for name, expr in FORMS.items())}}}
wide = x.double()
result = (x, forms, torch.sqrt(wide), wide ** 0.5, x.pow(2),
          portable_math.installed())""", tmp_path, MKL_CBWR="COMPATIBLE,STRICT")
    x, forms, wide_sqrt, wide_power, square, installed = found
    assert installed
    for name, result in forms.items():
        assert bits_differ(result, x) == 0, name
    assert torch.equal(square, x * x)  # other exponents: ATen's kernel
    # float64 keeps MKL's kernel: the same bits as without the install.
    mkl = in_child("x = torch.rand(1 << 14, generator=torch.Generator().manual_seed(2)) * 1e-3\n"
                   "result = torch.sqrt(x.double())", tmp_path, MKL_CBWR="COMPATIBLE,STRICT")
    assert torch.equal(wide_sqrt, mkl) and torch.equal(wide_power, mkl)


def test_gradients_flow_through_it(tmp_path):
    grad = in_child("""
from harness.training import portable_math
portable_math.install()
x = torch.tensor([4.0, 2.0], requires_grad=True)
x.sqrt().sum().backward()
result = x.grad""", tmp_path)
    assert torch.allclose(grad, torch.tensor([0.25, 0.5 / math.sqrt(2.0)]))
