"""`harness lock diff` end to end. (The gate's classification table and the comparison of
runs, the pure parts: tests/unit/test_gate.py and tests/unit/test_compare.py.)"""

import json
import shutil

import pytest
from conftest import TESTS, read_lock, run_dir_of

from harness.record import lockfile

CONF = str(TESTS / "conf")


def test_lock_diff_names_the_isa_flags_that_differ(cli, tmp_path):
    a = run_dir_of(cli("train", "hashy", "trainer.epochs=1", "--config-dir", CONF,
                       "--runs-dir", str(tmp_path / "runs"), check_rc=0))
    b = tmp_path / "other-machine"
    shutil.copytree(a, b)
    lock = read_lock(a)
    flags = lock["hardware"]["cpu"]["isa_flags"]
    dropped = flags[:1]  # a flag this machine has (none on a machine without math flags)
    lock["hardware"]["cpu"]["isa_flags"] = flags[1:] + ["sse4a"]
    lockfile.write(b / "harness.lock", lock)  # re-sealed: the integrity check passes
    change = " ".join(["+sse4a"] + [f"-{flag}" for flag in dropped])

    done = cli("lock", "diff", str(a), str(b), check_rc=0)
    blocking = done.stdout.split("== blocking for bitwise replay (1)\n")[1].split("\n\n")[0]
    assert "hardware.cpu.isa_flags" in blocking
    assert blocking.endswith(f"b vs a: {change}"), blocking

    done = cli("lock", "diff", str(a), str(b), "--json", check_rc=0)
    (difference,) = json.loads(done.stdout)["differences"]
    assert difference["key"] == "hardware.cpu.isa_flags"
    assert difference["added"] == ["sse4a"] and difference["removed"] == dropped


@pytest.mark.long
def test_lock_diff_of_two_runs(cli, tmp_path):
    runs = str(tmp_path / "runs")
    a = run_dir_of(cli("train", "hashy", "--config-dir", CONF, "--runs-dir", runs, check_rc=0))
    b = run_dir_of(cli("train", "hashy", "seed=1", "--config-dir", CONF, "--runs-dir", runs,
                       check_rc=0))
    done = cli("lock", "diff", a.name, b.name[:27], "--runs-dir", runs, check_rc=0)
    text = done.stdout
    assert "== blocking for bitwise replay: none" in text
    assert "== informational" in text and "created_utc" in text
    results = text.split("== results")[1].split("== config")[0]
    assert "results.weights_sha256" in results and "results.final_loss_hex" in results
    config = text.split("== config")[1]
    assert "seed" in config and "config.seed" in config and "overrides" in config

    done = cli("lock", "diff", str(a), str(b), "--json", check_rc=0)
    data = json.loads(done.stdout)
    groups = {d["key"]: d["group"] for d in data["differences"]}
    assert groups["config.seed"] == groups["seed"] == "config"
    assert groups["results.weights_sha256"] == "results"
    assert "lock_sha256" not in groups and "run_id" not in groups

    text = (b / "harness.lock").read_text()
    (b / "harness.lock").write_text(text.replace('"seed": 1', '"seed": 2', 1))
    done = cli("lock", "diff", str(a), str(b))
    assert done.returncode == 5 and "integrity check" in done.stderr
