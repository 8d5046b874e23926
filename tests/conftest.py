"""Shared fixtures. Tests run the real `harness` CLI in a subprocess against real data:
Debian's Fashion-MNIST and small IDX files generated here."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
IN_CI = os.environ.get("CI") == "true"

sys.path.insert(0, str(TESTS / "fixtures"))
import mlflow_server as mlflow_server_fixture  # noqa: E402  (tests/fixtures/mlflow_server.py)

# Short real-data runs: enough steps for weights to depend on everything pinned. The
# bundled configs default to backend=auto; these tests are about the local process.
FAST = ["backend=local", "trainer.max_steps=24", "trainer.eval_limit=500", "trainer.log_every=8",
        "trainer.fingerprint_every=8"]


# Two tiers: `make test` runs the tests not marked `long` (under 20 minutes on 2 cores, each
# promise shown once against the real parts); `make test-long` runs the long tier: builds that
# take minutes (the CUDA image, cache-less rebuilds) and the end-to-end variations.


def require(condition: bool, reason: str) -> None:
    """Skip on a developer machine without the part; fail in CI, where it must exist."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_harness(args, *, cwd: Path, env: dict, check_rc=None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """The one way the tests run the CLI to its end: `python -m harness ARGS` in a
    subprocess, output captured as text. With `check_rc`, another exit code fails the test
    and shows both outputs. (Tests that signal or time a run start it with Popen.)"""
    done = subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check_rc is not None and done.returncode != check_rc:
        raise AssertionError(f"harness {' '.join(map(str, args))} exited {done.returncode}, "
                             f"expected {check_rc}\nstdout:\n{done.stdout}\nstderr:\n"
                             f"{done.stderr}")
    return done


@pytest.fixture
def cli(tmp_path, cache_home):
    """Run `harness ARGS...` in tmp_path (run_harness); returns CompletedProcess (text)."""

    def run(*args: str, env: dict | None = None, cwd: Path | None = None, check_rc=None,
            timeout: float = 600):
        full_env = {**os.environ, "XDG_CACHE_HOME": str(cache_home),
                    "PYTHONPATH": str(TESTS / "fixtures")}
        full_env.pop("HARNESS_DATA", None)
        full_env.update(env or {})
        return run_harness(args, cwd=cwd or tmp_path, env=full_env, check_rc=check_rc,
                           timeout=timeout)

    return run


def run_dir_of(done: subprocess.CompletedProcess) -> Path:
    """The run directory `harness train` printed last."""
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("run dir:"):
            return Path(line.split(":", 1)[1].strip())
    raise AssertionError(f"no 'run dir:' line in output:\n{done.stdout}\n{done.stderr}")


def read_lock(run_dir: Path) -> dict:
    return json.loads((run_dir / "harness.lock").read_text())


def loss_bits(run_dir: Path) -> list:
    return [json.loads(line)["loss_hex"] for line in (run_dir / "metrics.jsonl").read_text()
            .splitlines() if json.loads(line)["kind"] == "train"]


@pytest.fixture(scope="session")
def fashion() -> Path:
    require((FASHION / "train-images-idx3-ubyte.gz").exists(),
            f"Debian's Fashion-MNIST is not in {FASHION} (run `make data`)")
    return FASHION


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> str:
    """Write an IDX file; return the sha256 of its uncompressed content."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    content = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(content)
    return hashlib.sha256(content).hexdigest()


