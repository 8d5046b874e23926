"""The corpus of recorded machine classes: the evidence for what gives the same bits where.

One folder per machine class (tests/golden/machines/<class-id>/, or $HARNESS_CORPUS):
  class.json               the class facts (harness/cpu.py), torch, how it was recorded
  cpu-ops.json             per CPU setting, a hash of each training op's output (cpu_ops.py)
  runs/<cpu_isa>/<run-id>/ run directories of the golden config (GOLDEN_OVERRIDES), one per
                           CPU mode, as `harness train` wrote them (checkpoints left out)

Made by `harness machine record` (make record-machine) and never edited by hand. Golden
checks compare a machine only with its own class's recordings; two classes count as equal
in a mode only where both recordings of that mode have the same bits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.env import CORPUS
from harness.host import machine_class

GOLDEN_CONFIG = "fashion_mnist"
# Small and short, so recording every mode of a machine takes about a minute, yet long
# enough that a kernel rounding differently shows in the loss bits and final weights.
GOLDEN_OVERRIDES = ("backend=local", "determinism.threads=2", "trainer.max_steps=12",
                    "trainer.eval_limit=200", "trainer.log_every=4", "model.channels=[8,16]",
                    "model.hidden=32")
CLASS_FILE = "class.json"
OPS_FILE = "cpu-ops.json"


def default_root() -> Path:
    """$HARNESS_CORPUS, else the corpus of the checkout the harness runs from."""
    override = os.environ.get(CORPUS)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "tests" / "golden" / "machines"


@dataclass
class Entry:
    """One recorded machine class."""
    path: Path
    facts: Dict[str, Any]
    info: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    def runs(self, mode: str) -> List[Path]:
        """The run directories recorded in CPU mode `mode` (determinism.cpu_isa)."""
        folder = self.path / "runs" / mode
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def modes(self) -> List[str]:
        folder = self.path / "runs"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def entries(root: Optional[Path] = None) -> List[Entry]:
    root = root or default_root()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if (folder / CLASS_FILE).is_file():
            info = json.loads((folder / CLASS_FILE).read_text())
            found.append(Entry(folder, info["class"], info))
    return found


def entry_for(facts: Dict[str, Any], root: Optional[Path] = None,
              exact: bool = False) -> Optional[Entry]:
    """The recorded entry of the class with these facts, if any (machine_class.same_class)."""
    return next((e for e in entries(root) if machine_class.same_class(e.facts, facts, exact)), None)


def result_of(run_dir: Path) -> Dict[str, Any]:
    """What a golden comparison compares: every logged training loss, as bits, and the
    sha256 of the final weights (from an intact lock that describes the run's metrics)."""
    from harness import rundir
    from harness.record import integrity, lockfile, metrics

    lock = lockfile.read(run_dir / rundir.LOCK)
    integrity.check(run_dir, lock)
    train, _ = metrics.read(run_dir)
    return {"loss_hex": [record["loss_hex"] for record in train],
            "weights_sha256": lock["results"]["weights_sha256"]}


def first_difference(expected: Dict[str, Any], found: Dict[str, Any]) -> Optional[str]:
    """None when two results (result_of) are bit for bit the same, else what differs first."""
    for index, (a, b) in enumerate(zip(expected["loss_hex"], found["loss_hex"])):
        if a != b:
            return f"logged loss {index + 1} differs: {a} != {b}"
    if len(expected["loss_hex"]) != len(found["loss_hex"]):
        return (f"{len(expected['loss_hex'])} logged losses expected, "
                f"{len(found['loss_hex'])} found")
    if expected["weights_sha256"] != found["weights_sha256"]:
        return (f"final weights differ: {expected['weights_sha256'][:16]}... != "
                f"{found['weights_sha256'][:16]}...")
    return None


def agreement(a: Dict[str, Any], b: Dict[str, Any], mode: str,
              root: Optional[Path] = None) -> Optional[bool]:
    """Whether classes a and b (class facts) give the same bits in CPU mode `mode`, as the
    corpus shows: True when they are one class or both recordings of `mode` are bit for bit
    the same, False when both are recorded and differ, None (unproven) when either class
    has no recording of `mode`."""
    if machine_class.same_class(a, b):
        return True
    found = [entry_for(facts, root) for facts in (a, b)]
    runs = [entry.runs(mode) if entry else [] for entry in found]
    if not all(runs):
        return None
    try:
        results = [result_of(mode_runs[0]) for mode_runs in runs]
    except (OSError, ValueError, KeyError):  # a damaged recording is no evidence
        return None
    return first_difference(*results) is None
