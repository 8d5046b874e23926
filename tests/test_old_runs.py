"""Run directories written by an earlier harness stay readable and replayable: the
lockfile and run-directory contract (docs/lockfile.md) is kept across refactors.

The corpus of machine classes (tests/golden/machines/, harness/record/corpus.py) holds run
directories as earlier harnesses wrote them, on other machines (each class.json says which
harness and how). Each must still pass its integrity check, hash its config to the recorded
config_sha256 (both in process: tests/unit/test_lockfile.py), be listed by `harness runs`,
and replay: bit for bit where the corpus shows its class and this machine's give the same
bits, DIVERGED where it shows they do not. A
change that breaks one of these breaks every user's existing runs: make it read the old
format too, rather than regenerating these."""

import json
import shutil

import pytest
from conftest import TESTS, loss_bits, read_lock, run_dir_of

from harness.host import machine_class
from harness.record import corpus
from harness.training.determinism import cpu_supports

# One replay per class: its avx2 run (every x86-64 class of the corpus has one).
REPLAYED = [run for entry in corpus.entries() for run in entry.runs("avx2")[:1]]


def _copy(original, tmp_path):
    """A copy of an old run directory (a replay writes beside its original)."""
    copy = tmp_path / "runs" / original.name
    shutil.copytree(original, copy)
    return copy


# The default tier replays the Intel recording (another vendor than most machines here);
# the long tier replays every class's.
@pytest.mark.parametrize("original", [
    pytest.param(run, marks=() if run.parent.parent.parent.name.startswith("intel")
                 else pytest.mark.long) for run in REPLAYED],
    ids=[p.parent.parent.parent.name for p in REPLAYED])
def test_old_run_is_listed_and_replays_as_the_corpus_predicts(cli, original, tmp_path, fashion):
    old_run = _copy(original, tmp_path)
    listed = json.loads(cli("runs", "--json", "--runs-dir", str(old_run.parent),
                            check_rc=0).stdout)
    assert [(r["run"], r["status"]) for r in listed] == [(old_run.name, "succeeded")]
    recorded_on = machine_class.cpu_class(read_lock(old_run)["hardware"]["cpu"])
    here = machine_class.this_machine()
    same_bits = corpus.agreement(recorded_on, here, "avx2")
    # --allow-mismatch: this checks the format; whether the CPUs match is the corpus's
    # question, answered above, and the gate's (its own tests).
    done = cli("replay", str(old_run), "--allow-mismatch", "--trust")  # recorded elsewhere
    print(f"recorded on {machine_class.class_id(recorded_on)}, replayed on "
          f"{machine_class.class_id(here)}: the corpus predicts "
          f"{ {True: 'IDENTICAL', False: 'DIVERGED', None: 'nothing (unproven)'}[same_bits]}")
    assert done.returncode in (0, 7), done.stderr
    replay_dir = run_dir_of(done)
    identical = (loss_bits(replay_dir) == loss_bits(old_run) and
                 read_lock(replay_dir)["results"]["weights_sha256"] ==
                 read_lock(old_run)["results"]["weights_sha256"])
    assert ("IDENTICAL" in done.stdout) == identical == (done.returncode == 0), done.stdout
    if same_bits is not None:
        assert identical == same_bits, done.stdout


# Portable mode's promise end to end: a portable run recorded on another machine class
# replays bit for bit here. The default tier replays one; the long tier every other class's.
PORTABLE = [run for entry in corpus.entries() for run in entry.runs("portable")[:1]
            if not machine_class.same_class(entry.facts, machine_class.this_machine())]


@pytest.mark.parametrize("original", [
    pytest.param(run, marks=() if i == 0 else pytest.mark.long)
    for i, run in enumerate(PORTABLE)], ids=[p.parent.parent.parent.name for p in PORTABLE])
