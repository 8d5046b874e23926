#!/bin/bash
# Slurm batch script rendered by `harness submit` (harness @VERSION@); a copy is kept in
# each run directory as job.sbatch. It runs `python -m harness.train RUN_DIR` through the
# @RUNTIME@ runtime, forwards USR1 (time limit near) and TERM (preemption) to it, and
# requeues the job when the training exits with @REQUEUE_EXIT@ (it wrote a checkpoint; the
# restarted job, SLURM_RESTART_COUNT > 0, resumes from it). See docs/slurm.md.
@SBATCH@
set -uo pipefail

RUN_DIRS=(
@RUN_DIRS@
)
DATA_ROOTS=(
@DATA_ROOTS@
)
TASK="${SLURM_ARRAY_TASK_ID:-0}"
RUN_DIR="${RUN_DIRS[$TASK]}"
DATA_ROOT="${DATA_ROOTS[$TASK]}"
REQUEUE_EXIT=@REQUEUE_EXIT@
@REDIRECT@
# Pinned before the interpreter starts (harness/training/determinism.py says why each one).
@EXPORTS@
@RENDEZVOUS@

say() { echo "harness-job: $(date -u +%Y-%m-%dT%H:%M:%SZ) $*"; }
say "job ${SLURM_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on $(hostname): $RUN_DIR"
cd "$RUN_DIR" || { say "cannot enter $RUN_DIR"; exit 1; }

child=""
got_term=0
forward() {  # a bash trap runs only while the script waits: hence `& wait` below
    say "got SIG$1; forwarding it to the training (pid ${child:-none})"
    if [[ -n $child ]]; then kill -s "$1" "$child" 2>/dev/null; fi
}
trap 'forward USR1' USR1
trap 'got_term=1; forward TERM' TERM

@TRACKER_START@
@COMMAND@ &
child=$!
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
done
wait "$child"
code=$?
@TRACKER_END@

if [[ $code -eq $REQUEUE_EXIT ]]; then
    if [[ $got_term -eq 1 ]]; then
        say "training checkpointed after SIGTERM (requeue or cancel): Slurm decides what runs next"
    else
        say "training checkpointed; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue $SLURM_JOB_ID failed"
    fi
else
    say "training exited with code $code"
fi
exit "$code"
