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
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from harness import config, progress, rundir
from harness.containers import oci
from harness.digest import canonical_sha256, file_sha256, source_sha256
from harness.env import SCRATCH, WHEELHOUSE
from harness.errors import ConfigError, EnvironmentProblem, HarnessError, ReplayRefused, first_line
from harness.host import docker_engine, gpu

TEMPLATE = "docker/Dockerfile.template"
LABEL_PREFIX = "org.harness."


def project_root() -> Path:
    """Where docker/ and conf/ live (relative paths in image configs start here)."""
    return config.BUILTIN_CONFIG_DIR.parent


def _path(relative: str) -> Path:
    path = Path(relative)
    return path if path.is_absolute() else project_root() / path


def wheelhouse_dir() -> Path:
    """Host cache of downloaded wheels: $HARNESS_WHEELHOUSE, else
    ${XDG_CACHE_HOME:-~/.cache}/harness/wheelhouse."""
    if os.environ.get(WHEELHOUSE):
        return Path(os.environ[WHEELHOUSE])
    return rundir.user_cache() / "wheelhouse"


def profile_config(profile: Optional[str] = None, config_dir: Optional[Path] = None
                   ) -> Dict[str, Any]:
    """conf/image/PROFILE.yaml alone (default: this machine's profile), validated and
    resolved (for `harness build` without a training config and for `harness image lock`)."""
    return config.group_option("image", profile or gpu.image_profile(), config_dir)


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
    parts = {
        "profile": image["profile"],
        "base": image["base"],
        "dockerfile_sha256": hashlib.sha256(dockerfile.encode()).hexdigest(),
        "requirements_lock_sha256": file_sha256(lock_path),
        "harness_source_sha256": source_sha256(project_root() / "harness"),
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
    engine = engine or docker_engine.client()
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
    with _lock(Path(tempfile.gettempdir()) / f"harness-build-{content_hash[:24]}.lock",
               "another build of this image is running here; waiting for it", out):
        yield


@contextlib.contextmanager
def _lock(path: Path, waiting: str, out) -> Iterator[None]:
    """An exclusive flock on `path`, saying `waiting` when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"harness: {waiting}", file=out, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(engine, image: Dict[str, Any], ident: Dict[str, str], out, nocache: bool = False):
    """Build with the classic builder under a scratch tag, then make that image
    reproducible under ident["reference"]."""
    started = time.time()
    print(f"harness: building {ident['reference']} from {image['base']} ...", file=out,
          flush=True)
    scratch = f"{ident['reference']}-classic-{os.getpid()}"
    steps: List[str] = []  # the images of the steps this build ran (not those from cache)
    with _lock(Path(tempfile.gettempdir()) / "harness-build-steps.lock",
               "another image build is running here (the builder's steps go one build at a "
               "time); waiting for it", out):
        try:
            _classic_build(engine, image, ident, scratch, out, nocache, steps)
        finally:  # the first stage's steps: not the classic image's parents
            _remove_step_images(engine, steps)
    try:
        built = _make_reproducible(engine, image, ident, scratch, out)
    finally:
        _remove_quietly(engine, scratch)
    print(f"harness: built {ident['reference']} ({built.id[:19]}) in "
          f"{time.time() - started:.1f} s", file=out, flush=True)
    return built


def _make_reproducible(engine, image: Dict[str, Any], ident: Dict[str, str], classic: str,
                       out):
    """The classic build `classic` rewritten by harness/containers/oci.py (normalized layers,
    a config with fixed times) and loaded as ident["reference"]: its id depends on its files alone,
    so a rebuild of the same inputs, anywhere, gives the same id."""
    from docker.errors import APIError, DockerException

    if oci.engine_image_store(engine) != "docker":
        raise EnvironmentProblem(
            "this Docker engine keeps images in containerd's image store, whose `docker "
            "save` layers are compressed and whose ids are manifest digests: the harness "
            "cannot write reproducible images there yet. Turn it off in "
            "/etc/docker/daemon.json (\"features\": {\"containerd-snapshotter\": false}) "
            "and restart dockerd, or train with backend=local.")
    print("harness: writing the image reproducibly (normalized layers, fixed times) ...",
          file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="harness-oci-", dir=scratch_dir()) as tmp:
        try:
            base = oci.saved_base(engine, image["base"], Path(tmp))
            saved = oci.saved_layers(engine, classic, base, Path(tmp))
            _remove_quietly(engine, classic)  # now: the disk never holds a CUDA image twice
            size = sum(raw.stat().st_size for raw in saved["raw"])
            print(f"harness: normalizing {len(saved['raw'])} layers ({size / 1e9:.2f} GB) "
                  f"and loading the image ...", file=out, flush=True)
            parts = oci.rewritten(saved, base, Path(tmp))
            oci.load(engine, parts["config"], parts["layers"], ident["reference"])
        except (APIError, DockerException, OSError, tarfile.TarError, KeyError, ValueError,
                IndexError) as exc:  # requests' errors; a `docker save` not as expected
            raise EnvironmentProblem(f"writing the image failed in the engine: "
                                     f"{first_line(exc)}") from None
    try:
        for diff_id, files in parts["files"].items():
            oci.save_file_list(layer_lists_dir(), diff_id, files)
    except OSError as exc:  # the image is fine; only a later rebuild's report is poorer
        print(f"harness: warning: cannot keep the layers' file lists in "
              f"{layer_lists_dir()} ({first_line(exc)})", file=sys.stderr, flush=True)
    built = find(engine, ident["reference"])
    if built is None:
        raise HarnessError(f"the build finished but {ident['reference']} is not in the engine")
    return built


def scratch_dir() -> Optional[str]:
    """Where a build spools its layers: $HARNESS_SCRATCH, else the system's temp dir."""
    return os.environ.get(SCRATCH) or None


def layer_lists_dir() -> Path:
    """The file list of every layer built here, by diff_id (for `harness image rebuild`)."""
    return config.state_dir() / "layers"


def _remove_step_images(engine, steps: List[str]) -> None:
    """Remove the step images a build made and left untagged. Removing the classic image
    removes its own parents, but not the steps of the Dockerfile's first stage (the venv):
    those stayed behind as untagged images, 1.3 GB per CPU build and 9 GB per CUDA build,
    until the disk was full. The price: the next build of other harness sources installs
    the wheels again instead of taking them from the builder's cache (a harness upgrade,
    not a user's edit: a user's code is not in the image). Called under the steps lock, so
    no other build of the harness takes one of them from the cache meanwhile; an image
    still a parent (the classic image's own steps) is refused by the engine and left."""
    from docker.errors import APIError, ImageNotFound

    for step in reversed(steps):
        try:
            if not engine.images.get(step).tags:
                engine.images.remove(step, noprune=False)
        except (ImageNotFound, APIError):  # gone already, or still a parent: leave it
            pass


def _remove_quietly(engine, reference: str) -> None:
    from docker.errors import APIError, ImageNotFound

    try:
        engine.images.remove(reference)
    except ImageNotFound:
        pass
    except APIError as exc:
        print(f"harness: warning: could not remove {reference}: {first_line(exc)}",
              file=sys.stderr, flush=True)


# A build's peak disk use, in multiples of its wheels' size (measured on the CUDA image:
# 2.9 GB of wheels; the classic build holds them and the installed venv, 9 GB, and the
# normalized layers are spooled to the scratch directory, 6 GB, before the load).
ENGINE_ROOM_PER_WHEEL_BYTE = 3.5
SCRATCH_ROOM_PER_WHEEL_BYTE = 2.5


def check_room(engine, files: Dict[str, Path], profile: str) -> None:
    """Refuse a build that would fill the disk (pip's ENOSPC halfway through a 9 GB build
    names nothing useful) while there is still time to free space. Only the engine's data
    root on this machine is checked: a remote engine's is not visible from here."""
    wheels = sum(path.stat().st_size for path in files.values())
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    try:
        root = (engine.info() or {}).get("DockerRootDir")
    except (DockerException, RequestException):  # the build itself says what is wrong
        root = None
    places = [(tempfile.gettempdir() if scratch_dir() is None else scratch_dir(),
               SCRATCH_ROOM_PER_WHEEL_BYTE, "the scratch directory (HARNESS_SCRATCH, else "
               "the system's temp dir) where the layers are normalized")]
    if root and Path(root).is_dir():
        places.insert(0, (root, ENGINE_ROOM_PER_WHEEL_BYTE, "the Docker engine's storage"))
    for place, factor, what in places:
        need = int(wheels * factor) + (1 << 30)
        free = shutil.disk_usage(place).free
        if free < need:
            raise EnvironmentProblem(
                f"building the {profile} image needs about {need / 1e9:.1f} GB free in "
                f"{what} ({place}); it has {free / 1e9:.1f} GB. Free space there: `docker "
                f"image prune` removes untagged images, `docker images 'harness/*'` lists "
                f"the harness's images (each change of the harness builds a new one), or "
                f"point HARNESS_SCRATCH at a larger disk for the scratch directory.")


class StepImages:
    """The images of the steps a classic build ran, read from what it prints: each step's
    ` ---> <id>`, except a FROM's (the base) and a step taken from the cache (`---> Using
    cache`: an earlier build's image)."""

    RESULT = re.compile(r"^ ---> ([0-9a-f]{12})$")

    def __init__(self, ids: List[str]):
        self.ids, self._not_ours = ids, False

    def feed(self, text: str) -> None:
        for line in text.splitlines():
            result = self.RESULT.match(line)
            if line.startswith("Step "):
                self._not_ours = " : FROM " in line
            elif line.strip() == "---> Using cache":
                self._not_ours = True
            elif result and not self._not_ours:
                self.ids.append(result.group(1))


def _classic_build(engine, image: Dict[str, Any], ident: Dict[str, str], tag: str, out,
                   nocache: bool, steps: List[str]) -> None:
    """Build with the classic builder; `steps` receives the image of each step it ran
    (those it took from its cache are not its to remove)."""
    from docker.errors import APIError, DockerException

    files = ensure_wheelhouse(image, out=out)
    check_room(engine, files, image["profile"])
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
                path=str(context), tag=tag, buildargs={"BASE": image["base"]},
                labels=labels, rm=True, forcerm=True, pull=False, decode=True, nocache=nocache,
                network_mode=image.get("build_network") or "default")
            console = progress.BuildConsole(out)
            ran = StepImages(steps)
            for chunk in stream:
                if "stream" in chunk:
                    console.feed(chunk["stream"])
                    ran.feed(chunk["stream"])
                elif "status" in chunk:
                    console.feed(chunk["status"] + "\n")
                if "error" in chunk:
                    console.close()
                    raise HarnessError(f"image build failed: {chunk['error'].strip()} "
                                       f"(Dockerfile: docker/Dockerfile.template, profile "
                                       f"{image['profile']})")
        except (APIError, DockerException) as exc:
            raise EnvironmentProblem(
                f"image build failed in the engine: {first_line(exc)}") from None
        console.close()


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
        raise EnvironmentProblem(f"push to {remote}:{tag} failed: {first_line(exc)}") from None
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
        # this engine (harness/containers/oci.py, engine_image_store).
        "diff_ids": list((found.attrs.get("RootFS") or {}).get("Layers") or []),
        "image_store": oci.engine_image_store(found.client),
        **base_facts(found.client, ident["base"]),
    }


