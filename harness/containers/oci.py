"""Reproducible images: layers whose bytes are a pure function of the files in them, and an
image whose id is a pure function of its base and those layers.

The classic builder stamps each layer with the build's file times and each image config
with `created`, container ids and history times (moby PR #30611; `docker import` stamps
`created` too, moby#45364), so two builds of the same inputs get two image ids and nothing
can show that a rebuilt environment is the one that ran. Here:

- a layer is a normalized tarball: members sorted by name, every time fixed at EPOCH,
  owners by number (no names), no PAX records (atime, ctime, xattrs), hard links
  written as the files they link to (a sorted order cannot keep a link after its target);
  no file that records when it was made (logs, ldconfig's aux-cache, timestamp-checked
  .pyc: the images compile hash-based .pyc instead); its diff_id is the sha256 of
  those bytes;
- the image config is canonical JSON with a fixed `created` and history, on top of the
  base's own config and layers;
- `docker load` of the two stores the image under id sha256(config) (moby#22011), on an
  engine with Docker's own image store (the containerd image store reports the manifest
  digest instead, moby#48401: `engine_image_store` says which one an engine uses).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Tuple

from harness.digest import canonical_json

EPOCH = 0  # every file time in a layer (SOURCE_DATE_EPOCH's convention)
CREATED = "1970-01-01T00:00:00Z"  # the image's and its history's `created`
# Files that say when (not what) something was built: left out of every layer. A directory
# under them stays (apt needs /var/log/apt); what was in it is gone at the next boot anyway.
VOLATILE = ("var/log/", "tmp/", "var/tmp/", "root/.cache/", "var/cache/apt/",
            "var/lib/apt/lists/")
VOLATILE_FILES = ("var/cache/ldconfig/aux-cache",)
# What an image's config keeps of a build's: how a container runs. Hostname (a container
# id), Image (a parent id) and the like name the build, not the image.
SMALL = 1 << 20  # a `docker save` member read into memory: manifests, configs, empty layers
RUNTIME_KEYS = ("Cmd", "Entrypoint", "Env", "ExposedPorts", "Healthcheck", "Labels",
                "OnBuild", "Shell", "StopSignal", "User", "Volumes", "WorkingDir")


def normalized_layer(source: BinaryIO, out: BinaryIO, prefix: str = "",
                     files: Optional[Dict[str, str]] = None) -> str:
    """Copy the tar stream `source` into `out` as a normalized layer, each name under
    `prefix` (e.g. "opt/" for an archive of /opt/venv taken as "venv/..."), with the
    directories of `prefix` themselves; returns the layer's diff_id ("sha256:...").
    `files`, when given, receives each member's name -> "MODE sha256:..." (or "MODE -> TARGET",
    "MODE dir"): what `harness image rebuild` compares file by file."""
    with _seekable(source) as spool:  # sorting needs every name before any data
        digest = _Hashing(out)
        with tarfile.open(fileobj=spool, mode="r:") as archive, \
                tarfile.open(fileobj=digest, mode="w|", format=tarfile.GNU_FORMAT) as layer:
            members = {prefix + name: m for m in archive.getmembers()
                       if (name := _member_name(m.name))}
            for name in _prefix_dirs(prefix):
                members.setdefault(name, _directory(name))
            for name in sorted(members):
                _copy(archive, members[name], name, layer, files)
        return "sha256:" + digest.sha256.hexdigest()


class _seekable:
    """`source` itself when it can seek, else a temporary copy of it."""

    def __init__(self, source: BinaryIO):
        self.source, self.spool = source, None

    def __enter__(self) -> BinaryIO:
        if _can_seek(self.source):
            return self.source
        self.spool = tempfile.TemporaryFile()
        shutil.copyfileobj(self.source, self.spool, 1 << 20)
        self.spool.seek(0)
        return self.spool

    def __exit__(self, *exc) -> None:
        if self.spool is not None:
            self.spool.close()


def _can_seek(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _volatile(name: str, member: tarfile.TarInfo) -> bool:
    if member.isdir() or name.rsplit("/", 1)[-1].startswith(".wh."):
        return False  # a whiteout deletes a file of a lower layer: it must stay
    return name in VOLATILE_FILES or name.startswith(VOLATILE)


def _timestamped_pyc(name: str, data: BinaryIO) -> bool:
    """A .pyc checked against its source's mtime (PEP 552 flags 0): its bytes hold a build
    time, and with every mtime at EPOCH the interpreter would not use it anyway."""
    if not name.endswith(".pyc"):
        return False
    header = data.read(8)
    data.seek(0)
    return len(header) == 8 and int.from_bytes(header[4:8], "little") == 0


def _member_name(name: str) -> str:
    """A member's path without "./" or "/" in front ("" for the root itself). Not
    lstrip("./"): that would take the dot of a top-level ".wh.FILE" whiteout too."""
    name = name[2:] if name.startswith("./") else name
    name = name.lstrip("/")
    return "" if name == "." else name


def _prefix_dirs(prefix: str) -> List[str]:
    parts = [p for p in prefix.split("/") if p]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def _copy(archive: tarfile.TarFile, member: tarfile.TarInfo, name: str,
          layer: tarfile.TarFile, files: Optional[Dict[str, str]]) -> None:
    if _volatile(name, member):
        return
    data: Optional[BinaryIO] = None
    target = member
    if member.islnk():  # a hard link: the file it links to
        target = archive.getmember(member.linkname)
    info = tarfile.TarInfo(name.rstrip("/"))
    info.mode = target.mode
    info.mtime = EPOCH
    info.uid, info.gid = target.uid, target.gid  # by number: what the build made them
    info.uname = info.gname = ""
    if target.isreg():
        info.type, info.size = tarfile.REGTYPE, target.size
        data = archive.extractfile(target)
        if _timestamped_pyc(name, data):
            return
        data = _HashingReader(data)
    elif target.issym():
        info.type, info.linkname = tarfile.SYMTYPE, target.linkname
    elif target.isdir():
        info.type = tarfile.DIRTYPE
    else:
        return  # devices, fifos: nothing an image layer of ours holds
    layer.addfile(info, data)
    if files is not None:
        what = (f"sha256:{data.sha256.hexdigest()}" if data is not None
                else f"-> {info.linkname}" if info.issym() else "dir")
        files[info.name] = f"{info.mode:04o} {what}"


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what is read from it."""

    def __init__(self, source: BinaryIO):
        self.source, self.sha256 = source, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.sha256.update(data)
        return data


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
    runtime = {**(base.get("config") or {}), **settings}
    config["config"] = {key: runtime[key] for key in RUNTIME_KEYS if runtime.get(key)}
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
    with tempfile.TemporaryFile(dir=into) as archive:
        for chunk in engine.images.get(reference).save(named=False):
            archive.write(chunk)
        archive.seek(0)
        with tarfile.open(fileobj=archive) as saved:
            # The "data" filter (safe paths) exists from Python 3.10.12 and 3.11.4 on.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            saved.extractall(into / "base", **safe)
    manifest = json.loads((into / "base" / "manifest.json").read_text())[0]
    config = json.loads((into / "base" / manifest["Config"]).read_text())
    return {"config": config, "layers": [into / "base" / layer for layer in manifest["Layers"]]}