def make_tiny_idx(directory: Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> dict:
    """Four small MNIST-format files in `directory`; returns {key: {file, sha256}}."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):  # a learnable pattern: a bright row per class
            images[i, 2 + 2 * label, :] = 250
        for kind, array, suffix in (("images", images, "idx3"), ("labels", labels, "idx1")):
            name = f"{prefix}-{kind}-{suffix}-ubyte.gz"
            files[f"{split}_{kind}"] = {"file": name, "sha256": write_idx(directory / name, array)}
    return files


@pytest.fixture
def tiny_conf(tmp_path) -> Path:
    """A config directory with `tiny.yaml` training the bundled CNN on generated IDX data
    stored in tmp/tinydata (pinned in conf/data/tiny.yaml)."""
    files = make_tiny_idx(tmp_path / "tinydata")
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    data_cfg = {"name": "tiny", "root": str(tmp_path / "tinydata"), "mirrors": [],
                "files": files, "dataset": {"_target_": "harness.data.IdxClassification",
                                            "mean": 0.1, "std": 0.3}}
    (conf / "data" / "tiny.yaml").write_text(json.dumps(data_cfg))
    (conf / "tiny.yaml").write_text(
        "defaults:\n  - model: cnn\n  - data: tiny\n  - optim: adam\n  - trainer: default\n"
        "  - determinism: strict\n  - backend: local\n  - _self_\n"
        "name: tiny\nseed: 0\ntrainer:\n  epochs: 1\n  batch_size: 32\n  log_every: 4\n"
        "  fingerprint_every: 4\n  checkpoint_every: 2\n")
    return conf


# ---------------------------------------------------------------- interrupted runs

def make_context(base: Path, dataset: str = "harness.data.IdxClassification") -> dict:
    """A config dir with `tiny` (generated IDX data read by the `dataset` class) under
    `base`, and the env to run in."""
    files = make_tiny_idx(base / "tinydata")
    conf = base / "conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "tiny.yaml").write_text(json.dumps({
        "name": "tiny", "root": str(base / "tinydata"), "mirrors": [], "files": files,
        "dataset": {"_target_": dataset, "mean": 0.1, "std": 0.3}}))
    (conf / "tiny.yaml").write_text(
        "defaults:\n  - model: cnn\n  - data: tiny\n  - optim: adam\n  - trainer: default\n"
        "  - determinism: strict\n  - backend: local\n  - _self_\n"
        "name: tiny\nseed: 0\ntrainer:\n  epochs: 1\n  batch_size: 32\n  log_every: 4\n"
        "  fingerprint_every: 4\n  checkpoint_every: 2\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(base / "cache"),
           "PYTHONPATH": str(TESTS / "fixtures")}
    return {"base": base, "conf": conf, "env": env, "runs": base / "runs"}


def harness(ctx, *args, check_rc=None):
    return run_harness([*args, "--config-dir", str(ctx["conf"]), "--runs-dir",
                        str(ctx["runs"])], cwd=ctx["base"], env=ctx["env"], check_rc=check_rc)


def start_and_interrupt(ctx, args: list, sig: int, at_step: int, group: bool = True,
                        send=None):
    """Start `harness train` in its own process group, wait until metrics.jsonl has
    `at_step` steps, send `sig` to the whole group (launcher, training, DataLoader
    workers), or with group=False to the launcher alone, or call `send(run_dir)` instead.
    `args` are harness's arguments (`train CONFIG overrides...`).
    Returns (run_dir, exit code, output)."""
    before = set(ctx["runs"].iterdir()) if ctx["runs"].exists() else set()
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", *args, "--config-dir",
         str(ctx["conf"]), "--runs-dir", str(ctx["runs"])], cwd=ctx["base"], env=ctx["env"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    run_dir = None
    try:
        while time.time() < deadline:
            assert process.poll() is None, "training ended before it could be interrupted:\n" \
                + process.stdout.read()
            new = [p for p in ctx["runs"].iterdir() if p not in before] \
                if ctx["runs"].exists() else []
            if new:
                run_dir = new[0]
                metrics = run_dir / "metrics.jsonl"
                if metrics.exists() and metrics.read_text().count("\n") >= at_step:
                    if send is not None:
                        send(run_dir)
                    elif group:
                        os.killpg(process.pid, sig)
                    else:
                        process.send_signal(sig)
                    break
            time.sleep(0.005)
        else:
            raise AssertionError("training did not reach the step in time")
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return run_dir, process.returncode, output


# ---------------------------------------------------------------- a user's own project

USER_SCRIPT = TESTS / "fixtures" / "user_train.py"


def make_project(directory: Path) -> Path:
    """The user's script and its data in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    shutil.copy(USER_SCRIPT, directory / "train.py")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 16)).astype("float32")
    np.savez(directory / "data.npz", x=x, y=(x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5))
    return directory


@pytest.fixture
def project(cache_home):
    """A user's project directory: the script and its data. Readable by every user (the
    container runs as a non-root user and sees the project at the same path)."""
    directory = make_project(Path(tempfile.mkdtemp(prefix="harness-project-")))
    environment = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    environment.pop("PYTHONPATH", None)

    def harness(*args, check_rc=None, timeout=600, env=None):
        """`env`: variables to set for this call (a None value unsets one)."""
        changed = {**environment, **(env or {})}
        changed = {key: value for key, value in changed.items() if value is not None}
        return run_harness(args, cwd=directory, env=changed, check_rc=check_rc,
                           timeout=timeout)

    yield directory, harness
    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- MLflow (tracker=mlflow)

# One server starter for the tests and the tracking benchmark: tests/fixtures/mlflow_server.py
running_mlflow_server = mlflow_server_fixture.running


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server for a test module; its URI."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (uri, _):
        yield uri


def mlflow_run(client, run_id: str):
    """The MLflow run that logged harness run `run_id` (its harness.run_id tag)."""
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`harness.run_id` = '{run_id}'")
    assert len(found) == 1, [r.info.run_id for r in found]
    return found[0]


def losses(run_dir: Path) -> list:
    """(step, loss) of each train record in metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