BASE_PACKAGES_LABEL = "org.harness.debian-packages"  # docker/make-base-image.sh writes it


def base_facts(engine, reference: str) -> Dict[str, Any]:
    """The base's image id and its Debian packages (name -> version), from the label
    docker/make-base-image.sh gives it (None for a base made otherwise)."""
    base = find(engine, reference)
    return {"base_id": base.id if base is not None else None,
            "base_packages": _packages(base)}


def _packages(base) -> Optional[Dict[str, str]]:
    text = ((base.labels or {}) if base is not None else {}).get(BASE_PACKAGES_LABEL)
    return dict(item.split("=", 1) for item in text.split()) if text else None


def _package_changes(recorded: Optional[Dict[str, str]], here: Optional[Dict[str, str]]
                     ) -> List[str]:
    """["NAME RECORDED -> HERE", ...] for each package whose version differs."""
    recorded, here = recorded or {}, here or {}
    return [f"{name} {recorded.get(name, '(none)')} -> {here.get(name, '(none)')}"
            for name in sorted(set(recorded) | set(here)) if recorded.get(name) != here.get(name)]


# ---------------------------------------------------------------- rebuild a recorded image

# What an image is built from; a lock records each, and a rebuild needs them all the same.
INPUTS = ("profile", "base", "dockerfile_sha256", "requirements_lock_sha256",
          "harness_source_sha256")
