"""A seed per source of randomness (`seeds.init`, `.order`, `.augment`, `.dropout`): varying
one moves that stream and leaves the other three exactly as they were. The streams are
written down by a recording dataset and model (tests/fixtures/streams.py) during real
`harness train` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import harness, make_context, read_lock, require

SOURCES = ("init", "order", "augment", "dropout")
# The recording model, one epoch (every sample built once); every source held at a value of
# its own (dropout too: left null it continues from the init stream, as in earlier versions).
BASE = ["model._target_=streams.RecordingNet", "model.channels=[4,8]", "model.hidden=16",
        "trainer.epochs=1", "trainer.eval_limit=8", "++seeds.init=11", "++seeds.order=12",
        "++seeds.augment=13", "++seeds.dropout=14"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return make_context(tmp_path_factory.mktemp("seeds"), dataset="streams.RecordingIdx")


def streams(ctx, name: str, *overrides: str) -> dict:
    """What each source gave one run: {source: [records in order]}."""
    log = ctx["base"] / f"{name}.jsonl"
    ctx["env"]["STREAMS_LOG"] = str(log)
    harness(ctx, "train", "tiny", *BASE, *overrides, check_rc=0)
    found = {"init": [], "dropout": [], "sample": []}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        found[entry["kind"]].append(entry["value"])
    samples = found.pop("sample")
    found["order"] = [(split, index) for split, index, _ in samples]
    # Augmentation per sample (which samples are drawn, and when, is the order's doing).
    found["augment"] = sorted({(split, index): noise for split, index, noise in samples}.items())
    return found


@pytest.mark.long
def test_varying_one_source_leaves_the_other_streams_untouched(ctx):
    base = streams(ctx, "base")
    assert all(base[source] for source in SOURCES), base
    assert streams(ctx, "again") == base  # the recording itself repeats
    for source in SOURCES:
        varied = streams(ctx, source, f"++seeds.{source}=99")
        moved = [s for s in SOURCES if varied[s] != base[s]]
        assert moved == [source], f"seeds.{source}=99 moved {moved}"


@pytest.mark.long
def test_seeds_default_to_the_run_seed_and_an_invalid_one_is_refused(ctx):
    default = streams(ctx, "derived", "seed=11", "++seeds.init=null", "++seeds.order=null",
                      "++seeds.augment=null", "++seeds.dropout=null")
    explicit = streams(ctx, "explicit", "seed=11", "++seeds.init=11", "++seeds.order=11",
                       "++seeds.augment=11", "++seeds.dropout=null")
    assert default == explicit
    done = harness(ctx, "train", "tiny", "++seeds.order=-1", check_rc=2)
    assert "seeds.order=-1" in done.stderr


@pytest.mark.long
def test_variance_runs_each_source_alone_and_plots_what_it_reports(tmp_path_factory):
    ctx = make_context(tmp_path_factory.mktemp("variance"), dataset="augmenting.AugmentingIdx")
    done = harness(ctx, "variance", "tiny", "-n", "3", "--sources", "init,order,augment,kernel",
                   "--json", check_rc=0)
    report = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert list(report["sources"]) == ["init", "order", "augment", "kernel"]
    record = json.loads(next((ctx["runs"] / "sweeps").glob("*.json")).read_text())
    kernel_runs = [read_lock(ctx["runs"] / r["run_id"]) for r in record["runs"]
                   if r["source"] == "kernel"]
    assert [lock["determinism"]["mode"] for lock in kernel_runs] == ["off"] * 3
    assert len({json.dumps(lock["config"]["seeds"]) for lock in kernel_runs}) == 1
    # On this CPU the kernels repeat even with determinism off: no spread, and it is said.
    assert len({lock["results"]["final_loss"] for lock in kernel_runs}) == 1
    for source in ("init", "order", "augment"):
        assert report["sources"][source]["final_loss"]["n"] == 3
        runs = [r for r in record["runs"] if r["source"] == source]
        losses = [read_lock(ctx["runs"] / r["run_id"])["results"]["final_loss"] for r in runs]
        assert report["points"][source]["final_loss"] == losses
        assert len(set(losses)) == 3, f"varying {source} alone did not move the loss"
        for run in runs:  # only this source's seed differs from the held ones
            seeds = read_lock(ctx["runs"] / run["run_id"])["config"]["seeds"]
            held = {k: v for k, v in seeds.items() if k != source}
            assert held == {k: 0 for k in held}, seeds  # tiny's seed is 0
    again = subprocess.run([sys.executable, "-m", "harness", "summary", record["sweep_id"],
                            "--json", "--runs-dir", str(ctx["runs"])], cwd=ctx["base"],
                           env=ctx["env"], capture_output=True, text=True, check=True)
    assert json.loads(again.stdout) == report  # the report again, from the record
    plain = subprocess.run([sys.executable, "-m", "harness", "summary", record["sweep_id"],
                            "--runs-dir", str(ctx["runs"])], cwd=ctx["base"], env=ctx["env"],
                           capture_output=True, text=True, check=True)
    assert "kernel: every run gave the same bits" in plain.stdout
    png = Path(done.stdout.split("plot: ")[-1].strip())
    from PIL import Image

    assert json.loads(Image.open(png).text["harness-variance"]) == report["points"]


@pytest.mark.slurm
@pytest.mark.long
def test_variance_as_one_slurm_job_array(tmp_path_factory):
    from test_slurm import slurm_up

    require(slurm_up(), "Slurm is not running here (make slurm-env)")
    ctx = make_context(tmp_path_factory.mktemp("variance-slurm"))
    done = harness(ctx, "variance", "tiny", "-n", "2", "--sources", "init,order",
                   "backend.slurm.cpus_per_task=1", "--slurm", "--wait", "--json", check_rc=0)
    assert "submitted job array" in done.stdout
    report = json.loads(done.stdout[done.stdout.index("\n{") + 1:done.stdout.rindex("}") + 1])
    assert {s: v["final_loss"]["n"] for s, v in report["sources"].items()} == \
        {"init": 2, "order": 2}
    record = json.loads(next((ctx["runs"] / "sweeps").glob("*.json")).read_text())
    assert record["slurm_job_id"] and len(record["runs"]) == 4
