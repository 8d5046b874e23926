"""The lockfile contract: documented fields, integrity, no secrets."""

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, read_lock, run_dir_of

from harness.errors import LockfileError
from harness.record import lockfile


@pytest.fixture
def tiny_run(cli, tiny_conf):
    secrets = {"AWS_SECRET_ACCESS_KEY": "planted-aws-7f3a9c1e",
               "WANDB_API_KEY": "planted-wandb-52be", "HF_TOKEN": "planted-hf-c0ffee"}
    done = cli("train", "tiny", "--config-dir", str(tiny_conf), env=secrets, check_rc=0)
    return run_dir_of(done), secrets


CONDITIONAL = re.compile(r"^\((\w+) runs only\)")  # "(docker runs only) ..."


def documented_fields(docker_run: bool = False, command_run: bool = False,
                      only: str = ""):
    """Field paths listed in docs/lockfile.md as `| `path` | ...` table rows. Rows whose
    meaning starts with "(KIND runs only)" are left out, except "(docker runs only)" ones
    with `docker_run`; with `command_run` (or `only=KIND`), only the "(KIND runs only)"
    rows."""
    text = (ROOT / "docs" / "lockfile.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9_.\[\]]+)` \| *(.*)$", text, flags=re.M)
    kinds = [(field, (CONDITIONAL.match(meaning) or [None, None])[1]) for field, meaning in rows]
    if command_run or only:
        return [field for field, kind in kinds if kind == (only or "command")]
    return [field for field, kind in kinds if kind is None or (docker_run and kind == "docker")]


def test_every_lockfile_field_is_declared_once_and_documented():
    """lockfile.FIELDS is the schema: each top-level field documented, each documented one
    declared, and the required ones are those every lockfile has."""
    text = (ROOT / "docs" / "lockfile.md").read_text()
    documented = {field.split(".")[0].split("[")[0]
                  for field in re.findall(r"^\| `([a-z0-9_.\[\]]+)` \|", text, flags=re.M)}
    assert documented == set(lockfile.FIELDS)
    with pytest.raises(ValueError, match="not host fields"):
        lockfile.host_facts("r", {"seed": 0, "name": "x"}, [], "local", None, {},
                            {"surprise": 1})


def lookup(lock, dotted):
    node = lock
    for part in dotted.replace("[]", "").split("."):
        if isinstance(node, list):
            node = node[0] if node else {}
            if not node:
                return True  # documented per-GPU field; the list is empty on a CPU machine
        assert part in node, f"lockfile lacks documented field {dotted}"
        node = node[part]
    return True


def test_lockfile_has_every_documented_field(tiny_run):
    run_dir, _ = tiny_run
    lock = read_lock(run_dir)
    fields = documented_fields()
    assert len(fields) > 40, "docs/lockfile.md should document every field"
    for field in fields:
        lookup(lock, field)
    for field in lockfile.required_fields():
        assert field in lock
        assert any(f == field or f.startswith(field + ".") for f in fields), field
    assert lock["hardware"]["gpus"] == []  # explicit empty list on a machine without GPUs
    assert lock["data"]["files"]["train_images"]["sha256"] == \
        lock["config"]["data"]["files"]["train_images"]["sha256"]


def test_lockfile_tampering_is_detected(tiny_run, cli):
    run_dir, _ = tiny_run
    cli("lock", "check", str(run_dir), check_rc=0)
    path = run_dir / "harness.lock"
    original = path.read_text()
    path.write_text(original.replace('"steps": ', '"steps": 1', 1))  # one edited value
    done = cli("lock", "check", str(run_dir), check_rc=5)
    assert "integrity check" in done.stderr
    path.write_text(original[: len(original) // 2])  # truncated
    done = cli("lock", "check", str(run_dir), check_rc=5)
    assert "truncated or damaged" in done.stderr
    with pytest.raises(LockfileError):
        lockfile.read(path)


@pytest.mark.long
def test_no_secret_reaches_the_run_directory(tiny_run):
    run_dir, secrets = tiny_run
    for path in Path(run_dir).rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for name, value in secrets.items():
                assert value.encode() not in blob, f"{name} leaked into {path}"
                assert name.encode() not in blob, f"{name} leaked into {path}"


@pytest.mark.long
def test_run_directory_has_the_contract_files(tiny_run):
    run_dir, _ = tiny_run
    for name in ("config.yaml", "overrides.txt", "metrics.jsonl", "model.pt", "status.json",
                 "train.log", "harness.lock", "launch.json"):
        assert (run_dir / name).is_file(), name
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["exit_code"] == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(float.fromhex(r["loss_hex"]) == r["loss"] for r in train)
    assert records[-1]["kind"] == "eval"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["step-00000004.pt", "step-00000004.pt.b3", "step-00000006.pt",
         "step-00000006.pt.b3"]  # 8 steps, every 4 kept: the newest two, with checksums
