"""What `harness run` does inside each Python process of the user's command, before the
user's first line runs (loaded by harness/inject/sitecustomize.py).

- python's `random` is seeded at once; numpy's global generator and torch (its generators,
  the determinism mode, thread counts) the moment the script imports them, so a process
  that never imports torch does not pay for it.
- A DataLoader created without a `generator` gets one seeded from (torch's seed, how many
  loaders came before), so its shuffling does not depend on how many numbers the model's
  initialisation drew; one without a `worker_init_fn` gets the harness's (seeded, deaf to
  the preemption signals that are meant for the main process).
- What is in effect after the pinning, and again at exit, is written to
  RUN_DIR/.script/<pid>.json: the runner (harness.script) records it in the lockfile, with
  every setting the script changed behind the harness's back (cuDNN benchmark, TF32,
  deterministic algorithms, threads, torch.compile) as a warning.

The variables it reads are set by harness.script; `HARNESS_SEED` is public.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from harness import seeding
from harness.rundir import SCRIPT_REPORTS as REPORTS  # RUN_DIR/.script/<pid>.json

RUN_DIR_ENV = "HARNESS_RUN_DIR"
SEED_ENV = "HARNESS_SEED"
DETERMINISM_ENV = "HARNESS_DETERMINISM"  # the run's determinism section, as JSON
INJECT_ENV = "HARNESS_INJECT"
SRC_ENV = "HARNESS_SRC"

# Settings a script can change after the harness applied them, and what a change means.
WATCHED = {
    "cudnn_benchmark": "cuDNN benchmark (autotuned kernels chosen by timing)",
    "cuda_matmul_allow_tf32": "TF32 for CUDA matmuls",
    "cudnn_allow_tf32": "TF32 for cuDNN convolutions",
    "deterministic_algorithms": "deterministic algorithms",
    "deterministic_warn_only": "deterministic algorithms warn-only",
    "cudnn_deterministic": "cuDNN deterministic",
    "float32_matmul_precision": "float32 matmul precision",
    "torch_num_threads": "torch intra-op threads",
}

_state: Dict[str, Any] = {"applied": None, "compiled": 0, "dataloaders": 0, "started": 0.0}


def install() -> None:
    _state["started"] = time.time()
    seed = int(os.environ[SEED_ENV])
    det = json.loads(os.environ[DETERMINISM_ENV])
    random.seed(seed)
    after_import("numpy", lambda np: seeding.seed_numpy(np, seed))
    after_import("torch", lambda torch: _pin_torch(torch, seed, det))
    atexit.register(_report, at_exit=True)


def after_import(name: str, hook: Callable[[Any], None]) -> None:
    """Call `hook(module)` once module `name` has been imported (now, if it has been)."""
    if name in sys.modules:
        hook(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, hook))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds `name` through the other finders and runs the hook after the module's code.

    It stays installed until the module has really been executed: libraries probe with
    `importlib.util.find_spec("torch")` before importing it (transformers, accelerate,
    Lightning do), and a probe must not use up the hook."""

    def __init__(self, name: str, hook: Callable[[Any], None]):
        self.name, self.hook, self.searching = name, hook, False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self.searching:
            return None
        self.searching = True  # the other finders may call back into find_spec
        try:
            spec = next((found for finder in sys.meta_path if finder is not self
                         for found in [getattr(finder, "find_spec", _no_spec)(
                             fullname, path, target)] if found is not None), None)
        finally:
            self.searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, finder = spec.loader.exec_module, self

        def exec_then_hook(module):
            exec_module(module)
            if finder in sys.meta_path:  # once: the module ran
                sys.meta_path.remove(finder)
                finder.hook(module)

        spec.loader = _Loader(spec.loader, exec_then_hook)
        return spec


def _no_spec(*args):
    return None


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, exec_module):
        self._loader, self._exec_module = loader, exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        self._exec_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _pin_torch(torch, seed: int, det: Dict[str, Any]) -> None:
    from harness import determinism

    determinism.apply(det)
    seeding.seed_torch(torch, seed)
    applied = determinism.audit()
    wrong = [f"{key}={applied.get(key)!r}, expected {want!r}"
             for key, want in determinism.expected_audit(det).items()
             if key != "env" and applied.get(key) != want]
    if wrong:
        sys.stdout.flush()
        print(f"harness: error: determinism settings are not in effect in this process: "
              f"{'; '.join(wrong)}", file=sys.stderr, flush=True)
        os._exit(4)
    _state["applied"] = applied
    _patch_dataloader(torch)
    _watch_compile(torch)
    _report(at_exit=False)


def _patch_dataloader(torch) -> None:
    import inspect

    loader_class = torch.utils.data.DataLoader
    original = loader_class.__init__
    signature = inspect.signature(original)
    counter = itertools.count()

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        if bound.arguments.get("generator") is None:
            bound.arguments["generator"] = seeding.script_loader_generator(torch, next(counter))
        if bound.arguments.get("worker_init_fn") is None:
            bound.arguments["worker_init_fn"] = seeding.worker_init
        _state["dataloaders"] += 1
        original(*bound.args, **bound.kwargs)

    loader_class.__init__ = __init__


def _watch_compile(torch) -> None:
    original = torch.compile

    @functools.wraps(original)
    def compile(*args, **kwargs):
        _state["compiled"] += 1
        return original(*args, **kwargs)

    torch.compile = compile


def _report(at_exit: bool) -> None:
    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir or _state["applied"] is None:
        return  # torch was never imported: nothing of it to report
    import torch

    if torch.utils.data.get_worker_info() is not None:
        return  # a spawned DataLoader worker: torch itself set its threads to 1
    from harness import determinism

    record = {"pid": os.getpid(), "argv": sys.argv, "python": sys.executable,
              "applied": _state["applied"], "dataloaders": _state["dataloaders"],
              "torch_compile_calls": _state["compiled"], "exited": at_exit,
              "started": _state["started"]}
    if at_exit:
        record["at_exit"] = determinism.audit()
    directory = Path(run_dir) / REPORTS
    directory.mkdir(exist_ok=True)
    tmp = directory / f".{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, directory / f"{os.getpid()}.json")


# ---------------------------------------------------------------- read by the runner


def read_reports(run_dir: Path) -> List[Dict[str, Any]]:
    """The reports of the command's Python processes, in the order they started."""
    directory = Path(run_dir) / REPORTS
    reports = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] \
        if directory.is_dir() else []
    return sorted(reports, key=lambda r: (r["started"], r["pid"]))


def changes(reports: List[Dict[str, Any]]) -> List[str]:
    """What each process changed after the harness pinned it, as warnings."""
    warnings = []
    for report in reports:
        who = f"pid {report['pid']} ({' '.join(report['argv'])[:80]})"
        if not report["exited"]:
            warnings.append(f"{who} did not exit normally: what it changed is not known")
            continue
        for key, what in WATCHED.items():
            before, after = report["applied"].get(key), report["at_exit"].get(key)
            if before != after:
                warnings.append(f"{who} changed {what}: {before!r} -> {after!r}")
        if report["torch_compile_calls"]:
            warnings.append(f"{who} used torch.compile ({report['torch_compile_calls']} "
                            f"call(s)): generated kernels are not covered by the pins")
    return warnings
