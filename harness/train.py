"""`python -m harness.train RUN_DIR`: the training process's entry point, the name run
directories, lockfiles and job scripts give it. The process itself is
harness/training/loop.py; this module stays so that every run ever recorded still starts."""

from harness.training.loop import main, run_as_process

__all__ = ["main", "run_as_process"]

if __name__ == "__main__":
    run_as_process()
