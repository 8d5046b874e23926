"""`from harness import runtime`: the public API a user's script may call under `harness run`
(seed, generator, worker_init_fn, record_output). It lives in
harness/training/runtime.py, with the runtime every training process runs inside."""

from harness.training.runtime import generator, record_output, seed, worker_init_fn

__all__ = ["generator", "record_output", "seed", "worker_init_fn"]
