"""User-facing errors. Each carries a message that says how to fix the problem and the
exit code the CLI returns for it; the CLI catches them once and prints the message.

Exit codes (also in README.md and `harness --help`):
  1  the training run itself failed (see its train.log); a `harness run` exits with its
     command's own exit code
  2  invalid input: unknown config, bad override, wrong type, bad argument
  3  data missing or corrupt
  4  an environment part is missing or down (Docker engine, Slurm, GPU runtime)
  5  a lockfile is damaged or was tampered with
  6  replay or resume refused: the environment (or config) differs in a way that breaks
     bitwise equality
  7  replay or verify ran, and the results DIVERGED
 75  training stopped on SIGTERM/SIGUSR1 after writing a checkpoint: requeue or resume it
     (EX_TEMPFAIL; the Slurm job script requeues on it)
"""


# Exit code of a training process that stopped on SIGTERM/SIGUSR1 after writing a
# checkpoint: "preempted, requeue me". 75 is EX_TEMPFAIL (sysexits.h): a temporary failure,
# the invoker is invited to retry. The Slurm job script requeues on it; the launcher marks
# the run `preempted`.
REQUEUE_EXIT = 75


class HarnessError(Exception):
    exit_code = 1


class RunFailed(HarnessError):
    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code  # a `harness run` command's own exit code


class ConfigError(HarnessError):
    exit_code = 2


class DataError(HarnessError):
    exit_code = 3


class EnvironmentProblem(HarnessError):
    exit_code = 4


class LockfileError(HarnessError):
    exit_code = 5


class ReplayRefused(HarnessError):
    exit_code = 6


class RunBusy(HarnessError):
    """Another process is writing the run directory (one writer at a time)."""

    exit_code = 6


class Diverged(HarnessError):
    exit_code = 7
