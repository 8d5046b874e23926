"""Recording the op trace (harness/record/op_trace.py says what it is and reads it): in the
training process, every op the first training step(s) dispatch, with a bitwise hash of
its inputs and outputs. `Tracer` serves the built-in loop, `CommandTrace` a user's
command (through the injection). Needs torch; the reading side does not."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness.env import OP_TRACE_RELOAD
from harness.record.op_trace import FORMAT, UNHASHABLE
from harness.rundir import OP_TRACE, OP_TRACE_TENSORS


def tensor_hash(tensor) -> str:
    """Bitwise identity of a tensor's values: BLAKE2b of its bytes in row-major order."""
    import torch

    from harness.digest import tensor_bytes

    if tensor.layout != torch.strided or tensor.device.type == "meta":
        return UNHASHABLE
    return hashlib.blake2b(tensor_bytes(tensor), digest_size=8).hexdigest()


def _arguments_hash(leaves: List[Any]) -> str:
    """The op's arguments other than tensors (numbers, shapes, flags), bit for bit: a
    Python float computed outside torch changes an op's output as much as a tensor does."""
    import torch

    plain = (int, bool, str, complex, type(None), torch.dtype, torch.device, torch.layout,
             torch.memory_format)

    def word(value: Any) -> str:
        if isinstance(value, float):
            return value.hex()
        if isinstance(value, plain):
            return repr(value)
        return type(value).__name__  # an object (a Generator): its type, not its address

    words = [word(value) for value in leaves if not isinstance(value, torch.Tensor)]
    return hashlib.blake2b("\x1f".join(words).encode(), digest_size=8).hexdigest()


def _storage(tensor) -> Optional[int]:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (a wrapper subclass, say)
        return None


class HashCache:
    """The hashes of the tensors seen so far. Most inputs are an earlier op's outputs: the
    same tensor object, unchanged since. Their hash is looked up, not computed again,
    which halves the trace's cost. An entry holds while the tensor object lives, its
    version counter is the same, and no op wrote its storage (`forget`: an alias made with
    `.data`, and foreach ops under a dispatch mode, leave the counter as it was)."""

    def __init__(self):
        # id -> (weakref, version counter, hash, storage); storage -> ids
        self._entries: Dict[int, Tuple[Any, Optional[int], str, Optional[int]]] = {}
        self._by_storage: Dict[Optional[int], set] = {}

    def describe(self, tensor) -> List[Any]:
        """[hash, shape, dtype] of a tensor."""
        try:
            version = tensor._version
        except RuntimeError:  # an inference tensor has no version counter
            version = None
        entry = self._entries.get(id(tensor))
        if entry is not None and entry[0]() is tensor and entry[1] == version is not None:
            digest = entry[2]
        else:
            digest = tensor_hash(tensor)
            if version is not None:
                self._remember(tensor, version, digest)
        return [digest, list(tensor.shape), str(tensor.dtype).replace("torch.", "")]

    def _remember(self, tensor, version: int, digest: str) -> None:
        key, storage = id(tensor), _storage(tensor)

        def gone(ref, key=key):  # the tensor died: its id may be reused
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                self._drop(key)

        self._drop(key)
        self._entries[key] = (weakref.ref(tensor, gone), version, digest, storage)
        self._by_storage.setdefault(storage, set()).add(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._by_storage.get(entry[3], set()).discard(key)

    def forget(self, tensors) -> None:
        """Forget every tensor that shares storage with one of `tensors` (just written)."""
        for storage in {_storage(t) for t in tensors}:
            for key in self._by_storage.pop(storage, set()):
                self._entries.pop(key, None)


def written_tensors(func, args, kwargs) -> List[Any]:
    """The tensors an op writes (in place, out=, and each tensor of a written list: foreach
    and fused optimizer ops write their parameters and return nothing)."""
    import torch

    if not func._schema.is_mutable:
        return []
    schema = func._schema.arguments
    values = [*args, *(kwargs.get(argument.name) for argument in schema[len(args):])]
    written = []
    for argument, value in zip(schema, values):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        written += [item for item in items if isinstance(item, torch.Tensor)]
    return written


# What reading a tensor the tracer did not foresee can raise (a tensor subclass without
# storage, a layout numpy cannot take): the tracer then gives up, the op runs as it would.
TRACER_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError)


