"""The training process: `python -m harness.train RUN_DIR [--data-root DIR]`.

A run of the user's own command (`harness run`) is handed to harness.script here; the
rest of this module is the built-in loop.

Started by a backend (a child process, a container, a batch job) with the pinned
environment already in place. It applies and checks the determinism settings before
anything else, trains, and writes metrics, weights and finally the lockfile into RUN_DIR.
Read top to bottom: setup, loop, evaluation, results.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Subset

from harness import audit, checkpoint, metrics, nondeterminism, rundir, seeding
from harness.config import is_script, load_yaml
from harness.digest import tensor_digests, weights_sha256
from harness.errors import REQUEUE_EXIT, HarnessError
from harness.progress import INTERVAL_ENV
from harness.runtime import Runtime

# ---------------------------------------------------------------- data order


class EpochOrder(torch.utils.data.Sampler):
    """The sample order of one epoch, a pure function of (seed, epoch), optionally starting
    part-way through (used when resuming mid-epoch)."""

    def __init__(self, size: int, seed: int, epoch: int, start: int = 0):
        self.order = torch.randperm(size, generator=seeding.epoch_generator(seed, epoch))
        self.order = self.order[start:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def epoch_loader(dataset, cfg: Dict, epoch: int, start_sample: int = 0) -> DataLoader:
    trainer = cfg["trainer"]
    return DataLoader(
        seeding.SeededSamples(dataset, cfg["seed"], epoch),
        batch_size=trainer["batch_size"],
        sampler=EpochOrder(len(dataset), cfg["seed"], epoch, start_sample),
        num_workers=trainer["num_workers"],
        worker_init_fn=seeding.worker_init,
        generator=seeding.worker_generator(cfg["seed"], epoch),
    )


def limited(dataset, limit):
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset


def datasets(cfg: Dict, data_root: str | None):
    """(train set, test set), each cut to trainer.train_limit / eval_limit."""
    kwargs = {"root": data_root} if data_root else {}
    trainer = cfg["trainer"]
    return (limited(instantiate(cfg["data"]["dataset"], split="train", **kwargs),
                    trainer["train_limit"]),
            limited(instantiate(cfg["data"]["dataset"], split="test", **kwargs),
                    trainer["eval_limit"]))


def planned_steps(trainer: Dict, samples: int) -> Tuple[int, int]:
    """(steps per epoch, total steps): all epochs, or trainer.max_steps if fewer."""
    per_epoch = -(-samples // trainer["batch_size"])
    total = trainer["epochs"] * per_epoch
    return per_epoch, min(total, trainer["max_steps"]) if trainer["max_steps"] else total


# ---------------------------------------------------------------- the run


@dataclass
class Progress:
    """Where the training is: what a checkpoint saves and a resume restores."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress
    position: int = 0  # samples of that epoch consumed
    resumes: List[Dict[str, Any]] = field(default_factory=list)  # how this state was reached
    final_loss: float = float("nan")


