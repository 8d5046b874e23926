"""What a command's Python processes ran: the files they imported from outside the
interpreter's own packages, and the packages of the interpreter itself.

Read inside each process by the injection (harness.script.injection.pinning), at exit,
from `sys.modules`: whatever started the process (`python main.py`, a shell, `make`, a job
script) and whichever interpreter it is (the harness's venv or the user's own), what it imported is
what it ran. The runner (harness.script.runner) merges the processes' reports into the lock:

- `script.imported`: each imported file, hashed like an input. Files under the interpreter's
  prefixes and site-packages, and the harness's own, are left out: the packages stand for
  them. Replay and resume refuse an edited one, naming it.
- `interpreters`: per interpreter, its Python version and its distributions, split into
  those the command `imported` (their code computed the result: a different version blocks
  a replay) and those merely `installed` beside them (informational).

This module is imported by interpreters other than the harness's own: standard library
only (and harness.digest, which is too), and nothing newer than Python 3.8 needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from harness.env import PREFIX

HARNESS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Directories of code that torch generates at run time (/tmp/torchinductor_USER/...):
# not the user's code, and gone on another machine.
GENERATED = ("torchinductor_", "torch_extensions", "triton")


# ---------------------------------------------------------------- inside the process


def system_roots() -> Tuple[str, ...]:
    """Directories whose files belong to the interpreter or its installed packages, or are
    generated (torch.compile's and torch extensions' caches, the user cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, HARNESS_DIR,
             cache, os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""),
             os.environ.get("TORCH_EXTENSIONS_DIR", ""), os.environ.get("TRITON_CACHE_DIR", "")}
    roots.update(sysconfig.get_paths().get(key, "") for key in
                 ("stdlib", "platstdlib", "purelib", "platlib"))
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # an old virtualenv's site module
        pass
    return tuple(sorted(os.path.join(os.path.realpath(r), "") for r in roots if r))


def module_files(modules: Iterable[Any], start_dir: str) -> List[str]:
    """The real paths of the modules' files that are not the interpreter's (the script
    itself, its sibling modules, a package on PYTHONPATH or installed in develop mode).
    The script is sys.argv[0]: by the time atexit runs, __main__ has lost its __file__."""
    roots = system_roots()
    found = set()
    # From the module's __dict__: getattr would load a lazily imported module.
    names = [(getattr(module, "__dict__", None) or {}).get("__file__")
             for module in list(modules)]
    for name in [*names, sys.argv[0] if sys.argv else None]:
        if not isinstance(name, str) or not name or name in ("-c", "-m", "-"):
            continue
        path = os.path.realpath(os.path.join(start_dir, name))
        if path.endswith(".pyc") and "__pycache__" not in path:
            continue  # a sourceless module: its bytes are in the package it came from
        generated = any(part.startswith(GENERATED) for part in Path(path).parts)
        if not path.startswith(roots) and not generated and os.path.isfile(path):
            found.add(path)
    return sorted(found)


def hashed_files(modules: Iterable[Any], start_dir: str) -> Dict[str, Dict[str, Any]]:
    from harness.digest import file_sha256

    hashed = {}
    for path in module_files(modules, start_dir):
        try:
            hashed[path] = {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}
        except OSError:
            continue  # removed while the process ran: nothing left to compare
    return hashed


def installed() -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """(distribution -> version, top-level module -> distributions) of this interpreter."""
    import importlib.metadata as metadata

    versions: Dict[str, str] = {}
    tops: Dict[str, List[str]] = {}
    for dist in metadata.distributions():
        name, version = name_and_version(dist)
        if not name or name in versions or name == "harness":
            continue  # the first on sys.path is the one imported; the harness is recorded
            # on its own (lock `harness`), wherever it was found
        versions[name] = version
        for top in _top_level_modules(dist):
            tops.setdefault(top, []).append(name)
    return dict(sorted(versions.items())), tops


def name_and_version(dist) -> Tuple[str, str]:
    """A distribution's Name (lower case, '' where it has none) and Version, read from the
    head of its metadata file. `dist.metadata` runs the email parser over the whole file,
    long description included: 0.19 s for this venv's 112 packages (0.44 s under load),
    most of the environment capture's time after torch's import."""
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the headers
        key, colon, value = line.partition(":")
        if colon and key in ("Name", "Version"):
            fields.setdefault(key, value.strip())
    return fields.get("Name", "").lower(), fields.get("Version") or dist.version


