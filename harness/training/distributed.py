"""Data-parallel training: which rank a process is, how the ranks of a run start, agree on
when to stop, and stop together.

A run has trainer.nodes × trainer.devices ranks (the world). Each rank is one training
process running `python -m harness.train RUN_DIR`, inside the same runtime as a
single-process run (harness.runtime). Ranks learn who they are from torchrun's variables:

    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT

set either by the rank launcher below (`launch_ranks`: one node, local and docker backends)
or derived from Slurm's own (`srun`, one task per rank: SLURM_PROCID, SLURM_LOCALID,
SLURM_NODEID). Slurm numbers tasks in the order of the job's node list, so node ranks are
pinned to it (c10d's rendezvous would hand them out in arrival order, pytorch#137402).

What keeps the ranks bit for bit:
- every step's global batch and each rank's share of it are pure functions of
  (seed, epoch, step) (harness.train.EpochShards);
- a stop signal reaches ranks at different steps: they agree on it with one all-reduce per
  step (`StepAgreement`), so every rank checkpoints after the same step;
- rank 0 writes one checkpoint holding every rank's RNG state, so a kill during the write
  never leaves a mixed-step set;
- a rank that dies makes the launcher kill the others at once (a rank blocked in a
  collective would otherwise wait for the collective timeout).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from harness.config import TrainerConf
from harness.env import RANKS, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_PROCID
from harness.errors import REQUEUE_EXIT, ConfigError, EnvironmentProblem
from harness.rundir import TRAINING_MODULE

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                 "MASTER_ADDR", "MASTER_PORT")
# How long ranks that agreed to stop (exit 75) may take to finish their checkpoint
# before the launcher kills them.
STOP_GRACE_S = 120.0
# How long the other ranks may take to exit once one rank exited 0 (the work is done;
# a rank still running is most likely stuck in its teardown) before they are stopped.
EXIT_GRACE_S = 30.0
STACK_WAIT_S = 3.0  # how long a hung rank gets to write its stack before it is killed


# Settings that decide the reduction order of collectives (recorded per run).
COLLECTIVE_ENV = ("NCCL_ALGO", "NCCL_PROTO")


@dataclass(frozen=True)
class World:
    """A run's data-parallel settings (trainer.*). A config.yaml written before they
    existed gets TrainerConf's defaults: its run resumes as the one-process run it was."""
    devices: int
    nodes: int
    bucket_cap_mb: int
    collective_timeout_s: int

    @classmethod
    def of(cls, cfg: Dict[str, Any]) -> "World":
        trainer = cfg["trainer"]
        return cls(**{name: int(trainer.get(name, getattr(TrainerConf, name)))
                      for name in cls.__dataclass_fields__})

    @property
    def size(self) -> int:
        return self.devices * self.nodes


def world_size(cfg: Dict[str, Any]) -> int:
    return World.of(cfg).size


def check_world(cfg: Dict[str, Any], backend_name: str) -> None:
    """Refuse a world the backend cannot run, before anything is written."""
    trainer, world = cfg["trainer"], World.of(cfg)
    if world.size > 1 and ":" in str(trainer["device"]):
        raise ConfigError(f"trainer.device={trainer['device']} names one GPU, but "
                          f"trainer.devices={world.devices} ranks each need their own: "
                          f"use trainer.device=cuda (rank N of a node uses cuda:N).")
    runtime = str(cfg["backend"]["slurm"]["runtime"])
    if world_size(cfg) > 1 and backend_name == "slurm" and runtime != "none":
        raise ConfigError(f"a data-parallel job (trainer.devices × trainer.nodes = "
                          f"{world_size(cfg)}) runs with backend.slurm.runtime=none for now "
                          f"(the harness venv on a shared filesystem); runtime={runtime} is "
                          f"not available for it yet.")
    if world.nodes > 1 and backend_name != "slurm":
        raise ConfigError(f"trainer.nodes={world.nodes} needs backend=slurm: the "
                          f"{backend_name} backend runs on this one machine. Use "
                          f"trainer.nodes=1 trainer.devices=N here, or submit it to Slurm.")


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def environment(self) -> Dict[str, str]:
        """torchrun's variables for this rank."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "NODE_RANK": str(self.node_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


SINGLE = Rank()


def this_rank(world: int, devices: int,
              environ: Optional[Dict[str, str]] = None) -> Optional[Rank]:
    """Which rank this process is: SINGLE for a one-process run; None for the first
    process of a data-parallel run on one machine (it must start the ranks); else the rank
    its environment names. Raises EnvironmentProblem when that environment disagrees with
    the config's world."""
    env = os.environ if environ is None else environ
    if world == 1:
        return SINGLE
    if env.get(RANKS) == "slurm":
        rank = Rank(rank=int(env[SLURM_PROCID]), world_size=int(env[SLURM_NTASKS]),
                    local_rank=int(env[SLURM_LOCALID]), local_world_size=devices,
                    node_rank=int(env[SLURM_NODEID]), master_addr=env["MASTER_ADDR"],
                    master_port=int(env["MASTER_PORT"]))
    elif "RANK" in env:
        missing = [name for name in TORCHRUN_VARS[:2] + TORCHRUN_VARS[-2:] if name not in env]
        if missing:
            raise EnvironmentProblem(f"RANK is set but {', '.join(missing)} not: start the "
                                     f"ranks with `harness train` (or torchrun), which sets "
                                     f"all of {', '.join(TORCHRUN_VARS)}.")
        rank = Rank(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                    local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", devices)),
                    node_rank=int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))),
                    master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]))
    else:
        return None
    if rank.world_size != world:
        raise EnvironmentProblem(
            f"this process is rank {rank.rank} of {rank.world_size}, but the run's config "
            f"asks for trainer.nodes × trainer.devices = {world} ranks. Start it with as many "
            f"processes (Slurm: --ntasks={world}) or change the config.")
    return rank


