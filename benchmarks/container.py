"""Container benchmark (backend=docker, cpu image):

  * steady-state training steps/s inside the sandboxed training container (no network,
    read-only root, non-root, no capabilities) vs the same steps run bare in the same image
    (its file system exported and entered with chroot: same interpreter, same wheels, no
    namespaces or cgroups), in interleaved pairs: the median of the pair ratios, with their
    spread. Target: ratio >= 0.97.
  * container start to first training step: from the backend's create+start to the first
    optimizer step of `harness.train` (lockfile first_step_unix). Target: < 4 s.
  * cached build: `harness build` on an unchanged tree (the image is found by its content
    hash). Target: < 2 s.

    .venv/bin/python benchmarks/container.py [--steps 60] [--warmup 10] [--repeats 5]
    .venv/bin/python benchmarks/container.py --quick    # smoke test, nothing saved

Needs root (chroot) and a Docker engine with the pinned base (make docker-env). Prints JSON
and merges it into benchmarks/results.json under "container" (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record
from spread import interleave, paired_ratios, summary

# The same steps in both places: the harness's own data order, seeding and model, timed
# after a warm-up. argv: data root, warm-up steps, timed steps.
STEPS = r"""
import json, sys, time, torch
from hydra.utils import instantiate
from harness import config
from harness.training import determinism, seeding
from harness.training.loop import EpochShards, epoch_loader
cfg = config.validate(json.loads(sys.argv[4]))
determinism.apply(cfg["determinism"]); seeding.seed_everything(cfg["seed"])
dataset = instantiate(cfg["data"]["dataset"], split="train", root=sys.argv[1])
model = instantiate(cfg["model"])
optimizer = instantiate(cfg["optim"], params=model.parameters())
warmup, steps = int(sys.argv[2]), int(sys.argv[3])
step = 0
shards = EpochShards(len(dataset), cfg["seed"], 0, cfg["trainer"]["batch_size"])
for images, labels in epoch_loader(dataset, cfg, 0, shards):
    if step == warmup:
        start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward(); optimizer.step()
    step += 1
    if step == warmup + steps:
        break
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start),
                  "threads": torch.get_num_threads()}))
"""


def compose(overrides):
    from harness.commands import choices

    return choices.compose("fashion_mnist", ["backend=docker", *overrides])


def in_container(engine, reference, cfg, data_root, run_dir, env, args) -> dict:
    """The steps in a container with exactly the training sandbox (container_options)."""
    from harness import config
    from harness.backends.docker import DATA_MOUNT, container_options

    options = container_options(config.typed(cfg), run_dir, data_root, env)
    options["command"] = ["python", "-c", STEPS, DATA_MOUNT, str(args.warmup), str(args.steps),
                          json.dumps(cfg)]
    container = engine.containers.create(reference, **options)
    try:
        container.start()
        code = container.wait()["StatusCode"]
        output = container.logs().decode()
    finally:
        container.remove(force=True)
    if code != 0:
        raise SystemExit(f"container benchmark failed ({code}):\n{output}")
    return json.loads(output.strip().splitlines()[-1])


def bare(rootfs: Path, cfg, data_root, env, args) -> dict:
    """The same steps in the same image's files, without a container (chroot, own mount
    namespace for /proc, /sys, /dev and the dataset)."""
    data_in = rootfs / "harness-data"
    data_in.mkdir(exist_ok=True)
    script = (f"mount --bind /proc {rootfs}/proc && mount --bind /sys {rootfs}/sys && "
              f"mount --bind /dev {rootfs}/dev && mount --bind {data_root} {data_in} && "
              f"exec chroot --userspec=10001:10001 {rootfs} /usr/bin/env -i "
              + " ".join(f"{k}={v}" for k, v in {
                  **env, "PATH": "/opt/venv/bin:/usr/bin:/bin", "HOME": "/tmp",
                  "PYTHONPATH": "/opt/harness/src", "LANG": "C.UTF-8"}.items())
              + " python -c \"$0\" /harness-data "
              + f"{args.warmup} {args.steps} '{json.dumps(cfg)}'")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, STEPS], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"bare benchmark failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_to_first_step(backend, cfg, data_root, data_files, runs: Path) -> float:
    """Backend launch (container create + start) to the first optimizer step."""
    from harness import backends, config, rundir
    from harness.commands import train
    from harness.training.determinism import pinned_environment

    facts = backend.lock_facts(config.typed(cfg))
    run_dir = rundir.create(runs, cfg["name"])
    host_facts = train.prepare(run_dir, cfg, [], backend.name, data_root, data_files,
                               time.time(), facts)
    rundir.write_status(run_dir, "running", backend=backend.name)
    started = time.time()
    handle = backend.launch(backends.LaunchSpec(
        run_dir=run_dir, conf=config.typed(cfg), lock=host_facts,
        env=pinned_environment(cfg["determinism"]), data_root=data_root))
    with open(os.devnull, "w") as sink:
        saved, sys.stdout = sys.stdout, sink
        try:
            code = handle.wait()
        finally:
            sys.stdout = saved
    if code != 0:
        raise SystemExit(f"training container failed ({code}); see {run_dir}/train.log")
    lock = json.loads((run_dir / rundir.LOCK).read_text())
    return lock["timing"]["first_step_unix"] - started


def cached_build_s() -> float:
    command = [sys.executable, "-m", "harness", "build"]
    subprocess.run(command, capture_output=True, check=True)  # builds if the tree changed
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    elapsed = time.time() - started
    assert "building" not in done.stderr, done.stderr
    return elapsed


def export_rootfs(engine, image_id: str, rootfs: Path) -> None:
    """The image's files, unpacked into `rootfs` (to run the same bits without a container)."""
    rootfs.mkdir()
    exporter = engine.containers.create(image_id, command=["true"])
    try:
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-x"], stdin=subprocess.PIPE)
        for chunk in exporter.export():
            tar.stdin.write(chunk)
        tar.stdin.close()
        tar.wait()
    finally:
        exporter.remove(force=True)


