"""The run configuration's typed schema: one dataclass per config group, with every default
written once, here. `typed` turns a resolved config (what config.yaml holds) into these
dataclasses and `plain` turns them back into data."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.errors import ConfigError

BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
SEED_LIMIT = 2**32  # numpy seeds must be below this
# determinism.cpu_isa's values: native (no pin), or a pin of harness/training/determinism.py's
# CPU_ISA table, which says what each sets and why.
CPU_ISA_MODES = ("native", "default", "avx2", "avx512", "portable")


class DeterminismMode(Enum):
    strict = "strict"  # deterministic algorithms enforced: a nondeterministic op raises
    warn = "warn"  # deterministic algorithms preferred: a nondeterministic op warns
    off = "off"  # nothing enforced (seeds are still set)


@dataclass
class DeterminismConf:
    mode: DeterminismMode = DeterminismMode.strict
    threads: int = 2  # torch intra-op threads and OMP/MKL_NUM_THREADS
    pythonhashseed: Optional[int] = 0  # None: not pinned (PYTHONHASHSEED=random)
    cublas_workspace_config: str = ":4096:8"
    # CPU kernels: native (what torch picks for this CPU), a pin (default, avx2, avx512)
    # that makes results independent of a newer ISA the machine may have, or portable:
    # built for the same bits on any x86-64 CPU with AVX2, Intel or AMD (determinism.py).
    cpu_isa: str = "native"


@dataclass
class DataFile:
    file: str = MISSING  # file name as published (".gz" or raw IDX)
    sha256: str = MISSING  # sha256 of the decompressed content: the data's identity


@dataclass
class DataConf:
    name: str = MISSING
    dirname: Optional[str] = None  # directory name under the standard locations
    root: Optional[str] = None  # explicit directory holding the files
    mirrors: List[str] = field(default_factory=list)
    files: Dict[str, DataFile] = field(default_factory=dict)
    dataset: Any = MISSING  # `_target_` building a dataset: called with root=, split=
    debian_package: Optional[str] = None  # Debian package that installs the files


@dataclass
class TrainerConf:
    epochs: int = 3
    max_steps: Optional[int] = None  # stop after this many steps (None: run all epochs)
    batch_size: int = 64
    eval_batch_size: int = 1000
    num_workers: int = 0
    train_limit: Optional[int] = None  # use only the first N training samples
    eval_limit: Optional[int] = None  # evaluate on the first N test samples
    log_every: int = 100  # progress line every N steps (metrics are logged every step)
    fingerprint_every: int = 100  # parameter digest every N steps, for divergence reports
    # every op of the first N steps, hashed bit for bit (op-trace.jsonl.gz), so that a
    # divergence is named down to the op (harness/record/op_trace.py); 0: off. Unset (null): the
    # default, OP_TRACE_STEPS (see LEFT_OUT_WHILE_UNSET).
    op_trace_steps: Optional[int] = None
    # true: also keep every traced op's outputs, whole (op-trace-tensors.pt), so that
    # `harness replay --all-divergences` can go on past the first op that differs. Unset
    # (null): false (see LEFT_OUT_WHILE_UNSET).
    op_trace_tensors: Optional[bool] = None
    checkpoint_every: int = 1000
    # true: a checkpoint is written by a thread of its own while training goes on; the loop
    # stops only to copy the state off the device (harness/training/checkpoint.py,
    # BackgroundSaver). Its bits and its durability are a synchronous save's. Unset (null):
    # false (see LEFT_OUT_WHILE_UNSET).
    checkpoint_async: Optional[bool] = None
    device: str = "auto"  # cpu, cuda, cuda:N, or auto: cuda where NVML sees a GPU, else cpu
    # Data-parallel training (DistributedDataParallel; docs/distributed.md): devices ranks
    # on each of `nodes` machines (nodes > 1: backend=slurm). batch_size is per rank.
    devices: int = 1
    nodes: int = 1
    bucket_cap_mb: int = 25  # DDP gradient bucket size: decides what is reduced together
    collective_timeout_s: int = 300  # a collective waiting longer (a peer is gone) fails


@dataclass
class DockerConf:
    """How backend=docker (and auto, when it picks docker) runs the training container."""
    user: str = "10001:10001"  # non-root uid:gid inside the container
    shm_size: str = "1g"  # /dev/shm for DataLoader workers
    network: str = "none"  # data arrives before training; the container needs no network
    gpus: str = "all"  # with trainer.device=cuda: "all" or a count
    stop_timeout_s: int = 10  # grace between SIGTERM and SIGKILL on stop
    # host dirs mounted read-only, on PYTHONPATH
    pythonpath: List[str] = field(default_factory=list)
    labels: Dict[str, str] = field(default_factory=dict)  # extra container labels


@dataclass
class ImageConf:
    """The container image a docker run trains in (conf/image/<profile>.yaml)."""
    profile: str = "cpu"
    base: Optional[str] = None  # base image pinned by digest: REPO@sha256:...
    python: str = "python3"  # interpreter in the base that creates /opt/venv
    python_version: str = "3.11"  # Python the wheels are locked for
    requirements: str = "docker/requirements-cpu.in"  # top-level pins (relative: project root)
    lock: str = "docker/requirements-cpu.lock"  # hash-locked closure of `requirements`
    torch_index: Optional[str] = None  # extra wheel index for torch (CUDA builds)
    repository: str = "harness/train-cpu"  # local image name; the tag is a content hash
    registry: Optional[str] = "127.0.0.1:5000"  # where `harness build --push` pushes
    build_network: str = "none"  # network of RUN steps during the build
    system_setup: str = ""  # Dockerfile lines run before the Python setup
    env: Dict[str, str] = field(default_factory=dict)  # extra ENV baked into the image


class SlurmRuntime(Enum):
    none = "none"  # the harness venv on a shared filesystem
    docker = "docker"  # `docker run` on the node, locked down
    apptainer = "apptainer"  # `apptainer exec` (Singularity)
    pyxis = "pyxis"  # `srun --container-image` (Pyxis/enroot)


@dataclass
class SlurmConf:
    """How `harness submit --backend slurm` asks for resources (conf/backend/slurm.yaml
    extends it)."""
    partition: Optional[str] = None  # None: the cluster's default partition
    time: str = "01:00:00"  # time limit (sbatch --time)
    cpus_per_task: int = 2
    mem: Optional[str] = None  # e.g. "16G"; None: the partition's default
    gpus: int = 0  # GPUs per job (--gres=gpu[:TYPE]:N)
    gpu_type: Optional[str] = None  # e.g. h100: pins the GPU model (gres type + --constraint)
    constraint: Optional[str] = None  # extra node features (&-joined with gpu_type)
    signal_before_s: int = 120  # --signal=B:USR1@N: checkpoint N s before the time limit
    requeue: bool = True  # --requeue: a preempted job is queued again and resumes
    runtime: SlurmRuntime = SlurmRuntime.none
    image: Optional[str] = None  # container image pinned by digest (REPO@sha256:...)
    python: Optional[str] = None  # runtime none: interpreter on the node (default: this one)
    container_python: str = "python"  # interpreter inside the container
    container_user: Optional[str] = None  # docker --user; None: the job's own uid:gid
    extra_sbatch: List[str] = field(default_factory=list)  # more "--opt=value" lines
    poll_s: float = 2.0  # `harness submit --wait` polling interval


@dataclass
class BackendConf:
    name: str = "local"
    docker: DockerConf = field(default_factory=DockerConf)
    slurm: SlurmConf = field(default_factory=SlurmConf)


@dataclass
class MlflowConf:
    enabled: bool = False  # log the run to MLflow, live (harness/record/tracking.py)
    # Any MLflow tracking URI (http://host:5000, sqlite:///path.db, databricks, ...); null:
    # a SQLite store in <runs dir>/.mlflow (browse it: mlflow ui --backend-store-uri ...).
    tracking_uri: Optional[str] = None
    experiment: str = "harness"  # created when missing


@dataclass
class TrackerConf:
    """Where the launcher sends each run's metrics while it trains, and its config, lockfile
    and model when it ends. The training process itself never talks to a tracker."""
    tensorboard: bool = False  # TensorBoard event files in runs/<id>/tensorboard/
    mlflow: MlflowConf = field(default_factory=MlflowConf)


@dataclass
class SeedsConf:
    """A seed per source of randomness of the built-in loop (harness/training/seeding.py,
    source_seeds): null takes the one derived from `seed`. Vary one and the other streams
    stay as they were (`harness variance` does, source by source)."""
    init: Optional[int] = None  # the model's initial weights
    order: Optional[int] = None  # each epoch's sample order
    augment: Optional[int] = None  # each sample's random augmentation
    dropout: Optional[int] = None  # dropout masks (null: continues the init stream)


@dataclass
class RunConf:
    name: str = MISSING
    seed: Optional[int] = None  # None: the harness draws one at launch and records it
    seeds: SeedsConf = field(default_factory=SeedsConf)
    model: Any = MISSING
    optim: Any = MISSING
    # A `_target_` factory called with optimizer= and total_steps= (OneCycleLR fits), or
    # null for a constant learning rate. Stepped after every optimizer step.
    scheduler: Any = None
    data: DataConf = field(default_factory=DataConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    determinism: DeterminismConf = field(default_factory=DeterminismConf)
    backend: BackendConf = field(default_factory=BackendConf)
    tracker: TrackerConf = field(default_factory=TrackerConf)
    image: ImageConf = field(default_factory=ImageConf)


@dataclass
class CommandConf:
    """The user's own command (`harness run -- CMD...`) and what it reads and writes."""
    argv: List[str] = field(default_factory=list)  # the command, as given after `--`
    inputs: List[str] = field(default_factory=list)  # --input: hashed before it starts
    outputs: List[str] = field(default_factory=list)  # --output: hashed after it ends
    # Seed and pin every Python process of the command (harness/script/injection/);
    # false leaves the command's processes alone (the pinned environment stays).
    inject: bool = True
    # Processes to start (--nproc): each with torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
    # LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, for a script that calls
    # init_process_group itself.
    nproc: int = 1
    # --env NAME=VALUE: variables the command needs, set for it and set again on replay
    # (the launcher's other variables are passed on, but only their names are recorded).
    env: Dict[str, str] = field(default_factory=dict)
    # SOURCE_DATE_EPOCH for the command: tools that embed a date (matplotlib's PDF and SVG,
    # Sphinx, reproducible tar/gzip builds) write this one, so a replay writes the same
    # bytes. null: this shell's SOURCE_DATE_EPOCH, else the launch time, drawn once.
    source_date_epoch: Optional[int] = None
    # With --nproc: once one process exited 0, how long the others may take to exit before
    # they are stopped and named with their stacks (a hang in a teardown, say).
    exit_grace_s: float = 30.0
    # every op of the command's first N optimizer steps, hashed bit for bit, in its main
    # process (harness/record/op_trace.py: the op a divergence starts at); 0: off; unset: the
    # default, OP_TRACE_STEPS
    op_trace_steps: Optional[int] = None


