"""Compose a run configuration with Hydra, validate it against typed schemas and resolve it
once, so that what a run saves in config.yaml is exactly what it ran with.

Hydra's compose API is used instead of `@hydra.main`, which owns argv and does not sit well
under subcommands; overrides keep Hydra's grammar (`key=value`, `+key=value`, `group=option`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import MISSING, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from harness.digest import canonical_json, canonical_sha256  # noqa: F401 (re-exported)
from harness.env import CONFIG_DIR, STATE_DIR
from harness.errors import ConfigError
from harness.seeding import SEED_LIMIT, draw_seed

BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


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
    # divergence is named down to the op (harness/op_trace.py); 0: off. Unset (null): the
    # default, OP_TRACE_STEPS (see LEFT_OUT_WHILE_UNSET).
    op_trace_steps: Optional[int] = None
    checkpoint_every: int = 1000
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
    enabled: bool = False  # log the run to MLflow, live (harness/tracking.py)
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
    """A seed per source of randomness of the built-in loop (harness/seeding.py,
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
    # Seed and pin every Python process of the command (harness/inject/sitecustomize.py);
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
    # process (harness/op_trace.py: the op a divergence starts at); 0: off; unset: the
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
LEFT_OUT_WHILE_UNSET = (("trainer", "op_trace_steps"), ("command", "op_trace_steps"))


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


def state_dir() -> Path:
    """What this machine's set-up left for the harness: $HARNESS_STATE_DIR, else
    ~/.local/state/harness."""
    return Path(os.environ.get(STATE_DIR) or os.path.join(
        os.path.expanduser("~"), ".local", "state", "harness"))


def state_ref(name: str) -> Optional[str]:
    """`${harness_state_ref:NAME}`: the image reference `make docker-env` pinned on this
    machine ($HARNESS_STATE_DIR/NAME.ref), or null when it has not run (a docker build then
    says how to get one)."""
    try:
        return (state_dir() / f"{name}.ref").read_text().strip() or None
    except OSError:
        return None


OmegaConf.register_new_resolver("harness_state_ref", state_ref, replace=True)


GROUP_SCHEMAS = {"trainer": TrainerConf, "determinism": DeterminismConf,
                 "backend": BackendConf, "image": ImageConf, "tracker": TrackerConf,
                 "data": DataConf}
RUN_SCHEMAS = {"train_schema": RunConf, "run_schema": ScriptRunConf}


def register_schemas() -> None:
    """The typed schemas in Hydra's ConfigStore, as what the bundled configs extend:
    `<group>/schema` for each group option (it writes only what it changes, so each default
    lives once, in the dataclasses above) and `train_schema` / `run_schema` for the primary
    configs, so that Hydra checks them against the schema while it composes.

    The image profile is not a default of the primary schemas: a config of the user's that
    extends a bundled one and lists `image: cuda` itself would then need `override image:`.
    `_image_overrides` adds the machine's profile where a config's defaults tree has none."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, node in GROUP_SCHEMAS.items():
        store.store(group=group, name="schema", node=node)
    for name, node in RUN_SCHEMAS.items():
        store.store(name=name, node=node)


register_schemas()


def default_image_profile() -> str:
    """`cuda` on a machine where a run can use an NVIDIA GPU (trainer.device=auto would
    choose it), else `cpu`."""
    from harness import gpu

    return gpu.choose_device()[0]


def _image_overrides(name: str, overrides: List[str]) -> List[str]:
    """Every run has an `image` group. A config that lists `image:` (itself, or through a
    config it extends) has it in its defaults tree, where `image=NAME` selects another; for
    one that does not (the bundled configs), it is added: `+image=NAME` as typed, else the
    machine's default profile. Hydra's own defaults tree of the config says which case this
    is."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    chosen = [o for o in overrides if o.lstrip("+").startswith("image=")]
    rest = [o for o in overrides if o not in chosen]
    loader = GlobalHydra.instance().config_loader()
    tree = loader.compute_defaults_list(config_name=name, overrides=rest, run_mode=RunMode.RUN)
    if "image" in tree.overrides.known_choices:
        return rest + [chosen[-1].lstrip("+")] if chosen else rest
    return rest + ["+" + (chosen[-1].lstrip("+") if chosen else
                          f"image={default_image_profile()}")]


def default_config_dir() -> Path:
    """`$HARNESS_CONFIG_DIR`, else `./conf` when it exists, else the bundled configs."""
    if os.environ.get(CONFIG_DIR):
        return Path(os.environ[CONFIG_DIR]).resolve()
    local = Path.cwd() / "conf"
    if local.is_dir():
        return local.resolve()
    return BUILTIN_CONFIG_DIR


def available_configs(config_dir: Path) -> List[str]:
    names = {p.stem for p in config_dir.glob("*.yaml")}
    if config_dir != BUILTIN_CONFIG_DIR:
        names |= {p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml")}
    return sorted(names)


def compose(name: str, overrides: List[str], config_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Compose `<config_dir>/<name>.yaml` with Hydra overrides; return the validated,
    fully resolved config as plain data (seed drawn here when the config leaves it null)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    import yaml

    config_dir = Path(config_dir).absolute() if config_dir else default_config_dir()
    if not config_dir.is_dir():
        raise ConfigError(f"config directory {config_dir} does not exist; pass --config-dir DIR")
    valid = available_configs(config_dir)
    if name not in valid:
        raise ConfigError(
            f"unknown config '{name}'. Valid configs: {', '.join(valid) or '(none)'} "
            f"(from {config_dir}); add conf/{name}.yaml or pick one of these."
        )
    check_override_syntax(overrides)
    hydra_overrides = list(overrides)
    if config_dir != BUILTIN_CONFIG_DIR:
        # The user's configs can build on the bundled groups (model=cnn, data=mnist, ...);
        # a bundled config named from a directory with a ./conf of its own is composed from
        # the bundled directory (Hydra finds a primary config in its main directory only),
        # with the user's groups still on the search path.
        if (config_dir / f"{name}.yaml").is_file():
            searched = BUILTIN_CONFIG_DIR
        else:
            config_dir, searched = BUILTIN_CONFIG_DIR, config_dir
        hydra_overrides.append(f"hydra.searchpath=[file://{searched}]")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            hydra_overrides = _image_overrides(name, hydra_overrides)
            composed = hydra_compose(config_name=name, overrides=hydra_overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot compose config '{name}': {_compose_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot compose config '{name}': a config file is not valid YAML: "
                          f"{' '.join(str(exc).split())}. Fix the file at that line.") from None
    if "name" not in composed or OmegaConf.is_missing(composed, "name"):
        with open_dict(composed):
            composed.name = name
    composed = OmegaConf.to_container(composed, resolve=False)
    composed.pop("hydra", None)
    resolved = validate(composed)
    check_targets(resolved, ConfigError, "Install the package, put its directory on "
                  "PYTHONPATH (and in backend.docker.pythonpath for container runs), or fix "
                  "the name.")
    return resolved


def group_option(group: str, option: str, config_dir: Optional[Path] = None) -> Dict[str, Any]:
    """One group option alone (conf/GROUP/OPTION.yaml from the config directory, else the
    bundled one), composed by Hydra over its schema and resolved: `harness build --profile`,
    `harness image lock` and `harness data` need no training config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    config_dir = Path(config_dir).absolute() if config_dir else default_config_dir()
    if not config_dir.is_dir():  # as before: the bundled options still answer
        config_dir = BUILTIN_CONFIG_DIR
    dirs = [config_dir, BUILTIN_CONFIG_DIR]
    valid = sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")} - {"schema"})
    if option not in valid:
        raise ConfigError(f"unknown {group} option '{option}'; valid options: "
                          f"{', '.join(valid) or '(none)'} (conf/{group}/ in {config_dir} or "
                          f"the bundled configs)")
    ConfigStore.instance().store(name="harness_group_option",
                                 node={"defaults": [{group: option}, "_self_"]})
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            composed = hydra_compose(config_name="harness_group_option", overrides=[
                f"hydra.searchpath=[file://{BUILTIN_CONFIG_DIR}]"])
        typed = OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[group]), composed[group])
        return OmegaConf.to_container(typed, resolve=True, enum_to_str=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"invalid {group} option '{option}': {_first_line(exc)}; fix "
                          f"conf/{group}/{option}.yaml.") from None


def check_targets(cfg: Dict[str, Any], error: type, fix: str) -> None:
    """Raise `error` naming every `_target_` the training process could not import."""
    from harness import targets

    missing = targets.problems(cfg)
    if missing:
        raise error("cannot find what the config names to build:\n  " + "\n  ".join(missing)
                    + f"\n{fix}")


def check_override_syntax(overrides: List[str]) -> None:
    """Name the override that does not parse (Hydra's own message does not say which)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parsed = parser.parse_overrides([override])[0]
        except OverrideParseException as exc:
            raise ConfigError(f"cannot parse override '{override}': {_first_line(exc)}. "
                              f"Overrides look like key=value, +new_key=value or "
                              f"group=option.") from None
        group = parsed.key_or_group
        if group in GROUP_SCHEMAS and parsed.value() == "schema":
            raise ConfigError(f"invalid override '{override}': {group}/schema is the typed "
                              f"base every {group} option extends, not an option; pick one "
                              f"of conf/{group}/.")


def validate(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Check `raw` against the typed schema, resolve interpolations once, check ranges,
    draw a seed if none is set. Returns plain data (what config.yaml holds)."""
    schema = ScriptRunConf if is_script(raw) else RunConf
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), raw)
        resolved = OmegaConf.to_container(typed, resolve=True, enum_to_str=True,
                                          throw_on_missing=True)
    except OmegaConfBaseException as exc:
        unknown = _unknown_key(str(exc), getattr(exc, "full_key", None))
        raise ConfigError(f"invalid config: {unknown}" if unknown else
                          f"invalid config: {_first_line(exc)}. Fix the value in the config "
                          f"file or the override.") from None
    _leave_out_unset(resolved)
    _check_ranges(resolved)
    _check_interpolated_numbers(raw, resolved)
    _choose_device(resolved)
    if resolved["seed"] is None:
        resolved["seed"] = draw_seed()
    return resolved


def _compose_error(exc: Exception) -> str:
    """Hydra's own line ("Error merging override seed=abc") and, under it, the schema's
    reason (the value, the type it must have, the key); for a key the schema lacks, what it
    has instead of Hydra's advice to append it with `+` (which a typed config refuses)."""
    import re

    cause = exc.__cause__
    override = re.search(r"Could not override '([^']+)'", str(exc))
    unknown = _unknown_key(str(cause or ""), override.group(1) if override else None)
    return unknown or f"{exc}" + (f" ({_first_line(cause)})" if cause else "")


def _unknown_key(text: str, full_key: Optional[str]) -> Optional[str]:
    """For "Key 'x' not in 'SomeConf'": the fields SomeConf has, the closest first."""
    import difflib
    import re

    found = re.search(r"Key '(\w+)' not in '(\w+)'", text)
    schema = globals().get(found.group(2)) if found else None
    if not full_key or not hasattr(schema, "__dataclass_fields__"):
        return None
    fields = list(schema.__dataclass_fields__)
    close = difflib.get_close_matches(found.group(1), fields, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return (f"{full_key.lstrip('+')} is not a setting: {schema.__name__} has no field "
            f"'{found.group(1)}'.{hint} Its fields: {', '.join(fields)}. The config is typed, "
            f"so a new key cannot be added (with or without '+'): fix the name.")


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    key = getattr(exc, "full_key", None)
    text = lines[0] if lines else type(exc).__name__
    return f"{text} (key: {key})" if key and key not in text else text


def _check_ranges(cfg: Dict[str, Any]) -> None:
    minimums = {"epochs": 1, "max_steps": 1, "batch_size": 1, "eval_batch_size": 1,
                "num_workers": 0, "train_limit": 1, "eval_limit": 1, "log_every": 1,
                "fingerprint_every": 1, "op_trace_steps": 0, "checkpoint_every": 1,
                "devices": 1, "nodes": 1,
                "bucket_cap_mb": 1, "collective_timeout_s": 1}
    rules = [(f"trainer.{key}", value, minimums[key])
             for key, value in cfg["trainer"].items() if key in minimums]
    rules += [
        ("determinism.threads", cfg["determinism"]["threads"], 1),
        ("determinism.pythonhashseed", cfg["determinism"]["pythonhashseed"], 0),
        ("seed", cfg["seed"], 0),
        *((f"seeds.{source}", value, 0) for source, value in (cfg.get("seeds") or {}).items()),
    ]
    for key, value, minimum in rules:
        if value is not None and value < minimum:
            raise ConfigError(f"invalid config: {key}={value}; it must be >= {minimum}.")
    for key, value in [("seed", cfg["seed"]), *((f"seeds.{source}", value) for source, value
                                                in (cfg.get("seeds") or {}).items())]:
        if value is not None and value >= SEED_LIMIT:
            raise ConfigError(f"invalid config: {key}={value}; it must be below {SEED_LIMIT}.")
    from harness.determinism import CPU_ISA

    if cfg["determinism"]["cpu_isa"] not in ("native", *CPU_ISA):
        raise ConfigError(f"invalid config: determinism.cpu_isa={cfg['determinism']['cpu_isa']}; "
                          f"use native or one of {', '.join(CPU_ISA)}.")
    if (cfg.get("command") or {}).get("nproc", 1) < 1:
        raise ConfigError(f"invalid config: command.nproc={cfg['command']['nproc']}; it must "
                          f"be >= 1.")
    if ((cfg.get("command") or {}).get("op_trace_steps") or 0) < 0:
        raise ConfigError(f"invalid config: command.op_trace_steps="
                          f"{cfg['command']['op_trace_steps']}; it must be >= 0 (0: no op "
                          f"trace).")
    if (cfg["determinism"]["pythonhashseed"] or 0) > 4294967295:
        raise ConfigError("invalid config: determinism.pythonhashseed must be <= 4294967295.")


def _choose_device(cfg: Dict[str, Any]) -> None:
    """Check trainer.device; decide `auto` once, here, so config.yaml records the device."""
    import re
    import sys

    from harness import gpu

    trainer = cfg["trainer"]
    device = str(trainer["device"])
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"invalid config: trainer.device={device}; use cpu, cuda, cuda:N or "
                          f"auto (cuda where an NVIDIA GPU is present, else cpu).")
    if device == "auto":
        trainer["device"], why = gpu.choose_device(cfg)
        print(f"harness: trainer.device=auto chose {trainer['device']} ({why})",
              file=sys.stderr, flush=True)


def _check_interpolated_numbers(raw: Any, resolved: Any, key: str = "",
                                in_target: bool = False) -> None:
    """A `_target_` component's argument that an interpolation turned into a numeric-looking
    string (`optim.lr='${oc.env:MYLR}'` gives '0.05': environment variables are strings)
    would fail inside the training; say so now, with the fix."""
    if isinstance(raw, dict) and isinstance(resolved, dict):
        in_target = in_target or "_target_" in resolved
        for name, value in raw.items():
            if name in resolved:
                _check_interpolated_numbers(value, resolved[name],
                                            f"{key}.{name}" if key else str(name), in_target)
    elif in_target and isinstance(raw, str) and "${" in raw and isinstance(resolved, str) \
            and _looks_numeric(resolved):
        inner = raw.strip()[2:-1] if raw.strip().startswith("${") else None
        hint = (f"${{oc.decode:${{{inner}}}}}" if inner else "${oc.decode:...} around it")
        shell = f'"{key}=\'{hint}\'"'.replace("$", "\\$")
        raise ConfigError(
            f"invalid config: {key}={resolved!r} is a string (from {raw!r}), but it looks like "
            f"a number: interpolated environment variables are strings. Write {hint} in a "
            f"config file to get the number; as an override, typed in a shell: {shell}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_sha256(cfg: Dict[str, Any]) -> str:
    return canonical_sha256(cfg)


def to_yaml(cfg: Dict[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def load_yaml(path: Path) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
