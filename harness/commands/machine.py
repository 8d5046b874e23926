"""`harness machine record`: add the machine it runs on to the corpus (harness/record/corpus.py).

For each CPU mode this CPU can run, the golden config is trained by `harness train` itself
(a child process, as a user would run it) and its run directory copied in, checkpoints left
out; then the per-op table (cpu_ops.py). A mode already recorded for this class is kept as
it is: recordings are evidence, never regenerated. Each mode's folder appears whole or not
at all (written beside, then renamed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from harness.errors import EnvironmentProblem, RunFailed
from harness.host import machine_class
from harness.record import corpus, cpu_ops
from harness.rundir import CHECKPOINTS, atomic_write_text
from harness.training.determinism import cpu_supports

MODES = ("native", "default", "avx2", "avx512", "portable")


def modes_here(facts: dict) -> List[str]:
    """The CPU modes this CPU can run."""
    return [m for m in MODES if m == "native" or cpu_supports(m, facts["isa_flags"])]


def entry_folder(root: Path, facts: dict) -> Path:
    """This class's folder: the recorded one, else a new one named by its class id (with a
    number added where another class already holds that name)."""
    found = corpus.entry_for(facts, root, exact=True)  # not an older, vaguer recording
    if found:
        return found.path
    name, number = machine_class.class_id(facts), 2
    folder = root / name
    while (folder / corpus.CLASS_FILE).exists():  # a folder without one: an unfinished record
        folder, number = root / f"{name}-{number}", number + 1
    return folder


def train_golden(mode: str, runs_dir: Path) -> Path:
    """Train the golden config in CPU mode `mode`; its run directory."""
    command = [sys.executable, "-m", "harness", "train", corpus.GOLDEN_CONFIG,
               *corpus.GOLDEN_OVERRIDES, f"determinism.cpu_isa={mode}", "--runs-dir",
               str(runs_dir)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RunFailed(f"recording cpu_isa={mode} failed: `{' '.join(command)}` exited "
                        f"{done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}")
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return runs[0]


def record(root: Optional[Path] = None, modes: Optional[List[str]] = None,
           say: Callable[[str], None] = print) -> Path:
    """Record this machine's class; its folder."""
    root = root or corpus.default_root()
    facts = machine_class.this_machine()
    possible = modes_here(facts)
    wanted = modes or possible
    unsupported = [m for m in wanted if m not in possible]
    if unsupported:
        raise EnvironmentProblem(f"this CPU ({machine_class.class_id(facts)}) cannot run "
                                 f"cpu_isa={', '.join(unsupported)}; it can run "
                                 f"{', '.join(possible)}.")
    folder = entry_folder(root, facts)
    say(f"machine class {machine_class.class_id(facts)}: recording into {folder}")
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    for mode in wanted:
        target = folder / "runs" / mode
        if target.exists():
            say(f"  cpu_isa={mode}: already recorded, kept")
            continue
        say(f"  cpu_isa={mode}: training the golden config ...")
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            run_dir = train_golden(mode, Path(scratch) / "runs")
            staged = Path(scratch) / mode
            shutil.copytree(run_dir, staged / run_dir.name,
                            ignore=shutil.ignore_patterns(CHECKPOINTS))
            staged.rename(target)
        if not (folder / corpus.CLASS_FILE).exists():  # with the first run: its torch
            write_class(folder, facts, target)
    record_ops(folder / corpus.OPS_FILE, say)
    return folder


def record_ops(path: Path, say: Callable[[str], None]) -> None:
    """The per-op table: measured whole where there is none, else only the settings it
    lacks (a setting added since it was recorded) are measured and added."""
    recorded = json.loads(path.read_text()) if path.exists() else None
    missing = [n for n in cpu_ops.SETTINGS if recorded is None or n not in recorded["settings"]]
    if not missing:
        return
    say(f"  per-op table (harness machine ops): {len(missing)} setting(s) ...")
    measured = cpu_ops.table(names=missing)
    if recorded is not None:
        measured["settings"] = {**recorded["settings"], **measured["settings"]}
        measured["cpu"] = recorded["cpu"]
    atomic_write_text(path, json.dumps(measured, indent=1, sort_keys=True) + "\n")


def write_class(folder: Path, facts: dict, mode_folder: Path) -> None:
    run_dir = next(p for p in mode_folder.iterdir() if p.is_dir())
    torch_version = json.loads((run_dir / "harness.lock").read_text())["software"]["torch"]
    info = {"class": facts, "class_id": machine_class.class_id(facts),
            "model": machine_class.read_cpuinfo()["model"], "torch": torch_version,
            "recorded_by": "harness machine record"}
    atomic_write_text(folder / corpus.CLASS_FILE, json.dumps(info, indent=1, sort_keys=True)
                      + "\n")
