"""The replay gate: which differences between two environments break bitwise equality.

Table-driven: RULES maps lockfile field patterns (flattened keys, `*` matches anything,
`[]` any list index) to BLOCKING or INFO, with the reason. The first matching rule wins;
a field no rule names is informational. Adding a rule (e.g. for a new `image.*` field) is
one line. `lock diff` uses the same table, plus the results and config groups.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from harness.progress import table
from harness.record.lockfile import flatten

BLOCKING = "blocking"
UNPROVEN = "unproven"  # no recording says whether this difference changes the bits
INFO = "informational"
RESULTS = "results"
CONFIG = "config"

# (pattern, class, why). Order matters: specific patterns before general ones.
RULES: Tuple[Tuple[str, str, str], ...] = (
    # Container image: same digest means same userland, libraries and wheels.
    ("image.repo_digest", BLOCKING, "a different image holds different libraries"),
    ("image.image_id", BLOCKING, "a different image holds different libraries"),
    ("image.id", BLOCKING, "a different image holds different libraries"),
    ("image.*digest*", BLOCKING, "a different image holds different libraries"),
    ("image.*", INFO, "image metadata"),
    # GPUs: cuBLAS/cuDNN pick kernels (and reduction orders) per architecture and SM count.
    ("hardware.gpus", BLOCKING, "the number of GPUs differs"),
    ("hardware.gpus[].name", BLOCKING, "another GPU model runs other kernels"),
    ("hardware.gpus[].compute_capability", BLOCKING, "kernels are chosen per architecture"),
    ("hardware.gpus[].sm_count", BLOCKING, "cuBLAS splits reductions by SM count"),
    ("hardware.gpus[].mig_mode", BLOCKING, "a MIG slice has fewer SMs"),
    ("hardware.gpus[].uuid", INFO, "another card of the same model"),
    ("hardware.gpus[].index", INFO, "device numbering"),
    ("hardware.gpus[].*", INFO, "does not change the math"),
    ("hardware.driver", BLOCKING, "the driver ships the PTX JIT and can change kernels"),
    ("hardware.nvml", INFO, "follows the driver"),
    ("hardware.nvml_error", INFO, "why NVML gave nothing"),
    # CPU: the ISA decides which vector kernels (and so which rounding) run.
    ("hardware.cpu.isa_flags", BLOCKING, "CPU math kernels are selected by ISA"),
    ("hardware.cpu.supports_pinned_isa", BLOCKING, "this CPU cannot run the pinned kernels"),
    ("hardware.cpu.architecture", BLOCKING, "another CPU architecture runs other kernels"),
    ("hardware.cpu.logical_cores", INFO, "threads are pinned"),
    # Vendor, family, model: the machine class. The replay gate decides a class difference
    # from the corpus of recordings (machine_class_difference); lock diff cannot.
    ("hardware.cpu.*", UNPROVEN, "another machine class: MKL and oneDNN pick kernels per "
                                 "CPU; only a recording of both classes decides"),
    ("hardware.hostname", INFO, "another machine of the same kind"),
    # Software seen by the training process.
    ("software.python", BLOCKING, "the interpreter version"),
    ("software.python_implementation", BLOCKING, "the interpreter"),
    ("software.torch", BLOCKING, "torch kernels change between versions"),
    ("software.torch_git_version", BLOCKING, "a different torch build"),
    ("software.torch_cpu_capability", BLOCKING, "torch selected other CPU kernels"),
    ("software.cuda_runtime", BLOCKING, "CUDA libraries change kernels"),
    ("software.cuda_available", BLOCKING, "the math would run on another device"),
    ("software.cudnn", BLOCKING, "cuDNN versions change convolution algorithms"),
    ("software.nccl", BLOCKING, "NCCL versions change reduction orders"),
    ("software.packages.torch", BLOCKING, "torch kernels change between versions"),
    ("software.packages.numpy", BLOCKING, "numpy draws seeded random numbers"),
    ("software.packages.*", INFO, "not on the math path of training"),
    ("software.math_libraries.*", INFO, "built into torch: its build (torch_git_version) decides"),
    ("software.platform", INFO, "kernel and libc string"),
    # The interpreters a command ran with (a `harness run`), read inside its processes.
    ("interpreters", BLOCKING, "other interpreters ran the command"),
    ("interpreters[].python", INFO, "where the interpreter is; its version decides"),
    ("interpreters[].version", BLOCKING, "the interpreter version"),
    ("interpreters[].implementation", BLOCKING, "the interpreter"),
    ("interpreters[].torch_cuda", INFO, "follows the torch version"),
    ("interpreters[].imported.nvidia-ml-py", INFO, "the harness reads GPU facts with it"),
    ("interpreters[].imported.setuptools", INFO, "imported for its distutils shim"),
    ("interpreters[].imported.*", BLOCKING, "the command imported it: its code computed "
                                            "the result"),
    ("interpreters[].installed.*", INFO, "installed, but the command did not import it"),
    # Determinism settings actually in effect, and the variables that set them.
    ("determinism.in_effect.nnpack_enabled", BLOCKING,
     "NNPACK on or off changes how convolutions add up (cpu_isa=portable switches it off "
     "since harness of 2026-12-07; a portable run recorded before ran NNPACK)"),
    ("determinism.in_effect.sqrt_kernel", BLOCKING,
     "float32 square roots came from another kernel (cpu_isa=portable computes them "
     "correctly rounded since harness of 2026-12-08; a portable run recorded before took "
     "them from MKL's vector math, whose bits follow the CPU vendor)"),
    ("determinism.*", BLOCKING, "a determinism setting or thread count differs"),
    ("environment.PYTHONHASHSEED", BLOCKING, "changes set/dict iteration orders"),
    ("environment.CUBLAS_WORKSPACE_CONFIG", BLOCKING, "changes cuBLAS reduction strategy"),
    ("environment.OMP_NUM_THREADS", BLOCKING, "CPU reductions depend on thread count"),
    ("environment.MKL_NUM_THREADS", BLOCKING, "CPU reductions depend on thread count"),
    ("environment.NCCL_*", BLOCKING, "changes collective algorithms"),
    ("environment.TORCH_CUDNN_V8_API_DISABLED", BLOCKING, "changes cuDNN algorithm choice"),
    ("environment.LD_PRELOAD", BLOCKING, "a preloaded library can replace math routines"),
    ("environment.HARNESS_PERTURB", BLOCKING, "a negative control: a bit flipped on purpose"),
    ("environment.*", INFO, "scheduling and device visibility"),
    ("container_runtime.*", INFO, "engine version; the image pins the userland"),
    ("harness.*", INFO, "harness code changed; the comparison will show any effect"),
    ("source.*", INFO, "project code changed; the comparison will show any effect"),
    ("created_utc", INFO, "when the launch was prepared"),
)

# Lockfile sections that describe the environment (compared by the replay gate).
ENVIRONMENT_SECTIONS = ("image", "software", "hardware", "environment", "determinism",
                        "interpreters")
RESULT_PREFIXES = ("results.", "timing.")
CONFIG_KEYS = ("config", "config_sha256", "seed", "overrides")


def _compile(pattern: str) -> "re.Pattern[str]":
    return re.compile("^" + re.escape(pattern).replace(r"\*", ".*") + "$")


_COMPILED = [(_compile(p), cls, why) for p, cls, why in RULES]


def _normal_key(key: str) -> str:
    return re.sub(r"\[\d+\]", "[]", key)


def classify(key: str) -> Tuple[str, str]:
    """(class, why) for a flattened lockfile key."""
    normal = _normal_key(key)
    for regex, cls, why in _COMPILED:
        if regex.match(normal):
            return cls, why
    return INFO, "not known to change results"


def group(key: str) -> Tuple[str, str]:
    """lock-diff group of a key: results, config, or the gate's class."""
    if key.startswith(RESULT_PREFIXES):
        return RESULTS, "outcome of the run"
    if key.split(".", 1)[0] in CONFIG_KEYS or key == "determinism.seed":
        return CONFIG, "what was trained"
    return classify(key)


