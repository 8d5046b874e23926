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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Subset

from harness import audit, checkpoint, determinism, progress, rundir
from harness.config import is_script, load_yaml
from harness.digest import tensor_digests, weights_sha256
from harness.errors import REQUEUE_EXIT, HarnessError
from harness.runtime import Runtime

# ---------------------------------------------------------------- data order


class EpochOrder(torch.utils.data.Sampler):
    """The sample order of one epoch, a pure function of (seed, epoch), optionally starting
    part-way through (used when resuming mid-epoch)."""

    def __init__(self, size: int, seed: int, epoch: int, start: int = 0):
        self.order = torch.randperm(size, generator=determinism.epoch_generator(seed, epoch))
        self.order = self.order[start:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def epoch_loader(dataset, cfg: Dict, epoch: int, start_sample: int = 0) -> DataLoader:
    trainer = cfg["trainer"]
    return DataLoader(
        determinism.SeededSamples(dataset, cfg["seed"], epoch),
        batch_size=trainer["batch_size"],
        sampler=EpochOrder(len(dataset), cfg["seed"], epoch, start_sample),
        num_workers=trainer["num_workers"],
        worker_init_fn=determinism.worker_init,
        # Seeds the workers' base seed; a stream of its own (seed + 1), apart from the
        # epoch order's generator (seed), so the two never draw the same numbers.
        generator=determinism.epoch_generator(cfg["seed"] + 1, epoch),
    )


def limited(dataset, limit):
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset


# ---------------------------------------------------------------- the run


class Metrics:
    """metrics.jsonl: one JSON record per line, flushed as written."""

    def __init__(self, path: Path):
        self.handle = open(path, "a")

    def write(self, record: Dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def evaluate(model, dataset, cfg: Dict, device) -> Dict[str, Any]:
    model.eval()
    samples = determinism.SeededSamples(dataset, cfg["seed"], 0, determinism.EVAL_STREAM)
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


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the train records up to `step` (a resumed run re-writes the rest, bit for bit);
    a torn last line from a killed process goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not line.endswith("\n") or record.get("kind") != "train" or record["step"] > step:
            break
        kept.append(line)
    rundir.atomic_write_text(path, "".join(kept))


def run(run_dir: Path, data_root: str | None, resume: bool = False,
        watch_stdin: bool = False) -> Dict[str, Any] | None:
    """Train the run; returns its results, or None when a stop signal made it checkpoint
    and stop early (the caller exits with REQUEUE_EXIT)."""
    rt = Runtime.start(run_dir, watch_stdin)  # signals, determinism, seeds, device
    cfg, launch, device, det = rt.cfg, rt.launch, rt.device, rt.cfg["determinism"]

    data_kwargs = {"root": data_root} if data_root else {}
    train_set = limited(instantiate(cfg["data"]["dataset"], split="train", **data_kwargs),
                        cfg["trainer"]["train_limit"])
    test_set = limited(instantiate(cfg["data"]["dataset"], split="test", **data_kwargs),
                       cfg["trainer"]["eval_limit"])
    model = instantiate(cfg["model"]).to(device)
    audit.attach(model, run_dir)  # per-module digests when HARNESS_AUDIT=1 (verify)
    optimizer = instantiate(cfg["optim"], params=model.parameters())

    trainer = cfg["trainer"]
    steps_per_epoch = -(-len(train_set) // trainer["batch_size"])
    total_steps = trainer["epochs"] * steps_per_epoch
    if trainer["max_steps"]:
        total_steps = min(total_steps, trainer["max_steps"])
    scheduler = None
    if cfg.get("scheduler"):
        scheduler = instantiate(cfg["scheduler"], optimizer=optimizer, total_steps=total_steps)
    print(f"harness: training {cfg['name']} seed={cfg['seed']} on {device} "
          f"({len(train_set)} samples, {steps_per_epoch} steps/epoch, {total_steps} steps, "
          f"determinism={det['mode']}, threads={det['threads']})", flush=True)

    # A restarted Slurm job (requeued after preemption) resumes by itself.
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    resume = resume or restarts > 0
    facts = rt.checkpoint_facts()
    step, start_epoch, start_position = 0, 0, 0
    restored, resumes = None, []
    if resume:
        restored, path, notes = checkpoint.newest_valid(run_dir, launch["config_sha256"], facts)
        for note in notes:
            print(f"harness: {note}", flush=True)
        if restored is None:
            print(f"harness: resume: no intact checkpoint in {run_dir / rundir.CHECKPOINTS}; "
                  f"starting again from step 0", flush=True)
        else:
            model.load_state_dict(restored["model"])
            optimizer.load_state_dict(restored["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(restored["scheduler"])
            step, start_epoch = restored["step"], restored["epoch"]
            start_position = restored["position"]
            resumes = [*restored["resumes"], {"from_step": step, "checkpoint": path.name,
                                              "state_sha256": restored["state_sha256"]}]
            print(f"harness: resuming from {path.name}: step {step}, epoch {start_epoch + 1}, "
                  f"{start_position} samples of the epoch done", flush=True)
        truncate_metrics(run_dir / rundir.METRICS, step)
    if restored is not None:
        # Last, so that nothing drawn while building the model and data changes them.
        checkpoint.set_rng_state(restored["rng"])

    def save(epoch: int, position: int) -> Path:
        return checkpoint.save(run_dir, {
            "step": step, "epoch": epoch, "position": position,
            "config_sha256": launch["config_sha256"],
            "environment_sha256": checkpoint.facts_sha256(facts), "environment": facts,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None,
            "rng": checkpoint.rng_state(), "resumes": resumes})

    metrics = Metrics(run_dir / rundir.METRICS)
    bookkeeping = Stopwatch()
    loss_value, first_step_at = float("nan"), None
    tick, tick_step = time.time(), step
    live_every = float(os.environ.get(progress.INTERVAL_ENV) or 0)
    last_report = tick
    loop_start = time.time()
    epoch = start_epoch
    model.train()
    for epoch in range(start_epoch, trainer["epochs"]):
        if step >= total_steps:
            break
        position = start_position if epoch == start_epoch else 0
        for images, labels in epoch_loader(train_set, cfg, epoch, position):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            position += len(labels)
            loss_value = loss.item()
            with bookkeeping:  # the harness's own work per step: timing.harness_s
                record = {"kind": "train", "step": step, "epoch": epoch, "loss": loss_value,
                          "loss_hex": loss_value.hex()}
                if step % trainer["fingerprint_every"] == 0 or step == total_steps:
                    record["params"] = tensor_digests(model.state_dict())
                metrics.write(record)
                if first_step_at is None:
                    first_step_at = time.time()
                logged = step % trainer["log_every"] == 0 or step == total_steps
                if logged or (live_every and time.time() - last_report >= live_every):
                    # `step` lines go to the log; `progress` lines only feed a terminal's live bar.
                    rate = (step - tick_step) / max(time.time() - tick, 1e-9)
                    eta = (total_steps - step) / max(rate, 1e-9)
                    print(f"{'step' if logged else 'progress'} {step}/{total_steps} epoch "
                          f"{epoch + 1}/{trainer['epochs']} loss {loss_value:.4f} {rate:.1f} "
                          f"steps/s ETA {eta:.0f}s", flush=True)
                    last_report = time.time()
                    if logged:
                        tick, tick_step = last_report, step
                stopping = rt.stop_requested is not None and step < total_steps
                if stopping or (step % trainer["checkpoint_every"] == 0 and step < total_steps):
                    saved = save(epoch, position)
            if stopping:
                metrics.close()
                print(f"harness: {rt.stop_requested} received: checkpoint {saved.name} written "
                      f"at step {step}; exiting with code {REQUEUE_EXIT} (preempted, resume "
                      f"with --resume)", flush=True)
                return None
            if step >= total_steps:
                break

    loop_end = time.time()
    evaluation = evaluate(model, test_set, cfg, device)
    metrics.write({"kind": "eval", "step": step, **evaluation})
    metrics.close()
    print(f"eval: accuracy {evaluation['accuracy']:.4f} loss {evaluation['loss']:.4f} "
          f"on {evaluation['samples']} test samples", flush=True)

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, run_dir / rundir.WEIGHTS)
    results = {
        "steps": step,
        "epochs_started": epoch + 1,
        "final_loss": loss_value,
        "final_loss_hex": loss_value.hex(),
        "test_accuracy": evaluation["accuracy"],
        "test_loss_hex": evaluation["loss_hex"],
        "weights_sha256": weights_sha256(state),
        "metrics_sha256": hashlib.sha256((run_dir / rundir.METRICS).read_bytes()).hexdigest(),
    }
    rt.write_lock(results, resumes, timing={
        "first_step_unix": first_step_at,
        "train_loop_s": round(loop_end - loop_start, 3),
        "harness_s": round(bookkeeping.total, 4),
    })
    return results


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
        return exc.exit_code
    if results is None:
        return REQUEUE_EXIT
    print(f"weights sha256 {results['weights_sha256']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
