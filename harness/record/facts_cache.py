"""The environment capture (harness/record/facts.py), remembered so that a replay does not start a
child that imports torch every time: that child was most of replay's fixed cost (about 3 s
of 3.5 s on a 2-core AMD EPYC).

What a capture reports is decided by the interpreter, the packages it finds, the
environment variables it starts with, the machine, the determinism settings it applies and
the harness's own code. A remembered capture is used only when all of these are what they
were when it was taken:

- the key: the harness source, the interpreter's path, the working directory (it is on the
  child's sys.path), the child's environment variables (all but the shell's bookkeeping,
  VOLATILE), the determinism settings, /proc/cpuinfo without its clock speeds, the kernel
  and host name, the CPUs this process may use, the NVIDIA driver's description of each
  GPU and NVML's view of them (count, models, MIG modes);
- the stamps: (device, inode, size, mtime_ns, ctime_ns) of the interpreter, of every
  directory on the child's sys.path, of every package's METADATA there, of its .pth files
  and top-level modules (sitecustomize.py, single-file packages), and of torch's version
  file and native libraries. Installing, upgrading or removing a
  package replaces its METADATA; ctime cannot be set back, so `touch` cannot fake an
  unchanged file (as in harness/hash_cache.py).

A replay also checks the capture it used against the lock its own training process wrote
(replay.py): a difference drops the entry and is reported. HARNESS_REHASH=1 ignores the
cache. Entries live in $XDG_CACHE_HOME/harness/captures/, one JSON file per key, the
newest KEEP kept. The cache is an optimisation only: an entry that cannot be read or
written is a miss.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.digest import canonical_sha256
from harness.env import REHASH
from harness.hash_cache import FRESH_S, stamp
from harness.host import gpu

KEEP = 50
WATCHED = "_watched"  # the stamps a capture child reports beside its facts

# Set by the shell for its own bookkeeping, different from one terminal to the next; no
# training process reads them. Every other variable is part of the key.
VOLATILE = frozenset({
    "_", "PWD", "OLDPWD", "SHLVL", "TERM", "COLORTERM", "COLUMNS", "LINES", "PS1", "PS2",
    "PROMPT_COMMAND", "HISTFILE", "HISTSIZE", "HISTFILESIZE", "HISTCONTROL", "LS_COLORS",
    "LESSOPEN", "LESSCLOSE", "MAIL", "DISPLAY", "WINDOWID", "TMUX", "TMUX_PANE", "STY",
    "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "SSH_AUTH_SOCK", "XDG_SESSION_ID",
    "TERM_PROGRAM", "TERM_PROGRAM_VERSION", "TERM_SESSION_ID",
})


def directory() -> Path:
    from harness.rundir import user_cache

    return user_cache() / "captures"


def key(det: Dict[str, Any], env: Dict[str, str]) -> str:
    """The key of a capture taken with `det` by a child started with `env` from here."""
    from harness.record.lockfile import harness_source_sha256

    return canonical_sha256({
        "harness_source": harness_source_sha256(),
        "interpreter": os.path.realpath(sys.executable),
        "cwd": os.getcwd(),
        "environment": {k: v for k, v in env.items() if k not in VOLATILE},
        "determinism": det,
        "cpuinfo": _read("/proc/cpuinfo", skip=("cpu MHz",)),
        "uname": list(platform.uname()),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "gpus": {path: _read(path) for path in sorted(
            glob.glob("/proc/driver/nvidia/gpus/*/information")
            + ["/proc/driver/nvidia/version"])},
        # NVML's own view (no torch): the GPU count, models, MIG modes and driver, which
        # can change (MIG, CUDA_VISIBLE_DEVICES aside) without the files above changing.
        "nvml": gpu.capture(sm_from_torch=False),
    })


def watched_stamps() -> List[List[Any]]:
    """[path, stamp] of everything on this process's sys.path that decides a capture (run
    inside the capture child, before it captures: a change during the capture then shows
    as a different stamp)."""
    paths = [os.path.realpath(sys.executable)]
    for entry in sys.path:
        root = os.path.abspath(entry or ".")
        if not os.path.isdir(root):
            continue
        paths.append(root)
        paths += sorted(glob.glob(os.path.join(root, "*.dist-info", "METADATA")))
        paths += sorted(glob.glob(os.path.join(root, "*.egg-info", "PKG-INFO")))
        paths += sorted(glob.glob(os.path.join(root, "*.pth")))
        paths += sorted(glob.glob(os.path.join(root, "*.py")))  # sitecustomize, pynvml, ...
        paths += sorted(glob.glob(os.path.join(root, "*.so")))
        torch_dir = os.path.join(root, "torch")
        if os.path.isdir(torch_dir):
            paths += sorted(glob.glob(os.path.join(torch_dir, "version.py")))
            paths += sorted(glob.glob(os.path.join(torch_dir, "_C*.so")))
            paths += sorted(glob.glob(os.path.join(torch_dir, "lib", "*")))
    return [[path, _stamp(path)] for path in paths]


def lookup(cache_key: str) -> Optional[Dict[str, Any]]:
    """The capture remembered under `cache_key`, if every stamp it watched is unchanged."""
    if os.environ.get(REHASH) == "1":
        return None
    try:
        entry = json.loads((directory() / f"{cache_key}.json").read_text())
        watched, facts = entry[WATCHED], entry["facts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(_stamp(path) != stamp for path, stamp in watched):
        return None
    return facts


def remember(cache_key: str, facts: Dict[str, Any], watched: List[List[Any]]) -> None:
    """Keep a capture, unless a watched file changed within FRESH_S of now (an edit in the
    same timestamp tick would not show in its stamp)."""
    from harness.rundir import atomic_write_text

    recent = time.time_ns() - int(FRESH_S * 1e9)
    if any(stamp is None or max(stamp[3], stamp[4]) > recent for _, stamp in watched):
        return
    try:
        directory().mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory() / f"{cache_key}.json",
                          json.dumps({WATCHED: watched, "facts": facts}, sort_keys=True))
        _prune()
    except OSError:
        pass  # an optimisation only: the next replay captures again


def forget(cache_key: str) -> None:
    try:
        (directory() / f"{cache_key}.json").unlink()
    except OSError:
        pass


def _prune() -> None:
    entries = sorted(directory().glob("*.json"), key=lambda p: p.stat().st_mtime,
                     reverse=True)
    for stale in entries[KEEP:]:
        stale.unlink(missing_ok=True)


def _stamp(path: str) -> Optional[List[int]]:
    """hash_cache's stamp, as the list it is once read back from JSON; None when gone."""
    try:
        return list(stamp(path))
    except OSError:
        return None


def _read(path: str, skip: tuple = ()) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(line for line in handle if not line.startswith(skip))
    except OSError:
        return None
