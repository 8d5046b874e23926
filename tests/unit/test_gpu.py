"""The GPU facts (harness/host/gpu.py) without a GPU: torch's build, disagreements with NVML."""

from harness.host import gpu


def test_torch_build_is_read_without_importing_torch():
    import torch

    assert gpu.torch_cuda_version() == torch.version.cuda


def test_gpu_disagreements_are_named():
    nvml = [{"uuid": "GPU-a", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
             "sm_count": None}]
    same = [{"uuid": "GPU-a", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
             "sm_count": 132}]
    assert gpu.disagreements(nvml, same) == []
    other = [{**same[0], "compute_capability": "8.0"},
             {"uuid": "GPU-b", "name": "X", "compute_capability": "8.0", "sm_count": 1}]
    problems = gpu.disagreements(nvml, other)
    assert problems == ["GPU-a compute_capability: NVML '9.0', torch '8.0'",
                        "torch sees GPU-b (X), NVML does not"]
