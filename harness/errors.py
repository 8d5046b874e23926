"""User-facing errors. Each carries a message that says how to fix the problem and the
exit code the CLI returns for it; the CLI catches them once and prints the message.

EXIT_CODES is the one list of exit codes: `harness --help` renders it, and a test checks
that README.md says the same (exit_codes_text).
"""

EXIT_CODES = (
    (0, "ok"),
    (1, "run failed (`harness run`: the command's own exit code)"),
    (2, "invalid input"),
    (3, "data missing or corrupt"),
    (4, "environment part missing"),
    (5, "damaged lockfile"),
    (6, "replay or resume refused"),
    (7, "diverged"),
    (8, "unverified (nothing was compared, or the comparison could not tell a perturbed run "
        "apart)"),
    (75, "preempted (a checkpoint was written; continue with `harness train --resume RUN`)"),
)


def exit_codes_text() -> str:
    return "Exit codes: " + ", ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES) + "."


# Exit code of a training process that stopped on SIGTERM/SIGUSR1 after writing a
# checkpoint: "preempted, requeue me". 75 is EX_TEMPFAIL (sysexits.h): a temporary failure,
# the invoker is invited to retry. The Slurm job script requeues on it; the launcher marks
# the run `preempted`.
REQUEUE_EXIT = 75


def first_line(error: "BaseException | str", limit: int = 300) -> str:
    """The first non-empty line of an error (or of a text), cut at `limit` characters:
    what a message quotes of a library's error, whose later lines are a traceback or a
    server's page."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return text.splitlines()[0][:limit]


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


class CheckpointRefused(HarnessError):
    """A checkpoint (or a resume request) that does not belong to this run as it is now."""

    exit_code = 6


class RunBusy(HarnessError):
    """Another process is writing the run directory (one writer at a time)."""

    exit_code = 6


class Diverged(HarnessError):
    exit_code = 7


class Unverified(HarnessError):
    """A comparison that its negative control shows cannot fail."""

    exit_code = 8


class Preempted(HarnessError):
    """The training stopped on SIGTERM/SIGUSR1 after writing a checkpoint."""

    exit_code = REQUEUE_EXIT
