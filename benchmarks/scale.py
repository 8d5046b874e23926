"""The harness's own costs as models and datasets grow, each against its bare counterpart
measured in the same process (ratios, so a busy machine's noise mostly cancels):

models (four square linear layers of N million parameters in all, Adam; N = 1, 10, 50, 120,
350), each the median of interleaved pairs:
  checkpoint_save      checkpoint.save / torch.save of the same state (model, Adam's
                       moments), both to disk with fsync
  checkpoint_load      checkpoint.load (the checksum verified while reading) / torch.load
  fingerprint_step     one parameter fingerprint (what metrics.jsonl records every
                       trainer.fingerprint_every steps) / one training step (forward,
                       backward, Adam; batch 8); per_step_default: the same divided by the
                       default interval (100)
  peak_rss_gb          this process's peak RSS once the size was measured

data (files written here; the hash cache in a temporary XDG_CACHE_HOME):
  full_pass            hashing every byte (HARNESS_REHASH=1, what `harness data verify`
                       does) / reading the same bytes, both from the disk (the page cache
                       emptied before each, as root; from memory otherwise: from_disk)
  launch_s             hashing an unchanged input again, as every launch, replay and resume
                       does: seconds (goal <= 1 s, whatever the size)
  for one file of 1 and 10 GB, and for a directory of 1 million small files

    .venv/bin/python benchmarks/scale.py [--models 1,10,50,120,350] [--data-gb 1,10]
                                         [--files 1000000] [--dir DIR]
    .venv/bin/python benchmarks/scale.py --quick     # smoke test: 1 M, 10 MB, 1000 files
    .venv/bin/python benchmarks/scale.py --models none --data-gb none   # the files alone

`none` leaves a part out and keeps its recorded figures (each part records the machine
class it ran on). Prints JSON, merges it into benchmarks/results.json under "scale" (not
with --quick), and
draws the curves in benchmarks/scale.png. Needs about 7 GB of memory at 350 M parameters
and --data-gb plus the small files of free disk in --dir (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import record
from spread import interleave, summary

from harness.host import machine_class

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEFAULT_FINGERPRINT_EVERY = 100


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# ---------------------------------------------------------------- models

def model_costs(millions: int, tmp: Path, pairs: int) -> dict:
    import torch

    from harness.digest import tensor_digests
    from harness.training import checkpoint

    torch.manual_seed(0)
    width = int((millions * 1e6 / 4) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(4)])
    optimizer = torch.optim.Adam(model.parameters())
    batch = torch.randn(8, width)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(batch).square().mean().backward()
        optimizer.step()

    step()  # Adam's moments exist from here on
    state = {"step": 1, "epoch": 0, "position": 0, "config_sha256": "0" * 64,
             "environment_sha256": "0" * 64, "environment": {}, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": None, "rng": None,
             "resumes": []}
    run_dir, bare_path = tmp / f"run-{millions}", tmp / "bare.pt"
    run_dir.mkdir()

    def bare_save():
        with open(bare_path, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())

    saves, bares = interleave(lambda: timed(lambda: checkpoint.save(run_dir, state, keep=1)),
                              lambda: timed(bare_save), pairs)
    saved = checkpoint.listed(run_dir)[-1]
    loads, bare_loads = interleave(
        lambda: timed(lambda: checkpoint.load(saved)),
        lambda: timed(lambda: torch.load(bare_path, map_location="cpu", weights_only=True)),
        pairs)
    steps, prints = interleave(lambda: timed(step),
                               lambda: timed(lambda: tensor_digests(model.state_dict())),
                               pairs + 1)
    fingerprint = summary([p / s for p, s in zip(prints, steps)])
    out = {"parameters": sum(p.numel() for p in model.parameters()),
           "state_gb": round(bare_path.stat().st_size / 1e9, 3),
           "torch_save_s": round(statistics.median(bares), 3),
           "checkpoint_save": summary([s / b for s, b in zip(saves, bares)]),
           "torch_load_s": round(statistics.median(bare_loads), 3),
           "checkpoint_load": summary([a / b for a, b in zip(loads, bare_loads)]),
           "step_s": round(statistics.median(steps), 4),
           "fingerprint_s": round(statistics.median(prints), 4),
           "fingerprint_step": fingerprint,
           "fingerprint_per_step_default": round(fingerprint["median"]
                                                 / DEFAULT_FINGERPRINT_EVERY, 5)}
    shutil.rmtree(run_dir)
    bare_path.unlink()
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# ---------------------------------------------------------------- data

def write_large(path: Path, gigabytes: float) -> None:
    block = os.urandom(64 << 20)
    left = int(gigabytes * 1e9)
    with open(path, "wb") as handle:
        while left > 0:
            handle.write(block[:left])
            left -= len(block)


def write_small(directory: Path, count: int) -> None:
    """`count` files of 100 to 4000 bytes, 1000 to a subdirectory (a dataset of images)."""
    payload = os.urandom(4096)
    for index in range(count):
        folder = directory / f"{index // 1000:05d}"
        if index % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"{index:07d}.bin").write_bytes(payload[:100 + (index * 37) % 3900])


def read_all(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            while handle.read(1 << 20):
                pass


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that a read comes from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def data_costs(path: Path) -> dict:
    """Reading the bytes and a full hash pass, each from a cold page cache where this
    process may empty it (root), else both from memory; then the launch's re-check."""
    from harness.script import files

    def full_pass():
        os.environ["HARNESS_REHASH"] = "1"
        try:
            files.hash_input(path)
        finally:
            os.environ.pop("HARNESS_REHASH")

    cold = drop_page_cache()
    if not cold:
        read_all(path)  # both measured from memory
    read_s = timed(lambda: read_all(path))
    drop_page_cache()
    hashed_s = timed(full_pass)
    time.sleep(2.1)  # the cache remembers no file changed within its last 2 s (FRESH_S)
    full_pass()
    launches = [timed(lambda: files.hash_input(path)) for _ in range(3)]
    return {"from_disk": cold, "read_s": round(read_s, 3), "full_pass_s": round(hashed_s, 3),
            "full_pass": round(hashed_s / read_s, 2),
            "launch_s": round(statistics.median(launches), 3)}