def saved_layers(engine, built: str, base: Dict[str, Any], into: Path) -> Dict[str, Any]:
    """`docker save` of the image `built` (made on `base`, a `saved_base`, by the classic
    builder), read as a stream: its config, and each layer above the base spooled raw
    into `into` (the base's are recognized by their sha256 and not kept). Returns
    {"config": {...}, "raw": [paths, in layer order]}; `rewritten` normalizes them.

    Once this returns, `built` can go: a CUDA image is gigabytes, and the disk then holds
    the raw layers alone while they are rewritten, not the built image beside them."""
    base_ids = set(base["config"]["rootfs"]["diff_ids"])
    raw: Dict[str, Optional[Path]] = {}
    small: Dict[str, bytes] = {}  # manifest.json, the config, and small layers
    aliases: Dict[str, str] = {}

    def spool(name: str, source: BinaryIO) -> None:
        raw[name] = _spool_layer(source, base_ids, into / f"raw{len(raw)}.tar")

    with tarfile.open(fileobj=_Stream(engine.images.get(built).save(named=False)),
                      mode="r|") as saved:
        for member in saved:
            if member.issym():  # a layer saved twice is saved once, linked
                aliases[member.name] = os.path.normpath(
                    os.path.join(os.path.dirname(member.name), member.linkname))
            elif member.isreg() and member.size < SMALL:
                small[member.name] = saved.extractfile(member).read()
            elif member.isreg():
                spool(member.name, saved.extractfile(member))
    manifest = json.loads(small["manifest.json"])[0]
    paths = [aliases.get(path, path) for path in manifest["Layers"]]
    for path in paths:
        if path not in raw:
            spool(path, io.BytesIO(small[path]))
    return {"config": json.loads(small[manifest["Config"]]),
            "raw": [raw[path] for path in paths if raw[path] is not None]}


