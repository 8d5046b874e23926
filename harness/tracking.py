"""Export a finished run to TensorBoard (`tracker.tensorboard=true`): event files in
`runs/<id>/tensorboard/` with the per-step loss, the evaluation, and the run id, config and
lockfile attached as text. Point TensorBoard at `runs/` to browse every run.

Written by the launcher from metrics.jsonl after the run, not by the training loop: the
training process (and its container image) needs no tracker library, and the exported
values are the recorded ones, bit for bit."""

from __future__ import annotations

from pathlib import Path

from harness import metrics, rundir

TENSORBOARD_DIR = "tensorboard"


def export(run_dir: Path, cfg: dict) -> None:
    if not (cfg.get("tracker") or {}).get("tensorboard"):
        return
    from torch.utils.tensorboard import SummaryWriter

    out = run_dir / TENSORBOARD_DIR
    writer = SummaryWriter(log_dir=str(out))
    try:
        train, evaluation = metrics.read(run_dir)
        for record in train:
            writer.add_scalar("train/loss", record["loss"], record["step"])
        if evaluation:
            writer.add_scalar("eval/accuracy", evaluation["accuracy"], evaluation["step"])
            writer.add_scalar("eval/loss", evaluation["loss"], evaluation["step"])
        writer.add_text("run_id", run_dir.name)
        writer.add_text("config", "```\n" + (run_dir / rundir.CONFIG).read_text() + "\n```")
        lock_path = run_dir / rundir.LOCK
        if lock_path.exists():
            writer.add_text("lockfile", "```\n" + lock_path.read_text() + "\n```")
    finally:
        writer.close()
    print(f"harness: TensorBoard events in {out}", flush=True)
