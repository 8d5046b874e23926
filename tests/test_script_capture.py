"""A user's own command, captured completely (issue 29), through the real CLI on the local
backend: every file its processes imported, the packages of the interpreter that actually
ran it, the variables it needs, outputs that start clean, a resume that means resume, and a
rank that hangs at exit stopped and named instead of waited on forever.

The scripts are the user's kind (tests/fixtures/wordlm: a language model split over three
modules; tests/fixtures/snapshot_ddp.py: a torchrun script that resumes from its own
snapshot), and a second virtual environment holds a package the harness's lacks."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_lock, require, run_dir_of

FIXTURES = Path(__file__).parent / "fixtures"
WORDLM = ["--input", "corpus.txt", "--output", "out/model.pt", "--", "python", "main.py",
          "--data", "corpus.txt", "--epochs", "1"]


def runs_in(directory: Path) -> list:
    runs = directory / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


@pytest.fixture
def wordlm(project):
    directory, harness = project
    for name in ("main.py", "model.py", "data.py"):
        shutil.copy(FIXTURES / "wordlm" / name, directory / name)
    words = "the cat sat on a mat dog ran far and".split()
    draw = random.Random(0)
    (directory / "corpus.txt").write_text("\n".join(
        " ".join(draw.choice(words) for _ in range(12)) for _ in range(40)))
    return directory, harness


def test_an_edited_imported_module_is_caught_before_the_replay_runs(wordlm):
    """main.py is on the command line; model.py and data.py are only imported. Each is
    hashed, an unchanged replay is IDENTICAL, and an edit to model.py (then to data.py, in a
    command started through a shell) is refused, named, before anything runs."""
    directory, harness = wordlm
    run = run_dir_of(harness("run", "backend=local", *WORDLM, check_rc=0))
    script = read_lock(run)["script"]
    assert set(script["imported"]) == {"model.py", "data.py"}, script["imported"]
    assert script["imported"]["model.py"]["sha256"] == \
        __import__("hashlib").sha256((directory / "model.py").read_bytes()).hexdigest()
    assert "IDENTICAL" in harness("replay", run.name, check_rc=0).stdout

    count = len(runs_in(directory))
    with open(directory / "model.py", "a") as edited:
        edited.write("\n# tuned by hand\n")
    done = harness("replay", run.name, check_rc=3)
    assert "imported file model.py changed since run " + run.name in done.stderr
    assert len(runs_in(directory)) == count  # refused before a run directory was made

    shell = "python main.py --data corpus.txt --epochs 1"
    through_shell = run_dir_of(harness("run", "backend=local", "--output", "out/model.pt",
                                       "--", "bash", "-c", shell, check_rc=0))
    assert set(read_lock(through_shell)["script"]["imported"]) == \
        {"main.py", "model.py", "data.py"}
    (directory / "data.py").write_text((directory / "data.py").read_text() + "\n")
    done = harness("replay", through_shell.name, check_rc=3)
    assert "imported file data.py changed since run " + through_shell.name in done.stderr


def make_venv_with_package(path: Path, version: str) -> Path:
    """A second virtual environment (no pip) holding `fancylib`, a distribution the
    harness's own environment lacks; the interpreter's path."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = next(path.glob("lib/python3*/site-packages"))
    (site / "fancylib").mkdir()
    (site / "fancylib" / "__init__.py").write_text("def scale(x):\n    return 3 * x\n")
    info = site / "fancylib-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fancylib\n"
                                   f"Version: {version}\n")
    (info / "top_level.txt").write_text("fancylib\n")
    return path / "bin" / "python"


