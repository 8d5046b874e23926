"""The op trace: a diverged replay, or two runs, are explained down to the first op that
computes differently, and whether the machine or the data changed it. Real runs of the
bundled config on real data, through the CLI. (The comparison and the tracer alone, in
process: tests/unit/test_op_trace.py.)"""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import FAST, run_dir_of

from harness import rundir
from harness.record import op_trace

TRACE_FAST = [*FAST, "trainer.max_steps=3"]


def _train(cli, fashion, *overrides, env=None):
    done = cli("train", "fashion_mnist", *TRACE_FAST, *overrides,
               env={"HARNESS_DATA": str(fashion), **(env or {})}, check_rc=0)
    return run_dir_of(done)


def test_replay_that_diverges_names_the_op_the_environment_changes(cli, fashion):
    """A replay whose oneDNN is held to SSE4.1 (a setting the original run did not have)
    ends with the op line: the first convolution, identical inputs, the setting named. The
    plain replay of the same run is IDENTICAL: the line is not said of every run."""
    original = _train(cli, fashion)
    trace = op_trace.read(original)
    assert trace["header"]["steps"] == [1]
    assert trace["ops"][0]["op"] == "aten::convolution"
    assert {op["phase"] for op in trace["ops"]} == {"forward", "backward", "optimizer"}

    same = cli("replay", str(original), env={"HARNESS_DATA": str(fashion)})
    assert same.returncode == 0, same.stdout + same.stderr
    assert "IDENTICAL" in same.stdout

    changed = cli("replay", str(original), "--allow-mismatch",
                  env={"HARNESS_DATA": str(fashion), "ONEDNN_MAX_CPU_ISA": "SSE41"})
    assert changed.returncode == 7, changed.stdout + changed.stderr
    last = changed.stderr.strip().splitlines()[-1]
    assert last.startswith("op trace: first differing op aten::convolution (forward) in "
                           "model.features.0, step 1, call 1 of "), last
    assert "with identical inputs: this op computes differently in this environment" in last
    assert "ONEDNN_MAX_CPU_ISA: (absent) -> SSE41" in last
    records = [json.loads(path.read_text()) for path in original.parent.glob("*/replay.json")]
    diverged = [r for r in records if r["verdict"] == "DIVERGED"]
    assert len(diverged) == 1 and diverged[0]["first_differing_op"]["kind"] == "kernel"


def test_all_divergences_lists_every_op_the_environment_changes(cli, fashion):
    """--all-divergences goes on past the first op: a probe run gives each op whose output
    bits differ the original's outputs (trainer.op_trace_tensors), so the ops behind it get
    the original's inputs, and every op that computes differently is listed. The replay's
    own trace shows only the first of them with identical inputs."""
    original = _train(cli, fashion, "trainer.op_trace_tensors=true")
    assert (original / rundir.OP_TRACE_TENSORS).is_file()
    env = {"HARNESS_DATA": str(fashion), "ONEDNN_MAX_CPU_ISA": "SSE41"}
    done = cli("replay", str(original), "--allow-mismatch", "--all-divergences", env=env)
    assert done.returncode == 7, done.stdout + done.stderr
    replay_dir = run_dir_of(done)
    record = json.loads((replay_dir / rundir.REPLAY).read_text())
    listed = record["all_divergences"]
    first = record["first_differing_op"]
    assert (listed[0]["op"], listed[0]["module"]) == ("aten::convolution", "model.features.0")
    assert first["kind"] == "kernel" and first["a"]["i"] == listed[0]["i"]
    assert any(op["module"] == "model.features.4" for op in listed), listed  # the 2nd conv
    assert "op(s) compute differently here" in done.stdout
    assert "aten::convolution (forward) in model.features.4" in done.stdout
    # Without the reloading, the replay's trace says less: after the first op, the inputs
    # differ too, and nothing behind it can be told apart.
    lower = op_trace.kernel_differences(op_trace.read(original), op_trace.read(replay_dir))
    assert len(lower) < len(listed)

    # The control: a replay that is IDENTICAL runs no probe and lists nothing.
    same = cli("replay", str(original), "--all-divergences",
               env={"HARNESS_DATA": str(fashion)})
    assert same.returncode == 0, same.stdout + same.stderr
    assert "compute differently" not in same.stdout
    # A run that kept no op outputs is refused before anything runs.
    plain = _train(cli, fashion)
    before = set(plain.parent.iterdir())
    refused = cli("replay", str(plain), "--all-divergences", env={"HARNESS_DATA": str(fashion)})
    assert refused.returncode == 2 and "trainer.op_trace_tensors=true" in refused.stderr
    assert set(plain.parent.iterdir()) == before  # refused before a run directory was made


