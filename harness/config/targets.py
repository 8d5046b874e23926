"""Find every `_target_` of a config before launch, without importing it.

A `_target_` that does not import used to fail inside the training process, with a
traceback and a failed run directory left behind. Importing the targets in the launcher
would load torch and the user's code there; instead each dotted path is looked up the way
the import system would find it (importlib's PathFinder, which reads no module), and the
attribute after the last module is looked for in that module's source (definitions,
assignments and imports anywhere in it, so that names defined under `if` or `try` count).
Where the source cannot tell (a compiled module, `import *`, a module `__getattr__`), the
target is given the benefit of the doubt.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple


def problems(cfg: dict) -> List[str]:
    """One line per `_target_` that cannot be found, naming the key, the target and what is
    missing; empty when all are found."""
    search = search_path(cfg)
    found = []
    for key, target in targets_of(cfg):
        why = why_not_found(target, search)
        if why:
            found.append(f"{key}={target}: {why}")
    return found


def targets_of(node: Any, prefix: str = "") -> Iterator[Tuple[str, str]]:
    """(`key._target_`, dotted path) for every `_target_` in a nested config."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "_target_" and isinstance(value, str):
                yield path, value
            else:
                yield from targets_of(value, path)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from targets_of(value, f"{prefix}[{index}]")


def search_path(cfg: dict) -> List[str]:
    """Where the training process will look: this interpreter's path (PYTHONPATH included),
    the working directory (`python -m` puts it first) and, for containers, the directories
    `backend.docker.pythonpath` mounts."""
    docker_dirs = ((cfg.get("backend") or {}).get("docker") or {}).get("pythonpath") or []
    entries = [os.getcwd(), *sys.path, *(str(Path(d).expanduser()) for d in docker_dirs)]
    return [entry or os.getcwd() for entry in entries]


def why_not_found(target: str, search: List[str]) -> Optional[str]:
    parts = target.split(".")
    if not all(part.isidentifier() for part in parts):
        return "not a dotted Python path (module.Name)"
    spec = _find(parts[0], search)
    if spec is None:
        return f"no module named '{parts[0]}' on the Python path"
    depth = 1
    while depth < len(parts) and spec.submodule_search_locations is not None:
        child = _find(".".join(parts[: depth + 1]), list(spec.submodule_search_locations))
        if child is None:
            break
        spec, depth = child, depth + 1
    if depth == len(parts):
        return None  # the target is a module itself; Hydra will say if it cannot call it
    module, name = ".".join(parts[:depth]), parts[depth]
    if _may_define(spec, name):
        return None
    if spec.submodule_search_locations is not None:
        return f"package '{module}' ({spec.origin}) has no module or name '{name}'"
    return f"module '{module}' ({spec.origin}) defines no '{name}'"


def _find(name: str, search: List[str]) -> Optional[ModuleSpec]:
    if "." not in name and name in sys.builtin_module_names:
        return ModuleSpec(name, None, origin="built-in")
    try:
        spec = PathFinder.find_spec(name, search)
        if spec is None and "." not in name:
            # Finders beyond the path, e.g. an editable install's; for a top-level name
            # this imports nothing.
            spec = importlib.util.find_spec(name)
        return spec
    except (ImportError, ValueError):
        return None


def _may_define(spec: ModuleSpec, name: str) -> bool:
    """Whether the module's source defines, assigns or imports `name` (True when the source
    cannot tell)."""
    origin = spec.origin or ""
    if not origin.endswith(".py"):
        return True  # compiled, built-in or namespace package: cannot tell without importing
    try:
        tree = ast.parse(Path(origin).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return True  # the import itself will report it, in the training's log
    return name in _names_bound(tree) or _has_dynamic_names(tree)


def _names_bound(tree: ast.Module) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _has_dynamic_names(tree: ast.Module) -> bool:
    """`from x import *`, a module `__getattr__` or writes to globals(): anything goes."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return True
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "globals":
            return True
    return False
