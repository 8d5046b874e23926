"""Every seed and random stream of a run, with why each exists. One module, so that a
reader finds all of the run's randomness in one place.

    the run's seed          `seed` in the config; drawn at launch (draw_seed, called by the
                            command) when null, and recorded, so a run never has an
                            unknown seed
    source_seeds            a seed per source of randomness of the built-in loop (init,
                            order, augment, dropout): `seeds.<source>`, else derived from
                            the run's seed, so that one source can vary alone
    seed_everything         python, numpy and torch (every device) seeded from it first
                            thing in a training process
    epoch_generator         each epoch's sample order: a pure function of (seed, epoch), so
                            a resume rebuilds the epoch it stopped in
    worker_generator        the DataLoader's base seed for its workers: a stream of its own
                            (seed + 1), apart from the epoch order's (seed)
    SeededSamples           each sample's augmentation: a pure function of
                            (seed, stream, epoch, index), whatever worker builds it
    worker_init             what a DataLoader worker does first (seeding, signals)
    stream_seed             named streams for `harness run` (the injected DataLoader
                            generator, harness.runtime.generator)
    rng_state/set_rng_state every generator's state, saved in a checkpoint and restored on
                            resume
"""

from __future__ import annotations

import hashlib
import random
import secrets
from typing import Any, Dict

from harness.errors import CheckpointRefused

# numpy seeds must be below this (config.SEED_LIMIT, which validation checks, is the same
# number: the injection imports this module with the standard library only, not config).
SEED_LIMIT = 2**32


def draw_seed() -> int:
    """A seed for a config that leaves it null (recorded in config.yaml and the lock)."""
    return secrets.randbelow(SEED_LIMIT)


SOURCES = ("init", "order", "augment", "dropout")


def source_seeds(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The seed of each source of randomness: `seeds.<source>` where set, else derived from
    `seed`. init, order and augment derive as the seed itself, and dropout as None
    (dropout then draws on from where the model's initialization left torch's generator):
    the streams runs of earlier versions used, so that they replay. Set seeds.dropout to
    make dropout independent of init (`harness variance` sets every source it holds)."""
    given = cfg.get("seeds") or {}
    derived = {"init": cfg["seed"], "order": cfg["seed"], "augment": cfg["seed"],
               "dropout": None}
    return {source: given.get(source) if given.get(source) is not None else derived[source]
            for source in SOURCES}


def seed_everything(seed: int) -> None:
    """Seed every generator a training step may draw from."""
    import numpy as np
    import torch

    random.seed(seed)
    seed_numpy(np, seed)
    seed_torch(torch, seed)


# One function per library, so that a user's command (harness/script/injection/pinning.py)
# seeds each one as it is imported, the same way the built-in loop seeds them all at once.

def seed_numpy(np, seed: int) -> None:
    np.random.seed(seed % 2**32)  # numpy's legacy global generator takes 32 bits


def seed_torch(torch, seed: int) -> None:
    # torch.manual_seed seeds every CUDA device too (queued until CUDA starts), without
    # asking for a device here: a user's command may fork DataLoader workers after this.
    torch.manual_seed(seed)


def script_loader_generator(torch, index: int):
    """The generator of a user's DataLoader made without one (its `index`-th): from torch's
    seed when the loader is made, which is the run's seed, or the script's own
    torch.manual_seed(...) if it sets one (a sweep over the script's --seed)."""
    generator = torch.Generator()
    generator.manual_seed(stream_seed(torch.initial_seed(), "dataloader", index))
    return generator


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: deaf to the preemption signals, and seeded.

    The signals are for the training process, which checkpoints at the next step boundary
    and then stops its workers itself; a worker killed by a scheduler's SIGTERM (sent to
    every process of a job) would make the next batch fail instead. Python and numpy are
    seeded from the worker's torch seed, which the DataLoader derives from its seeded
    generator (base seed + worker id)."""
    import signal

    import numpy as np
    import torch

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def epoch_generator(seed: int, epoch: int):
    """The generator that orders epoch `epoch`: a pure function of (seed, epoch), so that an
    epoch can be re-created exactly on resume and does not depend on earlier epochs."""
    import torch

    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return generator


def worker_generator(seed: int, epoch: int):
    """Seeds the DataLoader's base seed for its workers: a stream of its own (seed + 1),
    apart from the epoch order's generator (seed), so the two never draw the same numbers."""
    return epoch_generator(seed + 1, epoch)


# ---------------------------------------------------------------- per-sample randomness

# Streams keep the training and evaluation samples' randomness apart.
TRAIN_STREAM, EVAL_STREAM = 0, 1


def sample_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 64-bit seed that is a pure function of (seed, stream, epoch, sample index)."""
    key = f"{seed}/{stream}/{epoch}/{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class SeededSamples:
    """`dataset[i]` with python `random`, numpy's global generator and torch's CPU generator
    seeded from (seed, stream, epoch, i) right before the sample is built.

    Why: a dataset that augments (random crops, flips, noise) draws from whatever generator
    state the process it runs in has. In DataLoader workers that state depends on which
    worker fetched the sample and on how many batches it fetched before, so results changed
    with `num_workers` and a resumed run (whose workers restart) drew other numbers than the
    uninterrupted one. Seeding per sample makes each sample's randomness independent of the
    worker, of `num_workers` and of where a resume started; it costs one seeding per sample
    (see `make bench`).

    In the training process itself (num_workers=0) the generators' states are saved before a
    batch and restored after it, so the main process's stream (dropout, say) is the same as
    when workers build the batches.
    """

    def __init__(self, dataset, seed: int, epoch: int, stream: int = TRAIN_STREAM):
        self.dataset, self.seed, self.epoch, self.stream = dataset, seed, epoch, stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        """The DataLoader's batched fetch: one save/restore per batch, one seeding per
        sample."""
        import torch

        in_main_process = torch.utils.data.get_worker_info() is None
        saved = _generator_states() if in_main_process else None
        try:
            samples = []
            for index in indices:
                _seed_generators(sample_seed(self.seed, self.stream, self.epoch, int(index)))
                samples.append(self.dataset[index])
            return samples
        finally:
            if saved is not None:
                _restore_generator_states(saved)


def _seed_generators(seed64: int) -> None:
    import numpy as np
    import torch

    random.seed(seed64)
    np.random.seed(seed64 & 0xFFFFFFFF)  # the legacy generator takes 32-bit seeds
    torch.default_generator.manual_seed(seed64)  # CPU only: GPU streams stay untouched


def _generator_states():
    import numpy as np
    import torch

    return random.getstate(), np.random.get_state(), torch.default_generator.get_state()


def _restore_generator_states(states) -> None:
    import numpy as np
    import torch

    python, numpy, cpu = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.default_generator.set_state(cpu)


def stream_seed(seed: int, *stream: Any) -> int:
    """A 63-bit seed that is a pure function of the run's seed and a stream name."""
    key = "/".join(map(str, (seed, *stream))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def rng_state() -> Dict[str, Any]:
    """Every generator a training step may draw from, in a form torch.load accepts with
    weights_only=True (tensors and plain Python values only)."""
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise CheckpointRefused(
                f"the checkpoint holds RNG states for {len(state['cuda'])} CUDA device(s) but "
                f"this process sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                f"resume on a node with the same GPUs.")
        torch.cuda.set_rng_state_all(state["cuda"])
