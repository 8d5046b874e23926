"""Determinism audit: per training step, a digest of every module's forward output, of the
gradient flowing into that output, and of every parameter's accumulated gradient, in the
order they happen. Two runs' audit files name the first module where they part.

Enabled by HARNESS_AUDIT=1 in the training process's environment (`harness verify` sets
it); otherwise `attach` does nothing and training pays nothing. The file is
`<run dir>/audit.jsonl`: one line per step, `{"step": n, "events": [[module, kind, digest]]}`.
Evaluation (model.eval() or no_grad) is not recorded.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from harness import env
from harness.digest import tensor_bytes
from harness.rundir import AUDIT

ROOT = "(model)"


def enabled() -> bool:
    return os.environ.get(env.AUDIT, "").lower() in ("1", "true", "yes")


def attach(model, run_dir: Path) -> Optional["Auditor"]:
    """Hook `model` when the audit is switched on; the one call train.py makes."""
    if not enabled():
        return None
    return Auditor(model, Path(run_dir) / AUDIT)


def _digest(value: Any) -> Optional[str]:
    import torch

    digest = hashlib.sha256()
    tensors = [value] if isinstance(value, torch.Tensor) else [
        v for v in (value if isinstance(value, (tuple, list)) else [])
        if isinstance(v, torch.Tensor)]
    if not tensors:
        return None
    for tensor in tensors:
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()[:16]


class Auditor:
    def __init__(self, model, path: Path):
        self.model = model
        self.handle = open(path, "w")
        self.step = 0
        self.recording = False
        self.events: List[List[str]] = []
        model.register_forward_pre_hook(self._before_step)
        owners = {}
        for name, module in model.named_modules():
            module.register_forward_hook(self._on_output(name or ROOT))
            for pname, _ in module.named_parameters(recurse=False):
                owners[f"{name}.{pname}" if name else pname] = name or ROOT
        for pname, param in model.named_parameters():
            param.register_post_accumulate_grad_hook(self._on_param_grad(owners[pname], pname))
        atexit.register(self.close)

    def _before_step(self, module, inputs) -> None:
        import torch

        self.flush()
        self.recording = module.training and torch.is_grad_enabled()
        if self.recording:
            self.step += 1

    def _record(self, module: str, kind: str, value: Any) -> None:
        if self.recording:
            digest = _digest(value)
            if digest is not None:
                self.events.append([module, kind, digest])

    def _on_output(self, name: str):
        def hook(module, inputs, output):
            self._record(name, "output", output)
            if self.recording and getattr(output, "requires_grad", False):
                output.register_hook(lambda grad: self._record(name, "grad", grad))
        return hook

    def _on_param_grad(self, owner: str, pname: str):
        def hook(param):
            self._record(owner, f"param_grad {pname}", param.grad)
        return hook

    def flush(self) -> None:
        if self.events and not self.handle.closed:
            self.handle.write(json.dumps({"step": self.step, "events": self.events}) + "\n")
            self.handle.flush()
        self.events = []

    def close(self) -> None:
        if not self.handle.closed:
            self.flush()
            self.handle.close()


# ---------------------------------------------------------------- comparing two audits

def read(run_dir: Path) -> Iterator[Dict[str, Any]]:
    path = Path(run_dir) / AUDIT
    with open(path) as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def first_difference(a_dir: Path, b_dir: Path) -> Optional[Dict[str, Any]]:
    """The first (step, module, kind) whose digest differs between two audited runs, in the
    order the events happened (forward outputs in call order, then gradients in backward
    order); None when the audits agree. Raises FileNotFoundError without an audit file."""
    for rec_a, rec_b in zip(read(a_dir), read(b_dir)):
        for index, (ev_a, ev_b) in enumerate(zip(rec_a["events"], rec_b["events"])):
            if ev_a != ev_b:
                return _describe(rec_a["step"], index, ev_a, ev_b)
        if len(rec_a["events"]) != len(rec_b["events"]):
            index = min(len(rec_a["events"]), len(rec_b["events"]))
            longer = max(rec_a["events"], rec_b["events"], key=len)
            return {"step": rec_a["step"], "module": longer[index][0], "kind": "event count",
                    "detail": "the runs called different modules"}
    return None


def _describe(step: int, index: int, ev_a: List[str], ev_b: List[str]) -> Dict[str, Any]:
    module, kind = ev_a[0], ev_a[1]
    if (ev_a[0], ev_a[1]) != (ev_b[0], ev_b[1]):
        return {"step": step, "module": module, "kind": "call order",
                "detail": f"{ev_a[0]} {ev_a[1]} vs {ev_b[0]} {ev_b[1]}"}
    return {"step": step, "module": module, "kind": kind, "event": index,
            "detail": f"digest {ev_a[2]} vs {ev_b[2]}"}


def render(found: Optional[Dict[str, Any]]) -> str:
    if found is None:
        return "audit: every module's outputs and gradients match at every step."
    return (f"audit: first differing module: {found['module']} ({found['kind']}) at step "
            f"{found['step']}; {found['detail']}")