# ---------------------------------------------------------------- curves

def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    sizes = [models[k]["parameters"] / 1e6 for k in models]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, key in (("checkpoint.save / torch.save", "checkpoint_save"),
                       ("checkpoint.load / torch.load", "checkpoint_load")):
        left.plot(sizes, [models[k][key]["median"] for k in models], "o-", label=label)
    left.plot(sizes, [100 * models[k]["fingerprint_per_step_default"] for k in models], "s-",
              label="fingerprint per step, % of a step")
    left.axhline(1.1, color="grey", linestyle=":", label="goal 1.1x")
    left.set(xscale="log", xlabel="parameters (millions)", ylabel="ratio",
             title="model size")
    left.legend(fontsize=8)
    data = result["data"]
    names = list(data)
    right.bar([f"{n}\nlaunch s" for n in names], [data[n]["launch_s"] for n in names])
    right.bar([f"{n}\nfull pass x" for n in names], [data[n]["full_pass"] for n in names])
    right.axhline(1.0, color="grey", linestyle=":", label="1 s / 1x")
    right.set(title="data size", ylabel="seconds (launch), ratio (full pass)")
    right.tick_params(axis="x", labelsize=7)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1,10,50,120,350", help="millions of parameters")
    parser.add_argument("--data-gb", default="1,10", help="sizes of the single large files")
    parser.add_argument("--files", type=int, default=1_000_000,
                        help="small files in a dir (0: keep the recorded figures)")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved pairs per ratio")
    parser.add_argument("--dir", type=Path, default=None, help="where the data is written")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 M parameters, 10 MB, 1000 files; nothing saved")
    args = parser.parse_args()
    if args.quick:
        args.models, args.data_gb, args.files, args.pairs = "1", "0.01", 1000, 1
    return args


def main() -> None:
    args = arguments()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    result = {"load_avg_1m_start": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
              "models": {}, "data": {}}
    kept = {} if args.quick else json.loads(record.RESULTS.read_text()).get("scale", {})
    here = machine_class.class_id(machine_class.this_machine())
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="harness-scale-") as tmp:
        tmp = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
        if args.models == "none":
            result["models"] = kept.get("models", {})
        for millions in [] if args.models == "none" else [int(m) for m in args.models.split(",")]:
            print(f"scale: {millions} M parameters ...", file=sys.stderr, flush=True)
            result["models"][f"{millions}M"] = {**model_costs(millions, tmp, args.pairs),
                                                "machine_class": here}
        if args.data_gb == "none":
            result["data"] = {k: v for k, v in kept.get("data", {}).items() if "GB" in k}
        for gigabytes in [] if args.data_gb == "none" else \
                [float(g) for g in args.data_gb.split(",")]:
            print(f"scale: one file of {gigabytes:g} GB ...", file=sys.stderr, flush=True)
            path = tmp / f"data-{gigabytes:g}GB.bin"
            write_large(path, gigabytes)
            result["data"][f"{gigabytes:g}GB"] = {**data_costs(path), "machine_class": here}
            path.unlink()
        if args.files == 0:
            result["data"].update({k: v for k, v in kept.get("data", {}).items()
                                   if k.endswith("files")})
        else:
            print(f"scale: {args.files} small files ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            write_small(tmp / "small", args.files)
            written_s = round(time.perf_counter() - started, 1)
            result["data"][f"{args.files}files"] = {
                **data_costs(tmp / "small"), "written_s": written_s, "machine_class": here}
    # The largest model sets the peak: kept with the models when they are left out.
    result["peak_rss_gb"] = kept.get("peak_rss_gb") if args.models == "none" else peak_rss_gb()
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if not args.quick:
        draw(result, HERE / "scale.png")
        record.save("scale", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
