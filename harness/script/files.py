"""The declared inputs and outputs of a `harness run`: hashed, collected into the run
directory, and compared byte for byte (tensor by tensor for a state dict or safetensors
file) when a replay asks whether a re-run produced the same files.

Inputs are hashed by the launcher before the command starts (a directory: every file in
it, by relative path); outputs by the runner after it ended, from copies kept in
RUN_DIR/outputs/ (the command may overwrite its own files later, or run again in a replay).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness import hash_cache
from harness.digest import file_sha256
from harness.errors import ConfigError, DataError, RunFailed
from harness.rundir import OUTPUTS

TENSOR_FILES = (".pt", ".pth", ".safetensors")


def hash_input(path: Path) -> Dict[str, Any]:
    """sha256 and size of a file; of a directory, over its files' relative paths and hashes.
    A file unchanged since it was last hashed is not read again (harness/hash_cache.py)."""
    if path.is_file():
        return {"sha256": hash_cache.digest(path, "sha256", file_sha256),
                "bytes": path.stat().st_size}
    return hash_cache.tree_summary(path, "sha256", file_sha256, tree_summary)


def tree_summary(files: List[Tuple[str, int, str]]) -> Dict[str, Any]:
    """A directory's sha256 over its files' relative paths and hashes, bytes and count."""
    digest = hashlib.sha256()
    for relative, _, sha in files:
        digest.update(f"{relative}\0{sha}\n".encode())
    return {"sha256": digest.hexdigest(), "bytes": sum(size for _, size, _ in files),
            "files": len(files)}


def hash_inputs(paths: List[str], workdir: Path) -> Dict[str, Dict[str, Any]]:
    """Each declared input (relative to `workdir`) hashed; a missing one is a DataError."""
    hashed = {}
    for name in paths:
        path = workdir / name
        if not path.exists():
            raise DataError(f"--input {name}: no such file or directory (looked in {workdir}). "
                            f"Create it or fix the path.")
        hashed[name] = hash_input(path)
    return hashed


def command_files(argv: List[str], workdir: Path, output_patterns: List[str]) -> List[str]:
    """The command's own files in the working directory (train.py in `python train.py`, a
    ./job.sh, a config file it is given): arguments that name an existing file there and are
    not declared outputs. They are hashed like inputs, so an edited script is seen before a
    replay runs it. An interpreter named by path (/usr/bin/python3) is not one of them."""
    found = []
    for index, arg in enumerate(argv):
        if index == 0 and "/" not in arg:
            continue  # an executable found on PATH, not a file of the project
        path = os.path.normpath(os.path.join(workdir, arg))
        inside = os.path.relpath(path, workdir)
        if inside.startswith(os.pardir) or not os.path.isfile(path):  # never raises
            continue
        if any(fnmatch.fnmatch(inside, p) or inside.startswith(p.rstrip("/") + "/")
               for p in output_patterns):
            continue  # written by the command, not read
        if arg not in found:
            found.append(arg)
    return found


def check_changed(recorded: Dict[str, Dict[str, Any]], workdir: Path, run_id: str,
                  what: str = "input") -> None:
    """Refuse (DataError) when an input of the run (or a file it imported: `what`) differs
    from what it was."""
    for name, was in recorded.items():
        path = workdir / name
        if not path.exists():
            raise DataError(f"{what} {name} of run {run_id} is missing here (looked in "
                            f"{workdir}); restore it, or replay from the directory the run "
                            f"was started in.")
        now = hash_input(path)
        if now["sha256"] != was["sha256"]:
            raise DataError(f"{what} {name} changed since run {run_id}: sha256 "
                            f"{was['sha256']} then, {now['sha256']} now. Restore the file "
                            f"the run used (replay proves only the same inputs and code).")


def check_command_unchanged(script: Dict[str, Any], workdir: Path, run_id: str) -> None:
    """A command run's inputs, and every file its processes imported, as they were."""
    check_changed(script["inputs"], workdir, run_id)
    check_changed(script.get("imported") or {}, workdir, run_id, what="imported file")


def check_output_patterns(patterns: List[str]) -> None:
    for pattern in patterns:
        parts = Path(pattern).parts
        if os.path.isabs(pattern) or ".." in parts or not parts:
            raise ConfigError(f"--output {pattern}: outputs are paths (or globs) inside the "
                              f"working directory, e.g. out/model.pt or 'out/*.json'.")


