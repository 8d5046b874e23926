"""The training process of a `harness run`: the user's own command, run inside the shared
runtime (`python -m harness.train RUN_DIR` starts this when the run's config has a
`command`).

In order: the runtime's stop signals and launcher watch (runtime.Runtime) and the GPU
check; the command, started in the run's working directory with the pinned environment,
`HARNESS_SEED` and the injection that seeds and pins each of its Python processes
(harness/script/injection/bootstrap/sitecustomize.py); SIGTERM/SIGUSR1 passed on to it; at its
end the declared outputs copied into RUN_DIR/outputs/ and hashed, the reports of its
Python processes read (what was in effect, what the script changed), and the lockfile.

The command's exit code is the run's; 75 means "preempted, resumable", as for the
built-in loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness import config, rundir
from harness.env import (
    DETERMINISM,
    INJECT,
    LAUNCHER_PID,
    OP_TRACE_STEPS,
    RESUME,
    RUN_DIR,
    SEED,
    SRC,
)
from harness.errors import REQUEUE_EXIT, ConfigError, EnvironmentProblem
from harness.record import op_trace
from harness.script import files, imports
from harness.script.injection import pinning
from harness.training import distributed
from harness.training.runtime import (
    PR_SET_PDEATHSIG,
    Runtime,
    confirm_gpus,
    output_to_log,
    slurm_restarts,
)

INJECT_DIR = Path(__file__).resolve().parent / "injection" / "bootstrap"
# The command's exit code when it cannot be started: the shell's "command not found", so
# that `harness run` ends as the same command typed at a shell would.
COMMAND_NOT_STARTED = 127


def run(run_dir: Path, resume: bool = False, watch_stdin: bool = False,
        cfg: Optional[Dict[str, Any]] = None) -> int:
    """Run the command of the run in `run_dir` under the runtime, then record its outputs
    and write the lock. Returns the command's exit code (0 once the lock is written)."""
    rt = Runtime(run_dir, watch_stdin, cfg)  # stop signals and the launcher watch first
    # Ctrl-C and a closed terminal reach the launcher, which stops us with SIGTERM (passed
    # on to the command); dying here at once would leave the command running unwatched.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
    restarts = slurm_restarts()  # a requeued batch job resumes by itself
    resume = resume or restarts > 0
    if resume:  # the run must go on with the inputs and code it started with
        files.check_command_unchanged(
            {**facts, "imported": imports.merge_files(pinning.read_reports(run_dir), workdir,
                                                      facts["inputs"])},
            workdir, run_dir.name)
    patterns = cfg["command"]["outputs"]
    if not resume:  # a new run (or a replay) starts without an earlier run's outputs
        say_displaced(files.move_aside(patterns, workdir, list(facts["inputs"]),
                                         run_dir / rundir.DISPLACED, run_dir.parent),
                      run_dir)
    before = files.snapshot(patterns, workdir)
    pinning.clear_reports(run_dir)  # this attempt's processes only (declared outputs stay)
    started = time.time()
    code, hung = run_command(rt, cfg, run_dir, resume, in_container=watch_stdin)
    ended = time.time()
    if code != 0 or (hung and not patterns):
        return failed(run_dir, code, hung, workdir, in_container=watch_stdin)
    attempts = max(restarts, int(rundir.read_json(run_dir / rundir.STATUS).get("resumes", 0)))
    record(rt, run_dir, before, hung, timing={"first_step_unix": started,
                                              "command_s": round(ended - started, 3)},
           resumes=[{"attempt": n + 1} for n in range(attempts)] if resume else [],
           resumed=resume)
    return 0


