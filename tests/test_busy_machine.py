"""The README's first command on a busy machine: `make train` (backend=auto, so the Docker
engine, and an image built for this test alone) while a load generator keeps every core
busy. A ping's short timeout once leaked into the image's export and load and failed this
exact path on a loaded machine (exit 4, "Read timed out")."""

import os
import subprocess
import sys
import time
import uuid

import pytest
import requests
from conftest import ROOT, read_lock, run_dir_of
from test_docker import engine  # noqa: F401 - fixture

# One busy process per core, and one more: the run competes for every core all along.
SPIN = "while True: pass"


def saturate():
    """Start the load generator; its processes."""
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(os.cpu_count() + 1)]


def remove_image(engine, image: dict) -> None:  # noqa: F811
    """Take this test's image out of the engine and the registry."""
    engine.images.remove(image["id"], force=True)
    if image.get("repo_digest"):
        registry, repository_digest = image["repo_digest"].split("/", 1)
        repository, digest = repository_digest.split("@")
        requests.delete(f"http://{registry}/v2/{repository}/manifests/{digest}", timeout=30)


@pytest.mark.docker
@pytest.mark.long
def test_make_train_succeeds_while_every_core_is_busy(engine, tmp_path, cache_home):  # noqa: F811
    # An env entry only this test sets: the image is new, so it is built, exported and
    # loaded under load (the steps that once inherited the ping's timeout).
    marker = f"+image.env.HARNESS_TEST_BUSY={uuid.uuid4().hex[:12]}"
    args = f"{marker} trainer.max_steps=12 trainer.eval_limit=200 --runs-dir {tmp_path / 'runs'}"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    env.pop("HARNESS_DATA", None)
    load = saturate()
    try:
        time.sleep(20)  # let the 1-minute load average see the generator
        done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "train",
                               "CONF=fashion_mnist", f"ARGS={args}"], env=env,
                              capture_output=True, text=True, timeout=2400)
        load_average = os.getloadavg()[0]
    finally:
        for process in load:
            process.kill()
            process.wait()
    assert done.returncode == 0, f"make train exited {done.returncode}:\n{done.stderr[-3000:]}"
    run_dir = run_dir_of(done)
    image = read_lock(run_dir)["image"]
    try:
        assert "backend=auto chose docker" in done.stderr
        assert read_lock(run_dir)["backend"]["name"] == "docker"
        assert read_lock(run_dir)["results"]["weights_sha256"]
        # The machine was busy: more runnable processes than cores, on average, at the end.
        assert load_average > os.cpu_count(), f"load average {load_average:.1f}"
    finally:
        remove_image(engine, image)
