"""`harness verify CONFIG`: train a short prefix of a config twice, here, and show whether
the two runs are bitwise identical; if not, where they part (step, tensors) and, from the
determinism audit (harness.training.audit), the first module whose output or gradient differs.

The config is composed and resolved once (a `seed: null` draws one seed for both runs).
The two runs go in parallel when the machine has cores for both (each uses
determinism.threads), else one after the other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness import config, rundir
from harness.commands import choices
from harness.env import AUDIT
from harness.errors import Diverged, HarnessError, RunFailed
from harness.record import bitwise, lockfile, op_trace
from harness.training import audit

VERIFY_TRACED_STEPS = 5


def prefix_config(name: str, overrides: List[str], config_dir: Optional[Path], steps: int,
                  fingerprint_every: int) -> Dict[str, Any]:
    cfg = choices.compose(name, overrides, config_dir)
    trainer = cfg["trainer"]
    trainer["max_steps"] = min(steps, trainer["max_steps"] or steps)
    trainer["fingerprint_every"] = fingerprint_every
    trainer["checkpoint_every"] = max(trainer["checkpoint_every"], trainer["max_steps"])
    # The op trace of the first steps names the op where the runs part (a traced step
    # costs a few untraced ones: the first VERIFY_TRACED_STEPS only).
    trainer["op_trace_steps"] = min(trainer["max_steps"], VERIFY_TRACED_STEPS)
    return config.validate(cfg)


def _parallel(cfg: Dict[str, Any], jobs: Optional[int]) -> bool:
    if jobs is not None:
        return jobs >= 2
    return (os.cpu_count() or 1) >= 2 * cfg["determinism"]["threads"]


def run_twice(cfg: Dict[str, Any], overrides: List[str], runs_dir: Path,
              parallel: bool, env_extra: Optional[Dict[str, str]] = None) -> List[Path]:
    """Two runs of `cfg`, audited unless `env_extra` says otherwise, each launched by its
    own child process (`python -m harness.commands.verify --launch`: the launcher owns signal
    handlers, which only the main thread of a process may set). Returns their run
    directories; raises RunFailed if one fails."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harness-verify-") as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps({"config": cfg, "overrides": overrides}))
        env = {**os.environ, AUDIT: "1", **(env_extra or {})}
        outputs = [open(Path(tmp) / f"launcher-{i}.log", "w+") for i in range(2)]
        processes: List[subprocess.Popen] = []
        try:
            for index in range(2):
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "harness.commands.verify", "--launch", str(cfg_path),
                     str(runs_dir), str(index + 1)],
                    env=env, stdout=outputs[index], stderr=subprocess.STDOUT, text=True))
                if not parallel:
                    processes[-1].wait()
            codes = [process.wait() for process in processes]
            logs = []
            for handle in outputs:
                handle.seek(0)
                logs.append(handle.read())
        finally:
            for process in processes:  # interrupted: stop the launchers (they stop training)
                if process.poll() is None:
                    process.terminate()
                    process.wait()
            for handle in outputs:
                handle.close()
        dirs = [_launched(Path(tmp), index + 1, code, log)
                for index, (code, log) in enumerate(zip(codes, logs))]
    return dirs


def _result_file(tmp: Path, index: int) -> Path:
    """Where child `index` writes the run directory it launched (data, not its output)."""
    return tmp / f"run-{index}.json"


def _launched(tmp: Path, index: int, code: int, log: str) -> Path:
    """Run `index`'s directory, or RunFailed with the end of its launcher's output."""
    result = _result_file(tmp, index)
    if code != 0 or not result.exists():
        tail = "\n".join(log.strip().splitlines()[-6:])
        raise RunFailed(f"a verify run failed (exit {code}):\n{tail}")
    return Path(json.loads(result.read_text())["run_dir"])


def _launch_child(argv: List[str]) -> int:
    """Child mode: launch one run of the resolved config written by the parent."""
    from harness.commands import train

    cfg_path, runs_dir, index = argv
    job = json.loads(Path(cfg_path).read_text())
    try:
        run_dir = train.start(job["config"], job["overrides"], Path(runs_dir),
                               {"verify": {"run": int(index)}})
    except HarnessError as exc:
        print(f"harness: error: {exc}", flush=True)
        return exc.exit_code
    _result_file(Path(cfg_path).parent, int(index)).write_text(
        json.dumps({"run_dir": str(run_dir)}))
    return 0


def verify(name: str, overrides: List[str], config_dir: Optional[Path] = None,
           runs_dir: Optional[Path] = None, steps: int = 20, fingerprint_every: int = 1,
           jobs: Optional[int] = None) -> int:
    cfg = prefix_config(name, overrides, config_dir, steps, fingerprint_every)
    parallel = _parallel(cfg, jobs)
    runs_dir = runs_dir or rundir.default_runs_dir()
    print(f"harness: verify {name}: 2 runs of {cfg['trainer']['max_steps']} steps "
          f"(seed {cfg['seed']}, {'in parallel' if parallel else 'one after the other'})",
          flush=True)
    a_dir, b_dir = run_twice(cfg, overrides, runs_dir, parallel)
    lock_a = lockfile.read(a_dir / rundir.LOCK)
    lock_b = lockfile.read(b_dir / rundir.LOCK)
    report = bitwise.compare_runs(a_dir, b_dir, lock_a, lock_b)
    first_module = audit.first_difference(a_dir, b_dir)
    first_op = op_trace.compare(a_dir, b_dir)
    deterministic = report["verdict"] == bitwise.IDENTICAL and first_module is None and \
        (first_op is None or first_op["kind"] == "same")
    record = {**report, "deterministic": deterministic, "first_module": first_module,
              "first_differing_op": first_op,
              "runs": [a_dir.name, b_dir.name], "config": name, "overrides": overrides}
    for run_dir in (a_dir, b_dir):
        rundir.write_json(run_dir / rundir.VERIFY, record)
    print(f"runs: {a_dir.name} {b_dir.name}")
    print(bitwise.render(report))
    print(audit.render(first_module), flush=True)
    if first_op is not None:
        print(first_op["line"], flush=True)
    if not deterministic:
        where = f" in module {first_module['module']}" if first_module else ""
        raise Diverged(f"{name} is NOT deterministic here: two identical runs differ{where}. "
                       f"Make that module deterministic (seed its randomness from torch, "
                       f"avoid nondeterministic kernels), then run verify again."
                       f"{_setting_for(first_op, cfg)}")
    print(f"DETERMINISTIC: {name} gives bitwise identical runs here "
          f"({cfg['trainer']['max_steps']} steps).", flush=True)
    return 0


def _setting_for(first_op: Optional[Dict[str, Any]], cfg: Dict[str, Any]) -> str:
    """The setting that makes the first differing op deterministic, where one exists."""
    if first_op is None or first_op["kind"] not in ("kernel", "random"):
        return ""
    op = first_op["a"]["op"]
    if first_op["kind"] == "random":
        return (f" The first op that differs, {op}, draws random numbers: seed what it "
                f"draws from (torch's generator, seeded by the harness), not the clock or "
                f"os.urandom.")
    if cfg["determinism"]["mode"] != "strict":
        return (f" The first op that differs, {op}, got identical inputs: determinism=strict "
                f"makes torch use a deterministic kernel for it, or stop naming it when it "
                f"has none.")
    return ""


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--launch":
        raise SystemExit(_launch_child(sys.argv[2:]))
    print("usage: python -m harness.commands.verify --launch CONFIG_JSON RUNS_DIR INDEX (internal; "
          "use `harness verify`)", file=sys.stderr)
    raise SystemExit(2)
