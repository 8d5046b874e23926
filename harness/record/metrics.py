"""metrics.jsonl: the training's per-step record, one JSON object per line.

    {"kind": "train", "step": N, "epoch": E, "loss": x, "loss_hex": "0x...", ["params": {...}]}
    {"kind": "eval", "step": N, "accuracy": a, "loss": x, "loss_hex": "0x...", "samples": n}

The loop writes it (Writer, flushed per record); a resume truncates it to the checkpoint's
step (truncate) and re-writes the rest bit for bit; replay, verify, plots, trackers and
`harness runs` read it (read, train_steps); the launcher's trackers follow it live (Tail).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness import rundir


class Writer:
    """Appends records, one per line, flushed as written."""

    def __init__(self, run_dir: Path):
        self.handle = open(Path(run_dir) / rundir.METRICS, "a")

    def write(self, record: Dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def read(run_dir: Path) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(train records in step order, the eval record or None)."""
    train, evaluation = [], None
    for line in (Path(run_dir) / rundir.METRICS).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "train":
            train.append(record)
        elif record.get("kind") == "eval":
            evaluation = record
    return train, evaluation


def train_steps(run_dir: Path) -> int:
    """How many train records there are, without parsing them (`harness runs` is instant)."""
    try:
        with open(Path(run_dir) / rundir.METRICS) as handle:
            return sum(1 for line in handle if '"kind": "train"' in line)
    except OSError:
        return 0


class Tail:
    """The records appended since the last call, for a reader that follows a running
    training. A resume replaces the file (truncate): the tail then starts over from its
    beginning, and the caller skips the steps it already has."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / rundir.METRICS
        self.offset = 0
        self.inode: Optional[int] = None

    def new_records(self) -> List[Dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_ino != self.inode or stat.st_size < self.offset:
                    self.inode, self.offset = stat.st_ino, 0
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]


def truncate(run_dir: Path, step: int) -> None:
    """Keep the train records up to `step` (a resumed run re-writes the rest, bit for bit);
    a torn last line from a killed process goes too."""
    path = Path(run_dir) / rundir.METRICS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not line.endswith("\n") or record.get("kind") != "train" or record["step"] > step:
            break
        kept.append(line)
    rundir.atomic_write_text(path, "".join(kept))
