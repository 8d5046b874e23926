"""What this host can offer a `trainer.device=cuda` run, decided before anything is built
or launched, and the check that what the training process sees is what the host has.

Torch is not imported here (the launcher stays light); NVML (nvidia-ml-py) answers for the
driver and the GPUs (`capture`: what the lockfile records of them).
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

from harness.errors import EnvironmentProblem, HarnessError

CPU_HINT = "or train on the CPU: trainer.device=cpu"


@functools.lru_cache(maxsize=1)
def nvml_gpus() -> Dict[str, Any]:
    """The host's driver and GPUs through NVML ({"gpus": [], "nvml_error": why} without).
    Asked once per process: the answer does not change during a launch."""
    return capture(sm_from_torch=False)


def capture(sm_from_torch: bool = True) -> Dict[str, Any]:
    """GPUs and driver through NVML (nvidia-ml-py). No NVML: an explicit empty list and the
    reason, so that "no GPU" is recorded as a fact rather than as a missing field. The SM
    count comes from torch (NVML does not report it); the launcher, which does not load
    torch, passes sm_from_torch=False."""
    try:
        import pynvml
    except ImportError:
        return {"gpus": [], "driver": None, "nvml": None,
                "nvml_error": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"gpus": [], "driver": None, "nvml": None, "nvml_error": str(exc)}
    try:
        gpus = [_gpu_record(pynvml, pynvml.nvmlDeviceGetHandleByIndex(i), i, sm_from_torch)
                for i in range(pynvml.nvmlDeviceGetCount())]
        return {"gpus": gpus, "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "nvml": _text(pynvml.nvmlSystemGetNVMLVersion()), "nvml_error": None}
    finally:
        pynvml.nvmlShutdown()


def _gpu_record(pynvml, handle, index: int, sm_from_torch: bool) -> Dict[str, Any]:
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    try:
        mig_current, _ = pynvml.nvmlDeviceGetMigMode(handle)
        mig = bool(mig_current)
    except pynvml.NVMLError:
        mig = None  # not supported on this GPU
    try:
        sm_count = pynvml.nvmlDeviceGetNumGpuCores(handle)  # CUDA cores, not SMs
    except (pynvml.NVMLError, AttributeError):
        sm_count = None
    uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
    return {
        "index": index,
        "name": _text(pynvml.nvmlDeviceGetName(handle)),
        "uuid": uuid,
        "compute_capability": f"{major}.{minor}",
        "memory_total": pynvml.nvmlDeviceGetMemoryInfo(handle).total,
        "mig_mode": mig,
        "cuda_cores": sm_count,
        "sm_count": _torch_sm_count(uuid) if sm_from_torch else None,
    }


def _torch_sm_count(uuid: str) -> Optional[int]:
    """Streaming multiprocessors, which NVML does not report; torch does. Matched by UUID:
    torch numbers the devices CUDA_VISIBLE_DEVICES shows, NVML all of them."""
    try:
        return next((d["sm_count"] for d in torch_devices() if d["uuid"] == uuid), None)
    except (ImportError, RuntimeError, AssertionError):
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def choose_device(cfg: Optional[Dict[str, Any]] = None) -> Tuple[str, str]:
    """`trainer.device=auto`: (device, why). cuda only where the run can use a GPU: a Slurm
    job that asks its nodes for GPUs (backend.slurm.gpus > 0); elsewhere a GPU that NVML
    sees, and a way to reach it from the backend: a CUDA build of torch here (local), or an
    engine that passes GPUs into containers (docker). Else cpu, saying why."""
    backend = ((cfg or {}).get("backend") or {}).get("name", "auto")
    if backend == "slurm":
        wanted = int(cfg["backend"]["slurm"].get("gpus") or 0)
        return ("cuda", f"backend.slurm.gpus={wanted}") if wanted else \
            ("cpu", "backend.slurm.gpus=0: the job asks its node for no GPU")
    found = nvml_gpus()
    if not found["gpus"]:
        return "cpu", f"no NVIDIA GPU: {found['nvml_error'] or 'NVML lists none'}"
    seen = f"NVML sees {len(found['gpus'])} GPU(s)"
    if backend in ("local", "auto") and torch_cuda_version():
        return "cuda", f"{seen} and torch here is a CUDA build"
    if backend in ("docker", "auto") and docker_passes_gpus():
        return "cuda", f"{seen} and the Docker engine passes GPUs to containers"
    return "cpu", (f"{seen}, but this backend cannot reach them: install a CUDA build of "
                   f"torch (local) or the NVIDIA Container Toolkit (docker) to train on them")


def image_profile() -> str:
    """The image profile for this machine: `cuda` where a run can use an NVIDIA GPU
    (trainer.device=auto would choose it), else `cpu`."""
    return choose_device()[0]


@functools.lru_cache(maxsize=1)
def docker_passes_gpus() -> bool:
    """An engine with the NVIDIA runtime registered, or the toolkit's hook installed (which
    docker's GPU requests use). Asked once per process: the image default and
    trainer.device=auto both ask during one compose."""
    if shutil.which("nvidia-container-runtime-hook"):
        return True
    from docker.errors import DockerException

    from harness.host import docker_engine

    try:
        # 30 s: an absent engine refuses at once; a busy one answers slowly, not never.
        return "nvidia" in (docker_engine.client(timeout=30).info().get("Runtimes") or {})
    except (HarnessError, DockerException, OSError):  # requests' errors are OSErrors
        return False


def require_gpus(backend: str, torch_cuda: Optional[str] = "host") -> None:
    """Stop (exit 4) unless this host can run a CUDA training on `backend`: a driver that
    NVML reaches, at least one GPU, and for a local run a CUDA build of torch in this
    environment. A Slurm job's GPUs are on its node: nothing to check here."""
    if backend == "slurm":
        return
    found = nvml_gpus()
    if found["nvml_error"]:
        raise EnvironmentProblem(
            f"trainer.device=cuda, but no NVIDIA driver answers on this host (NVML: "
            f"{found['nvml_error']}). Install the NVIDIA driver (nvidia-smi must work), "
            f"{CPU_HINT}.")
    if not found["gpus"]:
        raise EnvironmentProblem(f"trainer.device=cuda, but NVML lists no GPU on this host; "
                                 f"{CPU_HINT}.")
    if backend == "local":
        cuda = torch_cuda_version() if torch_cuda == "host" else torch_cuda
        if not cuda:
            raise EnvironmentProblem(
                f"trainer.device=cuda with backend=local, but the torch installed here is a "
                f"CPU build. Train in the CUDA image (backend=docker image=cuda), install a "
                f"CUDA build of torch in this environment, {CPU_HINT}.")


