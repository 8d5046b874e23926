"""Hashes of plain data (canonical JSON), of tensors and of whole training states,
independent of pickle framing: equal contents give equal hashes whatever wrote them.
Shared by configs, lockfiles and image tags (canonical JSON), the training loop (weights
and per-step fingerprints) and checkpoints (integrity of everything a resume restores).

Torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict


def canonical_json(data: Any) -> str:
    """The one JSON form that hashes are computed over: sorted keys, no spaces."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def source_sha256(package: Path) -> str:
    """sha256 over a package's .py files, in path order, each as its relative path, NUL,
    and its bytes: the harness source hash of both the image content hash and the lockfile."""
    digest = hashlib.sha256()
    for path in sorted(Path(package).rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_blake3(path) -> str:
    """BLAKE3 of a file's bytes (one thread: its caller reads the file on another core)."""
    import blake3

    return blake3.blake3(max_threads=1).update_mmap(path).hexdigest()


def canonical_sha256(data: Any) -> str:
    """sha256 of `data`'s canonical JSON: configs, lockfiles, image content, facts."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def tensor_bytes(tensor) -> memoryview:
    """A tensor's values as raw bytes in row-major order, for a hash: a view of the
    tensor's own memory where it is a contiguous CPU tensor (copying it first made hashing
    a checkpoint take twice as long: 0.147 s against 0.068 s per 100 MB here). Lazy
    conjugate and negative views are resolved: their bytes are the values'."""
    import torch

    data = tensor.detach()
    if data.is_conj():
        data = data.resolve_conj()
    if data.is_neg():
        data = data.resolve_neg()
    flat = data.cpu().contiguous().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # one element with an odd stride: contiguous
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)  # yet not viewable
    return flat.view(torch.uint8).numpy().data


def tensor_digests(state: Dict[str, Any]) -> Dict[str, str]:
    """sha256 (first 16 hex digits) of each tensor's bytes: names the tensors that differ."""
    return {name: hashlib.sha256(tensor_bytes(t)).hexdigest()[:16]
            for name, t in sorted(state.items())}


def weights_sha256(state: Dict[str, Any]) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, raw bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def state_sha256(value: Any) -> str:
    """sha256 over a nested structure of dicts, lists, tuples, tensors and plain values
    (a checkpoint: model, optimizer, scheduler, RNG states, positions). Every value and
    its type is hashed, so one flipped bit anywhere changes the digest."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    import numpy as np
    import torch

    if isinstance(value, dict):
        digest.update(b"{%d|" % len(value))
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(b"[%d|" % len(value))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, torch.Tensor):
        digest.update(f"tensor|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(tensor_bytes(value))
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__}|{value!r}|".encode())
    elif isinstance(value, (np.ndarray, np.generic)):  # a user optimizer's or scheduler's
        array = np.ascontiguousarray(value)
        digest.update(f"ndarray|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    else:
        raise TypeError(f"cannot hash a {type(value).__name__} in a training state")
