"""Which nondeterministic operations a model hits, and in which module.

With the determinism mode `warn`, torch warns instead of raising when an operation has no
deterministic implementation. `watch` (switched on by HARNESS_WATCH_NONDETERMINISM=1 in
the training process's environment; `harness doctor` sets it) keeps a stack of the
modules whose forward is running and records each such warning with the innermost one
(`(backward)` when it comes from the backward pass) into RUN_DIR/nondeterministic.json.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List

from harness.env import WATCH_NONDETERMINISM
from harness.rundir import NONDETERMINISTIC


def watch(model, run_dir: Path) -> None:
    """Hook `model` when the watch is switched on; the one call train.py makes."""
    if os.environ.get(WATCH_NONDETERMINISM) != "1":
        return
    stack: List[str] = []
    found: Dict[tuple, Dict[str, Any]] = {}
    path = Path(run_dir) / NONDETERMINISTIC

    def entered(label):
        def hook(module, args) -> None:
            stack.append(label)
        return hook

    def left(module, args, output) -> None:  # None: the output stays the module's
        if stack:
            stack.pop()

    for name, module in model.named_modules():
        module.register_forward_pre_hook(entered(name or "(model)"))
        module.register_forward_hook(left)

    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "deterministic" in text:
            operation = text.split(" does not have a deterministic")[0].strip()
            key = (operation, stack[-1] if stack else "(backward)")
            entry = found.setdefault(key, {"operation": key[0], "module": key[1], "count": 0})
            entry["count"] += 1
            path.write_text(json.dumps(sorted(found.values(), key=lambda e: e["module"]),
                                       indent=1))
        shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always", UserWarning)
    warnings.showwarning = record


def read(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / NONDETERMINISTIC
    return json.loads(path.read_text()) if path.exists() else []
