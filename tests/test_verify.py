"""`harness verify`: two short runs of a config, bitwise comparison, determinism audit."""

import json

import pytest
from conftest import TESTS

CONF = str(TESTS / "conf")


def verify_runs(done):
    line = next(text for text in done.stdout.splitlines() if text.startswith("runs: "))
    return line.split()[1:]


@pytest.mark.long
def test_default_config_is_deterministic_in_parallel(cli, tmp_path):
    done = cli("verify", "hashy", "--steps", "10", "--jobs", "2", "--config-dir", CONF,
               "--runs-dir", str(tmp_path / "runs"), check_rc=0)
    assert "in parallel" in done.stdout
    assert "IDENTICAL: 10 steps of loss bits, 10 parameter fingerprints" in done.stdout
    assert "audit: every module's outputs and gradients match" in done.stdout
    assert "DETERMINISTIC: hashy" in done.stdout
    assert "op trace: all " in done.stdout and " ops of steps 1, 2, 3, 4, 5 agree" in done.stdout
    runs = [tmp_path / "runs" / name for name in verify_runs(done)]
    for run in runs:
        record = json.loads((run / "verify.json").read_text())
        assert record["deterministic"] is True and record["first_module"] is None
        # the audit really recorded every module at every step
        lines = (run / "audit.jsonl").read_text().splitlines()
        assert len(lines) == 10
        modules = {event[0] for event in json.loads(lines[0])["events"]}
        assert {"body.0", "body.2", "(model)"} <= modules
    assert (runs[0] / "audit.jsonl").read_bytes() == (runs[1] / "audit.jsonl").read_bytes()


@pytest.mark.long
def test_injected_nondeterminism_is_found_and_named(cli, tmp_path):
    done = cli("verify", "noisy", "model.start_call=4", "--steps", "8", "--jobs", "1",
               "--config-dir", CONF, "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 7, done.stdout + done.stderr
    assert "one after the other" in done.stdout
    assert "DIVERGED: first diverging step 4" in done.stdout
    assert "audit: first differing module: jitter (output) at step 4" in done.stdout
    assert "NOT deterministic" in done.stderr and "module jitter" in done.stderr
    # The op: the jitter's add, whose number argument came from os.urandom.
    assert ("op trace: first differing op aten::add.Tensor (forward) in model.jitter, step 4"
            in done.stdout), done.stdout
    assert "its inputs differed (a number or other argument that is not a tensor)" in \
        done.stdout


@pytest.mark.long
def test_gradient_only_nondeterminism_is_named_by_the_audit(cli, tmp_path):
    done = cli("verify", "noisy", "model.where=grad", "model.start_call=3", "--steps", "6",
               "--config-dir", CONF, "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 7, done.stdout + done.stderr
    assert ("audit: first differing module: jitter (param_grad jitter.weight) at step 3"
            in done.stdout)
    assert "parameters first differ at fingerprint step 3: jitter.weight\n" in done.stdout
    assert "op trace: first differing op aten::add.Tensor (backward) in model.jitter, step 3" \
        in done.stdout, done.stdout


@pytest.mark.long
def test_seedless_config_uses_one_seed_for_both_runs(cli, tmp_path):
    done = cli("verify", "hashy", "seed=null", "--steps", "4", "--config-dir", CONF,
               "--runs-dir", str(tmp_path / "runs"), check_rc=0)
    runs = [tmp_path / "runs" / name for name in verify_runs(done)]
    seeds = {json.loads((r / "harness.lock").read_text())["seed"] for r in runs}
    assert len(seeds) == 1


def test_bad_verify_input(cli, tmp_path):
    done = cli("verify", "hashy", "--steps", "0", "--config-dir", CONF)
    assert done.returncode == 2 and "--steps" in done.stderr
    done = cli("verify", "nosuchconfig", "--config-dir", CONF)
    assert done.returncode == 2 and "unknown config 'nosuchconfig'" in done.stderr


def test_fashion_mnist_is_deterministic_here(cli, tmp_path, fashion):
    done = cli("verify", "fashion_mnist", "backend=local", "trainer.eval_limit=500", "--steps", "6",
               "--runs-dir", str(tmp_path / "runs"), check_rc=0)
    assert "DETERMINISTIC: fashion_mnist" in done.stdout
    assert "IDENTICAL: 6 steps of loss bits, 6 parameter fingerprints" in done.stdout
