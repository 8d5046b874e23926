"""Training checkpoints: `runs/<run-id>/checkpoints/step-XXXXXXXX.pt`.

A checkpoint holds everything the next optimizer step depends on, so that a run resumed
from it continues bit for bit as if it had never stopped:

    step, epoch, position   optimizer steps taken; the epoch in progress; samples of that
                            epoch already consumed (its order is a pure function of
                            (seed, epoch), so the rest of the epoch is rebuilt exactly)
    model, optimizer,       state dicts
    scheduler
    rng                     python `random`, numpy, torch CPU and every CUDA device
    config_sha256           the run's resolved config (launch.json)
    environment_sha256      hash of the environment facts that change the math
    environment             those facts, so that a refusal can name what differs
    resumes                 the resumes that led to this state (from_step, checkpoint)
    world_size, rank_rngs   data-parallel runs only: the number of ranks that wrote it
                            and each rank's RNG state (`rng` is rank 0's); a resume
                            needs the same world size

Beside each checkpoint lies its checksum, `step-XXXXXXXX.pt.b3`: the BLAKE3 hash of the file
in `b3sum`'s format (`b3sum --check` checks it). It is computed while the file is written,
from the bytes written, and checked while the file is read: a damaged file is skipped like a
torn one. A checkpoint without its checksum is damaged. BLAKE3 rather than sha256 because
the check must hide behind torch.load's own read: sha256 ran at 1.36 GB/s here (with the
CPU's SHA instructions), slower than torch.load reads a checkpoint, while BLAKE3 runs at
5.5 GB/s on one core (the `blake3` package, the reference implementation's bindings).
Checkpoints written before 2026-12-08 have `step-XXXXXXXX.pt.sha256` (`sha256sum`'s
format) and are checked with it; those of format 2 (before 2026-12) carry their hash inside
(`state_sha256`, digest.state_sha256 over the entries above) and are checked that way.

A sample's randomness is a pure function of (seed, epoch, sample index)
(seeding.SeededSamples), so DataLoader workers hold no state a resume must restore.

Written atomically (temp file, fsync, rename); the newest `keep` (2) are kept. Loading
skips a damaged newest checkpoint and falls back to the older one; a checkpoint from
another config or environment is refused, never silently used.

Torch is imported inside the functions: the launcher imports this module for its
constants without loading torch.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness import rundir
from harness.digest import canonical_sha256, file_blake3, file_sha256
from harness.errors import CheckpointRefused, HarnessError  # noqa: F401 (re-exported)

PREFIX = "harness.training.checkpoint/"
FORMAT = PREFIX + "3"  # its checksum in the file beside it
SEALED_INSIDE = PREFIX + "2"  # its hash inside the state (state_sha256): still read
PATTERN = re.compile(r"^step-(\d{8})\.pt$")
# The checksum file beside a checkpoint, by suffix: the algorithm. The first is written.
CHECKSUMS = {".b3": "blake3", ".sha256": "sha256"}

REQUIRED = ("format", "step", "epoch", "position", "config_sha256", "environment_sha256",
            "environment", "model", "optimizer", "scheduler", "rng", "resumes")
# Blocks torch.save writes that are hashed in a second thread while the first writes them.
# Smaller ones (headers, the pickled structure) are hashed in line.
CONCURRENT_BLOCK = 1 << 20


# ---------------------------------------------------------------- facts that must match


def environment_facts(in_effect: Dict[str, Any], device: str) -> Dict[str, Any]:
    """The facts a resumed run must share with the run that wrote the checkpoint: those
    that change floating-point results (library builds, kernels selected for this CPU,
    GPU model and SM count, thread counts and determinism flags in effect). The host name
    and GPU UUIDs are left out: another node of the same kind gives the same bits."""

    import torch

    from harness.host import gpu
    from harness.record import lockfile

    gpus = [{"name": seen["name"], "capability": seen["compute_capability"],
             "sm_count": seen["sm_count"]}
            for seen in (gpu.torch_devices() if torch.cuda.is_available() else [])]
    cpu = lockfile.capture_cpu()
    return {
        **lockfile.math_software(),
        "cpu_architecture": cpu["architecture"],
        "cpu_isa_flags": cpu["isa_flags"],
        "device": device,
        "gpus": gpus if device.startswith("cuda") else [],
        "determinism": {k: v for k, v in in_effect.items() if k != "env"},
        "env": in_effect.get("env", {}),
    }


def facts_sha256(facts: Dict[str, Any]) -> str:
    return canonical_sha256(facts)


def differing_keys(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """The keys whose values differ between two sets of environment facts, sorted."""
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


# ---------------------------------------------------------------- the state


def make_state(step: int, epoch: int, position: int, config_sha256: str,
               facts: Dict[str, Any], model, optimizer, scheduler, rank_rngs: List[Any],
               resumes: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A checkpoint's state (the module docstring lists it): `rank_rngs` holds every rank's
    RNG state, in rank order (one entry for a single process)."""
    state = {
        "step": step, "epoch": epoch, "position": position, "config_sha256": config_sha256,
        "environment_sha256": facts_sha256(facts), "environment": facts,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rank_rngs[0], "resumes": resumes}
    if len(rank_rngs) > 1:
        state.update(world_size=len(rank_rngs), rank_rngs=rank_rngs)
    return state


