"""Run directories written by an earlier harness stay readable and replayable: the
lockfile and run-directory contract (docs/lockfile.md) is kept across refactors.

The corpus of machine classes (tests/golden/machines/, harness/corpus.py) holds run
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

from conftest import loss_bits, read_lock, run_dir_of
from harness import corpus, machine

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
    recorded_on = machine.cpu_class(read_lock(old_run)["hardware"]["cpu"])
    here = machine.this_machine()
    same_bits = corpus.agreement(recorded_on, here, "avx2")
    # --allow-mismatch: this checks the format; whether the CPUs match is the corpus's
    # question, answered above, and the gate's (its own tests).
    done = cli("replay", str(old_run), "--allow-mismatch", "--trust")  # recorded elsewhere
    print(f"recorded on {machine.class_id(recorded_on)}, replayed on "
          f"{machine.class_id(here)}: the corpus predicts "
          f"{ {True: 'IDENTICAL', False: 'DIVERGED', None: 'nothing (unproven)'}[same_bits]}")
    assert done.returncode in (0, 7), done.stderr
    replay_dir = run_dir_of(done)
    identical = (loss_bits(replay_dir) == loss_bits(old_run) and
                 read_lock(replay_dir)["results"]["weights_sha256"] ==
                 read_lock(old_run)["results"]["weights_sha256"])
    assert ("IDENTICAL" in done.stdout) == identical == (done.returncode == 0), done.stdout
    if same_bits is not None:
        assert identical == same_bits, done.stdout