def _spool_layer(source: BinaryIO, base_ids: set, path: Path) -> Optional[Path]:
    """`path` holding the layer's bytes, or None for a layer of the base."""
    with open(path, "wb") as out:
        raw = _Hashing(out)
        shutil.copyfileobj(source, raw, 1 << 20)
    if "sha256:" + raw.sha256.hexdigest() in base_ids:
        path.unlink()
        return None
    return path


def rewritten(saved: Dict[str, Any], base: Dict[str, Any], into: Path) -> Dict[str, Any]:
    """The image of `saved_layers` rewritten reproducibly into `into`: every layer above
    the base normalized (each raw layer deleted once done), a config with its runtime
    settings and fixed times. Returns {"config": bytes, "layers": [paths, base's first],
    "files": {diff_id: {name: "MODE sha256:..."}} of the new layers}; `load` makes it an
    image."""
    new: List[Tuple[str, Path, Dict[str, str]]] = []
    done: Dict[Path, Tuple[str, Path, Dict[str, str]]] = {}  # a layer listed twice: once
    for index, raw in enumerate(saved["raw"]):
        if raw not in done:
            files: Dict[str, str] = {}
            out_path = into / f"layer{index}.tar"
            with open(raw, "rb") as source, open(out_path, "wb") as out:
                done[raw] = (normalized_layer(source, out, files=files), out_path, files)
            raw.unlink()
        new.append(done[raw])
    config = saved["config"]
    settings = {key: value for key, value in (config.get("config") or {}).items()
                if key in RUNTIME_KEYS}
    history = [_created_by(entry) for entry in config.get("history", [])
               if not entry.get("empty_layer")][len(base["config"]["rootfs"]["diff_ids"]):]
    if len(history) != len(new):
        history = [f"layer {index}" for index in range(len(new))]
    return {"config": image_config(base["config"], [diff_id for diff_id, _, _ in new],
                                   settings, history),
            "layers": [*base["layers"], *(path for _, path, _ in new)],
            "files": {diff_id: files for diff_id, _, files in new}}


def _created_by(entry: Dict[str, Any]) -> str:
    """A history line without the build's own hashes of what it copied (dir:HEX, file:HEX:
    the classic builder's, which count file times)."""
    return re.sub(r"\b(dir|file):[0-9a-f]{64}", r"\1", entry.get("created_by", ""))


