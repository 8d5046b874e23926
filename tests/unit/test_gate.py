"""The replay gate (harness/record/gate.py): classification, groups, list values, CPU class
and pins."""

import pytest

from harness.record import gate


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


def test_a_pin_this_cpu_cannot_run_blocks_the_replay():
    from harness.record import gate

    lock = {"config": {"determinism": {"cpu_isa": "avx512"}},
            "hardware": {"cpu": {"isa_flags": ["avx2", "avx512f", "avx512bw", "avx512dq",
                                               "avx512vl", "fma"]}}}
    here = {"hardware": {"cpu": {"isa_flags": ["avx2", "fma"]}}}
    blocking = [d.key for d in gate.gate(lock, here) if d.blocking]
    assert blocking == ["hardware.cpu.supports_pinned_isa"]
    here["hardware"]["cpu"]["isa_flags"] = lock["hardware"]["cpu"]["isa_flags"] + ["amx_tile"]
    assert [d.key for d in gate.gate(lock, here) if d.blocking] == []


def _lock(cpu, device="cpu", cpu_isa="avx2"):
    return {"config": {"trainer": {"device": device}, "determinism": {"cpu_isa": cpu_isa}},
            "hardware": {"cpu": {"architecture": "x86_64", "isa_flags": ["avx2", "fma"],
                                 **cpu}}}


def test_the_class_row_of_a_gpu_run_is_informational_and_an_unknown_vendor_is_no_difference():
    from harness.record import gate

    zen3 = {"vendor": "amd", "family": 25, "model_number": 1, "model": "AMD EPYC"}
    xeon = {"vendor": "intel", "family": 6, "model_number": 143, "model": "Xeon"}
    cpu_row = gate.find(gate.gate(_lock(xeon), _lock(zen3)), gate.CLASS_KEY)
    assert cpu_row is not None and cpu_row.group in (gate.BLOCKING, gate.UNPROVEN)
    gpu_row = gate.find(gate.gate(_lock(xeon, "cuda"), _lock(zen3)), gate.CLASS_KEY)
    assert gpu_row.group == gate.INFO and "GPU" in gpu_row.why
    # An older lock from a VM whose model name names no vendor: not a class difference.
    vm = {"model": "Common KVM processor"}
    assert gate.find(gate.gate(_lock(vm), _lock(zen3)), gate.CLASS_KEY) is None