def rank_device(device: str, rank: Rank) -> str:
    """A rank's device: on CUDA, the GPU of its local rank (cuda:LOCAL_RANK)."""
    if rank.distributed and device.startswith("cuda"):
        return f"cuda:{rank.local_rank}"
    return device


def collective_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def pinned_environment(cfg: Dict[str, Any]) -> Dict[str, str]:
    """Variables that decide the reduction order of collectives, pinned in strict mode
    (as Megatron's deterministic mode does): NCCL picks its algorithm and protocol by
    message size and topology, and a different pick sums in another order."""
    if world_size(cfg) == 1 or cfg["determinism"]["mode"] != "strict" \
            or not str(cfg["trainer"]["device"]).startswith("cuda"):
        return {}
    return {"NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}


# ---------------------------------------------------------------- inside a rank


def init(rank: Rank, device: str, timeout_s: float) -> None:
    """Join the run's process group. A collective that waits longer than `timeout_s`
    (a peer died) fails instead of hanging."""
    import torch.distributed as dist

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(rank.local_rank)
    dist.init_process_group(
        backend=collective_backend(device), rank=rank.rank, world_size=rank.world_size,
        init_method=f"tcp://{rank.master_addr}:{rank.master_port}",
        timeout=timedelta(seconds=timeout_s))
    _HELD.append(dist.group.WORLD)  # from now on this process ends by exit_process


def finish() -> None:
    """Wait until every rank got here: none is still in a collective, so none can be left
    waiting for this one. (The group is left by ending the process: exit_process.)"""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def gather_to_main(value: Any, rank: Rank) -> Optional[List[Any]]:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    if not rank.distributed:
        return [value]
    import torch.distributed as dist

    gathered: Optional[List[Any]] = [None] * rank.world_size if rank.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def all_gather(value: Any, rank: Rank) -> List[Any]:
    if not rank.distributed:
        return [value]
    import torch.distributed as dist

    gathered: List[Any] = [None] * rank.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: Any, rank: Rank) -> Any:
    if not rank.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StepAgreement:
    """After each step: the global mean loss, and whether any rank was asked to stop, in
    one all-reduce (float64, summed over ranks in a fixed order by gloo/NCCL)."""

    def __init__(self, rank: Rank, device: str):
        self.rank, self.device = rank, device

    def after_step(self, loss: float, samples: int, stop: bool):
        """(mean loss over the global batch, stop?)."""
        if not self.rank.distributed:
            return loss, stop
        import torch
        import torch.distributed as dist

        values = torch.tensor([loss * samples, float(samples), float(stop)],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        total, count, stops = values.tolist()
        return total / count, stops > 0


# Objects that hold the process group, kept until the rank process ends (`exit_process`).
# Freeing DDP's reducer frees the group, whose destructor joins gloo's worker threads while
# holding the GIL; a worker still freeing a finished collective (its tensors) waits for the
# GIL: a deadlock at the end of the run (2 of the first 6 two-rank runs here hung).
_HELD: List[Any] = []


def wrap_model(model, rank: Rank, device: str, bucket_cap_mb: int):
    """DistributedDataParallel with the configured bucket size (it decides which gradients
    are reduced together)."""
    if not rank.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [rank.local_rank] if device.startswith("cuda") else None
    wrapped = DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb)
    _HELD.append(wrapped)
    return wrapped


