"""The op trace: every op the first training step(s) dispatched, with a bitwise hash of its
inputs and outputs, so that a divergence can be named down to the operation.

A replay that diverges at step 6 says where, not why. The trace says why: walking two runs'
traces in order, the first op whose output bits differ either got identical inputs (the op
itself computes differently here: a kernel, a CPU mode, a library, the machine) or did not
(a tensor from outside the traced ops differed already: a weight, the batch, optimizer
state). The trace in the run directory is the reference, so this works after the original
machine is gone.

Recording runs in the training process and needs torch (harness/training/op_tracer.py);
reading and comparing (`read`, `first_difference`, `render`, here) are plain Python for the
host.

File: op-trace.jsonl.gz, gzip without a time stamp (the same ops give the same bytes), one
JSON object per line: a header {"format", "steps", "ops"}, then one per op:
  {"i": call index from 1, "step": optimizer step from 1, "phase": forward|backward|optimizer,
   "op": "aten::convolution", "module": "model.features.0",
   "in": [[hash, shape, dtype, name], ...], "args": hash of the other arguments,
   "out": [[hash, shape, dtype], ...]}
`name` is the parameter's name where the input is one of the model's parameters or buffers.
A hash is the first 16 hex digits of BLAKE2b over the tensor's bytes (row-major): equal
hashes mean equal bits.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.errors import LockfileError
from harness.rundir import OP_TRACE, OP_TRACE_TENSORS

FORMAT = 1
UNHASHABLE = "-"  # a tensor without plain memory (sparse, meta, mkldnn layout)

# Ops whose outputs are random draws: a difference there with identical inputs is the RNG.
RANDOM_OPS = ("bernoulli", "dropout", "rand", "normal", "uniform", "multinomial", "randperm",
              "exponential", "geometric", "cauchy", "log_normal", "random_", "poisson",
              "rrelu", "_standard_gamma", "binomial")


# --- reading and comparing (host, no torch) -----------------------------------------------

# The trace's files and the results key each is locked under (integrity checks them).
FILES = (("op_trace_sha256", OP_TRACE), ("op_trace_tensors_sha256", OP_TRACE_TENSORS))


def file_digests(run_dir: Path) -> Dict[str, str]:
    """The results entries of the trace files a run wrote: what its lock records."""
    from harness.digest import file_sha256

    return {key: file_sha256(Path(run_dir) / name) for key, name in FILES
            if (Path(run_dir) / name).is_file()}


def read(run_dir: Path) -> Optional[Dict[str, Any]]:
    """{"header": ..., "ops": [...]} of a run's trace; None when the run has none."""
    path = Path(run_dir) / OP_TRACE
    if not path.is_file():
        return None
    try:
        with gzip.open(path, "rt") as lines:
            rows = [json.loads(line) for line in lines if line.strip()]
        return {"header": rows[0], "ops": rows[1:]}
    except (OSError, EOFError, ValueError, IndexError) as exc:  # truncated, not gzip, not JSON
        raise LockfileError(f"{path} cannot be read ({type(exc).__name__}: {exc}): the op "
                            f"trace is damaged. Train the run again to get a trace, or "
                            f"compare without it (trainer.op_trace_steps=0).") from None


def _structure(op: Dict[str, Any]) -> tuple:
    return (op["op"], op["step"], tuple((tuple(t[1]), t[2]) for t in op["in"]))


def _hashes(described: List[List[Any]]) -> List[str]:
    return [t[0] for t in described]


