"""Render the Slurm batch script of `harness submit` (pure text: golden-tested).

One script serves one run or a job array: RUN_DIRS lists the prepared run directories and
SLURM_ARRAY_TASK_ID picks one. The script forwards USR1/TERM to the training and requeues
on errors.REQUEUE_EXIT. The training runs through a container runtime on the node:
`none` (the harness venv on a shared filesystem), `docker`, `apptainer` or `pyxis`.

The job gets none of the submitting environment (`--export=NONE`): Slurm would otherwise
copy all of it, tokens and keys included, into its stored job record and the training.
The script exports what the run needs itself: the pinned variables and the few allow-listed
ones of JOB_ENV (`job_environment`).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from harness import __version__
from harness.config.schema import DockerConf
from harness.containers.sandbox import DATA_MOUNT, RUN_MOUNT, docker_cli_flags
from harness.env import RANKS, SLURM_JOB
from harness.errors import REQUEUE_EXIT, ConfigError
from harness.rundir import SLURM_LOG, TRAINING_MODULE

TEMPLATE = Path(__file__).resolve().parent / "templates" / "sbatch.sh"
RUNTIMES = ("none", "docker", "apptainer", "pyxis")
# The only variables of the submitting environment the job script exports (if set there),
# beside the pinned ones. Never credentials: anything not named here stays behind.
# Slurm sets SLURM_* and CUDA_VISIBLE_DEVICES on the node itself.
JOB_ENV = (
    "PATH",  # the script runs date, hostname, scontrol and the container runtime's client
    "HOME",  # ~/.cache, the container runtime's per-user configuration
    "PYTHONPATH",  # components plugged in by import path (model._target_=mypkg.Net)
    "XDG_CACHE_HOME",  # caches of the harness and torch
    "DOCKER_HOST",  # runtime docker: which engine
    # Settings that change the math: recorded in the lockfile, gated on replay.
    "NCCL_ALGO", "NCCL_PROTO", "TORCH_CUDNN_V8_API_DISABLED", "CUDA_LAUNCH_BLOCKING",
)


@dataclass
class JobSpec:
    job_name: str
    run_dirs: List[Path]  # prepared run directories; more than one: a job array
    data_roots: List[Optional[Path]]  # one per run directory
    env: Dict[str, str]  # the pinned environment (determinism.pinned_environment)
    slurm: Dict  # backend.slurm of the resolved config
    device: str = "cpu"  # trainer.device
    python: str = "python3"  # runtime none: interpreter on the node
    log_dir: Optional[Path] = None  # arrays: where Slurm writes before the script redirects
    extra_train_args: List[str] = field(default_factory=list)
    # backend.docker of the config: the container sandbox (harness/containers/sandbox.py)
    sandbox: DockerConf = field(default_factory=DockerConf)
    job_env: Dict[str, str] = field(default_factory=dict)  # job_environment(): JOB_ENV values
    devices: int = 1  # trainer.devices: ranks per node (one srun task each)
    nodes: int = 1  # trainer.nodes
    tracked: bool = False  # a tracker is selected: the job runs the tracking follower

    @property
    def world(self) -> int:
        return self.devices * self.nodes


def job_environment(environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The JOB_ENV variables of `environ` (the submitting environment) that are set."""
    return {name: environ[name] for name in JOB_ENV if name in environ}


def q(value) -> str:
    return shlex.quote(str(value))


def gpus_wanted(spec: JobSpec) -> int:
    """GPUs per node: backend.slurm.gpus, or one per rank of a CUDA run."""
    gpus = int(spec.slurm.get("gpus") or 0)
    if spec.device.startswith("cuda") and gpus == 0:
        gpus = spec.devices
    return gpus


def sbatch_options(spec: JobSpec) -> List[str]:
    slurm = spec.slurm
    options = [f"--job-name={spec.job_name}"]
    if slurm.get("partition"):
        options.append(f"--partition={slurm['partition']}")
    tasks = ["--nodes=1", "--ntasks=1"] if spec.world == 1 else \
        [f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.devices}"]  # a task per rank
    options += [f"--time={slurm['time']}", *tasks, f"--cpus-per-task={slurm['cpus_per_task']}"]
    if slurm.get("mem"):
        options.append(f"--mem={slurm['mem']}")
    gpus = gpus_wanted(spec)
    constraints = []
    if gpus:
        gpu_type = slurm.get("gpu_type")
        if not gpu_type:
            raise ConfigError(
                "this config asks for a GPU (trainer.device=cuda or backend.slurm.gpus>0) but "
                "backend.slurm.gpu_type is not set: bitwise results hold only on one GPU model, "
                "so the job must pin it. Set e.g. backend.slurm.gpu_type=h100 (the cluster's "
                "gres type and node feature for that model).")
        options.append(f"--gres=gpu:{gpu_type}:{gpus}")
        constraints.append(gpu_type)
    if slurm.get("constraint"):
        constraints.append(slurm["constraint"])
    if constraints:
        options.append(f"--constraint={'&'.join(constraints)}")
    options.append(f"--signal=B:USR1@{slurm['signal_before_s']}")
    options.append("--requeue" if slurm.get("requeue", True) else "--no-requeue")
    options.append("--open-mode=append")
    options.append("--export=NONE")  # the script exports what the job needs (JOB_ENV)
    if len(spec.run_dirs) == 1:
        options.append(f"--output={spec.run_dirs[0] / SLURM_LOG}")
    else:
        log_dir = spec.log_dir or spec.run_dirs[0].parent / ".slurm"
        options.append(f"--output={log_dir / (spec.job_name + '-%A_%a.out')}")
        options.append(f"--array=0-{len(spec.run_dirs) - 1}")
    options += list(slurm.get("extra_sbatch") or [])
    return options


