"""trainer.device: `auto` decided once at launch and recorded; what the training process
sees checked against NVML (pure logic here; the GPU suite runs it on a GPU)."""

import json

from conftest import TESTS, run_dir_of
from harness import gpu
from harness.config import load_yaml

CONF = str(TESTS / "conf")


def test_auto_device_is_decided_at_launch_and_recorded(cli, tmp_path):
    done = cli("train", "hashy", "trainer.device=auto", "trainer.max_steps=2", "--config-dir",
               CONF, "--runs-dir", str(tmp_path / "runs"), "backend=local", check_rc=0)
    expected = "cuda" if gpu.nvml_gpus()["gpus"] and gpu.torch_cuda_version() else "cpu"
    assert f"trainer.device=auto chose {expected}" in done.stderr
    run_dir = run_dir_of(done)
    assert load_yaml(run_dir / "config.yaml")["trainer"]["device"] == expected
    lock = json.loads((run_dir / "harness.lock").read_text())
    assert lock["config"]["trainer"]["device"] == expected


def test_bad_device_is_refused(cli, tmp_path):
    done = cli("train", "hashy", "trainer.device=gpu0", "--config-dir", CONF, "--runs-dir",
               str(tmp_path / "runs"))
    assert done.returncode == 2 and "trainer.device=gpu0" in done.stderr
    assert "cpu, cuda, cuda:N or auto" in done.stderr


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


def test_auto_device_of_a_slurm_job_follows_the_gpus_it_asks_for():
    """Decided for the job's node, not the submitting host: cuda exactly when
    backend.slurm.gpus asks the node for GPUs."""
    from harness import config

    assert config.compose("fashion_mnist", ["backend=slurm"])["trainer"]["device"] == "cpu"
    asked = config.compose("fashion_mnist", ["backend=slurm", "backend.slurm.gpus=1"])
    assert asked["trainer"]["device"] == "cuda"


def test_gpu_request_uses_cdi_where_the_engine_has_an_nvidia_spec(tmp_path):
    from harness.backends.docker import gpu_request

    classic = gpu_request("all", {})
    assert classic["Capabilities"] == [["gpu"]] and classic["Count"] == -1
    (tmp_path / "other.yaml").write_text("kind: vendor.com/fpga\n")
    assert gpu_request("2", {"CDISpecDirs": [str(tmp_path)]})["Count"] == 2
    (tmp_path / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    cdi = gpu_request("all", {"CDISpecDirs": [str(tmp_path), "/nonexistent"]})
    assert cdi["Driver"] == "cdi" and cdi["DeviceIDs"] == ["nvidia.com/gpu=all"]
    assert gpu_request("2", {"CDISpecDirs": [str(tmp_path)]})["DeviceIDs"] == \
        ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
