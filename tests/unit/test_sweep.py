"""A sweep's summary (harness/commands/sweep.py): it says when a difference is inside the
seed noise."""

from harness.record import stats


def test_summary_says_when_a_difference_is_inside_the_seed_noise():
    from harness.commands import sweep

    report = {"sweep_id": "s", "configurations": {}, "comparisons": [{
        "a": "optim.lr=0.1", "b": "optim.lr=0.2",
        **{m: stats.compare([0.8, 0.82], [0.81, 0.83]).__dict__ for m, _ in sweep.METRICS},
        "p_b_better": {m: stats.probability_of_improvement([0.8, 0.82], [0.81, 0.83]).__dict__
                       for m, _ in sweep.METRICS}}]}
    text = sweep.render(report)
    assert "P(better accuracy) 75%" in text and "inside the seed noise" in text
