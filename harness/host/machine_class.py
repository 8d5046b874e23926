"""The machine class: the CPU facts that decide which math kernels run, and so which bits a
run gives.

Measured, not assumed (docs/replay.md, "Machine classes"): every CPU pin gives other bits
on Intel and on AMD, because MKL honours `MKL_CBWR=AVX2` only on Intel CPUs (elsewhere it
runs its AUTO branch) and oneDNN sizes its blocking by the caches it finds. So two machines
are of one class only when vendor, family, model number and math ISA flags all agree; only
then may golden bits recorded on one be expected on the other. A class pair that differs
is proven equal in a CPU mode only by a recording of both (harness/record/corpus.py).

No torch here: the launcher, the gate and the tests read classes without it.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

# CPU features that decide which math kernels (and so which rounding) a library selects.
MATH_ISA_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw",
    "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
    "amx_bf16", "asimd", "sve", "sve2",
)

# /proc/cpuinfo's vendor_id, as a short lower-case name.
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "hygon"}

# The fields of hardware.cpu that make up a class (the lockfile's names).
CLASS_FIELDS = ("architecture", "vendor", "family", "model_number", "isa_flags")


def read_cpuinfo(text: Optional[str] = None) -> Dict[str, Any]:
    """The first processor's name, vendor, family, model number and math ISA flags, from
    /proc/cpuinfo (or `text`). Fields the kernel does not report are None."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    seen: Dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if not key and seen:
            break  # the end of the first processor's block
        seen.setdefault(key, value.strip())
    flags = set((seen.get("flags") or seen.get("Features") or "").split())
    return {
        "model": seen.get("model name") or seen.get("Model") or platform.processor() or None,
        "vendor": VENDORS.get(seen.get("vendor_id", ""), seen.get("vendor_id") or None),
        "family": _number(seen.get("cpu family")),
        "model_number": _number(seen.get("model")),
        "architecture": platform.machine(),
        "isa_flags": sorted(flags.intersection(MATH_ISA_FLAGS)),
    }


def _number(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def cpu_class(cpu: Dict[str, Any]) -> Dict[str, Any]:
    """The class facts of a lockfile's `hardware.cpu`. Locks written before the vendor was
    recorded name it only in the model string ("AMD EPYC"): the vendor is read from there,
    and family and model number stay unknown (None)."""
    facts = {field: cpu.get(field) for field in CLASS_FIELDS}
    if not facts["vendor"]:
        name = (cpu.get("model") or "").lower()
        facts["vendor"] = next((short for short in ("intel", "amd") if short in name), None)
    facts["isa_flags"] = sorted(facts["isa_flags"] or [])
    return facts


# Fields an older lock may not know (None): they count only where both sides know them.
MAYBE_UNKNOWN = ("vendor", "family", "model_number")


def same_class(a: Dict[str, Any], b: Dict[str, Any], exact: bool = False) -> bool:
    """Whether two class facts (cpu_class) are one class: every field equal, where vendor,
    family and model number count only when both sides know them (an older lock's
    recording), unless `exact` (recording a class: an unknown is not a match)."""
    for field in CLASS_FIELDS:
        known = a.get(field) is not None and b.get(field) is not None
        if field in MAYBE_UNKNOWN and not known and not exact:
            continue
        if a.get(field) != b.get(field):
            return False
    return True


def top_isa(flags: Iterable[str]) -> str:
    flags = set(flags)
    for name, needs in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2"),
                        ("avx", "avx"), ("sve", "sve"), ("asimd", "asimd")):
        if needs in flags:
            return name
    return "baseline"


def class_id(facts: Dict[str, Any]) -> str:
    """A readable name of a class, e.g. `amd-f25-m1-avx2` (`intel-avx512` where family and
    model number are unknown). A label, not the identity: same_class decides."""
    parts = [facts.get("vendor") or facts.get("architecture") or "unknown"]
    if facts.get("family") is not None:
        parts.append(f"f{facts['family']}")
    if facts.get("model_number") is not None:
        parts.append(f"m{facts['model_number']}")
    parts.append(top_isa(facts.get("isa_flags") or []))
    return "-".join(parts)


def this_machine() -> Dict[str, Any]:
    """The class facts of the CPU this process runs on."""
    return cpu_class(read_cpuinfo())
