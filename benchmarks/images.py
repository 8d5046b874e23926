"""Image benchmark, per profile (cpu and cuda), side by side:

  * cold build: every layer built again (no build cache) from the pinned base and the
    wheelhouse already on the host, and rewritten reproducibly (harness/containers/oci.py), to a
    throwaway tag that is removed afterwards. Target: <= 1.5x the build before the
    rewrite (cpu 57.3 s, cuda 239.6 s on the development machines): cpu <= 86 s,
    cuda <= 359 s.
  * same id: whether `harness build` of the same tree, built again after the cold build,
    gives the cold build's image id (reproducible images).
  * image size (what `docker images` shows). Target for cuda: <= 6 GB.
  * cached build: `harness build --profile P` on an unchanged tree. Target: <= 2 s.
  * container start to first step: a short CPU run of the profile's image (the CUDA image
    too: it trains on the CPU where there is no GPU). Target for cuda: <= 5 s.

    .venv/bin/python benchmarks/images.py [--profiles cpu,cuda]
    .venv/bin/python benchmarks/images.py --quick   # smoke test: the cpu image, no cold build,
                                                    # nothing saved

Needs root and a Docker engine with the pinned base (make docker-env). Prints JSON and
merges it into benchmarks/results.json under "images".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import record
from container import compose, start_to_first_step


def cold_build(engine, profile_cfg: dict) -> dict:
    """Seconds for a build without cache, and the image's size; nothing is left behind."""
    from harness.containers import image

    ident = {**image.identity(profile_cfg)}
    ident["reference"] = f"harness/bench-cold-{profile_cfg['profile']}:{int(time.time())}"
    dangling = {i.id for i in engine.images.list(filters={"dangling": True})}
    image.ensure_wheelhouse(profile_cfg, out=io.StringIO())
    started = time.monotonic()
    built = image._build(engine, profile_cfg, ident, io.StringIO(), nocache=True)
    seconds = time.monotonic() - started
    size = engine.api.inspect_image(built.id)["Size"]
    engine.images.remove(ident["reference"], force=True)
    for leftover in engine.images.list(filters={"dangling": True}):
        if leftover.id not in dangling:  # this build's intermediate stage
            engine.images.remove(leftover.id, force=True)
    return {"cold_build_s": round(seconds, 1), "image_size_gb": round(size / 1e9, 2),
            "cold_build_id": built.id}


def cached_build_s(profile: str) -> Tuple[float, str]:
    """Median seconds of `harness build` on an unchanged tree, and the image id it finds."""
    command = [sys.executable, "-m", "harness", "build", "--profile", profile]
    first = subprocess.run(command, capture_output=True, text=True, check=True)  # builds if new
    samples = []
    for _ in range(3):
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        samples.append(time.monotonic() - started)
        assert "building" not in done.stderr, done.stderr
    return round(statistics.median(samples), 2), json.loads(first.stdout)["id"]


def first_step_s(engine, profile: str, repeats: int) -> float:
    from harness.backends.docker import DockerBackend
    from harness.training import datasets

    cfg = compose([f"image={profile}", "trainer.device=cpu", "trainer.max_steps=3",
                   "trainer.eval_limit=100"])
    data_root, data_files = datasets.prepare(cfg["data"])
    backend = DockerBackend(engine)
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        starts = [start_to_first_step(backend, cfg, data_root, data_files, Path(tmp) / "runs")
                  for _ in range(repeats)]
    return round(statistics.median(starts), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="cpu,cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: the cpu profile, no cold build, 1 repeat; "
                             "results.json untouched")
    args = parser.parse_args()
    if args.quick:
        args.profiles, args.repeats = "cpu", 1

    from harness.containers import image
    from harness.host import docker_engine

    engine = docker_engine.client()
    result = {"load_average_start": os.getloadavg()[0], "cpu_count": os.cpu_count()}
    for profile in args.profiles.split(","):
        profile_cfg = image.profile_config(profile)
        figures = {} if args.quick else cold_build(engine, profile_cfg)
        figures["cached_build_s"], found_id = cached_build_s(profile)
        if not args.quick:
            figures["same_id_twice"] = figures.pop("cold_build_id") == found_id
        figures["container_start_to_first_step_s"] = first_step_s(engine, profile, args.repeats)
        result[profile] = figures
        print(f"{profile}: {figures}", file=sys.stderr, flush=True)
    result["load_average_end"] = os.getloadavg()[0]
    if not args.quick:
        record.save("images", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