def run(run_dir: Path, data_root: str | None, resume: bool = False,
        watch_stdin: bool = False) -> Dict[str, Any] | None:
    """Train the run; returns its results, or None when a stop signal made it checkpoint
    and stop early (the caller exits with REQUEUE_EXIT)."""
    rt = Runtime.start(run_dir, watch_stdin)  # signals, determinism, seeds, device
    cfg, device, det = rt.cfg, rt.device, rt.cfg["determinism"]

    train_set, test_set = datasets(cfg, data_root)
    model = instantiate(cfg["model"]).to(device)
    audit.attach(model, run_dir)  # per-module digests when HARNESS_AUDIT=1 (verify)
    nondeterminism.watch(model, run_dir)  # which ops warn, when `harness doctor` asks
    optimizer = instantiate(cfg["optim"], params=model.parameters())
    steps_per_epoch, total_steps = planned_steps(cfg["trainer"], len(train_set))
    scheduler = None
    if cfg.get("scheduler"):
        scheduler = instantiate(cfg["scheduler"], optimizer=optimizer, total_steps=total_steps)
    print(f"harness: training {cfg['name']} seed={cfg['seed']} on {device} "
          f"({len(train_set)} samples, {steps_per_epoch} steps/epoch, {total_steps} steps, "
          f"determinism={det['mode']}, threads={det['threads']})", flush=True)

    # A restarted Slurm job (requeued after preemption) resumes by itself.
    resume = resume or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    progress = restore(rt, model, optimizer, scheduler) if resume else Progress()

    book = Bookkeeping(rt, total_steps, progress.step)
    loop_start = time.time()
    if not train_epochs(rt, model, optimizer, scheduler, train_set, total_steps, progress,
                        book):
        return None
    loop_end = time.time()

    evaluation = evaluate(model, test_set, cfg, device)
    book.metrics.write({"kind": "eval", "step": progress.step, **evaluation})
    book.metrics.close()
    print(f"eval: accuracy {evaluation['accuracy']:.4f} loss {evaluation['loss']:.4f} "
          f"on {evaluation['samples']} test samples", flush=True)

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, run_dir / rundir.WEIGHTS)
    results = {
        "steps": progress.step,
        "epochs_started": progress.epoch + 1,
        "final_loss": progress.final_loss,
        "final_loss_hex": progress.final_loss.hex(),
        "test_accuracy": evaluation["accuracy"],
        "test_loss_hex": evaluation["loss_hex"],
        "weights_sha256": weights_sha256(state),
        "metrics_sha256": hashlib.sha256((run_dir / rundir.METRICS).read_bytes()).hexdigest(),
    }
    rt.write_lock(results, progress.resumes, timing={
        "first_step_unix": book.first_step_at,
        "train_loop_s": round(loop_end - loop_start, 3),
        "harness_s": round(book.stopwatch.total, 4),
    })
    return results


def restore(rt: Runtime, model, optimizer, scheduler) -> Progress:
    """Load the newest intact checkpoint of the run (or start from step 0 without one);
    cut metrics.jsonl back to its step. The RNG states are restored last, so that nothing
    drawn while building the model and data changes them."""
    restored, path, notes = checkpoint.newest_valid(
        rt.run_dir, rt.launch["config_sha256"], rt.checkpoint_facts())
    for note in notes:
        print(f"harness: {note}", flush=True)
    progress = Progress()
    if restored is None:
        print(f"harness: resume: no intact checkpoint in {rt.run_dir / rundir.CHECKPOINTS}; "
              f"starting again from step 0", flush=True)
    else:
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(restored["scheduler"])
        progress = Progress(restored["step"], restored["epoch"], restored["position"],
                            [*restored["resumes"], {"from_step": restored["step"],
                                                    "checkpoint": path.name,
                                                    "state_sha256": restored["state_sha256"]}])
        print(f"harness: resuming from {path.name}: step {progress.step}, epoch "
              f"{progress.epoch + 1}, {progress.position} samples of the epoch done", flush=True)
    metrics.truncate(rt.run_dir, progress.step)
    if restored is not None:
        seeding.set_rng_state(restored["rng"])
    return progress


def train_epochs(rt: Runtime, model, optimizer, scheduler, train_set, total_steps: int,
                 progress: Progress, book: "Bookkeeping") -> bool:
    """The training loop, from `progress` on. False when a stop signal made it write a
    checkpoint and stop early."""
    cfg, device = rt.cfg, rt.device
    start_epoch = progress.epoch
    model.train()
    for epoch in range(start_epoch, cfg["trainer"]["epochs"]):
        progress.epoch = epoch
        if progress.step >= total_steps:
            break
        position = progress.position if epoch == start_epoch else 0
        for images, labels in epoch_loader(train_set, cfg, epoch, position):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            progress.step += 1
            progress.position = position = position + len(labels)
            progress.final_loss = loss.item()
            with book.stopwatch:  # the harness's own work per step: timing.harness_s
                book.record(progress, model)
                stopping = rt.stop_requested is not None and progress.step < total_steps
                if stopping or book.checkpoint_due(progress.step):
                    saved = save_checkpoint(rt, model, optimizer, scheduler, progress)
            if stopping:
                book.metrics.close()
                print(f"harness: {rt.stop_requested} received: checkpoint {saved.name} written "
                      f"at step {progress.step}; exiting with code {REQUEUE_EXIT} (preempted, "
                      f"resume with --resume)", flush=True)
                return False
            if progress.step >= total_steps:
                break
    return True


