"""What checkpoints cost, for the default model (conf/model/cnn.yaml, Adam, one-cycle LR):

  checkpoint_write_s        writing one complete checkpoint (atomic, fsync'd), median of 5
                            (target < 0.2 s)
  overhead_fraction         that write once per trainer.checkpoint_every steps, as a fraction
                            of the training time of those steps (target < 2 %)
  resume_to_first_step_s    `harness train --resume RUN` started -> first new optimizer step
                            in metrics.jsonl, on Fashion-MNIST (target < 5 s)
  scale                     checkpoint.save / torch.save of the same state at 1, 10, 50 and
                            120 M parameters (with Adam's state), median of interleaved pairs
                            (target <= 1.1), on disk; scale_in_memory: the same on tmpfs;
                            async_stall: what trainer.checkpoint_async stops the loop for
                            (the copy of the state), over torch.save

Run: .venv/bin/python benchmarks/checkpoint_cost.py   (prints JSON)
     .venv/bin/python benchmarks/checkpoint_cost.py --quick   (smoke test: 1 M parameters, 1 pair)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_cost(tmp: Path) -> dict:
    import torch
    from hydra.utils import instantiate

    from harness import config
    from harness.commands import choices
    from harness.training import checkpoint, determinism, seeding

    cfg = choices.compose("fashion_mnist", [], config.BUILTIN_CONFIG_DIR)
    determinism.apply(cfg["determinism"])
    seeding.seed_everything(0)
    model = instantiate(cfg["model"])
    optimizer = instantiate(cfg["optim"], params=model.parameters())
    scheduler = instantiate(cfg["scheduler"], optimizer=optimizer, total_steps=10_000)
    batch = cfg["trainer"]["batch_size"]
    images, labels = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        scheduler.step()

    for _ in range(3):
        step()
    step_times = []
    for _ in range(20):
        started = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - started)
    facts = checkpoint.environment_facts(determinism.audit(), "cpu")
    run_dir = tmp / "run"
    run_dir.mkdir()
    writes = []
    for i in range(5):
        started = time.perf_counter()
        path = checkpoint.save(run_dir, {
            "step": i + 1, "epoch": 0, "position": (i + 1) * batch, "config_sha256": "0" * 64,
            "environment_sha256": checkpoint.facts_sha256(facts), "environment": facts,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": seeding.rng_state(), "resumes": []})
        writes.append(time.perf_counter() - started)
    started = time.perf_counter()
    checkpoint.load(path)
    load_s = time.perf_counter() - started
    interval = cfg["trainer"]["checkpoint_every"]
    step_s = statistics.median(step_times)
    write_s = statistics.median(writes)
    return {
        "checkpoint_write_s": round(write_s, 4),
        "checkpoint_load_s": round(load_s, 4),
        "checkpoint_bytes": path.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_step_s": round(step_s, 4),
        "checkpoint_every": interval,
        "overhead_fraction": round(write_s / (write_s + interval * step_s), 5),
    }


def scale_cost(tmp: Path, sizes=(1, 10, 50, 120), pairs: int = 4) -> dict:
    """checkpoint.save against torch.save of the same state (four square linear layers of
    N million parameters in all, with Adam's two moments: 3N floats), each pair back to
    back, the order alternating. Both write to the same disk with fsync, so the ratio is
    the harness's own cost: its checksum, hashed while writing. Peak RSS of this process
    is given for the largest size (the state itself is 12 N bytes)."""
    import resource

    out = {f"{millions}M": _save_pair(millions, tmp, pairs) for millions in sizes}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _save_pair(millions: int, tmp: Path, pairs: int) -> dict:
    """checkpoint.save against torch.save of one size's state (scale_cost)."""
    import torch
    from spread import interleave, summary

    from harness.training import checkpoint

    width = int((millions * 1e6 / 4) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                  for _ in range(4)])
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    state = {"step": 1, "epoch": 0, "position": 0, "config_sha256": "0" * 64,
             "environment_sha256": "0" * 64, "environment": {},
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": None, "rng": None, "resumes": []}
    run_dir = tmp / f"scale-{millions}"
    run_dir.mkdir()

    def bare():
        started = time.perf_counter()
        with open(tmp / "bare.pt", "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return time.perf_counter() - started

    def harness_save():
        started = time.perf_counter()
        checkpoint.save(run_dir, state, keep=1)
        return time.perf_counter() - started

    background = checkpoint.BackgroundSaver(run_dir, keep=1)

    def async_stall():
        """What trainer.checkpoint_async stops the loop for: the copy off the tensors. The
        write that follows runs beside the loop, and is waited for outside the timing."""
        started = time.perf_counter()
        background.save(state)
        stalled = time.perf_counter() - started
        background.wait()
        return stalled

    saves, bares = interleave(harness_save, bare, pairs)
    stalls, stall_bares = interleave(async_stall, bare, pairs)
    figures = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_bytes": (tmp / "bare.pt").stat().st_size,
        "torch_save_s": round(statistics.median(bares), 3),
        "checkpoint_save_s": round(statistics.median(saves), 3),
        "save_over_torch_save": summary([s / b for s, b in zip(saves, bares)]),
        "async_stall_s": round(statistics.median(stalls), 3),
        "async_stall_over_torch_save": summary([s / b for s, b in zip(stalls, stall_bares)])}
    (tmp / "bare.pt").unlink()
    shutil.rmtree(run_dir)
    return figures


def resume_cost(tmp: Path) -> dict:
    """Interrupt a real run with SIGTERM, then time the resume to its first new step."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
    runs = tmp / "runs"
    args = ["fashion_mnist", "backend=local", "trainer.max_steps=40", "trainer.checkpoint_every=5",
            "trainer.eval_limit=200", "--runs-dir", str(runs)]
    process = subprocess.Popen([sys.executable, "-m", "harness", "train", *args], env=env,
                               cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        found = list(runs.glob("*/metrics.jsonl")) if runs.exists() else []
        if found and found[0].read_text().count("\n") >= 7:
            os.killpg(process.pid, signal.SIGTERM)
            break
        if process.poll() is not None:
            raise SystemExit(f"training ended early: {process.stderr.read()}")
        time.sleep(0.01)
    process.wait(timeout=300)
    metrics = found[0]
    stopped = metrics.read_text().count("\n")
    started = time.time()
    resume = subprocess.Popen([sys.executable, "-m", "harness", "train", "--resume",
                               metrics.parent.name, "--runs-dir", str(runs)], env=env, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # When each phase ended, seen in the output: launcher ready (data verified), training
    # process set up (torch imported, data loaded, model built), checkpoint restored.
    markers = {"launcher_ready_s": "harness: resuming run", "training_setup_s": "harness: training",
               "checkpoint_restored_s": "harness: resuming from step-"}
    phases = {}

    def watch():
        for line in resume.stdout:
            for key, marker in markers.items():
                if key not in phases and line.startswith(marker):
                    phases[key] = round(time.time() - started, 3)

    import threading

    threading.Thread(target=watch, daemon=True).start()
    first = None
    while resume.poll() is None and first is None:
        try:
            lines = metrics.read_text().splitlines()
            if any(json.loads(line).get("step") == stopped + 1 for line in lines[-3:]):
                first = time.time() - started
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    resume.wait(timeout=600)
    return {"interrupted_exit_code": process.returncode, "stopped_at_step": stopped,
            "resume_to_first_step_s": round(first, 3) if first else None,
            "resume_phases": phases,
            "resumed_run_exit_code": resume.returncode}


def main() -> None:
    quick = "--quick" in sys.argv[1:]
    scale = {"sizes": (1,), "pairs": 1} if quick else {}
    in_memory = {"sizes": (1,), "pairs": 1} if quick else {"sizes": (1, 10, 50), "pairs": 6}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = {"benchmark": "checkpoint_cost", "model": "conf/model/cnn.yaml (fashion_mnist)",
               "cpu_threads": 2, **write_cost(tmp), **resume_cost(tmp),
               "scale": scale_cost(tmp, **scale)}
    # The same in memory (tmpfs): without the disk's fsync time, whose spread hides the
    # harness's own cost at large sizes.
    if Path("/dev/shm").is_dir():
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            out["scale_in_memory"] = scale_cost(Path(shm), **in_memory)
    out["targets"] = {"checkpoint_write_s": 0.2, "overhead_fraction": 0.02,
                      "resume_to_first_step_s": 5.0}
    out["meets_targets"] = {k: (out.get(k) is not None and out[k] < v)
                            for k, v in out["targets"].items()}
    out["load_average_1m"] = os.getloadavg()[0]
    # Calibration: this machine's speed right now (2 cores shared with other work).
    started = time.time()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    out["python_import_torch_s"] = round(time.time() - started, 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
