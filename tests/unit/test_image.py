"""Image logic without an engine: Dockerfile rendering (golden), content-hash identity,
lock parsing, base pinning rules, profile selection."""

import os
import shutil

import pytest
from conftest import ROOT, TESTS

from harness import config
from harness.commands import choices
from harness.containers import image
from harness.errors import ConfigError, EnvironmentProblem
from harness.host import gpu

GOLDEN = TESTS / "golden" / "Dockerfile.cuda"
PINNED = "127.0.0.1:5000/harness/base-cpu@sha256:" + "ab" * 32


def test_cuda_dockerfile_matches_golden():
    rendered = image.render_dockerfile(image.profile_config("cuda"))
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text(), (
        "the rendered cuda Dockerfile changed; if intended, run "
        "UPDATE_GOLDEN=1 pytest tests/unit/test_image.py and review the diff")


@pytest.mark.parametrize("profile", ["cpu", "cuda"])
def test_dockerfile_installs_offline_and_keeps_no_wheelhouse(profile):
    """Two stages from the pinned base: the venv is built beside the wheelhouse, and only
    the venv is copied into the image, so no wheelhouse layer stays in it."""
    text = image.render_dockerfile(image.profile_config(profile))
    assert "ARG BASE\nFROM ${BASE} AS venv\n" in text
    assert "--no-index" in text and "--require-hashes" in text
    build, final = text.split("\nFROM ${BASE}\n")
    assert "COPY wheelhouse" in build and "wheelhouse" not in final
    assert "COPY --from=venv /opt/venv /opt/venv" in final
    assert "USER 10001:10001" in final and "@@" not in text


