"""`harness replay`: integrity check, environment gate, re-run, bitwise comparison.
End to end through the real CLI, on real data (Fashion-MNIST) and on the test configs."""

import json
import os
import shutil

import pytest
from conftest import FAST, TESTS, read_lock, run_dir_of, run_harness

from harness.record import lockfile, signing

CONF = str(TESTS / "conf")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Run the CLI in a module-wide working directory (runs are shared between tests)."""
    base = tmp_path_factory.mktemp("replay")
    cache = tmp_path_factory.mktemp("replaycache")

    def run(*args, check_rc=None):
        env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(TESTS / "fixtures")}
        return run_harness(args, cwd=base, env=env, check_rc=check_rc)

    run.base = base
    return run


def new_run_dir(done):
    """The replay's own run directory (the last 'run dir:' line)."""
    return run_dir_of(done)


@pytest.fixture(scope="module")
def hashy_run(harness):
    return run_dir_of(harness("train", "hashy", "--config-dir", CONF, "--runs-dir", "runs",
                              check_rc=0))


def copy_run(run_dir, tmp_path):
    dest = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, dest)
    return dest


def edit_lock(run_dir, change, reseal=True):
    """Edit a copied run's lock, as on another machine: resealed, it is intact; its
    signature no longer verifies, so it is dropped (replaying it then needs --trust)."""
    lock = read_lock(run_dir)
    change(lock)
    if reseal:
        lock = lockfile.seal(lock)
        (run_dir / signing.BUNDLE).unlink()
    (run_dir / "harness.lock").write_text(json.dumps(lock, sort_keys=True, indent=2) + "\n")


# ---------------------------------------------------------------- IDENTICAL

def test_replay_of_fashion_run_is_identical(harness, fashion):
    original = run_dir_of(harness("train", "fashion_mnist", *FAST, "--runs-dir", "runs",
                                  check_rc=0))
    # by unique prefix of the run id (with the runs dir), as a user types it; the negative
    # control replays once more with one weight bit flipped, which must be DIVERGED
    done = harness("replay", original.name[:26], "--runs-dir", "runs", "--negative-control",
                   check_rc=0)
    replay = new_run_dir(done)
    assert replay != original
    assert "IDENTICAL: 24 steps of loss bits, 3 parameter fingerprints" in done.stdout
    lock, new = read_lock(original), read_lock(replay)
    assert new["replay_of"] == {"run_id": lock["run_id"], "lock_sha256": lock["lock_sha256"],
                                "run_dir": str(original.resolve())}
    assert new["results"]["weights_sha256"] == lock["results"]["weights_sha256"]
    assert new["config"] == lock["config"]
    assert (replay / "metrics.jsonl").read_bytes() == (original / "metrics.jsonl").read_bytes()
    record = json.loads((replay / "replay.json").read_text())
    assert record["verdict"] == "IDENTICAL" and record["first_diverging_step"] is None
    assert not [d for d in new["replay_mismatches"] if d["group"] == "blocking"]
    control = record["negative_control"]
    assert control["verdict"] == "DIVERGED" and 2 <= control["first_diverging_step"] <= 8, control
    assert "the comparison can fail" in done.stdout
    flipped = read_lock(original.parent / control["run"])
    assert flipped["negative_control_of"]["run_id"] == lock["run_id"]
    assert flipped["results"]["weights_sha256"] != lock["results"]["weights_sha256"]


def test_a_comparison_its_negative_control_cannot_fail_is_unverified(harness):
    """The model's first parameter is reset at every forward: a bit flipped in it after step
    1 leaves no trace, so the comparison cannot tell the control apart: UNVERIFIED."""
    original = run_dir_of(harness("train", "hashy", "model._target_=harness_testkit.ResettingMLP",
                                  "--config-dir", CONF, "--runs-dir", "runs", check_rc=0))
    done = harness("replay", str(original), "--negative-control")
    assert done.returncode == 8, done.stdout + done.stderr
    assert "IDENTICAL" in done.stdout and "UNVERIFIED" in done.stderr
    record = json.loads((new_run_dir(done) / "replay.json").read_text())
    assert record["negative_control"]["verdict"] == "IDENTICAL"


@pytest.mark.long
def test_replay_of_run_with_drawn_seed_reproduces_it(harness):
    original = run_dir_of(harness("train", "hashy", "seed=null", "--config-dir", CONF,
                                  "--runs-dir", "runs", check_rc=0))
    done = harness("replay", str(original), check_rc=0)
    replay = new_run_dir(done)
    lock, new = read_lock(original), read_lock(replay)
    assert new["seed"] == lock["seed"] == lock["config"]["seed"]
    assert new["results"]["weights_sha256"] == lock["results"]["weights_sha256"]
    assert "IDENTICAL" in done.stdout