@dataclass
class DeviceConf:
    device: str = "auto"  # as trainer.device of the built-in loop


@dataclass
class ScriptRunConf:
    """A run of the user's own command (`harness run`, conf/run.yaml): no model or data of
    the harness's; the command's inputs and outputs are declared instead."""
    name: str = MISSING
    seed: Optional[int] = None
    command: CommandConf = field(default_factory=CommandConf)
    trainer: DeviceConf = field(default_factory=DeviceConf)
    determinism: DeterminismConf = field(default_factory=DeterminismConf)
    backend: BackendConf = field(default_factory=BackendConf)
    tracker: TrackerConf = field(default_factory=TrackerConf)
    image: ImageConf = field(default_factory=ImageConf)


RunConfig = Union[RunConf, ScriptRunConf]


def typed(cfg: Dict[str, Any]) -> RunConfig:
    """A resolved config (what config.yaml holds) as the schema's dataclasses: what the
    launcher hands the backends (LaunchSpec.conf). Sections that are hashed, written or
    sent on (the image, backend.slurm, the trackers) go back to plain data with `plain`."""
    schema = ScriptRunConf if is_script(cfg) else RunConf
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema),
                                                   _escaped(cfg)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {_first_line(exc)}. The run's config.yaml does "
                          f"not fit this harness's schema: use the harness version that "
                          f"wrote it.") from None


