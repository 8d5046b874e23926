"""Bitwise comparison of two runs of the same config: loss bits at every step, parameter
digests at every fingerprint step, final weights. Produces the divergence report that
`harness replay` and `harness verify` print and record.

Only the weight distances need torch (to read model.pt); it is imported there alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from harness import rundir
from harness.record import metrics

IDENTICAL = "IDENTICAL"
DIVERGED = "DIVERGED"
UNVERIFIED = "UNVERIFIED"  # nothing real was compared: no verdict either way


def _first_differences(train_a, train_b) -> Dict[str, Any]:
    first_loss = first_params = None
    tensors: List[str] = []
    fingerprints = 0
    for ra, rb in zip(train_a, train_b):
        if first_loss is None and ra["loss_hex"] != rb["loss_hex"]:
            first_loss = {"step": ra["step"], "a": ra["loss_hex"], "b": rb["loss_hex"]}
        if "params" in ra and "params" in rb:
            fingerprints += 1
            if first_params is None and ra["params"] != rb["params"]:
                first_params = ra["step"]
                tensors = [name for name in ra["params"]
                           if ra["params"][name] != rb["params"].get(name)]
        if first_loss and first_params:
            break
    return {"first_loss": first_loss, "first_params_step": first_params,
            "first_tensors": tensors, "fingerprints_compared": fingerprints}


def weight_distances(a_dir: Path, b_dir: Path) -> Dict[str, float]:
    """max |a - b| per tensor of the two model.pt files, for the tensors that differ."""
    import torch

    a = torch.load(Path(a_dir) / rundir.WEIGHTS, map_location="cpu", weights_only=True)
    b = torch.load(Path(b_dir) / rundir.WEIGHTS, map_location="cpu", weights_only=True)
    out = {}
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name].shape != b[name].shape:
            out[name] = float("inf")
        elif not torch.equal(a[name], b[name]):
            out[name] = float((a[name].double() - b[name].double()).abs().max())
    return out


def compare_runs(a_dir: Path, b_dir: Path, lock_a: Dict[str, Any],
                 lock_b: Dict[str, Any]) -> Dict[str, Any]:
    """The comparison report (plain data: it is written to replay.json / verify.json)."""
    train_a, eval_a = metrics.read(a_dir)
    train_b, eval_b = metrics.read(b_dir)
    found = _first_differences(train_a, train_b)
    candidates = []
    if found["first_loss"]:
        candidates.append(found["first_loss"]["step"])
    if found["first_params_step"]:
        candidates.append(found["first_params_step"])
    if len(train_a) != len(train_b):
        candidates.append(min(len(train_a), len(train_b)) + 1)
    sha_a = lock_a.get("results", {}).get("weights_sha256")
    sha_b = lock_b.get("results", {}).get("weights_sha256")
    eval_equal = (eval_a or {}).get("loss_hex") == (eval_b or {}).get("loss_hex") and \
        (eval_a or {}).get("accuracy") == (eval_b or {}).get("accuracy")
    identical = not candidates and sha_a == sha_b and eval_equal
    report = {
        "verdict": IDENTICAL if identical else DIVERGED,
        "a": Path(a_dir).name, "b": Path(b_dir).name,
        "steps": [len(train_a), len(train_b)],
        "fingerprints_compared": found["fingerprints_compared"],
        "first_diverging_step": min(candidates) if candidates else None,
        "first_loss_difference": found["first_loss"],
        "first_param_difference_step": found["first_params_step"],
        "first_differing_tensors": found["first_tensors"],
        "weights_sha256": [sha_a, sha_b],
        "eval_equal": eval_equal,
        "max_abs_diff": {},
    }
    if sha_a != sha_b:
        report["max_abs_diff"] = weight_distances(a_dir, b_dir)
    return report


def compare_outputs(a_dir: Path, b_dir: Path, lock_a: Dict[str, Any],
                    lock_b: Dict[str, Any]) -> Dict[str, Any]:
    """The comparison report of two runs of a command (`harness run`): their declared
    outputs, byte for byte."""
    from harness.script import files

    found = files.compare(Path(a_dir), Path(b_dir), lock_a["results"]["outputs"],
                            lock_b["results"]["outputs"])
    if not found["outputs_compared"]:  # no file compared: what the command printed, if any
        found["console"] = files.compare_console(
            Path(a_dir), Path(b_dir), lock_a["results"].get("console"),
            lock_b["results"].get("console"))
    console = found.get("console")
    if found["differing"] or (console and not console["equal"]):
        verdict = DIVERGED
    elif found["outputs_compared"] or console:
        verdict = IDENTICAL
    else:
        verdict = UNVERIFIED  # neither a file nor printed output: nothing compared
    return {"verdict": verdict, "kind": "outputs",
            "a": Path(a_dir).name, "b": Path(b_dir).name, **found}


def render(report: Dict[str, Any]) -> str:
    """The human verdict: one line for IDENTICAL; where and how far for DIVERGED."""
    if report.get("kind") == "outputs":
        from harness.script import files

        return files.render(report)
    steps_a, steps_b = report["steps"]
    if report["verdict"] == IDENTICAL:
        return (f"IDENTICAL: {steps_a} steps of loss bits, {report['fingerprints_compared']} "
                f"parameter fingerprints and final weights (sha256 "
                f"{report['weights_sha256'][0][:16]}...) match bit for bit.")
    lines = [f"DIVERGED: first diverging step {report['first_diverging_step']} "
             f"(of {steps_a} vs {steps_b} steps)."]
    loss = report["first_loss_difference"]
    if loss:
        lines.append(f"  loss bits first differ at step {loss['step']}: "
                     f"{loss['a']} vs {loss['b']}")
    if report["first_param_difference_step"]:
        names = report["first_differing_tensors"]
        lines.append(f"  parameters first differ at fingerprint step "
                     f"{report['first_param_difference_step']}: {', '.join(names)}")
    distances = report["max_abs_diff"]
    if distances:
        first = [n for n in report["first_differing_tensors"] if n in distances]
        rest = sorted((n for n in distances if n not in first), key=lambda n: -distances[n])
        lines.append(f"  final weights differ in {len(distances)} tensors; max abs difference:")
        for name in (first + rest)[:8]:
            lines.append(f"    {name}: {distances[name]:.3e}")
    else:
        lines.append("  final weights are identical")
    if not report["eval_equal"]:
        lines.append("  evaluation results differ")
    return "\n".join(lines)
