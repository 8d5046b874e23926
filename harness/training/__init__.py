"""The training process: `python -m harness.train RUN_DIR` runs loop.py, the built-in loop,
or the user's command (script/runner.py), inside one runtime (runtime.py). Beside them:
seeding, the determinism settings and why each is set (determinism.py, portable.py,
nondeterminism.py), data-parallel ranks (distributed.py), checkpoints, the audit of what
was in effect, the bundled datasets and models, the op trace of the first steps
(op_tracer.py), and injected perturbations for negative controls (perturb.py).

A middle layer beside record and script. loop.py, runtime.py and models.py import torch at
module level; nothing outside the training process imports them at module level."""
