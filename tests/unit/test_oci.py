"""Reproducible layers (harness/containers/oci.py) without an engine: what a layer drops,
what differs."""

import io
import os
import tarfile


def tree_archive(root, stamp: int, reverse: bool) -> io.BytesIO:
    """The files of one build, made with times `stamp` and added in either order: what a
    container archive of them would differ in from build to build."""
    files = {"app/hello.txt": b"hello\n", "app/lib/mod.py": b"VALUE = 1\n",
             "app/lib/data.bin": bytes(range(256)) * 64}
    for name, data in sorted(files.items(), reverse=reverse):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.link(root / "app/hello.txt", root / "app/hello-again.txt")
    (root / "app/lib/link.py").symlink_to("mod.py")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(root.rglob("*"), reverse=reverse):
            os.utime(path, (stamp, stamp), follow_symlinks=False)
            archive.add(path, arcname=str(path.relative_to(root)), recursive=False)
    buffer.seek(0)
    return buffer


def test_a_differing_layer_is_named_with_its_first_differing_file(tmp_path, monkeypatch):
    """The file lists kept at build time name the first file that differs."""
    from harness.containers import image, oci

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
    from harness.containers import oci

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
