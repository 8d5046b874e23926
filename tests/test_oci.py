"""Reproducible image ids (harness/containers/oci.py) on the real engine: the same files, written at
other times, in another order, become the same layer bytes and the same image id."""

import hashlib
import os
import tarfile
import uuid

import pytest
from test_docker import engine  # noqa: F401 - the fixture: a Docker engine and a base
from unit.test_oci import tree_archive

pytestmark = pytest.mark.docker


def test_same_files_at_other_times_give_the_same_layer_and_image_id(engine, tmp_path):  # noqa: F811
    from harness import config
    from harness.containers import oci

    base_ref = config.state_ref("base-cpu") or os.environ["HARNESS_CPU_BASE"]
    base = oci.saved_base(engine, base_ref, tmp_path / "saved")
    settings = {"Env": ["PATH=/usr/bin:/bin"], "User": "10001:10001", "WorkingDir": "/tmp",
                "Cmd": ["cat", "/opt/app/hello-again.txt"]}
    found = []
    for attempt, (stamp, reverse) in enumerate(((1_000_000_000, False), (1_700_000_000, True))):
        layer = tmp_path / f"layer{attempt}.tar"
        with open(layer, "wb") as out:
            diff_id = oci.normalized_layer(
                tree_archive(tmp_path / f"tree{attempt}", stamp, reverse), out, prefix="opt/")
        image_config = oci.image_config(base["config"], [diff_id], settings, ["test files"])
        tag = f"harness-test/oci:{uuid.uuid4().hex[:12]}"
        image_id = oci.load(engine, image_config, [*base["layers"], layer], tag)
        output = engine.containers.run(tag, remove=True, network_disabled=True)
        engine.images.remove(tag)  # untagged: the next load makes the image again
        found.append({"id": image_id, "config_id": oci.image_id(image_config),
                      "diff_id": diff_id, "output": output,
                      "bytes": hashlib.sha256(layer.read_bytes()).hexdigest()})
    assert found[0] == found[1]
    assert found[0]["id"] == found[0]["config_id"]  # the id is sha256 of our config
    assert found[0]["diff_id"] == "sha256:" + found[0]["bytes"]
    assert found[0]["output"] == b"hello\n"  # the hard link became the file
    with tarfile.open(tmp_path / "layer0.tar") as layer:
        members = layer.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and names[:2] == ["opt", "opt/app"]
    assert {(m.mtime, m.uname, m.gname) for m in members} == {(0, "", "")}
    # Owners stay as the build made them, by number (a setgid tool keeps its group).
    assert {(m.uid, m.gid) for m in members if m.name.startswith("opt/app")} == \
        {(os.getuid(), os.getgid())}
    assert not any(m.pax_headers for m in members)
    assert [m.linkname for m in members if m.issym()] == ["mod.py"]
    assert not any(m.islnk() for m in members)