def failed(run_dir: Path, code: int, hung: List[Dict[str, Any]], workdir: Path,
           in_container: bool) -> int:
    """A command that was preempted, failed, or left ranks hanging with nothing declared
    to show its work was done: said, kept in status.json; the run's exit code."""
    if code == REQUEUE_EXIT:
        print(f"harness: the command exited with code {REQUEUE_EXIT} (preempted, resumable): "
              f"continue it with `harness train --resume {run_dir.name}`", flush=True)
        return code
    if code != 0:
        print(f"harness: error: the command exited with code {code}", file=sys.stderr,
              flush=True)
        unseen = unseen_paths(pinning.read_reports(run_dir), workdir) if in_container else []
        if unseen:
            said = (f"the command failed opening {unseen[0]}, which is not in the container: "
                    f"it sees the working directory {workdir} (read-only), the declared "
                    f"inputs and the output directories. Declare the file or its directory "
                    f"with --input {unseen[0]} (it is then hashed and mounted at the same "
                    f"path), or run with backend=local.")
            _say_failed(run_dir, said, code)
        if not rundir.recorded_error(run_dir):  # --nproc: which process failed, if said
            rundir.record_error(run_dir, f"the command exited with code {code}", code)
        return code
    said = (f"rank(s) {', '.join(str(h['rank']) for h in hung)} did not exit and were "
            f"stopped, and the command declares no output (--output) to show that its "
            f"work was done: the run failed. Declare what it writes to keep such a run.")
    _say_failed(run_dir, said, 1)
    return 1


def record(rt: Runtime, run_dir: Path, before: Dict[str, Any], hung: List[Dict[str, Any]],
           timing: Dict[str, Any], resumes: List[Dict[str, int]], resumed: bool) -> None:
    """A command that succeeded: its outputs collected and hashed, what its processes
    reported, warnings said, and the lock written."""
    cfg, facts = rt.cfg, rt.launch["lock"]["script"]
    workdir, patterns = Path(facts["workdir"]), cfg["command"]["outputs"]
    collected, warnings = files.collect(patterns + recorded_outputs(run_dir, workdir),
                                        workdir, run_dir, before)
    warnings += [f"rank {h['rank']} did not exit within {cfg['command']['exit_grace_s']:g} s "
                 f"after rank 0 exited 0 and was stopped (the outputs were written)"
                 for h in hung]
    reports = pinning.read_reports(run_dir)
    warnings += pinning.changes(reports)
    pinned = pinning.pinned(reports)
    if cfg["command"]["inject"] and not pinned:
        warnings.append("no Python process of the command imported torch: nothing was pinned "
                        "inside it (only the environment variables)")
    for warning in warnings:
        print(f"harness: warning: {warning}", flush=True)
    if not collected:
        print("harness: warning: the command declared no output file (--output, or "
              "harness.runtime.record_output): a replay can compare only what it printed. "
              "Declare the files it writes to have its results compared.", flush=True)
    rt.in_effect = pinned[0]["applied"] if pinned else {}
    results = {"exit_code": 0, "outputs": collected, "outputs_sha256": _digest(collected),
               **console_result(run_dir, resumed or cfg["command"].get("nproc", 1) > 1),
               **op_trace.file_digests(run_dir)}  # command.op_trace_steps: its first ops
    rt.write_lock(results, resumes=resumes, timing=timing,
                  extra={"script": {**facts, "warnings": warnings,
                                    "imported": imports.merge_files(reports, workdir,
                                                                    facts["inputs"]),
                                    "processes": [_process_summary(r) for r in reports],
                                    **({"hung_ranks": hung} if hung else {})},
                         **interpreters_of(reports)})
    pinning.clear_reports(run_dir, keep_reports=True)
    print(f"harness: {len(collected)} output file(s) recorded (outputs sha256 "
          f"{results['outputs_sha256'][:16]}...)", flush=True)


def _say_failed(run_dir: Path, said: str, code: int) -> None:
    """Why the command failed: printed, and kept in status.json as the run's error."""
    print(f"harness: error: {said}", file=sys.stderr, flush=True)
    rundir.record_error(run_dir, said, code)


def say_displaced(moved: List[str], run_dir: Path) -> None:
    if moved:
        print(f"harness: moved {len(moved)} declared output(s) that existed before the "
              f"command started ({', '.join(moved[:3])}{' ...' if len(moved) > 3 else ''}) "
              f"to {Path(run_dir) / rundir.DISPLACED}: the command starts without an earlier "
              f"run's files, as its replay will.", flush=True)


