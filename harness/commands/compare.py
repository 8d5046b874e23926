"""`harness compare RUN RUN [...]`: loss and accuracy curves of runs overlaid in one PNG,
with the first step at which a run's loss bits leave the first run's marked.

`curves` gathers what is plotted (plain data, testable); `render` only draws it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.record import metrics


def first_divergence(reference: List[Dict], other: List[Dict]) -> Optional[int]:
    """First step whose loss bits differ (or that only one run has); None if identical."""
    for ref, oth in zip(reference, other):
        if ref["loss_hex"] != oth["loss_hex"]:
            return oth["step"]
    if len(reference) != len(other):
        shorter = min(len(reference), len(other))
        return (reference if len(reference) > shorter else other)[shorter]["step"]
    return None


def curves(run_dirs: List[Path]) -> Dict[str, Any]:
    runs = []
    reference = None
    for run_dir in run_dirs:
        train, evaluation = metrics.read(run_dir)
        evals = [evaluation] if evaluation else []
        entry = {
            "run_id": run_dir.name,
            "steps": [r["step"] for r in train],
            "loss": [r["loss"] for r in train],
            "eval_steps": [r["step"] for r in evals],
            "accuracy": [r["accuracy"] for r in evals],
            "diverges_at": None,
        }
        if reference is None:
            reference = train
        else:
            entry["diverges_at"] = first_divergence(reference, train)
        runs.append(entry)
    return {"runs": runs, "reference": runs[0]["run_id"] if runs else None}


def render(data: Dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in data["runs"]:
        line, = loss_ax.plot(run["steps"], run["loss"], label=run["run_id"], linewidth=1)
        acc_ax.plot(run["eval_steps"], run["accuracy"], marker="o", color=line.get_color(),
                    label=run["run_id"])
        if run["diverges_at"] is not None:
            loss_ax.axvline(run["diverges_at"], color=line.get_color(), linestyle="--",
                            linewidth=1)
            loss_ax.annotate(f"diverges at step {run['diverges_at']}",
                             (run["diverges_at"], loss_ax.get_ylim()[1]), rotation=90,
                             va="top", ha="right", fontsize=8, color=line.get_color())
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss")
    acc_ax.set(xlabel="step", ylabel="test accuracy", title="accuracy")
    loss_ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
