"""`harness run -- COMMAND`: a user's own training script (tests/fixtures/user_train.py,
written without the harness in mind) run through the real CLI on the local, docker and
Slurm backends, replayed, and refused or failed with the documented exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import read_lock, require, run_dir_of

from harness.record import op_trace

RUN = ["--input", "data.npz", "--output", "out/*", "--", "python", "train.py", "--data",
       "data.npz"]


def outputs_of(run_dir: Path) -> dict:
    return read_lock(run_dir)["results"]["outputs"]


def runs_in(directory: Path) -> list:
    runs = directory / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def test_unmodified_script_repeats_and_replays_identical(project):
    directory, harness = project
    first = run_dir_of(harness("run", "backend=local", *RUN, check_rc=0))
    second = run_dir_of(harness("run", "backend=local", *RUN, check_rc=0))
    assert set(outputs_of(first)) == {"out/model.pt", "out/metrics.json"}
    assert outputs_of(first) == outputs_of(second)
    assert (first / "outputs/out/model.pt").read_bytes() == \
        (directory / "out/model.pt").read_bytes()
    lock = read_lock(first)
    from test_lockfile import documented_fields, lookup

    for field in documented_fields(command_run=True):
        lookup(lock, field)
    assert lock["script"]["argv"] == ["python", "train.py", "--data", "data.npz"]
    assert set(lock["script"]["inputs"]) == {"data.npz", "train.py"}
    assert lock["determinism"]["in_effect"]["deterministic_algorithms"] is True
    assert lock["script"]["warnings"] == []
    assert lock["script"]["processes"][0]["dataloaders"] == 1
    # the second run found the first one's outputs in place: moved aside, and said
    assert sorted(p.name for p in (second / "displaced" / "out").iterdir()) == \
        ["metrics.json", "model.pt"]

    # the script's first optimizer step, traced in its process through the injection
    trace = op_trace.read(first)
    assert trace["header"]["steps"] == [1]
    assert {op["phase"] for op in trace["ops"]} == {"forward", "backward", "optimizer"}
    assert lock["results"]["op_trace_sha256"]
    assert (first / "op-trace.jsonl.gz").read_bytes() == \
        (second / "op-trace.jsonl.gz").read_bytes()

    replayed = harness("replay", first.name, check_rc=0)
    assert "IDENTICAL: all 2 declared output file(s) written by both runs match byte for " \
        "byte" in replayed.stdout
    listed = harness("runs", check_rc=0).stdout
    assert f"replay of {first.name}: IDENTICAL" in listed


@pytest.mark.long
def test_a_command_with_no_output_file_is_compared_by_what_it_printed(project):
    """No declared file: the replay compares the command's console output (warned at run
    time). A command whose printed result changes is caught; one that prints nothing and
    declares nothing has nothing compared: UNVERIFIED, exit 8."""
    directory, harness = project
    printing = harness("run", "backend=local", "--", "python", "-c", "print(2 + 2)",
                       check_rc=0)
    assert "declared no output file" in printing.stdout
    run = run_dir_of(printing)
    assert read_lock(run)["results"]["console"]["bytes"] == 2
    done = harness("replay", run.name, check_rc=0)
    assert "IDENTICAL: the command's console output (2 bytes" in done.stdout

    # the control: what it prints changes from run to run (the clock, unpinned)
    clock = "import time; print(time.time_ns())"
    changing = run_dir_of(harness("run", "backend=local", "--", "python", "-c", clock,
                                  check_rc=0))
    done = harness("replay", changing.name, check_rc=7)
    assert "DIVERGED: the command's console output differs" in done.stdout
    assert "first at line 1" in done.stdout and "its console output differ" in done.stderr

    silent = run_dir_of(harness("run", "backend=local", "--", "python", "-c", "pass",
                                check_rc=0))
    done = harness("replay", silent.name)
    assert done.returncode == 8, done.stdout + done.stderr
    assert "UNVERIFIED: " in done.stdout and "IDENTICAL: " not in done.stdout
    assert "--output" in done.stderr
    assert "replay of " + silent.name + ": UNVERIFIED" in harness("runs", check_rc=0).stdout


@pytest.mark.long
def test_an_output_left_from_before_cannot_make_a_replay_identical(project):
    """A declared output left from before the run is moved aside before the command
    starts: a command that does not write it fails (its output matched nothing), and the
    file is kept in the run directory. One that an input protects from being moved and
    that the command never wrote is not counted, so the verdict is UNVERIFIED. The
    control: once written, it is counted."""
    directory, harness = project
    (directory / "stale").mkdir()
    (directory / "stale" / "result.txt").write_text("from an earlier run\n")
    before = set(runs_in(directory))
    done = harness("run", "backend=local", "--output", "stale/result.txt", "--",
                   "python", "-c", "pass", check_rc=1)
    assert "moved 1 declared output(s) that existed before the command started" in done.stdout
    assert "stale/result.txt matched no file" in done.stderr
    (moved,) = set(runs_in(directory)) - before
    assert (directory / "runs" / moved / "displaced" / "stale" / "result.txt").read_text() \
        == "from an earlier run\n"

    (directory / "stale" / "result.txt").write_text("from an earlier run\n")
    stale = run_dir_of(harness("run", "backend=local", "--input", "stale", "--output",
                               "stale/result.txt", "--", "python", "-c", "pass", check_rc=0))
    assert outputs_of(stale)["stale/result.txt"]["unwritten"] is True
    done = harness("replay", stale.name)
    assert done.returncode == 8, done.stdout + done.stderr
    assert "Not counted: 1 file(s) that a run did not write (stale/result.txt)" in done.stdout
    assert "UNVERIFIED: " in done.stdout and "IDENTICAL: " not in done.stdout

    write = "open('stale/result.txt', 'w').write('4\\n')"
    written = run_dir_of(harness("run", "backend=local", "--output", "stale/result.txt", "--",
                                 "python", "-c", write, check_rc=0))
    assert "unwritten" not in outputs_of(written)["stale/result.txt"]
    assert "IDENTICAL: all 1 declared" in harness("replay", written.name, check_rc=0).stdout


def test_a_swapped_output_file_is_refused_before_anything_runs(project):
    directory, harness = project
    run_dir = run_dir_of(harness("run", "backend=local", *RUN, check_rc=0))
    harness("lock", "check", run_dir.name, check_rc=0)
    kept = run_dir / "outputs" / "out" / "metrics.json"
    kept.write_text(kept.read_text().replace("0", "1", 1))
    count = len(runs_in(directory))
    done = harness("replay", run_dir.name, check_rc=5)
    assert "the lockfile does not describe this run" in done.stderr
    assert "results.outputs[out/metrics.json].sha256" in done.stderr
    assert len(runs_in(directory)) == count
    assert "results.outputs[out/metrics.json]" in \
        harness("lock", "check", run_dir.name, check_rc=5).stderr


def test_a_failed_run_has_nothing_to_replay(project):
    directory, harness = project
    before = set(runs_in(directory))
    harness("run", "backend=local", "--", "python", "-c", "raise SystemExit(3)", check_rc=3)
    (name,) = set(runs_in(directory)) - before
    run_dir = directory / "runs" / name
    done = harness("replay", run_dir.name, check_rc=6)
    assert f"run {run_dir.name} has nothing to replay: it failed (exit 3" in done.stderr
    assert "damaged" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.long
def test_without_the_injection_the_same_script_does_not_repeat(project):
    """The control: what the harness adds is what makes the script repeat."""
    _, harness = project
    runs = [run_dir_of(harness("run", "backend=local", "command.inject=false", *RUN,
                               check_rc=0)) for _ in range(2)]
    assert outputs_of(runs[0])["out/model.pt"] != outputs_of(runs[1])["out/model.pt"]


def test_script_seeding_from_the_clock_diverges_naming_the_file(project):
    _, harness = project
    run_dir = run_dir_of(harness("run", "backend=local", *RUN, "--seed-from-clock", check_rc=0))
    done = harness("replay", run_dir.name, check_rc=7)
    assert "DIVERGED" in done.stdout
    assert "out/model.pt: sha256" in done.stdout
    assert "first differing tensor 0." in done.stdout and "max abs difference" in done.stdout
    assert "out/model.pt" in done.stderr
    # The op trace of the script's first step (through the injection): its first op reads
    # weights the clock drew before training began: the data, not the machine.
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("op trace: first differing op aten::") and \
        "(forward) in model.0, step 1, call 1 of " in last, last
    assert "its inputs differed (" in last and "weight" in last and "the data changed it" in last


def test_edited_input_is_refused_with_exit_3_naming_both_hashes(project):
    directory, harness = project
    run_dir = run_dir_of(harness("run", "backend=local", *RUN, check_rc=0))
    before = read_lock(run_dir)["script"]["inputs"]["data.npz"]["sha256"]
    data = np.load(directory / "data.npz")
    np.savez(directory / "data.npz", x=data["x"] * 1.0001, y=data["y"])
    count = len(runs_in(directory))
    done = harness("replay", run_dir.name, check_rc=3)
    assert "input data.npz changed" in done.stderr and before in done.stderr
    assert len(runs_in(directory)) == count  # nothing ran, nothing was written


@pytest.mark.long
def test_settings_changed_behind_the_harness_back_are_flagged(project):
    _, harness = project
    done = harness("run", "backend=local", *RUN, "--fast-flags", check_rc=0)
    warnings = read_lock(run_dir_of(done))["script"]["warnings"]
    assert any("cuDNN benchmark" in w and "False -> True" in w for w in warnings), warnings
    assert any("TF32 for CUDA matmuls" in w for w in warnings), warnings
    assert "harness: warning:" in done.stdout
    assert "warning: pid" in harness("runs", check_rc=0).stdout


@pytest.mark.long
def test_a_library_probing_for_torch_does_not_escape_the_pinning(project):
    """transformers, accelerate and Lightning ask `find_spec("torch")` before importing it;
    an argument longer than a file name may be is not mistaken for one."""
    directory, harness = project
    (directory / "probe.py").write_text(
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is not None\n"
        "import torch\n"
        "print('pinned', torch.are_deterministic_algorithms_enabled(), torch.initial_seed())\n")
    done = harness("run", "backend=local", "seed=5", "--", "python", "probe.py", "x" * 300,
                   check_rc=0)
    assert "pinned True 5" in done.stdout
    lock = read_lock(run_dir_of(done))
    assert lock["determinism"]["in_effect"]["deterministic_algorithms"] is True
    assert lock["script"]["warnings"] == []
    assert list(lock["script"]["inputs"]) == ["probe.py"]


def test_bad_command_lines_fail_clearly_and_write_nothing(project):
    directory, harness = project
    no_dash = harness("run", "backend=local", "python", "train.py", check_rc=2)
    assert "after `--`" in no_dash.stderr
    assert "nothing to run" in harness("run", "backend=local", "--", check_rc=2).stderr
    missing = harness("run", "backend=local", "--", "pyhton", "train.py", check_rc=2)
    assert "command not found: 'pyhton'" in missing.stderr
    no_input = harness("run", "backend=local", "--input", "nope.npz", "--", "python",
                       "train.py", check_rc=3)
    assert "--input nope.npz: no such file" in no_input.stderr
    builtin = harness("run", "mnist", "backend=local", "--", "python", "train.py", check_rc=2)
    assert "built-in loop" in builtin.stderr
    outside = harness("run", "backend=local", "--output", "../x", "--", "python", "train.py",
                      check_rc=2)
    assert "inside the working directory" in outside.stderr
    assert runs_in(directory) == []


def test_failing_command_is_the_runs_exit_code_and_leaves_its_log(project):
    directory, harness = project
    done = harness("run", "backend=local", *RUN, "--fail", check_rc=1)
    assert "the command exited with code 1" in done.stderr
    [name] = runs_in(directory)
    status = json.loads((directory / "runs" / name / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1
    assert status["error"]["message"] == "the command exited with code 1"
    assert "something went wrong" in (directory / "runs" / name / "train.log").read_text()
    assert not (directory / "runs" / name / "harness.lock").exists()


def test_output_that_matches_nothing_fails_the_run(project):
    _, harness = project
    done = harness("run", "backend=local", "--output", "out/none.pt", "--", "python",
                   "train.py", "--data", "data.npz", check_rc=1)
    assert "out/none.pt matched no file" in done.stderr


@pytest.mark.long
def test_sigterm_reaches_the_script_and_75_resumes(project, cache_home):
    """Preemption: the launcher passes SIGTERM to the command, whose exit code 75 marks the
    run preempted; `harness train --resume` runs it again with HARNESS_RESUME=1."""
    directory, _ = project
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "backend=local", *RUN, "--wait-for-signal"],
        cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "waiting for a signal" in line:
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output = process.stdout.read()
    assert process.wait(timeout=60) == 75, output
    [name] = runs_in(directory)
    assert json.loads((directory / "runs" / name / "status.json").read_text())["state"] == \
        "preempted"
    resumed = subprocess.run([sys.executable, "-m", "harness", "train", "--resume", name],
                             cwd=directory, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from {'stopped': True}" in resumed.stdout
    assert "out/model.pt" in outputs_of(directory / "runs" / name)


# ---------------------------------------------------------------- docker and Slurm


def docker_engine_up() -> bool:
    import docker

    try:
        docker.from_env(timeout=30).ping()
    except Exception:  # noqa: BLE001 - no engine: require() skips or (CI) fails
        return False
    return True


@pytest.mark.docker
@pytest.mark.long
def test_docker_run_matches_local_and_replays_identical(project):
    require(docker_engine_up(), "no Docker engine answers (run `make docker-env`)")
    directory, harness = project
    local = run_dir_of(harness("run", "backend=local", *RUN, check_rc=0))
    shutil.rmtree(directory / "out")
    in_docker = run_dir_of(harness("run", "backend=docker", *RUN, check_rc=0))
    assert outputs_of(in_docker) == outputs_of(local)
    assert not any((directory / "out").iterdir())  # the project itself was not written
    assert "IDENTICAL" in harness("replay", in_docker.name, check_rc=0).stdout
    refused = harness("run", "backend=docker", "--output", "model.pt", "--", "python",
                      "train.py", check_rc=2)
    assert "declare outputs inside a directory" in refused.stderr
    overlap = harness("run", "backend=docker", "--input", "out/old.pt", "--output", "out/x",
                      "--", "python", "train.py", check_rc=2)
    assert "--input out/old.pt is inside out/" in overlap.stderr


@pytest.mark.slurm
@pytest.mark.long
def test_slurm_job_of_the_script_matches_local_and_replays(project):
    from test_slurm import slurm_up

    require(slurm_up(), "Slurm is not running here (make slurm-env)")
    directory, harness = project
    local = run_dir_of(harness("run", "backend=local", *RUN, check_rc=0))
    submitted = harness("submit", "--wait", *RUN, check_rc=0)
    job = run_dir_of(submitted)
    assert (job / "job.sbatch").exists()
    assert outputs_of(job) == outputs_of(local)
    assert "IDENTICAL" in harness("replay", job.name, check_rc=0).stdout
    sweep = harness("submit", "-m", "seed=1,2", *RUN, check_rc=2)
    assert "submit each setting on its own" in sweep.stderr