def first_difference(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """Where two traces first part, walking their common steps in order:
    {"kind": "same"} (every common op agrees), "path" (the ops themselves differ: other code
    or another library path), "kernel" (identical inputs, other output bits), "input" (the
    op read a tensor that differed already and that no traced op computed: a weight, the
    batch, optimizer state) or "random" (a random draw: the RNG state differs)."""
    steps = sorted(set(a["header"]["steps"]) & set(b["header"]["steps"]))
    ops_a = [op for op in a["ops"] if op["step"] in steps]
    ops_b = [op for op in b["ops"] if op["step"] in steps]
    found: Dict[str, Any] = {"kind": "same", "steps": steps, "ops": [len(ops_a), len(ops_b)]}
    for index, (op_a, op_b) in enumerate(zip(ops_a, ops_b)):
        if _structure(op_a) != _structure(op_b):
            return {**found, "kind": "path", "a": op_a, "b": op_b, "index": index}
        if _hashes(op_a["out"]) == _hashes(op_b["out"]):
            continue
        differing_inputs = [k for k, (x, y) in enumerate(zip(op_a["in"], op_b["in"]))
                            if x[0] != y[0]]
        other_arguments = op_a.get("args") != op_b.get("args")
        kind = "input" if differing_inputs or other_arguments else "kernel"
        if kind == "kernel" and any(word in op_a["op"] for word in RANDOM_OPS):
            kind = "random"
        return {**found, "kind": kind, "a": op_a, "b": op_b, "index": index,
                "differing_inputs": differing_inputs, "other_arguments": other_arguments,
                "differing_outputs": [k for k, (x, y) in enumerate(zip(op_a["out"], op_b["out"]))
                                      if x[0] != y[0]]}
    if len(ops_a) != len(ops_b):  # one ran on where the other had stopped
        return {**found, "kind": "path", "a": None, "b": None,
                "index": min(len(ops_a), len(ops_b))}
    return found


def kernel_differences(a: Dict[str, Any], b: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every op of the two traces' common steps that got identical inputs (and arguments)
    and gave other output bits, up to the first op that differs in kind: each computes
    differently in its own right, wherever it is. Ops downstream of a difference got other
    inputs and say nothing about their own kernel, so this is a lower bound."""
    steps = set(a["header"]["steps"]) & set(b["header"]["steps"])
    found = []
    for op_a, op_b in zip((op for op in a["ops"] if op["step"] in steps),
                          (op for op in b["ops"] if op["step"] in steps)):
        if _structure(op_a) != _structure(op_b):
            break
        if _hashes(op_a["in"]) == _hashes(op_b["in"]) and op_a.get("args") == \
                op_b.get("args") and _hashes(op_a["out"]) != _hashes(op_b["out"]):
            found.append({key: op_a[key] for key in ("i", "step", "phase", "op", "module")})
    return found


def environment_fields(diffs) -> List[str]:
    """The differences (gate.Difference rows) that can reach an op's kernel, as `field: a ->
    b`: those the gate blocks on or has no recording for, and the config's determinism."""
    from harness.record import gate

    return [f"{d.key}: {gate.short(d.a, 24)} -> {gate.short(d.b, 24)}" for d in diffs
            if d.group in (gate.BLOCKING, gate.UNPROVEN) or
            d.key.startswith("config.determinism.")]


def compare(a_dir: Path, b_dir: Path, environment: List[str] = ()) -> Optional[Dict[str, Any]]:
    """first_difference of two runs' traces plus the one line that says it (`line`); None
    when either run has no trace. `environment` names the recorded environment fields that
    differ between the runs (the replay gate's rows), said where an op computes differently."""
    a, b = read(a_dir), read(b_dir)
    if a is None or b is None:
        return None
    return explained(a, b, environment)


def explained(a: Dict[str, Any], b: Dict[str, Any],
              environment: List[str] = ()) -> Dict[str, Any]:
    """first_difference of two traces already read, with `environment` and its `line`."""
    found = first_difference(a, b)
    found["environment"] = list(environment)
    found["line"] = render(found)
    return found


def where(op: Dict[str, Any], total: int) -> str:
    """`aten::mm (backward) in model.classifier.4, step 1, call 36 of 218`."""
    place = op["module"]
    if op["phase"] == "optimizer":
        updated = [t[3] for t in op.get("in", []) if t[3]]
        place = "the optimizer" + (f" (updating {updated[0]})" if updated else "")
    return f"{op['op']} ({op['phase']}) in {place}, step {op['step']}, call {op['i']} of {total}"


def render(found: Dict[str, Any]) -> str:
    """The one line a DIVERGED report ends with: the op, its module, its step, and whether
    the machine (identical inputs) or the data (differing inputs) changed it."""
    kind, steps = found["kind"], found["steps"]
    traced = f"step{'s' if len(steps) != 1 else ''} {', '.join(map(str, steps))}"
    if not steps:
        return "op trace: the two runs traced no common step; nothing to compare."
    if kind == "same":
        return (f"op trace: all {found['ops'][0]} ops of {traced} agree bit for bit, inputs "
                f"and outputs: a difference between the runs, if any, starts after the "
                f"traced steps. Trace more of them with trainer.op_trace_steps=N (N at least "
                f"the first diverging step).")
    total = found["ops"][0]
    a, b = found["a"], found["b"]
    if kind == "path":
        if a is None or b is None:
            return (f"op trace: one run dispatched more ops than the other in {traced} "
                    f"({found['ops'][0]} vs {found['ops'][1]}): other code, or another "
                    f"library path.")
        return (f"op trace: the runs dispatched different ops at call {a['i']}: "
                f"{a['op']} in {a['module']} vs {b['op']} in {b['module']} (step "
                f"{a['step']}): other code, or another library path, ran.")
    count = len(a["out"])
    outputs = ", ".join(f"output {k + 1} of {count}" for k in found["differing_outputs"])
    if kind == "input":
        names = [a["in"][k][3] or f"input {k + 1}" for k in found["differing_inputs"]]
        if found.get("other_arguments"):
            names.append("a number or other argument that is not a tensor")
        return (f"op trace: first differing op {where(a, total)} ({outputs}): its inputs "
                f"differed ({', '.join(names)}) although every op before it agreed, so "
                f"they were changed outside the traced ops: the data changed it (a weight, "
                f"the batch, optimizer state, or a number the code computed), not the "
                f"machine.")
    if kind == "random":
        return (f"op trace: first differing op {where(a, total)} ({outputs}) with identical "
                f"inputs: a random draw, so the random number generator's state differs "
                f"(seeds, or draws made before this step).")
    fields = found.get("environment") or []
    cause = (f"recorded settings that differ: {'; '.join(fields[:6])}"
             f"{' ...' if len(fields) > 6 else ''}" if fields else
             "no recorded setting differs, so this op is not deterministic on this machine")
    return (f"op trace: first differing op {where(a, total)} ({outputs}) with identical "
            f"inputs: this op computes differently in this environment, not the data; "
            f"{cause}.")
