"""Golden losses of the bundled config (torchtitan's habit): the exact loss bits of the
first steps of `fashion_mnist`, kept in tests/golden/fashion_mnist-losses.json. A torch
upgrade, or a change of the harness, that changes the numbers fails here, naming the first
step that differs; when the change is meant, regenerate with UPDATE_GOLDEN=1 and say why in
the commit.

The CPU kernels are pinned to AVX2 (determinism.cpu_isa=avx2) and the threads to two, so
the bits are those of any AVX2 machine, not only of the one that wrote the file."""

import json
import os

from conftest import TESTS, loss_bits, read_lock, require, run_dir_of

GOLDEN = TESTS / "golden" / "fashion_mnist-losses.json"
OVERRIDES = ["backend=local", "determinism.cpu_isa=avx2", "determinism.threads=2",
             "trainer.max_steps=12", "trainer.eval_limit=200", "trainer.log_every=4"]


def test_bundled_config_gives_the_golden_loss_bits(cli, tmp_path, fashion):
    run_dir = run_dir_of(cli("train", "fashion_mnist", *OVERRIDES, "--runs-dir",
                             str(tmp_path / "runs"), check_rc=0))
    lock = read_lock(run_dir)
    found = {"overrides": OVERRIDES, "torch": lock["software"]["torch"],
             "loss_hex": loss_bits(run_dir),
             "weights_sha256": lock["results"]["weights_sha256"]}
    if os.environ.get("UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        require(not os.environ.get("CI"), f"golden file {GOLDEN} missing")
        GOLDEN.write_text(json.dumps(found, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == OVERRIDES, "the golden file was made with other overrides"
    first = next((step for step, (a, b) in enumerate(zip(golden["loss_hex"],
                                                          found["loss_hex"]), 1) if a != b), None)
    assert first is None and found["weights_sha256"] == golden["weights_sha256"], (
        f"fashion_mnist's numbers changed (torch {golden['torch']} wrote the golden file, "
        f"this is torch {found['torch']}): first differing step {first}; final weights "
        f"{'differ' if found['weights_sha256'] != golden['weights_sha256'] else 'match'}. "
        f"If the change is meant, UPDATE_GOLDEN=1 and say why in the commit.")
