"""`harness runs`: one line per run directory, from its status, lockfile, metrics and the
replay / verify records. Reads files only (no torch), so it is instant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from harness import rundir
from harness.errors import LockfileError
from harness.record import lockfile, metrics

COLUMNS = ("run", "config", "status", "backend", "steps", "final_loss", "accuracy",
           "weights", "replay")


def _read_optional(path: Path) -> Dict[str, Any]:
    try:
        return rundir.read_json(path)
    except (OSError, ValueError):
        return {}


def summary(run_dir: Path) -> Dict[str, Any]:
    status = rundir.read_status(run_dir)
    row: Dict[str, Any] = {"run": run_dir.name, "status": status.get("state", "unknown"),
                           "backend": status.get("backend")}
    try:
        lock = lockfile.read(run_dir / rundir.LOCK) if (run_dir / rundir.LOCK).exists() else {}
    except LockfileError:
        lock, row["status"] = {}, "lock damaged"
    results = lock.get("results", {})
    cfg_name = (lock.get("config") or {}).get("name") or _config_name(run_dir)
    row.update(config=cfg_name, steps=results.get("steps", metrics.train_steps(run_dir)),
               final_loss=results.get("final_loss"), accuracy=results.get("test_accuracy"),
               weights=(results.get("weights_sha256") or "")[:12] or None,
               replay_of=(lock.get("replay_of") or {}).get("run_id"),
               negative_control_of=(lock.get("negative_control_of") or {}).get("run_id"))
    row["backend"] = row["backend"] or (lock.get("backend") or {}).get("name")
    row["ranks"] = (lock.get("distributed") or {}).get("world_size", 1)
    script = lock.get("script") or _read_optional(run_dir / rundir.LAUNCH).get(
        "lock", {}).get("script")
    row["warnings"] = (script or {}).get("warnings", [])
    if script:  # a `harness run` command: its outputs stand where the weights do
        row.update(steps=None, weights=(results.get("outputs_sha256") or "")[:12] or None)
    replay = _read_optional(run_dir / rundir.REPLAY)
    row["replay_verdict"] = replay.get("verdict")
    verify = _read_optional(run_dir / rundir.VERIFY)
    row["verify"] = None if not verify else (
        "deterministic" if verify.get("deterministic") else "NOT deterministic")
    return row


def _config_name(run_dir: Path):
    for line in (run_dir / rundir.CONFIG).read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip()
    return None


def collect(runs_dir: Path) -> List[Dict[str, Any]]:
    """Summaries of every run; each original also lists the verdicts of its replays."""
    rows = [summary(path) for path in rundir.list_runs(runs_dir)]
    replays: Dict[str, List[str]] = {}
    for row in rows:
        if row["replay_of"]:
            replays.setdefault(row["replay_of"], []).append(row["replay_verdict"] or "?")
    for row in rows:
        row["replayed"] = replays.get(row["run"], [])
    return rows


def _replay_cell(row: Dict[str, Any]) -> str:
    parts = []
    if row["replay_of"]:
        parts.append(f"replay of {row['replay_of']}: {row['replay_verdict'] or '?'}")
    if row["negative_control_of"]:
        parts.append(f"negative control of {row['negative_control_of']} (one bit flipped)")
    if row["replayed"]:
        counts = {v: row["replayed"].count(v) for v in sorted(set(row["replayed"]))}
        parts.append("replayed: " + ", ".join(f"{v} x{n}" for v, n in counts.items()))
    if row["verify"]:
        parts.append(f"verify: {row['verify']}")
    if row["warnings"]:
        more = f" (+{len(row['warnings']) - 1} more)" if len(row["warnings"]) > 1 else ""
        parts.append(f"warning: {row['warnings'][0]}{more}")
    return "; ".join(parts) or "-"


def cells(rows: List[Dict[str, Any]]) -> List[List[str]]:
    """The table's text, row by row, in COLUMNS order."""

    def cell(value, fmt="{}"):
        return "-" if value is None else fmt.format(value)

    def backend(row):  # a data-parallel run: "local ×2"
        ranks = row.get("ranks", 1)
        return cell(row["backend"]) + (f" ×{ranks}" if ranks > 1 else "")

    lines = [[r["run"], cell(r["config"]), r["status"], backend(r), cell(r["steps"]),
              cell(r["final_loss"], "{:.4f}"), cell(r["accuracy"], "{:.4f}"),
              cell(r["weights"]), _replay_cell(r)] for r in rows]
    return lines


def to_json(rows: List[Dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, sort_keys=True)