def exit_process(code: int) -> None:
    """End a training process with `code`. A rank of a data-parallel run ends without
    running destructors (see _HELD), once everything it wrote is flushed."""
    if not _HELD:
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def describe(rank: Rank, device: str) -> Dict[str, Any]:
    """This rank's line of the lockfile's `distributed.ranks`."""
    facts: Dict[str, Any] = {"rank": rank.rank, "node_rank": rank.node_rank,
                             "local_rank": rank.local_rank, "host": socket.gethostname(),
                             "device": device}
    if device.startswith("cuda"):
        import torch

        facts["gpu_uuid"] = str(torch.cuda.get_device_properties(rank.local_rank).uuid)
    return facts


# ---------------------------------------------------------------- the rank launcher


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_ranks(count: int) -> List[Rank]:
    """The ranks of a world of `count` processes on this machine."""
    port = free_port()
    return [Rank(rank=i, world_size=count, local_rank=i, local_world_size=count,
                 master_addr="127.0.0.1", master_port=port) for i in range(count)]


def launch_ranks(argv: List[str], devices: int, log_path: Path, launcher_pid_env: str,
                 watch_launcher: Callable[[], None]) -> Tuple[int, str]:
    """Start `devices` ranks of `python -m harness.train ARGV` on this machine and wait for
    them. SIGTERM/SIGUSR1 are passed to every rank (they agree on a step, checkpoint and
    exit 75); a rank that fails makes the others be killed at once; their output is passed
    through, with a `[rank N]` prefix for ranks above 0. Returns (the run's exit code, why
    it failed or "")."""
    group = RankGroup([], log_path)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda s, f: group.signal(s))
    watch_launcher()  # our launcher dying is a stop signal too (runtime.py)
    child_argv = [a for a in argv if a != "--watch-stdin"]  # children watch us instead
    # Ranks on one machine talk over loopback; without a name that resolves to a local
    # address (a container's host name with network none) gloo would warn and pick it too.
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, launcher_pid_env: str(os.getpid())}
    group.start(local_ranks(devices), lambda rank: subprocess.Popen(
        [sys.executable, "-u", "-m", TRAINING_MODULE, *child_argv],
        env={**env, **rank.environment()},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    code = group.wait()
    return code, group.failure


class RankGroup:
    """The rank processes of one machine: output passed through, failures contained."""

    def __init__(self, processes: List[subprocess.Popen], log_path: Path,
                 exit_grace_s: float = EXIT_GRACE_S,
                 stack_of: Optional[Callable[[int], Optional[str]]] = None):
        self.processes, self.log_path = processes, log_path
        self.lock = threading.Lock()
        self.readers: List[threading.Thread] = []
        self.failure = ""  # why the run failed, once a rank did
        self.stop_signal: Optional[int] = None  # a stop signal already passed on
        self.exit_grace_s = exit_grace_s
        # stack_of(pid): the stack a rank wrote on STACK_SIGNAL; "" before it has, None
        # for a process that cannot write one (it did not register for the signal)
        self.stack_of = stack_of
        self.hung: List[Dict[str, Any]] = []  # ranks stopped after the others exited 0

    def start(self, ranks: List[Rank], start_one: Callable[[Rank], subprocess.Popen]) -> None:
        """A process per rank; if one cannot start, those started are killed (they would
        wait for it) and the error goes on."""
        try:
            for rank in ranks:
                self.add(start_one(rank))
        except BaseException:
            self.kill_all()
            raise

    def add(self, process: subprocess.Popen) -> None:
        reader = threading.Thread(target=self._pass_output,
                                  args=(len(self.processes), process), daemon=True)
        self.processes.append(process)
        self.readers.append(reader)
        reader.start()
        if self.stop_signal is not None:  # it came while the ranks were starting
            process.send_signal(self.stop_signal)

    def _pass_output(self, index: int, process: subprocess.Popen) -> None:
        prefix = f"[rank {index}] ".encode() if index else b""
        for line in process.stdout:
            self.write(prefix + line)

    def write(self, data: bytes) -> None:
        with self.lock:
            try:
                os.write(sys.stdout.fileno(), data)
            except BrokenPipeError:  # our reader is gone: keep the lines in the log
                with open(self.log_path, "ab") as log:
                    log.write(data)

    def say(self, text: str) -> None:
        self.write(f"harness: {text}\n".encode())

    def signal(self, signum: int) -> None:
        self.stop_signal = signum
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def wait(self) -> int:
        """The group's exit code once every rank ended. Once rank 0 exited 0 (it ends last
        in a run that went well: it writes the results), the others get exit_grace_s to
        follow; those that do not are stopped (their stacks kept in `hung`) and the group
        counts as done: no run waits forever on a rank."""
        stopping_since: Optional[float] = None
        done_since: Optional[float] = None
        while True:
            codes = [p.poll() for p in self.processes]
            if any(c not in (None, 0, REQUEUE_EXIT) for c in codes):
                return self._contain()
            if all(c is not None for c in codes):
                break
            if REQUEUE_EXIT in codes:  # ranks that agreed to stop finish their checkpoint
                stopping_since = stopping_since or time.monotonic()
                if time.monotonic() - stopping_since > STOP_GRACE_S:
                    late = [str(i) for i, c in enumerate(codes) if c is None]
                    return self._contain(
                        f"rank(s) {', '.join(late)} did not stop within "
                        f"{STOP_GRACE_S:.0f} s after the others checkpointed; killed")
            elif codes[0] == 0:  # rank 0 writes last (weights, lock): its end is the end
                done_since = done_since or time.monotonic()
                if time.monotonic() - done_since > self.exit_grace_s:
                    self._stop_hung([i for i, c in enumerate(codes) if c is None])
                    codes = [p.poll() for p in self.processes]
                    if any(c not in (None, 0, REQUEUE_EXIT) and i not in
                           {h["rank"] for h in self.hung} for i, c in enumerate(codes)):
                        return self._contain()
                    break
            time.sleep(0.05)
        self._drain()
        return REQUEUE_EXIT if REQUEUE_EXIT in codes else 0

    def _stop_hung(self, late: List[int]) -> None:
        """Ranks still running exit_grace_s after rank 0 exited 0: their stacks (where
        they hung), asked only of a process that registered for the signal (stack_of gives
        "" for it), then SIGKILL. One that ended meanwhile is not hung."""
        from harness.rundir import STACK_SIGNAL

        asked = [i for i in late if self.stack_of is not None and
                 self.stack_of(self.processes[i].pid) is not None]
        for index in asked:
            self.processes[index].send_signal(STACK_SIGNAL)
        deadline = time.monotonic() + STACK_WAIT_S
        stacks: Dict[int, Optional[str]] = {}
        for index in late:
            pid = self.processes[index].pid
            while index in asked and time.monotonic() < deadline and not self.stack_of(pid):
                time.sleep(0.1)
            stacks[index] = (self.stack_of(pid) or None) if index in asked else None
        late = [i for i in late if self.processes[i].poll() is None]
        self.kill_all()
        for index in late:
            self.hung.append({"rank": index, "stack": stacks[index]})
            self.say(f"rank {index} did not exit within {self.exit_grace_s:g} s after rank 0 "
                     f"exited 0: stopped (a hang in its teardown; "
                     f"{'its stack is below' if stacks[index] else 'no stack was written'})"
                     + (f"\n{stacks[index]}" if stacks[index] else ""))

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()

    def _contain(self, why: str = "") -> int:
        """A rank failed: kill the others now (they may be blocked in a collective, waiting
        for it); report the rank whose end explains the others' and return its exit code
        (128 + N for a rank killed by signal N, the shell's convention)."""
        ended = {i: p.returncode for i, p in enumerate(self.processes) if p.poll() is not None}
        self.kill_all()
        self._drain()
        if why:
            self.failure = why
            self.say(why)
            return 1
        # A rank killed by a signal first (its peers then fail on a closed connection),
        # then one that stopped on a harness error (exit codes 2-6), then the first.
        failed = [(i, c) for i, c in ended.items() if c not in (0, REQUEUE_EXIT)] or \
            [(i, 1) for i in range(len(self.processes)) if i not in ended]
        index, code = min(failed, key=lambda item: (item[1] >= 0, item[1] == 1, item[0]))
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
            f"exited with code {code}"
        self.failure = f"rank {index} {how}; the other ranks were stopped"
        self.say(self.failure)
        return code if code > 0 else 128 - code

    def _drain(self) -> None:
        for reader in self.readers:
            reader.join(timeout=5)
