"""Compose a run configuration with Hydra, validate it against the typed schemas and
resolve it once, so that what a run saves in config.yaml is exactly what it ran with.

Hydra's compose API is used instead of `@hydra.main`, which owns argv and does not sit well
under subcommands; overrides keep Hydra's grammar (`key=value`, `+key=value`, `group=option`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from harness.config.schema import (
    BUILTIN_CONFIG_DIR,
    CPU_ISA_MODES,
    GROUP_SCHEMAS,
    RUN_SCHEMAS,
    SEED_LIMIT,
    RunConf,
    ScriptRunConf,
    _first_line,
    _leave_out_unset,
    is_script,
)
from harness.digest import canonical_sha256
from harness.env import CONFIG_DIR, STATE_DIR
from harness.errors import ConfigError


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


def register_schemas() -> None:
    """The typed schemas in Hydra's ConfigStore, as what the bundled configs extend:
    `<group>/schema` for each group option (it writes only what it changes, so each default
    lives once, in the dataclasses of schema.py) and `train_schema` / `run_schema` for the primary
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


def _image_overrides(name: str, overrides: List[str],
                     image_profile: Callable[[], str]) -> List[str]:
    """Every run has an `image` group. A config that lists `image:` (itself, or through a
    config it extends) has it in its defaults tree, where `image=NAME` selects another; for
    one that does not (the bundled configs), it is added: `+image=NAME` as typed, else
    `image_profile()` (the command's choice for this machine: commands/choices.py). Hydra's
    own defaults tree of the config says which case this is."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    chosen = [o for o in overrides if o.lstrip("+").startswith("image=")]
    rest = [o for o in overrides if o not in chosen]
    loader = GlobalHydra.instance().config_loader()
    tree = loader.compute_defaults_list(config_name=name, overrides=rest, run_mode=RunMode.RUN)
    if "image" in tree.overrides.known_choices:
        return rest + [chosen[-1].lstrip("+")] if chosen else rest
    return rest + ["+" + (chosen[-1].lstrip("+") if chosen else
                          f"image={image_profile()}")]


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


def compose(name: str, overrides: List[str], config_dir: Optional[Path] = None,
            image_profile: Callable[[], str] = lambda: "cpu") -> Dict[str, Any]:
    """Compose `<config_dir>/<name>.yaml` with Hydra overrides; return the validated,
    fully resolved config as plain data. A null seed and trainer.device=auto stay as they
    are, and a config that names no image profile gets `image_profile()`: the command that
    starts a run makes those choices (harness/commands/choices.py)."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

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
            hydra_overrides = _image_overrides(name, hydra_overrides, image_profile)
            composed = hydra_compose(config_name=name, overrides=hydra_overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot compose config '{name}': {_compose_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot compose config '{name}': a config file is not valid YAML: "
                          f"{' '.join(str(exc).split())}. Fix the file at that line.") from None
    with open_dict(composed):
        if "name" not in composed or OmegaConf.is_missing(composed, "name"):
            composed.name = name
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
    from harness.config import targets

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


def validate(raw: Union[Dict[str, Any], DictConfig]) -> Dict[str, Any]:
    """Check `raw` (as Hydra composed it, or plain data) against the typed schema, resolve
    interpolations once, check ranges. Returns plain data (what config.yaml holds). It asks
    nothing of the machine and draws nothing: a null seed stays null."""
    schema = ScriptRunConf if is_script(raw) else RunConf
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), raw)
        _refuse_unknown_keys(typed)
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
    _check_device(resolved["trainer"]["device"])
    return resolved


def _refuse_unknown_keys(node: DictConfig, path: str = "") -> None:
    """A key the schema does not have. Merging plain data into the schema refuses one, but
    Hydra composes against the schema already, and its `+key=value` adds the key to a typed
    section, which the merge keeps: refuse it here, with the schema's own message."""
    fields = getattr(OmegaConf.get_type(node), "__dataclass_fields__", None)
    for key, value in node.items_ex(resolve=False):
        full_key = f"{path}.{key}" if path else str(key)
        if fields is not None and key not in fields:
            schema = OmegaConf.get_type(node).__name__
            said = _unknown_key(f"Key {key!r} not in {schema!r}", full_key)
            raise ConfigError(f"invalid config: {said or f'{full_key} is not a setting'}")
        if isinstance(value, DictConfig):
            _refuse_unknown_keys(value, full_key)


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

    import harness.config.schema

    found = re.search(r"Key '(\w+)' not in '(\w+)'", text)
    schema = vars(harness.config.schema).get(found.group(2)) if found else None
    if not full_key or not hasattr(schema, "__dataclass_fields__"):
        return None
    fields = list(schema.__dataclass_fields__)
    close = difflib.get_close_matches(found.group(1), fields, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return (f"{full_key.lstrip('+')} is not a setting: {schema.__name__} has no field "
            f"'{found.group(1)}'.{hint} Its fields: {', '.join(fields)}. The config is typed, "
            f"so a new key cannot be added (with or without '+'): fix the name.")


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
    if cfg["determinism"]["cpu_isa"] not in CPU_ISA_MODES:
        raise ConfigError(f"invalid config: determinism.cpu_isa={cfg['determinism']['cpu_isa']}; "
                          f"use native or one of {', '.join(CPU_ISA_MODES[1:])}.")
    if (cfg.get("command") or {}).get("nproc", 1) < 1:
        raise ConfigError(f"invalid config: command.nproc={cfg['command']['nproc']}; it must "
                          f"be >= 1.")
    if ((cfg.get("command") or {}).get("op_trace_steps") or 0) < 0:
        raise ConfigError(f"invalid config: command.op_trace_steps="
                          f"{cfg['command']['op_trace_steps']}; it must be >= 0 (0: no op "
                          f"trace).")
    if (cfg["determinism"]["pythonhashseed"] or 0) > 4294967295:
        raise ConfigError("invalid config: determinism.pythonhashseed must be <= 4294967295.")


def _check_device(device: Any) -> None:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device)):
        raise ConfigError(f"invalid config: trainer.device={device}; use cpu, cuda, cuda:N or "
                          f"auto (cuda where an NVIDIA GPU is present, else cpu).")


def _check_interpolated_numbers(raw: Any, resolved: Any, key: str = "",
                                in_target: bool = False) -> None:
    """A `_target_` component's argument that an interpolation turned into a numeric-looking
    string (`optim.lr='${oc.env:MYLR}'` gives '0.05': environment variables are strings)
    would fail inside the training; say so now, with the fix."""
    if isinstance(raw, (dict, DictConfig)) and isinstance(resolved, dict):
        in_target = in_target or "_target_" in resolved
        # A DictConfig's items as written: interpolations unresolved.
        items = raw.items_ex(resolve=False) if isinstance(raw, DictConfig) else raw.items()
        for name, value in items:
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
