"""MNIST-format (IDX) datasets: reading, locating, verifying and fetching.

A dataset's identity is the sha256 of each file's *decompressed* content, pinned in
`conf/data/<name>.yaml`: mirrors and distributions recompress the `.gz` archives (Debian's
Fashion-MNIST does), so archive checksums only say whether one download is intact.

Data arrives before training, never during it: the launcher locates (or fetches) and
verifies the files on the host, then hands one directory to the training process.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from harness import hash_cache
from harness.env import DATA
from harness.errors import DataError

DEBIAN_DATASETS = Path("/usr/share/datasets")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


# ---------------------------------------------------------------- reading

def open_maybe_gzip(path: Path):
    with open(path, "rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array."""
    with open_maybe_gzip(path) as stream:
        try:
            raw = stream.read()
        except (OSError, EOFError, zlib.error) as exc:
            raise unreadable(path, exc) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); replace it with the "
                        f"published file.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or padded: {len(raw)} bytes, the header says "
                        f"{expected}; replace it with the published file.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_file(directory: Path, name: str) -> Optional[Path]:
    """`name` in `directory`, accepting the compressed or decompressed variant."""
    stem = name[:-3] if name.endswith(".gz") else name
    for candidate in (name, stem, stem + ".gz"):
        path = directory / candidate
        if path.is_file():
            return path
    return None