# ---------------------------------------------------------------- integrity

def test_edited_lockfile_is_refused(harness, hashy_run, tmp_path):
    run = copy_run(hashy_run, tmp_path)
    text = (run / "harness.lock").read_text()
    (run / "harness.lock").write_text(text.replace('"steps": 32', '"steps": 33', 1))
    done = harness("replay", str(run))
    assert done.returncode == 5, done.stdout + done.stderr
    assert "fails its integrity check" in done.stderr and "re-run the training" in done.stderr
    assert "Traceback" not in done.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]


def test_truncated_lockfile_is_refused(harness, hashy_run, tmp_path):
    run = copy_run(hashy_run, tmp_path)
    data = (run / "harness.lock").read_bytes()
    (run / "harness.lock").write_bytes(data[: len(data) // 2])
    done = harness("replay", str(run))
    assert done.returncode == 5, done.stdout + done.stderr
    assert "truncated or damaged" in done.stderr


# ---------------------------------------------------------------- the lock against the files

def assert_refused_before_running(done, run, *phrases):
    """Exit 5, the words a user needs, and not one new run directory."""
    assert done.returncode == 5, done.stdout + done.stderr
    for phrase in ("the lockfile does not describe this run", *phrases):
        assert phrase in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "DIVERGED" not in done.stdout + done.stderr
    assert [p.name for p in run.parent.iterdir()] == [run.name]


def test_a_swapped_model_file_is_refused_before_anything_runs(harness, hashy_run, tmp_path):
    import torch

    run = copy_run(hashy_run, tmp_path)
    harness("lock", "check", str(run), check_rc=0)  # the control: the untouched copy passes
    state = torch.load(run / "model.pt", weights_only=True)
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    torch.save(state, run / "model.pt")
    done = harness("replay", str(run))  # signed: the signature no longer verifies
    assert done.returncode == 5, done.stdout + done.stderr
    assert "signature INVALID: model.pt changed since the run was signed" in done.stderr
    assert [p.name for p in run.parent.iterdir()] == [run.name]
    checked = harness("lock", "check", str(run))
    assert checked.returncode == 5 and "results.weights_sha256" in checked.stderr
    # Unsigned (from before runs were signed, or its signature dropped): the lock's own
    # results catch it, from the weights in the file.
    (run / signing.BUNDLE).unlink()
    done = harness("replay", str(run), "--trust")
    assert_refused_before_running(done, run, "results.weights_sha256",
                                  read_lock(run)["results"]["weights_sha256"])
    assert "results.weights_sha256" in harness("lock", "check", str(run)).stderr


def test_results_forged_and_resealed_are_refused_naming_both_values(harness, hashy_run,
                                                                     tmp_path):
    run = copy_run(hashy_run, tmp_path)
    was = read_lock(run)["results"]

    def forge(lock):
        lock["results"]["final_loss"] = 0.01
        lock["results"]["test_accuracy"] = 0.99

    edit_lock(run, forge)
    done = harness("replay", str(run))
    assert_refused_before_running(done, run, "results.final_loss: the lock says 0.01",
                                  f"the run directory has {was['final_loss']}",
                                  "results.test_accuracy: the lock says 0.99")
    checked = harness("lock", "check", str(run))
    assert checked.returncode == 5 and "results.test_accuracy" in checked.stderr


def test_a_forged_weights_hash_is_refused_not_reported_as_divergence(harness, hashy_run,
                                                                      tmp_path):
    run = copy_run(hashy_run, tmp_path)
    edit_lock(run, lambda lock: lock["results"].update(weights_sha256="0" * 64))
    done = harness("replay", str(run), "--trust")
    assert_refused_before_running(done, run, "results.weights_sha256: the lock says " + "0" * 64)
    assert "step None" not in done.stdout + done.stderr


def test_a_truncated_metrics_file_is_refused_before_anything_runs(harness, hashy_run,
                                                                   tmp_path):
    run = copy_run(hashy_run, tmp_path)
    data = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(data[: len(data) // 2])
    done = harness("replay", str(run))
    assert_refused_before_running(done, run, "results.metrics_sha256", "metrics.jsonl")


@pytest.mark.long
def test_a_copied_run_is_replayed_as_itself_not_as_the_original(harness, hashy_run, tmp_path):
    """A renamed copy's verdict belongs to the copy: `harness runs` lists the replay under
    the copy, and the new lock says whose copy it was."""
    copy = tmp_path / "runs" / "copy-of-hashy"
    shutil.copytree(hashy_run, copy)
    done = harness("replay", str(copy), check_rc=0)
    link = read_lock(new_run_dir(done))["replay_of"]
    assert link["run_id"] == "copy-of-hashy" and link["copy_of"] == hashy_run.name
    assert link["run_dir"] == str(copy.resolve())
    listed = harness("runs", "--runs-dir", str(tmp_path / "runs"), check_rc=0).stdout
    assert "replay of copy-of-hashy: IDENTICAL" in listed
    assert f"replay of {hashy_run.name}" not in listed


# ---------------------------------------------------------------- gate

def test_blocking_difference_is_refused_then_allowed(harness, hashy_run, tmp_path):
    run = copy_run(hashy_run, tmp_path)

    def other_machine(lock):
        lock["hardware"]["cpu"]["isa_flags"] = sorted(
            set(lock["hardware"]["cpu"]["isa_flags"]) ^ {"avx512f"})
        lock["software"]["torch"] = "1.13.1+cu117"

    edit_lock(run, other_machine)
    harness("lock", "check", str(run), check_rc=0)  # integrity passes: it was re-sealed
    done = harness("replay", str(run), "--trust")
    assert done.returncode == 6, done.stdout + done.stderr
    for phrase in ("refused", "hardware.cpu.isa_flags", "software.torch", "1.13.1+cu117",
                   "--allow-mismatch"):
        assert phrase in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]  # nothing ran

    done = harness("replay", str(run), "--trust", "--allow-mismatch", check_rc=0)
    replay = new_run_dir(done)
    recorded = {d["key"]: d for d in read_lock(replay)["replay_mismatches"]}
    assert recorded["software.torch"]["a"] == "1.13.1+cu117"
    assert recorded["software.torch"]["group"] == "blocking"
    assert recorded["hardware.cpu.isa_flags"]["group"] == "blocking"
    record = json.loads((replay / "replay.json").read_text())
    assert record["allowed_mismatch"] is True
    assert {d["key"] for d in record["blocking_differences"]} == {
        "software.torch", "hardware.cpu.isa_flags"}
    assert record["verdict"] == "IDENTICAL"  # the math really ran on the same machine


def test_refusal_names_the_isa_flags_that_differ(harness, hashy_run, tmp_path):
    """The table cuts a long list; the line under it says which items differ."""
    run = copy_run(hashy_run, tmp_path)
    flags = read_lock(run)["hardware"]["cpu"]["isa_flags"]
    gained = flags[-1:]  # a flag this machine has (none on a machine without math flags)

    def other_cpu(lock):
        lock["hardware"]["cpu"]["isa_flags"] = ["sse4a"] + flags[:-1]

    edit_lock(run, other_cpu)
    done = harness("replay", str(run), "--trust")
    assert done.returncode == 6, done.stdout + done.stderr
    change = " ".join([f"+{flag}" for flag in gained] + ["-sse4a"])
    assert "hardware.cpu.isa_flags" in done.stderr
    assert f"\n  current vs locked: {change}\n" in done.stderr, done.stderr


@pytest.mark.long
def test_informational_difference_does_not_block(harness, hashy_run, tmp_path):
    run = copy_run(hashy_run, tmp_path)

    def elsewhere(lock):
        lock["hardware"]["hostname"] = "another-node-17"
        lock["software"]["packages"]["pytest"] = "0.0.1"

    edit_lock(run, elsewhere)
    done = harness("replay", str(run), "--trust", check_rc=0)
    assert "hardware.hostname" in done.stdout and "informational" in done.stdout
    groups = {d["key"]: d["group"] for d in read_lock(new_run_dir(done))["replay_mismatches"]}
    assert groups["hardware.hostname"] == groups["software.packages.pytest"] == "informational"


def test_unknown_run_is_bad_input(harness):
    done = harness("replay", "no-such-run", "--runs-dir", "runs")
    assert done.returncode == 2 and "harness runs" in done.stderr


# ---------------------------------------------------------------- DIVERGED

def test_injected_gradient_noise_diverges_at_its_step_and_names_the_tensor(harness):
    original = run_dir_of(harness("train", "noisy", "model.where=grad", "model.start_call=6",
                                  "--config-dir", CONF, "--runs-dir", "runs", check_rc=0))
    done = harness("replay", str(original))
    assert done.returncode == 7, done.stdout + done.stderr
    assert "DIVERGED: first diverging step 6" in done.stdout
    assert "parameters first differ at fingerprint step 6: jitter.weight\n" in done.stdout
    assert "max abs difference" in done.stdout and "jitter.weight: " in done.stdout
    assert "DIVERGED at step 6" in done.stderr and "harness verify noisy" in done.stderr
    record = json.loads((new_run_dir(done) / "replay.json").read_text())
    assert record["verdict"] == "DIVERGED"
    assert record["first_differing_tensors"] == ["jitter.weight"]
    # the forward is exact at step 6: the loss first differs later, usually at step 7 (the
    # noise is drawn anew each run, and once in a while the changed weights move step 7's
    # float32 loss by less than its last bit)
    assert record["first_loss_difference"]["step"] >= 7
    assert 0 < record["max_abs_diff"]["jitter.weight"] < 1


@pytest.mark.long
def test_injected_output_noise_diverges_at_its_step(harness):
    original = run_dir_of(harness("train", "noisy", "model.start_call=9", "--config-dir", CONF,
                                  "--runs-dir", "runs", check_rc=0))
    done = harness("replay", str(original))
    assert done.returncode == 7, done.stdout + done.stderr
    record = json.loads((new_run_dir(done) / "replay.json").read_text())
    assert record["first_diverging_step"] == 9
    assert record["first_loss_difference"]["step"] == 9
    assert "jitter.weight" in record["first_differing_tensors"]


def test_replay_where_the_runs_code_is_not_importable_says_what_is_missing(harness,
                                                                           hashy_run):
    """The run's dataset and model come from tests/fixtures (harness_testkit) on
    PYTHONPATH; replayed without it, the replay stops before training (exit 4) and names
    what is missing."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = run_harness(["replay", str(hashy_run)], cwd=harness.base, env=env, check_rc=4)
    assert "no module named 'harness_testkit'" in done.stderr
    assert "PYTHONPATH" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- CPU ISA pinning


@pytest.fixture(scope="module")
def avx2_run(harness):
    from harness.record.lockfile import capture_cpu

    if not {"avx2", "fma"} <= set(capture_cpu()["isa_flags"]):
        pytest.skip("this CPU has no AVX2")
    return run_dir_of(harness("train", "hashy", "determinism.cpu_isa=avx2", "--config-dir",
                              CONF, "--runs-dir", "runs", check_rc=0))


@pytest.mark.long
def test_runs_pinned_to_avx2_repeat_and_record_the_pin(harness, avx2_run):
    again = run_dir_of(harness("train", "hashy", "determinism.cpu_isa=avx2", "--config-dir",
                               CONF, "--runs-dir", "runs", check_rc=0))
    lock = read_lock(avx2_run)
    assert lock["results"]["weights_sha256"] == read_lock(again)["results"]["weights_sha256"]
    assert lock["config"]["determinism"]["cpu_isa"] == "avx2"
    assert lock["software"]["torch_cpu_capability"] == "AVX2"
    env = lock["determinism"]["in_effect"]["env"]
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["MKL_CBWR"] == "AVX2"


@pytest.mark.long
def test_a_pinned_run_replays_on_a_cpu_with_other_flags(harness, avx2_run, hashy_run,
                                                        tmp_path):
    """Recorded on a CPU with a different flag list (AVX-512 gone, another flag there): a
    run pinned to avx2 replays, since this CPU has AVX2; a native run is refused."""
    def other_cpu(lock):
        flags = lock["hardware"]["cpu"]["isa_flags"]
        lock["hardware"]["cpu"]["isa_flags"] = ["sse4a"] + [f for f in flags
                                                            if not f.startswith("avx512")]

    pinned = copy_run(avx2_run, tmp_path)
    edit_lock(pinned, other_cpu)
    done = harness("replay", str(pinned), "--trust", check_rc=0)
    assert "IDENTICAL" in done.stdout
    native = copy_run(hashy_run, tmp_path)
    edit_lock(native, other_cpu)
    refused = harness("replay", str(native), "--trust")
    assert refused.returncode == 6 and "hardware.cpu.isa_flags" in refused.stderr


def test_unknown_cpu_isa_is_refused(harness):
    done = harness("train", "hashy", "determinism.cpu_isa=avx9", "--config-dir", CONF)
    assert done.returncode == 2 and "determinism.cpu_isa=avx9" in done.stderr
