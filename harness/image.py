"""The training image: Dockerfile rendering, hash-locked requirements, the host-side
wheelhouse, content-addressed builds through docker-py, and the facts a lockfile records.

An image is named by what goes into it: `<repository>:<content hash>` over the rendered
Dockerfile, the requirements lock, the harness source and the digest-pinned base. An
unchanged tree finds its image and builds nothing; any change gives a new tag. The build
needs no network: wheels are downloaded on the host into a cache (`pip download`), copied
into the build context and installed with `pip install --no-index --require-hashes`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from harness import config, oci, progress
from harness.digest import canonical_sha256, file_sha256
from harness.errors import ConfigError, EnvironmentProblem, HarnessError

TEMPLATE = "docker/Dockerfile.template"
LABEL_PREFIX = "org.harness."
ENGINE_DOWN_HINT = ("Start one with `make docker-env` (installs and starts dockerd and the "
                    "local registry), or train without containers: backend=local.")


def project_root() -> Path:
    """Where docker/ and conf/ live (relative paths in image configs start here)."""
    return config.BUILTIN_CONFIG_DIR.parent


def _path(relative: str) -> Path:
    path = Path(relative)
    return path if path.is_absolute() else project_root() / path


def wheelhouse_dir() -> Path:
    """Host cache of downloaded wheels: $HARNESS_WHEELHOUSE, else
    ${XDG_CACHE_HOME:-~/.cache}/harness/wheelhouse."""
    if os.environ.get("HARNESS_WHEELHOUSE"):
        return Path(os.environ["HARNESS_WHEELHOUSE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "harness" / "wheelhouse"


def profile_config(profile: Optional[str] = None, config_dir: Optional[Path] = None
                   ) -> Dict[str, Any]:
    """conf/image/PROFILE.yaml alone, validated and resolved (for `harness build` without a
    training config and for `harness image lock`)."""
    from omegaconf import OmegaConf

    profile = profile or config.default_image_profile()
    dirs = [Path(config_dir) if config_dir else config.default_config_dir(),
            config.BUILTIN_CONFIG_DIR]
    for directory in dirs:
        path = directory / "image" / f"{profile}.yaml"
        if path.is_file():
            merged = OmegaConf.merge(OmegaConf.structured(config.ImageConf), OmegaConf.load(path))
            return OmegaConf.to_container(merged, resolve=True)
    valid = sorted({p.stem for d in dirs for p in (d / "image").glob("*.yaml")})
    raise ConfigError(f"unknown image profile '{profile}'; valid profiles: {', '.join(valid)}")


# ---------------------------------------------------------------- rendering and identity

def render_dockerfile(image: Dict[str, Any]) -> str:
    """docker/Dockerfile.template with the profile's parts filled in (golden-tested)."""
    text = _path(TEMPLATE).read_text()
    setup = (image.get("system_setup") or "").rstrip("\n")
    env = "".join(f" \\\n    {key}={_env_value(value)}"
                  for key, value in sorted((image.get("env") or {}).items()))
    return (text.replace("@@PROFILE@@", image["profile"])
                .replace("@@SYSTEM_SETUP@@", setup)
                .replace("@@EXTRA_ENV@@", env)
                .replace("@@PYTHON@@", image["python"]))


def _env_value(value: Any) -> str:
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_.,:/=-]+", text) else json.dumps(text)


def check_base(image: Dict[str, Any]) -> str:
    base = image.get("base")
    if not base:
        raise EnvironmentProblem(
            f"image profile '{image['profile']}' has no base image: its digest-pinned "
            f"reference is written by `make docker-env` (to "
            f"${{HARNESS_STATE_DIR:-~/.local/state/harness}}/base-cpu.ref, the Debian base "
            f"both profiles build on); run "
            f"it, or set image.base=REGISTRY/REPO@sha256:... (HARNESS_CPU_BASE for the cpu "
            f"profile, HARNESS_CUDA_BASE for cuda).")
    if "@sha256:" not in base:
        raise ConfigError(f"image.base={base} is not pinned by digest; use "
                          f"REPO@sha256:<digest> so that every build starts from the same bytes.")
    return base


