"""`harness doctor`: each determinism setting's throughput and reproducibility here, the
nondeterministic operations the model hits, and the cheapest setting that reproduces."""

import json

import pytest
from conftest import TESTS

CONF = str(TESTS / "conf")


@pytest.mark.long
def test_doctor_measures_every_setting_and_names_the_nondeterministic_op(cli, tmp_path):
    runs = tmp_path / "runs"
    done = cli("doctor", "unpool", "--config-dir", CONF, "--steps", "6", "--runs-dir",
               str(runs), "--json", check_rc=0)
    report = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    rows = {row["setting"]: row for row in report["settings"]}
    assert list(rows)[:4] == ["strict", "warn", "off", "strict, threads=1"]
    # strict stops at the op, naming it; the other modes train and repeat (CPU kernels)
    assert "max_unpooling2d_forward_out does not have a deterministic" in \
        rows["strict"]["error"]
    for setting in ("warn", "off"):
        assert rows[setting]["steps"] == 6 and rows[setting]["steps_per_s"] > 0
        assert rows[setting]["identical"] is True
    assert report["cheapest_reproducing"] in ("warn", "off")
    assert report["nondeterministic_ops"] == rows["warn"]["nondeterministic_ops"]
    [op] = report["nondeterministic_ops"]
    assert op["module"] == "unpool" and "max_unpool" in op["operation"]
    assert [p.name for p in runs.glob("doctor-*.json")]  # the report is kept


@pytest.mark.long
def test_doctor_table_says_the_cheapest_setting(cli, tmp_path):
    done = cli("doctor", "hashy", "--config-dir", CONF, "--steps", "4", "trainer.epochs=1",
               "--runs-dir", str(tmp_path / "runs"), check_rc=0)
    assert "setting" in done.stdout and "reproduces here" in done.stdout
    assert "cheapest setting that reproduces here: " in done.stdout
    assert "strict, threads=1" in done.stdout
    assert "nondeterministic operations the model hits (warn mode): none" in done.stdout


@pytest.mark.long
def test_doctor_measures_the_portable_mode_where_the_cpu_has_avx2(cli, tmp_path):
    from harness.host import machine_class
    from harness.training.determinism import cpu_supports

    if not cpu_supports("portable", machine_class.this_machine()["isa_flags"]):
        import pytest
        pytest.skip("this CPU has no AVX2")
    runs = tmp_path / "runs"
    done = cli("doctor", "hashy", "--config-dir", CONF, "--steps", "4", "trainer.epochs=1",
               "--runs-dir", str(runs), "--json", check_rc=0)
    report = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    rows = {row["setting"]: row for row in report["settings"]}
    portable = rows["strict, cpu_isa=portable"]
    assert portable["identical"] is True and portable["steps_per_s"] > 0
    assert portable["determinism"]["cpu_isa"] == "portable"
    # The ops that compute other bits than native strict, from the first steps' op traces:
    # present where the weights differ (the first op to part got identical inputs).
    assert rows["strict"]["ops_computing_differently"] is None  # the reference
    assert rows["warn"]["ops_computing_differently"] == []  # same kernels as strict
    if portable["same_weights_as_strict"] is False:
        assert portable["ops_computing_differently"], portable