def throughput(engine, image_id: str, cfg, data_root, env, args, tmp: Path) -> dict:
    """Steps per second in the container and from the same image's files without one,
    interleaved pairs."""
    export_rootfs(engine, image_id, tmp / "rootfs")
    run_dir = tmp / "bench-run"
    run_dir.mkdir()
    os.chown(run_dir, 10001, 10001)
    boxed, plain = interleave(
        lambda: in_container(engine, image_id, cfg, data_root, run_dir, env, args),
        lambda: bare(tmp / "rootfs", cfg, data_root, env, args), args.repeats)
    ratio = summary(paired_ratios([r["steps_per_s"] for r in boxed],
                                  [r["steps_per_s"] for r in plain]), 3)
    return {
        "container_steps_per_s": round(statistics.median(r["steps_per_s"] for r in boxed), 3),
        "bare_same_image_steps_per_s": round(
            statistics.median(r["steps_per_s"] for r in plain), 3),
        "container_vs_bare_ratio": ratio["median"],
        "container_vs_bare_ratio_spread": ratio,
        "container_steps_per_s_all": [round(r["steps_per_s"], 3) for r in boxed],
        "bare_steps_per_s_all": [round(r["steps_per_s"], 3) for r in plain],
        "threads": boxed[0]["threads"],
    }


def start_times(engine, cfg, data_root, data_files, repeats: int, tmp: Path) -> dict:
    """Launch to first step with the docker backend and, for scale, the local one (most of
    either is `import torch` and reading the dataset, not the container)."""
    from harness.backends.docker import DockerBackend
    from harness.backends.local import LocalBackend

    local_cfg = {**cfg, "backend": {**cfg["backend"], "name": "local"}}
    result = {}
    for name, backend, run_cfg in (("container", DockerBackend(engine), cfg),
                                   ("local", LocalBackend(), local_cfg)):
        starts = [start_to_first_step(backend, run_cfg, data_root, data_files, tmp / "runs")
                  for _ in range(repeats)]
        result[f"{name}_start_to_first_step_s"] = round(statistics.median(starts), 3)
        result[f"{name}_start_to_first_step_s_all"] = [round(t, 3) for t in starts]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs (and samples)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 5 steps, 2 pairs; results.json untouched")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 5, 2, 2

    from harness.containers import image
    from harness.host import docker_engine
    from harness.training import datasets
    from harness.training.determinism import pinned_environment

    cfg = compose([f"trainer.max_steps={args.warmup + 2}", "trainer.eval_limit=100"])
    data_root, data_files = datasets.prepare(cfg["data"])
    engine = docker_engine.client()
    built = image.build(cfg["image"], engine=engine)
    env = pinned_environment(cfg["determinism"])
    result = {"image": built["reference"], "image_id": built["id"],
              "load_average_start": os.getloadavg()[0], "cpu_count": os.cpu_count(),
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}

    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        tmp = Path(tmp)
        result.update(throughput(engine, built["id"], cfg, data_root, env, args, tmp))
        result.update(start_times(engine, cfg, data_root, data_files, args.repeats, tmp))
    builds = [cached_build_s() for _ in range(args.repeats)]
    result["cached_build_s"] = round(statistics.median(builds), 3)
    result["cached_build_s_all"] = [round(b, 3) for b in builds]
    result["load_average_end"] = os.getloadavg()[0]
    result["targets"] = {"container_vs_bare_ratio": ">= 0.97",
                         "container_start_to_first_step_s": "< 4",
                         "cached_build_s": "< 2"}

    if not args.quick:
        record.save("container", result)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
