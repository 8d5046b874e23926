"""The training process: `python -m harness.train RUN_DIR [--data-root DIR]`.

A run of the user's own command (`harness run`) is handed to harness.script.runner here; the
rest of this module is the built-in loop.

Started by a backend (a child process, a container, a batch job) with the pinned
environment already in place. It applies and checks the determinism settings before
anything else, trains, and writes metrics, weights and finally the lockfile into RUN_DIR.
Read top to bottom: setup, loop, evaluation, results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from torch.utils.data import DataLoader, Subset

from harness import hash_cache, rundir
from harness.config import is_script, load_yaml
from harness.digest import file_sha256, tensor_digests, weights_sha256
from harness.env import LAUNCHER_PID, PROGRESS_S
from harness.errors import REQUEUE_EXIT, ConfigError, HarnessError
from harness.record import integrity, metrics, op_trace
from harness.training import (
    audit,
    checkpoint,
    distributed,
    nondeterminism,
    op_tracer,
    perturb,
    portable,
    seeding,
)
from harness.training.runtime import Runtime, slurm_restarts

# ---------------------------------------------------------------- data order


class EpochShards(torch.utils.data.Sampler):
    """This rank's batches of one epoch, from sample `start` of the epoch on (a resume
    mid-epoch). The epoch's order is a pure function of (seed, epoch). Each step takes the
    next world × batch_size samples of it (the global batch) and splits them over the ranks
    in rank order, as evenly as they go (a last, smaller one may leave shares one sample
    apart); a last global batch smaller than the world is dropped (a rank with no sample
    would have nothing to reduce). With one rank: batches of batch_size."""

    def __init__(self, size: int, seed: int, epoch: int, batch_size: int,
                 rank: int = 0, world: int = 1, start: int = 0):
        order = torch.randperm(size, generator=seeding.epoch_generator(seed, epoch)).tolist()
        self.batches: List[List[int]] = []
        self.global_sizes: List[int] = []  # samples each step consumes over all ranks
        for first in range(start, size, batch_size * world):
            chunk = order[first:first + batch_size * world]
            if len(chunk) < world:
                break
            base, extra = divmod(len(chunk), world)
            begin = rank * base + min(rank, extra)
            self.batches.append(chunk[begin:begin + base + (rank < extra)])
            self.global_sizes.append(len(chunk))

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def epoch_loader(dataset, cfg: Dict, epoch: int, shards: EpochShards) -> DataLoader:
    return DataLoader(
        seeding.SeededSamples(dataset, seeding.source_seeds(cfg)["augment"], epoch),
        batch_sampler=shards,
        num_workers=cfg["trainer"]["num_workers"],
        worker_init_fn=seeding.worker_init,
        generator=seeding.worker_generator(cfg["seed"], epoch),
    )


def instantiate(node: Dict, **kwargs):
    """Hydra's instantiate. The launcher found every `_target_` before the launch, on its
    own path; one that does not import in this process (a container without its package)
    is a ConfigError naming it, not a traceback."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as exc:
        if "Error locating target" not in str(exc):
            raise
        raise ConfigError(
            f"_target_ {node.get('_target_')} cannot be imported in the training process "
            f"({sys.executable}), although the launcher found it: "
            f"{str(exc.__cause__ or exc).splitlines()[0]}. In a container the training sees "
            f"only the image's packages and the directories of backend.docker.pythonpath: "
            f"add the code's directory there (backend.docker.pythonpath=[DIR]), or install "
            f"the package in the image.") from None


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


