"""The environment table (harness/env.py) is the one place a variable is named: no module
spells one out, and every variable in the table is read somewhere."""

import re
from pathlib import Path

from harness import env

PACKAGE = Path(env.__file__).parent
# Runs before the harness can be imported (it puts the harness on sys.path): names its own.
BOOTSTRAP = PACKAGE / "script" / "injection" / "bootstrap" / "sitecustomize.py"
LITERAL = re.compile(r"""["'](HARNESS_|SLURM_)""")


def modules():
    return [p for p in PACKAGE.rglob("*.py") if p not in (PACKAGE / "env.py", BOOTSTRAP)]


def test_no_module_spells_out_a_variable_name():
    found = [f"{p.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
             for p in modules() for n, line in enumerate(p.read_text().splitlines(), 1)
             if LITERAL.search(line)]
    assert not found, "name these through harness/env.py:\n" + "\n".join(found)


def test_the_table_holds_every_name_once_and_each_is_read():
    names = [v.name for v in env.TABLE]
    constants = [value for key, value in vars(env).items()
                 if key.isupper() and isinstance(value, str) and key != "PREFIX"
                 and value not in (env.USER, env.HARNESS, env.SLURM)]
    assert sorted(names) == sorted(set(constants)) and len(names) == len(set(names))
    assert all(n.startswith((env.PREFIX, "SLURM_")) for n in names)
    code = "\n".join(p.read_text() for p in modules())
    # Read by name where the harness cannot be imported: the bootstrap and the configs.
    by_name = BOOTSTRAP.read_text() + "\n".join(
        p.read_text() for p in (PACKAGE.parent / "conf").rglob("*.yaml"))
    constant_of = {value: key for key, value in vars(env).items() if isinstance(value, str)}
    read = {n for n in names if re.search(rf"\b{constant_of[n]}\b", code) or n in by_name}
    if re.search(r"\bSLURM_JOB\b", code):
        read |= set(env.SLURM_JOB)
    assert not set(names) - read, f"in the table but read nowhere: {set(names) - read}"


def test_the_modules_the_table_names_exist():
    """`set_by` and `read_by` name modules by their path under harness (training.runtime,
    commands.train): a module that moves or goes must take its rows along."""
    import importlib

    named = {word.strip(" ,") for v in env.TABLE for word in f"{v.set_by} {v.read_by}".split()
             if re.fullmatch(r"[a-z_]+(\.[a-z_]+)*,?", word.strip(","))}
    named -= {"sitecustomize", "tests", "the", "user", "user's", "command", "sets", "make"}
    missing = []
    for name in sorted(named):
        module, _, attribute = name.rpartition(".") if "." in name else (name, "", "")
        try:
            importlib.import_module(f"harness.{name}")
        except ModuleNotFoundError:
            if not module or not hasattr(importlib.import_module(f"harness.{module}"),
                                         attribute):
                missing.append(name)
    assert "training.runtime" in named and "commands.train" in named
    assert not missing, f"the table names modules that do not exist: {missing}"
