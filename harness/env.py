"""Every environment variable the harness reads, in one table: who sets it, who reads it,
and what it carries (as submitit's job environment). Three kinds:

- the user's: settings a user (or the machine's set-up) may export;
- contracts between the harness's own processes: the launcher, the backends, the training
  process (the built-in loop, a user's command under the injection, each rank);
- the scheduler's: what Slurm sets in a job's environment.

Code names a variable through this module, never by a literal (tests/unit/test_env.py
checks). The one exception is harness/script/injection/bootstrap/sitecustomize.py, which
runs before the harness package can be imported and reads the three it needs by name. A
base module: it imports nothing of the harness, so any process may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

PREFIX = "HARNESS_"  # the harness's own; a user's command does not see them recorded

# The user's.
RUNS = "HARNESS_RUNS"
CONFIG_DIR = "HARNESS_CONFIG_DIR"
DATA = "HARNESS_DATA"
STATE_DIR = "HARNESS_STATE_DIR"
CPU_BASE = "HARNESS_CPU_BASE"
CUDA_BASE = "HARNESS_CUDA_BASE"
WHEELHOUSE = "HARNESS_WHEELHOUSE"
SCRATCH = "HARNESS_SCRATCH"
CORPUS = "HARNESS_CORPUS"
REHASH = "HARNESS_REHASH"
SIGNING_KEY = "HARNESS_SIGNING_KEY"

# Contracts between the harness's processes.
SEED = "HARNESS_SEED"
RUN_DIR = "HARNESS_RUN_DIR"
RESUME = "HARNESS_RESUME"
INJECT = "HARNESS_INJECT"
DETERMINISM = "HARNESS_DETERMINISM"
OP_TRACE_STEPS = "HARNESS_OP_TRACE_STEPS"
OP_TRACE_RELOAD = "HARNESS_OP_TRACE_RELOAD"
SRC = "HARNESS_SRC"
LAUNCHER_PID = "HARNESS_LAUNCHER_PID"
HOST_NAME = "HARNESS_HOST_NAME"
RANKS = "HARNESS_RANKS"
PROGRESS_S = "HARNESS_PROGRESS_S"
AUDIT = "HARNESS_AUDIT"
WATCH_NONDETERMINISM = "HARNESS_WATCH_NONDETERMINISM"
PERTURB = "HARNESS_PERTURB"

# The scheduler's.
SLURM_JOB_ID = "SLURM_JOB_ID"
SLURM_ARRAY_JOB_ID = "SLURM_ARRAY_JOB_ID"
SLURM_ARRAY_TASK_ID = "SLURM_ARRAY_TASK_ID"
SLURM_RESTART_COUNT = "SLURM_RESTART_COUNT"
SLURM_PROCID = "SLURM_PROCID"
SLURM_NTASKS = "SLURM_NTASKS"
SLURM_LOCALID = "SLURM_LOCALID"
SLURM_NODEID = "SLURM_NODEID"
# A batch job's identity: recorded in its lock and passed to each task (sbatch.py).
SLURM_JOB = (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, SLURM_RESTART_COUNT)


@dataclass(frozen=True)
class Variable:
    name: str
    set_by: str
    read_by: str
    carries: str


USER, HARNESS, SLURM = "the user", "the harness", "Slurm"

TABLE: Tuple[Variable, ...] = (
    Variable(RUNS, USER, "rundir", "where run directories go (--runs-dir wins); default ./runs"),
    Variable(CONFIG_DIR, USER, "config.composition", "the configs folder (--config-dir "
                                                      "wins); default ./conf, else the "
                                                      "bundled configs"),
    Variable(DATA, USER, "training.datasets", "one more folder to look for datasets in"),
    Variable(STATE_DIR, "make docker-env / the user", "config.composition (harness_state_ref)",
             "what the machine's set-up left: the pinned base images' references"),
    Variable(CPU_BASE, USER, "conf/image/cpu.yaml (oc.env)", "the CPU image's base, pinned "
                                                              "by digest"),
    Variable(CUDA_BASE, USER, "conf/image/cuda.yaml (oc.env)", "the CUDA image's base, "
                                                                "pinned by digest"),
    Variable(WHEELHOUSE, USER, "containers.image", "the host's cache of downloaded wheels"),
    Variable(SCRATCH, USER, "containers.image", "where an image build spools its layers"),
    Variable(CORPUS, USER, "record.corpus", "the corpus of recorded machine classes"),
    Variable(REHASH, USER, "hash_cache, record.facts_cache", "1: trust no remembered hash "
                                                              "or capture; hash and capture "
                                                              "afresh"),
    Variable(SIGNING_KEY, USER, "record.signing", "a private key (PEM) of the user's own to "
                                                  "sign runs with"),
    Variable(SEED, "script.runner (harness run)",
             "script.injection.pinning, training.runtime.seed, the user's command",
             "the run's seed; public: a user's script may read it"),
    Variable(RUN_DIR, "script.runner", "script.injection.pinning, sitecustomize, "
                                       "training.runtime", "the run directory, absolute"),
    Variable(RESUME, "script.runner", "the user's command", "1 when the command runs again "
                                                            "after a preemption, else 0"),
    Variable(INJECT, "script.runner", "sitecustomize", "1: seed and pin each Python process "
                                                       "of the command (command.inject)"),
    Variable(DETERMINISM, "script.runner", "script.injection.pinning",
             "the run's determinism section, as JSON"),
    Variable(OP_TRACE_RELOAD, "commands.replay (--all-divergences)", "training.op_tracer",
             "a run directory: where an op's output bits differ from its trace, the op's "
             "output is replaced by that run's (op-trace-tensors.pt), and tracing goes on"),
    Variable(OP_TRACE_STEPS, "script.runner", "script.injection.pinning",
             "command.op_trace_steps"),
    Variable(SRC, "script.runner", "sitecustomize", "the folder holding the harness package, "
                                                    "for interpreters that do not have it "
                                                    "installed"),
    Variable(LAUNCHER_PID, "backends.local", "training.runtime, training.loop (ranks)",
             "the launcher's pid: a training process whose launcher died stops"),
    Variable(HOST_NAME, "backends.docker", "record.lockfile", "the host's name, recorded "
                                                              "instead of the container's id"),
    Variable(RANKS, "backends.sbatch (--export)", "training.distributed",
             "slurm: each srun task is one rank"),
    Variable(PROGRESS_S, "commands.train", "progress, training.loop",
             "seconds between live progress lines; unset: none"),
    Variable(AUDIT, "commands.verify (commands.doctor sets 0)",
             "training.audit, commands.train", "1: per-module digests of each step "
                                               "(harness verify)"),
    Variable(WATCH_NONDETERMINISM, "commands.doctor", "training.nondeterminism",
             "1: list the ops without a deterministic kernel"),
    Variable(PERTURB, "commands.replay --negative-control, tests",
             "training.perturb, commands.train",
             "weight-bit: flip one weight bit after the first step (a negative control)"),
    Variable(SLURM_JOB_ID, SLURM, "record.lockfile, backends.sbatch", "the batch job"),
    Variable(SLURM_ARRAY_JOB_ID, SLURM, "record.lockfile, backends.sbatch", "the array job"),
    Variable(SLURM_ARRAY_TASK_ID, SLURM, "record.lockfile, backends.sbatch", "the array task"),
    Variable(SLURM_RESTART_COUNT, SLURM, "record.lockfile, training.runtime",
             "how often the job was requeued: above 0, resume"),
    Variable(SLURM_PROCID, SLURM, "training.distributed", "the task's rank"),
    Variable(SLURM_NTASKS, SLURM, "training.distributed", "the world size"),
    Variable(SLURM_LOCALID, SLURM, "training.distributed", "the rank on its node"),
    Variable(SLURM_NODEID, SLURM, "training.distributed", "the node's rank"),
)