def run_command(rt: Runtime, cfg: Dict[str, Any], run_dir: Path, resume: bool,
                in_container: bool) -> Tuple[int, List[Dict[str, Any]]]:
    """Start the command, pass stop signals to it, copy its output to ours; (its exit
    code, the processes of --nproc that hung after another exited 0 and were stopped).

    Its output goes through us rather than straight to the launcher's pipe: when the
    launcher dies, our stop handler moves our output to train.log, and the command's last
    lines (its checkpoint message) must follow instead of failing on a broken pipe. Stop
    signals go to the command's main process only, as a scheduler's batch script does: it
    decides how to stop its workers (a wrapper script should `exec` the training)."""
    argv, nproc = cfg["command"]["argv"], cfg["command"].get("nproc", 1)
    processes = f", {nproc} processes" if nproc > 1 else ""
    print(f"harness: running {' '.join(argv)} (seed={cfg['seed']}, "
          f"determinism={cfg['determinism']['mode']}, in {Path.cwd()}{processes})", flush=True)
    env = command_environment(cfg, run_dir, resume)
    try:
        if nproc > 1:
            return run_processes(rt, argv, env, nproc, run_dir,
                                 float(cfg["command"]["exit_grace_s"]))
        child = _start(argv, env)
    except (FileNotFoundError, PermissionError) as exc:
        said = (f"cannot start the command {argv[0]!r}: {exc.strerror}. Check that it is "
                f"installed{' in the image' if in_container else ''} and on PATH, or give "
                f"its path.")
        _say_failed(run_dir, said, COMMAND_NOT_STARTED)
        return COMMAND_NOT_STARTED, []
    rt.stop.forward = lambda signum: _signal(child.pid, signum)
    if rt.stop.signum:  # a stop that came while we were starting it
        _signal(child.pid, rt.stop.signum)
    _copy_output(child.stdout, run_dir / rundir.LOG, console_path(run_dir))
    code = child.wait()
    _end_stragglers(child.pid)
    return (128 - code if code < 0 else code), []  # killed by a signal: the shell's way


def _start(argv: List[str], env: Dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)


def run_processes(rt: Runtime, argv: List[str], env: Dict[str, str], nproc: int,
                  run_dir: Path, exit_grace_s: float) -> Tuple[int, List[Dict[str, Any]]]:
    """`--nproc N`: N processes of the command, each with torchrun's variables (RANK ...),
    as the built-in loop's ranks are run (distributed.RankGroup): stop signals to each,
    output passed through (`[rank N]` before the lines of ranks above 0), and when one
    fails the others are killed at once, so none is left waiting in a collective."""
    group = distributed.RankGroup([], run_dir / rundir.LOG, exit_grace_s,
                                  stack_of=lambda pid: pinning.stack(run_dir, pid))
    group.start(distributed.local_ranks(nproc),
                lambda rank: _start(argv, {**env, **rank.environment()}))
    rt.stop.forward = group.signal
    if rt.stop.signum:  # a stop that came while we were starting them
        group.signal(rt.stop.signum)
    code = group.wait()
    for process in group.processes:
        _end_stragglers(process.pid)
    if group.failure:
        rundir.record_error(run_dir, f"the command's {group.failure}", code)
    return code, group.hung


def console_path(run_dir: Path) -> Path:
    return Path(run_dir) / rundir.SCRIPT_REPORTS / rundir.SCRIPT_CONSOLE


def _copy_output(stream, log_path: Path, console: Path) -> None:
    """Pass the command's output on, and keep this attempt's copy in `console` (what a
    replay compares when no declared file is)."""
    console.parent.mkdir(exist_ok=True)
    with open(console, "wb") as kept:
        for chunk in iter(lambda: os.read(stream.fileno(), 1 << 16), b""):
            kept.write(chunk)
            try:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            except BrokenPipeError:
                # The launcher died before its SIGTERM reached us: the log takes the rest.
                output_to_log(log_path)
                os.write(sys.stdout.fileno(), chunk)
    stream.close()


