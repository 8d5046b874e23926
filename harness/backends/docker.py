"""Train inside the pinned image in a locked-down container, through docker-py.

The container has no network, a read-only root with a tmpfs /tmp, a non-root user, no
capabilities and no privilege escalation; the dataset is mounted read-only and the run
directory read-write. GPUs are requested only for trainer.device=cuda. Output streams to
the terminal and train.log; the exit code is the container's.

The container must not outlive its launcher unnoticed: the launcher holds the container's
stdin open (attached, StdinOnce), and the training watches it (`--watch-stdin`). When the
launcher dies, even by SIGKILL, the engine closes that stdin and the training writes a
checkpoint and stops as on SIGTERM. A resume also stops and removes any container of the
run still there (`clean_up`) before it starts a new one.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness import config, rundir
from harness.backends.base import Backend, LaunchSpec
from harness.config import RunConfig
from harness.containers import image, sandbox
from harness.containers.sandbox import CODE_MOUNT, DATA_MOUNT, RUN_MOUNT
from harness.env import HOST_NAME
from harness.errors import EnvironmentProblem, first_line
from harness.host import docker_engine
from harness.progress import Console

LABEL = "org.harness.run"  # every training container carries it: `docker ps -a --filter label=...`
GPU_HINT = ("The NVIDIA container runtime is missing: install the NVIDIA driver and the "
            "NVIDIA Container Toolkit (nvidia-ctk runtime configure --runtime=docker, then "
            "restart dockerd), or train on the CPU: trainer.device=cpu.")


class ContainerProcess:
    """The container seen as a process (poll, send_signal), so that the launcher can forward
    SIGTERM/SIGUSR1 to the training inside it as it does to a local child."""

    def __init__(self, container):
        self.container = container
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        from docker.errors import NotFound

        if self.returncode is None:
            try:
                self.container.reload()
            except NotFound:
                return 1
            if self.container.status in ("exited", "dead"):
                self.returncode = int(self.container.attrs["State"]["ExitCode"])
        return self.returncode

    def send_signal(self, signum: int) -> None:
        from docker.errors import APIError

        try:
            self.container.kill(signal=int(signum))
        except APIError:
            pass  # already gone


class DockerHandle:
    def __init__(self, container, log_path: Path, stop_timeout_s: int, stdin):
        self.container = container
        self.stdin = stdin  # held open while we live: the training's lifeline
        self.process = ContainerProcess(container)
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s

    def wait(self) -> int:
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        with open(self.log_path, "a") as log:
            console = Console(log)
            try:
                for chunk in self.container.logs(stream=True, follow=True):
                    console.feed(chunk.decode(errors="replace"))
                code = int(self.container.wait().get("StatusCode", 1))
            except (DockerException, RequestException) as exc:
                # The container (or the engine) went away under the run: it failed.
                console.feed(f"\nharness: lost the training container: {first_line(exc, 400)}\n")
                code = 137
            console.close()
        self._remove()
        return code

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self) -> None:
        """Stop (SIGTERM, then SIGKILL after the grace period) and remove the container."""
        from docker.errors import APIError

        try:
            self.container.stop(timeout=self.stop_timeout_s)
        except APIError:
            pass
        self._remove()

    def _remove(self) -> None:
        from docker.errors import APIError, NotFound

        try:
            self.container.remove(force=True)
        except (NotFound, APIError):
            pass
        self.stdin.close()


def gpu_requested(conf: RunConfig) -> bool:
    return conf.trainer.device.startswith("cuda")


def gpu_request(gpus: str, engine_info: Dict[str, Any]):
    """How a container asks for its GPUs: through CDI (`nvidia.com/gpu=all`) where the
    engine has CDI enabled (Docker 25 and newer report `CDISpecDirs`) and an NVIDIA CDI
    spec is installed there (`nvidia-ctk cdi generate`); else the NVIDIA runtime's GPU
    request (`--gpus`)."""
    from docker.types import DeviceRequest

    if _nvidia_cdi_spec(engine_info.get("CDISpecDirs") or []):
        ids = ["nvidia.com/gpu=all"] if gpus == "all" else \
            [f"nvidia.com/gpu={i}" for i in range(int(gpus))]
        return DeviceRequest(driver="cdi", device_ids=ids)
    return DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])


def _nvidia_cdi_spec(directories: List[str]) -> bool:
    for directory in map(Path, directories):
        for spec in sorted(directory.glob("*")) if directory.is_dir() else []:
            try:
                if "nvidia.com/gpu" in spec.read_text(errors="replace"):
                    return True
            except OSError:
                continue
    return False


def command_mounts(conf: RunConfig, run_dir: Path, script: Dict[str, Any]
                   ) -> Dict[str, Dict[str, str]]:
    """A `harness run` command's view of the host, at the same paths as on the host: the
    working directory (the user's project) and inputs outside it read-only; each top-level
    directory the outputs go to writable, backed by RUN_DIR/outputs/ (so the project is
    never written)."""
    from harness.rundir import OUTPUTS
    from harness.script.files import output_dirs

    workdir = Path(script["workdir"])
    volumes = {str(workdir): {"bind": str(workdir), "mode": "ro"}}
    for name in script["inputs"]:
        path = (workdir / name).resolve()
        if not path.is_relative_to(workdir):
            volumes[str(path)] = {"bind": str(path), "mode": "ro"}
    for top in output_dirs(conf.command.outputs, workdir):
        (workdir / top).mkdir(exist_ok=True)  # the mount point, inside the read-only project
        kept = run_dir.resolve() / OUTPUTS / top
        kept.mkdir(parents=True, exist_ok=True)
        volumes[str(kept)] = {"bind": str(workdir / top), "mode": "rw"}
    return volumes


def container_options(conf: RunConfig, run_dir: Path, data_root: Optional[Path],
                      env: Dict[str, str], engine_info: Optional[Dict[str, Any]] = None,
                      script: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Keyword arguments for containers.create: the sandbox every training container gets
    (`script`: a `harness run` command's launch facts)."""
    opts = conf.backend.docker
    volumes = {str(run_dir.resolve()): {"bind": RUN_MOUNT, "mode": "rw"}}
    if script:
        volumes.update(command_mounts(conf, run_dir, script))
    if data_root:
        volumes[str(Path(data_root).resolve())] = {"bind": DATA_MOUNT, "mode": "ro"}
    pythonpath = ["/opt/harness/src"]
    for i, directory in enumerate(opts.pythonpath):
        target = f"{CODE_MOUNT}/{i}"
        volumes[str(Path(directory).resolve())] = {"bind": target, "mode": "ro"}
        pythonpath.append(target)
    command = ["python", "-u", "-m", rundir.TRAINING_MODULE, RUN_MOUNT, "--watch-stdin"]
    if data_root:
        command += ["--data-root", DATA_MOUNT]
    kwargs: Dict[str, Any] = dict(
        command=command,
        # HOST_NAME: the lockfile records the host's name, not the container id.
        environment={**env, "PYTHONPATH": ":".join(pythonpath), "HOME": "/tmp",
                     HOST_NAME: platform.node()},
        working_dir=script["workdir"] if script else RUN_MOUNT,
        volumes=volumes,
        labels={LABEL: run_dir.name, **opts.labels},
        # stdin open and attachable once: its end tells the training its launcher is gone.
        stdin_open=True,
        detach=False,
        **sandbox.docker_py_options(opts, _user(opts.user)),
    )
    if gpu_requested(conf):
        kwargs["device_requests"] = [gpu_request(str(opts.gpus), engine_info or {})]
    return kwargs


def _user(configured: str) -> str:
    # As root the run directory is handed to the container's user; otherwise the container
    # runs as the invoking (non-root) user, who owns the run directory already.
    return configured if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"


def _hand_over(run_dir: Path, user: str) -> None:
    """Make the run directory writable for the container's user."""
    if os.geteuid() != 0:
        return
    uid, gid = (int(x) for x in user.split(":"))
    for path in [run_dir, *run_dir.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)


def start_or_explain(container, conf: RunConfig) -> None:
    """Start a created container; on a GPU request the engine cannot satisfy, remove the
    container (the engine leaves it in Created state) and say what is missing."""
    from docker.errors import APIError

    try:
        container.start()
    except APIError as exc:
        try:
            container.remove(force=True)
        except APIError:
            pass
        text, said = str(exc), first_line(exc, 400)
        if gpu_requested(conf) and ("device driver" in text or "gpu" in text.lower()):
            raise EnvironmentProblem(f"trainer.device={conf.trainer.device} asks for GPUs "
                                     f"but the Docker engine cannot provide them ({said}). "
                                     f"{GPU_HINT}") from None
        raise EnvironmentProblem(f"the training container did not start: {said}") from None


class DockerBackend(Backend):
    name = "docker"
    trains_elsewhere = True  # in the image

    def __init__(self, engine=None):
        self._engine = engine

    @property
    def engine(self):
        if self._engine is None:
            self._engine = docker_engine.client()
        return self._engine

    def lock_facts(self, conf: RunConfig) -> Dict[str, Any]:
        """Before any run directory exists: an engine answers, the image is there (built if
        needed), a GPU request can be met. Returns the lockfile's `image` and
        `container_runtime` sections."""
        engine = self.engine
        profile = config.plain(conf.image)
        if gpu_requested(conf):  # with the pinned base, before building anything
            self._probe_gpu(conf, image.check_base(profile))
        facts = image.build(profile, engine=engine)
        return {"image": facts, "container_runtime": docker_engine.facts(engine)}

    def _probe_gpu(self, conf: RunConfig, reference: str) -> None:
        from docker.errors import APIError, ImageNotFound

        request = gpu_request(str(conf.backend.docker.gpus), self.engine.info())
        try:
            probe = self.engine.containers.create(
                reference, command=["true"], network_mode="none",
                labels={LABEL: "gpu-probe"}, device_requests=[request])
        except ImageNotFound:
            raise EnvironmentProblem(
                f"the base image {reference} is not in the Docker engine, so the GPU probe "
                f"cannot run: `docker pull {reference}` (or `make docker-env` for the local "
                f"base) and try again.") from None
        except APIError as exc:
            raise EnvironmentProblem(f"the GPU probe container could not be created: "
                                     f"{first_line(exc, 400)}") from None
        try:
            start_or_explain(probe, conf)
            probe.wait()
        finally:
            try:
                probe.remove(force=True)
            except APIError:
                pass  # start_or_explain removed it already

    def launch(self, spec: LaunchSpec) -> DockerHandle:
        run_dir, conf, lock = spec.run_dir, spec.conf, spec.lock
        reference = (lock.get("image") or {}).get("id") or \
            image.build(config.plain(conf.image), engine=self.engine)["id"]
        info = self.engine.info() if gpu_requested(conf) else {}
        options = container_options(conf, run_dir, spec.data_root, spec.env, info,
                                    script=lock.get("script"))
        if spec.extra_args:
            options["command"] = options["command"] + list(spec.extra_args)
        _hand_over(run_dir, options["user"])
        container = self.engine.containers.create(reference, **options)
        stdin = self.engine.api.attach_socket(container.id, params={"stdin": 1, "stream": 1})
        try:
            start_or_explain(container, conf)
        except EnvironmentProblem as exc:
            stdin.close()
            rundir.write_status(run_dir, "failed", exit_code=exc.exit_code, reason=str(exc),
                                finished_utc=rundir.now_utc())
            raise
        return DockerHandle(container, run_dir / rundir.LOG,
                            conf.backend.docker.stop_timeout_s, stdin)

    def clean_up(self, run_dir: Path, conf: RunConfig) -> List[str]:
        """Stop (SIGTERM: the training checkpoints first) and remove every container of
        this run that a killed launcher left behind."""
        from docker.errors import APIError, NotFound

        done = []
        for container in self.engine.containers.list(
                all=True, filters={"label": f"{LABEL}={run_dir.name}"}):
            state = container.status
            try:
                if state == "running":
                    container.stop(timeout=conf.backend.docker.stop_timeout_s)
                container.remove(force=True)
            except (NotFound, APIError):
                continue
            done.append(f"{'stopped and removed' if state == 'running' else 'removed'} "
                        f"container {container.short_id} left {state} by an earlier launch")
        return done
