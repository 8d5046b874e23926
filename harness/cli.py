"""The `harness` command, laid out as pipx lays out its own: per subcommand an `add_<name>`
that declares its parser and, beside it, the `cmd_<name>` handler it dispatches to;
`build_parser` lists them; `main` is the one error boundary that turns a HarnessError into
its message and exit code (the list: errors.EXIT_CODES)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness import __version__
from harness.errors import ConfigError, DataError, HarnessError, exit_codes_text

EPILOG = exit_codes_text()
COMMAND_TAKERS = ("run", "submit")  # subcommands that take `-- COMMAND...`
RUNS_DIR_HELP = "where run directories go (default: $HARNESS_RUNS or ./runs)"


def add_config_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="directory of configs (default: $HARNESS_CONFIG_DIR, ./conf, "
                             "or the bundled configs)")


def add_runs_dir(parser: argparse.ArgumentParser, help: str = RUNS_DIR_HELP) -> None:
    parser.add_argument("--runs-dir", type=Path, default=None, help=help)


def add_command_files(parser: argparse.ArgumentParser, context: str) -> None:
    """--input / --output of a command run (`harness run`, `harness submit -- ...`)."""
    parser.add_argument("--input", action="append", default=[], metavar="PATH",
                        help=f"{context}a file or directory the command reads (repeatable): "
                             f"hashed into the lockfile before it starts; a replay refuses if "
                             f"it changed")
    parser.add_argument("--output", action="append", default=[], metavar="PATH_OR_GLOB",
                        help=f"{context}a file, directory or glob the command writes, relative "
                             f"to the working directory (repeatable): kept in "
                             f"RUN_DIR/outputs/ and hashed after it ends")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help=f"{context}a variable the command needs (repeatable; NAME alone "
                             f"takes this shell's value): set for it, recorded in the config, "
                             f"and set again on replay (command.env)")


# ---------------------------------------------------------------- train


def add_train(sub) -> None:
    train = sub.add_parser(
        "train", epilog=EPILOG,
        help="train a config and write a run directory with its lockfile",
        description="Compose conf/CONFIG.yaml with Hydra overrides, train it with its "
                    "backend, and write runs/<run-id>/ with config, metrics, weights and "
                    "harness.lock.")
    train.add_argument("config", nargs="?", default=None,
                       help="config name, e.g. mnist or fashion_mnist (optional with --resume)")
    train.add_argument("overrides", nargs="*",
                       help="Hydra overrides, e.g. seed=3 optim.lr=0.02 trainer.max_steps=200")
    add_config_dir(train)
    add_runs_dir(train)
    train.add_argument("--resume", metavar="RUN", default=None,
                       help="continue run RUN (id, unique prefix or directory) in its own "
                            "directory from its newest intact checkpoint; a config and "
                            "overrides given too must match the run's")
    train.add_argument("--trust", action="store_true",
                       help="with --resume: continue a run that is not signed by you or a key "
                            "you trust; without it the resume lists the code it would run "
                            "and refuses (exit 6)")
    train.add_argument("-m", "--multirun", action="store_true",
                       help="sweep: run every combination of comma-separated override values "
                            "(Hydra sweep syntax, e.g. -m seed=0,1,2) in sequence")
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from harness.commands import train

    if args.resume:
        name, overrides = args.config, list(args.overrides)
        if name and "=" in name:  # `--resume RUN key=value`: an override, not a config name
            name, overrides = None, [name, *overrides]
        if overrides and not name:
            raise ConfigError(f"`harness train --resume RUN` continues the run with its own "
                              f"config; overrides ({' '.join(overrides)}) would change it. "
                              f"Resume without them, or give the run's config name too "
                              f"(`harness train CONFIG {' '.join(overrides)} --resume RUN`): "
                              f"they must then compose to the run's config.")
        train.resume(args.resume, name, overrides, args.config_dir, args.runs_dir,
                      trust=args.trust)
        return 0
    if not args.config:
        raise ConfigError("harness train needs a config name (e.g. `harness train mnist`), or "
                          "--resume RUN to continue a run.")
    if args.multirun:
        from harness.commands import sweep

        sweep.run(args.config, args.overrides, args.config_dir, args.runs_dir)
        return 0
    train.train(args.config, args.overrides, args.config_dir, args.runs_dir)
    return 0


# ---------------------------------------------------------------- run


def add_run(sub) -> None:
    run = sub.add_parser(
        "run", epilog=EPILOG,
        help="run your own training command reproducibly: harness run -- python train.py",
        description="Run COMMAND (everything after `--`) as a run: on the configured backend, "
                    "with the pinned environment, every Python process of it seeded and "
                    "pinned before its first line (HARNESS_SEED holds the seed), the declared "
                    "inputs hashed before and outputs hashed after, and a lockfile. `harness "
                    "replay RUN` re-runs it and compares every output byte for byte. The "
                    "command's exit code is the run's. See docs/your-script.md.")
    run.add_argument("config", nargs="?", default=None,
                     help="config name (default: run, the bundled config for commands)")
    run.add_argument("overrides", nargs="*",
                     help="Hydra overrides, e.g. seed=3 backend=docker determinism=warn")
    run.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="start N processes of COMMAND on this machine, each with torchrun's "
                          "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (for a "
                          "script that calls init_process_group itself); if one fails, the "
                          "others are stopped (command.nproc)")
    add_command_files(run, "")
    add_config_dir(run)
    add_runs_dir(run)
    run.set_defaults(handler=cmd_run, command_argv=None)


def cmd_run(args: argparse.Namespace) -> int:
    from harness.commands import train

    usage = "harness run [CONFIG] [overrides...] [--input PATH] [--output PATH] -- COMMAND..."
    if args.command_argv is None:
        raise ConfigError(f"harness run needs the command after `--`, so that its own options "
                          f"stay its own: {usage} (e.g. harness run -- python train.py "
                          f"--epochs 3).")
    if not args.command_argv:
        raise ConfigError(f"nothing to run after `--`: {usage}")
    name, overrides = _config_and_overrides(args.config, args.overrides, default="run")
    if args.nproc is not None:
        overrides.append(f"command.nproc={args.nproc}")
    train.run_command(name, overrides, args.command_argv, args.input, args.output,
                       args.config_dir, args.runs_dir, env=args.env)
    return 0


def _config_and_overrides(first: Optional[str], rest: List[str], default: str):
    """CONFIG is optional before the overrides: a first word with '=' is an override."""
    if first is None or "=" in first:
        return default, [first, *rest] if first else list(rest)
    return first, list(rest)


# ---------------------------------------------------------------- summary, compare


def add_summary(sub) -> None:
    summary = sub.add_parser(
        "summary", help="seed statistics of a sweep",
        description="Group a sweep's runs by configuration (all overrides but the seed) and "
                    "report n, mean, standard deviation and 95% confidence interval of the "
                    "final metrics; compare configurations with Welch's interval for the "
                    "difference and P(A>B), the share of seed pairs where one beats the "
                    "other with a bootstrap interval (is it larger than the seed noise?).")
    summary.add_argument("sweep", help="sweep id (printed by `harness train -m`), prefix or "
                                       "file; a variance id prints that report again")
    add_runs_dir(summary)
    summary.add_argument("--json", action="store_true", help="machine-readable output")
    summary.set_defaults(handler=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    from harness.commands import sweep, variance

    path = sweep.resolve(args.sweep, args.runs_dir)
    if "variance" in json.loads(path.read_text()):  # made by `harness variance`
        result = variance.report(path)
        print(json.dumps(result, indent=2) if args.json else variance.render(result))
        return 0
    report = sweep.summary(str(path), args.runs_dir)
    print(json.dumps(report, indent=2) if args.json else sweep.render(report))
    return 0


def add_variance(sub) -> None:
    variance = sub.add_parser(
        "variance", help="the spread of results each source of randomness causes alone",
        description="For each source of randomness (init: initial weights, order: sample "
                    "order, augment: per-sample augmentation, dropout), train N runs that "
                    "differ only in that source's seed (seeds.SOURCE; the others held), "
                    "then report per source n, mean, std and 95% confidence interval of the "
                    "final metrics, and write a PNG with a strip of points per source. The "
                    "runs are recorded as a sweep (runs/sweeps/).")
    variance.add_argument("config", help="config name")
    variance.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.epochs=1")
    variance.add_argument("-n", type=int, default=None, metavar="N",
                          help="runs per source (default 5; at least 2)")
    variance.add_argument("--sources", default=",".join(("init", "order", "augment", "dropout")),
                          help="comma-separated sources to vary (default: the four seeds "
                               "init,order,augment,dropout); `kernel` adds runs with every "
                               "seed held and determinism off: the spread GPU kernels cause")
    variance.add_argument("-o", "--output", type=Path, default=None,
                          help="PNG path (default: runs/sweeps/<variance-id>.png)")
    variance.add_argument("--json", action="store_true", help="machine-readable output")
    variance.add_argument("--slurm", action="store_true",
                          help="submit the runs as one Slurm job array (backend=slurm) instead "
                               "of running them here one after another")
    variance.add_argument("--wait", action="store_true",
                          help="with --slurm: wait for the job array, then report; without "
                               "it, `harness summary VARIANCE_ID` reports once they finish")
    add_config_dir(variance)
    add_runs_dir(variance)
    variance.set_defaults(handler=cmd_variance)


def cmd_variance(args: argparse.Namespace) -> int:
    from harness.commands import variance

    sources = variance.parse_sources(args.sources)
    n = variance.DEFAULT_RUNS if args.n is None else args.n
    if args.wait and not args.slurm:
        raise ConfigError("--wait goes with --slurm (runs here are waited for anyway).")
    if args.slurm:
        path = variance.submit(args.config, args.overrides, sources, n, args.config_dir,
                               args.runs_dir, args.wait)
        if not args.wait:
            print(f"harness: `harness summary {path.stem}` reports it once the runs finish")
            return 0
    else:
        path = variance.run(args.config, args.overrides, sources, n, args.config_dir,
                            args.runs_dir)
    result = variance.report(path)
    output = variance.plot(result, args.output or path.with_suffix(".png"))
    print(json.dumps(result, indent=2) if args.json else variance.render(result))
    print(f"plot: {output.resolve()}")
    return 0


def add_compare(sub) -> None:
    compare = sub.add_parser(
        "compare", help="plot runs' loss and accuracy curves into a PNG",
        description="Overlay the loss and accuracy curves of RUNs in one PNG and mark the "
                    "first step where a run's loss bits leave the first run's.")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run ids, prefixes or directories")
    compare.add_argument("-o", "--output", type=Path, default=None, help="PNG path to write")
    add_runs_dir(compare)
    compare.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from harness import rundir
    from harness.commands import compare

    run_dirs = [rundir.resolve(ref, args.runs_dir) for ref in args.runs]
    output = args.output or Path(f"compare-{'-'.join(d.name[-6:] for d in run_dirs)}.png")
    data = compare.curves(run_dirs)
    compare.render(data, output)
    for run in data["runs"][1:]:
        if run["diverges_at"] is not None:
            print(f"{run['run_id']} diverges from {data['reference']} at step {run['diverges_at']}")
    print(output.resolve())
    return 0


# ---------------------------------------------------------------- submit, slurm status


def add_submit(sub) -> None:
    submit = sub.add_parser(
        "submit", epilog=EPILOG,
        help="submit a config (or `-- COMMAND`) as a batch job (Slurm); -m sweeps submit "
             "one job array",
        description="Prepare run directories here (config, launch facts, data verified), "
                    "render a batch script into each (job.sbatch) and submit it. The job "
                    "trains with the pinned environment, checkpoints on USR1/TERM and is "
                    "requeued; a restarted job resumes. Options: backend.slurm.* (SlurmConf "
                    "in harness/config/schema.py).")
    submit.add_argument("config", nargs="?", default=None,
                        help="config name, e.g. mnist or fashion_mnist (with `-- COMMAND`: "
                             "default run)")
    submit.add_argument("overrides", nargs="*",
                        help="Hydra overrides; with -m, sweeps such as seed=0,1,2")
    add_config_dir(submit)
    add_runs_dir(submit)
    submit.add_argument("--backend", default="slurm", help="batch backend (default: slurm, "
                        "the one there is)")
    submit.add_argument("-m", "--multirun", action="store_true",
                        help="expand Hydra sweep overrides into one job array")
    add_command_files(submit, "with `-- COMMAND`: ")
    submit.add_argument("--wait", action="store_true",
                        help="poll the scheduler until every job ended; exit 1 if one failed")
    submit.set_defaults(handler=cmd_submit, command_argv=None)


def cmd_submit(args: argparse.Namespace) -> int:
    from harness.commands import submit

    name, overrides = args.config, args.overrides
    if args.command_argv is not None:
        if not args.command_argv:
            raise ConfigError("nothing to run after `--`: harness submit [CONFIG] [overrides] "
                              "-- COMMAND...")
        name, overrides = _config_and_overrides(args.config, args.overrides, default="run")
    elif not name:
        raise ConfigError("harness submit needs a config name (e.g. `harness submit mnist`), "
                          "or a command after `--` (harness submit -- python train.py).")
    submit.submit(name, overrides, args.backend, args.multirun, args.wait,
                  args.config_dir, args.runs_dir, command=args.command_argv,
                  inputs=args.input, outputs=args.output, env=args.env)
    return 0


def add_slurm(sub) -> None:
    slurm = sub.add_parser("slurm", help="Slurm jobs of runs: status")
    actions = slurm.add_subparsers(dest="slurm_command", required=True, metavar="ACTION")
    status = actions.add_parser(
        "status", help="ask Slurm about runs' jobs and update their status.json",
        description="Query squeue/scontrol/sacct for each RUN's job, record slurm_state in "
                    "status.json and print it. Exit 1 when a job failed.")
    status.add_argument("runs", nargs="+", metavar="RUN")
    add_config_dir(status)
    status.add_argument("--wait", action="store_true", help="poll until the jobs ended")
    add_runs_dir(status)
    status.set_defaults(handler=cmd_slurm_status)


def cmd_slurm_status(args: argparse.Namespace) -> int:
    from harness.commands import submit

    return submit.status(args.runs, args.runs_dir, wait=args.wait)


# ---------------------------------------------------------------- data


def add_data(sub) -> None:
    data = sub.add_parser("data", help="datasets: fetch, locate, verify")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = actions.add_parser(
        "fetch", help="download a dataset from its pinned mirrors",
        description="Download each file of conf/data/NAME.yaml from its mirrors (with "
                    "retries), check its content sha256 against the pin, and store it "
                    "atomically in the user cache (or --dest).")
    fetch.add_argument("name", help="dataset name, e.g. mnist or fashion_mnist")
    add_config_dir(fetch)
    fetch.add_argument("--dest", default=None, help="directory to store the files in")
    fetch.add_argument("--retries", type=int, default=3, help="attempts per mirror (default 3)")
    fetch.set_defaults(handler=cmd_data_fetch)
    where = actions.add_parser("where", help="print the directory a dataset is found in")
    where.add_argument("name")
    add_config_dir(where)
    where.set_defaults(handler=cmd_data_where)
    verify = actions.add_parser(
        "verify", help="re-hash every file of a dataset against its pins",
        description="Read every file of conf/data/NAME.yaml again and check its content "
                    "sha256 against the pin, ignoring the digests remembered for unchanged "
                    "files (launches re-hash only files whose device, inode, size, mtime or "
                    "ctime changed). Exit 3 on a mismatch. HARNESS_REHASH=1 does the same "
                    "for any launch, replay or resume, and for a command's --input files.")
    verify.add_argument("name", help="dataset name, e.g. mnist or fashion_mnist")
    add_config_dir(verify)
    verify.set_defaults(handler=cmd_data_verify)


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from harness import config
    from harness.training import datasets

    data_cfg = config.group_option("data", args.name, args.config_dir)
    dest = Path(args.dest) if args.dest else datasets.user_cache_dir() / (
        data_cfg.get("dirname") or data_cfg["name"])
    print(f"fetching {data_cfg['name']} into {dest}", file=sys.stderr)
    datasets.fetch(data_cfg, dest, retries=args.retries)
    print(dest)
    return 0


def _located_dataset(args: argparse.Namespace):
    """(the data config NAME, its directory, its files), or DataError when it is not here."""
    from harness import config
    from harness.training import datasets

    data_cfg = config.group_option("data", args.name, args.config_dir)
    located = datasets.locate(data_cfg)
    if located is None:
        raise DataError(datasets.missing_message(data_cfg))
    return (data_cfg, *located)


def cmd_data_where(args: argparse.Namespace) -> int:
    print(_located_dataset(args)[1])
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from harness.training import datasets

    data_cfg, directory, paths = _located_dataset(args)
    record = datasets.verify(data_cfg, paths, rehash=True)
    print(f"{data_cfg['name']}: {len(record)} file(s) in {directory} re-hashed, each matches "
          f"its pin")
    return 0


# ---------------------------------------------------------------- lock


def add_lock(sub) -> None:
    lock = sub.add_parser("lock", help="lockfiles: check integrity, diff two")
    actions = lock.add_subparsers(dest="lock_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="verify a run's lockfile and that its results match the run's files",
        description="Exit 0 when RUN's harness.lock is intact (its lock_sha256), its "
                    "signature (if any) verifies, and its results describe the run "
                    "directory's files (model.pt, metrics.jsonl, declared outputs, "
                    "re-hashed); 5 when the lock was edited or damaged, the signature fails "
                    "or a file does not match; 6 when the run never finished. Names the "
                    "signer's key and whether you trust it.")
    check.add_argument("run", help="run id, unique prefix of one, or run directory")
    add_runs_dir(check)
    check.set_defaults(handler=cmd_lock_check)
    diff = actions.add_parser(
        "diff", help="what differs between two runs' lockfiles",
        description="Compare two lockfiles field by field, grouped: blocking for bitwise "
                    "replay, unproven (another machine class), informational, results, config.")
    diff.add_argument("run_a", help="run id, unique prefix of one, or run directory")
    diff.add_argument("run_b", help="run id, unique prefix of one, or run directory")
    add_runs_dir(diff)
    diff.add_argument("--json", action="store_true", help="machine-readable output")
    diff.set_defaults(handler=cmd_lock_diff)


def cmd_lock_check(args: argparse.Namespace) -> int:
    from harness import rundir
    from harness.record import integrity, lockfile, signing

    run_dir = rundir.resolve(args.run, args.runs_dir)
    integrity.refuse_unfinished(run_dir)
    lock = lockfile.read(run_dir / rundir.LOCK)
    is_command = "outputs" in lock["results"]
    needs_torch = integrity.needs_weights_digest(run_dir, lock)  # not known for its content
    integrity.check(run_dir, lock, integrity.weights_digest(run_dir) if needs_torch else None)
    signature = signing.intact(run_dir, lock, "The run directory was changed after its "
                               "launcher signed it.")
    checked = f"{len(lock['results']['outputs'])} output file(s)" if is_command else \
        f"{rundir.WEIGHTS}, {rundir.METRICS} and the evaluation"
    print(f"{run_dir.name}: lockfile intact (lock_sha256 {lock['lock_sha256'][:16]}...); "
          f"its results match the run's files ({checked}); {signature.describe()}")
    return 0


def cmd_lock_diff(args: argparse.Namespace) -> int:
    from harness import rundir
    from harness.record import gate, lockfile

    dirs = [rundir.resolve(ref, args.runs_dir) for ref in (args.run_a, args.run_b)]
    locks = [lockfile.read(d / rundir.LOCK) for d in dirs]
    diffs = gate.differences(*locks)
    if args.json:
        print(json.dumps({"a": dirs[0].name, "b": dirs[1].name,
                          "differences": [d.to_json() for d in diffs]}, indent=2))
    else:
        print(f"a: {dirs[0].name}\nb: {dirs[1].name}\n")
        print(gate.render_grouped(diffs, "a", "b"))
    return 0


def add_trace(sub) -> None:
    trace = sub.add_parser(
        "trace", help="the ops a run's first steps dispatched, and the first op two runs "
                      "compute differently",
        description="Every run records the ops of its first optimizer step(s) in "
                    "op-trace.jsonl.gz (trainer.op_trace_steps for the built-in loop, "
                    "command.op_trace_steps for `harness run`; default 1): op, module, "
                    "step, shapes, and a bitwise hash of every input and output.")
    actions = trace.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    diff = actions.add_parser(
        "diff", help="the first op whose output bits differ between two runs",
        description="Walk two runs' op traces in order and name the first op whose output "
                    "differs: its module and step, and whether its inputs were identical "
                    "(the op computes differently: the settings that differ are listed) or "
                    "not (a weight, the batch or optimizer state differed already). Exit 0 "
                    "when the traced steps agree, 7 (diverged) when they differ, 8 when they "
                    "share no traced step, 2 when a run has no trace, 5 when a trace is "
                    "damaged.")
    diff.add_argument("run_a", help="run id, unique prefix of one, or run directory")
    diff.add_argument("run_b", help="run id, unique prefix of one, or run directory")
    add_runs_dir(diff)
    diff.add_argument("--json", action="store_true", help="machine-readable output")
    diff.set_defaults(handler=cmd_trace_diff)
    show = actions.add_parser("show", help="list a run's traced ops",
                              description="One line per op: call, step, phase, op, module, "
                                          "output shapes and hashes.")
    show.add_argument("run", help="run id, unique prefix of one, or run directory")
    add_runs_dir(show)
    show.set_defaults(handler=cmd_trace_show)


def _trace_of(run_dir: Path):
    from harness import rundir
    from harness.record import op_trace

    trace = op_trace.read(run_dir)
    if trace is None:
        raise ConfigError(f"run {run_dir.name} has no op trace ({rundir.OP_TRACE}): it ran "
                          f"with trainer.op_trace_steps=0 (command.op_trace_steps=0 for "
                          f"`harness run`), it is a command that took no optimizer step, "
                          f"ran without the injection or compiled its model, or it predates "
                          f"op traces. Run it again with op_trace_steps=1 (the default).")
    return trace


def cmd_trace_diff(args: argparse.Namespace) -> int:
    from harness import rundir
    from harness.errors import Diverged, Unverified
    from harness.record import gate, lockfile, op_trace

    dirs = [rundir.resolve(ref, args.runs_dir) for ref in (args.run_a, args.run_b)]
    traces = [_trace_of(run_dir) for run_dir in dirs]
    locks = [lockfile.read(d / rundir.LOCK) if (d / rundir.LOCK).is_file() else {}
             for d in dirs]
    found = op_trace.explained(*traces, op_trace.environment_fields(gate.differences(*locks)))
    if args.json:
        print(json.dumps({"a": dirs[0].name, "b": dirs[1].name, **found}, indent=2))
    else:
        print(f"a: {dirs[0].name}\nb: {dirs[1].name}\n{found['line']}")
    if not found["steps"]:  # nothing compared: neither agree nor differ
        return Unverified.exit_code
    return 0 if found["kind"] == "same" else Diverged.exit_code


def cmd_trace_show(args: argparse.Namespace) -> int:
    from harness import rundir

    run_dir = rundir.resolve(args.run, args.runs_dir)
    trace = _trace_of(run_dir)
    print(f"{run_dir.name}: {len(trace['ops'])} ops of step(s) "
          f"{', '.join(map(str, trace['header']['steps']))}")
    for op in trace["ops"]:
        outputs = " ".join(f"{'x'.join(map(str, t[1])) or 'scalar'}:{t[0]}" for t in op["out"])
        print(f"{op['i']:>5} {op['step']:>3} {op['phase']:<9} {op['op']:<40} "
              f"{op['module']:<24} {outputs}")
    return 0


# ---------------------------------------------------------------- replay, verify, runs


def add_keys(sub) -> None:
    keys = sub.add_parser(
        "keys", help="the key your runs are signed with, and the keys you trust",
        description="Every finished run is signed with your Ed25519 key (in-toto statement, "
                    "DSSE, Sigstore bundle: harness.lock.sigstore.json). A replay runs a "
                    "run's code only when you or a key you trust signed it, or with --trust. "
                    "Keys live in $XDG_CONFIG_HOME/harness (default ~/.config/harness); "
                    "$HARNESS_SIGNING_KEY points at a key of your own instead.")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    actions.add_parser("init", help="make your signing key (the first run makes it too)"
                       ).set_defaults(handler=cmd_keys_init)
    show = actions.add_parser("show", help="print your public key line, for others to trust")
    show.add_argument("--name", help="the name in the line (default: user@host)")
    show.set_defaults(handler=cmd_keys_show)
    trust = actions.add_parser("trust", help="trust runs signed by a public key line")
    trust.add_argument("key", help="a line `ed25519 BASE64 NAME` (as `harness keys show` "
                                   "prints it), or a file holding one")
    trust.add_argument("--name", help="your name for the key (default: the line's)")
    trust.set_defaults(handler=cmd_keys_trust)


def cmd_keys_init(args: argparse.Namespace) -> int:
    from harness.record import signing

    path, made = signing.init_key()
    print(f"{'made' if made else 'already there'}: {path} (key "
          f"{signing.own_key_id()[:16]}); `harness keys show` prints its public key")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    import getpass
    import platform

    from harness.record import signing

    path, _ = signing.init_key()
    name = args.name or f"{getpass.getuser()}@{platform.node()}"
    print(signing.public_line(signing.public_raw(signing.load_private(path)), name))
    return 0


def cmd_keys_trust(args: argparse.Namespace) -> int:
    from harness.record import signing

    line = args.key
    if not line.startswith("ed25519 ") and Path(line).is_file():
        line = Path(line).read_text().strip()
    keyid, path = signing.trust(line, args.name)
    print(f"trusted key {keyid[:16]} (in {path})")
    return 0


def add_replay(sub) -> None:
    replay = sub.add_parser(
        "replay", epilog=EPILOG, help="re-run a run and compare it bit for bit",
        description="Check RUN's lockfile, refuse (exit 6) when this environment differs in "
                    "a way that breaks bitwise equality, re-run the same resolved config as a "
                    "new run linked to RUN, and compare loss bits, parameter fingerprints and "
                    "final weights (a `harness run` command: every declared output file): "
                    "IDENTICAL (exit 0) or DIVERGED (exit 7).")
    replay.add_argument("run", help="run id, unique prefix of one, or run directory; or "
                                    "the id of an MLflow run logged by tracker=mlflow "
                                    "(32 hex digits, or mlflow:ID)")
    add_runs_dir(replay, help="where to find RUN and put the replay (default: $HARNESS_RUNS "
                              "or ./runs; a RUN path puts the replay beside it)")
    replay.add_argument("--allow-mismatch", action="store_true",
                        help="replay despite blocking differences (they are recorded)")
    replay.add_argument("--negative-control", action="store_true",
                        help="after an IDENTICAL verdict, replay once more with one weight "
                             "bit flipped after its first step: it must come out DIVERGED, or "
                             "the verdict is UNVERIFIED (exit 8). Built-in training loop only")
    replay.add_argument("--all-divergences", action="store_true",
                        help="after a DIVERGED verdict, run the config once more giving each "
                             "traced op whose output bits differ the original's outputs, and "
                             "list every op that computes differently in the traced steps, "
                             "not only the first. Needs a run trained with "
                             "trainer.op_trace_tensors=true; built-in training loop only")
    replay.add_argument("--trust", action="store_true",
                        help="replay a run that is not signed by you or a key you trust "
                             "(copied from a colleague, downloaded with a paper): without it "
                             "the replay lists the code it would run and refuses (exit 6)")
    replay.add_argument("--tracking-uri",
                        help="where to find an MLflow RUN (default: $MLFLOW_TRACKING_URI, "
                             "else the default store in the runs directory); its lockfile, "
                             "config, metrics and model are fetched into the runs directory "
                             "when the run is not there")
    replay.set_defaults(handler=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from harness.commands import replay

    return replay.replay(args.run, args.runs_dir, allow_mismatch=args.allow_mismatch,
                         tracking_uri=args.tracking_uri,
                         negative_control=args.negative_control, trust=args.trust,
                         all_divergences=args.all_divergences)


def add_verify(sub) -> None:
    verify = sub.add_parser(
        "verify", epilog=EPILOG,
        help="train a short prefix twice and show whether it is deterministic here",
        description="Run the first --steps steps of CONFIG twice with the determinism audit "
                    "on; exit 0 when bitwise identical, 7 with the first diverging step, "
                    "tensors and module otherwise.")
    verify.add_argument("config", help="config name, e.g. mnist or fashion_mnist")
    verify.add_argument("overrides", nargs="*", help="Hydra overrides, as for train")
    add_config_dir(verify)
    verify.add_argument("--steps", type=_positive, default=20,
                        help="steps per run (default 20)")
    verify.add_argument("--fingerprint-every", type=_positive, default=1,
                        help="parameter digest interval (default 1: every step)")
    verify.add_argument("--jobs", type=_positive, default=None,
                        help="2 runs the two in parallel, 1 one after the other (default: "
                             "parallel when there are cores for both)")
    add_runs_dir(verify)
    verify.set_defaults(handler=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from harness.commands import verify

    return verify.verify(args.config, args.overrides, args.config_dir, args.runs_dir,
                         steps=args.steps, fingerprint_every=args.fingerprint_every,
                         jobs=args.jobs)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def add_doctor(sub) -> None:
    doctor = sub.add_parser(
        "doctor", epilog=EPILOG,
        help="what each determinism setting costs and buys here: a table",
        description="Train two short prefixes of CONFIG under each determinism setting "
                    "(strict, warn, off; one thread; CPU kernels pinned) on the local "
                    "backend, and report throughput, whether the two runs are identical, "
                    "the nondeterministic operations the model hits (with the module), and "
                    "the cheapest setting that still reproduces here. Writes "
                    "RUNS/doctor-<time>.json.")
    doctor.add_argument("config", help="config name, e.g. fashion_mnist")
    doctor.add_argument("overrides", nargs="*", help="Hydra overrides, as for train")
    add_config_dir(doctor)
    doctor.add_argument("--steps", type=_positive, default=50,
                        help="steps per run (default 50)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    add_runs_dir(doctor)
    doctor.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from harness.commands import doctor

    return doctor.doctor(args.config, args.overrides, args.config_dir, args.runs_dir,
                         steps=args.steps, as_json=args.json)


def add_runs(sub) -> None:
    runs = sub.add_parser("runs", help="table of runs with results and replay verdicts")
    add_runs_dir(runs, help="default: $HARNESS_RUNS or ./runs")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    runs.set_defaults(handler=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    from harness import progress, rundir
    from harness.commands import runs

    rows = runs.collect(args.runs_dir or rundir.default_runs_dir())
    if args.json or not rows:
        print(runs.to_json(rows) if args.json else "no runs")
    else:
        progress.show_table(runs.cells(rows), list(runs.COLUMNS))
    return 0


# ---------------------------------------------------------------- build, image lock


def add_build(sub) -> None:
    build = sub.add_parser(
        "build", epilog=EPILOG,
        help="build (or find) the pinned training image",
        description="Build the image of CONFIG's image profile (or of --profile alone) "
                    "through the Docker engine, offline, from the hash-locked wheelhouse, "
                    "and write it reproducibly: the image id depends on its files alone, so "
                    "the same inputs rebuild to the same id (`harness image rebuild RUN`). "
                    "The tag is a content hash of the Dockerfile, the lock, the harness "
                    "source and the base digest: an unchanged tree reuses its image. Prints "
                    "the image facts a lockfile records.")
    build.add_argument("config", nargs="?", default=None,
                       help="config name (optional: default the image profile alone)")
    build.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. image.base=...")
    add_config_dir(build)
    build.add_argument("--profile", default=None,
                       help="image profile (conf/image/): cpu or cuda (default: cuda on a "
                            "machine with an NVIDIA GPU, else cpu)")
    build.add_argument("--push", action="store_true",
                       help="push to image.registry (default 127.0.0.1:5000) and record "
                            "the repo digest")
    build.set_defaults(handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from harness import config
    from harness.containers import image
    from harness.host import gpu

    if args.config:
        cfg = config.compose(args.config, args.overrides + (
            [f"image={args.profile}"] if args.profile else []), args.config_dir,
            image_profile=gpu.image_profile)
        image_cfg = cfg["image"]
    else:
        image_cfg = image.profile_config(args.profile, args.config_dir)
    facts = image.build(image_cfg, push=args.push or bool(image_cfg.get("push")))
    print(json.dumps(facts, indent=2, sort_keys=True))
    return 0


def add_image(sub) -> None:
    image = sub.add_parser("image", help="training image: lock its dependencies, rebuild a "
                                         "run's image")
    actions = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    lock = actions.add_parser(
        "lock", help="regenerate docker/requirements-<profile>.lock with hashes",
        description="Resolve image.requirements with pip for the image's Python, write "
                    "image.lock pinning every distribution to one file by sha256, and "
                    "download those files into the wheelhouse the build copies.")
    add_config_dir(lock)
    lock.add_argument("--profile", default=None, help="image profile (default: cpu "
                      "or cuda, as for build)")
    lock.set_defaults(handler=cmd_image_lock)
    rebuild = actions.add_parser(
        "rebuild", epilog=EPILOG, help="rebuild a run's image and prove it is the same image",
        description="Rebuild the image RUN's lockfile records, offline and without the "
                    "engine's build cache, from the same inputs (the base digest, the "
                    "Dockerfile, the requirements lock and the harness source: this checkout "
                    "must have them, else exit 6), and compare image ids. REPRODUCED (exit "
                    "0): the same id, and the image gets the recorded tag back. NOT "
                    "REPRODUCED (exit 7): the first layer that differs and, where this "
                    "machine built the recorded image, the first file.")
    rebuild.add_argument("run", help="run id, unique prefix of one, or run directory")
    add_runs_dir(rebuild, help="where to find RUN (default: $HARNESS_RUNS or ./runs)")
    rebuild.add_argument("--use-cache", action="store_true",
                         help="let the engine reuse its build cache (faster; the id "
                              "comparison proves the result all the same)")
    rebuild.set_defaults(handler=cmd_image_rebuild)


def cmd_image_lock(args: argparse.Namespace) -> int:
    from harness.containers import image

    print(image.lock_requirements(image.profile_config(args.profile, args.config_dir)))
    return 0


def cmd_image_rebuild(args: argparse.Namespace) -> int:
    from harness.commands import replay
    from harness.containers import image
    from harness.errors import Diverged

    # Rebuilding runs the recorded image build, not the run's own code.
    run_dir, lock, cfg = replay.load_original(args.run, args.runs_dir, trust=True)
    if not lock.get("image"):
        raise ConfigError(f"run {run_dir.name} trained without an image (backend="
                          f"{lock['backend']['name']}): there is no image to rebuild.")
    result = image.rebuild(lock["image"], cfg["image"], run_dir.name,
                           nocache=not args.use_cache)
    print(result["report"], flush=True)
    if not result["reproduced"]:
        raise Diverged(f"the rebuilt image is not the one run {run_dir.name} trained in "
                       f"(above). Look for a build step whose output changes from build to "
                       f"build (a download, a clock, a random name).")
    return 0


# ---------------------------------------------------------------- machine


def add_machine(sub) -> None:
    machine = sub.add_parser(
        "machine", help="machine classes: this CPU's class, its per-op table, record it",
        description="A machine class is the CPU facts that decide which math kernels run: "
                    "vendor, family, model number, math ISA flags. Golden bits are compared "
                    "only within a class; the corpus (tests/golden/machines/, or "
                    "$HARNESS_CORPUS) holds the recorded ones.")
    actions = machine.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("class", help="this machine's class, and whether it is recorded")
    show.add_argument("--json", action="store_true", help="print the class facts as JSON")
    show.set_defaults(handler=cmd_machine_class)
    ops = actions.add_parser(
        "ops", help="hash each training op's output under each CPU-kernel setting",
        description="Runs gemm, convolution forward and backward, batch norm, linear "
                    "backward, vector math, a reduction, an Adam step, dropout, layer norm "
                    "and softmax under each setting of ATEN_CPU_CAPABILITY, "
                    "ONEDNN_MAX_CPU_ISA, MKL_CBWR, oneDNN on/off and thread count, and "
                    "prints the table (JSON). Compare two machines' tables with "
                    "--compare: a setting whose ops agree computes them alike on both.")
    ops.add_argument("--out", type=Path, default=None, help="also write the table here")
    ops.add_argument("--setting", action="append", default=None, metavar="NAME",
                     help="measure only this setting (repeatable; default: all of them, "
                          "about a minute on 2 cores); `--setting list` names them")
    ops.add_argument("--compare", type=Path, default=None, metavar="TABLE",
                     help="a table from another machine: print, per setting, the ops that "
                          "differ from this machine's")
    ops.set_defaults(handler=cmd_machine_ops)
    record = actions.add_parser(
        "record", help="add this machine's class to the corpus (make record-machine)",
        description="Trains the golden config (fashion_mnist, small and short) once per "
                    "CPU mode this CPU can run, with `harness train`, and keeps the run "
                    "directories and the per-op table under CORPUS/<class>/. Modes already "
                    "recorded for this class are kept, never regenerated.")
    record.add_argument("--corpus", type=Path, default=None,
                        help="corpus folder (default: $HARNESS_CORPUS or tests/golden/machines)")
    record.add_argument("--mode", action="append", default=None, metavar="CPU_ISA",
                        help="record only this mode (repeatable; default: every mode this "
                             "CPU can run)")
    record.set_defaults(handler=cmd_machine_record)


def cmd_machine_class(args: argparse.Namespace) -> int:
    from harness.host import machine_class
    from harness.record import corpus

    facts = machine_class.this_machine()
    entry = corpus.entry_for(facts)
    if args.json:
        print(json.dumps({"class_id": machine_class.class_id(facts), "class": facts,
                          "recorded": str(entry.path) if entry else None}, indent=2))
        return 0
    print(f"machine class: {machine_class.class_id(facts)}")
    for key, value in facts.items():
        print(f"  {key}: {value}")
    print(f"recorded: {entry.path} (modes: {', '.join(entry.modes()) or 'none'})" if entry
          else "recorded: no (make record-machine adds it)")
    return 0


def cmd_machine_ops(args: argparse.Namespace) -> int:
    from harness.record import cpu_ops

    other = _ops_table(args.compare) if args.compare is not None else None
    if args.out is not None:  # before a minute of measuring, not after
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {args.out}: cannot create its folder ({e}).") from e
    if args.setting == ["list"]:
        print("\n".join(cpu_ops.SETTINGS))
        return 0
    unknown = [name for name in args.setting or [] if name not in cpu_ops.SETTINGS]
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(map(repr, unknown))}: "
                          f"`harness machine ops --setting list` names them.")
    found = cpu_ops.table(names=args.setting,
                          progress=lambda name: print(f"  {name} ...", file=sys.stderr))
    text = json.dumps(found, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    if other is None:
        print(text)
        return 0
    for setting, ops in cpu_ops.compare(found, other).items():
        print(f"{setting:45s} {'same' if not ops else 'differ: ' + ', '.join(ops)}")
    for setting in sorted(set(found["settings"]) - set(other["settings"])):
        print(f"{setting:45s} not in {args.compare} (its tool measured no such setting)")
    return 0


def _ops_table(path: Path) -> Dict[str, Any]:
    """A per-op table given with --compare, read before measuring."""
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--compare {path}: no such file.") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--compare {path}: not a readable table of `harness machine ops` "
                          f"({e}).") from e
    if not isinstance(table, dict) or not isinstance(table.get("settings"), dict):
        raise ConfigError(f"--compare {path}: not a table of `harness machine ops` (it has no "
                          f"`settings`).")
    return table


def cmd_machine_record(args: argparse.Namespace) -> int:
    from harness.commands import machine

    folder = machine.record(args.corpus, args.mode)
    print(f"recorded: {folder}")
    return 0


# ---------------------------------------------------------------- the command


SUBCOMMANDS = (add_train, add_run, add_summary, add_variance, add_compare, add_submit,
               add_slurm, add_data, add_lock, add_trace, add_keys, add_replay, add_verify,
               add_doctor, add_runs, add_build, add_image, add_machine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", epilog=EPILOG,
        description="Reproducible PyTorch training: pinned configs, lockfiles, bit-for-bit "
                    "replay.")
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    if argv and argv[0] in COMMAND_TAKERS and "--" in argv:
        # Everything after the first `--` is the user's command, untouched by our parser.
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args, extra = parser.parse_known_args(argv)
    if command is not None:
        args.command_argv = command
    # Overrides may come after options (`train mnist -m seed=0,1`); argparse only takes
    # positionals in one run, so leftovers that are not options join the overrides.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `harness trace show RUN | head`: the reader has had enough
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
