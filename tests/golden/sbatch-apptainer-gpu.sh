#!/bin/bash
# Slurm batch script rendered by `harness submit` (harness 0.1.0); a copy is kept in
# each run directory as job.sbatch. It runs `python -m harness.train RUN_DIR` through the
# apptainer runtime, forwards USR1 (time limit near) and TERM (preemption) to it, and
# requeues the job when the training exits with 75 (it wrote a checkpoint; the
# restarted job, SLURM_RESTART_COUNT > 0, resumes from it). See docs/slurm.md.
#SBATCH --job-name=harness-mnist
#SBATCH --partition=gpu
#SBATCH --time=02:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --gres=gpu:h100:1
#SBATCH --constraint=h100
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --export=NONE
#SBATCH --output=/shared/runs/RUN-A/slurm.out
set -uo pipefail

RUN_DIRS=(
    /shared/runs/RUN-A
)
DATA_ROOTS=(
    /shared/data/mnist
)
TASK="${SLURM_ARRAY_TASK_ID:-0}"
RUN_DIR="${RUN_DIRS[$TASK]}"
DATA_ROOT="${DATA_ROOTS[$TASK]}"
REQUEUE_EXIT=75
# log: $RUN_DIR/slurm.out
# Pinned before the interpreter starts (harness/training/determinism.py says why each one).
export PYTHONHASHSEED=0
export CUBLAS_WORKSPACE_CONFIG=:4096:8
export OMP_NUM_THREADS=2
export MKL_NUM_THREADS=2
# Allow-listed from the submitting environment (sbatch.JOB_ENV); --export=NONE: nothing else.
export PATH=/shared/venv/bin:/usr/bin:/bin
export HOME=/home/alice
export PYTHONPATH=/shared/code

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

apptainer exec --containall --cleanenv --no-home --writable-tmpfs \
    --nv \
    --env "PYTHONHASHSEED=${PYTHONHASHSEED:-}" --env "CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-}" --env "OMP_NUM_THREADS=${OMP_NUM_THREADS:-}" --env "MKL_NUM_THREADS=${MKL_NUM_THREADS:-}" --env "SLURM_JOB_ID=${SLURM_JOB_ID:-}" --env "SLURM_ARRAY_JOB_ID=${SLURM_ARRAY_JOB_ID:-}" --env "SLURM_ARRAY_TASK_ID=${SLURM_ARRAY_TASK_ID:-}" --env "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-}" \
    --bind "$DATA_ROOT":/harness/data:ro --bind "$RUN_DIR":/harness/run:rw \
    --pwd /harness/run docker://127.0.0.1:5000/harness/train-cuda@sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd \
    python -u -m harness.train /harness/run --data-root /harness/data &
child=$!
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
done
wait "$child"
code=$?

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