def _escaped(value: Any) -> Any:
    """A resolved config's strings with `${` escaped: a literal `${HOME}` that the config
    resolved from `\\${HOME}` (a shell command, a Dockerfile line) stays text."""
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return value.replace("${", "\\${") if isinstance(value, str) else value


def plain(section: Any) -> Any:
    """A typed config (or section of one) as plain data, enums as their names: the form
    config.yaml holds and config_sha256 hashes."""
    return _leave_out_unset(OmegaConf.to_container(OmegaConf.structured(section),
                                                   enum_to_str=True))


# The op trace's steps when a config leaves them unset.
OP_TRACE_STEPS = 1

# Fields added to the schema after run directories were first written. An older
# config.yaml lacks them, and its config_sha256 was taken without them: while unset (null)
# they are left out of the plain config, so that an old run's config, typed and back,
# hashes as recorded (a resume checks its checkpoints against that hash). A reader takes
# their absence as the default.
LEFT_OUT_WHILE_UNSET = (("trainer", "op_trace_steps"), ("command", "op_trace_steps"),
                        ("trainer", "checkpoint_async"), ("trainer", "op_trace_tensors"))


def _leave_out_unset(cfg: Any) -> Any:
    if isinstance(cfg, dict):
        for section, key in LEFT_OUT_WHILE_UNSET:
            part = cfg.get(section)
            if isinstance(part, dict) and key in part and part[key] is None:
                del part[key]
    return cfg


def op_trace_steps(section: Dict[str, Any]) -> int:
    """A trainer or command section's op trace steps: set, or the default."""
    value = section.get("op_trace_steps")
    return OP_TRACE_STEPS if value is None else value


def is_script(cfg: Dict[str, Any]) -> bool:
    """A run of the user's own command rather than of the built-in loop."""
    return "command" in cfg


GROUP_SCHEMAS = {"trainer": TrainerConf, "determinism": DeterminismConf,
                 "backend": BackendConf, "image": ImageConf, "tracker": TrackerConf,
                 "data": DataConf}
RUN_SCHEMAS = {"train_schema": RunConf, "run_schema": ScriptRunConf}


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    key = getattr(exc, "full_key", None)
    text = lines[0] if lines else type(exc).__name__
    return f"{text} (key: {key})" if key and key not in text else text