def rng_of_rank(state: Dict[str, Any], rank: int) -> Any:
    """The RNG state rank `rank` saved (a single process's is `rng`)."""
    return (state.get("rank_rngs") or [state["rng"]])[rank]


def check_world_size(state: Dict[str, Any], path: Path, world_size: int) -> None:
    """Refuse a checkpoint written by another number of ranks."""
    written_by = state.get("world_size", 1)
    if written_by != world_size:
        raise CheckpointRefused(
            f"checkpoint {path} was written by {written_by} rank(s), but this run has "
            f"{world_size}: every rank's RNG state and data shard depend on the world size, "
            f"so it cannot resume bit for bit. Resume with the world it was written with "
            f"(trainer.devices × trainer.nodes = {written_by}).")


# ---------------------------------------------------------------- save / load / validate


def directory(run_dir: Path) -> Path:
    return Path(run_dir) / rundir.CHECKPOINTS


def path_for(run_dir: Path, step: int) -> Path:
    return directory(run_dir) / f"step-{step:08d}.pt"


def listed(run_dir: Path) -> List[Path]:
    """Checkpoint files, newest (highest step) first; temp files are not listed."""
    folder = directory(run_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if PATTERN.match(p.name)), reverse=True)


def checksum_path(path: Path) -> Path:
    """The checksum file written beside checkpoint `path`."""
    return path.with_name(path.name + next(iter(CHECKSUMS)))


def checksum_beside(path: Path) -> Tuple[Optional[Path], str]:
    """The checksum file beside checkpoint `path` and its algorithm, whichever a harness
    wrote (None, '' when there is none)."""
    for suffix, algorithm in CHECKSUMS.items():
        sums = path.with_name(path.name + suffix)
        if sums.exists():
            return sums, algorithm
    return None, ""


def save(run_dir: Path, state: Dict[str, Any], keep: int = 2) -> Path:
    """Write `state` atomically as step-<step>.pt with its checksum beside it, then drop all
    but the newest `keep`. The checksum is renamed into place first: a checkpoint file
    that exists has its checksum."""
    missing = [k for k in REQUIRED if k not in state and k != "format"]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    state = {**state, "format": FORMAT}
    folder = directory(run_dir)
    folder.mkdir(exist_ok=True)
    path = path_for(run_dir, state["step"])
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        checksum = _write_hashed(tmp, state)
        rundir.atomic_write_text(checksum_path(path), f"{checksum}  {path.name}\n")
        os.replace(tmp, path)
    except BaseException as exc:
        full = rundir.out_of_space(exc, folder, f"checkpoint {path.name}")
        tmp.unlink(missing_ok=True)
        if full:
            raise full from None
        raise
    _fsync_dir(folder)
    for old in listed(run_dir)[keep:]:
        old.unlink(missing_ok=True)
        for suffix in CHECKSUMS:
            old.with_name(old.name + suffix).unlink(missing_ok=True)
    return path