def train_command(spec: JobSpec) -> str:
    """The command line that runs the training for "$RUN_DIR" on the node."""
    runtime = str(spec.slurm.get("runtime") or "none")
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown backend.slurm.runtime '{runtime}'; valid runtimes: "
                          f"{', '.join(RUNTIMES)}")
    if runtime == "none":
        return _venv_command(spec)
    return _container_command(spec, runtime)


def _extra_args(spec: JobSpec) -> str:
    return "".join(f" {q(a)}" for a in spec.extra_train_args)


def _venv_command(spec: JobSpec) -> str:
    """Runtime none: the harness venv on a shared filesystem; a data-parallel job runs it
    through srun, one task per rank."""
    data = ' --data-root "$DATA_ROOT"' if any(spec.data_roots) else ""
    train = f'{q(spec.python)} -u -m {TRAINING_MODULE} "$RUN_DIR"{data}{_extra_args(spec)}'
    if spec.world == 1:
        return train
    # One task per rank; a task that fails ends the step (-K), not a hang.
    return " \\\n    ".join([
        f"srun --kill-on-bad-exit=1 --distribution=block --nodes={spec.nodes} "
        f"--ntasks-per-node={spec.devices}"
        f" --cpus-per-task={spec.slurm['cpus_per_task']}",
        f"--export=ALL,{RANKS}=slurm", train])


def _container_command(spec: JobSpec, runtime: str) -> str:
    """Runtimes docker, apptainer and pyxis: the pinned image, with the same sandbox as
    the docker backend (harness/containers/sandbox.py)."""
    has_data = any(spec.data_roots)
    if spec.world > 1:
        raise ConfigError(f"a data-parallel job (trainer.devices × trainer.nodes = "
                          f"{spec.world}) runs with backend.slurm.runtime=none for now; "
                          f"runtime={runtime} is not available for it yet.")
    image = spec.slurm.get("image")
    if not image or "@sha256:" not in image:
        raise ConfigError(
            f"backend.slurm.runtime={runtime} needs backend.slurm.image pinned by digest "
            f"(REPO@sha256:...), got {image!r}: a tag can move between the submit and the "
            f"job, and replays need the exact image. `docker inspect --format "
            f"'{{{{index .RepoDigests 0}}}}' IMAGE` prints it; or leave it null, and "
            f"`harness submit` builds the config's image profile, pushes it and uses its "
            f"digest.")
    python = q(spec.slurm.get("container_python") or "python")
    data = f" --data-root {DATA_MOUNT}" if has_data else ""
    inner = f"{python} -u -m {TRAINING_MODULE} {RUN_MOUNT}{data}{_extra_args(spec)}"
    gpus = gpus_wanted(spec)
    names = list(spec.env) + list(SLURM_JOB)
    if runtime == "docker":
        user = spec.slurm.get("container_user") or "$(id -u):$(id -g)"
        user = f'"{user}"' if user.startswith("$(") else q(user)
        flags = docker_cli_flags(spec.sandbox, user)
        lines = ['docker run --rm --name "harness-${SLURM_JOB_ID}"',
                 " ".join(flags[:4]), " ".join(flags[4:-1]), flags[-1]]
        if gpus:
            lines.append('--gpus "\\"device=${CUDA_VISIBLE_DEVICES}\\""')
        lines.append(" ".join(f"-e {name}" for name in names))
        mounts = f'-v "$RUN_DIR":{RUN_MOUNT}:rw'
        if has_data:
            mounts = f'-v "$DATA_ROOT":{DATA_MOUNT}:ro ' + mounts
        lines += [mounts, f"-w {RUN_MOUNT} {q(image)}", inner]
    elif runtime == "apptainer":
        source = image if image.startswith(("/", "docker://", "oras://")) else f"docker://{image}"
        lines = ["apptainer exec --containall --cleanenv --no-home --writable-tmpfs"]
        if gpus:
            lines.append("--nv")
        lines.append(" ".join(f'--env "{name}=${{{name}:-}}"' for name in names))
        binds = f'--bind "$RUN_DIR":{RUN_MOUNT}:rw'
        if has_data:
            binds = f'--bind "$DATA_ROOT":{DATA_MOUNT}:ro ' + binds
        lines += [binds, f"--pwd {RUN_MOUNT} {q(source)}", inner]
    else:  # pyxis
        mounts = f'"$RUN_DIR":{RUN_MOUNT}:rw'
        if has_data:
            mounts = f'"$DATA_ROOT":{DATA_MOUNT}:ro,' + mounts
        lines = ["srun --ntasks=1 --export=ALL",
                 f"--container-image={q(image)}",
                 f"--container-mounts={mounts}",
                 f"--container-workdir={RUN_MOUNT} --no-container-mount-home",
                 inner]
    return " \\\n    ".join(lines)


