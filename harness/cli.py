"""The `harness` command: one parser and one handler per subcommand, and one error
boundary that turns a HarnessError into its message and exit code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from harness import __version__
from harness.errors import DataError, HarnessError

EPILOG = "Exit codes: 0 ok, 1 run failed, 2 invalid input, 3 data missing or corrupt, " \
         "4 environment part missing, 5 damaged lockfile, 6 replay refused, 7 diverged."


def cmd_train(args: argparse.Namespace) -> int:
    from harness import launch

    launch.train(args.config, args.overrides, args.config_dir, args.runs_dir)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from harness import config, data

    data_cfg = _data_config(args.name, args.config_dir)
    dest = Path(args.dest) if args.dest else data.user_cache_dir() / (
        data_cfg.get("dirname") or data_cfg["name"])
    print(f"fetching {data_cfg['name']} into {dest}", file=sys.stderr)
    data.fetch(data_cfg, dest, retries=args.retries)
    print(dest)
    return 0


def cmd_data_where(args: argparse.Namespace) -> int:
    from harness import data

    data_cfg = _data_config(args.name, args.config_dir)
    located = data.locate(data_cfg)
    if located is None:
        raise DataError(data.missing_message(data_cfg))
    print(located[0])
    return 0


def cmd_lock_check(args: argparse.Namespace) -> int:
    from harness import lockfile, rundir

    run_dir = rundir.resolve(args.run, args.runs_dir)
    lock = lockfile.read(run_dir / rundir.LOCK)
    print(f"{run_dir.name}: lockfile intact (lock_sha256 {lock['lock_sha256'][:16]}...)")
    return 0


def _data_config(name: str, config_dir: Optional[Path]):
    """conf/data/<name>.yaml from the config directory, else the bundled one."""
    from harness import config
    from harness.errors import ConfigError

    dirs = [Path(config_dir) if config_dir else config.default_config_dir(),
            config.BUILTIN_CONFIG_DIR]
    for directory in dirs:
        path = directory / "data" / f"{name}.yaml"
        if path.is_file():
            raw = config.load_yaml(path)
            return {"root": None, "dirname": None, "mirrors": [], "files": {},
                    "debian_package": None, **raw}
    valid = sorted({p.stem for d in dirs for p in (d / "data").glob("*.yaml")})
    raise ConfigError(f"unknown dataset '{name}'; valid datasets: {', '.join(valid)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", epilog=EPILOG,
        description="Reproducible PyTorch training: pinned configs, lockfiles, bit-for-bit "
                    "replay.")
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-dir", type=Path, default=None,
                        help="directory of configs (default: $HARNESS_CONFIG_DIR, ./conf, "
                             "or the bundled configs)")

    train = sub.add_parser(
        "train", parents=[common], epilog=EPILOG,
        help="train a config and write a run directory with its lockfile",
        description="Compose conf/CONFIG.yaml with Hydra overrides, train it with its "
                    "backend, and write runs/<run-id>/ with config, metrics, weights and "
                    "harness.lock.")
    train.add_argument("config", help="config name, e.g. mnist or fashion_mnist")
    train.add_argument("overrides", nargs="*",
                       help="Hydra overrides, e.g. seed=3 optim.lr=0.02 trainer.max_steps=200")
    train.add_argument("--runs-dir", type=Path, default=None,
                       help="where run directories go (default: $HARNESS_RUNS or ./runs)")
    train.set_defaults(handler=cmd_train)

    data = sub.add_parser("data", help="datasets: fetch, locate")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_sub.add_parser(
        "fetch", parents=[common], help="download a dataset from its pinned mirrors",
        description="Download each file of conf/data/NAME.yaml from its mirrors (with "
                    "retries), check its content sha256 against the pin, and store it "
                    "atomically in the user cache (or --dest).")
    fetch.add_argument("name", help="dataset name, e.g. mnist or fashion_mnist")
    fetch.add_argument("--dest", default=None, help="directory to store the files in")
    fetch.add_argument("--retries", type=int, default=3, help="attempts per mirror (default 3)")
    fetch.set_defaults(handler=cmd_data_fetch)
    where = data_sub.add_parser("where", parents=[common],
                                help="print the directory a dataset is found in")
    where.add_argument("name")
    where.set_defaults(handler=cmd_data_where)

    lock = sub.add_parser("lock", help="lockfiles: check integrity")
    lock_sub = lock.add_subparsers(dest="lock_command", required=True, metavar="ACTION")
    check = lock_sub.add_parser(
        "check", help="verify a run's lockfile against its lock_sha256",
        description="Exit 0 when RUN's harness.lock is intact, 5 when it was edited or damaged.")
    check.add_argument("run", help="run id, unique prefix of one, or run directory")
    check.add_argument("--runs-dir", type=Path, default=None)
    check.set_defaults(handler=cmd_lock_check)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
