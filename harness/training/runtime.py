"""The runtime every training process runs inside: the built-in loop (train.py), each of
its data-parallel ranks, and the runner of a user's own script (script.py).

    rt = Runtime.start(run_dir)        # before anything else in the process
    ...                                # the training: rt.cfg, rt.device, rt.stop_requested
    rt.write_lock(results, resumes, timing)

`start` owns, in this order: the stop signals (SIGTERM/SIGUSR1 -> checkpoint, exit 75) and
the watch on the launcher (a training process must not outlive it unnoticed); the run's
config and launch facts; the determinism settings, applied, seeded and read back (a run
whose settings did not take effect stops); the rank, for a data-parallel run (its device,
and joining the others: `join_ranks`); the device, checked against what the host has.
`write_lock` captures what the process saw (software, hardware, environment, determinism in
effect) and writes the lockfile, last.

For a user's own script run by `harness run`, this module is also the public API: `seed()`,
`generator(stream)`, `worker_init_fn` and `record_output(path)` (README, "Your own
script"). The script needs none of them to reproduce; they are for explicit control.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from harness import rundir
from harness.config import load_yaml
from harness.env import LAUNCHER_PID, RUN_DIR, SEED, SLURM_RESTART_COUNT
from harness.errors import EnvironmentProblem
from harness.host import gpu
from harness.record import lockfile
from harness.training import checkpoint, determinism, distributed, seeding

PR_SET_PDEATHSIG = 1  # linux/prctl.h


# ---------------------------------------------------------------- public API for scripts


def seed() -> int:
    """The run's seed (`HARNESS_SEED`); outside `harness run`, 0."""
    return int(os.environ.get(SEED, "0"))