def exports(spec: JobSpec) -> str:
    """The script's `export` lines: the pinned variables, then those of JOB_ENV."""
    lines = [f"export {k}={q(v)}" for k, v in spec.env.items()]
    job_env = {k: v for k, v in spec.job_env.items() if k not in spec.env}
    if job_env:
        lines.append("# Allow-listed from the submitting environment (sbatch.JOB_ENV); "
                     "--export=NONE: nothing else.")
        lines += [f"export {k}={q(v)}" for k, v in job_env.items()]
    return "\n".join(lines)


def rendezvous(spec: JobSpec) -> str:
    """A data-parallel job's rendezvous: rank 0 runs on the first node of the job's node
    list (Slurm numbers tasks in that order), where this script runs too; the port is one
    the kernel hands out free there (a port derived from the job id could be taken)."""
    if spec.world == 1:
        return ""
    free_port = ("import socket; s = socket.socket(); s.bind((\"\", 0)); "
                 "print(s.getsockname()[1])")
    return "\n".join([
        f"# Data-parallel: {spec.world} ranks, one srun task each; rank = SLURM_PROCID, in "
        f"node list order.",
        "# This script runs on the first node of the list: rank 0's, and the rendezvous.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'export MASTER_PORT="$({q(spec.python)} -c {q(free_port)})"'])


def tracking_lines(spec: JobSpec) -> Tuple[str, str]:
    """Lines before the training and after it of a tracked job: a follower sends the run to
    its trackers while it trains (no launcher waits for a batch job) and learns the
    training's exit code on its stdin (fd 9) at the end."""
    if not spec.tracked:
        return "", ""
    return ("# tracker: a follower sends the run's metrics to it while it trains and reads the\n"
            "# training's exit code on its stdin at the end (harness/record/tracking.py).\n"
            f'exec 9> >({q(spec.python)} -u -m harness.record.tracking follow "$RUN_DIR")\n'
            "tracker=$!\n\n",
            '\n# A subshell: were the follower gone, SIGPIPE would end it, not this script.\n'
            '(echo "$code" >&9) 2>/dev/null || say "the tracking follower is gone"\n'
            'exec 9>&-\n'
            'while kill -0 "$tracker" 2>/dev/null; do  # a trap may interrupt a wait\n'
            '    wait "$tracker"\n'
            'done\n')


def render(spec: JobSpec) -> str:
    if not spec.run_dirs or len(spec.run_dirs) != len(spec.data_roots):
        raise ValueError("one data root per run directory")
    array = len(spec.run_dirs) > 1
    text = TEMPLATE.read_text()
    values = {
        "VERSION": __version__,
        "RUNTIME": str(spec.slurm.get("runtime") or "none"),
        "REQUEUE_EXIT": str(REQUEUE_EXIT),
        "SBATCH": "\n".join(f"#SBATCH {o}" for o in sbatch_options(spec)),
        "RUN_DIRS": "\n".join(f"    {q(d)}" for d in spec.run_dirs),
        "DATA_ROOTS": "\n".join(f"    {q(d) if d else q('')}" for d in spec.data_roots),
        "REDIRECT": (f'exec >>"$RUN_DIR/{SLURM_LOG}" 2>&1  # each array task logs into its '
                     f'own run directory') if array else f"# log: $RUN_DIR/{SLURM_LOG}",
        "EXPORTS": exports(spec),
        "COMMAND": train_command(spec),
    }
    rendezvous_lines = rendezvous(spec)
    text = text.replace("@RENDEZVOUS@\n", rendezvous_lines + "\n" if rendezvous_lines else "")
    start, end = tracking_lines(spec)
    text = text.replace("@TRACKER_START@\n", start).replace("@TRACKER_END@\n", end)
    if spec.tracked:
        values["COMMAND"] += " 9>&-"  # the follower's stdin is the script's alone
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text
