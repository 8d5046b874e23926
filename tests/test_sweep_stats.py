"""Seed sweeps, their statistics, the compare plot and the TensorBoard export."""

import json
import math

import pytest

from conftest import read_lock, run_dir_of
from harness import plot, stats


def test_summary_statistics_are_exact():
    s = stats.summarize([0.90, 0.92, 0.94])
    assert s.n == 3
    assert s.mean == pytest.approx(0.92, abs=1e-15)
    assert s.std == pytest.approx(0.02, abs=1e-15)
    t = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # t(0.975, df=2), closed form
    half = t * 0.02 / math.sqrt(3)
    assert s.ci_low == pytest.approx(0.92 - half, abs=1e-11)
    assert s.ci_high == pytest.approx(0.92 + half, abs=1e-11)
    single = stats.summarize([0.5])
    assert (single.n, single.mean, single.std, single.ci_low) == (1, 0.5, None, None)


def test_welch_difference_is_exact_and_judged_against_noise():
    a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]
    d = stats.compare(a, b)
    var = 5.0 / 3.0  # sample variance of both sides
    se = math.sqrt(var / 4 + var / 4)
    df = (2 * var / 4) ** 2 / (2 * (var / 4) ** 2 / 3)  # = 6
    assert d.df == pytest.approx(df) and d.df == pytest.approx(6.0)
    assert d.diff == 2.0
    assert d.ci_low == pytest.approx(2.0 - 2.446912 * se)
    assert d.ci_high == pytest.approx(2.0 + 2.446912 * se)
    assert d.beyond_noise is False  # [-0.23, 4.23] contains 0
    far = stats.compare([1.0, 1.1, 0.9], [5.0, 5.1, 4.9])
    assert far.beyond_noise is True


def test_t_critical_is_exact_for_any_degrees_of_freedom():
    """Against closed forms (df 1: tan(pi (p - 1/2)); df 2: (2p - 1) / sqrt(2p(1 - p))),
    published 0.975 quantiles, the normal limit, and Welch's fractional df."""
    import math

    p = 0.975
    assert stats.t_critical(1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-9)
    assert stats.t_critical(2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                abs=1e-9)
    published = {3: 3.182446, 5: 2.570582, 10: 2.228139, 30: 2.042272, 45: 2.014103,
                 120: 1.979930}
    for df, value in published.items():
        assert stats.t_critical(df) == pytest.approx(value, abs=1e-6), df
    assert stats.t_critical(1e7) == pytest.approx(1.959964, abs=1e-6)
    assert stats.t_critical(2) > stats.t_critical(2.9) > stats.t_critical(3)
    with pytest.raises(ValueError):
        stats.t_critical(0.5)


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
    same = plot.curves(runs[:2])
    assert same["runs"][1]["diverges_at"] is None
    different = plot.curves([runs[0], runs[2]])
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


def test_probability_that_b_beats_a_over_seeds():
    """Bouthillier et al.'s P(A>B): share of seed pairs, ties half, bootstrap interval."""
    clear = stats.probability_of_improvement([0.80, 0.81, 0.82], [0.90, 0.91, 0.92])
    assert (clear.p, clear.ci_low, clear.ci_high, clear.beyond_noise) == (1.0, 1.0, 1.0, True)
    same = stats.probability_of_improvement([0.80, 0.81, 0.82], [0.80, 0.81, 0.82])
    assert same.p == 0.5 and same.ci_low < 0.5 < same.ci_high and not same.beyond_noise
    lower_loss = stats.probability_of_improvement([0.5, 0.6], [0.3, 0.4],
                                                  higher_is_better=False)
    assert lower_loss.p == 1.0
    mixed = stats.probability_of_improvement([1, 3], [2, 4])  # b wins 3 of 4 pairs
    assert mixed.p == 0.75
    assert stats.probability_of_improvement([1, 3], [2, 4]) == mixed  # fixed generator


def test_summary_says_when_a_difference_is_inside_the_seed_noise():
    from harness import sweep

    report = {"sweep_id": "s", "configurations": {}, "comparisons": [{
        "a": "optim.lr=0.1", "b": "optim.lr=0.2",
        **{m: stats.compare([0.8, 0.82], [0.81, 0.83]).__dict__ for m, _ in sweep.METRICS},
        "p_b_better": {m: stats.probability_of_improvement([0.8, 0.82], [0.81, 0.83]).__dict__
                       for m, _ in sweep.METRICS}}]}
    text = sweep.render(report)
    assert "P(better accuracy) 75%" in text and "inside the seed noise" in text