def planned_steps(trainer: Dict, samples: int, world: int = 1) -> Tuple[int, int]:
    """(steps per epoch, total steps): all epochs, or trainer.max_steps if fewer."""
    if samples < world:
        raise ConfigError(f"{samples} training sample(s) for {world} ranks: every rank needs "
                          f"at least one per step. Use more samples (trainer.train_limit) "
                          f"or fewer ranks (trainer.devices).")
    global_batch = trainer["batch_size"] * world
    per_epoch = samples // global_batch + (samples % global_batch >= world)
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
        watch_stdin: bool = False, cfg: Dict[str, Any] | None = None) -> Dict[str, Any] | None:
    """Train the run; returns its results, or None when a stop signal made it checkpoint
    and stop early (the caller exits with REQUEUE_EXIT)."""
    rt = Runtime.start(run_dir, watch_stdin, cfg)  # signals, determinism, seeds, device, ranks
    cfg, device, det, rank = rt.cfg, rt.device, rt.cfg["determinism"], rt.rank

    seeds = seeding.source_seeds(cfg)
    train_set, test_set = datasets(cfg, data_root)
    torch.manual_seed(seeds["init"])  # the initial weights: their own source (seeds.init)
    model = instantiate(cfg["model"]).to(device)
    if rank.is_main:  # one writer per run directory file
        audit.attach(model, run_dir)  # per-module digests when HARNESS_AUDIT=1 (verify)
        nondeterminism.watch(model, run_dir)  # which ops warn, when `harness doctor` asks
    optimizer = instantiate(cfg["optim"], params=model.parameters())
    # Dropout draws from here on: from seeds.dropout where set (else on from init's stream).
    # Data-parallel: every rank built the same model from the same seed; each rank then
    # draws from a stream of its own.
    dropout = seeds["dropout"]
    if rank.distributed:
        dropout = seeding.stream_seed(cfg["seed"] if dropout is None else dropout, "rank",
                                      rank.rank)
    if dropout is not None:
        seeding.seed_everything(dropout)
    ddp = distributed.wrap_model(model, rank, str(device),
                                 distributed.World.of(cfg).bucket_cap_mb)
    steps_per_epoch, total_steps = planned_steps(cfg["trainer"], len(train_set),
                                                 rank.world_size)
    scheduler = None
    if cfg.get("scheduler"):
        scheduler = instantiate(cfg["scheduler"], optimizer=optimizer, total_steps=total_steps)
    ranks = f", {rank.world_size} ranks" if rank.distributed else ""
    rt.say(f"harness: training {cfg['name']} seed={cfg['seed']} on {device}{ranks} "
           f"({len(train_set)} samples, {steps_per_epoch} steps/epoch, {total_steps} steps, "
           f"determinism={det['mode']}, threads={det['threads']})")

    resume = resume or slurm_restarts() > 0  # a requeued batch job resumes by itself
    progress = restore(rt, model, optimizer, scheduler) if resume else Progress()

    book = Bookkeeping(rt, total_steps, progress.step)
    loop_start = time.time()
    finished = train_epochs(rt, ddp, optimizer, scheduler, train_set, total_steps,
                            progress, book)
    loop_end = time.time()
    distributed.finish()  # the ranks' last collective: nothing below needs the others
    if not finished:
        return None
    if not rank.is_main:  # rank 0 evaluates, saves the weights and writes the lockfile
        return {}
    return write_results(rt, model, test_set, progress, book, loop_end - loop_start)


def remembered_weights_sha256(state: Dict[str, Any], path: Path) -> str:
    """The weights digest of the state just saved to `path`, remembered for the file's
    content: a replay then checks model.pt by hashing the file, without torch."""
    digest = weights_sha256(state)
    hash_cache.remember_derived(integrity.WEIGHTS_KIND, file_sha256(path), digest)
    return digest


def write_results(rt: Runtime, model, test_set, progress: Progress, book: "Bookkeeping",
                  loop_s: float) -> Dict[str, Any]:
    """After the last step: evaluate, save the weights, write the lockfile (last)."""
    cfg, run_dir = rt.cfg, rt.run_dir
    evaluation = evaluate(model, test_set, cfg, rt.device)
    book.metrics.write({"kind": "eval", "step": progress.step, **evaluation})
    book.metrics.close()
    print(f"eval: accuracy {evaluation['accuracy']:.4f} loss {evaluation['loss']:.4f} "
          f"on {evaluation['samples']} test samples", flush=True)

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    try:
        torch.save(state, run_dir / rundir.WEIGHTS)
    except (OSError, RuntimeError) as exc:
        full = rundir.out_of_space(exc, run_dir, f"the final weights {rundir.WEIGHTS}")
        (run_dir / rundir.WEIGHTS).unlink(missing_ok=True)
        if full:
            raise full from None
        raise
    results = {
        "steps": progress.step,
        "epochs_started": progress.epoch + 1,
        "final_loss": progress.final_loss,
        "final_loss_hex": progress.final_loss.hex(),
        "test_accuracy": evaluation["accuracy"],
        "test_loss_hex": evaluation["loss_hex"],
        "weights_sha256": remembered_weights_sha256(state, run_dir / rundir.WEIGHTS),
        "metrics_sha256": file_sha256(run_dir / rundir.METRICS),
    }
    results.update(op_trace.file_digests(run_dir))
    rt.write_lock(results, progress.resumes, timing={
        "first_step_unix": book.first_step_at,
        "train_loop_s": round(loop_s, 3),
        "harness_s": round(book.stopwatch.total, 4),
    })
    return results


