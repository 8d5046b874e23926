"""The Docker engine the harness talks to (docker-py): a client that has answered, or an
error that says how to get one; and the engine's facts for the lockfile."""

from __future__ import annotations

import os
from typing import Any, Dict

from harness.errors import EnvironmentProblem, first_line

ENGINE_DOWN_HINT = ("Start one with `make docker-env` (installs and starts dockerd and the "
                    "local registry), or train without containers: backend=local.")


def client(timeout: int = 120):
    """A docker-py client that has answered a ping, or EnvironmentProblem saying how to get
    an engine."""
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    import docker

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        engine = docker.from_env(timeout=timeout)
        engine.ping()
    except (DockerException, RequestException, OSError, ValueError) as exc:
        # requests' connection errors and malformed DOCKER_HOST values included
        raise EnvironmentProblem(f"no Docker engine answers at {where} ({first_line(exc)}). "
                                 f"{ENGINE_DOWN_HINT}") from None
    return engine


def facts(engine) -> Dict[str, Any]:
    version = engine.version()
    return {"engine": "docker", "version": version.get("Version"),
            "api_version": version.get("ApiVersion"), "os": version.get("Os"),
            "arch": version.get("Arch"), "kernel": version.get("KernelVersion")}
