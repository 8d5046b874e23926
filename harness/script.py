"""The training process of a `harness run`: the user's own command, run inside the shared
runtime (`python -m harness.train RUN_DIR` starts this when the run's config has a
`command`).

In order: the runtime's stop signals and launcher watch (runtime.Runtime) and the GPU
check; the command, started in the run's working directory with the pinned environment,
`HARNESS_SEED` and the injection that seeds and pins each of its Python processes
(harness/inject/sitecustomize.py); SIGTERM/SIGUSR1 passed on to its process group; at its
end the declared outputs copied into RUN_DIR/outputs/ and hashed, the reports of its
Python processes read (what was in effect, what the script changed), and the lockfile.

The command's exit code is the run's; 75 means "preempted, resumable", as for the
built-in loop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from harness import injection, outputs
from harness.backends.local import LAUNCHER_PID_ENV
from harness.errors import REQUEUE_EXIT, EnvironmentProblem
from harness.runtime import Runtime, confirm_gpus

INJECT_DIR = Path(__file__).resolve().parent / "inject"
RESUME_ENV = "HARNESS_RESUME"  # "1" when the command runs again after a preemption


def run(run_dir: Path, resume: bool = False, watch_stdin: bool = False) -> int:
    rt = Runtime(run_dir, watch_stdin)  # stop signals and the launcher watch first
    if rt.device.type == "cuda":
        confirm_gpus(rt.device)
    cfg, facts = rt.cfg, rt.launch["lock"]["script"]
    workdir = Path(facts["workdir"])
    try:
        os.chdir(workdir)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot enter the run's working directory {workdir} "
                                 f"({exc.strerror}): the command runs where `harness run` was "
                                 f"started; in a container its user (uid {os.getuid()}) must "
                                 f"be able to read it.") from None
    patterns = cfg["command"]["outputs"]
    before = outputs.snapshot(patterns, workdir)
    shutil.rmtree(run_dir / injection.REPORTS, ignore_errors=True)  # this attempt's only
    argv = cfg["command"]["argv"]
    print(f"harness: running {' '.join(argv)} (seed={cfg['seed']}, "
          f"determinism={cfg['determinism']['mode']}, in {workdir})", flush=True)
    started = time.time()
    try:
        child = subprocess.Popen(argv, env=command_environment(cfg, run_dir, resume),
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    except (FileNotFoundError, PermissionError) as exc:
        print(f"harness: error: cannot start the command {argv[0]!r}: {exc.strerror}. Check "
              f"that it is installed{' in the image' if watch_stdin else ''} and on PATH, "
              f"or give its path.", file=sys.stderr, flush=True)
        return 127
    rt.stop.forward = lambda signum: _signal_group(child.pid, signum)
    code = child.wait()
    ended = time.time()
    if code < 0:
        code = 128 - code  # killed by a signal: the shell's convention
    if code == REQUEUE_EXIT:
        print(f"harness: the command exited with code {REQUEUE_EXIT} (preempted, resumable): "
              f"continue it with `harness train --resume {run_dir.name}`", flush=True)
        return code
    if code != 0:
        print(f"harness: error: the command exited with code {code}", file=sys.stderr,
              flush=True)
        return code
    files, warnings = outputs.collect(patterns + recorded_outputs(run_dir, workdir), workdir,
                                      run_dir, before)
    reports = injection.read_reports(run_dir)
    warnings += injection.changes(reports)
    if cfg["command"]["inject"] and not reports:
        warnings.append("no Python process of the command imported torch: nothing was pinned "
                        "inside it (only the environment variables)")
    for warning in warnings:
        print(f"harness: warning: {warning}", flush=True)
    rt.in_effect = reports[0]["applied"] if reports else {}
    results = {"exit_code": code, "outputs": files, "outputs_sha256": _digest(files)}
    rt.write_lock(results, resumes=[], timing={
        "first_step_unix": started, "command_s": round(ended - started, 3)},
        extra={"script": {**facts, "warnings": warnings,
                          "processes": [_process_summary(r) for r in reports]}})
    print(f"harness: {len(files)} output file(s) recorded (outputs sha256 "
          f"{results['outputs_sha256'][:16]}...)", flush=True)
    return 0


def command_environment(cfg: Dict[str, Any], run_dir: Path, resume: bool) -> Dict[str, str]:
    """The command's environment: ours (the pinned variables are in it already), the seed,
    this interpreter's directory first on PATH (`python` is the one the harness runs
    with: in a container, the image's), and the injection unless the run opts out."""
    env = {key: value for key, value in os.environ.items() if key != LAUNCHER_PID_ENV}
    env[injection.SEED_ENV] = str(cfg["seed"])
    env[injection.RUN_DIR_ENV] = str(Path(run_dir).resolve())
    env[RESUME_ENV] = "1" if resume else "0"
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if cfg["command"]["inject"]:
        env[injection.INJECT_ENV] = "1"
        env[injection.DETERMINISM_ENV] = json.dumps(cfg["determinism"])
        env[injection.SRC_ENV] = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(INJECT_DIR), env.get("PYTHONPATH", "")] if p)
    return env


def recorded_outputs(run_dir: Path, workdir: Path) -> List[str]:
    """Outputs the script declared itself (harness.runtime.record_output)."""
    path = Path(run_dir) / injection.REPORTS / injection.EXTRA_OUTPUTS
    if not path.exists():
        return []
    names = []
    for line in path.read_text().splitlines():
        name = os.path.relpath(line, workdir) if os.path.isabs(line) else line
        if line and name not in names:
            names.append(name)
    return names


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass  # it ended already


def _digest(files: Dict[str, Any]) -> str:
    from harness.digest import canonical_sha256

    return canonical_sha256(files)


def _process_summary(report: Dict[str, Any]) -> Dict[str, Any]:
    return {key: report[key] for key in ("pid", "argv", "python", "dataloaders",
                                         "torch_compile_calls", "exited")}