def test_the_lock_names_the_packages_of_the_interpreter_that_ran(project, tmp_path):
    """The command runs with another venv's interpreter: the lock names that interpreter
    and fancylib, which the harness's venv does not have. The same packages replay
    IDENTICAL; an upgraded fancylib is refused by the gate, named."""
    directory, harness = project
    python = make_venv_with_package(tmp_path / "venv", "1.2.3")
    (directory / "scaled.py").write_text(
        "import os, random, fancylib\nos.makedirs('out', exist_ok=True)\n"
        "open('out/r.txt', 'w').write(repr(fancylib.scale(random.random())))\n")
    run = run_dir_of(harness("run", "backend=local", "--output", "out/r.txt", "--",
                             str(python), "scaled.py", check_rc=0))
    lock = read_lock(run)
    [interpreter] = lock["interpreters"]
    assert interpreter["python"] == str(python)
    assert interpreter["imported"] == {"fancylib": "1.2.3"}
    assert "fancylib" not in lock["software"]["packages"]  # the harness's own venv
    assert "IDENTICAL" in harness("replay", run.name, check_rc=0).stdout

    metadata = next((tmp_path / "venv").glob("lib/python3*/site-packages/fancylib-1.0."
                                              "dist-info/METADATA"))
    metadata.write_text(metadata.read_text().replace("1.2.3", "1.3.0"))
    done = harness("replay", run.name, check_rc=6)
    assert "interpreters[0].imported.fancylib" in done.stderr
    assert "1.2.3" in done.stderr and "1.3.0" in done.stderr
    assert "the command imported it" in done.stderr


NEEDS_FLAG = ("import os, sys\nif os.environ.get('MY_FLAG') != '1':\n"
              "    sys.exit('MY_FLAG must be 1')\nos.makedirs('out', exist_ok=True)\n"
              "open('out/ok.txt', 'w').write('ok')\n")


@pytest.mark.long
def test_a_variable_the_command_needs_is_recorded_and_set_on_replay(project):
    """--env MY_FLAG=1: recorded in the config and set again by a replay from a shell that
    lacks it. The control: the same command run with MY_FLAG only in the shell fails in
    such a replay, and the failure names MY_FLAG."""
    directory, harness = project
    (directory / "needs_flag.py").write_text(NEEDS_FLAG)
    declared = run_dir_of(harness("run", "backend=local", "--env", "MY_FLAG=1", "--output",
                                  "out/ok.txt", "--", "python", "needs_flag.py", check_rc=0))
    assert read_lock(declared)["config"]["command"]["env"] == {"MY_FLAG": "1"}
    done = harness("replay", declared.name, check_rc=0, env={"MY_FLAG": None})
    assert "IDENTICAL" in done.stdout

    undeclared = run_dir_of(harness("run", "backend=local", "--output", "out/ok.txt", "--",
                                    "python", "needs_flag.py", check_rc=0,
                                    env={"MY_FLAG": "1"}))
    assert "MY_FLAG" in read_lock(undeclared)["script"]["environment_names"]
    done = harness("replay", undeclared.name, check_rc=1, env={"MY_FLAG": None})
    assert "set when it ran, not now: MY_FLAG" in done.stderr
    assert "--env NAME=VALUE" in done.stderr

    bad = harness("run", "backend=local", "--env", "OMP_NUM_THREADS=4", "--", "python",
                  "needs_flag.py", check_rc=2)
    assert "determinism.threads" in bad.stderr


PLOT = ("import os, sys\nimport matplotlib\nmatplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\nos.makedirs('out', exist_ok=True)\n"
        "plt.plot([1, 3, 2])\nplt.savefig('out/plot.pdf')\n")
STAMP = ("import datetime, os, time\ntime.sleep(1.1)\nos.makedirs('out', exist_ok=True)\n"
         "open('out/report.txt', 'w').write('written ' + "
         "datetime.datetime.now().isoformat() + '\\n')\n")


@pytest.mark.long
def test_files_that_embed_a_date_reproduce_or_say_so(project):
    """SOURCE_DATE_EPOCH is set and recorded for every command: a matplotlib PDF (its
    /CreationDate) replays IDENTICAL. The control: a file stamped with the clock DIVERGES,
    and the verdict says the differing bytes are a date."""
    directory, harness = project
    (directory / "plot.py").write_text(PLOT)
    run = run_dir_of(harness("run", "backend=local", "--output", "out/plot.pdf", "--",
                             "python", "plot.py", check_rc=0))
    epoch = read_lock(run)["config"]["command"]["source_date_epoch"]
    assert isinstance(epoch, int) and epoch > 1_700_000_000
    assert b"/CreationDate" in (directory / "out" / "plot.pdf").read_bytes()
    assert "IDENTICAL" in harness("replay", run.name, check_rc=0).stdout

    (directory / "stamp.py").write_text(STAMP)
    stamped = run_dir_of(harness("run", "backend=local", "--output", "out/report.txt", "--",
                                 "python", "stamp.py", check_rc=0))
    done = harness("replay", stamped.name, check_rc=7)
    assert "out/report.txt" in done.stdout
    assert "the differing bytes form a date or time" in done.stdout


