"""The determinism settings that make a run repeatable bit for bit, with the reason for
each pin. (The run's seeds and random streams are in harness/training/seeding.py.)

Two halves: `pinned_environment` is computed by the launcher, because some settings only
take effect if they are in the environment before the interpreter or the CUDA context
starts; `apply` runs first thing inside the training process and `audit` reads back what is
actually in effect, so the lockfile records facts rather than intentions.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from harness.errors import EnvironmentProblem
from harness.training import portable_math

# determinism.cpu_isa: which CPU kernels torch, oneDNN and MKL may use. PyTorch picks its
# vector kernels by the CPU's ISA, and AVX-512 and AVX2 kernels round differently; pinning
# the ISA (as FastSurfer does) lets a run made on an AVX-512 machine replay bit for bit on
# any machine that has the pinned ISA. Each pin: the variables set before the interpreter
# starts, the capability torch must then report, and the CPU flags it needs.
CPU_ISA: Dict[str, Dict[str, Any]] = {
    "default": {"env": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                        "MKL_CBWR": "COMPATIBLE"},
                "capability": "DEFAULT", "needs": []},
    "avx2": {"env": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                     "MKL_CBWR": "AVX2"},
             "capability": "AVX2", "needs": ["avx2", "fma"]},
    "avx512": {"env": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                       "MKL_CBWR": "AVX512"},
               "capability": "AVX512", "needs": ["avx512f", "avx512bw", "avx512vl", "avx512dq"]},
    # portable: built for the same bits on any x86-64 CPU with AVX2 and FMA, Intel or AMD
    # (in its current form recorded end to end on one Intel class so far; docs/replay.md has
    # the measurements across vendors that shaped it). The avx2 pin is
    # not that: MKL honours MKL_CBWR=AVX2 on Intel CPUs only (elsewhere it runs its AUTO
    # branch), and oneDNN sizes its blocking by the caches it finds. So, op by op:
    # - ATen's own kernels at the AVX2 capability: the same code and the same IEEE
    #   operations (FMA included) on either vendor;
    # - MKL on its COMPATIBLE branch, which MKL documents as the one code path it runs on
    #   Intel and non-Intel CPUs alike (STRICT asks for thread-count independence where MKL
    #   offers it; the thread count is pinned in any case);
    # - oneDNN off (torch.backends.mkldnn.enabled=False, set in `apply`): convolutions run
    #   ATen's im2col + MKL gemm instead of kernels blocked per CPU;
    # - NNPACK off too (torch.backends.nnpack): with oneDNN off, torch runs a stride-1
    #   convolution of a batch of 16 or more in NNPACK, which blocks its sum over input
    #   channels by the L1 cache size (32 KB on AMD Zen 3 and 4, 48 KB on Intel Sapphire
    #   Rapids and AMD Zen 5), so the order of the additions follows the CPU. Off, the
    #   convolution is ATen's im2col + MKL gemm in both directions (and faster here).
    # - float32 square roots correctly rounded in ATen's kernels (portable_math.py): torch.sqrt
    #   runs in MKL's vector math, whose COMPATIBLE branch gave other bits on an Intel Xeon
    #   than on an AMD EPYC for Adam's denominator (measured 2026-12-08). The other vector
    #   math ops that no measurement shows alike stop the run (portable.py).
    "portable": {"env": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                         "MKL_CBWR": "COMPATIBLE,STRICT"},
                 "capability": "AVX2", "needs": ["avx2", "fma"], "mkldnn": False,
                 "nnpack": False, "sqrt": portable_math.NAME},
}
CPU_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def cpu_supports(pin: str, flags) -> bool:
    """Whether a CPU with these ISA flags can run the kernels of pin `pin`."""
    return set(CPU_ISA[pin]["needs"]) <= set(flags)


def cpu_pin(det: Dict[str, Any]) -> Dict[str, Any]:
    """The CPU_ISA entry of a determinism section's cpu_isa (native: none, {})."""
    return CPU_ISA.get(det.get("cpu_isa") or "native", {})


def pinned_environment(det: Dict[str, Any]) -> Dict[str, str]:
    """Variables the training process must start with."""
    threads = str(det["threads"])
    isa = cpu_pin(det).get("env", {})
    return {**isa,
        # Python's str/bytes hashing is salted per process unless this is fixed: set and
        # dict iteration orders (and anything built from them) would change between runs.
        # determinism.pythonhashseed=null leaves it unpinned on purpose ("random").
        "PYTHONHASHSEED": "random" if det["pythonhashseed"] is None else str(det["pythonhashseed"]),
        # cuBLAS picks reduction strategies by workspace; a fixed config makes its results
        # deterministic (required by use_deterministic_algorithms on CUDA >= 10.2).
        "CUBLAS_WORKSPACE_CONFIG": det["cublas_workspace_config"],
        # CPU results change with the number of threads (reduction order): pin them.
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }


