"""The backend interface: check and describe where a run will train (`lock_facts`), launch
a prepared run directory, and clean up what a killed launcher left running. A launch
returns a handle to wait on, signal or stop; a batch backend also submits several prepared
runs as one job (`harness submit`). `harness.backends.classes()` maps names to classes.

The launcher hands a backend everything in a LaunchSpec (the resolved config and the
launch facts included), so no backend reads the run directory's files back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol

if TYPE_CHECKING:  # annotations only: the training process imports backends.local
    from harness.config import RunConfig


@dataclass
class LaunchSpec:
    run_dir: Path  # prepared: config.yaml and launch.json are in it
    conf: RunConfig  # the resolved config, typed (config.typed of what config.yaml holds)
    lock: Dict[str, Any]  # the launcher's lock facts (launch.json's `lock`)
    env: Dict[str, str]  # the pinned environment the training process must start with
    data_root: Optional[Path] = None  # verified dataset directory (read-only for training)
    extra_args: list = field(default_factory=list)  # appended to `python -m harness.train`
    # The run directory's WriterLock descriptor: a training process that can inherit it
    # (a local child) keeps the run locked while it lives, even if the launcher is killed.
    lock_fd: Optional[int] = None


class Handle(Protocol):
    def wait(self) -> int:
        """Stream the training output until it ends; return its exit code."""

    def signal(self, signum: int) -> None:
        """Pass a stop signal (SIGTERM/SIGUSR1) on to the training, if it still runs."""

    def stop(self) -> None:
        """Stop the training (and clean up whatever the backend created)."""


class Backend:
    name = ""
    # The training runs in an image or on another node: the software and environment a
    # replay compares are those recorded there, not this host's.
    trains_elsewhere = False
    # The backend's job sends the run to its trackers itself (a batch job outlives the
    # command that submitted it); otherwise the launcher follows the run while it waits.
    tracks_itself = False
    # The backend can submit a batch of prepared runs as one job (`harness submit`).
    batch = False

    def lock_facts(self, conf: RunConfig) -> Dict[str, Any]:
        """Before any run directory exists: check that the backend can run `conf` (engine
        up, image built, GPUs reachable) and return the lockfile sections it adds."""
        return {}

    def launch(self, spec: LaunchSpec) -> Handle:
        raise NotImplementedError

    def submit(self, specs: List[LaunchSpec], log_dir: Optional[Path] = None) -> str:
        """A batch backend: submit prepared runs as one job (several: a job array), mark
        them queued, return the job id."""
        raise NotImplementedError

    def clean_up(self, run_dir: Path, conf: RunConfig) -> List[str]:
        """Before a resume, with the run's WriterLock held: stop what a killed launcher left
        running for this run (`conf`: its config); return what was done, one line each."""
        return []