# A trace that grows past this many ops without its steps ending is given up: a command
# that runs its model in training mode without ever stepping an optimizer (an inference
# script that forgot model.eval()) would otherwise be traced, slowly, to its end. One step
# of a 32-layer transformer is some 15 000 ops.
MAX_OPS = 200_000


class Tracer:
    """Records the ops of chosen optimizer steps. Use `with tracer.step(n):` around one step's
    forward, backward and optimizer step; `write()` once the last traced step is done."""

    def __init__(self, model, steps: int, first: int = 1):
        self.first, self.steps = first, steps  # trace optimizer steps first..steps
        self.current_step = first
        self.written = False
        self.ops: List[Dict[str, Any]] = []
        self.traced_steps: List[int] = []
        self._names: Dict[int, str] = {}
        if model is not None:
            self.name_tensors(model)
        self._in_optimizer = False
        self._pid = os.getpid()  # a forked DataLoader worker inherits the mode: not ours
        self._known = HashCache()
        self.kept: Optional[List[List[Any]]] = None  # trainer.op_trace_tensors: outputs, whole
        self.reference: Optional[Reference] = None  # replay --all-divergences

    def name_tensors(self, model) -> None:
        """Name the model's parameters and buffers where they are an op's input (without a
        data-parallel wrapper's `module.`)."""
        named = dict(model.named_parameters())
        named.update(dict(model.named_buffers()))
        self._names = {id(tensor): name[len("module."):] if name.startswith("module.") else
                       name for name, tensor in named.items()}

    @classmethod
    def for_run(cls, rt, model, done_steps: int, total_steps: int) -> "Tracer":
        """The built-in loop's tracer: steps 1..trainer.op_trace_steps, on rank 0 (the one
        writer of the run directory). A resumed run traces only what no earlier process of
        the run wrote (one killed before its trace was complete)."""
        from harness.config import op_trace_steps

        steps = min(op_trace_steps(rt.cfg["trainer"]), total_steps)
        if not rt.rank.is_main or done_steps >= steps or (Path(rt.run_dir) / OP_TRACE).exists():
            steps = 0
        tracer = cls(model, steps, first=done_steps + 1)
        if os.environ.get(OP_TRACE_RELOAD) and tracer.first == 1:  # a probe: keeps nothing
            tracer.reference = Reference.load(Path(os.environ[OP_TRACE_RELOAD]))
        elif rt.cfg["trainer"].get("op_trace_tensors") and tracer.first == 1:
            tracer.kept = []
        return tracer

    def wants(self, step: int) -> bool:
        """Whether optimizer step `step` (from 1) is traced."""
        return self.first <= step <= self.steps

    def after_step(self, step: int, run_dir: Path) -> None:
        """After optimizer step `step`: write the trace once its last step is done."""
        if step == self.steps:
            self.write_pending(run_dir)

    def write_pending(self, run_dir: Path) -> None:
        """Write what was traced and not written yet (also when a stop signal ends the run
        before the last traced step). A write that fails (a full disk) is said; the
        training goes on without a trace."""
        import sys

        if self.traced_steps and self.ops and not self.written:
            self.written = True
            try:
                self.write(run_dir)
            except OSError as exc:
                print(f"harness: warning: no op trace for this run: writing it failed "
                      f"({exc})", file=sys.stderr, flush=True)

    def step(self, step: int):
        """A context recording every op dispatched inside it as step `step`."""
        import contextlib

        if not self.wants(step):
            return contextlib.nullcontext()
        return self._recording(step)

    def _recording(self, step: int):
        import contextlib

        from torch.utils.module_tracker import ModuleTracker

        modules = ModuleTracker()

        @contextlib.contextmanager
        def recording():
            self.current_step = step
            hooks = self.watch_optimizers()
            try:
                with modules, record_mode(self, modules):
                    yield
            finally:
                for hook in hooks:
                    hook.remove()
                self._in_optimizer = False
            if self._pid == os.getpid():  # not given up
                self.traced_steps.append(step)

        return recording()

    def watch_optimizers(self) -> list:
        """Hooks on every optimizer's step: its ops are the `optimizer` phase."""
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        return [register_optimizer_step_pre_hook(
                    lambda *_: setattr(self, "_in_optimizer", True)),
                register_optimizer_step_post_hook(
                    lambda *_: setattr(self, "_in_optimizer", False))]

    def record(self, func, args, kwargs, modules):
        """Run one op, recording it (the dispatch mode's body)."""
        import torch
        from torch.utils._pytree import tree_flatten

        if not isinstance(func, torch._ops.OpOverload) or func.namespace == "profiler" or \
                os.getpid() != self._pid:  # a higher-order op (torch.cond): its ops untraced
            return func(*args, **kwargs)
        if func.namespace == "c10d":
            return self._collective(func, args, kwargs, modules)
        if len(self.ops) >= MAX_OPS:
            self.give_up(func, RuntimeError(
                f"more than {MAX_OPS} ops without finishing the traced steps (a command "
                f"that runs a model in training mode but never steps an optimizer?)"))
            return func(*args, **kwargs)
        try:
            leaves = tree_flatten((args, kwargs))[0]
            before = [self._known.describe(t) + [self._names.get(id(t), "")]
                      for t in leaves if isinstance(t, torch.Tensor)]
        except TRACER_ERRORS as exc:
            self.give_up(func, exc)
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        try:
            written = written_tensors(func, args, kwargs)
            self._known.forget(written)
            outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
            returned = {id(t) for t in outputs}
            outputs += [t for t in written if id(t) not in returned]  # written, not returned
            described = [self._known.describe(t) for t in outputs]
            reloaded = self._reload(func, outputs, described)
            if self.kept is not None:
                self.kept.append([t.detach().clone() for t in outputs])
            self._append(func, modules, before, _arguments_hash(leaves), described, reloaded)
        except TRACER_ERRORS as exc:
            self.give_up(func, exc)
        return result

    def _reload(self, func, outputs, described) -> bool:
        """replay --all-divergences: where this op's output bits differ from the reference
        run's, give it the reference's outputs, so that the ops after it get the inputs they
        got there and each op that computes differently shows as one."""
        if self.reference is None:
            return False
        wanted = self.reference.outputs(len(self.ops), func.name(), described)
        if wanted is None:
            return False
        for tensor, value in zip(outputs, wanted):
            tensor.copy_(value)
        self._known.forget(outputs)
        return True

    def _collective(self, func, args, kwargs, modules):
        """A collective (c10d::allreduce_): it returns before the other ranks' data has
        arrived, so its tensors are not hashed; ops that read them later hash what came."""
        import torch
        from torch.utils._pytree import tree_flatten

        result = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        self._known.forget(tensors)
        self._append(func, modules, [[UNHASHABLE, list(t.shape), str(t.dtype), ""]
                                     for t in tensors], _arguments_hash([]), [])
        return result

    def _append(self, func, modules, inputs, arguments: str, outputs,
                reloaded: bool = False) -> None:
        self.ops.append({"i": len(self.ops) + 1, "step": self.current_step,
                         "phase": self._phase(modules), "op": func.name(),
                         "module": _module_path(modules.parents), "in": inputs,
                         "args": arguments, "out": outputs,
                         **({"reloaded": True} if reloaded else {})})

    def give_up(self, func, exc: Exception) -> None:
        """The tracer failed on an op (a tensor it cannot read, say): no trace at all (half
        of one would blame the wrong op), a warning, and the training goes on untouched."""
        import sys

        self._pid, self.ops, self.traced_steps = -1, [], []
        self.kept, self.reference = None, None
        print(f"harness: warning: no op trace for this run: recording {func.name()} failed "
              f"({type(exc).__name__}: {exc}); training goes on", file=sys.stderr, flush=True)

    def _phase(self, modules) -> str:
        if self._in_optimizer:
            return "optimizer"
        return "backward" if modules.is_bw else "forward"

    def write(self, run_dir: Path) -> Path:
        """The trace as op-trace.jsonl.gz in the run directory (the same ops, the same bytes)."""
        header = {"format": FORMAT, "steps": self.traced_steps, "ops": len(self.ops)}
        lines = [json.dumps(header, sort_keys=True)]
        lines += [json.dumps(op, sort_keys=True, separators=(",", ":")) for op in self.ops]
        data = ("\n".join(lines) + "\n").encode()
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as packed:
            packed.write(data)
        if self.kept is not None:
            _write_atomically(Path(run_dir) / OP_TRACE_TENSORS,
                              lambda handle: _save_tensors(self.kept, handle))
        return _write_atomically(Path(run_dir) / OP_TRACE,
                                 lambda handle: handle.write(buffer.getvalue()))


