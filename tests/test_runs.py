"""`harness runs`: the table of runs with results and replay verdicts."""

import json

import pytest
from conftest import TESTS, run_dir_of

CONF = str(TESTS / "conf")


@pytest.mark.long
def test_runs_table_shows_results_and_replay_verdicts(cli, tmp_path):
    runs = str(tmp_path / "runs")
    done = cli("runs", "--runs-dir", runs, check_rc=0)
    assert "no runs" in done.stdout
    original = run_dir_of(cli("train", "hashy", "--config-dir", CONF, "--runs-dir", runs,
                              check_rc=0))
    replay = run_dir_of(cli("replay", original.name, "--runs-dir", runs, check_rc=0))
    lock = json.loads((original / "harness.lock").read_text())

    text = cli("runs", "--runs-dir", runs, check_rc=0).stdout
    header, _, first, second = text.splitlines()
    for column in ("run", "config", "status", "backend", "steps", "final_loss", "accuracy",
                   "weights", "replay"):
        assert column in header
    assert first.startswith(original.name) and second.startswith(replay.name)
    sha = lock["results"]["weights_sha256"][:12]
    for line in (first, second):
        assert " hashy " in line and " succeeded " in line and " local " in line
        assert " 32 " in line and sha in line
        assert f"{lock['results']['final_loss']:.4f}" in line
    assert "replayed: IDENTICAL x1" in first
    assert f"replay of {original.name}: IDENTICAL" in second

    rows = json.loads(cli("runs", "--runs-dir", runs, "--json", check_rc=0).stdout)
    assert [r["run"] for r in rows] == [original.name, replay.name]
    assert rows[1]["replay_verdict"] == "IDENTICAL" and rows[1]["replay_of"] == original.name


def test_runs_marks_a_damaged_lockfile(cli, tmp_path):
    runs = str(tmp_path / "runs")
    run = run_dir_of(cli("train", "hashy", "--config-dir", CONF, "--runs-dir", runs,
                         check_rc=0))
    (run / "harness.lock").write_text("{")
    text = cli("runs", "--runs-dir", runs, check_rc=0).stdout
    assert "lock damaged" in text
