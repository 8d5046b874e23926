"""Run directories written by an earlier harness stay readable and replayable: the
lockfile and run-directory contract (docs/lockfile.md) is kept across refactors.

tests/golden/runs/ holds run directories as an earlier harness wrote them (the README in
that directory says which version and how). Each must still pass its integrity check,
hash its config to the recorded config_sha256, be listed by `harness runs`, and replay
bit for bit. A change that breaks one of these breaks every user's existing runs: make it
read the old format too, rather than regenerating these."""

import json
import shutil

import pytest

from conftest import TESTS, loss_bits, read_lock, run_dir_of

OLD_RUNS = sorted(p for p in (TESTS / "golden" / "runs").iterdir() if p.is_dir())


@pytest.fixture(params=OLD_RUNS, ids=[p.name for p in OLD_RUNS])
def old_run(request, tmp_path):
    """A copy of an old run directory (a replay writes beside its original)."""
    copy = tmp_path / "runs" / request.param.name
    shutil.copytree(request.param, copy)
    return copy


def test_old_lockfile_passes_its_checks_and_hashes_its_config_as_recorded(old_run):
    from harness import config, lockfile

    lock = lockfile.read(old_run / "harness.lock")  # integrity (lock_sha256) holds
    assert config.config_sha256(lock["config"]) == lock["config_sha256"]
    assert config.config_sha256(config.load_yaml(old_run / "config.yaml")) == \
        lock["config_sha256"]
    missing = [f for f in lockfile.required_fields() if f not in lock]
    assert not missing, f"required fields today that the old lock lacks: {missing}"
    # The launcher hands backends the typed config (config.typed); back as plain data it is
    # the same config, to the byte of its hash.
    typed = config.typed(config.load_yaml(old_run / "config.yaml"))
    assert config.config_sha256(config.plain(typed)) == lock["config_sha256"]


def test_old_run_is_listed_and_replays_identical(cli, old_run, fashion):
    listed = json.loads(cli("runs", "--json", "--runs-dir", str(old_run.parent),
                            check_rc=0).stdout)
    assert [(r["run"], r["status"]) for r in listed] == [(old_run.name, "succeeded")]
    # --allow-mismatch: this checks the format, not that CI's CPU is the one that wrote it
    # (the gate's own tests do that); the comparison below must still be IDENTICAL.
    done = cli("replay", str(old_run), "--allow-mismatch", check_rc=0)
    assert "IDENTICAL" in done.stdout
    replay_dir = run_dir_of(done)
    assert loss_bits(replay_dir) == loss_bits(old_run)
    assert read_lock(replay_dir)["results"]["weights_sha256"] == \
        read_lock(old_run)["results"]["weights_sha256"]