MISSING = "(absent)"


def list_change(a: Any, b: Any) -> Optional[Tuple[List[Any], List[Any]]]:
    """(added, removed): the items of list b that list a lacks, and those of a that b lacks,
    repeats counted; None unless both are lists. A table cell cuts a long list (the ISA
    flags): this names what differs."""
    if not (isinstance(a, list) and isinstance(b, list)):
        return None
    added, removed = list(b), []
    for item in a:
        if item in added:
            added.remove(item)
        else:
            removed.append(item)
    return added, removed


@dataclass
class Difference:
    key: str
    a: Any
    b: Any
    group: str
    why: str

    @property
    def blocking(self) -> bool:
        return self.group == BLOCKING

    @property
    def change(self) -> Optional[Tuple[List[Any], List[Any]]]:
        return list_change(self.a, self.b)

    def to_json(self) -> Dict[str, Any]:
        """The fields; for two list values also `added` and `removed` (see list_change)."""
        data = asdict(self)
        if self.change is not None:
            data["added"], data["removed"] = self.change
        return data


def differences(a: Dict[str, Any], b: Dict[str, Any],
                grouper=group, ignore: Iterable[str] = ("lock_sha256", "run_id")
                ) -> List[Difference]:
    """Every flattened field whose value differs between lockfile-like dicts a and b."""
    flat_a, flat_b = flatten(a), flatten(b)
    skip = set(ignore)
    out = []
    for key in sorted(set(flat_a) | set(flat_b)):
        if key in skip:
            continue
        va, vb = flat_a.get(key, MISSING), flat_b.get(key, MISSING)
        if va != vb:
            cls, why = grouper(key)
            out.append(Difference(key, va, vb, cls, why))
    return out


