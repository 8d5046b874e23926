"""Every benchmark script still runs and writes its figures (`make bench` broke once, unseen,
when the defaults moved and one script still read the old place). Their --quick modes,
through run_all.py as `make bench-quick` runs them; the values are not checked: a timed test
is not a benchmark. Long tier: a few minutes, with Docker and an MLflow server."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, require

sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # benchmarks/run_all.py
from test_script import docker_engine_up

pytestmark = pytest.mark.long


def test_every_benchmark_runs_in_its_quick_mode_and_writes_its_figures(tmp_path):
    require(docker_engine_up(), "no Docker engine answers (run `make docker-env`)")
    results = tmp_path / "quick.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick",
                           "--results", str(results)], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.rfind("\n{") + 1:])
    assert report["missing_figures"] == []
    got = json.loads(results.read_text())
    assert sorted(got) == sorted(report["scripts"]) == sorted(run_all.SCRIPTS)
    assert got["replay"]["replay"]["verdicts"] == ["IDENTICAL"]
