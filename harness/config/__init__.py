"""The run configuration: its typed schema (schema.py), its composition with Hydra and its
validation (composition.py), and `_target_` import paths (targets.py).

A config is composed once by the command that starts a run and travels as plain data
(config.yaml) from then on. This package may import only the base modules (errors, env,
digest, host); everything else imports it. What a caller needs is re-exported here:
`config.compose(...)`, `config.typed(...)`, `config.RunConfig`."""

from harness.config.composition import (
                                    available_configs,
                                    check_override_syntax,
                                    check_targets,
                                    compose,
                                    config_sha256,
                                    default_config_dir,
                                    group_option,
                                    load_yaml,
                                    register_schemas,
                                    state_dir,
                                    state_ref,
                                    to_yaml,
                                    validate,
)
from harness.config.schema import (
                                    BUILTIN_CONFIG_DIR,
                                    CPU_ISA_MODES,
                                    OP_TRACE_STEPS,
                                    SEED_LIMIT,
                                    RunConf,
                                    RunConfig,
                                    ScriptRunConf,
                                    TrainerConf,
                                    is_script,
                                    op_trace_steps,
                                    plain,
                                    typed,
)

__all__ = ["available_configs", "check_override_syntax", "check_targets", "compose",
           "config_sha256", "default_config_dir", "group_option",
           "load_yaml", "register_schemas", "state_dir", "state_ref", "to_yaml", "validate",
           "BUILTIN_CONFIG_DIR", "CPU_ISA_MODES", "OP_TRACE_STEPS", "SEED_LIMIT", "RunConf",
           "RunConfig", "ScriptRunConf", "TrainerConf", "is_script", "op_trace_steps", "plain",
           "typed"]