def console_result(run_dir: Path, resumed: bool) -> Dict[str, Any]:
    """results.console: sha256 and size of what the command printed, for a run of one
    process in one attempt (a resumed run printed in parts, a run of several processes
    in an order that is not fixed: neither is comparable, and neither is recorded)."""
    from harness.digest import file_sha256

    path = console_path(run_dir)
    if resumed or not path.is_file():
        return {}
    return {"console": {"sha256": file_sha256(path), "bytes": path.stat().st_size}}


def _die_with_parent() -> None:
    """In the command's process, before it starts: SIGTERM when the runner dies, and the
    default handling of the signals the runner ignores."""
    import ctypes

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux


def _end_stragglers(group: int, grace_s: float = 5.0) -> None:
    """Processes of the command still alive after its main process ended (a background
    job it started): they must not write on into the run. TERM, then KILL."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not _signal(group, signum, whole_group=True):
            return
        deadline = time.time() + grace_s
        while time.time() < deadline:
            if not _signal(group, 0, whole_group=True):
                return
            time.sleep(0.1)


def _signal(pid: int, signum: int, whole_group: bool = False) -> bool:
    """Send `signum` to the process (or its group); False when it is gone."""
    try:
        (os.killpg if whole_group else os.kill)(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def command_environment(cfg: Dict[str, Any], run_dir: Path, resume: bool) -> Dict[str, str]:
    """The command's environment: ours (the pinned variables are in it already), the seed,
    this interpreter's directory first on PATH (`python` is the one the harness runs
    with: in a container, the image's), and the injection unless the run opts out."""
    env = {key: value for key, value in os.environ.items() if key != LAUNCHER_PID}
    env.update(cfg["command"].get("env") or {})  # --env: declared, recorded, replayed
    if cfg["command"].get("source_date_epoch") is not None:
        env["SOURCE_DATE_EPOCH"] = str(cfg["command"]["source_date_epoch"])
    env[SEED] = str(cfg["seed"])
    env[RUN_DIR] = str(Path(run_dir).resolve())
    env[RESUME] = "1" if resume else "0"
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if cfg["command"]["inject"]:
        env[INJECT] = "1"
        env[DETERMINISM] = json.dumps(cfg["determinism"])
        env[OP_TRACE_STEPS] = str(config.op_trace_steps(cfg["command"]))
        env[SRC] = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(INJECT_DIR), env.get("PYTHONPATH", "")] if p)
    return env


def interpreters_of(reports: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The lock's `interpreters`, left out when no Python process reported (a command that
    is not Python, or command.inject=false): nothing to compare then."""
    merged = imports.merge_interpreters(reports)
    return {"interpreters": merged} if merged else {}


def unseen_paths(reports: List[Dict[str, Any]], workdir: Path) -> List[str]:
    """Paths a process of the command failed to open that lie outside the working
    directory: in a container, not mounted (the host may well have them)."""
    found = []
    for report in reports:
        path = report.get("failed_open")
        if path and os.path.isabs(path) and not Path(path).is_relative_to(workdir) and \
                path not in found:
            found.append(path)
    return found


def recorded_outputs(run_dir: Path, workdir: Path) -> List[str]:
    """Outputs the script declared itself (harness.runtime.record_output)."""
    path = Path(run_dir) / rundir.SCRIPT_REPORTS / rundir.SCRIPT_OUTPUTS
    if not path.exists():
        return []
    names = []
    for line in path.read_text().splitlines():
        name = os.path.relpath(line, workdir) if os.path.isabs(line) else line
        if not line or name in names:
            continue
        try:
            files.check_output_patterns([name])
        except ConfigError:
            print(f"harness: warning: record_output({line!r}) is outside the working "
                  f"directory {workdir}: not recorded", flush=True)
            continue
        names.append(name)
    return names


def _digest(files: Dict[str, Any]) -> str:
    from harness.digest import canonical_sha256

    return canonical_sha256(files)


def _process_summary(report: Dict[str, Any]) -> Dict[str, Any]:
    return {key: report[key] for key in ("pid", "argv", "python", "dataloaders",
                                         "torch_compile_calls", "exited")}
