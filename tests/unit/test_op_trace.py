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
