"""Which CPU math settings give the same bits on different machines, op by op.

Runs a fixed set of training ops (gemm, conv2d forward and backward, batch norm, linear
backward, log_softmax + nll, vector math, a reduction, an Adam step, a dropout mask, layer
norm and softmax forward and backward), and each function ATen hands to MKL's vector math
alone (`vml_*`, over a wide range of inputs; tables before 2026-12-08 lack them), on fixed
inputs, under each setting of the CPU-kernel
pins in SETTINGS, each in a fresh interpreter (the pins only take effect before torch
loads), and keeps a sha256 (16 hex digits) of every op's output bits. Two machines whose
tables agree for a setting compute those ops alike under it.

The ops and settings are those of the table format in ../shared/reference/cpu-ops/, so
tables recorded by either compare key by key; `portable` is determinism.cpu_isa=portable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

from harness.host import machine_class

_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_DEFAULT = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
# `_MKLDNN=0` switches torch.backends.mkldnn off, `_NNPACK=0` torch.backends.nnpack,
# `_THREADS` sets the thread count (2).
SETTINGS: Dict[str, Dict[str, str]] = {
    "native": {},
    "pin-avx2": {**_AVX2, "MKL_CBWR": "AVX2"},
    "pin-avx2+cbwr-compatible": {**_AVX2, "MKL_CBWR": "COMPATIBLE"},
    "pin-default": {**_DEFAULT, "MKL_CBWR": "COMPATIBLE"},
    "pin-avx2 mkldnn-off": {**_AVX2, "MKL_CBWR": "AVX2", "_MKLDNN": "0"},
    "pin-default mkldnn-off": {**_DEFAULT, "MKL_CBWR": "COMPATIBLE", "_MKLDNN": "0"},
    "pin-avx2 1-thread": {**_AVX2, "MKL_CBWR": "AVX2", "_THREADS": "1"},
    "pin-default 1-thread": {**_DEFAULT, "MKL_CBWR": "COMPATIBLE", "_THREADS": "1"},
    "pin-default mkldnn-off 1-thread": {**_DEFAULT, "MKL_CBWR": "COMPATIBLE", "_MKLDNN": "0",
                                        "_THREADS": "1"},
    "pin-avx2+cbwr-compatible mkldnn-off": {**_AVX2, "MKL_CBWR": "COMPATIBLE", "_MKLDNN": "0"},
    "pin-avx2+cbwr-compatible mkldnn-off 1-thread": {**_AVX2, "MKL_CBWR": "COMPATIBLE",
                                                     "_MKLDNN": "0", "_THREADS": "1"},
    "native mkldnn-off": {"_MKLDNN": "0"},
    "pin-default+cbwr-strict mkldnn-off": {**_DEFAULT, "MKL_CBWR": "COMPATIBLE,STRICT",
                                           "_MKLDNN": "0"},
    "pin-avx2+cbwr-strict mkldnn-off": {**_AVX2, "MKL_CBWR": "COMPATIBLE,STRICT",
                                        "_MKLDNN": "0"},
    "pin-avx2+cbwr-strict mkldnn-off 1-thread": {**_AVX2, "MKL_CBWR": "COMPATIBLE,STRICT",
                                                 "_MKLDNN": "0", "_THREADS": "1"},
    "pin-avx2+cbwr-strict mkldnn-off nnpack-off": {**_AVX2, "MKL_CBWR": "COMPATIBLE,STRICT",
                                                   "_MKLDNN": "0", "_NNPACK": "0"},
}
# determinism.cpu_isa=portable (2 threads), with its own float32 sqrt (`_SQRT=1`,
# harness/training/portable_math.py). Tables recorded before that hold its predecessors:
# "pin-avx2+cbwr-strict mkldnn-off nnpack-off" (MKL's sqrt), and before portable mode
# switched NNPACK off, that without "nnpack-off".
SETTINGS["portable"] = {**SETTINGS["pin-avx2+cbwr-strict mkldnn-off nnpack-off"], "_SQRT": "1"}
PORTABLE = "portable"
PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")

CHILD = r'''
import hashlib, json, os, torch
from torch import nn
import torch.nn.functional as F
torch.set_num_threads(int(os.environ.get("_THREADS", "2")))
torch.manual_seed(0)  # module initializers draw from the global generator
if os.environ.get("_MKLDNN") == "0":
    torch.backends.mkldnn.enabled = False
if os.environ.get("_NNPACK") == "0":
    torch.backends.nnpack.set_flags(False)
if os.environ.get("_SQRT") == "1":
    from harness.training import portable_math
    portable_math.install()
def h(t):
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g)
out = {}
a, b = r(256, 512), r(512, 256)
out["gemm"] = h(a @ b)
x = r(64, 1, 28, 28).requires_grad_()
c1, c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
with torch.no_grad():
    for p in list(c1.parameters()) + list(c2.parameters()):
        p.copy_(r(*p.shape) * 0.1)
bn = nn.BatchNorm2d(8)
y = c2(F.max_pool2d(F.relu(bn(c1(x))), 2))
out["conv_forward"] = h(y)
y.square().mean().backward()
out["conv_weight_grad"] = h(c2.weight.grad)
out["conv1_weight_grad"] = h(c1.weight.grad)
out["conv_input_grad"] = h(x.grad)
out["batchnorm_running_var"] = h(bn.running_var)
lin = nn.Linear(784, 256)
with torch.no_grad():
    lin.weight.copy_(r(256, 784) * 0.05); lin.bias.zero_()
z = r(64, 784)
logits = nn.Linear(256, 10)(F.relu(lin(z)))
loss = F.nll_loss(F.log_softmax(logits, 1), torch.arange(64) % 10)
loss.backward()
out["linear_weight_grad"] = h(lin.weight.grad)
v = r(1 << 20)
out["exp_log_tanh"] = h(torch.tanh(v) + torch.exp(v * 0.1) + torch.log1p(v.abs()))
out["sum_reduction"] = h(v.sum())
opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
opt.step()
out["adam_step"] = h(lin.weight)
torch.manual_seed(1)
out["dropout_mask"] = h(F.dropout(torch.ones(1 << 16), 0.3, training=True))
ln_in = r(64, 256).requires_grad_()
ln = F.layer_norm(ln_in, (256,))
ln.square().sum().backward()
out["layer_norm_fwd_bwd"] = h(torch.cat([ln.detach().reshape(-1), ln_in.grad.reshape(-1)]))
sm_in = r(64, 1000).requires_grad_()
sm = F.softmax(sm_in, 1)
(sm * torch.arange(1000.0)).sum().backward()
out["softmax_fwd_bwd"] = h(torch.cat([sm.detach().reshape(-1), sm_in.grad.reshape(-1)]))
# Each function ATen hands to MKL's vector math, alone, over a wide range of inputs.
wide = torch.cat([r(1 << 16), r(1 << 16) * 30, torch.rand(1 << 16, generator=g) * 2 - 1])
for name in ("sqrt", "exp", "log", "tanh", "erf", "erfc", "erfinv", "log2", "log10", "tan",
             "atan", "asin", "acos"):
    arg = {"sqrt": wide.abs(), "log": wide.abs(), "log2": wide.abs(), "log10": wide.abs(),
           "erfinv": wide.clamp(-0.999, 0.999), "asin": wide.clamp(-1, 1),
           "acos": wide.clamp(-1, 1)}.get(name, wide)
    out["vml_" + name] = h(getattr(torch, name)(arg))
out["_torch"] = torch.__version__
out["_capability"] = torch.backends.cpu.get_cpu_capability()
print(json.dumps(out))
'''


def cpu_facts() -> Dict[str, Any]:
    """The table's `cpu` block, in the reference tables' names."""
    seen = machine_class.read_cpuinfo()
    return {"machine": seen["architecture"], "model": seen["model"],
            "vendor_id": seen["vendor"], "cpu family": str(seen["family"]),
            "model_number": seen["model_number"], "isa_flags": seen["isa_flags"]}


def measure(setting: Dict[str, str], python: str = sys.executable) -> Dict[str, Any]:
    """The op hashes under one setting, from a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in PINS}
    env.update(setting)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = setting.get("_THREADS", "2")
    done = subprocess.run([python, "-c", CHILD], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout)


def table(python: str = sys.executable, names: Optional[List[str]] = None,
          progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """The table: this CPU's facts and, per setting (`names`, default all), the op hashes."""
    settings = {}
    for name in names or SETTINGS:
        if progress:
            progress(name)
        settings[name] = measure(SETTINGS[name], python)
    return {"cpu": cpu_facts(), "settings": settings}


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, list]:
    """Per setting both tables have, the ops whose hashes differ (empty: all agree)."""
    out = {}
    for name in sorted(set(a["settings"]) & set(b["settings"])):
        ops_a, ops_b = a["settings"][name], b["settings"][name]
        # An op only one table measured (an older tool's) is no evidence either way.
        out[name] = sorted(op for op in set(ops_a) & set(ops_b)
                           if not op.startswith("_") and ops_a[op] != ops_b[op])
    return out