class IdxClassification:
    """An image-classification dataset stored as MNIST-style IDX files in `root`:
    `{train,t10k}-images-idx3-ubyte[.gz]` and `{train,t10k}-labels-idx1-ubyte[.gz]`.

    Images become float32 tensors of shape (1, H, W), normalized with `mean` and `std`;
    all of it is held in memory (60,000 28x28 images are 188 MB as float32).
    """

    def __init__(self, root: str, split: str, mean: float = 0.0, std: float = 1.0):
        import torch

        if split not in SPLIT_PREFIX:
            raise DataError(f"unknown split '{split}'; use one of {sorted(SPLIT_PREFIX)}")
        prefix = SPLIT_PREFIX[split]
        images = read_idx(self._path(Path(root), f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(self._path(Path(root), f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise DataError(f"{root}: {len(images)} images but {len(labels)} labels for {split}")
        # In place: one float32 copy of the images, not three temporaries.
        pixels = torch.from_numpy(images.copy()).unsqueeze(1).to(torch.float32)
        self.images = pixels.div_(255.0).sub_(mean).div_(std)
        self.labels = torch.from_numpy(labels.astype(np.int64))

    @staticmethod
    def _path(root: Path, name: str) -> Path:
        path = find_file(root, name)
        if path is None:
            raise DataError(f"{name}[.gz] not found in {root}")
        return path

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


# ---------------------------------------------------------------- identity

def content_sha256(path: Path, fix: str = "") -> str:
    """sha256 of the file's content, decompressed when it is gzip, computed from the bytes.
    `verify` remembers it per file (harness/hash_cache.py: keyed on ctime too, so an edit
    whose mtime was restored is still seen). Hashing Fashion-MNIST takes about 0.4 s on
    the development machines. `fix` says how to replace the file if it cannot be read."""
    digest = hashlib.sha256()
    with open_maybe_gzip(path) as stream:
        for chunk in iter(lambda: _read_chunk(stream, path, fix), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_chunk(stream, path: Path, fix: str) -> bytes:
    try:
        return stream.read(1 << 20)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise unreadable(path, exc, fix) from None


def unreadable(path: Path, exc: Exception, fix: str = "") -> DataError:
    fix = fix or "Replace it with the published file (fetch it again)."
    return DataError(f"{path} is corrupt or truncated: it cannot be decompressed "
                     f"({type(exc).__name__}: {exc or 'unexpected end of data'}). {fix}")


# ---------------------------------------------------------------- locating

def user_cache_dir() -> Path:
    from harness.rundir import user_cache

    return user_cache() / "data"


def search_dirs(data_cfg: Dict) -> List[Path]:
    """Where a dataset is looked for, in order. An explicit `data.root` is the only place."""
    if data_cfg.get("root"):
        return [Path(data_cfg["root"]).expanduser()]
    dirname = data_cfg.get("dirname") or data_cfg["name"]
    dirs = []
    if os.environ.get(DATA):
        dirs.append(Path(os.environ[DATA]) / dirname)
    dirs.append(user_cache_dir() / dirname)
    dirs.append(DEBIAN_DATASETS / dirname)
    return dirs


def locate(data_cfg: Dict) -> Optional[Tuple[Path, Dict[str, Path]]]:
    """The first searched directory holding every pinned file, with the file paths."""
    files = data_cfg.get("files") or {}
    for directory in search_dirs(data_cfg):
        found = {key: find_file(directory, spec["file"]) for key, spec in files.items()}
        if all(found.values()):
            return directory, found
    return None


def verify(data_cfg: Dict, paths: Dict[str, Path],
           rehash: bool = False) -> Dict[str, Dict[str, str]]:
    """Check each file's content hash against its pin (remembered for an unchanged file,
    unless `rehash`); return what the lockfile records."""
    record = {}
    keys = sorted(paths)
    hashed = hash_cache.digests([paths[k] for k in keys], "content-sha256",
                                lambda p: content_sha256(p, fix=refetch_hint(data_cfg)), rehash)
    for key, actual in zip(keys, hashed):
        path, pinned = paths[key], data_cfg["files"][key]["sha256"]
        if actual != pinned:
            raise DataError(
                f"{path} has content sha256 {actual}, but conf/data/{data_cfg['name']}.yaml "
                f"pins {pinned}. The file is corrupt or a different dataset: "
                f"{refetch_hint(data_cfg)} Or fix the pin if you changed data on purpose.")
        record[key] = {"file": path.name, "sha256": actual}
    return record


def refetch_hint(data_cfg: Dict) -> str:
    """How to get a good copy of a dataset's files."""
    name = data_cfg["name"]
    hint = f"Delete it and run `harness data fetch {name}`"
    if data_cfg.get("debian_package"):
        hint += f", or reinstall it: apt-get install --reinstall {data_cfg['debian_package']}"
    return hint + "."


def prepare(data_cfg: Dict, fetch_missing: bool = True) -> Tuple[Optional[Path], Dict]:
    """Locate (fetching when missing and mirrors are pinned) and verify a dataset.
    Returns the directory to hand to training and the per-file record for the lockfile.
    A dataset without pinned files (a user's own generator, say) needs nothing here."""
    if not data_cfg.get("files"):
        root = data_cfg.get("root")
        return (Path(root) if root else None), {}
    located = locate(data_cfg)
    fetch_failed = None
    if located is None and fetch_missing and data_cfg.get("mirrors") and not data_cfg.get("root"):
        print(f"harness: dataset '{data_cfg['name']}' not found locally; fetching it",
              file=sys.stderr)
        try:
            fetch(data_cfg, user_cache_dir() / (data_cfg.get("dirname") or data_cfg["name"]))
        except DataError as exc:
            fetch_failed = exc
        located = locate(data_cfg)
    if located is None and fetch_missing and can_install_debian_package(data_cfg):
        install_debian_package(data_cfg["debian_package"])
        located = locate(data_cfg)
    if located is None:
        raise DataError(missing_message(data_cfg) +
                        (f"\nFetching failed too: {fetch_failed}" if fetch_failed else ""))
    directory, paths = located
    return directory, verify(data_cfg, paths)


def can_install_debian_package(data_cfg: Dict) -> bool:
    """A dataset Debian packages, on a Debian machine where we are root, with no explicit
    data.root: the package's directory is one of the standard locations."""
    return bool(data_cfg.get("debian_package")) and not data_cfg.get("root") \
        and os.geteuid() == 0 and shutil.which("apt-get") is not None


def install_debian_package(package: str) -> None:
    """apt-get install PACKAGE, refreshing the package lists once if that fails."""
    print(f"harness: installing Debian package {package} (apt-get, as root): it provides "
          f"this dataset", file=sys.stderr, flush=True)

    def apt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "-q", *args],
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                              capture_output=True, text=True)

    install = ("install", "-y", "--no-install-recommends", package)
    done = apt(*install)
    if done.returncode != 0:  # the package lists may be missing or stale
        apt("update")
        done = apt(*install)
    if done.returncode != 0:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        raise DataError(f"apt-get install {package} failed ({last}); install it by hand "
                        f"(`make data` for Fashion-MNIST) and try again.")


def missing_message(data_cfg: Dict) -> str:
    names = ", ".join(spec["file"] for spec in data_cfg["files"].values())
    searched = "\n".join(f"  {d}" for d in search_dirs(data_cfg))
    return (f"dataset '{data_cfg['name']}' not found: need {names} (or the same without .gz) "
            f"in one of:\n{searched}\nFetch it with `harness data fetch {data_cfg['name']}`, "
            f"or put the files in one of those directories, or pass data.root=DIR."
            + (f" On Debian without internet access: apt-get install {data_cfg['debian_package']}."
               if data_cfg.get("debian_package") else ""))


# ---------------------------------------------------------------- fetching

def fetch(data_cfg: Dict, dest: Path, retries: int = 3, backoff: float = 0.5,
          timeout: float = 30.0) -> Dict[str, Path]:
    """Download every pinned file missing from `dest`, trying each mirror with retries.
    A file lands in `dest` only after its content hash matched (temp file + rename)."""
    dest.mkdir(parents=True, exist_ok=True)
    mirrors = data_cfg.get("mirrors") or []
    if not mirrors:
        raise DataError(f"dataset '{data_cfg['name']}' has no mirrors in its config; put the "
                        f"files in {dest} yourself.")
    result = {}
    for key, spec in sorted(data_cfg["files"].items()):
        existing = find_file(dest, spec["file"])
        if existing and _intact(existing, spec["sha256"]):
            print(f"  {spec['file']}: already present and verified", file=sys.stderr)
            result[key] = existing
            continue
        result[key] = _fetch_one(spec, mirrors, dest, retries, backoff, timeout)
    return result


def _intact(path: Path, pinned: str) -> bool:
    """Whether a file already there has the pinned content; a corrupt one is fetched
    again (and replaced), not refused."""
    try:
        return content_sha256(path) == pinned
    except DataError:
        print(f"  {path.name}: corrupt; downloading it again", file=sys.stderr)
        return False


def _fetch_one(spec: Dict, mirrors: List[str], dest: Path, retries: int, backoff: float,
               timeout: float) -> Path:
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + spec["file"]
        for attempt in range(1, retries + 1):
            try:
                return _download_verified(url, spec, dest, timeout)
            except _CorruptDownload as exc:
                failures.append(f"{url}: {exc}")
                break  # a mirror serving wrong content will not improve on retry
            except (urllib.error.URLError, OSError, EOFError) as exc:
                failures.append(f"{url} (attempt {attempt}/{retries}): {exc}")
                if attempt < retries:
                    time.sleep(backoff * 2 ** (attempt - 1))
    details = "\n  ".join(failures)
    raise DataError(f"could not fetch {spec['file']} from any mirror:\n  {details}\n"
                    f"Check the network or proxy, or copy the file into {dest}.")


class _CorruptDownload(Exception):
    pass


def _download_verified(url: str, spec: Dict, dest: Path, timeout: float) -> Path:
    print(f"  {spec['file']}: downloading {url}", file=sys.stderr)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec['file']}.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\r  {spec['file']}: {done * 100 // total}% of {total} bytes",
                          end="", file=sys.stderr)
            if total:
                print(file=sys.stderr)
        try:
            actual = content_sha256(tmp)
        except DataError as exc:
            raise _CorruptDownload(f"unreadable download ({exc})") from None
        if actual != spec["sha256"]:
            raise _CorruptDownload(f"content sha256 {actual} does not match the pin "
                                   f"{spec['sha256']}; rejected")
        final = dest / spec["file"]
        os.replace(tmp, final)
        return final
    finally:
        tmp.unlink(missing_ok=True)
