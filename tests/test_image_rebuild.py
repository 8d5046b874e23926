"""Reproducible training images on the real engine: a run's image, removed from the engine,
is rebuilt by `harness replay` (REPRODUCED, then IDENTICAL) and by `harness image rebuild`
without any build cache (REPRODUCED: the same image id, the same layer bytes); the image
holds checked-hash .pyc only; a layer that differs is named down to its first file."""

import io
import tarfile
import uuid

import pytest

from conftest import read_lock, run_dir_of
from test_docker import built, docker_train, engine  # noqa: F401 - fixtures
from test_oci import tree_archive

# Counts the .pyc files under /opt by PEP 552 flags: 0 = checked against the source's
# mtime (a build time in the file), 1 = unchecked hash, 3 = checked hash.
PYC_FLAGS = """
import collections, pathlib
flags = collections.Counter(int.from_bytes(p.read_bytes()[4:8], "little")
                            for p in pathlib.Path("/opt").rglob("*.pyc"))
print(dict(flags))
"""


@pytest.mark.slow
@pytest.mark.docker
def test_a_removed_image_is_rebuilt_to_the_same_id_by_replay_and_by_image_rebuild(  # noqa: F811
        cli, tiny_conf, engine, built, tmp_path):  # noqa: F811
    # Content of its own (an env entry only this test sets): nothing else uses this image.
    marker = f"+image.env.HARNESS_TEST_REBUILD={uuid.uuid4().hex[:12]}"
    runs = ["--runs-dir", str(tmp_path / "runs")]
    run = run_dir_of(docker_train(cli, tiny_conf, marker, "trainer.max_steps=4", *runs))
    recorded = read_lock(run)["image"]
    try:
        output = engine.containers.run(recorded["id"], ["python", "-c", PYC_FLAGS],
                                       remove=True, network_disabled=True)
        counts = eval(output.decode())  # {flag: count}, printed by PYC_FLAGS
        assert counts.get(1, 0) > 1000 and set(counts) == {1}, counts

        engine.images.remove(recorded["id"], force=True)
        replayed = cli("replay", run.name, *runs, check_rc=0, timeout=1200)
        assert "is not in the engine" in replayed.stderr
        assert f"REPRODUCED: {recorded['reference']}" in replayed.stderr
        assert "IDENTICAL" in replayed.stdout
        again = read_lock(run_dir_of(replayed))["image"]
        assert (again["id"], again["diff_ids"]) == (recorded["id"], recorded["diff_ids"])

        # From scratch: no build cache, every step of both stages run again.
        engine.images.remove(recorded["id"], force=True)
        rebuilt = cli("image", "rebuild", run.name, *runs, check_rc=0, timeout=1200)
        assert f"REPRODUCED: {recorded['reference']}" in rebuilt.stdout
        image = engine.images.get(recorded["reference"])
        assert image.id == recorded["id"]
        assert image.attrs["RootFS"]["Layers"] == recorded["diff_ids"]  # the same layer bytes
    finally:
        engine.images.remove(recorded["id"], force=True)


@pytest.mark.docker
def test_image_rebuild_refuses_a_checkout_with_other_inputs(  # noqa: F811
        cli, tiny_conf, engine, built, tmp_path):  # noqa: F811
    """A run whose image came from other inputs (here: other harness source) is refused
    before anything is built, with the input that differs and how to get it back."""
    from harness import lockfile

    run = run_dir_of(docker_train(cli, tiny_conf, "trainer.max_steps=2",
                                  "--runs-dir", str(tmp_path / "runs")))
    lock = read_lock(run)
    lock["image"]["harness_source_sha256"] = "0" * 64
    lockfile.write(run / "harness.lock", lock)
    done = cli("image", "rebuild", str(run), check_rc=6)
    assert "harness_source_sha256: recorded 0000" in done.stderr
    assert "source.git_commit" in done.stderr
    assert "harness: building" not in done.stderr


def test_a_differing_layer_is_named_with_its_first_differing_file(tmp_path, monkeypatch):
    """The file lists kept at build time name the first file that differs."""
    from harness import image, oci

    monkeypatch.setenv("HARNESS_STATE_DIR", str(tmp_path / "state"))
    diff_ids = []
    for attempt, value in enumerate((b"VALUE = 1\n", b"VALUE = 2\n")):
        root = tmp_path / f"tree{attempt}"
        archive = tree_archive(root, 1_000_000_000, reverse=False)
        if attempt:  # one file's bytes differ in the second build
            archive = _with_file(archive, "app/lib/mod.py", value)
        files = {}
        diff_ids.append(oci.normalized_layer(archive, io.BytesIO(), prefix="opt/", files=files))
        oci.save_file_list(image.layer_lists_dir(), diff_ids[-1], files)
    base = "sha256:" + "b" * 64
    report = image.image_difference({"id": "sha256:1", "diff_ids": [base, diff_ids[0]]},
                                    {"id": "sha256:2", "diff_ids": [base, diff_ids[1]]})
    assert f"First differing layer: 2 of 2 (recorded {diff_ids[0]}" in report
    assert "First differing file: /opt/app/lib/mod.py: recorded 0644 sha256:" in report
    assert image.image_difference({"id": "sha256:1", "diff_ids": [base]},
                                  {"id": "sha256:1", "diff_ids": [base]}) is None


def _with_file(archive: io.BytesIO, name: str, data: bytes) -> io.BytesIO:
    """`archive` with the bytes of member `name` replaced."""
    out = io.BytesIO()
    with tarfile.open(fileobj=archive) as source, tarfile.open(fileobj=out, mode="w") as target:
        for member in source.getmembers():
            content = source.extractfile(member) if member.isreg() else None
            if member.name == name:
                member.size, content = len(data), io.BytesIO(data)
            target.addfile(member, content)
    out.seek(0)
    return out