def _save_tensors(kept: List[List[Any]], handle) -> None:
    import torch

    torch.save(kept, handle)


def _write_atomically(path: Path, write) -> Path:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # one per writer
    try:
        with open(partial, "wb") as handle:
            write(handle)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    return path


class Reference:
    """A recorded run's trace and its traced ops' outputs (op-trace-tensors.pt): what
    `Tracer._reload` gives an op whose output bits differ. Reloading stops at the first op
    that is not the one the reference ran there (another op, other shapes): from there on
    the two runs do not run the same program."""

    def __init__(self, ops: List[Dict[str, Any]], tensors: List[List[Any]]):
        self.ops, self.tensors = ops, tensors

    @classmethod
    def load(cls, run_dir: Path) -> "Reference":
        import torch

        from harness.record import op_trace

        trace = op_trace.read(run_dir)
        tensors = torch.load(run_dir / OP_TRACE_TENSORS, map_location="cpu",
                             weights_only=True)
        return cls(trace["ops"] if trace else [], tensors)

    def outputs(self, index: int, name: str, described: List[List[Any]]) -> Optional[list]:
        """The reference's outputs of op `index` (from 0) where ours differ; None where they
        agree, or where the runs part ways (reloading then stops for good)."""
        if index >= min(len(self.ops), len(self.tensors)):
            return None
        op = self.ops[index]
        if op["op"] != name or [o[1:] for o in op["out"]] != [d[1:] for d in described]:
            self.ops = self.tensors = []
            return None
        if [o[0] for o in op["out"]] == [d[0] for d in described]:
            return None
        return self.tensors[index]


