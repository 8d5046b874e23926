"""Reproducible training images on the real engine: a run's image, removed from the engine,
is rebuilt by `harness replay` (REPRODUCED, then IDENTICAL); `harness image rebuild`
without any build cache gives the recorded id (the same layer bytes); the image holds
checked-hash .pyc only. (A layer that differs is named down to its first file: in process,
tests/unit/test_oci.py.)"""

import uuid

import pytest
import requests
from conftest import read_lock, run_dir_of
from test_docker import built, docker_train, engine  # noqa: F401 - fixtures

# Counts the .pyc files under /opt by PEP 552 flags: 0 = checked against the source's
# mtime (a build time in the file), 1 = unchecked hash, 3 = checked hash.
PYC_FLAGS = """
import collections, pathlib
flags = collections.Counter(int.from_bytes(p.read_bytes()[4:8], "little")
                            for p in pathlib.Path("/opt").rglob("*.pyc"))
print(dict(flags))
"""


@pytest.mark.docker
@pytest.mark.long
def test_replay_of_a_run_whose_image_is_gone_rebuilds_it_to_the_same_id(
        cli, tiny_conf, engine, built, tmp_path):  # noqa: F811
    """The image was pushed, then removed from the engine and deleted from the registry:
    the replay says so, rebuilds it, and trains only because it is REPRODUCED; the new
    lock has the same image id (and no registry digest: the rebuild was not pushed)."""
    # Content of its own (an env entry only this test sets): nothing else uses this image.
    marker = f"+image.env.HARNESS_TEST_REBUILD={uuid.uuid4().hex[:12]}"
    runs = ["--runs-dir", str(tmp_path / "runs")]
    cli("build", "tiny", marker, "--push", "--config-dir", str(tiny_conf), check_rc=0,
        timeout=1200)
    run = run_dir_of(docker_train(cli, tiny_conf, marker, "trainer.max_steps=4", *runs))
    recorded = read_lock(run)["image"]
    assert recorded["repo_digest"]
    try:
        output = engine.containers.run(recorded["id"], ["python", "-c", PYC_FLAGS],
                                       remove=True, network_disabled=True)
        counts = eval(output.decode())  # {flag: count}, printed by PYC_FLAGS
        assert counts.get(1, 0) > 1000 and set(counts) == {1}, counts

        engine.images.remove(recorded["id"], force=True)
        registry, repository_digest = recorded["repo_digest"].split("/", 1)
        repository, digest = repository_digest.split("@")
        requests.delete(f"http://{registry}/v2/{repository}/manifests/{digest}",
                        timeout=30).raise_for_status()
        replayed = cli("replay", run.name, *runs, check_rc=0, timeout=1200)
        assert "is in neither the engine nor the registry" in replayed.stderr
        assert f"REPRODUCED: {recorded['reference']}" in replayed.stderr
        assert "IDENTICAL" in replayed.stdout
        again = read_lock(run_dir_of(replayed))["image"]
        assert (again["id"], again["diff_ids"]) == (recorded["id"], recorded["diff_ids"])
        assert again["repo_digest"] is None
    finally:
        engine.images.remove(recorded["id"], force=True)


@pytest.mark.docker
@pytest.mark.cold_build
@pytest.mark.long
def test_image_rebuild_without_cache_gives_the_recorded_id(
        cli, tiny_conf, engine, built, tmp_path):  # noqa: F811
    """Every step of both stages run again, no build cache: the same image id and layer
    bytes. The rebuild goes to a tag of its own, so the image other tests use stays."""
    runs = ["--runs-dir", str(tmp_path / "runs")]
    run = run_dir_of(docker_train(cli, tiny_conf, "trainer.max_steps=2", *runs))
    recorded = read_lock(run)["image"]
    before = {image.id for image in engine.images.list(all=True)}
    rebuilt = cli("image", "rebuild", run.name, *runs, check_rc=0, timeout=1200)
    # Every step ran again; none of their images is left behind (they were 1.3 GB per
    # CPU build and 9 GB per CUDA build, until the disk filled up).
    left = [image for image in engine.images.list(all=True)
            if image.id not in before and not image.tags and
            "/opt/wheelhouse" in str((image.attrs.get("ContainerConfig") or {}).get("Cmd"))]
    assert left == [], [image.id for image in left]
    assert "harness: building" in rebuilt.stderr
    assert f"REPRODUCED: {recorded['reference']}" in rebuilt.stdout
    assert f"has its image id {recorded['id']}" in rebuilt.stdout
    image = engine.images.get(recorded["reference"])
    assert image.id == recorded["id"]
    assert image.attrs["RootFS"]["Layers"] == recorded["diff_ids"]  # the same layer bytes
    assert not [tag for tag in image.tags if tag.endswith("-rebuild")]


@pytest.mark.docker
@pytest.mark.long
def test_image_rebuild_refuses_a_checkout_with_other_inputs(
        cli, tiny_conf, engine, built, tmp_path):  # noqa: F811
    """A run whose image came from other inputs (here: other harness source) is refused
    before anything is built, with the input that differs and how to get it back."""
    from harness.record import lockfile

    run = run_dir_of(docker_train(cli, tiny_conf, "trainer.max_steps=2",
                                  "--runs-dir", str(tmp_path / "runs")))
    lock = read_lock(run)
    lock["image"]["harness_source_sha256"] = "0" * 64
    lockfile.write(run / "harness.lock", lock)
    (run / "harness.lock.sigstore.json").unlink()  # an edited lock is no longer ours
    done = cli("image", "rebuild", str(run), check_rc=6)
    assert "harness_source_sha256: recorded 0000" in done.stderr
    assert "source.git_commit" in done.stderr
    assert "harness: building" not in done.stderr