@pytest.mark.long
def test_a_script_that_resumes_from_its_own_output_starts_fresh(project):
    """The torchrun tutorial's script resumes from out/snapshot.pt when the file exists.
    A second run of the same command moves the first run's snapshot aside (into its run
    directory, nothing lost) and trains from the start: the same snapshot again. Without
    that it would have resumed at the last epoch, trained nothing and written nothing."""
    directory, harness = project
    shutil.copy(FIXTURES / "snapshot_ddp.py", directory / "snapshot_ddp.py")
    command = ["--nproc", "2", "--output", "out/snapshot.pt", "--", "python",
               "snapshot_ddp.py", "2"]
    first = run_dir_of(harness("run", "backend=local", *command, check_rc=0))
    second_done = harness("run", "backend=local", *command, check_rc=0)
    second = run_dir_of(second_done)
    assert "moved 1 declared output(s) that existed before the command started " \
           "(out/snapshot.pt)" in second_done.stdout
    assert "resuming from snapshot" not in second_done.stdout
    assert (second / "displaced" / "out" / "snapshot.pt").read_bytes() == \
        (first / "outputs" / "out" / "snapshot.pt").read_bytes()
    assert read_lock(first)["results"]["outputs"] == read_lock(second)["results"]["outputs"]
    assert "unwritten" not in json.dumps(read_lock(second)["results"]["outputs"])
    assert "IDENTICAL" in harness("replay", first.name, check_rc=0).stdout


@pytest.mark.long
def test_a_rank_that_hangs_at_exit_is_stopped_and_named(project):
    """Rank 1 blocks at exit after its work. Once rank 0 exited 0, rank 1 gets
    command.exit_grace_s, then it is stopped, named with its stack, and the run keeps its
    lock (every declared output was written) and replays. Without a declared output the
    same hang fails the run: nothing shows its work was done."""
    directory, harness = project
    shutil.copy(FIXTURES / "snapshot_ddp.py", directory / "snapshot_ddp.py")
    command = ["python", "snapshot_ddp.py", "2", "--hang-rank", "1"]
    done = harness("run", "backend=local", "command.exit_grace_s=3", "--nproc", "2",
                   "--output", "out/snapshot.pt", "--", *command, check_rc=0, timeout=300)
    assert "rank 1 did not exit within 3 s after rank 0 exited 0: stopped" in done.stdout
    assert "Current thread" in done.stdout  # its stack, from faulthandler
    run = run_dir_of(done)
    script = read_lock(run)["script"]
    assert [hung["rank"] for hung in script["hung_ranks"]] == [1]
    assert any("rank 1 did not exit" in warning for warning in script["warnings"])
    assert "IDENTICAL" in harness("replay", run.name, check_rc=0, timeout=300).stdout

    failed = harness("run", "backend=local", "command.exit_grace_s=3", "--nproc", "2", "--",
                     *command, check_rc=1, timeout=300)
    assert "declares no output" in failed.stderr


def test_resume_of_a_command_that_was_not_preempted_is_refused(project):
    """A command that failed (or was killed) did not checkpoint and ask to go on: a resume
    would start it again from the beginning. Refused, exit 6, with the reason."""
    directory, harness = project
    before = set(runs_in(directory))
    harness("run", "backend=local", "--", "python", "-c",
            "import sys; print('half done'); sys.exit(1)", check_rc=1)
    (failed,) = set(runs_in(directory)) - before
    done = harness("train", "--resume", failed, check_rc=6)
    assert "was not preempted (its status: failed, exit code 1)" in done.stderr
    assert "Start a new run" in done.stderr


