"""Golden bits of the bundled config (torchtitan's habit), per machine class.

The corpus (tests/golden/machines/, harness/record/corpus.py) holds, for each recorded machine
class, the golden config trained in each CPU mode. Bits depend on the class (every CPU pin
gives other bits on Intel and on AMD), so:
- in a native or ISA-pinned mode a run is compared with its own class's recording only;
  on a class with no recording the test says so and checks what one machine can: two runs
  are bit for bit the same;
- in the portable mode a run is compared with every class's portable recording.
Every comparison also runs its negative control: the same config with one bit of one
initial weight flipped must be told apart. A torch upgrade or a harness change that moves
the numbers fails here with the first differing logged loss; when the change is meant,
record the classes anew (make record-machine) and say why in the commit. The corpus's own
checks (a flipped bit in a recording fails the comparison, every recording is the golden
config of its class) run in process: tests/unit/test_corpus.py."""


import pytest
from conftest import run_dir_of

from harness.host import machine_class
from harness.record import corpus
from harness.training.determinism import cpu_supports

HERE = machine_class.this_machine()
FLIPPED = "model._target_=harness_testkit.OneBitFlippedCNN"


def train(cli, tmp_path, mode, *extra):
    """A golden-config run in CPU mode `mode`; its result (corpus.result_of)."""
    done = cli("train", corpus.GOLDEN_CONFIG, *corpus.GOLDEN_OVERRIDES,
               f"determinism.cpu_isa={mode}", *extra, "--runs-dir", str(tmp_path / "runs"),
               check_rc=0)
    return corpus.result_of(run_dir_of(done))


def expect_same(expected, found, what):
    difference = corpus.first_difference(expected, found)
    assert difference is None, (
        f"{what}: {difference}. If a torch or harness change moved the numbers on purpose, "
        f"record the machine classes anew (make record-machine) and say why in the commit.")


@pytest.mark.parametrize("mode", ["native", *(pytest.param(pin, marks=pytest.mark.long)
                                              for pin in ("default", "avx2", "avx512"))])
def test_a_cpu_mode_gives_its_class_golden_bits(cli, tmp_path, fashion, mode):
    if mode != "native" and not cpu_supports(mode, HERE["isa_flags"]):
        pytest.skip(f"this CPU ({machine_class.class_id(HERE)}) cannot run cpu_isa={mode}")
    entry = corpus.entry_for(HERE)
    recorded = entry.runs(mode) if entry else []
    found = train(cli, tmp_path, mode)
    if recorded:
        reference = corpus.result_of(recorded[0])
        expect_same(reference, found, f"cpu_isa={mode} on {machine_class.class_id(HERE)} differs "
                                      f"from its recording {recorded[0]}")
    else:
        print(f"no recording of cpu_isa={mode} for class {machine_class.class_id(HERE)}: checking "
              f"that two runs agree (make record-machine records this class)")
        reference = train(cli, tmp_path, mode)
        expect_same(found, reference, f"two cpu_isa={mode} runs on one machine")
    flipped = train(cli, tmp_path, mode, FLIPPED)
    assert corpus.first_difference(reference, flipped) is not None, \
        "a run with one weight bit flipped compared equal: the comparison proves nothing"


def test_the_portable_mode_gives_every_recorded_class_the_same_bits(cli, tmp_path, fashion):
    if not cpu_supports("portable", HERE["isa_flags"]):
        pytest.skip(f"this CPU ({machine_class.class_id(HERE)}) has no AVX2 and FMA")
    recordings = [(e.name, e.runs("portable")[0]) for e in corpus.entries()
                  if e.runs("portable")]
    assert recordings, "the corpus has no portable-mode recording"
    found = train(cli, tmp_path, "portable")
    for name, run_dir in recordings:
        expect_same(corpus.result_of(run_dir), found,
                    f"cpu_isa=portable on {machine_class.class_id(HERE)} differs from class {name}")
    flipped = train(cli, tmp_path, "portable", FLIPPED)
    assert corpus.first_difference(found, flipped) is not None, \
        "a run with one weight bit flipped compared equal: the comparison proves nothing"
