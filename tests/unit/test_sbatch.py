"""The sbatch script's rules (harness/backends/sbatch.py): gpu_type, digest pins, the job's
environment."""

from __future__ import annotations

from pathlib import Path

import pytest


def golden_spec(runtime: str, **slurm):
    from harness.backends import sbatch

    conf = {"partition": "gpu", "time": "02:00:00", "cpus_per_task": 8, "mem": "32G",
            "gpus": 0, "gpu_type": None, "constraint": None, "signal_before_s": 120,
            "requeue": True, "runtime": runtime, "python": None, "container_python": "python",
            "container_user": None, "extra_sbatch": [], "poll_s": 2.0,
            "image": "127.0.0.1:5000/harness/train@sha256:" + "ab" * 32, **slurm}
    return sbatch.JobSpec(
        job_name="harness-mnist", run_dirs=[Path("/shared/runs/RUN-A")],
        data_roots=[Path("/shared/data/mnist")],
        env={"PYTHONHASHSEED": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
             "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
        slurm=conf, device="cuda" if slurm.get("gpus") else "cpu",
        python="/shared/venv/bin/python",
        job_env={"PATH": "/shared/venv/bin:/usr/bin:/bin", "HOME": "/home/alice",
                 "PYTHONPATH": "/shared/code"})


def test_gpu_without_gpu_type_is_refused_and_tags_are_refused():
    from harness.backends import sbatch
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="gpu_type"):
        sbatch.render(golden_spec("none", gpus=1))
    with pytest.raises(ConfigError, match="pinned by digest"):
        sbatch.render(golden_spec("docker", image="harness/train:latest"))


def test_job_environment_is_the_allow_list_only():
    from harness.backends import sbatch

    submitting = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/code", "NCCL_ALGO": "Ring",
                  "AWS_SECRET_ACCESS_KEY": "planted-secret", "GITHUB_TOKEN": "planted-token",
                  "CUDA_VISIBLE_DEVICES": "3", "SLURM_JOB_ID": "17"}
    assert sbatch.job_environment(submitting) == {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": "/code", "NCCL_ALGO": "Ring"}
    spec = golden_spec("none")
    spec.job_env = sbatch.job_environment(submitting)
    text = sbatch.render(spec)
    assert "#SBATCH --export=NONE" in text and "export NCCL_ALGO=Ring" in text
    assert "planted" not in text and "CUDA_VISIBLE_DEVICES" not in text