class _Stream(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (docker-py's `save`)."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks, self.rest = iter(chunks), memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.rest:
            chunk = next(self.chunks, b"")
            if not chunk:
                return 0
            self.rest = memoryview(chunk)
        size = min(len(buffer), len(self.rest))
        buffer[:size], self.rest = self.rest[:size], self.rest[size:]
        return size


def load(engine, config: bytes, layers: List[Path], tag: str) -> str:
    """`docker load` an image from its config and every layer file, base's first; tag it;
    returns the image id the engine gives it. The bundle is streamed to the engine as it
    is written (a CUDA image is gigabytes: no second copy of it on disk)."""
    loaded = engine.images.load(_bundle(config, layers, tag))
    return loaded[0].id


def _bundle(config: bytes, layers: List[Path], tag: str) -> Iterator[bytes]:
    """The chunks of a `docker save` archive of the image, written by a thread into a pipe."""
    read_end, write_end = os.pipe()
    failure: List[BaseException] = []

    def write() -> None:
        try:
            with os.fdopen(write_end, "wb") as pipe:
                write_bundle(pipe, config, layers, tag)
        except (OSError, tarfile.TarError) as exc:  # the engine stopped reading: it says why
            failure.append(exc)

    writer = threading.Thread(target=write, name="harness-image-load", daemon=True)
    writer.start()
    with os.fdopen(read_end, "rb") as pipe:
        yield from iter(lambda: pipe.read(1 << 20), b"")
    writer.join()
    if failure:
        raise OSError(f"writing the image for docker load failed: {failure[0]}")


def write_bundle(out: BinaryIO, config: bytes, layers: List[Path], tag: str) -> None:
    """A `docker load` archive of the image (config, layer files base's first) into `out`."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as bundle:
        names = []
        for index, path in enumerate(layers):
            names.append(f"layers/{index}.tar")
            bundle.add(os.path.realpath(path), arcname=names[-1])  # the file, not a link
        _add_bytes(bundle, "config.json", config)
        _add_bytes(bundle, "manifest.json", json.dumps(
            [{"Config": "config.json", "RepoTags": [tag], "Layers": names}]).encode())


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), EPOCH
    archive.addfile(info, io.BytesIO(data))


def rootfs_image(rootfs: BinaryIO, out: BinaryIO, tag: str, settings: Dict[str, Any],
                 created_by: str) -> str:
    """A `docker load` archive, into `out`, of a one-layer image made of the tar stream
    `rootfs` (a whole root file system, e.g. from debootstrap): a base image whose id
    depends on its files and `settings` alone. Returns that id."""
    scratch = {"architecture": _architecture(), "os": "linux",
               "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
    with tempfile.TemporaryDirectory(prefix="harness-rootfs-") as tmp:
        layer = Path(tmp) / "layer.tar"
        with open(layer, "wb") as handle:
            diff_id = normalized_layer(rootfs, handle)
        config = image_config(scratch, [diff_id], settings, [created_by])
        write_bundle(out, config, [layer], tag)
    return image_id(config)


def _architecture() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def engine_image_store(engine) -> str:
    """"docker" (image id = sha256 of the config) or "containerd" (the manifest digest)."""
    status = engine.info().get("DriverStatus") or []
    return "containerd" if any("io.containerd.snapshotter" in str(v) for _, v in status) \
        else "docker"


# ---------------------------------------------------------------- file lists

def save_file_list(directory: Path, diff_id: str, files: Dict[str, str]) -> None:
    """Keep a layer's file list (name -> "MODE sha256:...") by its diff_id, for naming the
    first file that differs when a rebuild gives another layer."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{diff_id.split(':')[-1]}.json.gz"
    partial = path.with_name(f".{path.name}.{os.getpid()}")  # whole, or not there
    partial.write_bytes(gzip.compress(canonical_json(files).encode(), mtime=0))
    partial.replace(path)


def read_file_list(directory: Path, diff_id: str) -> Optional[Dict[str, str]]:
    try:
        return json.loads(gzip.decompress(
            (directory / f"{diff_id.split(':')[-1]}.json.gz").read_bytes()))
    except (OSError, ValueError):
        return None


def first_difference(recorded: Dict[str, str], rebuilt: Dict[str, str]) -> Optional[str]:
    """The first file (by name) that differs between two file lists, said in words."""
    for name in sorted(set(recorded) | set(rebuilt)):
        before, after = recorded.get(name), rebuilt.get(name)
        if before == after:
            continue
        if before is None:
            return f"/{name} is only in the rebuilt image ({after})"
        if after is None:
            return f"/{name} is only in the recorded image ({before})"
        return f"/{name}: recorded {before}, rebuilt {after}"
    return None


# ---------------------------------------------------------------- command line

def main(argv: Optional[List[str]] = None) -> int:
    """`python3 -m harness.containers.oci rootfs TAG [--env K=V] [--label K=V] [--cmd JSON]`: read a
    root file system's tar on stdin, write a `docker load` archive of it on stdout, print
    its image id on stderr. Needs only the standard library: docker/make-base-image.sh runs
    it with the system's python3, before any venv exists."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python3 -m harness.containers.oci",
                                     description=main.__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    rootfs = actions.add_parser("rootfs", help="a base image from a root file system's tar")
    rootfs.add_argument("tag")
    rootfs.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    rootfs.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    rootfs.add_argument("--cmd", default='["/bin/bash"]', help="JSON list")
    rootfs.add_argument("--created-by", default="debootstrap")
    args = parser.parse_args(argv)
    settings = {"Env": args.env, "Cmd": json.loads(args.cmd),
                "Labels": dict(item.split("=", 1) for item in args.label)}
    image = rootfs_image(sys.stdin.buffer, sys.stdout.buffer, args.tag, settings,
                         args.created_by)
    print(image, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