@pytest.mark.docker
@pytest.mark.long
def test_a_file_outside_what_the_container_sees_is_named(project, tmp_path):
    """In a container the command sees its project, its inputs and its output directories.
    A file elsewhere on the host fails the command with its own FileNotFoundError: the run
    names the path and how to declare it. The control: declared with --input, the same
    command reads it in the container."""
    from test_script import docker_engine_up

    require(docker_engine_up(), "no Docker engine answers (run `make docker-env`)")
    directory, harness = project
    data = tmp_path / "datasets"
    data.mkdir()
    data.chmod(0o755)
    (data / "table.csv").write_text("1,2,3\n")
    (data / "table.csv").chmod(0o644)
    read = (f"import os; os.makedirs('out', exist_ok=True); "
            f"open('out/n.txt', 'w').write(open({str(data / 'table.csv')!r}).read())")
    failed = harness("run", "backend=docker", "--output", "out/n.txt", "--", "python", "-c",
                     read, check_rc=1)
    assert f"the command failed opening {data / 'table.csv'}, which is not in the " \
           f"container" in failed.stderr
    assert f"--input {data / 'table.csv'}" in failed.stderr
    ran = harness("run", "backend=docker", "--input", str(data), "--output", "out/n.txt",
                  "--", "python", "-c", read, check_rc=0)
    assert (run_dir_of(ran) / "outputs" / "out" / "n.txt").read_text() == "1,2,3\n"


@pytest.mark.long
def test_an_input_edited_with_its_mtime_restored_is_still_refused(project, cache_home):
    """A launch remembers each --input file's digest (harness/hash_cache.py) and later
    launches read only changed files. The trap: an edit that keeps the size and restores
    the mtime. The digest is keyed on ctime too, which no call sets back, so the replay
    re-hashes the file and refuses it (exit 3). The control: untouched, it replays."""
    import os
    import sqlite3
    import time

    from harness.hash_cache import FRESH_S

    directory, harness = project
    shards = directory / "shards"
    shards.mkdir()
    for index in range(3):
        (shards / f"part-{index}.bin").write_bytes(bytes([index]) * 4096)
    time.sleep(FRESH_S + 0.2)  # older than a timestamp tick: their digests are remembered
    read = ("import os; os.makedirs('out', exist_ok=True); open('out/n.txt', 'w').write("
            "str(sum(len(open('shards/' + f, 'rb').read()) for f in sorted(os.listdir("
            "'shards')))))")
    run = run_dir_of(harness("run", "backend=local", "--input", "shards", "--output",
                             "out/n.txt", "--", "python", "-c", read, check_rc=0))
    edited = shards / "part-1.bin"
    with sqlite3.connect(cache_home / "harness" / "file-digests.sqlite") as cache:
        assert cache.execute("SELECT count(*) FROM digests WHERE path = ?",
                             (os.path.realpath(edited),)).fetchone() == (1,)
    assert "IDENTICAL" in harness("replay", run.name, check_rc=0).stdout

    before = edited.stat()
    edited.write_bytes(bytes([9]) * 4096)  # same size
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert edited.stat().st_mtime_ns == before.st_mtime_ns
    done = harness("replay", run.name, check_rc=3)
    assert "input shards changed since run " + run.name in done.stderr


@pytest.mark.long
def test_a_command_without_injection_records_no_interpreter_and_replays(project):
    """command.inject=false: no process reports, so the lock has no `interpreters` and the
    gate has nothing of them to compare (an empty list once blocked every replay)."""
    directory, harness = project
    write = ("import os, sys; os.makedirs('out', exist_ok=True); "
             "open('out/v.txt', 'w').write(sys.version)")
    run = run_dir_of(harness("run", "backend=local", "command.inject=false", "--output",
                             "out/v.txt", "--", "python", "-c", write, check_rc=0))
    assert "interpreters" not in read_lock(run)
    assert "IDENTICAL" in harness("replay", run.name, check_rc=0).stdout
