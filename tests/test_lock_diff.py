"""`harness lock diff` and the gate's classification table (pure parts unit-tested, the
command end to end)."""

import json
import shutil

import pytest

from conftest import TESTS, read_lock, run_dir_of
from harness import gate, lockfile

CONF = str(TESTS / "conf")


@pytest.mark.parametrize("key, expected", [
    ("hardware.gpus[0].name", gate.BLOCKING),
    ("hardware.gpus[3].compute_capability", gate.BLOCKING),
    ("hardware.gpus[0].sm_count", gate.BLOCKING),
    ("hardware.gpus[1].uuid", gate.INFO),
    ("hardware.gpus[0].memory_total", gate.INFO),
    ("hardware.gpus", gate.BLOCKING),
    ("hardware.driver", gate.BLOCKING),
    ("hardware.cpu.isa_flags", gate.BLOCKING),
    ("hardware.cpu.model", gate.UNPROVEN),
    ("hardware.cpu.vendor", gate.UNPROVEN),
    ("hardware.cpu.model_number", gate.UNPROVEN),
    ("hardware.cpu.logical_cores", gate.INFO),
    ("hardware.hostname", gate.INFO),
    ("software.torch", gate.BLOCKING),
    ("software.torch_git_version", gate.BLOCKING),
    ("software.torch_cpu_capability", gate.BLOCKING),
    ("software.cudnn", gate.BLOCKING),
    ("software.cuda_runtime", gate.BLOCKING),
    ("software.python", gate.BLOCKING),
    ("software.platform", gate.INFO),
    ("software.packages.numpy", gate.BLOCKING),
    ("software.packages.torch", gate.BLOCKING),
    ("software.packages.pytest", gate.INFO),
    ("software.packages.torchvision", gate.INFO),
    ("determinism.in_effect.torch_num_threads", gate.BLOCKING),
    ("determinism.in_effect.env.PYTHONHASHSEED", gate.BLOCKING),
    ("environment.OMP_NUM_THREADS", gate.BLOCKING),
    ("environment.SLURM_JOB_ID", gate.INFO),
    ("environment.CUDA_VISIBLE_DEVICES", gate.INFO),
    ("image.repo_digest", gate.BLOCKING),
    ("image.base_digest", gate.BLOCKING),
    ("image.reference", gate.INFO),
    ("created_utc", gate.INFO),
    ("something.new", gate.INFO),
])
def test_classification_table(key, expected):
    assert gate.classify(key)[0] == expected


def test_groups_put_results_and_config_apart():
    assert gate.group("results.weights_sha256")[0] == gate.RESULTS
    assert gate.group("timing.train_process_s")[0] == gate.RESULTS
    assert gate.group("config.optim.lr")[0] == gate.CONFIG
    assert gate.group("seed")[0] == gate.CONFIG
    assert gate.group("software.torch")[0] == gate.BLOCKING


def test_gate_ignores_seed_and_blocks_a_missing_image():
    lock = {"determinism": {"seed": 3, "mode": "strict"}, "image": {"repo_digest": "sha256:a"},
            "software": {"torch": "2.1"}}
    current = {"determinism": {"mode": "strict"}, "software": {"torch": "2.1"}}
    diffs = gate.gate(lock, current)
    assert [(d.key, d.group) for d in diffs] == [("image.repo_digest", gate.BLOCKING)]
    assert lock["determinism"]["seed"] == 3  # the lockfile data is not modified


def test_render_grouped():
    a = {"software": {"torch": "2.1", "platform": "x"}, "results": {"steps": 3},
         "config": {"optim": {"lr": 0.1}}}
    b = {"software": {"torch": "2.2", "platform": "y"}, "results": {"steps": 3},
         "config": {"optim": {"lr": 0.2}}, "hardware": {"hostname": "n1"}}
    text = gate.render_grouped(gate.differences(a, b), "a", "b")
    sections = text.split("\n\n")
    assert sections[0].startswith("== blocking for bitwise replay (1)")
    assert "software.torch" in sections[0] and "2.1" in sections[0] and "2.2" in sections[0]
    assert sections[1] == "== unproven (no recording says whether these change the bits): none"
    assert sections[2].startswith("== informational (2)")
    assert "hardware.hostname" in sections[2] and "(absent)" in sections[2]
    assert sections[3] == "== results: none"
    assert sections[4].startswith("== config (1)") and "config.optim.lr" in sections[4]


