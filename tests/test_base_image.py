"""The base image is reproducible: docker/make-base-image.sh, run again, gives the pinned
base's image id while the Debian archive serves the same package versions; its labels list
those versions, a lock records them, and `harness image rebuild` of a run whose base is gone
names the packages in which the base here differs."""

import os
import shutil
import subprocess
import uuid

import pytest
from conftest import ROOT, read_lock, require, run_dir_of
from test_docker import built, docker_train, engine  # noqa: F401 - fixtures

PACKAGES = "org.harness.debian-packages"


def packages(image) -> dict:
    return dict(item.split("=", 1) for item in image.labels[PACKAGES].split())


def make_base(tag: str) -> None:
    done = subprocess.run(["bash", str(ROOT / "docker" / "make-base-image.sh"), tag],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.docker
@pytest.mark.cold_build
@pytest.mark.long
def test_make_base_image_again_gives_the_pinned_base_id(engine):  # noqa: F811
    from harness import config

    require(os.geteuid() == 0 and shutil.which("debootstrap") is not None,
            "needs root and debootstrap (make docker-env installs it)")
    pinned = engine.images.get(config.state_ref("base-cpu"))
    require(PACKAGES in (pinned.labels or {}),
            "the pinned base predates reproducible bases: remove it from the registry "
            "(/var/lib/harness-registry) and run `make docker-env` again")
    tag = f"harness-test/base:{uuid.uuid4().hex[:12]}"
    make_base(tag)
    try:
        again = engine.images.get(tag)
        moved = {name: (version, packages(again).get(name))
                 for name, version in packages(pinned).items()
                 if packages(again).get(name) != version}
        assert not moved, f"the Debian archive moved since the base was built: {moved}"
        assert again.id == pinned.id
        assert again.attrs["RootFS"]["Layers"] == pinned.attrs["RootFS"]["Layers"]
    finally:
        engine.images.remove(tag, force=False)  # only the tag when the ids are the same


@pytest.mark.docker
def test_lock_lists_the_base_packages_and_rebuild_names_those_that_differ(
        cli, tiny_conf, engine, built, tmp_path):  # noqa: F811
    """A run whose base is gone, made when the archive served another python3: the
    rebuild stops before building (exit 4) and names the packages in which the base
    pinned here differs from the run's."""
    from harness.record import lockfile

    run = run_dir_of(docker_train(cli, tiny_conf, "trainer.max_steps=2",
                                  "--runs-dir", str(tmp_path / "runs")))
    lock = read_lock(run)
    base_packages = lock["image"]["base_packages"]
    assert "python3" in base_packages and "libc6" in base_packages
    assert lock["image"]["base_id"] == engine.images.get(lock["image"]["base"]).id
    gone = lock["image"]["base"].split("@")[0] + "@sha256:" + "1" * 64
    lock["image"]["base"] = lock["config"]["image"]["base"] = gone
    lock["image"]["base_packages"] = {**base_packages, "python3": "3.0.0-1",
                                      "gone-package": "1.0"}
    lockfile.write(run / "harness.lock", lock)
    (run / "harness.lock.sigstore.json").unlink()  # an edited lock is no longer ours
    done = cli("image", "rebuild", str(run), check_rc=4)
    assert f"the base {gone}" in done.stderr and "is not in the Docker engine" in done.stderr
    assert f"python3 3.0.0-1 -> {base_packages['python3']}" in done.stderr
    assert "gone-package 1.0 -> (none)" in done.stderr
    assert "harness: building" not in done.stderr
