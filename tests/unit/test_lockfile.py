"""Old lockfiles (harness/record/lockfile.py): the corpus's locks pass their checks as recorded."""

import pytest

from harness.record import corpus

ALL_RUNS = [run for entry in corpus.entries() for mode in entry.modes()
            for run in entry.runs(mode)]


@pytest.mark.parametrize("old_run", ALL_RUNS, ids=[f"{p.parent.parent.parent.name}-{p.parent.name}"
                                                   for p in ALL_RUNS])
def test_old_lockfile_passes_its_checks_and_hashes_its_config_as_recorded(old_run):
    from harness import config
    from harness.record import lockfile

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