def _top_level_modules(dist) -> List[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return [line.strip() for line in text.splitlines() if line.strip()]
    names = set()
    for file in dist.files or ():
        parts = file.parts
        if len(parts) > 1 and not parts[0].endswith((".dist-info", ".egg-info", ".data")):
            names.add(parts[0])
        elif len(parts) == 1 and file.suffix in (".py", ".so", ".pyd"):
            names.add(file.name.split(".")[0])
    return sorted(names)


def interpreter(modules: Dict[str, Any], cache_dir: Optional[Path]) -> Dict[str, Any]:
    """This interpreter and its packages, split by whether `modules` imported them. The
    installed list is read once per interpreter and run (cached in `cache_dir`)."""
    versions, tops = _cached_installed(cache_dir)
    used = set()
    for name in list(modules):
        if "." not in name:
            used.update(tops.get(name, ()))
    imported = {name: versions[name] for name in sorted(used) if name in versions}
    facts = {"python": sys.executable, "version": platform.python_version(),
             "implementation": platform.python_implementation(), "imported": imported,
             "installed": {n: v for n, v in versions.items() if n not in imported}}
    torch = modules.get("torch")
    if torch is not None and getattr(torch, "version", None) is not None:
        facts["torch_cuda"] = getattr(torch.version, "cuda", None)
    return facts


def _cached_installed(cache_dir: Optional[Path]) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    key = hashlib.sha256(f"{sys.executable}\0{sys.prefix}".encode()).hexdigest()[:16]
    cache = cache_dir / f"interpreter-{key}.cache" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            versions, tops = json.loads(cache.read_text())
            return versions, tops
        except (OSError, ValueError):
            pass
    versions, tops = installed()
    if cache is not None:
        tmp = cache.with_name(f".{os.getpid()}.cache.tmp")
        try:
            tmp.write_text(json.dumps([versions, tops]))
            os.replace(tmp, cache)
        except OSError:
            pass
    return versions, tops


QUERY = ("import importlib.metadata as m, json, platform; print(json.dumps({'version': "
         "platform.python_version(), 'implementation': platform.python_implementation(), "
         "'packages': {(d.metadata.get('Name') or '').lower(): d.version "
         "for d in reversed(list(m.distributions())) if d.metadata.get('Name') not in "
         "(None, 'harness')}}))")
"""What `harness replay` runs with a recorded interpreter (`python -c QUERY`, from /, so
that none of the command's modules shadow the standard library) to read its version and
packages now, as the command will see them (PYTHONPATH and the user site included)."""


def query_env() -> Dict[str, str]:
    """This environment without the harness's own variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}


# ---------------------------------------------------------------- in the runner


def merge_files(reports: List[Dict[str, Any]], workdir: Path,
                already: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """Every process's imported files, by path relative to `workdir` where inside it
    (absolute elsewhere), leaving out those hashed already as inputs."""
    skip = {os.path.realpath(workdir / name) for name in already}
    root = os.path.join(os.path.realpath(workdir), "")
    merged: Dict[str, Dict[str, Any]] = {}
    for report in reports:
        for path, digest in (report.get("imported_files") or {}).items():
            if path in skip:
                continue
            name = os.path.relpath(path, root) if path.startswith(root) else path
            merged.setdefault(name, digest)
    return dict(sorted(merged.items()))


def merge_interpreters(reports: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per interpreter that ran (in the order its first process started), with
    every distribution any of its processes imported."""
    merged: Dict[str, Dict[str, Any]] = {}
    for report in reports:
        facts = report.get("interpreter")
        if not facts:
            continue
        entry = merged.setdefault(facts["python"], {**facts, "imported": {}})
        entry["imported"].update(facts["imported"])
        if facts.get("torch_cuda") is not None:
            entry["torch_cuda"] = facts["torch_cuda"]
    for entry in merged.values():
        entry["imported"] = dict(sorted(entry["imported"].items()))
        entry["installed"] = {n: v for n, v in sorted(entry["installed"].items())
                              if n not in entry["imported"]}
    return list(merged.values())


def current_interpreters(recorded: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The recorded interpreters as they are now (for the replay gate): each asked for its
    version and packages, split as the run split them. One that is gone has no packages."""
    import subprocess

    now = []
    for entry in recorded:
        facts: Dict[str, Any] = {"python": entry["python"]}
        try:
            found = json.loads(subprocess.run(
                [entry["python"], "-c", QUERY], capture_output=True, text=True, timeout=60,
                check=True, cwd="/", env=query_env()).stdout)
        except (OSError, subprocess.SubprocessError, ValueError):
            facts.update(version="(gone)", implementation="(gone)", imported={},
                         installed={})
            now.append(facts)
            continue
        packages = found["packages"]
        facts.update(version=found["version"], implementation=found["implementation"],
                     imported={n: packages[n] for n in entry["imported"] if n in packages},
                     installed={n: v for n, v in sorted(packages.items())
                                if n not in entry["imported"]})
        if "torch_cuda" in entry:
            facts["torch_cuda"] = entry["torch_cuda"]  # read with torch only; not re-asked
        now.append(facts)
    return now
