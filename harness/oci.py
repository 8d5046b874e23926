"""Reproducible images: layers whose bytes are a pure function of the files in them, and an
image whose id is a pure function of its base and those layers.

The classic builder stamps each layer with the build's file times and each image config
with `created`, container ids and history times (moby PR #30611; `docker import` stamps
`created` too, moby#45364), so two builds of the same inputs get two image ids and nothing
can show that a rebuilt environment is the one that ran. Here:

- a layer is a normalized tarball: members sorted by name, every time fixed at EPOCH,
  owner 0:0 by number (no names), no PAX records (atime, ctime, xattrs), hard links
  written as the files they link to (a sorted order cannot keep a link after its target);
  its diff_id is the sha256 of those bytes;
- the image config is canonical JSON with a fixed `created` and history, on top of the
  base's own config and layers;
- `docker load` of the two stores the image under id sha256(config) (moby#22011), on an
  engine with Docker's own image store (the containerd image store reports the manifest
  digest instead, moby#48401: `engine_image_store` says which one an engine uses).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, List, Optional

from harness.digest import canonical_json

EPOCH = 0  # every file time in a layer (SOURCE_DATE_EPOCH's convention)
CREATED = "1970-01-01T00:00:00Z"  # the image's and its history's `created`


def normalized_layer(source: BinaryIO, out: BinaryIO, prefix: str = "") -> str:
    """Copy the tar stream `source` into `out` as a normalized layer, each name under
    `prefix` (e.g. "opt/" for an archive of /opt/venv taken as "venv/..."), with the
    directories of `prefix` themselves; returns the layer's diff_id ("sha256:...")."""
    with tempfile.TemporaryFile() as spool:  # sorting needs every name before any data
        for chunk in iter(lambda: source.read(1 << 20), b""):
            spool.write(chunk)
        spool.seek(0)
        digest = _Hashing(out)
        with tarfile.open(fileobj=spool, mode="r:") as archive, \
                tarfile.open(fileobj=digest, mode="w|", format=tarfile.GNU_FORMAT) as layer:
            members = {prefix + m.name.lstrip("./"): m for m in archive.getmembers()}
            for name in _prefix_dirs(prefix):
                members.setdefault(name, _directory(name))
            for name in sorted(members):
                _copy(archive, members[name], name, layer)
        return "sha256:" + digest.sha256.hexdigest()


def _prefix_dirs(prefix: str) -> List[str]:
    parts = [p for p in prefix.split("/") if p]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def _copy(archive: tarfile.TarFile, member: tarfile.TarInfo, name: str,
          layer: tarfile.TarFile) -> None:
    data: Optional[BinaryIO] = None
    target = member
    if member.islnk():  # a hard link: the file it links to
        target = archive.getmember(member.linkname)
    info = tarfile.TarInfo(name.rstrip("/"))
    info.mode = target.mode
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if target.isreg():
        info.type, info.size = tarfile.REGTYPE, target.size
        data = archive.extractfile(target)
    elif target.issym():
        info.type, info.linkname = tarfile.SYMTYPE, target.linkname
    elif target.isdir():
        info.type = tarfile.DIRTYPE
    else:
        return  # devices, fifos: nothing an image layer of ours holds
    layer.addfile(info, data)


class _Hashing(io.RawIOBase):
    """A write-only stream that passes bytes on and hashes them."""

    def __init__(self, out: BinaryIO):
        self.out, self.sha256 = out, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.out.write(data)
        return len(data)


def image_config(base: Dict[str, Any], diff_ids: Iterable[str], settings: Dict[str, Any],
                 created_by: Iterable[str]) -> bytes:
    """The config of an image: `base` (its raw config, from `docker save`) with `diff_ids`
    on top, its runtime `settings` (Env, User, WorkingDir, Cmd, Labels, ...) replacing the
    base's, one history entry per layer described by `created_by`; canonical bytes."""
    diff_ids, created_by = list(diff_ids), list(created_by)
    if len(diff_ids) != len(created_by):
        raise ValueError("one history entry per layer")
    config = {key: value for key, value in base.items()
              if key in ("architecture", "os", "variant", "os.version")}
    config["config"] = {**(base.get("config") or {}), **settings}
    config["created"] = CREATED
    config["rootfs"] = {"type": "layers",
                        "diff_ids": [*base["rootfs"]["diff_ids"], *diff_ids]}
    config["history"] = [*base.get("history", []),
                         *({"created": CREATED, "created_by": what} for what in created_by)]
    return canonical_json(config).encode()


def image_id(config: bytes) -> str:
    return "sha256:" + hashlib.sha256(config).hexdigest()


def saved_base(engine, reference: str, into: Path) -> Dict[str, Any]:
    """`docker save` of the base unpacked in `into`: its raw config and layer files, which
    an image built on it is loaded with. Returns {"config": ..., "layers": [paths]}."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "base.tar"
    with open(archive, "wb") as handle:
        for chunk in engine.images.get(reference).save(named=False):
            handle.write(chunk)
    with tarfile.open(archive) as saved:
        saved.extractall(into / "base", filter="data")
    (into / "base.tar").unlink()
    manifest = json.loads((into / "base" / "manifest.json").read_text())[0]
    config = json.loads((into / "base" / manifest["Config"]).read_text())
    return {"config": config, "layers": [into / "base" / layer for layer in manifest["Layers"]]}


def load(engine, config: bytes, layers: List[Path], tag: str) -> str:
    """`docker load` an image from its config and every layer file, base's first; tag it;
    returns the image id the engine gives it."""
    with tempfile.TemporaryFile() as bundle:
        with tarfile.open(fileobj=bundle, mode="w:", format=tarfile.GNU_FORMAT) as out:
            names = []
            for index, path in enumerate(layers):
                names.append(f"layers/{index}.tar")
                out.add(str(path), arcname=names[-1])
            _add_bytes(out, "config.json", config)
            _add_bytes(out, "manifest.json", json.dumps(
                [{"Config": "config.json", "RepoTags": [tag], "Layers": names}]).encode())
        bundle.seek(0)
        loaded = engine.images.load(bundle)  # streamed: a CUDA image is gigabytes
    return loaded[0].id


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), EPOCH
    archive.addfile(info, io.BytesIO(data))


def engine_image_store(engine) -> str:
    """"docker" (image id = sha256 of the config) or "containerd" (the manifest digest)."""
    status = engine.info().get("DriverStatus") or []
    return "containerd" if any("io.containerd.snapshotter" in str(v) for _, v in status) \
        else "docker"
