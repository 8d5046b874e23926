"""The lockfile (`harness.lock`): what a run was, completely enough to rebuild its
environment and to refuse a replay that cannot be exact. Field reference: docs/lockfile.md.

Written as JSON with sorted keys; `lock_sha256` is the sha256 of the canonical JSON
(sorted keys, no whitespace) of everything else, so any edit is detected.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness import __version__
from harness.digest import canonical_sha256, source_sha256
from harness.env import HOST_NAME, PERTURB, SLURM_JOB
from harness.errors import LockfileError
from harness.host import gpu
from harness.rundir import atomic_write_text, now_utc
from harness.script import imports

SCHEMA = "harness.lock/1"

# Environment variables recorded in the lockfile. Only these: anything else (tokens, keys,
# passwords) must never reach a run directory.
ENV_ALLOWLIST = (
    "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING",
    "NCCL_ALGO", "NCCL_PROTO", "TORCH_CUDNN_V8_API_DISABLED", "LD_PRELOAD",
    *SLURM_JOB,
    PERTURB,  # a negative control (harness/training/perturb.py): a bit flipped on purpose
)

# ---------------------------------------------------------------- capture

def capture_environment() -> Dict[str, str]:
    return {name: os.environ[name] for name in ENV_ALLOWLIST if name in os.environ}


def capture_software() -> Dict[str, Any]:
    """Versions as seen from inside the training process."""
    import importlib.metadata as metadata

    import torch

    cuda_available = torch.cuda.is_available()
    packages = {}
    for dist in metadata.distributions():
        name, version = imports.name_and_version(dist)
        if name:
            packages[name] = version
    return {
        **math_software(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cuda_available": cuda_available,
        "nccl": _nccl_version(torch),
        "math_libraries": math_libraries(torch),
        "packages": dict(sorted(packages.items())),
    }


def math_libraries(torch) -> Dict[str, Optional[str]]:
    """The BLAS and oneDNN builds inside torch, as torch.__config__.show() names them: part
    of the machine class question (MKL picks its code path per CPU vendor, oneDNN its
    blocking per cache), recorded so that a lock says which builds a recording used."""
    import re

    try:
        shown = torch.__config__.show()
    except (AttributeError, RuntimeError):
        shown = ""
    mkl = re.search(r"Math Kernel Library Version (\S+)", shown)
    blas = re.search(r"BLAS_INFO=(\w+)", shown)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", shown)
    return {"blas": f"MKL {mkl.group(1)}" if mkl else (blas.group(1) if blas else None),
            "onednn": onednn.group(1) if onednn else None}


def math_software() -> Dict[str, Any]:
    """The software facts that decide floating-point results: the lockfile's `software`
    has them, and a checkpoint carries them (a resume under others would not be exact)."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a plain str: torch.load(weights_only) refuses others
        "torch_git_version": getattr(torch.version, "git_version", None),
        "torch_cpu_capability": cpu_capability(torch),
        "cuda_runtime": torch.version.cuda,
        # The library versions of a CUDA build, read even where no GPU is present (a CUDA
        # image trained on the CPU still records what it holds).
        "cudnn": _cudnn_version(torch),
    }


def _cudnn_version(torch) -> Optional[int]:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError:
        return None


def _nccl_version(torch) -> Optional[str]:
    if not torch.version.cuda:
        return None
    try:
        version = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError, ImportError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def cpu_capability(torch) -> Optional[str]:
    """The CPU kernel family torch selected here (AVX2, AVX512, ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return None


def capture_cpu() -> Dict[str, Any]:
    """hardware.cpu: the CPU's name, vendor, family, model number and math ISA flags (the
    class facts, harness/cpu.py), and its logical cores."""
    from harness.host import machine_class

    return {**machine_class.read_cpuinfo(), "logical_cores": os.cpu_count()}


def capture_hardware() -> Dict[str, Any]:
    """CPU, GPUs and the host's name. Inside a container, `platform.node()` is the
    container's id: the launcher passes the host's name in HARNESS_HOST_NAME, and the
    container's own name is kept apart in `container_hostname`."""
    gpus = gpu.capture()
    host = os.environ.get(HOST_NAME)
    names = {"hostname": host, "container_hostname": platform.node()} if host else \
        {"hostname": platform.node()}
    return {"cpu": capture_cpu(), **names, **gpus}


def capture_source(directory: Path) -> Dict[str, Any]:
    """Git state of the project the run was launched from."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"root": str(directory), "git_commit": None, "dirty": None, "diff_sha256": None,
                "note": f"{directory} is not a git checkout"}
    diff = git("diff", "HEAD", "--binary") or ""
    untracked = git("ls-files", "--others", "--exclude-standard") or ""
    dirty = bool(diff.strip() or untracked.strip())
    return {
        "root": str(directory),
        "git_commit": commit.strip(),
        "dirty": dirty,
        "diff_sha256": hashlib.sha256((diff + untracked).encode()).hexdigest() if dirty else None,
        "note": None,
    }


def harness_source_sha256() -> str:
    """sha256 over the harness package's own source files, in path order."""
    return source_sha256(Path(__file__).resolve().parent.parent)


# ---------------------------------------------------------------- write / read

def seal(lock: Dict[str, Any]) -> Dict[str, Any]:
    """Return `lock` with `lock_sha256` computed over the canonical rest."""
    body = {k: v for k, v in lock.items() if k != "lock_sha256"}
    return {**body, "lock_sha256": canonical_sha256(body)}