def _write_hashed(path: Path, state: Dict[str, Any]) -> str:
    """torch.save `state` to `path` (fsync'd) and return the BLAKE3 of the bytes written.
    Each large block is hashed in a second thread while this one writes it, and both
    finish before torch.save goes on: a block may be a temporary buffer (a GPU tensor's
    copy), so it is never read after its write returns."""
    import torch
    from torch import serialization

    crc32 = serialization.get_crc32_options()
    # torch.save's own CRC-32 of each record is a third pass over the bytes; the checksum
    # beside the file covers every byte, and torch.load does not need the CRC.
    serialization.set_crc32_options(False)
    try:
        with open(path, "wb") as handle, ThreadPoolExecutor(1) as hasher:
            writer = _HashingWriter(handle, hasher)
            torch.save(state, writer)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        serialization.set_crc32_options(crc32)
    return writer.hash.hexdigest()


class _HashingWriter:
    """The file-like object torch.save writes through: hashes what it writes."""

    def __init__(self, handle, hasher: ThreadPoolExecutor):
        import blake3

        self.handle, self.hasher, self.hash = handle, hasher, blake3.blake3()

    def write(self, data) -> int:
        block = memoryview(data).cast("B")
        if block.nbytes < CONCURRENT_BLOCK:
            self.hash.update(block)
            return self.handle.write(block)
        hashed = self.hasher.submit(self.hash.update, block)  # both release the GIL
        written = self.handle.write(block)
        hashed.result()
        return written

    def flush(self) -> None:
        self.handle.flush()


class BackgroundSaver:
    """trainer.checkpoint_async: checkpoints written by a thread of their own while training
    goes on. `save` stops the loop only to copy the state off the device (on a CPU, out of
    the tensors the next step changes) and hands the copy to `save` above, so a checkpoint
    is durable exactly as a synchronous one is: temp file, fsync, rename, the newest `keep`
    kept. One write at a time: a save first waits for the one before, and `wait` (before
    the lock is written, before a preempted run exits) for the last. A write that failed
    raises there."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.run_dir, self.keep = run_dir, keep
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending = None

    def save(self, state: Dict[str, Any]) -> Path:
        self.wait()
        self.pending = self.writer.submit(save, self.run_dir, host_copy(state), self.keep)
        return path_for(self.run_dir, state["step"])

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


class Saver:
    """The synchronous save, behind BackgroundSaver's interface."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.run_dir, self.keep = run_dir, keep

    def save(self, state: Dict[str, Any]) -> Path:
        return save(self.run_dir, state, self.keep)

    def wait(self) -> None:
        pass


def saver(run_dir: Path, asynchronous: Optional[bool]):
    return BackgroundSaver(run_dir) if asynchronous else Saver(run_dir)


