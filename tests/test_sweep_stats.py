"""Seed sweeps, the compare plot and the TensorBoard export, through the CLI. (The
statistics and the summary's words, in process: tests/unit/test_stats.py, test_sweep.py.)"""

import json

import pytest
from conftest import read_lock, run_dir_of

from harness.commands import compare


@pytest.mark.long
def test_sweep_of_three_seeds_is_summarised(cli, tiny_conf):
    done = cli("train", "tiny", "-m", "seed=0,1,2", "trainer.max_steps=3",
               "--config-dir", str(tiny_conf), check_rc=0)
    sweep_id = next(line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                    if line.startswith("sweep id:"))
    report = json.loads(cli("summary", sweep_id, "--json", check_rc=0).stdout)
    (key, metrics), = report["configurations"].items()
    assert key == "trainer.max_steps=3"
    assert metrics["test_accuracy"]["n"] == 3
    text = cli("summary", sweep_id, check_rc=0).stdout
    assert "n=3" in text and "95% CI" in text


@pytest.mark.long
def test_sweep_with_two_configurations_compares_them(cli, tiny_conf):
    done = cli("train", "tiny", "-m", "seed=0,1", "optim.lr=0.001,0.01", "trainer.max_steps=3",
               "--config-dir", str(tiny_conf), check_rc=0)
    sweep_id = next(line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                    if line.startswith("sweep id:"))
    report = json.loads(cli("summary", sweep_id, "--json", check_rc=0).stdout)
    assert len(report["configurations"]) == 2
    (comparison,) = report["comparisons"]
    assert isinstance(comparison["test_accuracy"]["beyond_noise"], bool)


def test_bad_sweep_syntax_is_rejected_before_any_run(cli, tiny_conf, tmp_path):
    done = cli("train", "tiny", "-m", "seed=0,1", "trainer.max_stepz=3",
               "--config-dir", str(tiny_conf), "--runs-dir", str(tmp_path / "r"))
    assert done.returncode == 2
    assert not (tmp_path / "r").exists() or not any(
        p.name != "sweeps" for p in (tmp_path / "r").iterdir())


@pytest.mark.long
def test_compare_writes_a_png_and_marks_divergence(cli, tiny_conf, tmp_path):
    runs = [run_dir_of(cli("train", "tiny", f"seed={seed}", "--config-dir", str(tiny_conf),
                           check_rc=0)) for seed in (0, 0, 1)]
    same = compare.curves(runs[:2])
    assert same["runs"][1]["diverges_at"] is None
    different = compare.curves([runs[0], runs[2]])
    assert different["runs"][1]["diverges_at"] == 1
    assert len(different["runs"][0]["loss"]) == 8
    out = tmp_path / "cmp.png"
    done = cli("compare", str(runs[0]), str(runs[2]), "-o", str(out), check_rc=0)
    assert "diverges" in done.stdout and str(out) in done.stdout
    blob = out.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000


@pytest.mark.long
def test_tensorboard_export_is_readable_by_tensorboard(cli, tiny_conf):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run_dir_of(cli("train", "tiny", "+tracker=tensorboard",
                             "--config-dir", str(tiny_conf), check_rc=0))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert [e.step for e in losses] == [m["step"] for m in train]
    # TensorBoard stores float32; the recorded loss rounds to it exactly.
    import numpy as np
    assert [e.value for e in losses] == [float(np.float32(m["loss"])) for m in train]
    assert events.Scalars("eval/accuracy")[0].value == pytest.approx(
        read_lock(run_dir)["results"]["test_accuracy"])
    tensors = events.Tags()["tensors"]
    assert "lockfile" in tensors or "lockfile/text_summary" in tensors
