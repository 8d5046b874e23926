"""`harness machine class / ops / record`: this machine's class, its per-op table, and a
corpus entry made by the project's own CLI (a corpus of its own in a temporary folder)."""

import json

import pytest

from harness.host import machine_class
from harness.record import corpus, cpu_ops
from harness.training.determinism import cpu_supports

AVX2 = pytest.mark.skipif(not cpu_supports("portable", machine_class.this_machine()["isa_flags"]),
                          reason="this CPU has no AVX2 and FMA")


def test_machine_class_names_this_cpu(cli):
    shown = json.loads(cli("machine", "class", "--json", check_rc=0).stdout)
    assert shown["class"] == machine_class.this_machine()
    assert shown["class_id"] == machine_class.class_id(machine_class.this_machine())


@AVX2
@pytest.mark.long
def test_ops_table_of_the_portable_setting_repeats_and_matches_the_determinism_pins(
        cli, tmp_path):
    from harness.training.determinism import CPU_ISA

    setting = cpu_ops.SETTINGS[cpu_ops.PORTABLE]
    assert {k: v for k, v in setting.items() if not k.startswith("_")} == \
        CPU_ISA["portable"]["env"] and setting["_MKLDNN"] == setting["_NNPACK"] == "0"
    assert setting["_SQRT"] == "1"  # portable mode's own float32 sqrt
    out = tmp_path / "ops.json"
    first = json.loads(cli("machine", "ops", "--setting", cpu_ops.PORTABLE, "--out", str(out),
                           check_rc=0).stdout)
    ops = first["settings"][cpu_ops.PORTABLE]
    # 13 training ops, and 13 vector math functions alone (vml_*)
    assert ops["_capability"] == "AVX2" and len([k for k in ops if not k.startswith("_")]) == 26
    compared = cli("machine", "ops", "--setting", cpu_ops.PORTABLE, "--compare", str(out),
                   check_rc=0).stdout
    assert f"{cpu_ops.PORTABLE}" in compared and "same" in compared
    # One op changed in the other table is named.
    other = json.loads(out.read_text())
    other["settings"][cpu_ops.PORTABLE]["gemm"] = "0" * 16
    out.write_text(json.dumps(other))
    compared = cli("machine", "ops", "--setting", cpu_ops.PORTABLE, "--compare", str(out),
                   check_rc=0).stdout
    assert "differ: gemm" in compared
    bad = cli("machine", "ops", "--setting", "avx9")
    assert bad.returncode == 2 and "--setting list" in bad.stderr


@AVX2
@pytest.mark.long
def test_record_adds_this_class_once_and_keeps_what_is_recorded(cli, tmp_path, fashion):
    root = tmp_path / "corpus"
    folder = root / machine_class.class_id(machine_class.this_machine())
    folder.mkdir(parents=True)
    # A table recorded before the portable setting existed: kept, and only that is added.
    older = {"cpu": {"model": "as recorded"},
             "settings": {name: {"gemm": "kept"} for name in cpu_ops.SETTINGS
                          if name != cpu_ops.PORTABLE}}
    (folder / corpus.OPS_FILE).write_text(json.dumps(older))
    done = cli("machine", "record", "--corpus", str(root), "--mode", "avx2", check_rc=0)
    assert f"recorded: {folder}" in done.stdout
    [entry] = corpus.entries(root)
    assert entry.modes() == ["avx2"]
    assert machine_class.same_class(entry.facts, machine_class.this_machine())
    [run] = entry.runs("avx2")
    assert not (run / "checkpoints").exists()
    assert sorted((run / "overrides.txt").read_text().split()) == sorted(
        [*corpus.GOLDEN_OVERRIDES, "determinism.cpu_isa=avx2"])
    before = corpus.result_of(run)
    again = cli("machine", "record", "--corpus", str(root), "--mode", "avx2", check_rc=0)
    assert "already recorded, kept" in again.stdout
    assert corpus.entries(root)[0].runs("avx2") == [run] and corpus.result_of(run) == before
    assert [p.name for p in root.iterdir()] == [folder.name]  # no scratch left behind
    table = json.loads((folder / corpus.OPS_FILE).read_text())
    assert table["cpu"] == older["cpu"] and set(table["settings"]) == set(cpu_ops.SETTINGS)
    assert all(table["settings"][name] == {"gemm": "kept"} for name in older["settings"])
    assert table["settings"][cpu_ops.PORTABLE]["_capability"] == "AVX2"
