"""backend=docker end to end against the real engine and the local registry (make docker-env):
build and reuse the pinned image, train in a locked-down container, compare with a local
run bit for bit, check the sandbox from inside, and fail clearly where a part is missing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    TESTS,
    loss_bits,
    losses,
    mlflow_run,
    read_lock,
    require,
    run_dir_of,
    run_harness,
)
from test_lockfile import documented_fields, lookup

LABEL = "org.harness.run"


def _engine():
    import docker

    try:
        engine = docker.from_env(timeout=30)
        engine.ping()
        return engine
    except Exception:  # noqa: BLE001 - no engine: require() below skips or (CI) fails
        return None


@pytest.fixture(scope="module")
def engine():
    engine = _engine()
    require(engine is not None, "no Docker engine answers (run `make docker-env`)")
    from harness import config

    require(config.state_ref("base-cpu") is not None or os.environ.get("HARNESS_CPU_BASE"),
            "no pinned base image (run `make docker-env`)")
    return engine


@pytest.fixture(scope="module")
def built(engine, tmp_path_factory):
    """`harness build --push` once per module (a no-op when the image exists); its facts."""
    done = run_harness(["build", "--push"], cwd=tmp_path_factory.mktemp("build"),
                       env=dict(os.environ), check_rc=0, timeout=1200)
    return json.loads(done.stdout)


def leftover_containers(engine, run_id: str):
    """The containers of run `run_id` still there (other runs on this machine, a second
    test session say, have their own)."""
    return engine.containers.list(all=True, filters={"label": f"{LABEL}={run_id}"})


def docker_train(cli, conf: Path, *overrides, check_rc=0, **kwargs):
    return cli("train", "tiny", "--config-dir", str(conf), "backend=docker", *overrides,
               check_rc=check_rc, **kwargs)


@pytest.mark.docker
def test_build_then_train_records_the_image(cli, tiny_conf, engine, built):
    done = docker_train(cli, tiny_conf)
    run_dir = run_dir_of(done)
    lock = read_lock(run_dir)
    assert lock["backend"]["name"] == "docker"
    inspected = engine.api.inspect_image(lock["image"]["reference"])
    assert lock["image"]["id"] == inspected["Id"]
    assert lock["image"]["repo_digest"] in inspected["RepoDigests"]
    assert lock["image"]["repo_digest"].startswith("127.0.0.1:5000/harness/train-cpu@sha256:")
    assert lock["image"]["base"].endswith("@" + lock["image"]["base_digest"])
    assert lock["image"]["diff_ids"] == inspected["RootFS"]["Layers"]
    assert lock["image"]["image_store"] == "docker"  # the id is sha256 of the image config
    labels = inspected["Config"]["Labels"]
    assert labels["org.harness.requirements-lock-sha256"] == \
        lock["image"]["requirements_lock_sha256"]
    assert labels["org.harness.dockerfile-sha256"] == lock["image"]["dockerfile_sha256"]
    assert lock["container_runtime"]["version"] == engine.version()["Version"]
    for field in documented_fields(docker_run=True):  # docker-only fields exist here
        lookup(lock, field)
    # Captured inside the container: the image's interpreter, not the host venv's.
    assert "pytest" not in lock["software"]["packages"]
    assert "train.log" in os.listdir(run_dir) and "step 8/8" in (run_dir / "train.log").read_text()
    assert leftover_containers(engine, run_dir.name) == []

    first = json.loads(cli("build", check_rc=0).stdout)  # (re)builds if the tree changed
    started = time.monotonic()  # unchanged tree: found by its content hash, nothing built
    again = cli("build", check_rc=0)
    elapsed = time.monotonic() - started
    assert json.loads(again.stdout)["id"] == first["id"]
    assert "building" not in again.stderr
    assert elapsed < 2.5, f"cached build took {elapsed:.2f} s"


@pytest.mark.docker
def test_local_and_docker_train_bit_identical(cli, tiny_conf, engine, built):
    local = run_dir_of(cli("train", "tiny", "--config-dir", str(tiny_conf), check_rc=0))
    boxed = run_dir_of(docker_train(cli, tiny_conf))
    a, b = read_lock(local), read_lock(boxed)
    assert a["software"]["torch"] == b["software"]["torch"]  # the same CPU torch build
    assert a["determinism"]["in_effect"]["torch_num_threads"] == \
        b["determinism"]["in_effect"]["torch_num_threads"]
    assert loss_bits(local) == loss_bits(boxed)
    assert a["results"]["weights_sha256"] == b["results"]["weights_sha256"]
    # Negative control: one weight bit flipped in the container after step 1 is told apart.
    flipped = read_lock(run_dir_of(docker_train(cli, tiny_conf,
                                                env={"HARNESS_PERTURB": "weight-bit"})))
    assert flipped["results"]["weights_sha256"] != a["results"]["weights_sha256"]
    # The host's name, not the container's id (which is recorded apart).
    assert b["hardware"]["hostname"] == a["hardware"]["hostname"]
    assert b["hardware"]["container_hostname"] != b["hardware"]["hostname"]


@pytest.mark.docker
def test_replay_of_a_docker_run_is_identical_in_the_same_image(cli, tiny_conf, engine, built):
    original = run_dir_of(docker_train(cli, tiny_conf))
    done = cli("replay", str(original), check_rc=0)
    assert "IDENTICAL" in done.stdout
    replayed = run_dir_of(done)
    lock, again = read_lock(original), read_lock(replayed)
    assert again["backend"]["name"] == "docker"
    assert again["image"]["id"] == lock["image"]["id"]
    assert again["replay_of"]["run_id"] == original.name
    assert "hardware.hostname" not in [m["key"] for m in again["replay_mismatches"]]


@pytest.mark.docker
@pytest.mark.long
def test_preempted_docker_run_resumes_in_docker(cli, tiny_conf, tmp_path, cache_home, engine,
                                                built):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(TESTS / "fixtures")}
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "train", "tiny", "--config-dir", str(tiny_conf),
         "backend=docker", "trainer.epochs=40", "trainer.log_every=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("step "):
            break
    process.send_signal(signal.SIGTERM)  # forwarded into the container
    process.communicate(timeout=120)
    assert process.returncode == 75
    run_dir = next((tmp_path / "runs").iterdir())
    done = cli("train", "--resume", run_dir.name, check_rc=0)
    assert f"resuming run {run_dir.name} (docker backend)" in done.stdout
    assert read_lock(run_dir)["backend"]["name"] == "docker"
    assert read_lock(run_dir)["results"]["steps"] == 320


@pytest.mark.docker
@pytest.mark.long
def test_container_stops_when_its_launcher_is_killed_and_resume_cleans_up(
        cli, tiny_conf, tmp_path, cache_home, engine, built):
    """SIGKILL of the harness process group: the container sees its launcher gone (its
    stdin ends), checkpoints and exits 75 instead of writing on unseen; the resume removes
    it before starting a new container and finishes the run."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(TESTS / "fixtures")}
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "train", "tiny", "--config-dir", str(tiny_conf),
         "backend=docker", "trainer.epochs=40", "trainer.log_every=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    for line in process.stdout:
        if line.startswith("step "):
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_dir = next((tmp_path / "runs").iterdir())
    label = {"label": f"{LABEL}={run_dir.name}"}
    deadline = time.monotonic() + 60
    while engine.containers.list(filters=label):  # running ones
        assert time.monotonic() < deadline, "the container outlived its launcher"
        time.sleep(0.5)
    (container,) = engine.containers.list(all=True, filters=label)
    assert container.attrs["State"]["ExitCode"] == 75
    assert "SIGTERM received: checkpoint" in container.logs().decode()
    done = cli("train", "--resume", run_dir.name, check_rc=0)
    assert f"removed container {container.short_id}" in done.stdout
    assert read_lock(run_dir)["results"]["steps"] == 320
    assert engine.containers.list(all=True, filters=label) == []