REPRODUCED = "REPRODUCED"


def rebuild(recorded: Dict[str, Any], image: Dict[str, Any], run_id: str, out=sys.stderr,
            nocache: bool = True, engine=None) -> Dict[str, Any]:
    """Build, here, the image a run's lock records (`recorded`, its `image` section) from
    the same inputs, under a tag of its own, and compare: {"reproduced": bool, "id": the
    rebuilt id, "reference": where it is, "report": what a user reads}. On REPRODUCED the
    rebuilt image also gets the recorded reference back."""
    check_base(image)
    ident = identity(image)
    _check_same_inputs(recorded, ident, run_id)
    engine = engine or docker_engine.client()
    if find(engine, image["base"]) is None:
        raise EnvironmentProblem(f"the base {image['base']} of run {run_id}'s image is not in "
                                 f"the Docker engine{_base_here(engine, recorded)}. Pull it "
                                 f"from a registry that has it (`docker pull "
                                 f"{image['base']}`), then rebuild again.")
    scratch = {**ident, "reference": f"{ident['reference']}-rebuild"}
    with build_lock(ident["content_hash"], out):
        _remove_quietly(engine, scratch["reference"])  # an earlier rebuild kept for inspection
        built = _build(engine, image, scratch, out, nocache=nocache)
    rebuilt = {"id": built.id, "diff_ids": list(built.attrs["RootFS"]["Layers"])}
    difference = image_difference(recorded, rebuilt)
    if difference is None:
        built.tag(*ident["reference"].rsplit(":", 1))
        _remove_quietly(engine, scratch["reference"])  # only the tag: the image stays
        return {"reproduced": True, "id": built.id, "reference": ident["reference"],
                "report": f"{REPRODUCED}: {ident['reference']} rebuilt from run {run_id}'s "
                          f"recorded inputs has its image id {built.id}."}
    return {"reproduced": False, "id": built.id, "reference": scratch["reference"],
            "report": f"NOT REPRODUCED: run {run_id} recorded image {recorded.get('id')}; "
                      f"the rebuild is {built.id} (kept as {scratch['reference']}).\n"
                      f"{difference}"}