def save_checkpoint(rt: Runtime, model, optimizer, scheduler, progress: Progress) -> Path:
    facts = rt.checkpoint_facts()
    return checkpoint.save(rt.run_dir, {
        "step": progress.step, "epoch": progress.epoch, "position": progress.position,
        "config_sha256": rt.launch["config_sha256"],
        "environment_sha256": checkpoint.facts_sha256(facts), "environment": facts,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler else None,
        "rng": seeding.rng_state(), "resumes": progress.resumes})


class Bookkeeping:
    """The harness's own work after each step: the metrics record (a parameter fingerprint
    every trainer.fingerprint_every steps), progress lines, and when to checkpoint."""

    def __init__(self, rt: Runtime, total_steps: int, start_step: int):
        self.trainer, self.total_steps = rt.cfg["trainer"], total_steps
        self.metrics = metrics.Writer(rt.run_dir)
        self.stopwatch = Stopwatch()
        self.first_step_at: Optional[float] = None
        self.tick, self.tick_step = time.time(), start_step
        self.live_every = float(os.environ.get(INTERVAL_ENV) or 0)
        self.last_report = self.tick

    def record(self, progress: Progress, model) -> None:
        step, loss = progress.step, progress.final_loss
        record = {"kind": "train", "step": step, "epoch": progress.epoch, "loss": loss,
                  "loss_hex": loss.hex()}
        if step % self.trainer["fingerprint_every"] == 0 or step == self.total_steps:
            record["params"] = tensor_digests(model.state_dict())
        self.metrics.write(record)
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self.report(progress)

    def report(self, progress: Progress) -> None:
        """`step` lines go to the log; `progress` lines only feed a terminal's live bar."""
        step = progress.step
        logged = step % self.trainer["log_every"] == 0 or step == self.total_steps
        if not logged and not (self.live_every and
                               time.time() - self.last_report >= self.live_every):
            return
        rate = (step - self.tick_step) / max(time.time() - self.tick, 1e-9)
        eta = (self.total_steps - step) / max(rate, 1e-9)
        print(f"{'step' if logged else 'progress'} {step}/{self.total_steps} epoch "
              f"{progress.epoch + 1}/{self.trainer['epochs']} loss {progress.final_loss:.4f} "
              f"{rate:.1f} steps/s ETA {eta:.0f}s", flush=True)
        self.last_report = time.time()
        if logged:
            self.tick, self.tick_step = self.last_report, step

    def checkpoint_due(self, step: int) -> bool:
        return step % self.trainer["checkpoint_every"] == 0 and step < self.total_steps


def evaluate(model, dataset, cfg: Dict, device) -> Dict[str, Any]:
    model.eval()
    samples = seeding.SeededSamples(dataset, cfg["seed"], 0, seeding.EVAL_STREAM)
    loader = DataLoader(samples, batch_size=cfg["trainer"]["eval_batch_size"], shuffle=False)
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            total += len(labels)
    model.train()
    loss = loss_sum / max(total, 1)
    return {"accuracy": correct / max(total, 1), "loss": loss, "loss_hex": loss.hex(),
            "samples": total}


class Stopwatch:
    """Adds up the time spent inside `with stopwatch:` blocks."""

    def __init__(self):
        self.total, self._started = 0.0, 0.0

    def __enter__(self) -> "Stopwatch":
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.total += time.perf_counter() - self._started


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.train",
                                     description="Train one prepared run directory.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in RUN_DIR")
    parser.add_argument("--watch-stdin", action="store_true",
                        help="checkpoint and stop when stdin ends (the launcher is gone)")
    args = parser.parse_args(argv)
    try:
        if is_script(load_yaml(args.run_dir / rundir.CONFIG)):
            from harness import script  # the user's own command (`harness run`)

            return script.run(args.run_dir, resume=args.resume, watch_stdin=args.watch_stdin)
        results = run(args.run_dir, args.data_root, resume=args.resume,
                      watch_stdin=args.watch_stdin)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr, flush=True)
        rundir.record_error(args.run_dir, str(exc), exc.exit_code)
        return exc.exit_code
    if results is None:
        return REQUEUE_EXIT
    print(f"weights sha256 {results['weights_sha256']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
