"""File digests remembered across launches, so that a launch, replay or resume re-hashes
only the files that changed (a dataset's, a command's --input files).

A remembered digest is used only when the file's (device, inode, size, mtime_ns, ctime_ns)
are what they were when it was hashed. `touch -d` or `os.utime` can restore a file's
mtime after an edit, but not its ctime: the kernel sets ctime to now on every change,
and no call sets it back. So an edit with its mtime restored is still re-hashed and
refused. Two more guards, as git's index has them:
- a file whose mtime or ctime is within FRESH_S of the moment it was hashed is not
  remembered: an edit within the same timestamp tick would leave both unchanged;
- a file whose stat changed while it was being hashed is not remembered.

Beside the file digests, the same file keeps values derived from a file's content, keyed by
its sha256 (`derived`): the weights digest of a model.pt, which needs torch to compute, is
then known to a replay that only hashed the file.

A directory of many files is re-checked whole first (`tree_stamp`): find(1) stats every
file in C and the listing of their stamps is hashed. A directory whose listing is what it
was when all of its files were settled in the cache has the result it had then, with no
per-file work in Python; any other is checked file by file.

The cache is one SQLite file, $XDG_CACHE_HOME/harness/file-digests.sqlite (WAL, so two
launches at once share it). It is an optimisation only: when it cannot be opened or
written (a home directory on NFS, where WAL does not work), every file is hashed, as
before. HARNESS_REHASH=1 (and `harness data verify`) ignores it and hashes everything once
more. On a filesystem whose ctime follows a settable mtime (vfat, exFAT, some FUSE
mounts), the ctime argument does not hold: set HARNESS_REHASH=1 there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from harness.env import REHASH

FRESH_S = 2.0
Stamp = Tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


def cache_path() -> Path:
    from harness.rundir import user_cache

    return user_cache() / "file-digests.sqlite"


def stamp(path: Path) -> Stamp:
    return stamp_of(os.stat(path))


def stamp_of(st: os.stat_result) -> Stamp:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def digests(paths: Iterable[Path], kind: str, compute: Callable[[Path], str],
            rehash: bool = False) -> List[str]:
    """compute(path) for each path (its digest of `kind`), from the cache where the file is
    unchanged; the others (all of them with `rehash`) computed on every core (hashlib
    releases the GIL) and remembered."""
    paths = [Path(p) for p in paths]
    return _digests(paths, [os.path.realpath(p) for p in paths], [stamp(p) for p in paths],
                    kind, compute, rehash)[0]


def tree_digests(root: Path, kind: str, compute: Callable[[Path], str],
                 rehash: bool = False) -> List[Tuple[str, int, str]]:
    """(path relative to root, size, digest) of every file under the directory `root`, in
    the order of their paths' parts, as `sorted(root.rglob("*"))` lists them (files and
    links to files; real subdirectories, not linked ones). One stat per file and one cache
    query for the whole tree: a directory of many small files is re-checked at the speed of
    listing it."""
    return _tree_digests(Path(root), kind, compute, rehash)[0]


def tree_summary(root: Path, kind: str, compute: Callable[[Path], str],
                 summarize: Callable[[List[Tuple[str, int, str]]], Dict[str, Any]],
                 rehash: bool = False) -> Dict[str, Any]:
    """summarize(tree_digests(root, ...)), remembered for the directory's tree_stamp once
    every file in it is settled in the cache: an unchanged directory of a million files is
    then re-checked by one find(1) and one query."""
    rehash = rehash or os.environ.get(REHASH) == "1"
    stamp_now = tree_stamp(root)  # with rehash too: a full pass settles the tree
    kind_of_tree = f"tree:{kind}"
    if stamp_now is not None and not rehash:
        known = derived(kind_of_tree, stamp_now)
        if known is not None:
            return json.loads(known)
    files, settled = _tree_digests(root, kind, compute, rehash)
    summary = summarize(files)
    if settled and stamp_now is not None and tree_stamp(root) == stamp_now:
        remember_derived(kind_of_tree, stamp_now, json.dumps(summary))
    return summary


def _tree_digests(root: Path, kind: str, compute: Callable[[Path], str], rehash: bool
                  ) -> Tuple[List[Tuple[str, int, str]], bool]:
    root = Path(root)
    found = sorted(_walk(str(root), os.path.realpath(root), ""),
                   key=lambda entry: entry[0].split("/"))
    values, settled = _digests([os.path.join(root, rel) for rel, _, _ in found],
                               [name for _, name, _ in found], [st for _, _, st in found],
                               kind, compute, rehash, prefix=os.path.realpath(root) + os.sep)
    return [(rel, st[2], value) for (rel, _, st), value in zip(found, values)], settled


def tree_stamp(root: Path) -> Optional[str]:
    """sha256 of the stamps (device, inode, size, mtime and ctime in ns) of every file under
    the directory `root`, following links as the per-file walk reads them, or None where
    find(1) is missing or fails (a loop of links, an unreadable folder). Equal stamps mean
    unchanged files (the module's docstring says why). The tree is split into one part per
    core, each listed by its own find; a listing follows the directory order, so an
    unchanged tree lists the same, and a false difference costs only time."""
    find = shutil.which("find")
    if find is None:
        return None
    try:
        parts = _parts(str(root), os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=len(parts) or 1) as pool:
            listed = list(pool.map(lambda part: subprocess.run(
                [find, "-L", *part, "-type", "f", "-printf", "%p\\0%D %i %s %T@ %C@\\0"],
                cwd=root, capture_output=True, timeout=600), parts))
    except (OSError, subprocess.SubprocessError):
        return None
    if any(done.returncode != 0 for done in listed):
        return None
    digest = hashlib.sha256(os.path.realpath(root).encode() + b"\0")
    for done in listed:
        digest.update(done.stdout)
    return digest.hexdigest()


def _parts(root: str, cores: int) -> List[List[str]]:
    """The start points for find, relative to `root` and in sorted order, in about `cores`
    groups of consecutive points. A tree with few entries at its top is opened one level
    further (real directories only), so that one large folder is still split."""
    points = [f"./{name}" for name in sorted(os.listdir(root))]
    if len(points) < 4 * cores:
        opened = []
        for point in points:
            full = os.path.join(root, point)
            if os.path.isdir(full) and not os.path.islink(full):
                opened += [f"{point}/{name}" for name in sorted(os.listdir(full))] or [point]
            else:
                opened.append(point)
        points = opened
    size = -(-len(points) // cores) if points else 1
    return [points[i:i + size] for i in range(0, len(points), size)] or [["."]]


def _walk(directory: str, real: str, relative: str) -> List[Tuple[str, str, Stamp]]:
    """(relative path, real path, stamp) of the files under `directory` (whose real path is
    `real`), descending into real subdirectories only, as pathlib's rglob does."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            rel = f"{relative}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                found += _walk(entry.path, f"{real}/{entry.name}", rel + "/")
            elif entry.is_file():
                name = os.path.realpath(entry.path) if entry.is_symlink() \
                    else f"{real}/{entry.name}"
                found.append((rel, name, stamp_of(entry.stat())))
    return found


def _digests(paths: List, names: List[str], stamps: List[Stamp], kind: str,
             compute: Callable[[Path], str], rehash: bool,
             prefix: Optional[str] = None) -> Tuple[List[str], bool]:
    """(the digests, whether every one of them is now in the cache: none too fresh to be
    remembered, none changed while it was hashed)."""
    rehash = rehash or os.environ.get(REHASH) == "1"
    cache = _open()
    settled = cache is not None
    try:
        known = _lookup(cache, kind, names, stamps, prefix) \
            if cache is not None and not rehash else {}
        todo = [i for i in range(len(paths)) if i not in known]
        if todo:
            workers = min(len(todo), os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                computed = dict(zip(todo, pool.map(lambda i: compute(paths[i]), todo)))
            known.update(computed)
            if cache is not None:
                remembered = _remember(cache, kind, [(names[i], stamps[i], computed[i],
                                                      paths[i]) for i in todo])
                settled = settled and remembered == len(todo)
    finally:
        if cache is not None:
            cache.close()
    return [known[i] for i in range(len(paths))], settled


def digest(path: Path, kind: str, compute: Callable[[Path], str],
           rehash: bool = False) -> str:
    return digests([path], kind, compute, rehash)[0]


def derived(kind: str, source_sha256: str) -> Optional[str]:
    """A value of `kind` computed before from the bytes whose sha256 is `source_sha256`
    (the weights digest of a model.pt, say): a function of the content alone, so it needs
    no stamp. None when not known (or with HARNESS_REHASH=1)."""
    if os.environ.get(REHASH) == "1":
        return None
    cache = _open()
    if cache is None:
        return None
    try:
        row = cache.execute("SELECT value FROM derived WHERE kind = ? AND source_sha256 = ?",
                            (kind, source_sha256)).fetchone()
    except sqlite3.Error:
        row = None
    finally:
        cache.close()
    return row[0] if row else None


def remember_derived(kind: str, source_sha256: str, value: str) -> None:
    """Remember `value`, of `kind`, computed from the bytes whose sha256 is source_sha256."""
    cache = _open()
    if cache is None:
        return
    try:
        with cache:
            cache.execute("INSERT OR REPLACE INTO derived VALUES (?, ?, ?)",
                          (kind, source_sha256, value))
    except sqlite3.Error:
        pass  # not remembered: computed again next time
    finally:
        cache.close()


def _open() -> Optional[sqlite3.Connection]:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = sqlite3.connect(path, timeout=5)
        cache.execute("PRAGMA journal_mode=WAL")
        cache.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT, kind TEXT, dev INT, "
                      "ino INT, size INT, mtime_ns INT, ctime_ns INT, digest TEXT, "
                      "PRIMARY KEY (path, kind))")
        cache.execute("CREATE TABLE IF NOT EXISTS derived (kind TEXT, source_sha256 TEXT, "
                      "value TEXT, PRIMARY KEY (kind, source_sha256))")
    except (OSError, sqlite3.Error):
        return None  # no cache: everything is hashed
    return cache


def _lookup(cache: sqlite3.Connection, kind: str, names: List[str], stamps: List[Stamp],
            prefix: Optional[str] = None) -> Dict[int, str]:
    """Index -> remembered digest, for the files whose stamp is unchanged. With `prefix`
    (a directory's real path), its rows come in one range query."""
    found: Dict[int, str] = {}
    try:
        rows: Dict[str, tuple] = {}
        if prefix is not None:
            upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            rows = {row[0]: row[1:] for row in cache.execute(
                "SELECT path, dev, ino, size, mtime_ns, ctime_ns, digest FROM digests "
                "WHERE path >= ? AND path < ? AND kind = ?", (prefix, upper, kind))}
        for index, (name, now) in enumerate(zip(names, stamps)):
            row = rows.get(name)
            if row is None and (prefix is None or not name.startswith(prefix)):
                row = cache.execute("SELECT dev, ino, size, mtime_ns, ctime_ns, digest FROM "
                                    "digests WHERE path = ? AND kind = ?",
                                    (name, kind)).fetchone()
            if row is not None and tuple(row[:5]) == now:
                found[index] = row[5]
    except sqlite3.Error:
        return {}
    return found


def _remember(cache: sqlite3.Connection, kind: str,
              hashed: List[Tuple[str, Stamp, str, Path]]) -> int:
    """Remember the settled ones; how many were."""
    now_ns = time.time_ns()
    rows = []
    for name, before, value, path in hashed:
        try:
            after = stamp(path)
        except OSError:
            continue
        fresh = now_ns - max(after[3], after[4]) < FRESH_S * 1e9
        if after == before and not fresh:
            rows.append((name, kind, *after, value))
    try:
        with cache:
            cache.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              rows)
    except sqlite3.Error:
        return 0  # not remembered: hashed again next time
    return len(rows)