@pytest.mark.long
def test_trace_diff_names_the_convolution_onednn_computes(cli, fashion):
    """Two runs that differ only in the CPU mode (native: oneDNN convolutions; portable:
    oneDNN off) part at the first convolution, with identical inputs; the mode is named."""
    native = _train(cli, fashion)
    portable = _train(cli, fashion, "determinism.cpu_isa=portable")
    done = cli("trace", "diff", str(native), str(portable))
    assert done.returncode == 7, done.stdout + done.stderr
    assert ("first differing op aten::convolution (forward) in model.features.0, step 1"
            in done.stdout), done.stdout
    assert "with identical inputs" in done.stdout
    assert "config.determinism.cpu_isa: native -> portable" in done.stdout
    assert "mkldnn_enabled" in done.stdout

    # The same run against a rerun of it: every op agrees (exit 0), so the line above is
    # not what the comparison says of any two runs.
    rerun = _train(cli, fashion)
    agree = cli("trace", "diff", str(native), str(rerun))
    assert agree.returncode == 0, agree.stdout + agree.stderr
    assert "agree bit for bit" in agree.stdout


@pytest.mark.long
def test_negative_control_is_an_input_difference_not_a_kernel(cli, fashion):
    """The negative control flips a bit of the first weight after step 1. Traced over two
    steps, the first op that reads that weight in step 2 is named, as a data difference."""
    original = _train(cli, fashion, "trainer.op_trace_steps=2")
    done = cli("replay", str(original), "--negative-control",
               env={"HARNESS_DATA": str(fashion)})
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines()
                if line.startswith("harness: negative control op trace:"))
    assert ("first differing op aten::convolution (forward) in model.features.0, step 2"
            in line), line
    assert "its inputs differed (features.0.weight)" in line
    assert "the data changed it" in line and "identical inputs" not in line


@pytest.mark.long
def test_an_edited_trace_is_refused_and_a_run_without_one_says_so(cli, fashion):
    """The trace is covered by the lock: an edited one (a hash changed to blame another op)
    fails `harness lock check` and the replay (exit 5). trainer.op_trace_steps=0 records
    none, and `harness trace diff` says how to get one (exit 2)."""
    run = _train(cli, fashion)
    assert cli("lock", "check", str(run)).returncode == 0
    path = run / rundir.OP_TRACE
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    op = json.loads(lines[5])
    op["out"][0][0] = "0" * 16
    lines[5] = json.dumps(op)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    checked = cli("lock", "check", str(run))
    assert checked.returncode == 5, checked.stdout + checked.stderr
    assert "results.op_trace_sha256" in checked.stderr
    replayed = cli("replay", str(run), env={"HARNESS_DATA": str(fashion)})
    assert replayed.returncode == 5 and "results.op_trace_sha256" in replayed.stderr

    untraced = _train(cli, fashion, "trainer.op_trace_steps=0")
    assert not (untraced / rundir.OP_TRACE).exists()
    done = cli("trace", "diff", str(run), str(untraced))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "has no op trace" in done.stderr and "op_trace_steps=1 (the default)" in done.stderr


# ---------------------------------------------------------------- commands, damaged traces

COMPILED = """
import torch
torch.manual_seed(0)
model = torch.compile(torch.nn.Linear(8, 2), backend="eager")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(2):
    torch.nn.functional.cross_entropy(model(torch.randn(16, 8)),
                                      torch.zeros(16, dtype=torch.long)).backward()
    optimizer.step()
torch.save(model.state_dict(), "compiled.pt")
"""


@pytest.mark.long
def test_a_command_that_compiles_runs_untraced_and_says_so(project):
    """dynamo fails on global module hooks, which the command's trace needs: a command
    that calls torch.compile gives up its trace (a warning, no file) and runs as it would.
    The control: the same command without torch.compile is traced."""
    directory, harness = project
    (directory / "compiled.py").write_text(COMPILED)
    done = harness("run", "backend=local", "--output", "compiled.pt", "--", "python",
                   "compiled.py", check_rc=0)
    assert "no op trace for this command: it compiles with torch.compile" in done.stdout + \
        done.stderr
    assert not (run_dir_of(done) / rundir.OP_TRACE).exists()
    (directory / "eager.py").write_text(COMPILED.replace("torch.compile(", "(lambda m, **_: m)("))
    done = harness("run", "backend=local", "--output", "compiled.pt", "--", "python",
                   "eager.py", check_rc=0)
    assert op_trace.read(run_dir_of(done))["header"]["steps"] == [1]


def test_a_damaged_trace_is_said_not_a_traceback(cli, tmp_path):
    """A trace that is not gzip (a writer killed half-way, a disk error): `harness trace
    show` says which file and what to do, exit 5."""
    run = tmp_path / "runs" / "20260101T000000000000Z-x-000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    (run / rundir.OP_TRACE).write_bytes(b"junk")
    done = cli("trace", "show", str(run))
    assert done.returncode == 5, done.stdout + done.stderr
    assert "the op trace is damaged" in done.stderr and "Traceback" not in done.stderr