PROBE_CONF = """
defaults:
  - optim: sgd
  - trainer: default
  - determinism: strict
  - backend: docker
  - _self_
name: probe
seed: 0
model: {_target_: harness_testkit.TinyMLP, in_features: 16}
data:
  name: probe
  dataset: {_target_: harness_testkit.SandboxProbeDataset, size: 64}
trainer: {epochs: 1, batch_size: 16, log_every: 2}
"""


@pytest.mark.docker
@pytest.mark.long
def test_code_the_image_cannot_import_is_bad_input_not_a_traceback(cli, tmp_path, engine,
                                                                   built):
    """The launcher finds the test's own modules (PYTHONPATH); the container does not,
    without backend.docker.pythonpath: exit 2, naming the target and the fix."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "probe.yaml").write_text(PROBE_CONF)
    done = cli("train", "probe", "--config-dir", str(conf), "--runs-dir",
               str(tmp_path / "runs"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot be imported in the training process" in done.stderr
    assert "backend.docker.pythonpath" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.docker
def test_container_sandbox_seen_from_inside(cli, tmp_path, engine, built):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "probe.yaml").write_text(PROBE_CONF)
    done = cli("train", "probe", "--config-dir", str(conf),
               f"backend.docker.pythonpath=[{TESTS / 'fixtures'}]", check_rc=0)
    probe = json.loads((run_dir_of(done) / "probe.json").read_text())
    assert probe["uid"] == 10001 and probe["gid"] == 10001 and probe["euid"] == 10001
    assert probe["root_write"] == "EROFS"  # read-only root file system
    assert probe["tmp_writable"] and probe["home"] == "/tmp"
    assert probe["interfaces"] == ["lo"]  # network_mode=none: loopback only
    assert probe["connect_1.1.1.1:53"] != "ok"
    assert int(probe["cap_eff"], 16) == 0  # cap_drop ALL
    assert probe["no_new_privs"] == "1"
    assert probe["shm_bytes"] >= 512 * 2**20  # room for DataLoader workers
    assert leftover_containers(engine, run_dir_of(done).name) == []


@pytest.mark.parametrize("backend", ["local", "docker"])
def test_cuda_without_a_gpu_stops_before_building_or_launching(cli, tiny_conf, tmp_path,
                                                              backend):
    """trainer.device=cuda where NVML finds no driver or GPU: exit 4 naming what is missing
    and the CPU alternative; nothing built, no container, no run directory."""
    from harness.host import gpu

    if gpu.nvml_gpus()["gpus"]:
        pytest.skip("this host has an NVIDIA GPU")
    before = set(_engine().containers.list(all=True)) if _engine() else set()
    done = cli("train", "tiny", "--config-dir", str(tiny_conf), f"backend={backend}",
               "trainer.device=cuda", check_rc=4)
    assert "no NVIDIA driver answers" in done.stderr and "trainer.device=cpu" in done.stderr
    assert "building" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
    if _engine():
        assert set(_engine().containers.list(all=True)) == before


@pytest.mark.docker
def test_gpu_probe_on_an_engine_without_the_nvidia_runtime_says_what_is_missing(engine):
    """The GPU host without the NVIDIA Container Toolkit: the probe (a container of the
    pinned base asking for GPUs, run before any build) fails with the toolkit's name and
    leaves no container behind."""
    from harness import config
    from harness.backends.docker import DockerBackend
    from harness.errors import EnvironmentProblem

    if "nvidia" in engine.info().get("Runtimes", {}):
        pytest.skip("this engine has the NVIDIA runtime")
    cfg = config.compose("fashion_mnist", ["backend=docker", "trainer.device=cuda"])
    with pytest.raises(EnvironmentProblem, match="NVIDIA Container Toolkit"):
        DockerBackend(engine)._probe_gpu(config.typed(cfg), cfg["image"]["base"])
    assert engine.containers.list(all=True, filters={"label": f"{LABEL}=gpu-probe"}) == []


@pytest.mark.docker
@pytest.mark.long
def test_ctrl_c_stops_and_removes_the_container(tiny_conf, tmp_path, cache_home, engine, built):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home),
           "PYTHONPATH": str(TESTS / "fixtures")}
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "train", "tiny", "--config-dir", str(tiny_conf),
         "backend=docker", "trainer.epochs=1000", "trainer.log_every=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # As from a terminal: a runner started in the background (`cmd &` in a script) passes
        # SIGINT down as ignored, and Python then never turns it into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step "):
            break
    run_dir = next((tmp_path / "runs").iterdir())
    assert len(leftover_containers(engine, run_dir.name)) == 1, "".join(lines)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 1, "".join(lines) + rest
    assert "interrupted" in rest
    assert leftover_containers(engine, run_dir.name) == []
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == "interrupted"


@pytest.mark.docker
@pytest.mark.long
def test_auto_backend_picks_docker_when_an_engine_answers(cli, tiny_conf, engine, built):
    done = cli("train", "tiny", "--config-dir", str(tiny_conf), "backend=auto", check_rc=0)
    assert "backend=auto chose docker" in done.stderr
    assert read_lock(run_dir_of(done))["backend"]["name"] == "docker"


@pytest.mark.docker
def test_auto_backend_talks_to_the_engine_without_the_pings_short_timeout(engine, tiny_conf,
                                                                          built):
    """backend=auto asks with a 5-second timeout whether an engine answers; the image's
    export and load, which take longer on a busy machine, must not inherit it (they failed
    with 'Read timed out. (read timeout=5)' under a load of 5 on 2 cores)."""
    from harness import backends, config
    from harness.commands import choices
    from harness.host import docker_engine

    conf = config.typed(choices.compose("tiny", ["backend=auto"], tiny_conf))
    chosen = backends.get("auto", conf)
    assert chosen.name == "docker"
    assert chosen.engine.api.timeout == docker_engine.client().api.timeout >= 60


def test_engine_down_fails_with_how_to_start_one(cli, tiny_conf, tmp_path):
    closed = {"DOCKER_HOST": "tcp://127.0.0.1:9"}  # discard port: nothing listens
    done = docker_train(cli, tiny_conf, check_rc=4, env=closed)
    assert "no Docker engine answers at tcp://127.0.0.1:9" in done.stderr
    assert "make docker-env" in done.stderr and "backend=local" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written
    done = cli("train", "tiny", "--config-dir", str(tiny_conf), "backend=auto", env=closed,
               check_rc=0)
    assert "backend=auto chose local" in done.stderr
    assert read_lock(run_dir_of(done))["backend"]["name"] == "local"


@pytest.mark.docker
@pytest.mark.long
def test_two_builds_of_the_same_content_at_once_end_with_one_image(engine, built, tmp_path):
    """Two `harness build --push` of new, identical content started together: one builds,
    the other waits and finds that image; both report the same id and registry digest,
    and the digest stays on the image."""
    import uuid

    marker = f"+image.env.HARNESS_TEST_RACE={uuid.uuid4().hex[:12]}"
    command = [sys.executable, "-m", "harness", "build", "fashion_mnist", marker, "--push"]
    both = [subprocess.Popen(command, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [process.communicate(timeout=1200) for process in both]
    assert [process.returncode for process in both] == [0, 0], outputs
    facts = [json.loads(out) for out, _ in outputs]
    try:
        assert facts[0]["id"] == facts[1]["id"]
        assert facts[0]["repo_digest"] and facts[0]["repo_digest"] == facts[1]["repo_digest"]
        assert facts[0]["repo_digest"] in engine.api.inspect_image(facts[0]["id"])["RepoDigests"]
        assert sum("harness: building" in err for _, err in outputs) == 1, outputs
    finally:
        engine.images.remove(facts[0]["id"], force=True)


@pytest.mark.docker
@pytest.mark.long
def test_two_ranks_in_a_container_give_the_local_two_rank_weights(cli, tiny_conf, engine,
                                                                   built):
    """The rank launcher runs inside the container (no network: the ranks meet on its
    loopback) and gives the same bits as on the host."""
    ranks = ["trainer.devices=2", "determinism.threads=1", "trainer.batch_size=16"]
    local = run_dir_of(cli("train", "tiny", "--config-dir", str(tiny_conf), *ranks,
                           check_rc=0))
    boxed = run_dir_of(docker_train(cli, tiny_conf, *ranks))
    assert read_lock(boxed)["distributed"]["world_size"] == 2
    assert loss_bits(local) == loss_bits(boxed)
    assert read_lock(local)["results"]["weights_sha256"] == \
        read_lock(boxed)["results"]["weights_sha256"]
    assert leftover_containers(engine, boxed.name) == []


@pytest.mark.docker
@pytest.mark.long
def test_a_docker_run_is_tracked_by_the_launcher_and_tagged_with_its_image(
        cli, tiny_conf, engine, built, mlflow_server):
    """The image has no MLflow: the launcher follows the run's metrics from the host."""
    from mlflow.tracking import MlflowClient

    inside = engine.containers.run(
        built["id"], ["python", "-c", "import importlib.util as u; print(u.find_spec('mlflow'))"],
        remove=True, network_disabled=True).decode().strip()
    assert inside == "None"
    run_dir = run_dir_of(docker_train(cli, tiny_conf, "+tracker=mlflow",
                                      f"tracker.mlflow.tracking_uri={mlflow_server}"))
    client = MlflowClient(mlflow_server)
    run = mlflow_run(client, run_dir.name)
    lock = read_lock(run_dir)
    assert run.data.tags["harness.image_id"] == lock["image"]["id"] == built["id"]
    assert run.data.tags["harness.backend"] == "docker"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                          "train/loss"))
    assert history == losses(run_dir)
