"""The backend interface: launch a prepared run directory, wait for it, stop it, and clean
up what a killed launcher left running."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Protocol


@dataclass
class LaunchSpec:
    run_dir: Path  # prepared: config.yaml and launch.json are in it
    env: Dict[str, str]  # the pinned environment the training process must start with
    data_root: Optional[Path] = None  # verified dataset directory (read-only for training)
    extra_args: list = field(default_factory=list)  # appended to `python -m harness.train`
    # The run directory's WriterLock descriptor: a training process that can inherit it
    # (a local child) keeps the run locked while it lives, even if the launcher is killed.
    lock_fd: Optional[int] = None


class Handle(Protocol):
    def wait(self) -> int:
        """Stream the training output until it ends; return its exit code."""

    def stop(self) -> None:
        """Stop the training (and clean up whatever the backend created)."""


class Backend(Protocol):
    name: str

    def launch(self, spec: LaunchSpec) -> Handle:
        ...

    def clean_up(self, run_dir: Path) -> List[str]:
        """Before a resume, with the run's WriterLock held: stop what a killed launcher left
        running for this run; return what was done, one line each."""
