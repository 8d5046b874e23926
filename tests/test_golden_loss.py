"""Golden bits of the bundled config (torchtitan's habit), per machine class.

The corpus (tests/golden/machines/, harness/corpus.py) holds, for each recorded machine
class, the golden config trained in each CPU mode. Bits depend on the class (every CPU pin
gives other bits on Intel and on AMD), so:
- in a native or ISA-pinned mode a run is compared with its own class's recording only;
  on a class with no recording the test says so and checks what one machine can: two runs
  are bit for bit the same;
- in the portable mode a run is compared with every class's portable recording.
Every comparison also runs its negative control: the same config with one bit of one
initial weight flipped must be told apart. A torch upgrade or a harness change that moves
the numbers fails here with the first differing logged loss; when the change is meant,
record the classes anew (make record-machine) and say why in the commit."""

import json
import struct

import pytest

from conftest import run_dir_of
from harness import corpus, machine
from harness.determinism import cpu_supports

HERE = machine.this_machine()
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
        pytest.skip(f"this CPU ({machine.class_id(HERE)}) cannot run cpu_isa={mode}")
    entry = corpus.entry_for(HERE)
    recorded = entry.runs(mode) if entry else []
    found = train(cli, tmp_path, mode)
    if recorded:
        reference = corpus.result_of(recorded[0])
        expect_same(reference, found, f"cpu_isa={mode} on {machine.class_id(HERE)} differs "
                                      f"from its recording {recorded[0]}")
    else:
        print(f"no recording of cpu_isa={mode} for class {machine.class_id(HERE)}: checking "
              f"that two runs agree (make record-machine records this class)")
        reference = train(cli, tmp_path, mode)
        expect_same(found, reference, f"two cpu_isa={mode} runs on one machine")
    flipped = train(cli, tmp_path, mode, FLIPPED)
    assert corpus.first_difference(reference, flipped) is not None, \
        "a run with one weight bit flipped compared equal: the comparison proves nothing"


def test_the_portable_mode_gives_every_recorded_class_the_same_bits(cli, tmp_path, fashion):
    if not cpu_supports("portable", HERE["isa_flags"]):
        pytest.skip(f"this CPU ({machine.class_id(HERE)}) has no AVX2 and FMA")
    recordings = [(e.name, e.runs("portable")[0]) for e in corpus.entries()
                  if e.runs("portable")]
    assert recordings, "the corpus has no portable-mode recording"
    found = train(cli, tmp_path, "portable")
    for name, run_dir in recordings:
        expect_same(corpus.result_of(run_dir), found,
                    f"cpu_isa=portable on {machine.class_id(HERE)} differs from class {name}")
    flipped = train(cli, tmp_path, "portable", FLIPPED)
    assert corpus.first_difference(found, flipped) is not None, \
        "a run with one weight bit flipped compared equal: the comparison proves nothing"


def _flip_lowest_bit(loss_hex: str) -> str:
    bits = struct.unpack("<I", struct.pack("<f", float.fromhex(loss_hex)))[0] ^ 1
    return float(struct.unpack("<f", struct.pack("<I", bits))[0]).hex()


def test_one_flipped_bit_in_a_recording_fails_the_golden_comparison():
    """A real regression still fails: one bit of one recorded loss, or of the weights'
    hash, is a difference the golden comparison names."""
    entry = corpus.entries()[0]
    recorded = corpus.result_of(entry.runs(entry.modes()[0])[0])
    assert corpus.first_difference(recorded, json.loads(json.dumps(recorded))) is None
    for index in (0, len(recorded["loss_hex"]) - 1):
        changed = json.loads(json.dumps(recorded))
        changed["loss_hex"][index] = _flip_lowest_bit(changed["loss_hex"][index])
        assert f"logged loss {index + 1} differs" in corpus.first_difference(recorded, changed)
    changed = json.loads(json.dumps(recorded))
    last = changed["weights_sha256"][-1]
    changed["weights_sha256"] = changed["weights_sha256"][:-1] + ("0" if last != "0" else "1")
    assert "final weights differ" in corpus.first_difference(recorded, changed)


def test_every_recording_is_the_golden_config_and_its_class_matches_its_locks():
    """The corpus is what its README says: each run is the golden config in the mode of its
    folder, and each lock's CPU is of the folder's class."""
    for entry in corpus.entries():
        for mode in entry.modes():
            for run_dir in entry.runs(mode):
                overrides = (run_dir / "overrides.txt").read_text().split()
                assert sorted(overrides) == sorted(
                    [*corpus.GOLDEN_OVERRIDES, f"determinism.cpu_isa={mode}"]), run_dir
                lock = json.loads((run_dir / "harness.lock").read_text())
                assert machine.same_class(machine.cpu_class(lock["hardware"]["cpu"]),
                                          entry.facts), run_dir


def test_classes_are_told_apart_by_vendor_family_model_and_isa():
    zen3 = {"architecture": "x86_64", "vendor": "amd", "family": 25, "model_number": 1,
            "isa_flags": ["avx", "avx2", "fma"]}
    assert machine.same_class(zen3, dict(zen3))
    assert not machine.same_class(zen3, {**zen3, "model_number": 17})
    assert not machine.same_class(zen3, {**zen3, "vendor": "intel"})
    assert not machine.same_class(zen3, {**zen3, "isa_flags": ["avx", "avx2", "avx512f", "fma"]})
    # An older lock knows neither family nor model number: the rest decides.
    assert machine.same_class(zen3, {**zen3, "family": None, "model_number": None})
    older = machine.cpu_class({"model": "AMD EPYC", "architecture": "x86_64",
                               "isa_flags": ["fma", "avx2", "avx"]})
    assert older["vendor"] == "amd" and machine.same_class(older, zen3)
    assert machine.class_id(zen3) == "amd-f25-m1-avx2"
