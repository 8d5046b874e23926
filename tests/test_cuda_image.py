"""The CUDA training image on the real engine and registry: built from the digest-pinned
Debian base with hash-locked CUDA wheels, offline, pushed; a short run on the CPU inside it
records the CUDA, cuDNN and NCCL versions it holds, and replays IDENTICAL. Builds a ~6 GB
image (minutes): runs in CI, and elsewhere with HARNESS_TEST_CUDA_IMAGE=1."""

import json
import os
import time

import pytest
from conftest import read_lock, run_dir_of, run_harness
from test_docker import docker_train, engine  # noqa: F401  (the engine fixture)

pytestmark = [pytest.mark.long, pytest.mark.docker, pytest.mark.cuda_image]


@pytest.fixture(scope="module")
def cuda_built(engine, tmp_path_factory):  # noqa: F811
    started = time.monotonic()
    done = run_harness(["build", "--profile", "cuda", "--push"],
                       cwd=tmp_path_factory.mktemp("cudabuild"), env=dict(os.environ),
                       check_rc=0, timeout=3000)
    return {**json.loads(done.stdout), "build_s": time.monotonic() - started}


def test_cuda_image_holds_no_wheelhouse_and_is_pushed(engine, cuda_built):  # noqa: F811
    inspected = engine.api.inspect_image(cuda_built["id"])
    assert cuda_built["repo_digest"].startswith("127.0.0.1:5000/harness/train-cuda@sha256:")
    assert cuda_built["repo_digest"] in inspected["RepoDigests"]
    history = json.dumps(engine.api.history(cuda_built["id"]))
    assert "wheelhouse" not in history
    probe = engine.containers.run(cuda_built["id"], ["sh", "-c", "test ! -e /opt/wheelhouse"],
                                  network_mode="none", remove=True)
    assert probe == b""
    assert inspected["Size"] < 6.5e9, inspected["Size"]


def test_cpu_run_in_the_cuda_image_records_its_cuda_libraries_and_replays(
        cli, tiny_conf, engine, cuda_built):  # noqa: F811
    done = docker_train(cli, tiny_conf, "image=cuda", "trainer.device=cpu")
    run_dir = run_dir_of(done)
    lock = read_lock(run_dir)
    assert lock["image"]["id"] == cuda_built["id"] and lock["image"]["profile"] == "cuda"
    software = lock["software"]
    assert software["torch"].startswith("2.14.1")
    assert software["cuda_runtime"] and software["cuda_runtime"].startswith("13.")
    assert software["cudnn"] and software["nccl"]
    assert software["cuda_available"] is False  # no GPU here: trained on the CPU
    replay = cli("replay", str(run_dir), check_rc=0)
    assert "IDENTICAL" in replay.stdout
    assert read_lock(run_dir_of(replay))["image"]["id"] == cuda_built["id"]
