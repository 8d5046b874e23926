"""What `harness run` does inside each Python process of the user's command, before the
user's first line runs (loaded by harness/script/injection/bootstrap/sitecustomize.py).

- python's `random` is seeded at once; numpy's global generator and torch (its generators,
  the determinism mode, thread counts) the moment the script imports them, so a process
  that never imports torch does not pay for it.
- A DataLoader created without a `generator` gets one seeded from (torch's seed, how many
  loaders came before), so its shuffling does not depend on how many numbers the model's
  initialisation drew; one without a `worker_init_fn` gets the harness's (seeded, deaf to
  the preemption signals that are meant for the main process).
- What is in effect after the pinning, and again at exit, is written to
  RUN_DIR/.script/<pid>.json: the runner (harness.script.runner) records it in the lockfile, with
  every setting the script changed behind the harness's back (cuDNN benchmark, TF32,
  deterministic algorithms, threads, torch.compile) as a warning.

The variables it reads are set by harness.script.runner; `HARNESS_SEED` is public.
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
from typing import Any, Callable, Dict, List, Optional

from harness import rundir
from harness.env import DETERMINISM, OP_TRACE_STEPS, RUN_DIR, SEED
from harness.errors import EnvironmentProblem
from harness.rundir import SCRIPT_REPORTS, SCRIPT_STACK, STACK_SIGNAL
from harness.training import seeding

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

_state: Dict[str, Any] = {"applied": None, "compiled": 0, "dataloaders": 0, "started": 0.0,
                          "cwd": ""}


def install() -> None:
    _state["started"], _state["cwd"] = time.time(), os.getcwd()
    seed = int(os.environ[SEED])
    det = json.loads(os.environ[DETERMINISM])
    random.seed(seed)
    after_import("numpy", lambda np: seeding.seed_numpy(np, seed))
    after_import("torch", lambda torch: _pin_torch(torch, seed, det))
    atexit.register(_report, at_exit=True)
    _dump_stack_on_signal()
    _note_failed_open()


def _note_failed_open() -> None:
    """Remember the path of an uncaught FileNotFoundError (or a refused one): in a container,
    the runner says whether that path is outside what the container sees."""
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        if isinstance(value, (FileNotFoundError, NotADirectoryError, PermissionError)) and \
                isinstance(value.filename, (str, bytes)):  # not a file descriptor
            _state["failed_open"] = os.fsdecode(value.filename)
        previous(kind, value, traceback)

    sys.excepthook = excepthook


def stack_path(run_dir: Path, pid: int) -> Path:
    return Path(run_dir) / SCRIPT_REPORTS / SCRIPT_STACK.format(pid=pid)


def _dump_stack_on_signal() -> None:
    """STACK_SIGNAL writes this process's threads' stacks to RUN_DIR/.script/stack-PID.txt
    (faulthandler: it works while the process is stuck in native code). The runner sends it
    to a rank that does not exit, before it kills it, to say where it hung."""
    import faulthandler

    directory = Path(os.environ[RUN_DIR]) / SCRIPT_REPORTS
    try:
        directory.mkdir(exist_ok=True)
        _state["stack_file"] = open(stack_path(directory.parent, os.getpid()), "w")
    except OSError:
        return  # a read-only run directory: no stack, the rest works
    faulthandler.register(STACK_SIGNAL, file=_state["stack_file"], all_threads=True)


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
    from harness.training import determinism

    determinism.apply(det)
    seeding.seed_torch(torch, seed)
    applied = determinism.audit()
    wrong = [f"{key}={applied.get(key)!r}, expected {want!r}"
             for key, want in determinism.expected_audit(det).items()
             if key != "env" and applied.get(key) != want]
    if wrong:
        sys.stdout.flush()
        problem = EnvironmentProblem(f"determinism settings are not in effect in this "
                                     f"process: {'; '.join(wrong)}")
        print(f"harness: error: {problem}", file=sys.stderr, flush=True)
        # Not raised: this runs inside the user's `import torch`, where their code could
        # catch it and train unpinned. The process ends with the error's exit code.
        os._exit(problem.exit_code)
    _state["applied"] = applied
    _patch_dataloader(torch)
    _watch_compile(torch)
    _trace_ops(portable=det.get("cpu_isa") == "portable")
    _report(at_exit=False)


def _trace_ops(portable: bool) -> None:
    """The op trace of the command's first optimizer steps (harness/training/op_tracer.py), in one
    process: rank 0's (RANK unset or 0), and none once a process of the run wrote one (a
    second Python process of the command, a resumed attempt). In portable mode it also
    stops the command after its first step if an op has no portable path."""
    import multiprocessing

    steps = int(os.environ.get(OP_TRACE_STEPS) or 0)
    run_dir = Path(os.environ[RUN_DIR])
    if steps <= 0 or os.environ.get("RANK", "0") != "0" or \
            multiprocessing.parent_process() is not None or \
            (run_dir / rundir.OP_TRACE).exists():  # a spawned worker or mp.spawn rank: not
        return  # the command's main process (torchrun's ranks say RANK)
    from harness.training import op_tracer

    try:
        trace = op_tracer.CommandTrace(steps, run_dir, portable)
        trace.install()
        _state["op_trace"] = trace
    except (ImportError, AttributeError, RuntimeError) as exc:  # another torch than ours
        print(f"harness: warning: no op trace for this process: {exc}", file=sys.stderr,
              flush=True)


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
        trace = _state.pop("op_trace", None)
        if trace is not None:  # dynamo fails on the trace's global module hooks
            trace.abandon("it compiles with torch.compile, which the trace's module hooks "
                          "would break")
        return original(*args, **kwargs)

    torch.compile = compile


def _report(at_exit: bool) -> None:
    """This process's report: what it imported and what was in effect (once torch is
    imported, and again at exit). It must never break the user's process: a report that
    cannot be written (a full disk, a read-only run directory) is said and skipped."""
    run_dir = os.environ.get(RUN_DIR)
    if not run_dir:
        return
    try:
        _write_report(Path(run_dir), at_exit)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        print(f"harness: warning: this process's report was not written ({exc})",
              file=sys.stderr, flush=True)


def _write_report(run_dir: Path, at_exit: bool) -> None:
    torch = sys.modules.get("torch") if _state["applied"] is not None else None
    directory = run_dir / SCRIPT_REPORTS
    if torch is not None and torch.utils.data.get_worker_info() is not None:
        # A DataLoader worker: its parent's report speaks for it. A spawned one reported
        # when it imported torch, before it knew it was a worker: that report goes.
        (directory / f"{os.getpid()}.json").unlink(missing_ok=True)
        return
    from harness.script import imports

    directory.mkdir(exist_ok=True)
    record = {"pid": os.getpid(), "argv": sys.argv, "python": sys.executable,
              "applied": _state["applied"], "dataloaders": _state["dataloaders"],
              "torch_compile_calls": _state["compiled"], "exited": at_exit,
              "started": _state["started"], "failed_open": _state.get("failed_open"),
              "imported_files": imports.hashed_files(sys.modules.values(), _state["cwd"]),
              "interpreter": imports.interpreter(sys.modules, directory)}
    if at_exit and torch is not None:
        from harness.training import determinism

        record["at_exit"] = determinism.audit()
    tmp = directory / f".{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, directory / f"{os.getpid()}.json")


# ---------------------------------------------------------------- read by the runner


def read_reports(run_dir: Path) -> List[Dict[str, Any]]:
    """The reports of the command's Python processes, in the order they started."""
    directory = Path(run_dir) / SCRIPT_REPORTS
    reports = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] \
        if directory.is_dir() else []
    return sorted(reports, key=lambda r: (r["started"], r["pid"]))


def clear_reports(run_dir: Path, keep_reports: bool = False) -> None:
    """Remove the reports, stack files and caches of the command's processes (all but the
    reports, once the lock holds them)."""
    directory = Path(run_dir) / SCRIPT_REPORTS
    for pattern in ("stack-*.txt", "*.cache", ".*.tmp", *(() if keep_reports else ("*.json",))):
        for path in directory.glob(pattern):
            path.unlink()


def stack(run_dir: Path, pid: int) -> Optional[str]:
    """The stack process `pid` dumped on STACK_SIGNAL: "" before it has, None when it
    cannot (no injection in it: the signal would kill it)."""
    try:
        return stack_path(run_dir, pid).read_text(errors="replace").strip()
    except OSError:
        return None


def pinned(reports: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The reports of processes that imported torch (and so were pinned)."""
    return [report for report in reports if report.get("applied") is not None]


def changes(reports: List[Dict[str, Any]]) -> List[str]:
    """What each process changed after the harness pinned it, as warnings."""
    warnings = []
    for report in pinned(reports):
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
