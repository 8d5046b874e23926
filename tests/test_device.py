"""trainer.device through the CLI: `auto` decided once at launch and recorded, a bad device
refused. The pure logic (what the training process sees checked against NVML, a Slurm
job's device, the GPU request) is in tests/unit/; the GPU suite runs it on a GPU."""

import json

from conftest import TESTS, run_dir_of

from harness.config import load_yaml
from harness.host import gpu

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