def _base_here(engine, recorded: Dict[str, Any]) -> str:
    """How the base pinned on this machine differs from a run's, in Debian packages."""
    pinned = config.state_ref("base-cpu")
    if not pinned or not recorded.get("base_packages"):
        return ""
    base_here = find(engine, pinned)
    changes = _package_changes(recorded["base_packages"], _packages(base_here))
    if not changes:
        same = base_here is not None and base_here.id == recorded.get("base_id")
        return (f"; the base pinned here ({pinned}) has the same Debian packages"
                f"{' and image id' if same else ''}")
    return (f"; the base pinned here ({pinned}) differs in {len(changes)} Debian "
            f"package(s): {', '.join(changes[:12])}{' ...' if len(changes) > 12 else ''}")


def _check_same_inputs(recorded: Dict[str, Any], ident: Dict[str, str], run_id: str) -> None:
    differing = [key for key in INPUTS if recorded.get(key) != ident[key]]
    if differing:
        details = "; ".join(f"{key}: recorded {recorded.get(key)}, here {ident[key]}"
                            for key in differing)
        raise ReplayRefused(
            f"run {run_id}'s image was built from other inputs than this checkout has "
            f"({details}). Check out the commit its harness.lock names (source.git_commit) "
            f"so that docker/ and harness/ are as they were, then rebuild again.")