def write(path: Path, lock: Dict[str, Any]) -> Dict[str, Any]:
    sealed = seal(lock)
    atomic_write_text(path, json.dumps(sealed, sort_keys=True, indent=2) + "\n")
    return sealed


def read(path: Path) -> Dict[str, Any]:
    """Read a lockfile and check its integrity; refuse a damaged or edited one."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise LockfileError(f"cannot read lockfile {path}: {exc.strerror}") from None
    try:
        lock = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LockfileError(f"lockfile {path} is not valid JSON ({exc.msg} at line "
                            f"{exc.lineno}): it is truncated or damaged. Re-run the training "
                            f"to get a new one; a damaged lockfile cannot be trusted.") from None
    if not isinstance(lock, dict) or "lock_sha256" not in lock:
        raise LockfileError(f"lockfile {path} has no lock_sha256: not a harness lockfile.")
    if seal(lock)["lock_sha256"] != lock["lock_sha256"]:
        raise LockfileError(f"lockfile {path} fails its integrity check (lock_sha256 does not "
                            f"match its content): it was edited or damaged after the run. "
                            f"Restore the original from backup or re-run the training.")
    return lock


def flatten(data: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists of records are keyed by index."""
    if isinstance(data, dict):
        out: Dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


# ---------------------------------------------------------------- the schema

# Every top-level field of a lockfile: who hands it in, and whether every lockfile has it.
# The launcher gathers the host's facts before the training starts (launch.json's `lock`:
# `host_facts`, plus what a backend, replay or verify adds); the training process adds what
# it saw and writes the lockfile (`complete`). docs/lockfile.md documents each field; a test
# holds the two together.
HOST, PROCESS, SEAL = "host", "training process", "seal"
FIELDS: Dict[str, Tuple[str, bool]] = {
    "schema": (HOST, True),
    "run_id": (HOST, True),
    "created_utc": (HOST, True),
    "harness": (HOST, True),
    "config": (HOST, True),
    "config_sha256": (HOST, True),
    "seed": (HOST, True),
    "overrides": (HOST, True),
    "backend": (HOST, True),
    "source": (HOST, True),
    "data": (HOST, True),
    "image": (HOST, False),  # a run in a container image (docker, Slurm container runtimes)
    "container_runtime": (HOST, False),  # the Docker engine of a docker run
    "script": (HOST, False),  # a `harness run` command (the process adds what it saw)
    "replay_of": (HOST, False),  # a replay: the run it replays
    "replay_mismatches": (HOST, False),  # a replay: the gate's differences
    "negative_control_of": (HOST, False),  # replay --negative-control: {run_id, perturbation}
    "op_trace_reload_of": (HOST, False),  # replay --all-divergences' probe: {run_id}
    "verify": (HOST, False),  # a `harness verify` run: which of the two
    "determinism": (PROCESS, True),
    "software": (PROCESS, True),
    "hardware": (PROCESS, True),
    "environment": (PROCESS, True),
    "results": (PROCESS, True),
    "resumes": (PROCESS, True),
    "timing": (PROCESS, True),
    "distributed": (PROCESS, False),  # a data-parallel run: its world and ranks
    "interpreters": (PROCESS, False),  # a command run: each Python that ran, its packages
    "lock_sha256": (SEAL, True),
}


def required_fields() -> List[str]:
    """Top-level fields every lockfile has (docs/lockfile.md documents each)."""
    return [name for name, (_, required) in FIELDS.items() if required]


def host_facts(run_id: str, cfg: Dict[str, Any], overrides: List[str], backend_name: str,
               data_root: Optional[Path], data_files: Dict[str, Any],
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The launcher's part of the lockfile, gathered on the host before the training starts
    (`extra`: what a backend, a replay or verify hands in)."""
    return _checked({
        "schema": SCHEMA,
        "run_id": run_id,
        "created_utc": now_utc(),
        "harness": {"version": __version__, "source_sha256": harness_source_sha256()},
        "config": cfg,
        "config_sha256": canonical_sha256(cfg),
        "seed": cfg["seed"],
        "overrides": list(overrides),
        "backend": {"name": backend_name},
        "source": capture_source(Path.cwd()),
        "data": {"name": (cfg.get("data") or {}).get("name"),
                 "root": str(data_root) if data_root else None, "files": data_files},
        **(extra or {}),
    }, HOST)


def complete(host: Dict[str, Any], process: Dict[str, Any]) -> Dict[str, Any]:
    """The whole lockfile: the host's facts and the training process's (which may extend a
    host section, as a command run's `script`), checked against FIELDS."""
    _checked(process, PROCESS, also=("script",))
    lock = {**host, **process}
    missing = [name for name in required_fields() if name not in lock and name != "lock_sha256"]
    if missing:
        raise ValueError(f"lockfile lacks required field(s) {', '.join(missing)}")
    return lock


def _checked(facts: Dict[str, Any], side: str, also: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Refuse a field the schema does not know, or that the other side writes: a new field
    is added to FIELDS (and docs/lockfile.md) first."""
    wrong = [name for name in facts
             if name not in also and FIELDS.get(name, ("unknown",))[0] != side]
    if wrong:
        raise ValueError(f"lockfile field(s) {', '.join(wrong)} are not {side} fields of "
                         f"lockfile.FIELDS")
    return facts