def environment_of(lock: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a lockfile the gate compares."""
    return {k: lock[k] for k in ENVIRONMENT_SECTIONS + ("harness",) if k in lock}


def gate(lock: Dict[str, Any], current: Dict[str, Any],
         skip: Iterable[str] = ()) -> List[Difference]:
    """Differences between the locked environment and the current one, leaving out the
    `skip` sections (those the current capture cannot speak for). A locked image with no
    current one blocks."""
    locked = copy.deepcopy(environment_of(lock))
    here = copy.deepcopy(environment_of(current))
    for section in skip:
        locked.pop(section, None)
        here.pop(section, None)
    if "image" in locked and "image" not in here:
        here["image"] = {}
    locked.get("determinism", {}).pop("seed", None)  # older locks: the seed, a third time
    if "command" in (lock.get("config") or {}) and not \
            (locked.get("determinism") or {}).get("in_effect"):
        # A command run that pinned nothing inside its processes (command.inject=false, or
        # none imported torch) recorded nothing in effect there: nothing of it to compare.
        for side in (locked, here):
            (side.get("determinism") or {}).pop("in_effect", None)
    _unknown_sm_counts_are_not_differences(locked, here)
    found = machine_class_difference(lock, locked, here)
    _pinned_isa_decides(lock, locked, here)
    _same_image_id_decides(locked, here)
    return differences(locked, here, grouper=classify, ignore=()) + found


CLASS_KEY = "hardware.cpu.class"


def machine_class_difference(lock: Dict[str, Any], locked: Dict[str, Any],
                             here: Dict[str, Any]) -> List[Difference]:
    """The machine class, decided from evidence: the class fields (vendor, family, model
    number, model name) leave the field by field comparison, and a class difference becomes
    one row whose group the corpus decides (corpus.agreement) for the run's CPU mode:
    informational where the two classes were recorded to give the same bits, blocking where
    recorded to differ, unproven where no recording covers the pair. The ISA flags and the
    architecture stay compared as before (they are facts about kernels, not guesses)."""
    from harness.host import machine_class
    from harness.record import corpus

    cpus = [(side.get("hardware") or {}).get("cpu") for side in (locked, here)]
    if not all(isinstance(cpu, dict) for cpu in cpus):
        return []
    classes = [machine_class.cpu_class(cpu) for cpu in cpus]
    for cpu in cpus:
        for field in ("vendor", "family", "model_number", "model"):
            cpu.pop(field, None)
    if machine_class.same_class(*classes):
        return []
    mode = (((lock.get("config") or {}).get("determinism") or {}).get("cpu_isa")) or "native"
    names = [machine_class.class_id(c) for c in classes]
    device = str(((lock.get("config") or {}).get("trainer") or {}).get("device") or "cpu")
    if device.startswith("cuda"):  # the CPU recordings speak for CPU math only
        return [Difference(CLASS_KEY, names[0], names[1], INFO,
                           "a GPU run: the GPU fields decide (its CPU only feeds it)")]
    agree = corpus.agreement(classes[0], classes[1], mode)
    if agree is True:
        group, why = INFO, f"recorded: the same bits on both classes in cpu_isa={mode}"
    elif agree is False:
        group, why = BLOCKING, f"recorded: other bits on these classes in cpu_isa={mode}"
    else:
        group, why = UNPROVEN, (f"no recording of both classes in cpu_isa={mode} "
                                f"(make record-machine on each adds one)")
    return [Difference(CLASS_KEY, names[0], names[1], group, why)]


def _pinned_isa_decides(lock: Dict[str, Any], locked: Dict[str, Any],
                        here: Dict[str, Any]) -> None:
    """A run pinned to a CPU ISA (determinism.cpu_isa) ran the pinned kernels whatever else
    its CPU had: what decides is whether this CPU has the pinned ISA, not its flag list.
    (The capability torch reports stays compared under software.torch_cpu_capability.)"""
    from harness.training.determinism import CPU_ISA, cpu_supports

    pin = (((lock.get("config") or {}).get("determinism") or {}).get("cpu_isa")) or "native"
    cpus = [(side.get("hardware") or {}).get("cpu") for side in (locked, here)]
    if pin not in CPU_ISA or not all(isinstance(cpu, dict) for cpu in cpus):
        return
    flags = cpus[1].pop("isa_flags", None) or []
    cpus[0].pop("isa_flags", None)
    cpus[0]["supports_pinned_isa"] = True
    cpus[1]["supports_pinned_isa"] = cpu_supports(pin, flags)


def _same_image_id_decides(locked: Dict[str, Any], here: Dict[str, Any]) -> None:
    """The same image id on an engine with Docker's image store is the same config, which
    names every layer by its sha256: the same image, whatever its registry digest (which
    counts the layers' compression too, and is gone when a rebuilt image was never pushed)."""
    images = [side.get("image") or {} for side in (locked, here)]
    if images[0].get("id") and images[0].get("id") == images[1].get("id") and \
            all(image.get("image_store", "docker") == "docker" for image in images):
        for image in images:
            image.pop("repo_digest", None)


def _unknown_sm_counts_are_not_differences(locked: Dict[str, Any], here: Dict[str, Any]) -> None:
    """NVML does not report SM counts; torch does. A host whose own torch is a CPU build
    (the CUDA torch of a docker run is in the image) reads none: unknown is not different.
    Name, compute capability and MIG mode, which NVML reports, still decide; the replayed
    run records the SM count it ran on, and `harness lock diff` shows it."""
    locked_gpus = (locked.get("hardware") or {}).get("gpus") or []
    for mine, theirs in zip((here.get("hardware") or {}).get("gpus") or [], locked_gpus):
        if mine.get("sm_count") is None and "sm_count" in theirs:
            mine["sm_count"] = theirs["sm_count"]


# ---------------------------------------------------------------- rendering

def short(value: Any, width: int = 48) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _word(item: Any) -> str:
    text = item if isinstance(item, str) else repr(item)
    return text if text and not any(c.isspace() for c in text) else repr(item)


def render_change(added: List[Any], removed: List[Any]) -> str:
    """`+new -gone` (items of the second list, of the first), as for ISA flags."""
    words = [f"+{_word(x)}" for x in added] + [f"-{_word(x)}" for x in removed]
    return " ".join(words) or "same items, in another order"


def render(diffs: List[Difference], label_a: str = "locked", label_b: str = "current",
           with_why: bool = True) -> str:
    """The differences as a table; under a row of two lists, a line with the items that
    differ (`  current vs locked: +avx512f -sse4a`), which the cut cells may not show."""
    rows = [[d.key, short(d.a), short(d.b)] + ([d.why] if with_why else []) for d in diffs]
    header = ["field", label_a, label_b] + (["why it matters"] if with_why else [])
    lines = table(rows, header).split("\n")
    out = lines[:2]
    for diff, line in zip(diffs, lines[2:]):
        out.append(line)
        if diff.change is not None:
            out.append(f"  {label_b} vs {label_a}: {render_change(*diff.change)}")
    return "\n".join(out)


GROUP_ORDER = (BLOCKING, UNPROVEN, INFO, RESULTS, CONFIG)


def render_grouped(diffs: List[Difference], label_a: str, label_b: str) -> str:
    """lock diff output: one table per group, in GROUP_ORDER, empty groups said so."""
    parts = []
    for name in GROUP_ORDER:
        members = [d for d in diffs if d.group == name]
        title = {BLOCKING: "blocking for bitwise replay",
                 UNPROVEN: "unproven (no recording says whether these change the bits)",
                 INFO: "informational", RESULTS: "results", CONFIG: "config"}[name]
        if not members:
            parts.append(f"== {title}: none")
            continue
        parts.append(f"== {title} ({len(members)})\n" +
                     render(members, label_a, label_b,
                            with_why=name in (BLOCKING, UNPROVEN, INFO)))
    return "\n\n".join(parts)


def find(diffs: List[Difference], key: str) -> Optional[Difference]:
    return next((d for d in diffs if d.key == key), None)
