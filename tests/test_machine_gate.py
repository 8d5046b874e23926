"""The replay gate decides a machine class difference from evidence: run directories
recorded on other CPUs (the corpus, tests/golden/machines/) replayed here through the real
CLI, against a corpus laid out per test ($HARNESS_CORPUS), so that each of the gate's three
answers is shown:
- match: both classes recorded with the same bits in the run's CPU mode; the replay goes on
  and must be IDENTICAL;
- cannot: both recorded, other bits; refused (exit 6), and with --allow-mismatch DIVERGED,
  the class named as the likely cause;
- unproven: no recording of this machine's class; the replay goes on, says so, and its
  verdict is the measurement.
Which foreign classes match this one depends on the machine the tests run on; each is held
to what its recordings say."""

import json
import os
import shutil

import pytest
from conftest import read_lock, run_dir_of, run_harness

from harness.host import machine_class
from harness.record import corpus
from harness.training.determinism import cpu_supports

HERE = machine_class.this_machine()
MODE = "avx2"
FOREIGN = [e for e in corpus.entries()
           if not machine_class.same_class(e.facts, HERE) and e.runs(MODE)]
pytestmark = pytest.mark.skipif(not cpu_supports(MODE, HERE["isa_flags"]),
                                reason=f"this CPU cannot run cpu_isa={MODE}")


@pytest.fixture(scope="module")
def here_recording(tmp_path_factory, fashion):
    """This machine's golden run in MODE: from the corpus, or trained now."""
    entry = corpus.entry_for(HERE)
    if entry and entry.runs(MODE):
        return entry.runs(MODE)[0]
    runs = tmp_path_factory.mktemp("here-golden")
    done = run_harness(["train", corpus.GOLDEN_CONFIG, *corpus.GOLDEN_OVERRIDES,
                        f"determinism.cpu_isa={MODE}", "--runs-dir", str(runs)],
                       cwd=runs, env=dict(os.environ), check_rc=0)
    return run_dir_of(done)


def lay_corpus(root, foreign, here_run=None):
    """A corpus of the foreign class (its MODE run) and, given `here_run`, this class."""
    (root / "foreign").mkdir(parents=True)
    shutil.copy(foreign.path / corpus.CLASS_FILE, root / "foreign" / corpus.CLASS_FILE)
    original = foreign.runs(MODE)[0]
    shutil.copytree(original, root / "foreign" / "runs" / MODE / original.name)
    if here_run is not None:
        (root / "here" / "runs" / MODE).mkdir(parents=True)
        (root / "here" / corpus.CLASS_FILE).write_text(json.dumps({"class": HERE}))
        shutil.copytree(here_run, root / "here" / "runs" / MODE / here_run.name)
    return root


def replay_foreign(cli, tmp_path, foreign, root, *flags):
    run = tmp_path / "runs" / foreign.runs(MODE)[0].name
    shutil.copytree(foreign.runs(MODE)[0], run)
    # --trust: recorded on another machine, the corpus's runs are not signed by this user
    return cli("replay", str(run), "--trust", *flags, env={"HARNESS_CORPUS": str(root)}), run


@pytest.mark.long
@pytest.mark.parametrize("foreign", FOREIGN, ids=[e.name for e in FOREIGN])
def test_a_recorded_class_pair_matches_or_cannot_as_its_recordings_say(
        cli, tmp_path, fashion, here_recording, foreign):
    root = lay_corpus(tmp_path / "corpus", foreign, here_recording)
    same_bits = corpus.first_difference(corpus.result_of(foreign.runs(MODE)[0]),
                                        corpus.result_of(here_recording)) is None
    done, original = replay_foreign(cli, tmp_path, foreign, root)
    if same_bits:  # match: informational, and the replay must prove it
        assert done.returncode == 0, done.stdout + done.stderr
        assert "IDENTICAL" in done.stdout
        groups = {d["key"]: (d["group"], d["why"])
                  for d in read_lock(run_dir_of(done))["replay_mismatches"]}
        assert groups["hardware.cpu.class"] == (
            "informational", f"recorded: the same bits on both classes in cpu_isa={MODE}")
        return
    # cannot: refused before anything runs, the class row says why
    assert done.returncode == 6, done.stdout + done.stderr
    assert "hardware.cpu.class" in done.stderr
    assert f"recorded: other bits on these classes in cpu_isa={MODE}" in done.stderr
    assert len(list(original.parent.iterdir())) == 1, "a refused replay left a run behind"
    forced, _ = replay_foreign(cli, tmp_path / "forced", foreign, root, "--allow-mismatch")
    assert forced.returncode == 7, forced.stdout + forced.stderr
    recorded_on = machine_class.cpu_class(read_lock(original)["hardware"]["cpu"])
    assert f"recorded on machine class {machine_class.class_id(recorded_on)}" in forced.stderr
    assert "the likely cause is the machine, not the code" in forced.stderr
    assert f"replayed on {machine_class.class_id(HERE)}" in forced.stderr


@pytest.mark.long
@pytest.mark.parametrize("foreign", FOREIGN[:1], ids=[e.name for e in FOREIGN[:1]])
def test_a_class_pair_no_recording_covers_is_unproven_and_the_replay_measures_it(
        cli, tmp_path, fashion, here_recording, foreign):
    root = lay_corpus(tmp_path / "corpus", foreign)  # this class not recorded
    done, _ = replay_foreign(cli, tmp_path, foreign, root)
    assert done.returncode in (0, 7), done.stdout + done.stderr
    assert "unproven" in done.stdout and "hardware.cpu.class" in done.stdout
    assert "no effect expected" not in done.stdout + done.stderr
    replayed = run_dir_of(done)
    groups = {d["key"]: d["group"] for d in read_lock(replayed)["replay_mismatches"]}
    assert groups["hardware.cpu.class"] == "unproven"
    same_bits = corpus.first_difference(corpus.result_of(foreign.runs(MODE)[0]),
                                        corpus.result_of(replayed)) is None
    assert (done.returncode == 0) == same_bits
    if not same_bits:
        assert "the likely cause is the machine, not the code" in done.stderr