def output_dirs(patterns: List[str], workdir: Path) -> List[str]:
    """The top-level directories the outputs are written under (a container gets these
    writable, the rest of the project read-only); '' for a file at the top level. A
    pattern that is a directory already (`--output out`) is its own top."""
    tops = set()
    for pattern in patterns:
        parts = Path(pattern).parts
        if len(parts) > 1 or (workdir / pattern).is_dir():
            tops.add(parts[0])
        else:
            tops.add("")
    return sorted(tops)


def check_container_outputs(patterns: List[str], inputs: List[str], workdir: Path) -> None:
    """What a container needs of outputs: each inside a directory named without a glob,
    and no input inside one (that directory starts empty there, backed by the run)."""
    tops = output_dirs(patterns, workdir)
    if "" in tops:
        raise ConfigError("in a container the working directory is read-only and only the "
                          "directories outputs go to are writable: declare outputs inside a "
                          "directory (e.g. --output out/model.pt, not --output model.pt).")
    for top in tops:
        if glob.has_magic(top):
            raise ConfigError(f"--output: the top directory {top!r} is a glob; in a container "
                              f"each output directory is mounted by name: name it "
                              f"(out/*.pt, not */model.pt).")
        for name in inputs:
            if Path(name).parts and Path(name).parts[0] == top:
                raise ConfigError(f"--input {name} is inside {top}/, where outputs go: in a "
                                  f"container {top}/ starts empty (it is the run's output "
                                  f"directory). Keep inputs outside the output directories.")


def move_aside(patterns: List[str], workdir: Path, keep: List[str], destination: Path,
               runs_dir: Path) -> List[str]:
    """Move what the declared outputs match before the command starts (an earlier run's
    files) into `destination`, so the command starts without them: a script that resumes
    from its own snapshot.pt would otherwise go on from the earlier run's, and a replay from
    the original's. Declared inputs (and files under them), the runs directory and hidden
    directories (.git, .harness) stay. Returns the names moved."""
    kept = [os.path.realpath(workdir / name) for name in keep] + [os.path.realpath(runs_dir)]
    moved = []
    for name in _matches(patterns, workdir):
        real = os.path.realpath(workdir / name)
        if any(real == k or real.startswith(k + os.sep) for k in kept) or \
                any(part.startswith(".") for part in Path(name).parts[:-1]):
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.move(str(workdir / name), str(target))
        except OSError as exc:
            raise RunFailed(f"declared output {name} exists from before the run and cannot be "
                            f"moved aside to {target} ({exc.strerror}): delete it, or make it "
                            f"writable, and run again.") from None
        moved.append(name)
    return moved


def snapshot(patterns: List[str], workdir: Path) -> Dict[str, Tuple[int, int]]:
    """(mtime_ns, size) of what the patterns match before the command runs."""
    return {name: _stamp(workdir / name) for name in _matches(patterns, workdir)}


def _stamp(path: Path) -> Tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _matches(patterns: List[str], workdir: Path) -> List[str]:
    names = set()
    for pattern in patterns:
        names |= set(_match(pattern, workdir))
    return sorted(names)