def host_copy(value: Any) -> Any:
    """`value` with every tensor copied to host memory, and every container rebuilt: what
    the training changes after this returns cannot reach the copy."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [host_copy(item) for item in value]
    if isinstance(value, tuple):  # a namedtuple takes its fields one by one
        items = [host_copy(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def remove_partial_writes(run_dir: Path) -> List[str]:
    """Delete the temp files of checkpoint writes that were killed before their rename,
    and checksums whose checkpoint is gone. Only while holding the run directory
    (rundir.WriterLock): no write is in progress."""
    folder = directory(run_dir)
    removed = [*folder.glob(".step-*.pt.*.tmp"),  # checkpoints' and checksums'
               *(sums for suffix in CHECKSUMS for sums in folder.glob("step-*.pt" + suffix)
                 if not sums.with_suffix("").exists())]
    for path in removed:
        path.unlink(missing_ok=True)
    return sorted(path.name for path in removed)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Damaged(Exception):
    """A checkpoint file that cannot be read back intact."""


def load(path: Path) -> Dict[str, Any]:
    """Read one checkpoint and check it is complete and intact; raises Damaged. The file
    is hashed in a second thread while torch.load reads it. The state gains `checksum`:
    {algorithm: hex} it was checked against (a format-2 checkpoint's {"sha256":
    state_sha256})."""
    import torch

    sums, algorithm = checksum_beside(path)
    with ThreadPoolExecutor(1) as hasher:
        hashed = hasher.submit(FILE_HASHES[algorithm], path) if sums else None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated zip, garbage, unpickling: damaged
            said = (str(exc).splitlines() or [""])[0]
            said = said if len(said) <= 300 else said[:300].rsplit(" ", 1)[0] + " ..."
            raise Damaged(f"cannot be read ({type(exc).__name__}: {said})") from None
        found = hashed.result() if hashed else None
    if not isinstance(state, dict) or not str(state.get("format")).startswith(PREFIX):
        raise Damaged("is not a harness checkpoint")
    if state["format"] not in (FORMAT, SEALED_INSIDE):
        raise CheckpointRefused(
            f"checkpoint {path} has format {state['format']} (this harness writes {FORMAT}): "
            f"it lacks state an exact resume needs, so resuming from it could not reproduce the "
            f"uninterrupted run. Resume with the harness version that wrote it, or start a new "
            f"run.")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise Damaged(f"lacks {', '.join(missing)}")
    state["checksum"] = _checked(state, path, sums, algorithm, found)
    return state


# How each checksum algorithm hashes a file (one core: torch.load reads on the other).
FILE_HASHES = {"blake3": file_blake3, "sha256": file_sha256}


def _checked(state: Dict[str, Any], path: Path, sums: Optional[Path], algorithm: str,
             found: Optional[str]) -> Dict[str, str]:
    """{algorithm: hex} that `state` (read from `path`) is intact under; raises Damaged."""
    if state["format"] == SEALED_INSIDE:
        if "state_sha256" not in state or state_sha256(state) != state["state_sha256"]:
            raise Damaged("fails its integrity check (state_sha256): it was damaged after "
                          "writing")
        return {"sha256": state["state_sha256"]}
    if sums is None or found is None:
        raise Damaged(f"has no checksum beside it ({checksum_path(path).name}): its write was "
                      f"cut short, or the checksum was removed")
    recorded = sums.read_text(errors="replace").split(" ", 1)[0].strip()
    if recorded != found:
        raise Damaged(f"does not match its checksum ({sums.name}): it was damaged after "
                      f"writing")
    return {algorithm: found}


def state_sha256(state: Dict[str, Any]) -> str:
    """A format-2 checkpoint's integrity hash: over every entry but itself."""
    from harness import digest

    return digest.state_sha256({k: v for k, v in state.items() if k != "state_sha256"})


def validate(state: Dict[str, Any], path: Path, config_sha256: str,
             facts: Dict[str, Any]) -> None:
    """Refuse a checkpoint written for another config or in another environment."""
    if state["config_sha256"] != config_sha256:
        raise CheckpointRefused(
            f"checkpoint {path} was written by a run with config_sha256 "
            f"{state['config_sha256'][:16]}..., but this run's config has "
            f"{config_sha256[:16]}...: it belongs to another config. Resume with the run's "
            f"own config (`harness train --resume RUN` with no overrides), or start a new run.")
    if state["environment_sha256"] != facts_sha256(facts):
        diffs = [f"{key}: checkpoint {state['environment'].get(key)!r}, here {facts.get(key)!r}"
                 for key in differing_keys(state["environment"], facts)]
        raise CheckpointRefused(
            f"checkpoint {path} was written in another environment, so resuming here could "
            f"not reproduce the uninterrupted run bit for bit. Differences: "
            f"{'; '.join(diffs)}. Resume where the run started (same image, software and "
            f"hardware), or start a new run here.")


def newest_valid(run_dir: Path, config_sha256: str, facts: Dict[str, Any]
                 ) -> Tuple[Optional[Dict[str, Any]], Optional[Path], List[str]]:
    """The newest intact checkpoint of `run_dir` (validated against the run's config and
    this environment), its path, and notes on damaged ones skipped on the way. Returns
    (None, None, notes) when there is no intact checkpoint."""
    notes = [f"removed {name}, left by a checkpoint write that was interrupted"
             for name in remove_partial_writes(run_dir)]
    for path in listed(run_dir):
        try:
            state = load(path)
        except Damaged as exc:
            notes.append(f"skipping damaged checkpoint {path.name}: it {exc}")
            continue
        validate(state, path, config_sha256, facts)
        return state, path, notes
    return None, None, notes
