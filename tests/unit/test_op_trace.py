"""The op trace in process: the comparison alone (harness/record/op_trace.py), and the tracer
(harness/training/op_tracer.py)."""

from __future__ import annotations

import contextlib

from harness import rundir
from harness.record import op_trace
from harness.training import op_tracer


def _op(i, op, out, inputs=("x",), step=1):
    return {"i": i, "step": step, "phase": "forward", "op": op, "module": "model.layer",
            "in": [[h, [2], "float32", ""] for h in inputs], "out": [[out, [2], "float32"]]}


def _trace(*ops):
    return {"header": {"format": 1, "steps": sorted({op["step"] for op in ops}),
                       "ops": len(ops)}, "ops": list(ops)}


def test_first_difference_tells_other_code_and_a_random_draw_apart():
    reference = _trace(_op(1, "aten::mm", "a"), _op(2, "aten::bernoulli_.float", "b", ("a",)))
    other_code = _trace(_op(1, "aten::addmm", "a"), _op(2, "aten::bernoulli_.float", "b", ("a",)))
    assert op_trace.first_difference(reference, other_code)["kind"] == "path"
    other_draw = _trace(_op(1, "aten::mm", "a"), _op(2, "aten::bernoulli_.float", "c", ("a",)))
    found = op_trace.first_difference(reference, other_draw)
    assert found["kind"] == "random" and found["a"]["i"] == 2
    assert "random number generator" in op_trace.render({**found, "environment": []})
    longer = _trace(*reference["ops"], _op(3, "aten::relu", "d", ("b",)))
    assert op_trace.first_difference(reference, longer)["kind"] == "path"
    assert op_trace.first_difference(reference, reference)["kind"] == "same"


def test_a_tracer_that_cannot_read_a_tensor_gives_up_and_training_goes_on(monkeypatch,
                                                                           tmp_path, capsys):
    """The tracer is a guest in the training process: its own failure (here: every tensor
    unreadable) must leave the step's results as they would be, and write no half trace."""
    import torch

    def step(tracer):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with tracer(model).step(1) if tracer else contextlib.nullcontext():
            model(torch.ones(3, 4)).sum().backward()
            optimizer.step()
        return model.weight.detach().clone()

    untraced = step(None)
    monkeypatch.setattr(op_tracer, "tensor_hash", lambda t: (_ for _ in ()).throw(
        RuntimeError("cannot read this tensor")))
    made = []
    traced = step(lambda model: made.append(op_tracer.Tracer(model, 1)) or made[-1])
    assert torch.equal(traced, untraced)
    assert made[0].ops == [] and made[0].traced_steps == []
    made[0].write_pending(tmp_path)
    assert not (tmp_path / rundir.OP_TRACE).exists()
    assert "no op trace for this run" in capsys.readouterr().err


def test_argument_hash_sees_a_number_s_last_bit_but_not_an_object_s_address():
    """Two identical runs pass different Generator objects (other addresses): the same
    hash. A float one bit apart: another hash."""
    import torch

    first = op_tracer._arguments_hash([3, 0.1, torch.Generator(), torch.float32, None])
    assert first == op_tracer._arguments_hash([3, 0.1, torch.Generator(), torch.float32, None])
    assert first != op_tracer._arguments_hash([3, 0.1000000000000001, torch.Generator(),
                                              torch.float32, None])


def test_a_trace_that_never_reaches_its_step_is_given_up(monkeypatch, capsys):
    """Forward passes in training mode and no optimizer step (an inference script that
    forgot model.eval()): past MAX_OPS the tracer stops recording and says why."""
    import torch

    monkeypatch.setattr(op_tracer, "MAX_OPS", 50)
    model = torch.nn.Linear(4, 2)
    tracer = op_tracer.Tracer(model, 1)
    with tracer.step(1):
        for _ in range(100):
            model(torch.ones(3, 4))
    assert tracer.ops == [] and tracer.traced_steps == []
    assert "more than 50 ops without finishing the traced steps" in capsys.readouterr().err


