"""The GPU suite: on a machine with an NVIDIA GPU and a CUDA build of torch, what the
harness promises on CUDA. Skipped, with the reason, anywhere else. On a GPU machine, in an
environment whose torch is a CUDA build: `python -m pytest -m gpu tests/test_gpu.py`
(docs/replay.md, "On a GPU")."""

import pytest
from conftest import TESTS, read_lock, run_dir_of

pytestmark = pytest.mark.gpu
CONF = str(TESTS / "conf")


@pytest.fixture(scope="module", autouse=True)
def a_gpu():
    from harness.host import gpu

    found = gpu.nvml_gpus()
    if not found["gpus"]:
        pytest.skip(f"no NVIDIA GPU here ({found['nvml_error'] or 'NVML lists none'})")
    if not gpu.torch_cuda_version():
        pytest.skip("the torch installed here is a CPU build")


def train(cli, tmp_path, *overrides, check_rc=0):
    return cli("train", "hashy", "trainer.device=cuda", *overrides, "--config-dir", CONF,
               "--runs-dir", str(tmp_path / "runs"), check_rc=check_rc)


def test_two_strict_runs_on_cuda_are_identical_and_replay(cli, tmp_path):
    first = run_dir_of(train(cli, tmp_path))
    second = run_dir_of(train(cli, tmp_path))
    a, b = read_lock(first), read_lock(second)
    assert a["results"]["weights_sha256"] == b["results"]["weights_sha256"]
    assert a["software"]["cuda_available"] is True
    done = cli("replay", str(first), "--runs-dir", str(tmp_path / "runs"), check_rc=0)
    assert "IDENTICAL" in done.stdout


def test_lockfile_records_the_gpus_from_nvml(cli, tmp_path):
    lock = read_lock(run_dir_of(train(cli, tmp_path, "trainer.max_steps=2")))
    hardware = lock["hardware"]
    assert hardware["driver"] and hardware["nvml"] and hardware["nvml_error"] is None
    for record in hardware["gpus"]:
        assert record["name"] and record["uuid"].startswith(("GPU-", "MIG-"))
        assert record["compute_capability"] and record["memory_total"] > 0
        assert record["mig_mode"] in (True, False, None)
    assert any(record["sm_count"] for record in hardware["gpus"])


def test_atomic_accumulation_differs_with_determinism_off_and_verify_names_it(cli, tmp_path):
    done = cli("verify", "scatter", "determinism=off", "--steps", "8", "--config-dir", CONF,
               "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 7, done.stdout + done.stderr
    assert "first differing module: scatter" in done.stdout


def test_atomic_accumulation_in_strict_mode_is_identical(cli, tmp_path):
    """Strict mode: torch runs index_add and its backward with deterministic algorithms on
    CUDA, so the same model reproduces bit for bit."""
    done = cli("verify", "scatter", "--steps", "8", "--config-dir", CONF,
               "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DETERMINISTIC: scatter" in done.stdout


def test_users_script_on_cuda_repeats_and_replays(cli, tmp_path):
    """`harness run` of an unmodified script that trains on the GPU (dropout and Adam on
    CUDA, a DataLoader with two workers): two runs and a replay, identical."""
    from conftest import make_project
    from test_script import RUN

    project = make_project(tmp_path / "project")
    runs = ["--runs-dir", str(tmp_path / "runs")]
    first, second = (run_dir_of(cli("run", "trainer.device=cuda", "backend=local", *runs,
                                    *RUN, "--device", "cuda", cwd=project, check_rc=0))
                     for _ in range(2))
    assert read_lock(first)["results"]["outputs"] == read_lock(second)["results"]["outputs"]
    assert read_lock(first)["software"]["cuda_available"] is True
    assert read_lock(first)["hardware"]["gpus"]
    done = cli("replay", first.name, *runs, cwd=project, check_rc=0)
    assert "IDENTICAL" in done.stdout
    flagged = cli("run", "trainer.device=cuda", "backend=local", *runs, *RUN, "--device",
                  "cuda", "--fast-flags", cwd=project, check_rc=0)
    warnings = read_lock(run_dir_of(flagged))["script"]["warnings"]
    assert any("TF32 for CUDA matmuls" in w for w in warnings), warnings
