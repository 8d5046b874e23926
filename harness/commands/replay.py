"""`harness replay RUN`: check the lockfile, gate on the environment, re-run the same
resolved config as a new run linked to the original, and compare the two bit for bit.

Planning (lockfile, config, gate) does not import torch: the current environment is
captured by a child process (harness.record.facts) started like the training process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness import __version__, config, rundir
from harness.containers import image
from harness.env import OP_TRACE_RELOAD, PERTURB
from harness.errors import (
    ConfigError,
    Diverged,
    EnvironmentProblem,
    LockfileError,
    ReplayRefused,
    RunFailed,
    Unverified,
)
from harness.record import (
    bitwise,
    facts,
    facts_cache,
    gate,
    integrity,
    lockfile,
    op_trace,
    signing,
    tracking,
)
from harness.record.trust import refuse_untrusted
from harness.script import files, imports
from harness.training import perturb


def load_original(ref: str, runs_dir: Optional[Path], trust: bool = False
                  ) -> Tuple[Path, Dict[str, Any], Dict[str, Any]]:
    """(run dir, verified lockfile, validated config) of the run to replay. The lock must
    be intact, its signature valid, and describe the run's metrics and outputs (its weights
    are checked by `captured`, which has torch). A run not signed by a key this user trusts
    is refused unless `trust`: nothing of its code is imported before that."""
    run_dir = rundir.resolve(ref, runs_dir)
    integrity.refuse_unfinished(run_dir)
    lock = lockfile.read(run_dir / rundir.LOCK)
    integrity.check(run_dir, lock)
    signature = signing.intact(run_dir, lock, "The run directory was changed after its "
                               "launcher signed it; nothing was run. Copy it again from where "
                               "it came from.")
    refuse_untrusted(run_dir.name, signature, lock["config"], lock.get("script"), "replay",
                     trust)
    cfg = config.validate(lock["config"])
    diffs = gate.differences({"config": lock["config"]}, {"config": cfg})
    changed = [d.key for d in diffs if d.a != gate.MISSING]
    if changed:
        raise ReplayRefused(
            f"the locked config of {run_dir.name} no longer validates to itself under harness "
            f"{__version__} (changed: {', '.join(changed[:5])}): the config schema changed "
            f"since the run. Replay with the harness version that wrote it "
            f"({lock['harness']['version']}).")
    if diffs:
        # The schema grew since the run: new fields get their defaults, nothing it ran with
        # changes. The new run's config_sha256 differs from the original's because of them.
        print(f"harness: config fields added since the run, at their defaults: "
              f"{', '.join(d.key for d in diffs[:6])}{' ...' if len(diffs) > 6 else ''}",
              flush=True)
    # backend=auto chose at launch; the replay runs where the original actually ran.
    cfg["backend"]["name"] = lock["backend"]["name"]
    config.check_targets(cfg, EnvironmentProblem, f"The run used code that is not importable "
                         f"here: make it so (install the package or put its directory on "
                         f"PYTHONPATH) and replay {run_dir.name} again.")
    return run_dir, lock, cfg


def captured(run_dir: Path, lock: Dict[str, Any], cfg: Dict[str, Any]
             ) -> Tuple[Dict[str, Any], Optional[str]]:
    """(this host's environment as a training process would record it, its cache key when it
    came from the capture cache). Where model.pt's weights digest is not known for its
    content (a run copied from elsewhere), the integrity check's last part needs torch:
    the capture child computes it too, before anything is built, pulled or run."""
    if not integrity.needs_weights_digest(run_dir, lock):
        return facts.current(cfg["determinism"])
    env, _ = facts.current(cfg["determinism"], run_dir)
    integrity.refuse(run_dir, integrity.weights_mismatches(
        run_dir, lock, env.pop("run_weights_sha256", None)))
    return env, None


def current_environment(cfg: Dict[str, Any], env: Dict[str, Any],
                        recorded_interpreters: Optional[List[Dict[str, Any]]] = None,
                        backend_facts: Optional[Dict[str, Any]] = None
                        ) -> Tuple[Dict[str, Any], List[str]]:
    """(the environment a new training process would record, sections the gate must skip),
    from `env`, this host's capture, and the command's interpreters as they are now.

    A backend contributes its lock facts (docker: the image it would use), as given in
    `backend_facts` (the ones the replay's launch will record), else asked for. One that trains
    elsewhere (in an image, on a batch node) recorded the software and environment
    variables there, pinned by the image's id and digests, so this host's are not
    compared."""
    from harness import backends

    env = dict(env)
    env["harness"] = {"version": __version__,
                      "source_sha256": lockfile.harness_source_sha256()}
    backend = backends.get(cfg["backend"]["name"])
    env.update(backend.lock_facts(config.typed(cfg)) if backend_facts is None
               else backend_facts)
    skip: List[str] = ["software", "environment", "interpreters"] \
        if backend.trains_elsewhere else []
    if recorded_interpreters and not backend.trains_elsewhere:
        env["interpreters"] = imports.current_interpreters(recorded_interpreters)
    return env, skip


def held_against_run(here: Dict[str, Any], cache_key: Optional[str],
                     new_lock: Dict[str, Any], cfg: Dict[str, Any]) -> None:
    """A capture from the cache, held against what the replay's own training process
    recorded (the environment as it was): a difference means the entry was stale, so it is
    dropped and named. Only for a run trained here: elsewhere (an image, a batch node) the
    lock describes another environment."""
    from harness import backends

    if cache_key is None or backends.get(cfg["backend"]["name"]).trains_elsewhere:
        return
    cached = lockfile.flatten(here)
    recorded = lockfile.flatten({section: new_lock.get(section) for section in here})
    stale = sorted(k for k in set(cached) | set(recorded) if cached.get(k) != recorded.get(k))
    if stale:
        facts_cache.forget(cache_key)
        print(f"harness: warning: the cached capture of this environment was stale "
              f"({', '.join(stale[:6])}{' ...' if len(stale) > 6 else ''} differ from what "
              f"the replay recorded); it is dropped, and the next replay captures afresh. "
              f"The gate above used the stale facts: replay again to gate on the real "
              f"ones.", flush=True)


def refusal(run_id: str, blocking: List[gate.Difference]) -> str:
    return (f"replay of {run_id} refused: {len(blocking)} difference(s) from the locked "
            f"environment break bitwise equality:\n{gate.render(blocking)}\n"
            f"Run the replay where these match (same machine type, image and versions), or "
            f"pass --allow-mismatch to run it anyway: the differences are recorded in the "
            f"new run and the comparison will likely report DIVERGED.")


def locate(ref: str, runs_dir: Optional[Path], tracking_uri: Optional[str]) -> str:
    """A run id, prefix or directory as given; an MLflow run id becomes the directory of the
    harness run it logged (fetched from its artifacts when it is not here)."""
    try:
        return str(rundir.resolve(ref, runs_dir))
    except ConfigError:
        if not tracking.looks_like_mlflow_run(ref):
            raise
    return str(tracking.fetch_run(ref, runs_dir or rundir.default_runs_dir(), tracking_uri))


def checked_environment(run_id: str, lock: Dict[str, Any], cfg: Dict[str, Any],
                        here: Dict[str, Any], allow_mismatch: bool
                        ) -> Tuple[List[gate.Difference], Dict[str, Any]]:
    """The gate: (the differences between the run's environment and this one, the
    backend's lock facts for the launch to record), or ReplayRefused where a difference
    would break bitwise equality (unless `allow_mismatch`). A docker run's image is made
    present first (pulled, or rebuilt and proved the same)."""
    from harness import backends

    if lock.get("image") and cfg["backend"]["name"] == "docker":
        image.ensure_recorded(lock["image"], cfg["image"], run_id, allow_mismatch)
    facts = backends.get(cfg["backend"]["name"]).lock_facts(config.typed(cfg))
    current, skip = current_environment(cfg, here, lock.get("interpreters"), facts)
    diffs = gate.gate(lock, current, skip)
    blocking = [d for d in diffs if d.blocking]
    unproven = [d for d in diffs if d.group == gate.UNPROVEN]
    informational = [d for d in diffs if d.group == gate.INFO]
    if blocking and not allow_mismatch:
        raise ReplayRefused(refusal(run_id, blocking))
    if blocking:
        print(f"harness: --allow-mismatch: replaying despite {len(blocking)} blocking "
              f"difference(s):\n{gate.render(blocking)}", flush=True)
    if unproven:
        print(f"harness: unproven: {len(unproven)} difference(s) that no recording covers; "
              f"this replay will show whether they change the bits:\n"
              f"{gate.render(unproven)}", flush=True)
    machine_class = gate.find(informational, gate.CLASS_KEY)
    if machine_class:  # the one informational row a user should see in full
        print(f"harness: another machine class ({machine_class.a} -> "
              f"{machine_class.b}), {machine_class.why}", flush=True)
    if informational:
        print(f"harness: {len(informational)} informational difference(s) (each with its "
              f"reason in the new lock's replay_mismatches): "
              f"{', '.join(d.key for d in informational[:6])}"
              f"{' ...' if len(informational) > 6 else ''}", flush=True)
    return diffs, facts


def likely_cause(diffs: List[gate.Difference], cpu_isa: str) -> str:
    """For a DIVERGED verdict: the machine class difference, where one may be the cause."""
    found = gate.find(diffs, gate.CLASS_KEY)
    if found is None or found.group == gate.INFO:  # none, or recorded to give the same bits
        return ""
    evidence = {gate.BLOCKING: "recorded to give other bits",
                gate.UNPROVEN: "never recorded together"}[found.group]
    advice = f"Replay on a machine of class {found.a}"
    if cpu_isa != "portable" and found.b.startswith(("amd", "intel")):
        advice += (", or train with determinism.cpu_isa=portable (built for replays on any "
                   "x86-64 CPU with AVX2)")
    return (f" The run was recorded on machine class {found.a} and replayed on {found.b} "
            f"({evidence} in cpu_isa={cpu_isa}): the likely cause is the machine, not the "
            f"code. {advice}.")


def environment_hint(lock: Dict[str, Any]) -> str:
    """For a command that failed in its replay: the variables set when it ran and not now,
    and the other way round (names only: the lock keeps no values but --env's)."""
    import os

    then = set((lock.get("script") or {}).get("environment_names") or ())
    if not then:
        return ""
    now = set(os.environ)
    gone, new = sorted(then - now), sorted(now - then)
    if not gone and not new:
        return ""
    parts = [f"set when it ran, not now: {', '.join(gone[:8])}{' ...' if len(gone) > 8 else ''}"
             if gone else "",
             f"set now, not when it ran: {', '.join(new[:8])}{' ...' if len(new) > 8 else ''}"
             if new else ""]
    return (f"\nThe environment differs from the original run's (variables "
            f"{'; '.join(p for p in parts if p)}). If the command needs one, set it, or run "
            f"it again with --env NAME=VALUE so that the run records it and its replays set "
            f"it.")


def replayed(run_dir: Path, lock: Dict[str, Any]) -> Dict[str, Any]:
    """The new lock's `replay_of`: the directory replayed, by its own name and path. A copy
    of a run (renamed, or in another runs directory) is its own record: its verdict must not
    be listed against the run it was copied from, named in `copy_of`."""
    link = {"run_id": run_dir.name, "run_dir": str(run_dir.resolve()),
            "lock_sha256": lock["lock_sha256"]}
    if lock["run_id"] != run_dir.name:
        link["copy_of"] = lock["run_id"]
    return link


def replay(ref: str, runs_dir: Optional[Path] = None, allow_mismatch: bool = False,
           tracking_uri: Optional[str] = None, negative_control: bool = False,
           trust: bool = False, all_divergences: bool = False) -> int:
    """Replay a run: plan it without torch (integrity, trust, the gate), run it again,
    compare bit for bit, and return 0 for IDENTICAL; raise Diverged or Unverified else."""
    started = time.perf_counter()
    orig_dir, lock, cfg = load_original(locate(ref, runs_dir, tracking_uri), runs_dir, trust)
    refuse_follow_ups(orig_dir, cfg, negative_control, all_divergences)
    here, cache_key = captured(orig_dir, lock, cfg)
    if cache_key:
        print("harness: environment as captured before, for this unchanged interpreter, "
              "packages and machine (HARNESS_REHASH=1 captures it afresh)", flush=True)
    diffs, facts = checked_environment(orig_dir.name, lock, cfg, here, allow_mismatch)
    if config.is_script(cfg):  # the same inputs, or no proof: refuse (exit 3) before running
        files.check_command_unchanged(lock["script"], Path.cwd(), orig_dir.name)
        for warning in lock["script"]["warnings"]:
            print(f"harness: the original run warned: {warning}", flush=True)
    gate_s = time.perf_counter() - started

    link = replayed(orig_dir, lock)
    train_started = time.perf_counter()
    new_dir = relaunched(cfg, lock, runs_dir or orig_dir.parent,
                         {"replay_of": link, "replay_mismatches": [d.to_json() for d in diffs]},
                         facts)
    train_s = time.perf_counter() - train_started

    compare_started = time.perf_counter()
    new_lock = lockfile.read(new_dir / rundir.LOCK)
    held_against_run(here, cache_key, new_lock, cfg)
    report = compared(orig_dir, new_dir, lock, new_lock, cfg, diffs)
    compare_s = time.perf_counter() - compare_started
    print(bitwise.render(report), flush=True)
    blocking = [d for d in diffs if d.blocking]
    record = {**report, "replay_of": link, "allowed_mismatch": bool(blocking),
              "blocking_differences": [d.to_json() for d in blocking],
              "timing": {"gate_s": round(gate_s, 3), "train_s": round(train_s, 3),
                         "compare_s": round(compare_s, 3)}}
    rundir.write_json(new_dir / rundir.REPLAY, record)  # kept even if the control fails
    if negative_control and report["verdict"] == bitwise.IDENTICAL:
        report["negative_control"] = record["negative_control"] = \
            control(cfg, lock, orig_dir, runs_dir or orig_dir.parent, facts)
    if all_divergences and report["verdict"] == bitwise.DIVERGED:
        report["all_divergences"] = record["all_divergences"] = \
            divergences(cfg, lock, orig_dir, runs_dir or orig_dir.parent, facts)
    if "negative_control" in report or "all_divergences" in report:
        rundir.write_json(new_dir / rundir.REPLAY, record)
        print(f"run dir: {new_dir}", flush=True)  # the replay's directory is named last
    unproven_class = gate.find(diffs, gate.CLASS_KEY)
    if unproven_class and unproven_class.group == gate.UNPROVEN and \
            report["verdict"] == bitwise.IDENTICAL:
        print(f"harness: machine classes {unproven_class.a} and {unproven_class.b} gave the "
              f"same bits for this run; `make record-machine` on both records it as "
              f"evidence for every run of this CPU mode.", flush=True)
    raise_unless_identical(report, orig_dir, new_dir, cfg, diffs)
    return 0


def refuse_follow_ups(orig_dir: Path, cfg: Dict[str, Any], negative_control: bool,
                      all_divergences: bool) -> None:
    """Refuse, before anything runs, a follow-up run the original cannot have."""
    for asked, flag in ((negative_control, "--negative-control"),
                        (all_divergences, "--all-divergences")):
        if asked and config.is_script(cfg):
            raise ConfigError(f"{flag} works on the built-in training loop; {orig_dir.name} "
                              f"ran a command of its own. Replay it without {flag}.")
    if all_divergences and cfg["backend"]["name"] != "local":
        raise ConfigError(f"--all-divergences reads the original's op outputs from its run "
                          f"directory in a run on this machine: it works for runs of the "
                          f"local backend, and {orig_dir.name} ran with "
                          f"backend={cfg['backend']['name']}. Train it with backend=local "
                          f"and trainer.op_trace_tensors=true, then replay that run.")
    if all_divergences and not (orig_dir / rundir.OP_TRACE_TENSORS).is_file():
        raise ConfigError(f"--all-divergences needs the outputs of the run's traced ops, and "
                          f"{orig_dir.name} kept none ({rundir.OP_TRACE_TENSORS}): train it "
                          f"again with trainer.op_trace_tensors=true, then replay that run.")


def relaunched(cfg: Dict[str, Any], lock: Dict[str, Any], runs_dir: Path,
               extra: Dict[str, Any], facts: Dict[str, Any]) -> Path:
    """The replay's own run; a command's failure names the environment it needed."""
    from harness.commands import train

    try:
        return train.start(cfg, lock.get("overrides", []), runs_dir, extra,
                            backend_facts=facts)
    except RunFailed as failed:
        if not config.is_script(cfg):
            raise
        raise RunFailed(f"{failed}{environment_hint(lock)}", failed.exit_code) from None


def compared(orig_dir: Path, new_dir: Path, lock: Dict[str, Any], new_lock: Dict[str, Any],
             cfg: Dict[str, Any], diffs: List[gate.Difference]) -> Dict[str, Any]:
    """The bitwise comparison; where it DIVERGED, the first op that computed differently."""
    if config.is_script(cfg):
        report = bitwise.compare_outputs(orig_dir, new_dir, lock, new_lock)
    else:
        report = bitwise.compare_runs(orig_dir, new_dir, lock, new_lock)
    if report["verdict"] == bitwise.DIVERGED:
        try:
            report["first_differing_op"] = op_trace.compare(
                orig_dir, new_dir, op_trace.environment_fields(diffs))
        except LockfileError as exc:  # the verdict stands; only its explanation is lost
            report["first_differing_op"] = {"kind": "unreadable", "line": f"op trace: {exc}"}
    return report


def raise_unless_identical(report: Dict[str, Any], orig_dir: Path, new_dir: Path,
                           cfg: Dict[str, Any], diffs: List[gate.Difference]) -> None:
    """The verdict as an exit: Unverified (8) or Diverged (7) with what to do next."""
    checked = report.get("negative_control")
    if checked and checked["verdict"] == bitwise.IDENTICAL:
        raise Unverified(
            f"replay {new_dir.name} of {orig_dir.name} is UNVERIFIED: the negative control "
            f"({perturb.DESCRIPTION}; run {checked['run']}) compared IDENTICAL too, so this "
            f"comparison cannot tell a changed run apart: its losses, fingerprints and final "
            f"weights did not see the flipped weight. Something resets or ignores the "
            f"model's first parameter; until the comparison can see a change, its IDENTICAL "
            f"proves nothing.")
    if report["verdict"] == bitwise.UNVERIFIED:
        raise Unverified(
            f"replay {new_dir.name} of {orig_dir.name} is UNVERIFIED: no declared output "
            f"file was written by both runs and the command printed nothing, so there was "
            f"nothing to compare. Run it again "
            f"with --output naming what it writes (a file, a directory or a glob, e.g. "
            f"--output 'out/*'), then replay that run. A file left from before a run "
            f"started does not count: delete stale outputs before the run.")
    if report["verdict"] != bitwise.IDENTICAL and config.is_script(cfg):
        raise Diverged(
            f"replay {new_dir.name} of {orig_dir.name} DIVERGED: "
            f"{', '.join(d['file'] for d in report['differing']) or 'its console output'} "
            f"differ (report in "
            f"{new_dir / rundir.REPLAY}). The command is not deterministic here: look for "
            f"randomness it seeds itself (from the clock, say) or settings it changes "
            f"(`harness runs` lists the warnings).{op_line(report)}")
    if report["verdict"] != bitwise.IDENTICAL:
        raise Diverged(
            f"replay {new_dir.name} of {orig_dir.name} DIVERGED at step "
            f"{report['first_diverging_step']} (report in {new_dir / rundir.REPLAY})."
            f"{likely_cause(diffs, cfg['determinism']['cpu_isa'])} Run "
            f"`harness verify {cfg['name']}` here to see "
            f"whether the config is deterministic and which module differs first."
            f"{op_line(report)}")


def op_line(report: Dict[str, Any]) -> str:
    """The op trace's one line for a DIVERGED report, on a line of its own; '' without."""
    found = report.get("first_differing_op")
    if found is None:
        return ("\nop trace: none to compare (a run without op-trace.jsonl.gz: "
                "op_trace_steps=0, a command that took no optimizer step or ran without "
                "the injection, or a run recorded before op traces).")
    return f"\n{found['line']}"


def rerun_with(variable: str, value: str, cfg: Dict[str, Any], lock: Dict[str, Any],
               runs_dir: Path, facts: Dict[str, Any], lock_extra: Dict[str, Any]) -> Path:
    """The run's config once more, as a run of its own marked by `lock_extra`, launched
    with `variable` set in this process's environment (a local training process inherits
    it; train._run passes PERTURB on to any backend); `facts`: the backend's lock facts
    the replay's gate asked for."""
    import os

    from harness.commands import train

    os.environ[variable] = value
    try:
        return train.start(cfg, lock.get("overrides", []), runs_dir, lock_extra,
                           backend_facts=facts)
    finally:
        os.environ.pop(variable, None)


def control(cfg: Dict[str, Any], lock: Dict[str, Any], orig_dir: Path,
            runs_dir: Path, facts: Dict[str, Any]) -> Dict[str, Any]:
    """The negative control: the same config once more, one weight bit flipped after step 1
    (harness/training/perturb.py), compared with the original. It must come out DIVERGED. `facts`:
    the backend's lock facts the replay's gate asked for."""
    print(f"harness: negative control: replaying with {perturb.DESCRIPTION} ...", flush=True)
    control_dir = rerun_with(PERTURB, perturb.WEIGHT_BIT, cfg, lock, runs_dir, facts,
                             {"negative_control_of": {"run_id": lock["run_id"],
                                                      "perturbation": perturb.DESCRIPTION}})
    report = bitwise.compare_runs(orig_dir, control_dir, lock,
                                  lockfile.read(control_dir / rundir.LOCK))
    print(f"harness: negative control {control_dir.name}: {report['verdict']}"
          + (f" at step {report['first_diverging_step']}: the comparison can fail"
             if report["verdict"] != bitwise.IDENTICAL else ""), flush=True)
    traced = op_trace.compare(orig_dir, control_dir)
    if traced is not None and report["verdict"] != bitwise.IDENTICAL:
        print(f"harness: negative control {traced['line']}", flush=True)
    return {"run": control_dir.name, "perturbation": perturb.DESCRIPTION,
            "verdict": report["verdict"],
            "first_diverging_step": report["first_diverging_step"]}


def divergences(cfg: Dict[str, Any], lock: Dict[str, Any], orig_dir: Path, runs_dir: Path,
                facts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """--all-divergences: the config once more, with every traced op whose output bits
    differ from the original's given the original's outputs (op-trace-tensors.pt), so that
    the ops after it get the inputs they got there. Each op that then differs computes
    differently here in its own right: the list is every one in the traced steps, where
    the replay's trace can name only the first. `facts`: the gate's backend facts."""
    print("harness: --all-divergences: running the config once more, giving each op that "
          "differs the original's outputs ...", flush=True)
    probe_dir = rerun_with(OP_TRACE_RELOAD, str(orig_dir), cfg, lock, runs_dir, facts,
                           {"op_trace_reload_of": {"run_id": lock["run_id"]}})
    original, probe = op_trace.read(orig_dir), op_trace.read(probe_dir)
    found = op_trace.kernel_differences(original, probe) if original and probe else []
    total = len(original["ops"]) if original else 0
    print(f"harness: {len(found)} op(s) compute differently here in the traced steps "
          f"(run {probe_dir.name}):", flush=True)
    for op in found:
        print(f"  {op_trace.where(op, total)}", flush=True)
    return [{**op, "run": probe_dir.name} for op in found]