def restore(rt: Runtime, model, optimizer, scheduler) -> Progress:
    """Load the newest intact checkpoint of the run (or start from step 0 without one);
    cut metrics.jsonl back to its step. The RNG states are restored last, so that nothing
    drawn while building the model and data changes them."""
    restored, path = pick_checkpoint(rt)
    progress = Progress()
    if restored is None:
        rt.say(f"harness: resume: no intact checkpoint in {rt.run_dir / rundir.CHECKPOINTS}; "
               f"starting again from step 0")
    else:
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(restored["scheduler"])
        progress = Progress(restored["step"], restored["epoch"], restored["position"],
                            [*restored["resumes"], {"from_step": restored["step"],
                                                    "checkpoint": path.name,
                                                    **restored["checksum"]}])
        rt.say(f"harness: resuming from {path.name}: step {progress.step}, epoch "
               f"{progress.epoch + 1}, {progress.position} samples of the epoch done")
    if rt.rank.is_main:
        metrics.truncate(rt.run_dir, progress.step)
    if restored is not None:
        seeding.set_rng_state(checkpoint.rng_of_rank(restored, rt.rank.rank))
    return progress


def pick_checkpoint(rt: Runtime):
    """(state, path) of the checkpoint to resume from, or (None, None). Rank 0 picks it
    (skipping damaged ones, refusing another config's or environment's) and every rank
    loads that one file, so all resume from the same step."""
    restored, path = None, None
    if rt.rank.is_main:
        restored, path, notes = checkpoint.newest_valid(
            rt.run_dir, rt.launch["config_sha256"], rt.checkpoint_facts())
        for note in notes:
            rt.say(f"harness: {note}")
        if restored is not None:
            checkpoint.check_world_size(restored, path, rt.rank.world_size)
    path = distributed.broadcast_from_main(path, rt.rank)
    if path is not None and restored is None:
        restored = checkpoint.load(path)
    return restored, path


def train_epochs(rt: Runtime, model, optimizer, scheduler, train_set, total_steps: int,
                 progress: Progress, book: "Bookkeeping") -> bool:
    """The training loop, from `progress` on. False when a stop signal made it write a
    checkpoint and stop early."""
    cfg, device, rank = rt.cfg, rt.device, rt.rank
    agreement = distributed.StepAgreement(rank, str(device))
    bare_model = getattr(model, "module", model)  # what is saved (without the DDP wrapper)
    order_seed = seeding.source_seeds(cfg)["order"]
    start_epoch = progress.epoch
    tracer = op_tracer.Tracer.for_run(rt, bare_model, progress.step, total_steps)
    model.train()
    for epoch in range(start_epoch, cfg["trainer"]["epochs"]):
        progress.epoch = epoch
        if progress.step >= total_steps:
            break
        position = progress.position if epoch == start_epoch else 0
        shards = EpochShards(len(train_set), order_seed, epoch, cfg["trainer"]["batch_size"],
                             rank.rank, rank.world_size, position)
        loader = epoch_loader(train_set, cfg, epoch, shards)
        if cfg["trainer"]["num_workers"]:
            book.saver.wait()  # the loader forks its workers: not while a writer thread runs
        for (images, labels), global_batch in zip(loader, shards.global_sizes):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            with tracer.step(progress.step + 1):  # the first steps' ops: trainer.op_trace_steps
                with portable.first_step_check(cfg, progress.step):  # cpu_isa=portable only
                    loss = torch.nn.functional.cross_entropy(model(images), labels)
                    loss.backward()  # data-parallel: gradients are averaged over the ranks here
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            progress.step += 1
            tracer.after_step(progress.step, rt.run_dir)
            perturb.after_step(bare_model)  # replay --negative-control only
            progress.position = position = position + global_batch
            with book.stopwatch:  # the harness's own work per step: timing.harness_s
                # The loss over all ranks, and whether any rank was asked to stop: every
                # rank then checkpoints after this same step.
                progress.final_loss, stop = agreement.after_step(
                    loss.item(), len(labels), rt.stop_requested is not None)
                book.record(progress, bare_model)
                stopping = stop and progress.step < total_steps
                if stopping or book.checkpoint_due(progress.step):
                    saved = save_checkpoint(rt, bare_model, optimizer, scheduler, progress,
                                            book.saver)
            if stopping:
                book.saver.wait()  # written and renamed before the process says so and exits
                book.close()
                tracer.write_pending(rt.run_dir)
                why = rt.stop_requested or "a stop signal (to another rank)"
                rt.say(f"harness: {why} received: checkpoint {saved.name} written at step "
                       f"{progress.step}; exiting with code {REQUEUE_EXIT} (preempted, resume "
                       f"with --resume)")
                return False
            if progress.step >= total_steps:
                break
    with book.stopwatch:
        book.saver.wait()  # the last checkpoint is written before the lock says the run ended
    return True


def save_checkpoint(rt: Runtime, model, optimizer, scheduler, progress: Progress,
                    saver) -> Path:
    """One file for all ranks, written by rank 0: the model and optimizer (the same on every
    rank) and every rank's RNG state. The other ranks wait until it is written, or, with
    trainer.checkpoint_async, until rank 0 has its copy to write."""
    rngs = distributed.gather_to_main(seeding.rng_state(), rt.rank)
    path = checkpoint.path_for(rt.run_dir, progress.step)
    if rt.rank.is_main:
        state = checkpoint.make_state(
            step=progress.step, epoch=progress.epoch, position=progress.position,
            config_sha256=rt.launch["config_sha256"], facts=rt.checkpoint_facts(),
            model=model, optimizer=optimizer, scheduler=scheduler, rank_rngs=rngs,
            resumes=progress.resumes)
        path = saver.save(state)
    distributed.barrier()
    return path


