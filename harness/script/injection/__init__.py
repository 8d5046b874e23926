"""The injection: what makes each Python process of a user's command run inside the
harness's runtime, without a line of the user's code changed.

- bootstrap/sitecustomize.py: the directory runner.py puts first on PYTHONPATH. Python
  imports `sitecustomize` at start-up, before the command's first line; the bootstrap only
  imports pinning.py and then chains the sitecustomize it shadows.
- pinning.py: the work, in the command's process: seeds python, numpy and torch, applies
  the determinism settings, records the op trace of the first steps, and reports what the
  process imported and changed (RUN_DIR/.script/<pid>.json) for the runner to put in the
  lock.

It imports only the standard library and the harness's base and training modules that do:
an interpreter other than the harness's own (another venv) must be able to import it."""