def harness_sources() -> List[Path]:
    package = project_root() / "harness"
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def identity(image: Dict[str, Any]) -> Dict[str, str]:
    """Hashes of everything that goes into the image, and the tag they give."""
    dockerfile = render_dockerfile(image)
    lock_path = _path(image["lock"])
    if not lock_path.is_file():
        raise ConfigError(f"requirements lock {lock_path} does not exist; create it with "
                          f"`harness image lock --profile {image['profile']}`.")
    source = hashlib.sha256()
    package = project_root() / "harness"
    for path in harness_sources():
        source.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    parts = {
        "profile": image["profile"],
        "base": image["base"],
        "dockerfile_sha256": hashlib.sha256(dockerfile.encode()).hexdigest(),
        "requirements_lock_sha256": file_sha256(lock_path),
        "harness_source_sha256": source.hexdigest(),
    }
    content = canonical_sha256(parts)
    return {**parts, "content_hash": content,
            "reference": f"{image['repository']}:{content[:24]}"}


# ---------------------------------------------------------------- requirements lock

def parse_lock(path: Path) -> List[Tuple[str, List[str]]]:
    """[(requirement, [sha256, ...])] from a pip requirements file with --hash entries."""
    entries: List[Tuple[str, List[str]]] = []
    joined = re.sub(r"\\\n", " ", path.read_text())
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        requirement = line.split()[0]
        if not hashes:
            raise ConfigError(f"{path}: '{requirement}' has no --hash entry; regenerate the "
                              f"lock with `harness image lock`.")
        entries.append((requirement, hashes))
    return entries


def _pip_index_args(image: Dict[str, Any]) -> List[str]:
    args = []
    if image.get("torch_index"):
        args += ["--extra-index-url", image["torch_index"]]
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if image["python_version"] != host:
        args += ["--python-version", image["python_version"], "--only-binary=:all:",
                 "--implementation", "cp"]
    return args