class Bookkeeping:
    """The harness's own work after each step: the metrics record (a parameter fingerprint
    every trainer.fingerprint_every steps), progress lines, and when to checkpoint."""

    def __init__(self, rt: Runtime, total_steps: int, start_step: int):
        self.trainer, self.total_steps = rt.cfg["trainer"], total_steps
        # Rank 0 keeps the books of a data-parallel run; the other ranks only time steps.
        self.main = rt.rank.is_main
        self.metrics = metrics.Writer(rt.run_dir) if self.main else None
        self.stopwatch = Stopwatch()
        self.first_step_at: Optional[float] = None
        self.tick, self.tick_step = time.time(), start_step
        self.live_every = float(os.environ.get(PROGRESS_S) or 0)
        self.last_report = self.tick
        self.saver = checkpoint.saver(rt.run_dir, self.trainer.get("checkpoint_async"))

    def record(self, progress: Progress, model) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()
        if not self.main:
            return
        step, loss = progress.step, progress.final_loss
        record = {"kind": "train", "step": step, "epoch": progress.epoch, "loss": loss,
                  "loss_hex": loss.hex()}
        if step % self.trainer["fingerprint_every"] == 0 or step == self.total_steps:
            record["params"] = tensor_digests(model.state_dict())
        self.metrics.write(record)
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

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def checkpoint_due(self, step: int) -> bool:
        return step % self.trainer["checkpoint_every"] == 0 and step < self.total_steps


def evaluate(model, dataset, cfg: Dict, device) -> Dict[str, Any]:
    model.eval()
    samples = seeding.SeededSamples(dataset, seeding.source_seeds(cfg)["augment"], 0,
                                    seeding.EVAL_STREAM)
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
        cfg = load_yaml(args.run_dir / rundir.CONFIG)
        if is_script(cfg):
            from harness.script import runner  # the user's own command (`harness run`)

            return runner.run(args.run_dir, resume=args.resume, watch_stdin=args.watch_stdin,
                              cfg=cfg)
        world = distributed.World.of(cfg)
        if distributed.this_rank(world.size, world.devices) is None:
            return start_ranks(args.run_dir, argv if argv is not None else sys.argv[1:],
                               cfg, args.watch_stdin)
        results = run(args.run_dir, args.data_root, resume=args.resume,
                      watch_stdin=args.watch_stdin, cfg=cfg)
    except OSError as exc:  # metrics, the lockfile: a full disk is said as such
        full = rundir.out_of_space(exc, args.run_dir, exc.filename or "the run directory")
        if full is None:
            raise
        print(f"harness: error: {full}", file=sys.stderr, flush=True)
        rundir.record_error(args.run_dir, str(full), full.exit_code)
        return full.exit_code
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr, flush=True)
        rundir.record_error(args.run_dir, str(exc), exc.exit_code)
        return exc.exit_code
    if results is None:
        return REQUEUE_EXIT
    if results:  # rank 0 (the other ranks of a data-parallel run have none)
        print(f"weights sha256 {results['weights_sha256']}", flush=True)
    return 0


def start_ranks(run_dir: Path, argv: List[str], cfg: Dict, watch_stdin: bool) -> int:
    """The first process of a data-parallel run on one machine: start its ranks (each runs
    this module again, as RANK=N) and wait for them."""
    from harness.training.runtime import stop_when_launcher_dies

    world = distributed.World.of(cfg)
    if world.nodes > 1:
        raise ConfigError(f"trainer.nodes={world.nodes}: a run across nodes is started by "
                          f"Slurm (`harness submit`), one task per rank.")
    code, failure = distributed.launch_ranks(
        argv, world.devices, run_dir / rundir.LOG, LAUNCHER_PID,
        lambda: stop_when_launcher_dies(watch_stdin))
    # a rank's own account (e.g. a refused checkpoint) wins
    if failure and not rundir.recorded_error(run_dir):
        rundir.record_error(run_dir, failure, code)
    return code


def run_as_process() -> None:
    """main() as the training process: whatever happens, it ends through
    distributed.exit_process, so that a rank cannot hang in teardown."""
    try:
        exit_code = main()
    except SystemExit as exc:  # argparse
        exit_code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        exit_code = 130
    except BaseException:  # noqa: BLE001 - a rank must still end (exit_process), not hang
        import traceback

        traceback.print_exc()
        exit_code = 1
    distributed.exit_process(exit_code)


if __name__ == "__main__":
    run_as_process()