def image_difference(recorded: Dict[str, Any], rebuilt: Dict[str, Any]) -> Optional[str]:
    """None when the rebuilt image is the recorded one; else the first layer that differs,
    and the first file in it when this machine kept the recorded layer's file list."""
    old, new = list(recorded.get("diff_ids") or []), rebuilt["diff_ids"]
    same_id = recorded.get("image_store", "docker") != "docker" or recorded["id"] == rebuilt["id"]
    if old == new:
        return None if same_id else (
            "Every layer is the same; the image config differs (its environment, labels or "
            "command): compare `docker inspect` of the two.")
    index = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    if index >= min(len(old), len(new)):
        return (f"The recorded image has {len(old)} layers, the rebuild {len(new)}: the "
                f"Dockerfile's steps differ.")
    lines = [f"First differing layer: {index + 1} of {len(new)} (recorded {old[index]}, "
             f"rebuilt {new[index]})."]
    recorded_files = oci.read_file_list(layer_lists_dir(), old[index])
    rebuilt_files = oci.read_file_list(layer_lists_dir(), new[index])
    if recorded_files is not None and rebuilt_files is not None:
        lines.append(f"First differing file: {oci.first_difference(recorded_files, rebuilt_files)}")
    else:
        lines.append("(This machine has no file list of the recorded layer, kept where it is "
                     f"built, in {layer_lists_dir()}: the file that differs cannot be named.)")
    return "\n".join(lines)


def ensure_recorded(recorded: Dict[str, Any], image: Dict[str, Any], run_id: str,
                    allow_mismatch: bool = False, out=sys.stderr) -> None:
    """Before a replay: the image run `run_id` trained in is in the engine under its
    reference, pulled from the registry when only there, else rebuilt here from its
    recorded inputs; the replay goes on only when the rebuild is REPRODUCED (or, with
    `allow_mismatch`, in the rebuilt image, which the gate then reports)."""
    from docker.errors import APIError, DockerException

    engine = docker_engine.client()
    reference = recorded.get("reference") or identity(image)["reference"]
    where = (f"is in neither the engine nor the registry ({recorded['repo_digest']})"
             if recorded.get("repo_digest") else "is not in the engine (and was never pushed)")
    found = find(engine, recorded["id"])
    if found is None and recorded.get("repo_digest"):
        try:
            found = engine.images.pull(recorded["repo_digest"])
        except (APIError, DockerException):
            found = None
    if found is not None and found.id == recorded["id"]:
        if reference not in (found.tags or []):
            found.tag(*reference.rsplit(":", 1))
        return
    print(f"harness: image {recorded['id'][:19]} of run {run_id} {where}; "
          f"rebuilding it from its recorded inputs (as `harness image rebuild {run_id}` "
          f"does) ...", file=out, flush=True)
    try:
        result = rebuild(recorded, image, run_id, out=out, nocache=False, engine=engine)
    except ReplayRefused as exc:  # other inputs here
        if not allow_mismatch:
            raise
        print(f"harness: --allow-mismatch: {exc} The replay trains in this checkout's image; "
              f"the gate records how it differs.", file=out, flush=True)
        return
    print(result["report"], file=out, flush=True)
    if not result["reproduced"] and allow_mismatch:
        engine.images.get(result["reference"]).tag(*reference.rsplit(":", 1))
    elif not result["reproduced"]:
        raise ReplayRefused(f"the image run {run_id} trained in is gone, and rebuilding it "
                            f"here gives another image (above): the replay would not run in "
                            f"the same environment. Find the image (a registry, an engine "
                            f"that still has {recorded['id']}), or replay with "
                            f"--allow-mismatch to train in the rebuilt one.")
