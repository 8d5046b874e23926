"""The sandbox every training container gets, whoever starts it: the docker backend
(through docker-py) and a Slurm job's container runtime (docker, apptainer or pyxis on the
node) use these same paths and denials, taken from `backend.docker` of the run's config.

What a container sees: the run directory read-write at RUN_MOUNT, the dataset read-only at
DATA_MOUNT, extra code directories read-only under CODE_MOUNT. What it is denied: network
(`backend.docker.network`, default none), a writable root (only a tmpfs /tmp), root (a
numeric non-root user), capabilities, privilege escalation. /dev/shm is
`backend.docker.shm_size` (DataLoader workers pass batches through it). docker-init is
PID 1, so signals reach the training and its DataLoader workers are reaped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:
    from harness.config.schema import DockerConf

RUN_MOUNT = "/harness/run"
DATA_MOUNT = "/harness/data"
CODE_MOUNT = "/harness/code"
TMPFS = {"/tmp": "rw,nosuid,nodev,size=1g,mode=1777"}
CAP_DROP = ["ALL"]
SECURITY_OPT = ["no-new-privileges"]


def docker_py_options(opts: DockerConf, user: str) -> Dict[str, Any]:
    """containers.create keyword arguments of the sandbox (`opts`: backend.docker)."""
    return dict(user=user, network_mode=opts.network, read_only=True, tmpfs=dict(TMPFS),
                cap_drop=list(CAP_DROP), security_opt=list(SECURITY_OPT),
                shm_size=opts.shm_size, init=True)


def docker_cli_flags(opts: DockerConf, user: str) -> List[str]:
    """The same sandbox as `docker run` flags (a Slurm job's docker runtime); `user` may be
    a shell expression, quoted by the caller."""
    tmpfs = [f"--tmpfs {path}:{options}" for path, options in TMPFS.items()]
    return ["--init", f"--network {opts.network}", "--read-only", *tmpfs,
            f"--user {user}", *(f"--cap-drop {c}" for c in CAP_DROP),
            *(f"--security-opt {o}" for o in SECURITY_OPT), f"--shm-size {opts.shm_size}"]