def generator(stream: str = "default", device: str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from (the run's seed, `stream`): one stream per purpose
    (data order, augmentation, ...) keeps each independent of how much the others draw."""
    made = torch.Generator(device=device)
    made.manual_seed(seeding.stream_seed(seed(), "user", stream))
    return made


def worker_init_fn(worker_id: int) -> None:
    """The DataLoader worker set-up `harness run` gives a loader that has none: python and
    numpy seeded from the worker's torch seed; SIGTERM/SIGUSR1 left to the main process."""
    seeding.worker_init(worker_id)


def record_output(path) -> None:
    """Declare an output from inside the script (as `--output PATH` would): it is kept in
    the run directory, hashed into the lockfile and compared by `harness replay`."""
    run_dir = os.environ.get(RUN_DIR)
    if not run_dir:
        return  # not under `harness run`: nothing to record into
    directory = Path(run_dir) / rundir.SCRIPT_REPORTS
    directory.mkdir(exist_ok=True)
    with open(directory / rundir.SCRIPT_OUTPUTS, "a") as handle:
        handle.write(f"{os.path.abspath(path)}\n")


# ---------------------------------------------------------------- the runtime


class Runtime:
    def __init__(self, run_dir: Path, watch_stdin: bool = False,
                 cfg: Optional[Dict[str, Any]] = None):
        """`cfg`: the run's config.yaml where the caller has read it already."""
        self.started = time.time()
        self.run_dir = Path(run_dir)
        # Before anything else: a stop signal must find its handler, even one sent because
        # the launcher died while this process was starting.
        self.stop = StopRequest(self.run_dir / rundir.LOG).install()
        stop_when_launcher_dies(watch_stdin)
        self.cfg: Dict[str, Any] = cfg if cfg is not None else \
            load_yaml(self.run_dir / rundir.CONFIG)
        self.launch: Dict[str, Any] = rundir.read_json(self.run_dir / rundir.LAUNCH)
        self.in_effect: Dict[str, Any] = {}
        self._checkpoint_facts: Optional[Dict[str, Any]] = None
        self.rank = distributed.SINGLE  # which data-parallel rank this process is
        self.ranks: List[Dict[str, Any]] = []  # every rank's host and device (lockfile)
        self.device = torch.device(self.cfg["trainer"]["device"])

    @classmethod
    def start(cls, run_dir: Path, watch_stdin: bool = False,
              cfg: Optional[Dict[str, Any]] = None) -> "Runtime":
        runtime = cls(run_dir, watch_stdin, cfg)
        det = runtime.cfg["determinism"]
        # Determinism first: nothing may draw a random number before the seeds are set.
        determinism.apply(det)
        seeding.seed_everything(runtime.cfg["seed"])
        runtime.in_effect = determinism.audit()
        determinism.check(det, runtime.in_effect)
        world = distributed.World.of(runtime.cfg)
        rank = distributed.this_rank(world.size, world.devices)
        if rank is None:
            raise EnvironmentProblem(
                "this run has several ranks (trainer.devices × trainer.nodes > 1) but this "
                "process was started without a rank: start it with `harness train`, which "
                "starts every rank.")
        if rank.distributed:
            runtime.join_ranks(rank)
        if runtime.device.type == "cuda":
            confirm_gpus(runtime.device)
        return runtime

    def join_ranks(self, rank: "distributed.Rank") -> None:
        """As rank `rank` of a data-parallel run: take this rank's device and join the
        others (the process group), learning where each of them runs."""
        trainer = self.cfg["trainer"]
        self.rank = rank
        self.device = torch.device(distributed.rank_device(trainer["device"], rank))
        distributed.init(rank, str(self.device),
                         distributed.World.of(self.cfg).collective_timeout_s)
        self.ranks = distributed.all_gather(distributed.describe(rank, str(self.device)), rank)
        self._same_math_everywhere()

    def _same_math_everywhere(self) -> None:
        """Every rank must compute alike (library builds, CPU kernels, GPU model, threads):
        a rank on a node of another kind would change the bits, and only rank 0's facts go
        into the lockfile and the checkpoint."""
        facts = distributed.all_gather(self.checkpoint_facts(), self.rank)
        for rank, theirs in enumerate(facts):
            if theirs != facts[0]:
                keys = checkpoint.differing_keys(facts[0], theirs)
                raise EnvironmentProblem(
                    f"rank {rank} (host {self.ranks[rank]['host']}) computes differently from "
                    f"rank 0 (host {self.ranks[0]['host']}): {', '.join(keys)} differ. Run all "
                    f"ranks on nodes of one kind (Slurm: a --constraint or one partition).")

    def say(self, text: str) -> None:
        """A line for the log, from rank 0 only (every rank would say the same)."""
        if self.rank.is_main:
            print(text, flush=True)

    @property
    def stop_requested(self) -> Optional[str]:
        """The stop signal's name once one arrived (checkpoint and exit REQUEUE_EXIT)."""
        return self.stop.name or None

    def checkpoint_facts(self) -> Dict[str, Any]:
        """What a checkpoint must share with the process that resumes it (read once)."""
        if self._checkpoint_facts is None:
            self._checkpoint_facts = checkpoint.environment_facts(
                self.in_effect, self.cfg["trainer"]["device"])
        return self._checkpoint_facts

    def write_lock(self, results: Dict[str, Any], resumes: List[Dict[str, Any]],
                   timing: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> None:
        """The lockfile: the launcher's facts (launch.json) and what this process saw."""
        finished = time.time()
        det = self.cfg["determinism"]
        first_step = timing.get("first_step_unix") or finished
        process = {
            # The seed is the lock's `seed` (and config.seed); locks written before
            # 2026-11-26 repeated it here as determinism.seed (the gate ignores that).
            "determinism": {"mode": det["mode"], "in_effect": self.in_effect},
            "software": lockfile.capture_software(),
            "hardware": lockfile.capture_hardware(),
            "environment": lockfile.capture_environment(),
            "results": results,
            "resumes": resumes,
            "timing": {
                "time_to_first_step_s": round(first_step - self.launch["launched_unix"], 3),
                **timing,
                "train_process_s": round(finished - self.started, 3),
            },
            **(extra or {}),
        }
        if self.rank.distributed:
            process["distributed"] = self.distributed_facts()
        lockfile.write(self.run_dir / rundir.LOCK,
                       lockfile.complete(self.launch["lock"], process))


    def distributed_facts(self) -> Dict[str, Any]:
        """The lockfile's `distributed` section: the world, the collective settings, and
        where each rank ran."""
        world = distributed.World.of(self.cfg)
        return {"world_size": self.rank.world_size, "nodes": world.nodes,
                "devices_per_node": world.devices,
                "backend": distributed.collective_backend(self.cfg["trainer"]["device"]),
                "bucket_cap_mb": world.bucket_cap_mb,
                "collective_env": {name: os.environ.get(name)
                                   for name in distributed.COLLECTIVE_ENV},
                "ranks": self.ranks}


class StopRequest:
    """SIGTERM / SIGUSR1 (a scheduler preempting us, or a time limit coming): remember it;
    the loop writes a checkpoint at the next step boundary and exits with
    REQUEUE_EXIT. The handler only sets a flag (printing here could re-enter
    a write in progress)."""

    def __init__(self, log_path: Path):
        self.signum = None
        self.log_path = log_path
        # A process that trains in a child (a user's command) passes the signal on to it.
        self.forward: Optional[Callable[[int], None]] = None

    def install(self) -> "StopRequest":
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        if launcher_gone():
            # Our stdout is a pipe nobody reads any more: a line written to it would fail
            # (BrokenPipeError) before the checkpoint is written. Write to the log instead.
            output_to_log(self.log_path)
        if self.forward is not None:
            self.forward(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def output_to_log(log_path: Path) -> None:
    """From now on, this process's stdout and stderr append to `log_path` (train.log)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, sys.stdout.fileno())
    os.dup2(fd, sys.stderr.fileno())
    os.close(fd)


def slurm_restarts() -> int:
    """How often Slurm restarted this batch job (requeued after a preemption). Above 0 the
    run resumes by itself: the built-in loop from its checkpoint, a command with
    HARNESS_RESUME=1."""
    return int(os.environ.get(SLURM_RESTART_COUNT) or 0)


def launcher_gone() -> bool:
    """A local training process whose launcher (its parent) has died."""
    launcher = os.environ.get(LAUNCHER_PID)
    return bool(launcher) and os.getppid() != int(launcher)


def confirm_gpus(device: torch.device) -> None:
    """The GPUs torch sees here must be the ones NVML reports for the host (the lockfile
    records NVML's): the same UUID, name and compute capability, or stop."""
    if not torch.cuda.is_available():
        raise EnvironmentProblem("trainer.device=cuda but torch sees no CUDA device here; "
                                 "use trainer.device=cpu or run on a machine with an NVIDIA "
                                 "GPU (in a container: through the NVIDIA Container Toolkit).")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise EnvironmentProblem(f"trainer.device={device} but torch sees "
                                 f"{torch.cuda.device_count()} CUDA device(s) here "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    nvml = gpu.capture(sm_from_torch=False)
    if nvml["nvml_error"] or any(g["mig_mode"] for g in nvml["gpus"]):
        why = nvml["nvml_error"] or "MIG slices have UUIDs of their own"
        print(f"harness: the GPUs torch sees are recorded without NVML's confirmation "
              f"({why})", flush=True)
        return
    problems = gpu.disagreements(nvml["gpus"], gpu.torch_devices())
    if problems:
        raise EnvironmentProblem("the GPUs torch sees disagree with what NVML reports: "
                                 + "; ".join(problems) + ". Check CUDA_VISIBLE_DEVICES and "
                                 "that the driver and the container runtime agree.")


def stop_when_launcher_dies(watch_stdin: bool) -> None:
    """A training process must not outlive its launcher unnoticed (a resume would start a
    second writer on the run). When the launcher dies, even by SIGKILL, send ourselves
    SIGTERM: StopRequest then checkpoints at the next step boundary and exits 75.
    A local child learns it from the kernel (PR_SET_PDEATHSIG); in a container, where the
    launcher is no parent, from the end of the stdin the launcher holds open."""
    if os.environ.get(LAUNCHER_PID):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # not Linux: the broken stdout pipe ends the process at its next line
        if launcher_gone():  # it died before the line above took effect
            os.kill(os.getpid(), signal.SIGTERM)
    if watch_stdin:
        threading.Thread(target=_stop_at_end_of_stdin, daemon=True).start()


def _stop_at_end_of_stdin() -> None:
    # The raw descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader
    # would hold its lock when the interpreter shuts down (a fatal error).
    while os.read(0, 1 << 16):
        pass  # nothing is sent; only the end matters
    os.kill(os.getpid(), signal.SIGTERM)