def _match(pattern: str, workdir: Path) -> List[str]:
    found = []
    for name in glob.glob(pattern, root_dir=workdir, recursive=True):
        path = workdir / name
        if path.is_dir():
            found += [str(p.relative_to(workdir)) for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            found.append(os.path.normpath(name))
    return found


def collect(patterns: List[str], workdir: Path, run_dir: Path,
            before: Dict[str, Tuple[int, int]]) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """Copy what the patterns match into RUN_DIR/outputs/ and hash it. Returns (files,
    warnings); a pattern that matches nothing fails the run."""
    empty = [p for p in patterns if not _match(p, workdir)]
    if empty:
        raise RunFailed(f"declared output(s) {', '.join(empty)} matched no file in {workdir} "
                        f"after the command ended: check the path, or that the command wrote "
                        f"it.")
    files, warnings = {}, []
    for name in _matches(patterns, workdir):
        source, kept = workdir / name, run_dir / OUTPUTS / name
        unwritten = before.get(name) == _stamp(source)
        if unwritten:
            warnings.append(f"output {name} was not written by this run (unchanged since "
                            f"before the command started): a replay does not count it")
        kept.parent.mkdir(parents=True, exist_ok=True)
        if not (kept.exists() and os.path.samefile(source, kept)):
            shutil.copy2(source, kept)
        files[name] = {"sha256": file_sha256(kept), "bytes": kept.stat().st_size,
                       **({"unwritten": True} if unwritten else {})}
    return files, warnings


# ---------------------------------------------------------------- comparison


def compare(a_dir: Path, b_dir: Path, a_files: Dict[str, Dict[str, Any]],
            b_files: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Every declared output of two runs, byte for byte; for differing tensor files the
    first differing tensor and its largest absolute difference. A file that one of the runs
    did not write (left from before it started) proves nothing when it matches: it is
    listed in `unwritten`, not counted in `outputs_compared`."""
    differing: List[Dict[str, Any]] = []
    unwritten: List[str] = []
    for name in sorted(set(a_files) | set(b_files)):
        a, b = a_files.get(name), b_files.get(name)
        if a is None or b is None:
            differing.append({"file": name, "missing_in": "a" if a is None else "b"})
        elif a["sha256"] != b["sha256"]:
            entry: Dict[str, Any] = {"file": name, "sha256": [a["sha256"], b["sha256"]]}
            if name.endswith(TENSOR_FILES):
                entry["tensor"] = first_tensor_difference(
                    a_dir / OUTPUTS / name, b_dir / OUTPUTS / name)
            else:
                entry.update(first_byte_difference(
                    a_dir / OUTPUTS / name, b_dir / OUTPUTS / name))
            differing.append(entry)
        elif a.get("unwritten") or b.get("unwritten"):
            unwritten.append(name)
    compared = len(set(a_files) | set(b_files)) - len(unwritten)
    return {"outputs_compared": compared, "differing": differing, "unwritten": unwritten}


def compare_console(a_dir: Path, b_dir: Path, a: Optional[Dict[str, Any]],
                    b: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """What two runs of a command printed (results.console), byte for byte, with the first
    differing line; None when either run has no record or printed nothing (nothing to
    compare)."""
    if not a or not b or not (a["bytes"] or b["bytes"]):
        return None
    report: Dict[str, Any] = {"equal": a["sha256"] == b["sha256"],
                              "bytes": [a["bytes"], b["bytes"]]}
    if not report["equal"]:
        from harness.rundir import SCRIPT_CONSOLE, SCRIPT_REPORTS

        lines = [(d / SCRIPT_REPORTS / SCRIPT_CONSOLE).read_bytes().decode(
            errors="replace").splitlines() if (d / SCRIPT_REPORTS / SCRIPT_CONSOLE).is_file()
            else [] for d in (a_dir, b_dir)]
        for number, (x, y) in enumerate(zip(lines[0] + [""] * len(lines[1]),
                                            lines[1] + [""] * len(lines[0])), 1):
            if x != y:
                report["first_difference"] = {"line": number, "a": x[:200], "b": y[:200]}
                break
    return report


# What a date or time looks like inside a file: ISO 8601 and its relatives, a PDF date
# (D:20261207...), an HTTP/ctime date, a time of day, a Unix time of this century.
DATE_PATTERNS = (
    rb"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?", rb"D:\d{12}", rb"\d{8}T?\d{6}",
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun),? [\d ]\d? ?\w{3}", rb"\d{2}:\d{2}:\d{2}",
    rb"\b1[6-9]\d{8}(\.\d+)?\b",
)


def first_byte_difference(a_path: Path, b_path: Path, context: int = 24) -> Dict[str, Any]:
    """Where two files first differ: the offset, the bytes around it in each, and, when
    those bytes form a date or time in both, `looks_like_date` (the file embeds when it was
    written: a PDF's /CreationDate, a timestamp in a log or archive header)."""
    if not (a_path.is_file() and b_path.is_file()):
        return {}  # a copied run without its kept outputs: the hashes say enough
    with open(a_path, "rb") as a_file, open(b_path, "rb") as b_file:
        offset = 0
        while True:
            a, b = a_file.read(1 << 20), b_file.read(1 << 20)
            size = min(len(a), len(b))
            at = next((i for i in range(size) if a[i] != b[i]), None) if a[:size] != b[:size] \
                else None
            if at is not None or not a or not b or len(a) != len(b):
                offset += at if at is not None else size
                break
            offset += size
    windows = []
    for path in (a_path, b_path):
        with open(path, "rb") as handle:
            handle.seek(max(0, offset - context))
            windows.append(handle.read(2 * context))
    return _described(offset, windows, context)


def _described(offset: int, windows: List[bytes], context: int) -> Dict[str, Any]:
    found = {"first_differing_byte": offset,
             "around": [w.decode("latin-1") for w in windows]}
    if all(_has_date(w, min(offset, context)) for w in windows):
        found["looks_like_date"] = True
    return found


def _has_date(window: bytes, at: int) -> bool:
    """A date or time in `window` that covers the byte at `at`."""
    import re

    return any(match.start() <= at < match.end() for pattern in DATE_PATTERNS
               for match in re.finditer(pattern, window))


def first_tensor_difference(a_path: Path, b_path: Path) -> Optional[Dict[str, Any]]:
    """The first tensor (in key order) that differs between two state dicts, with its max
    abs difference; None when the files hold no comparable tensors."""
    a, b = _tensors(a_path), _tensors(b_path)
    if a is None or b is None:
        return None
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            return {"name": key, "missing_in": "a" if key not in a else "b"}
        x, y = a[key], b[key]
        if x.shape != y.shape:
            return {"name": key, "shapes": [list(x.shape), list(y.shape)]}
        if not x.equal(y):
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() \
                else None
            return {"name": key, "max_abs_diff": diff}
    return None


def _tensors(path: Path) -> Optional[Dict[str, Any]]:
    """A flat name -> tensor mapping of a torch file or safetensors file, else None."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file: compared by bytes alone
        return None
    flat: Dict[str, Any] = {}
    _flatten(data, "", flat, torch)
    return flat or None


def _flatten(data: Any, prefix: str, flat: Dict[str, Any], torch) -> None:
    if isinstance(data, torch.Tensor):
        flat[prefix or "(tensor)"] = data
    elif isinstance(data, dict):
        for key, value in data.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), flat, torch)
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            _flatten(value, f"{prefix}.{index}" if prefix else str(index), flat, torch)


def render(report: Dict[str, Any]) -> str:
    unwritten = report.get("unwritten") or []
    not_counted = (f" Not counted: {len(unwritten)} file(s) that a run did not write "
                   f"({', '.join(unwritten[:5])}{' ...' if len(unwritten) > 5 else ''}).") \
        if unwritten else ""
    console = report.get("console")
    if not report["outputs_compared"] and console and console["equal"]:
        return (f"IDENTICAL: the command's console output ({console['bytes'][0]} bytes, "
                f"stdout and stderr) matches byte for byte. No declared output file was "
                f"compared: declare the files it writes (--output) to compare its results, "
                f"not only what it printed." + not_counted)
    if not report["outputs_compared"] and console:
        first = console.get("first_difference") or {}
        return (f"DIVERGED: the command's console output differs (no declared output file "
                f"was compared): first at line {first.get('line')}:\n  a: {first.get('a')!r}"
                f"\n  b: {first.get('b')!r}" + not_counted)
    if not report["outputs_compared"]:
        return ("UNVERIFIED: no declared output file was written by both runs, and the "
                "command printed nothing, so nothing was compared (an IDENTICAL verdict here "
                "would be about nothing)." + not_counted)
    if not report["differing"]:
        return (f"IDENTICAL: all {report['outputs_compared']} declared output file(s) written "
                f"by both runs match byte for byte." + not_counted)
    lines = [f"DIVERGED: {len(report['differing'])} of {report['outputs_compared']} declared "
             f"output file(s) differ:"]
    for entry in report["differing"]:
        if "missing_in" in entry:
            lines.append(f"  {entry['file']}: missing in run {entry['missing_in']}")
            continue
        a, b = entry["sha256"]
        line = f"  {entry['file']}: sha256 {a[:16]}... vs {b[:16]}..."
        tensor = entry.get("tensor")
        if tensor and tensor.get("max_abs_diff") is not None:
            line += f"; first differing tensor {tensor['name']}, max abs difference " \
                    f"{tensor['max_abs_diff']:.3e}"
        elif tensor:
            line += f"; first differing tensor {tensor['name']}"
        elif "first_differing_byte" in entry:
            line += f"; first differing byte at {entry['first_differing_byte']}"
        if entry.get("looks_like_date"):
            around = [text.strip() for text in entry["around"]]
            line += (f"\n    the differing bytes form a date or time ({around[0]!r} vs "
                     f"{around[1]!r}): the file embeds when it was written. Write it with "
                     f"the date from SOURCE_DATE_EPOCH (set for every command), or without "
                     f"one")
        lines.append(line)
    return "\n".join(lines)
