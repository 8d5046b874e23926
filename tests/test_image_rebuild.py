"""Reproducible training images on the real engine: a run's image, removed from the engine,
is rebuilt by `harness replay` (REPRODUCED, then IDENTICAL); `harness image rebuild`
without any build cache gives the recorded id (the same layer bytes); the image holds
checked-hash .pyc only; a layer that differs is named down to its first file."""

import io
import tarfile
import uuid

import pytest
import requests

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
    from harness import lockfile

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


def test_a_layer_drops_what_says_when_it_was_built_and_keeps_whiteouts():
    """Logs, /tmp and timestamp-checked .pyc go; a whiteout under /var/log (a file of a lower
    layer deleted) and hash-based .pyc stay; owners stay by number."""
    from harness import oci

    timestamp_pyc = b"\xa7\r\r\n" + (0).to_bytes(4, "little") + b"\0" * 8 + b"code"
    hash_pyc = b"\xa7\r\r\n" + (1).to_bytes(4, "little") + b"\0" * 8 + b"code"
    entries = {"var/log/dpkg.log": b"2026-11-26 install\n", "var/log/.wh.old.log": b"",
               "tmp/build.txt": b"x", "var/cache/ldconfig/aux-cache": b"y",
               "opt/a/__pycache__/m.cpython-311.pyc": timestamp_pyc,
               "opt/b/__pycache__/m.cpython-311.pyc": hash_pyc, "opt/b/m.py": b"X = 1\n"}
    source = io.BytesIO()
    with tarfile.open(fileobj=source, mode="w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid, info.mode = len(data), 0, 42, 0o2755
            archive.addfile(info, io.BytesIO(data))
    source.seek(0)
    out, files = io.BytesIO(), {}
    oci.normalized_layer(source, out, files=files)
    out.seek(0)
    with tarfile.open(fileobj=out) as layer:
        kept = {m.name: (m.uid, m.gid, m.mode) for m in layer.getmembers()}
    assert sorted(kept) == ["opt/b/__pycache__/m.cpython-311.pyc", "opt/b/m.py",
                            "var/log/.wh.old.log"]
    assert set(kept.values()) == {(0, 42, 0o2755)}
    assert sorted(files) == sorted(kept)