def test_cuda_profile_builds_on_the_pinned_debian_base(tmp_path, monkeypatch):
    """No vendor registry: the CUDA image starts from the same digest-pinned Debian base as
    the cpu one, and its lock holds the CUDA build of torch and NVIDIA's library wheels."""
    monkeypatch.setenv("HARNESS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("HARNESS_CUDA_BASE", raising=False)
    (tmp_path / "base-cpu.ref").write_text(PINNED + "\n")
    cuda = image.profile_config("cuda")
    assert cuda["base"] == PINNED and cuda["torch_index"] is None
    assert cuda["build_network"] == "none"
    locked = dict((req.split("==")[0], req.split("==")[1])
                  for req, _ in image.parse_lock(ROOT / cuda["lock"]))
    assert locked["torch"] == "2.14.1"
    for library in ("nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cublas",
                    "nvidia-cuda-runtime"):
        assert library in locked, library


def test_cpu_profile_reads_the_pinned_base(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("HARNESS_CPU_BASE", raising=False)
    assert image.profile_config("cpu")["base"] is None
    with pytest.raises(EnvironmentProblem, match="make docker-env"):
        image.check_base(image.profile_config("cpu"))
    (tmp_path / "base-cpu.ref").write_text(PINNED + "\n")
    assert image.profile_config("cpu")["base"] == PINNED
    monkeypatch.setenv("HARNESS_CPU_BASE", "mirror.example:5000/base@sha256:" + "cd" * 32)
    assert image.profile_config("cpu")["base"].startswith("mirror.example:5000/")


def test_base_must_be_pinned_by_digest():
    cfg = {**image.profile_config("cpu"), "base": "debian:bookworm"}
    with pytest.raises(ConfigError, match="not pinned by digest"):
        image.check_base(cfg)


def test_every_run_config_has_an_image_section():
    cfg = choices.compose("fashion_mnist", [])
    assert cfg["image"]["profile"] == gpu.image_profile()
    cfg = config.compose("fashion_mnist", ["image=cuda", "image.registry=reg.example:5000"])
    assert cfg["image"]["profile"] == "cuda"
    assert cfg["image"]["registry"] == "reg.example:5000"
    assert config.compose("fashion_mnist", ["+image=cuda"])["image"]["profile"] == "cuda"


USER_CONFIGS = {
    "bare": "defaults: [{model: cnn}, {data: mnist}, {optim: adam}, _self_]\nname: bare\n",
    "lists": "defaults: [{model: cnn}, {data: mnist}, {optim: adam}, {image: cuda}, _self_]\n"
             "name: lists\n",
    "extends_mnist": "defaults: [mnist, _self_]\nname: extends_mnist\ntrainer: {epochs: 1}\n",
    "extends_mnist_lists": "defaults: [mnist, {image: cuda}, _self_]\nname: extends_mnist_lists\n",
    "extends_schema": "defaults: [train_schema, {model: cnn}, {data: mnist}, {optim: adam},\n"
                      "  {image: cuda}, _self_]\nname: extends_schema\n",
}


@pytest.mark.parametrize("name, default", [("bare", None), ("lists", "cuda"),
                                           ("extends_mnist", None),
                                           ("extends_mnist_lists", "cuda"),
                                           ("extends_schema", "cuda")])
def test_a_users_config_gets_an_image_however_it_is_written(tmp_path, name, default):
    """Hydra's own defaults tree says whether a config selects an image (itself, or through
    a config it extends); one that does not gets the machine's profile. `image=NAME` works
    on all."""
    (tmp_path / f"{name}.yaml").write_text(USER_CONFIGS[name])
    cfg = choices.compose(name, [], tmp_path)
    assert cfg["image"]["profile"] == (default or gpu.image_profile())
    assert cfg["name"] == name
    for profile in ("cpu", "cuda"):
        chosen = config.compose(name, [f"image={profile}"], tmp_path)
        assert chosen["image"] == config.group_option("image", profile)


def test_a_group_option_alone_is_composed_over_its_schema():
    assert config.group_option("tracker", "mlflow")["mlflow"] == {
        "enabled": True, "tracking_uri": None, "experiment": "harness"}
    assert config.group_option("data", "mnist")["root"] is None
    with pytest.raises(ConfigError, match="unknown image option 'nope'; valid options: cpu, cuda"):
        config.group_option("image", "nope")
    with pytest.raises(ConfigError, match="image/schema is the typed base"):
        config.compose("fashion_mnist", ["image=schema"])


def test_typed_config_keeps_literal_interpolation_text():
    """A command or Dockerfile line with a literal `${...}` (escaped in the config) stays
    text in the typed config the backends get, and plain() gives the config back."""
    cfg = config.compose("run", [])
    cfg["command"]["argv"] = ["sh", "-c", "echo ${HOME}"]
    cfg["image"]["system_setup"] = "ENV PATH=/opt/x:${PATH}"
    typed = config.typed(cfg)
    assert typed.command.argv[2] == "echo ${HOME}"
    assert typed.image.system_setup == "ENV PATH=/opt/x:${PATH}"
    assert config.plain(typed) == cfg


def test_identity_changes_with_each_input(tmp_path, monkeypatch):
    cfg = {**image.profile_config("cpu"), "base": PINNED}
    first = image.identity(cfg)
    assert first == image.identity(cfg)  # stable
    assert first["reference"].startswith("harness/train-cpu:")
    other_base = image.identity({**cfg, "base": PINNED[:-2] + "cd"})
    assert other_base["content_hash"] != first["content_hash"]
    lock = tmp_path / "requirements.lock"
    shutil.copyfile(ROOT / cfg["lock"], lock)
    assert image.identity({**cfg, "lock": str(lock)})["content_hash"] == first["content_hash"]
    lock.write_text(lock.read_text() + "# changed\n")
    assert image.identity({**cfg, "lock": str(lock)})["content_hash"] != first["content_hash"]
    changed_env = image.identity({**cfg, "env": {"X": "1"}})
    assert changed_env["dockerfile_sha256"] != first["dockerfile_sha256"]


def test_lock_pins_every_distribution_with_a_hash():
    entries = image.parse_lock(ROOT / "docker" / "requirements-cpu.lock")
    names = {req.split("==")[0].lower(): req.split("==")[1] for req, _ in entries}
    assert names["torch"].startswith("2.13.0")
    assert {"numpy", "hydra-core", "omegaconf", "antlr4-python3-runtime"} <= set(names)
    assert all(len(hashes) >= 1 and all(len(h) == 64 for h in hashes) for _, hashes in entries)


def test_unhashed_lock_is_refused(tmp_path):
    lock = tmp_path / "bad.lock"
    lock.write_text("torch==2.13.0\n")
    with pytest.raises(ConfigError, match="no --hash"):
        image.parse_lock(lock)