def _foreach_sgd_trace(lr: float, steps: int):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, foreach=True)
    tracer = op_tracer.Tracer(model, steps)
    for step in range(1, steps + 1):
        with tracer.step(step):
            model(torch.ones(3, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    return {"header": {"steps": tracer.traced_steps}, "ops": tracer.ops}


def test_foreach_optimizer_ops_record_what_they_write():
    """A foreach update writes its parameters and returns nothing, and under a dispatch mode
    leaves their version counters alone: the parameters it wrote are its outputs, and no
    stale hash hides them. Two learning rates part at the update (its number argument), not
    'same', and not at a later op with 'identical inputs'."""
    for steps in (1, 2):
        found = op_trace.first_difference(_foreach_sgd_trace(0.1, steps),
                                           _foreach_sgd_trace(0.1000001, steps))
        assert found["kind"] == "input", found
        assert found["a"]["op"].startswith("aten::_foreach_add_") and found["a"]["out"]
    same = op_trace.first_difference(_foreach_sgd_trace(0.1, 2), _foreach_sgd_trace(0.1, 2))
    assert same["kind"] == "same"


def test_a_higher_order_op_runs_under_the_tracer():
    """torch.cond is passed through (its inner ops untraced), not refused."""
    import torch

    tracer = op_tracer.Tracer(torch.nn.Linear(1, 1), 1)
    x = torch.randn(3)
    with tracer.step(1):
        y = torch.cond(x.sum() > 0, lambda t: t.sin(), lambda t: t.cos(), (x,))
    assert torch.equal(y, x.sin() if x.sum() > 0 else x.cos())
    assert tracer.traced_steps == [1]


def test_a_reloading_tracer_gives_a_differing_op_the_references_outputs(tmp_path):
    """--all-divergences' probe: an op whose output bits differ from the reference's gets
    the reference's outputs, so the ops after it see the reference's inputs; the op is
    marked `reloaded`. Without a reference the same difference spreads to every op after."""
    import torch

    def traced_step(weight_bump: float, tracer_of):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                    torch.nn.Linear(3, 1))
        with torch.no_grad():
            model[0].bias.add_(weight_bump)  # the first op's input differs
        tracer = tracer_of(model)
        with tracer.step(1):
            model(torch.ones(2, 4)).sum().backward()
        return tracer, model

    reference, _ = traced_step(0.0, lambda m: _keeping(op_tracer.Tracer(m, 1)))
    reference.write(tmp_path)
    assert (tmp_path / rundir.OP_TRACE_TENSORS).is_file()
    recorded = op_trace.read(tmp_path)

    def reloading(model):
        tracer = op_tracer.Tracer(model, 1)
        tracer.reference = op_tracer.Reference.load(tmp_path)
        return tracer

    probe, _ = traced_step(1e-3, reloading)
    plain, _ = traced_step(1e-3, lambda m: op_tracer.Tracer(m, 1))
    outputs = [[o[0] for o in op["out"]] for op in recorded["ops"]]
    first = next(k for k, op in enumerate(plain.ops)
                 if [o[0] for o in op["out"]] != outputs[k])
    assert probe.ops[first]["op"] == "aten::addmm" and probe.ops[first].get("reloaded")
    assert not any(op.get("reloaded") for op in plain.ops)
    # After the reload every later forward op computes the reference's bits again ...
    later = [k for k, op in enumerate(probe.ops) if op["phase"] == "forward" and k > first]
    assert later and all([o[0] for o in probe.ops[k]["out"]] == outputs[k] for k in later)
    assert not any(probe.ops[k].get("reloaded") for k in later)
    # ... where without it the difference reaches them (the control).
    assert any([o[0] for o in plain.ops[k]["out"]] != outputs[k] for k in later)


def _keeping(tracer):
    tracer.kept = []
    return tracer