def torch_cuda_version() -> Optional[str]:
    """The CUDA version the installed torch was built with, read from torch/version.py
    without importing torch (None: a CPU build, or no torch)."""
    try:
        text = importlib.metadata.distribution("torch").locate_file("torch/version.py")
        source = open(text).read()
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", source, re.MULTILINE)
    return match.group(1) if match else None


def disagreements(nvml: List[Dict[str, Any]], seen: List[Dict[str, Any]]) -> List[str]:
    """Where the GPUs torch sees in the training process (`seen`: name, uuid,
    compute_capability, sm_count) differ from the host's NVML records of the same UUIDs."""
    by_uuid = {gpu["uuid"]: gpu for gpu in nvml}
    problems = []
    for gpu in seen:
        host = by_uuid.get(gpu["uuid"])
        if host is None:
            problems.append(f"torch sees {gpu['uuid']} ({gpu['name']}), NVML does not")
            continue
        for key in ("name", "compute_capability", "sm_count"):
            if host.get(key) is not None and host[key] != gpu[key]:
                problems.append(f"{gpu['uuid']} {key}: NVML {host[key]!r}, torch {gpu[key]!r}")
    return problems


def torch_devices() -> List[Dict[str, Any]]:
    """The GPUs torch sees, as NVML names them (imports torch: the training process)."""
    import torch

    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = str(getattr(props, "uuid", ""))
        devices.append({"index": index, "name": props.name,
                        "uuid": uuid if uuid.startswith("GPU-") else f"GPU-{uuid}",
                        "compute_capability": f"{props.major}.{props.minor}",
                        "sm_count": props.multi_processor_count})
    return devices
