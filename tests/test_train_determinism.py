"""Bitwise promises of `harness train`, on Debian's Fashion-MNIST and on a dataset whose
order depends on Python's string hashing."""

import pytest
from conftest import FAST, TESTS, loss_bits, read_lock, run_dir_of


@pytest.fixture(scope="module")
def seed0_runs(tmp_path_factory, fashion):
    """Two identical runs and one with another seed (module-scoped: shared by tests)."""
    import os
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("det")
    cache = tmp_path_factory.mktemp("detcache")

    def train(*overrides):
        done = subprocess.run(
            [sys.executable, "-m", "harness", "train", "fashion_mnist", *FAST, *overrides,
             "--runs-dir", str(base / "runs")], cwd=base, capture_output=True, text=True,
            env={**os.environ, "XDG_CACHE_HOME": str(cache)}, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return run_dir_of(done)

    return {"a": train(), "b": train(), "seed1": train("seed=1"),
            "workers2": train("trainer.num_workers=2")}


def test_same_config_gives_identical_weights_and_loss_bits(seed0_runs):
    a, b = read_lock(seed0_runs["a"]), read_lock(seed0_runs["b"])
    assert a["results"]["weights_sha256"] == b["results"]["weights_sha256"]
    assert loss_bits(seed0_runs["a"]) == loss_bits(seed0_runs["b"])
    assert len(loss_bits(seed0_runs["a"])) == 24
    # Every record (loss bits, parameter fingerprints, evaluation) is byte-identical.
    assert (seed0_runs["a"] / "metrics.jsonl").read_bytes() == \
        (seed0_runs["b"] / "metrics.jsonl").read_bytes()


def test_different_seed_gives_different_weights(seed0_runs):
    a, other = read_lock(seed0_runs["a"]), read_lock(seed0_runs["seed1"])
    assert other["seed"] == 1
    assert a["results"]["weights_sha256"] != other["results"]["weights_sha256"]
    assert loss_bits(seed0_runs["a"]) != loss_bits(seed0_runs["seed1"])


def test_dataloader_workers_do_not_change_weights(seed0_runs):
    a, workers = read_lock(seed0_runs["a"]), read_lock(seed0_runs["workers2"])
    assert workers["config"]["trainer"]["num_workers"] == 2
    assert a["results"]["weights_sha256"] == workers["results"]["weights_sha256"]
    assert loss_bits(seed0_runs["a"]) == loss_bits(seed0_runs["workers2"])


def test_determinism_in_effect_is_read_back(seed0_runs):
    lock = read_lock(seed0_runs["a"])
    in_effect = lock["determinism"]["in_effect"]
    assert in_effect["deterministic_algorithms"] is True
    assert in_effect["cudnn_benchmark"] is False
    assert in_effect["torch_num_threads"] == 2
    assert in_effect["env"]["PYTHONHASHSEED"] == "0"
    assert in_effect["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.long
def test_pinned_hash_seed_makes_hash_ordered_data_repeatable(cli, tmp_path):
    conf = str(TESTS / "conf")
    runs = [run_dir_of(cli("train", "hashy", "--config-dir", conf, check_rc=0))
            for _ in range(2)]
    assert read_lock(runs[0])["results"]["weights_sha256"] == \
        read_lock(runs[1])["results"]["weights_sha256"]


@pytest.mark.long
def test_unpinned_hash_seed_changes_hash_ordered_data(cli, tmp_path):
    conf = str(TESTS / "conf")
    runs = [run_dir_of(cli("train", "hashy", "determinism.pythonhashseed=null",
                           "--config-dir", conf, check_rc=0)) for _ in range(2)]
    locks = [read_lock(r) for r in runs]
    assert locks[0]["determinism"]["in_effect"]["env"]["PYTHONHASHSEED"] == "random"
    assert locks[0]["results"]["weights_sha256"] != locks[1]["results"]["weights_sha256"]


@pytest.mark.long
def test_seed_is_drawn_and_recorded_when_config_has_none(cli, tiny_conf):
    done = cli("train", "tiny", "seed=null", "--config-dir", str(tiny_conf), check_rc=0)
    lock = read_lock(run_dir_of(done))
    assert isinstance(lock["seed"], int) and lock["config"]["seed"] == lock["seed"]
    assert f"seed: {lock['seed']}" in (run_dir_of(done) / "config.yaml").read_text()


@pytest.mark.parametrize("mode, expected", [("strict", True), ("off", False)])
def test_the_compiler_gets_the_determinism_flag_without_being_imported(mode, expected):
    """apply() sets torch's flag without importing torch._inductor (1.3 s), and the
    compiler, imported later (as torch.compile does), still sees the same flag."""
    import subprocess
    import sys

    probe = (f"import sys\nfrom harness.training import determinism\n"
             f"determinism.apply({{'mode': '{mode}', 'threads': 1}})\n"
             f"print('torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)\n"
             f"import torch, torch._inductor.config as compiler\n"
             f"print(torch.are_deterministic_algorithms_enabled(), compiler.deterministic)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", str(expected), str(expected)]