ISA_A = ["avx", "avx2", "avx512bw", "avx512dq", "avx512vl", "f16c", "fma", "sse4_1", "sse4_2",
         "sse4a"]
ISA_B = ["avx", "avx2", "avx512bw", "avx512dq", "avx512f", "avx512vl", "f16c", "fma", "sse4_1",
         "sse4_2"]


def test_list_values_show_added_and_removed_items():
    """A long list value is cut in the table; the items that differ are named under it."""
    a = {"hardware": {"cpu": {"isa_flags": ISA_A}}, "config": {"model": {"channels": [8, 16]}}}
    b = {"hardware": {"cpu": {"isa_flags": ISA_B}}, "config": {"model": {"channels": [16, 8]}}}
    diffs = gate.differences(a, b)
    text = gate.render(diffs)
    assert "current vs locked: +avx512f -sse4a\n" in text + "\n"
    assert "current vs locked: same items, in another order" in text
    grouped = gate.render_grouped(diffs, "a", "b")
    assert "b vs a: +avx512f -sse4a" in grouped
    flags = gate.find(diffs, "hardware.cpu.isa_flags").to_json()
    assert flags["added"] == ["avx512f"] and flags["removed"] == ["sse4a"]
    # Repeats count; scalars get no added/removed.
    repeated = gate.differences({"x": [1, 1, 2]}, {"x": [1, 2], "y": "v"})
    assert repeated[0].to_json()["removed"] == [1] and repeated[0].to_json()["added"] == []
    assert "added" not in repeated[1].to_json()


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


def _fake_run(directory, losses, params, weight):
    """A run directory with just what the comparison reads."""
    import torch

    directory.mkdir()
    lines = []
    for step, (loss, digest) in enumerate(zip(losses, params), start=1):
        record = {"kind": "train", "step": step, "epoch": 0, "loss": loss, "loss_hex": loss.hex()}
        if digest:
            record["params"] = digest
        lines.append(json.dumps(record, sort_keys=True))
    lines.append(json.dumps({"kind": "eval", "step": len(losses), "accuracy": 0.5,
                             "loss_hex": "0x1p+0"}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    torch.save({"a.weight": torch.tensor([1.0, 2.0]), "b.bias": torch.tensor([weight])},
               directory / "model.pt")
    return directory


def test_compare_report_names_step_tensor_and_distance(tmp_path):
    from harness import compare

    same = {"a.weight": "aa", "b.bias": "bb"}
    a = _fake_run(tmp_path / "a", [2.0, 1.5, 1.25, 1.0], [None, same, None, same], 0.5)
    b = _fake_run(tmp_path / "b", [2.0, 1.5, 1.25, 1.125],
                  [None, same, None, {"a.weight": "aa", "b.bias": "cc"}], 0.75)
    report = compare.compare_runs(a, b, {"results": {"weights_sha256": "x"}},
                                  {"results": {"weights_sha256": "y"}})
    assert report["verdict"] == compare.DIVERGED
    assert report["first_diverging_step"] == 4
    assert report["first_differing_tensors"] == ["b.bias"]
    assert report["max_abs_diff"] == {"b.bias": 0.25}
    text = compare.render(report)
    assert "DIVERGED: first diverging step 4" in text and "b.bias: 2.500e-01" in text

    report = compare.compare_runs(a, a, {"results": {"weights_sha256": "x"}},
                                  {"results": {"weights_sha256": "x"}})
    assert report["verdict"] == compare.IDENTICAL and report["fingerprints_compared"] == 2
    assert compare.render(report).startswith("IDENTICAL: 4 steps of loss bits, 2 parameter")