def lock_requirements(image: Dict[str, Any], out=sys.stderr) -> Path:
    """Resolve image.requirements into image.lock: every distribution pinned to one file
    with its sha256, and fill the wheelhouse with exactly those files."""
    requirements = _path(image["requirements"])
    lock_path = _path(image["lock"])
    if not requirements.is_file():
        raise ConfigError(f"{requirements} does not exist (image.requirements).")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                   "--quiet", "--report", str(report), "-r", str(requirements),
                   *_pip_index_args(image)]
        print(f"harness: resolving {requirements.name} ...", file=out, flush=True)
        _run_pip(command)
        installs = json.loads(report.read_text())["install"]
    lines = [f"# Generated by `harness image lock --profile {image['profile']}` from "
             f"{image['requirements']} for Python {image['python_version']}.",
             "# Installed in the image with pip install --no-index --require-hashes; "
             "do not edit by hand.", ""]
    for item in sorted(installs, key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        info = item["download_info"]
        digest = (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
        if not digest:
            raise EnvironmentProblem(f"pip reported no sha256 for {name}=={version} "
                                     f"({info.get('url')}); cannot lock it.")
        filename = Path(info["url"].split("#", 1)[0]).name.replace("%2B", "+")
        lines += [f"# {filename}", f"{name}=={version} \\", f"    --hash=sha256:{digest}"]
    tmp_lock = lock_path.with_name(lock_path.name + ".tmp")
    tmp_lock.write_text("\n".join(lines) + "\n")
    tmp_lock.replace(lock_path)
    print(f"harness: wrote {lock_path} ({len(installs)} distributions)", file=out, flush=True)
    ensure_wheelhouse(image, out=out)
    return lock_path


def _run_pip(command: List[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise EnvironmentProblem(f"pip failed ({' '.join(command[2:5])} ...):\n{tail}\n"
                                 f"Check the package index is reachable (pip config list).")


def _cached_sha256(path: Path) -> str:
    """sha256 of a wheelhouse file, remembered next to it (keyed by size and mtime)."""
    stat = path.stat()
    memo = path.parent / ".sha256" / path.name
    key = f"{stat.st_size} {stat.st_mtime_ns}"
    try:
        cached_key, digest = memo.read_text().rsplit(" ", 1)
        if cached_key == key:
            return digest
    except (OSError, ValueError):
        pass
    digest = file_sha256(path)
    memo.parent.mkdir(exist_ok=True)
    memo.write_text(f"{key} {digest}")
    return digest


def ensure_wheelhouse(image: Dict[str, Any], out=sys.stderr) -> Dict[str, Path]:
    """{sha256: file} for every file the lock names, downloading the missing ones."""
    lock_path = _path(image["lock"])
    wanted = {h for _, hashes in parse_lock(lock_path) for h in hashes}
    house = wheelhouse_dir()
    house.mkdir(parents=True, exist_ok=True)

    def present() -> Dict[str, Path]:
        found = {}
        for path in house.iterdir():
            if path.is_file() and not path.name.startswith("."):
                digest = _cached_sha256(path)
                if digest in wanted:
                    found[digest] = path
        return found

    entries = parse_lock(lock_path)
    found = present()
    missing = [req for req, hashes in entries if not set(hashes) & set(found)]
    if missing:
        print(f"harness: downloading {len(missing)} locked files into {house} ...", file=out,
              flush=True)
        _run_pip([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                  "--dest", str(house), "-r", str(lock_path), *_pip_index_args(image)])
        found = present()
        missing = [req for req, hashes in entries if not set(hashes) & set(found)]
    if missing:
        raise EnvironmentProblem(f"the wheelhouse {house} lacks {', '.join(missing)} after "
                                 f"pip download; check the index and the lock.")
    return found


# ---------------------------------------------------------------- engine

def client(timeout: int = 120):
    """A docker-py client that has answered a ping, or EnvironmentProblem saying how to get
    an engine."""
    import docker
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        engine = docker.from_env(timeout=timeout)
        engine.ping()
    except (DockerException, RequestException, OSError, ValueError) as exc:
        # requests' connection errors and malformed DOCKER_HOST values included
        raise EnvironmentProblem(f"no Docker engine answers at {where} ({_short(exc)}). "
                                 f"{ENGINE_DOWN_HINT}") from None
    return engine


def engine_answers(timeout: float = 3) -> bool:
    try:
        client(timeout=int(max(timeout, 1)))
    except EnvironmentProblem:
        return False
    return True


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def engine_facts(engine) -> Dict[str, Any]:
    version = engine.version()
    return {"engine": "docker", "version": version.get("Version"),
            "api_version": version.get("ApiVersion"), "os": version.get("Os"),
            "arch": version.get("Arch"), "kernel": version.get("KernelVersion")}


# ---------------------------------------------------------------- build

def find(engine, reference: str):
    from docker.errors import ImageNotFound

    try:
        return engine.images.get(reference)
    except ImageNotFound:
        return None


def build(image: Dict[str, Any], engine=None, push: bool = False, out=sys.stderr
          ) -> Dict[str, Any]:
    """The image for this config: found by its content-hash tag, else built (streaming the
    build output to `out`); pushed to image.registry when `push`. Returns image facts."""
    check_base(image)
    ident = identity(image)
    engine = engine or client()
    found = find(engine, ident["reference"])
    if found is None or push:
        with build_lock(ident["content_hash"], out):
            found = find(engine, ident["reference"]) or _build(engine, image, ident, out)
            if push:
                # Under the lock too: two pushes of the same new layers at once made the
                # registry answer 500 to one of them; one after the other, the second
                # finds every layer there.
                _push(engine, image, ident, out)
                found.reload()
    return facts(found, ident, image)


@contextlib.contextmanager
def build_lock(content_hash: str, out) -> Iterator[None]:
    """One build (and push) of a given content at a time on this machine. Two builds of the
    same content at once each made an image and the second re-tagged the content-hash tag
    with its own id, taking the first run's registry digest away; now the second waits and
    then finds the first's image (and, pushing, the first's layers in the registry)."""
    path = Path(tempfile.gettempdir()) / f"harness-build-{content_hash[:24]}.lock"
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("harness: another build of this image is running here; waiting for it",
                  file=out, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(engine, image: Dict[str, Any], ident: Dict[str, str], out, nocache: bool = False):
    from docker.errors import APIError, DockerException

    started = time.time()
    print(f"harness: building {ident['reference']} from {image['base']} ...", file=out,
          flush=True)
    files = ensure_wheelhouse(image, out=out)
    with tempfile.TemporaryDirectory(prefix="harness-build-") as tmp:
        context = Path(tmp)
        (context / "Dockerfile").write_text(render_dockerfile(image))
        shutil.copyfile(_path(image["lock"]), context / "requirements.lock")
        (context / "wheelhouse").mkdir()
        sums = []
        for digest, path in sorted(files.items(), key=lambda item: item[1].name):
            target = context / "wheelhouse" / path.name
            try:
                os.link(path, target)  # same file system: no copy of the torch wheel
            except OSError:
                shutil.copyfile(path, target)
            sums.append(f"{digest}  {path.name}\n")
        (context / "wheelhouse" / "SHA256SUMS").write_text("".join(sums))
        package = project_root() / "harness"
        for path in harness_sources():
            target = context / "harness" / path.relative_to(package)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        labels = {LABEL_PREFIX + key.replace("_", "-"): value for key, value in ident.items()
                  if key != "reference"}
        try:
            stream = engine.api.build(
                path=str(context), tag=ident["reference"], buildargs={"BASE": image["base"]},
                labels=labels, rm=True, forcerm=True, pull=False, decode=True, nocache=nocache,
                network_mode=image.get("build_network") or "default")
            console = progress.BuildConsole(out)
            for chunk in stream:
                if "stream" in chunk:
                    console.feed(chunk["stream"])
                elif "status" in chunk:
                    console.feed(chunk["status"] + "\n")
                if "error" in chunk:
                    console.close()
                    raise HarnessError(f"image build failed: {chunk['error'].strip()} "
                                       f"(Dockerfile: docker/Dockerfile.template, profile "
                                       f"{image['profile']})")
        except (APIError, DockerException) as exc:
            raise EnvironmentProblem(f"image build failed in the engine: {_short(exc)}") from None
        console.close()
    built = find(engine, ident["reference"])
    if built is None:
        raise HarnessError(f"the build finished but {ident['reference']} is not in the engine")
    print(f"harness: built {ident['reference']} in {time.time() - started:.1f} s", file=out,
          flush=True)
    return built


def _push(engine, image: Dict[str, Any], ident: Dict[str, str], out) -> None:
    from docker.errors import APIError

    registry = image.get("registry")
    if not registry:
        raise ConfigError("--push needs image.registry (e.g. 127.0.0.1:5000).")
    repository, tag = ident["reference"].rsplit(":", 1)
    remote = f"{registry}/{repository}"
    try:
        engine.images.get(ident["reference"]).tag(remote, tag)
        for chunk in engine.images.push(remote, tag=tag, stream=True, decode=True):
            if "error" in chunk:
                raise EnvironmentProblem(f"push to {remote}:{tag} failed: {chunk['error']}. "
                                         f"Is the registry up (make docker-env)?")
    except APIError as exc:
        raise EnvironmentProblem(f"push to {remote}:{tag} failed: {_short(exc)}") from None
    print(f"harness: pushed {remote}:{tag}", file=out, flush=True)


def facts(found, ident: Dict[str, str], image: Dict[str, Any]) -> Dict[str, Any]:
    """The lockfile's `image` section for an image in the engine."""
    registry = image.get("registry")
    repo = ident["reference"].rsplit(":", 1)[0]
    digests = found.attrs.get("RepoDigests") or []
    pushed = [d for d in digests if registry and d.startswith(f"{registry}/{repo}@")]
    return {
        "reference": ident["reference"],
        "id": found.id,
        "repo_digest": pushed[0] if pushed else None,
        "profile": ident["profile"],
        "base": ident["base"],
        "base_digest": ident["base"].rsplit("@", 1)[1],
        "dockerfile_sha256": ident["dockerfile_sha256"],
        "requirements_lock_sha256": ident["requirements_lock_sha256"],
        "harness_source_sha256": ident["harness_source_sha256"],
        "content_hash": ident["content_hash"],
        # What a rebuild must reproduce: each layer's sha256, and what the id means on
        # this engine (harness/oci.py, engine_image_store).
        "diff_ids": list((found.attrs.get("RootFS") or {}).get("Layers") or []),
        "image_store": oci.engine_image_store(found.client),
    }
