"""determinism.cpu_isa=portable: its pins are in effect, and a model whose ops it cannot pin
stops before the first update, naming the op. (Its bits across machine classes:
tests/test_golden_loss.py; which ops it refuses, in process: tests/unit/test_portable.py.)"""

import json

import pytest
from conftest import TESTS, read_lock, run_dir_of

from harness.host import machine_class
from harness.training import portable_math
from harness.training.determinism import cpu_supports

CONF = str(TESTS / "conf")
pytestmark = pytest.mark.skipif(not cpu_supports("portable",
                                                 machine_class.this_machine()["isa_flags"]),
                                reason="this CPU has no AVX2 and FMA")


def test_a_portable_run_records_its_pins_and_repeats(cli, tmp_path):
    runs = [run_dir_of(cli("train", "hashy", "determinism.cpu_isa=portable", "--config-dir",
                           CONF, "--runs-dir", str(tmp_path / "runs"), check_rc=0))
            for _ in range(2)]
    lock = read_lock(runs[0])
    in_effect = lock["determinism"]["in_effect"]
    assert in_effect["mkldnn_enabled"] is False and in_effect["nnpack_enabled"] is False
    assert in_effect["sqrt_kernel"] == portable_math.NAME  # Adam's sqrt, correctly rounded
    assert in_effect["env"]["MKL_CBWR"] == "COMPATIBLE,STRICT"
    assert in_effect["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert lock["software"]["torch_cpu_capability"] == "AVX2"
    assert lock["hardware"]["cpu"]["vendor"] == machine_class.this_machine()["vendor"]
    assert read_lock(runs[1])["results"]["weights_sha256"] == lock["results"]["weights_sha256"]
    native = run_dir_of(cli("train", "hashy", "--config-dir", CONF, "--runs-dir",
                            str(tmp_path / "runs"), check_rc=0))
    native_in_effect = read_lock(native)["determinism"]["in_effect"]
    assert not {"mkldnn_enabled", "nnpack_enabled", "sqrt_kernel"} & set(native_in_effect)


@pytest.mark.long
def test_an_op_portable_mode_cannot_pin_stops_the_run_before_training(cli, tmp_path):
    runs = tmp_path / "runs"
    done = cli("train", "hashy", "model._target_=harness_testkit.SpectralMLP",
               "determinism.cpu_isa=portable", "--config-dir", CONF, "--runs-dir", str(runs))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "aten::_fft_r2c runs in MKL's FFT" in done.stderr
    assert "determinism.cpu_isa=native or avx2" in done.stderr
    [run] = [p for p in runs.iterdir() if p.is_dir()]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and not (run / "model.pt").exists()
    assert not (run / "metrics.jsonl").exists() or not [
        line for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("kind") == "train"], "a step was logged"
    # The same model trains where the op is allowed: the check, not the model, stopped it.
    cli("train", "hashy", "model._target_=harness_testkit.SpectralMLP",
        "determinism.cpu_isa=avx2", "--config-dir", CONF, "--runs-dir", str(runs), check_rc=0)


# A user's script, in the style of a regression example: a model whose loss takes a log.
LOG_LOSS_SCRIPT = '''
import sys
import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
x, y = torch.rand(64, 8), torch.rand(64, 1) + 0.5
for step in range(5):
    optimizer.zero_grad()
    prediction = torch.nn.functional.softplus(model(x)) + 0.1
    loss = torch.log(prediction / y) if sys.argv[1] == "log" else prediction / y - 1
    loss.square().mean().backward()
    optimizer.step()
torch.save(model.state_dict(), "model.pt")
'''


def test_a_command_with_an_op_portable_mode_cannot_pin_stops_after_its_first_step(cli,
                                                                                  tmp_path):
    (tmp_path / "fit.py").write_text(LOG_LOSS_SCRIPT)
    command = ["run", "backend=local", "--output", "model.pt", "--runs-dir",
               str(tmp_path / "runs")]
    done = cli(*command, "determinism.cpu_isa=portable", "--", "python", "fit.py", "log")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "aten::log runs in MKL's vector math (VML)" in done.stderr
    assert "the command stopped after its first optimizer step" in done.stderr
    assert not (tmp_path / "model.pt").exists()
    # Controls: the same model without the log trains in portable mode (Adam's sqrt is
    # portable mode's own), and with the log in native mode.
    cli(*command, "determinism.cpu_isa=portable", "--", "python", "fit.py", "ratio",
        check_rc=0)
    cli(*command, "--", "python", "fit.py", "log", check_rc=0)