def apply(det: Dict[str, Any]) -> None:
    """Apply the determinism mode and thread counts inside the training process."""
    import torch

    mode = det["mode"]
    torch.set_num_threads(det["threads"])
    pin = cpu_pin(det)
    if pin.get("mkldnn") is False:
        torch.backends.mkldnn.enabled = False  # cpu_isa=portable: see CPU_ISA
    if pin.get("nnpack") is False:
        torch.backends.nnpack.set_flags(False)  # cpu_isa=portable: see CPU_ISA
    if pin.get("sqrt") == portable_math.NAME:
        portable_math.install()  # cpu_isa=portable: see CPU_ISA
    # Inter-op parallelism reorders independent ops; one thread keeps the order fixed.
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process (only possible when called twice)
    if mode == "off":
        use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True  # autotuning picks kernels by timing
        return
    # strict: a nondeterministic op raises; warn: it only warns.
    use_deterministic_algorithms(True, warn_only=(mode == "warn"))
    # cuDNN: only deterministic convolution algorithms, and no timing-based selection.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # TF32 rounds float32 matmuls/convolutions to 10 mantissa bits on Ampere and newer:
    # off, so results match full float32 and do not depend on the GPU generation.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def use_deterministic_algorithms(enabled: bool, warn_only: bool = False) -> None:
    """torch.use_deterministic_algorithms, without its import of the compiler. The public
    call imports torch._inductor (and with it torch._dynamo) to set the compiler's copy of
    the flag: 1.3 s, most of the start of `harness replay`'s environment capture, which
    never compiles. The compiler reads its copy from TORCHINDUCTOR_DETERMINISTIC when it is
    first imported, so that variable is set instead; where the compiler is imported
    already, or torch lacks the private setter, the public call does it."""
    import sys

    import torch

    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        return
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1" if enabled else "0"
    setter(enabled, warn_only=warn_only)


def audit() -> Dict[str, Any]:
    """What is in effect right now, read back from torch and the environment."""
    import torch

    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        # Only where switched off: a run that never touched it records what it always did.
        **({} if torch.backends.mkldnn.enabled else {"mkldnn_enabled": False}),
        # torch.backends.nnpack has a setter only; its getter is the one it reads itself.
        **({} if torch._C._get_nnpack_enabled() else {"nnpack_enabled": False}),
        **({"sqrt_kernel": portable_math.NAME} if portable_math.installed() else {}),
        "env": {**{name: os.environ.get(name) for name in
                   ("PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS",
                    "MKL_NUM_THREADS")},
                # The CPU ISA pins only where set: a native run records what it always did.
                **{name: os.environ[name] for name in CPU_ISA_VARIABLES if name in os.environ}},
    }


def expected_audit(det: Dict[str, Any]) -> Dict[str, Any]:
    """The subset of `audit()` that the configured mode promises."""
    expected: Dict[str, Any] = {
        "torch_num_threads": det["threads"],
        "torch_num_interop_threads": 1,
        "env": pinned_environment(det),
    }
    pin = cpu_pin(det)
    for library in ("mkldnn", "nnpack"):
        if pin.get(library) is False:
            expected[f"{library}_enabled"] = False
    if pin.get("sqrt"):
        expected["sqrt_kernel"] = pin["sqrt"]
    if det["mode"] != "off":
        expected.update({
            "deterministic_algorithms": True,
            "deterministic_warn_only": det["mode"] == "warn",
            "cudnn_deterministic": True,
            "cudnn_benchmark": False,
            "cuda_matmul_allow_tf32": False,
            "cudnn_allow_tf32": False,
            "float32_matmul_precision": "highest",
        })
    return expected


def check(det: Dict[str, Any], actual: Dict[str, Any]) -> None:
    """Fail loudly when something the config promises is not in effect."""
    wrong = []
    for key, want in expected_audit(det).items():
        have = actual.get(key)
        if key == "env":
            wrong += [f"env {name}={have.get(name)!r}, expected {value!r}"
                      for name, value in want.items() if have.get(name) != value]
        elif have != want:
            wrong.append(f"{key}={have!r}, expected {want!r}")
    pin = det.get("cpu_isa") or "native"
    if pin != "native":
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        if capability != CPU_ISA[pin]["capability"]:
            wrong.append(f"torch CPU capability {capability}, expected "
                         f"{CPU_ISA[pin]['capability']} (determinism.cpu_isa={pin}: this CPU "
                         f"needs {', '.join(CPU_ISA[pin]['needs'])})")
    if wrong:
        raise EnvironmentProblem(
            "determinism settings are not in effect: " + "; ".join(wrong) +
            ". Launch training through `harness train` (it sets these before the interpreter "
            "starts) rather than running the training module directly.")
