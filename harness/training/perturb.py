"""Negative controls (as Megatron-Core's determinism tests have them): the same run with one
bit flipped, so that a comparison shows it can fail. A comparison that cannot tell a
perturbed run apart from the original proves nothing, whatever it says.

`harness replay RUN --negative-control` sets PERTURB for a second replay (and a test may set it
for `harness train`); the training loop then flips one bit of one weight right after the
first optimizer step the process takes: mantissa bit 10 of
the first element of the model's first parameter (a change of about 1e-4 of it; the lowest
bit can vanish in a convolution's sums, measured in cpu_isa=portable). Off unless asked.
"""

from __future__ import annotations

import os
from typing import Dict

from harness.env import PERTURB

WEIGHT_BIT = "weight-bit"
BIT = 10
DESCRIPTION = (f"bit {BIT} of the first weight of the model's first parameter, flipped after "
               f"the first optimizer step the training process takes")
_flipped = False


def environment() -> Dict[str, str]:
    """What a launcher passes on to the training process (any backend)."""
    return {PERTURB: os.environ[PERTURB]} if os.environ.get(PERTURB) else {}


def after_step(model) -> None:
    """In the training loop, after each optimizer step: the perturbation, where asked, once
    per process (after step 1 of a new run; after the first resumed step of a resume)."""
    global _flipped
    if _flipped or os.environ.get(PERTURB) != WEIGHT_BIT:
        return
    import torch

    first = next(model.parameters())
    index = (0,) * first.dim()  # its first element, whatever its layout
    with torch.no_grad():
        value = first[index]
        if first.dtype == torch.float32:
            value.view(torch.int32).bitwise_xor_(1 << BIT)
        else:  # other widths: the same relative change, about 1e-4
            value.mul_(1 + 2.0 ** (BIT - 23))
    _flipped = True