class CommandTrace:
    """The trace of a `harness run` command, set up by the injection in its main process
    (rank 0): from the first forward of a module in training mode with gradients on (a
    validation pass before training is not a step) through the end of optimizer step
    `steps`, then written to the run directory; at exit, what was traced so far. Recording
    is the user's code's guest: an error of the tracer's own stops the trace with a
    warning, never the command."""

    def __init__(self, steps: int, run_dir: Path, portable: bool = False):
        self.tracer, self.run_dir, self.mode = Tracer(None, steps), Path(run_dir), None
        self.hooks: list = []
        self.modules = None
        self.portable = portable  # determinism.cpu_isa=portable: check the first step's ops

    def install(self) -> None:
        import atexit

        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from torch.utils.module_tracker import ModuleTracker

        self.modules = ModuleTracker()
        self.modules.__enter__()  # from now: it must see the model's outermost forward
        self.hooks = [register_module_forward_pre_hook(self._start),
                      register_optimizer_step_post_hook(self._after_step)]
        atexit.register(self.stop)
        atexit.register(self._remove_hooks)

    def abandon(self, why: str) -> None:
        """No trace for this process (`why` says why): hooks, mode and module tracker go
        now, and what was recorded is dropped. torch.compile calls this: dynamo fails on
        the global module hooks the trace needs."""
        import sys

        self.tracer.ops, self.tracer.traced_steps = [], []
        self.stop()
        print(f"harness: warning: no op trace for this command: {why}", file=sys.stderr,
              flush=True)

    def _remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _start(self, module, _args) -> None:
        import torch
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if self.mode is not None or not module.training or not torch.is_grad_enabled() or \
                _get_current_dispatch_mode() is not None:  # inside a mode of the user's:
            return  # ours would be popped by its exit; wait for a forward outside it
        try:
            self.hooks.pop(0).remove()  # the forward hook: once
            self.tracer.name_tensors(module)
            self.hooks += self.tracer.watch_optimizers()
            self.mode = record_mode(self.tracer, self.modules)
            self.mode.__enter__()
        except TRACER_ERRORS as exc:
            self.abandon(f"starting it failed ({type(exc).__name__}: {exc})")

    def _after_step(self, *_args) -> None:
        if self.mode is None:
            return
        if self.tracer._pid == os.getpid():  # not given up
            self.tracer.traced_steps.append(self.tracer.current_step)
        if self.portable and self.tracer.current_step == 1:
            self._refuse_unportable_ops()
        if self.tracer.current_step >= self.tracer.steps:
            self.stop(in_optimizer_hook=True)
        else:
            self.tracer.current_step += 1

    def _refuse_unportable_ops(self) -> None:
        """In portable mode, stop the command after its first step when one of its ops has
        no portable path (training/portable.py), naming the ops: the built-in loop refuses
        them before its first update; a command's ops are known once it took a step. The
        trace is written first, so `harness trace show` lists where they ran."""
        import sys

        from harness import rundir
        from harness.errors import ConfigError
        from harness.training import portable

        found = portable.blocked_in_trace(self.tracer.ops)
        if not found:
            return
        self.stop(in_optimizer_hook=True)
        said = f"{portable.refusal(found)} (the command stopped after its first optimizer step)"
        print(f"harness: error: {said}", file=sys.stderr, flush=True)
        rundir.record_error(self.run_dir, said, ConfigError.exit_code)  # what the launcher says
        raise SystemExit(ConfigError.exit_code)  # through the user's optimizer.step()

    def stop(self, in_optimizer_hook: bool = False) -> None:
        """End the trace and write it (once); the mode and the module hooks are taken away.
        The optimizer's hooks stay until exit when this runs inside one of them: torch
        iterates over them while it calls them (and then they do nothing)."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if self.modules is None:
            return
        mode, self.mode = self.mode, None
        if mode is not None and _get_current_dispatch_mode() is mode:
            mode.__exit__(None, None, None)
        elif mode is not None:  # another mode above ours: leave it there, recording nothing
            self.tracer._pid = -1
        if not in_optimizer_hook:
            for hook in self.hooks:
                hook.remove()
            self.hooks = []
        self.modules.__exit__(None, None, None)
        self.modules = None
        if not (self.run_dir / OP_TRACE).exists():  # the first process's trace is the run's
            self.tracer.write_pending(self.run_dir)


def record_mode(tracer: Tracer, modules):
    """A TorchDispatchMode that records every op through `tracer`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        supports_higher_order_operators = True  # passed through: Tracer.record

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return tracer.record(func, args, kwargs or {}, modules)

    return Record()


def _module_path(parents) -> str:
    """The innermost module running, as `model.<its attribute path>`; `(outside the model)`
    for ops of the loss or the optimizer. ModuleTracker names the root by its class and a
    data-parallel wrapper adds `module.`: both are dropped, so that a plain run and a
    data-parallel one name modules alike."""
    inside = [name for name in parents if name != "Global"]
    if not inside:
        return "(outside the model)"
    path = max(inside, key=lambda name: name.count(".")).split(".")[1:]
    if path[:1] == ["module"]:
        path = path[1:]
    return ".".join(["model", *path])
