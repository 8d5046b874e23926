"""The corpus of machine classes (harness/record/corpus.py): its recordings and the comparison."""

import json
import struct

from harness.host import machine_class
from harness.record import corpus


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
                assert machine_class.same_class(machine_class.cpu_class(lock["hardware"]["cpu"]),
                                          entry.facts), run_dir