def test_a_portable_run_from_another_class_replays_identical_here(cli, original, tmp_path,
                                                                  fashion):
    old_run = _copy(original, tmp_path)
    recorded_on = machine_class.cpu_class(read_lock(old_run)["hardware"]["cpu"])
    here = machine_class.this_machine()
    assert not machine_class.same_class(recorded_on, here)
    # --trust: recorded on another machine, not signed by this user. The negative control
    # replays once more with one weight bit flipped, and must be DIVERGED.
    done = cli("replay", str(old_run), "--trust", "--negative-control")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IDENTICAL" in done.stdout and "the comparison can fail" in done.stdout
    record = json.loads((run_dir_of(done) / "replay.json").read_text())
    assert record["verdict"] == "IDENTICAL"
    assert record["negative_control"]["verdict"] == "DIVERGED"
    # The gate's class row says what the corpus knows about this pair in portable mode.
    agreement = corpus.agreement(recorded_on, here, "portable")
    class_row = {d["key"]: d for d in read_lock(run_dir_of(done))["replay_mismatches"]}
    row = class_row["hardware.cpu.class"]
    if agreement:
        assert row["group"] == "informational", row
        assert "recorded: the same bits on both classes in cpu_isa=portable" in row["why"]
        assert f"another machine class ({machine_class.class_id(recorded_on)} -> " in done.stdout
    else:  # this class has no portable recording yet: the replay is the measurement
        assert agreement is None and row["group"] == "unproven", row


# Portable runs recorded before a change to portable mode, each refused with the gate row
# that names what changed: on AMD Zen 3 before NNPACK was switched off (its convolutions ran
# in NNPACK, whose sums follow the CPU's L1 cache size), and on AMD Zen 4 before portable
# mode computed float32 square roots itself (Adam's took MKL's, which gave other bits on an
# Intel Xeon from the same inputs).
BEFORE_NNPACK_OFF = TESTS / "fixtures" / "old_runs" / "20261206T224631611644Z-fashion_mnist-0cf036"
BEFORE_OWN_SQRT = TESTS / "fixtures" / "old_runs" / "20261207T211245655810Z-fashion_mnist-fb48de"


@pytest.mark.parametrize("original, row, why", [
    (BEFORE_NNPACK_OFF, "determinism.in_effect.nnpack_enabled",
     "NNPACK on or off changes how convolutions add up"),
    (BEFORE_OWN_SQRT, "determinism.in_effect.sqrt_kernel",
     "MKL's vector math, whose bits follow the CPU vendor")],
    ids=["before-nnpack-off", "before-own-sqrt"])
def test_a_portable_run_from_before_a_change_of_the_mode_is_refused_and_named(
        cli, tmp_path, fashion, original, row, why):
    old_run = _copy(original, tmp_path)
    done = cli("replay", str(old_run), "--trust")
    assert done.returncode == 6, done.stdout + done.stderr
    assert row in done.stderr and why in done.stderr
    assert [p.name for p in old_run.parent.iterdir()] == [old_run.name]  # nothing ran


# Issue 30's promise across vendors: a run recorded on another machine class, in a CPU mode
# the corpus shows gives other bits there, replays DIVERGED here, and the op trace it
# carries names the first op that computed differently, with identical inputs (the
# machine, not the data), and the class as the setting that differs.
ACROSS = [run for entry in corpus.entries()
          if not machine_class.same_class(entry.facts, machine_class.this_machine())
          for mode in entry.modes() for run in entry.runs(mode)[:1]
          if (run / "op-trace.jsonl.gz").exists()
          and cpu_supports(mode, machine_class.this_machine()["isa_flags"])
          and corpus.agreement(entry.facts, machine_class.this_machine(), mode) is False]


@pytest.mark.parametrize("original", ACROSS[:1], ids=[
    f"{p.parent.parent.parent.name}-{p.parent.name}" for p in ACROSS[:1]])
def test_a_divergence_across_machine_classes_names_its_op(cli, original, tmp_path, fashion):
    old_run = _copy(original, tmp_path)
    done = cli("replay", str(old_run), "--allow-mismatch", "--trust")
    assert done.returncode == 7 and "DIVERGED" in done.stdout, done.stdout + done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("op trace:")]
    print(line)
    assert line.startswith("op trace: first differing op aten::"), line
    assert "with identical inputs: this op computes differently in this environment" in line
    assert "hardware.cpu.class: " in line
    record = json.loads((run_dir_of(done) / "replay.json").read_text())
    assert record["first_differing_op"]["line"] == line
