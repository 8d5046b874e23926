"""Backends start the training process somewhere and hand back a handle to wait on,
signal or stop. They share one small interface (base.Backend); `get` picks one by name."""

from harness.backends.base import Backend, Handle, LaunchSpec
from harness.errors import ConfigError

NAMES = ("local", "docker", "auto", "slurm")


def classes():
    """The name -> class table of the backends (imported when asked: docker-py and Slurm's
    helpers load only for a run that uses them)."""
    from harness.backends.docker import DockerBackend
    from harness.backends.local import LocalBackend
    from harness.backends.slurm import SlurmBackend

    return {"local": LocalBackend, "docker": DockerBackend, "slurm": SlurmBackend}


def get(name: str, conf=None) -> Backend:
    """The backend called `name`; `auto` also looks at the run's typed config (`conf`), if
    given."""
    if name == "auto":
        return _auto(conf)
    if name not in NAMES:
        raise ConfigError(f"unknown backend '{name}'; valid backends: {', '.join(NAMES)}")
    return classes()[name]()


def _auto(conf=None) -> Backend:
    """docker when an engine answers and the image has a pinned base, else local; says
    which and why."""
    import sys

    from harness.errors import EnvironmentProblem
    from harness.host import docker_engine

    if conf is not None and not conf.image.base:
        print(f"harness: backend=auto chose local: the '{conf.image.profile}' image has no "
              f"base pinned on this machine (run `make docker-env` for containers)",
              file=sys.stderr, flush=True)
        return get("local")
    try:
        # Does an engine answer? An absent one refuses at once; 30 s lets a busy one
        # (load 5 on 2 cores) answer rather than be taken for absent.
        docker_engine.client(timeout=30)
    except EnvironmentProblem as exc:
        print(f"harness: backend=auto chose local: {exc}", file=sys.stderr, flush=True)
        return get("local")
    from harness.backends.docker import DockerBackend

    print("harness: backend=auto chose docker (a Docker engine answers)", file=sys.stderr,
          flush=True)
    # Not the pinging client: its read timeout is sized for a ping, not for the image's
    # export and load, which take longer on a busy machine (and far longer for CUDA).
    return DockerBackend()


__all__ = ["Backend", "Handle", "LaunchSpec", "classes", "get", "NAMES"]
