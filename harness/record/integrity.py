"""A run directory against its own lockfile.

`lock_sha256` proves that the lock was not damaged; it says nothing about the files beside
it, and anyone can recompute it. So before a replay re-runs anything (and in `harness lock
check`), the files the run left are re-hashed and re-read and held against the lock's
`results`: the final weights, every step of metrics.jsonl, the evaluation, a command's
declared outputs. A swapped model.pt, an edited or truncated metrics.jsonl, or results
edited and resealed are refused here (LockfileError, exit 5), naming the field and both
values, instead of surfacing later as a wrong verdict ("IDENTICAL", or "DIVERGED at step
None").

The weights digest needs torch. The training process that wrote model.pt remembers it for
those exact bytes (hash_cache.derived, keyed by the file's sha256), so a check here needs
only to hash the file. Where it is not known (a run copied from elsewhere, a lock from
before), the caller hands it in: replay gets it from its capture child, which imports torch
anyway, so this module stays torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness import hash_cache, rundir
from harness.digest import canonical_sha256, file_sha256
from harness.errors import LockfileError, ReplayRefused
from harness.record import metrics, op_trace

WEIGHTS_KIND = "weights_sha256"  # the derived value remembered per model.pt content


def weights_digest(run_dir: Path) -> Optional[str]:
    """weights_sha256 of the run's model.pt (imports torch), None when there is none;
    remembered for the file's content when it was unchanged while read."""
    import torch

    from harness.digest import weights_sha256

    path = Path(run_dir) / rundir.WEIGHTS
    if not path.is_file():
        return None
    before = hash_cache.stamp(path)
    content = model_file_sha256(run_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a mismatch, said below
        return f"unreadable ({type(exc).__name__})"
    if not isinstance(state, dict):
        return f"unreadable (a {type(state).__name__}, not a state dict)"
    digest = weights_sha256(state)
    if content is not None and hash_cache.stamp(path) == before:
        hash_cache.remember_derived(WEIGHTS_KIND, content, digest)
    return digest


def model_file_sha256(run_dir: Path) -> Optional[str]:
    path = Path(run_dir) / rundir.WEIGHTS
    return hash_cache.digest(path, "sha256", file_sha256) if path.is_file() else None


def known_weights_digest(run_dir: Path) -> Optional[str]:
    """model.pt's weights digest as computed before for these exact bytes (by the training
    process that wrote them, or an earlier check), without torch; None when not known."""
    content = model_file_sha256(run_dir)
    return hash_cache.derived(WEIGHTS_KIND, content) if content else None


def needs_weights_digest(run_dir: Path, lock: Dict[str, Any]) -> bool:
    """Whether checking this run's model.pt needs weights_digest (torch): its digest is not
    known for the file's content."""
    return "weights_sha256" in (lock.get("results") or {}) and \
        (Path(run_dir) / rundir.WEIGHTS).is_file() and known_weights_digest(run_dir) is None


def mismatches(run_dir: Path, lock: Dict[str, Any],
               weights_sha256: Optional[str] = None) -> List[str]:
    """Where the run directory's files disagree with the lock's results, one line each:
    `field: the lock says A, the run directory has B`. Empty when they agree. The weights
    are compared when their digest is given (weights_digest) or known for the file's
    content (known_weights_digest)."""
    results = lock.get("results") or {}
    if "outputs" in results:  # a `harness run` command: its declared outputs
        return _output_mismatches(Path(run_dir), results) + \
            _op_trace_mismatches(Path(run_dir), results)
    return _metrics_mismatches(Path(run_dir), results) + \
        _op_trace_mismatches(Path(run_dir), results) + \
        weights_mismatches(run_dir, lock, weights_sha256)


def weights_mismatches(run_dir: Path, lock: Dict[str, Any],
                       weights_sha256: Optional[str]) -> List[str]:
    """The weights part of `mismatches` alone: model.pt missing, or (given its digest, or
    knowing it) other weights than the lock's."""
    results = lock.get("results") or {}
    if "weights_sha256" not in results:
        return []
    if not (Path(run_dir) / rundir.WEIGHTS).is_file():
        return [_line("results.weights_sha256", results["weights_sha256"],
                      f"no {rundir.WEIGHTS}")]
    if weights_sha256 is None:
        weights_sha256 = known_weights_digest(run_dir)
    if weights_sha256 is not None and weights_sha256 != results.get("weights_sha256"):
        return [_line("results.weights_sha256", results.get("weights_sha256"),
                      f"{weights_sha256} (the weights in {rundir.WEIGHTS})")]
    return []


def check(run_dir: Path, lock: Dict[str, Any], weights_sha256: Optional[str] = None) -> None:
    """Refuse (LockfileError) a run directory whose files its lock does not describe."""
    refuse(run_dir, mismatches(run_dir, lock, weights_sha256))


def refuse(run_dir: Path, found: List[str]) -> None:
    """LockfileError listing `found` (mismatches), when there are any."""
    if found:
        raise LockfileError(
            f"the lockfile does not describe this run: {Path(run_dir).name}'s files disagree "
            f"with its lock's results in {len(found)} place(s):\n  " + "\n  ".join(found) +
            "\nA file of the run was replaced or damaged, or the lock's results were edited "
            "(and resealed). Nothing was run. Replay the run directory as the run left it: "
            "copy it again from where it came from.")


def refuse_unfinished(run_dir: Path) -> None:
    """A run without a lockfile that says why (failed, preempted, still running) is not a
    damaged lock: refuse with what the run's status says (ReplayRefused, exit 6)."""
    if (Path(run_dir) / rundir.LOCK).exists():
        return
    status = rundir.read_status(run_dir)
    state = status.get("state")
    if state in ("unknown", "succeeded"):
        return  # no status, or one that says a lock should be there: reported as missing
    error = (status.get("error") or {}).get("message") or status.get("reason")
    why = {"failed": f"it failed (exit {status.get('exit_code')}"
                     + (f": {error}" if error else "") + ")",
           "preempted": f"it was preempted before it finished; continue it with "
                        f"`harness train --resume {Path(run_dir).name}` first",
           "running": "it is still running; replay it when it has finished"}
    raise ReplayRefused(f"run {Path(run_dir).name} has nothing to replay: "
                        f"{why.get(state, f'its state is {state}')}. Only a run that "
                        f"finished writes the lockfile a replay starts from.")


# ---------------------------------------------------------------- the checks

def _line(field: str, locked: Any, found: Any) -> str:
    return f"{field}: the lock says {locked}, the run directory has {found}"


def _metrics_mismatches(run_dir: Path, results: Dict[str, Any]) -> List[str]:
    path = run_dir / rundir.METRICS
    if not path.is_file():
        return [_line("results.metrics_sha256", results.get("metrics_sha256"),
                      f"no {rundir.METRICS}")]
    found = []
    digest = file_sha256(path) if "metrics_sha256" in results else None
    if digest is not None and digest != results["metrics_sha256"]:
        found.append(_line("results.metrics_sha256", results["metrics_sha256"],
                           f"{digest} (sha256 of {rundir.METRICS})"))
    try:
        train, evaluation = metrics.read(run_dir)
    except (ValueError, UnicodeDecodeError) as exc:
        return found + [f"{rundir.METRICS}: not readable ({exc}): truncated or edited"]
    last = train[-1] if train else {}
    expected = {
        "results.steps": (results.get("steps"), len(train)),
        "results.final_loss_hex": (results.get("final_loss_hex"), last.get("loss_hex")),
        "results.final_loss": (results.get("final_loss"), _float(last.get("loss_hex"))),
        "results.test_accuracy": (results.get("test_accuracy"),
                                  (evaluation or {}).get("accuracy")),
        "results.test_loss_hex": (results.get("test_loss_hex"),
                                  (evaluation or {}).get("loss_hex")),
    }
    for field, (locked, on_disk) in expected.items():
        if field.split(".", 1)[1] in results and locked != on_disk:
            found.append(_line(field, json.dumps(locked), f"{json.dumps(on_disk)} (from "
                               f"{rundir.METRICS})"))
    return found


def _op_trace_mismatches(run_dir: Path, results: Dict[str, Any]) -> List[str]:
    """The op trace is the reference a diverged replay is explained against: an edited one
    would blame the wrong op. Its tensors (trainer.op_trace_tensors) are what
    --all-divergences gives the ops that differ: edited ones would hide a difference."""
    mismatches = []
    for key, name in op_trace.FILES:
        if key not in results:
            continue
        path = run_dir / name
        found = file_sha256(path) if path.is_file() else f"no {name}"
        if found != results[key]:
            mismatches.append(_line(f"results.{key}", results[key],
                                    f"{found} (sha256 of {name})" if path.is_file()
                                    else found))
    return mismatches


def _float(loss_hex: Optional[str]) -> Optional[float]:
    try:
        return float.fromhex(loss_hex) if loss_hex else None
    except (TypeError, ValueError):
        return None


def _output_mismatches(run_dir: Path, results: Dict[str, Any]) -> List[str]:
    found = []
    files = results["outputs"]
    if "outputs_sha256" in results and canonical_sha256(files) != results["outputs_sha256"]:
        found.append(_line("results.outputs_sha256", results["outputs_sha256"],
                           f"{canonical_sha256(files)} (over results.outputs)"))
    for name, entry in sorted(files.items()):
        kept = run_dir / rundir.OUTPUTS / name
        now = file_sha256(kept) if kept.is_file() else f"no {rundir.OUTPUTS}/{name}"
        if now != entry.get("sha256"):
            found.append(_line(f"results.outputs[{name}].sha256", entry.get("sha256"), now))
    return found
