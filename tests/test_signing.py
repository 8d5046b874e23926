"""Signed runs and replaying someone else's run: every finished run is signed with its
user's key; an edit, resealed or not, fails verification; a run nobody trusted signed is
replayed only after the user has seen its code and said --trust. Through the real CLI, two
users being two config directories."""

import base64
import json
import shutil
from pathlib import Path

import pytest
from conftest import TESTS, read_lock, run_dir_of

from harness.record import lockfile, signing

CONF = str(TESTS / "conf")


@pytest.fixture
def users(tmp_path):
    """`alice` and `bob`: the same CLI with their own key directories."""
    return {name: {"XDG_CONFIG_HOME": str(tmp_path / name)} for name in ("alice", "bob")}


@pytest.fixture
def alices_run(cli, users, tmp_path):
    done = cli("train", "hashy", "trainer.epochs=1", "--config-dir", CONF, "--runs-dir",
               str(tmp_path / "alice-runs"), env=users["alice"], check_rc=0)
    assert "made a signing key for your runs: " + str(tmp_path / "alice") in done.stdout
    return run_dir_of(done)


def copied(run_dir: Path, tmp_path: Path) -> Path:
    """The run as bob receives it (copied from alice, downloaded with a paper)."""
    dest = tmp_path / "bob-runs" / run_dir.name
    shutil.copytree(run_dir, dest)
    return dest


def test_a_run_is_signed_in_a_bundle_others_can_verify(alices_run, tmp_path, cli, users):
    """The bundle is checked here without harness code: DSSE's PAE, Ed25519 over it, and
    an in-toto statement whose subjects are the run's files as they are."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    bundle = json.loads((alices_run / "harness.lock.sigstore.json").read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    envelope = bundle["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    payload = base64.b64decode(envelope["payload"])
    statement = json.loads(payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    line = cli("keys", "show", "--name", "alice", env=users["alice"], check_rc=0).stdout
    raw = base64.b64decode(line.split()[1])
    signed = b"DSSEv1 %d %s %d %s" % (len(envelope["payloadType"]),
                                      envelope["payloadType"].encode(), len(payload), payload)
    Ed25519PublicKey.from_public_bytes(raw).verify(
        base64.b64decode(envelope["signatures"][0]["sig"]), signed)  # raises if wrong
    import hashlib

    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    for name in ("harness.lock", "model.pt", "metrics.jsonl"):
        assert subjects[name] == hashlib.sha256((alices_run / name).read_bytes()).hexdigest()
    lock = read_lock(alices_run)
    for name, entry in lock["data"]["files"].items():
        assert subjects[f"data/{name}"] == entry["sha256"]

    checked = cli("lock", "check", str(alices_run), env=users["alice"], check_rc=0).stdout
    assert f"signed by key {hashlib.sha256(raw).hexdigest()[:16]} (your own key, trusted)" \
        in checked


def test_an_edit_resealed_or_not_fails_verification(alices_run, tmp_path, cli, users):
    run = copied(alices_run, tmp_path)
    cli("lock", "check", str(run), env=users["alice"], check_rc=0)  # the control
    lock = read_lock(run)
    lock["seed"] = 7  # not a result: only the signature can see this one
    lockfile.write(run / "harness.lock", lock)
    for command in (["lock", "check"], ["replay"]):
        done = cli(*command, str(run), env=users["alice"])
        assert done.returncode == 5, done.stdout + done.stderr
        assert "signature INVALID: harness.lock changed since the run was signed" in done.stderr
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # nothing ran


@pytest.mark.long
def test_someone_elses_run_names_its_code_and_needs_trust(alices_run, tmp_path, cli, users):
    run = copied(alices_run, tmp_path)
    done = cli("replay", str(run), env=users["bob"])
    assert done.returncode == 6, done.stdout + done.stderr
    for phrase in ("which you do not trust", "harness_testkit.TinyMLP (at model._target_)",
                   "harness_testkit.HashOrderDataset (at data.dataset._target_)", "--trust",
                   "harness keys trust"):
        assert phrase in done.stderr, done.stderr
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # nothing ran

    done = cli("replay", str(run), "--trust", env=users["bob"], check_rc=0)
    assert "IDENTICAL" in done.stdout

    line = cli("keys", "show", "--name", "alice", env=users["alice"], check_rc=0).stdout
    cli("keys", "trust", line.strip(), env=users["bob"], check_rc=0)
    checked = cli("lock", "check", str(run), env=users["bob"], check_rc=0).stdout
    assert "(alice, trusted)" in checked
    cli("replay", str(run), env=users["bob"], check_rc=0)


@pytest.mark.long
def test_a_run_re_signed_by_an_unknown_key_is_refused_until_trusted(alices_run, tmp_path,
                                                                    cli, users, monkeypatch):
    """An adversary edits the lock, reseals it and signs it with a key of their own: the
    signature verifies, but its key is nobody bob trusts; with forged results the files
    disagree with them too."""
    run = copied(alices_run, tmp_path)
    mallory = tmp_path / "mallory-key.pem"
    assert str(mallory) in cli("keys", "init", env={**users["bob"],
                                                    "HARNESS_SIGNING_KEY": str(mallory)},
                               check_rc=0).stdout

    def forge(change):
        lock = read_lock(run)
        change(lock)
        lockfile.write(run / "harness.lock", lock)
        with monkeypatch.context() as patch:
            patch.setenv("HARNESS_SIGNING_KEY", str(mallory))
            signing.sign(run, lockfile.read(run / "harness.lock"))

    forge(lambda lock: lock.update(seed=7))
    checked = cli("lock", "check", str(run), env=users["bob"], check_rc=0).stdout
    assert "which you do not trust" in checked
    done = cli("replay", str(run), env=users["bob"])
    assert done.returncode == 6 and "which you do not trust" in done.stderr

    forge(lambda lock: lock["results"].update(test_accuracy=0.99))
    done = cli("replay", str(run), "--trust", env=users["bob"])
    assert done.returncode == 5 and "results.test_accuracy: the lock says 0.99" in done.stderr


def test_a_planted_pickle_in_the_weights_is_refused_not_run(alices_run, tmp_path, cli, users):
    import pickle
    import zipfile

    run = copied(alices_run, tmp_path)
    (run / "harness.lock.sigstore.json").unlink()  # as an unsigned run would come
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(run / "model.pt", "w") as archive:  # torch's file layout
        archive.writestr("model/data.pkl", pickle.dumps(Payload(), protocol=2))
        archive.writestr("model/version", "3\n")
    for command in (["lock", "check", str(run)], ["replay", str(run), "--trust"]):
        done = cli(*command, env=users["bob"])
        assert done.returncode == 5, done.stdout + done.stderr
        assert "results.weights_sha256" in done.stderr and "unreadable" in done.stderr
    assert not marker.exists()


def test_an_unsigned_run_is_refused_without_trust(alices_run, tmp_path, cli, users):
    run = copied(alices_run, tmp_path)
    (run / "harness.lock.sigstore.json").unlink()
    cli("lock", "check", str(run), env=users["alice"], check_rc=0)  # intact, unsigned
    done = cli("replay", str(run), env=users["alice"])
    assert done.returncode == 6 and "unsigned" in done.stderr and "--trust" in done.stderr


@pytest.mark.parametrize("line", ["ssh-rsa AAAA alice", "ed25519 bm90LWEta2V5 bob",
                                  "ed25519"])
def test_a_key_line_that_is_not_one_is_refused(cli, users, line):
    done = cli("keys", "trust", line, env=users["bob"])
    assert done.returncode == 2 and "ed25519 BASE64 NAME" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.long
def test_resuming_someone_elses_run_needs_trust(tmp_path):
    """A run alice launched and that was preempted: bob's resume lists its code and stops
    before running any; with --trust it goes on. An edited config fails the launch
    signature."""
    import signal

    from conftest import harness, make_context, start_and_interrupt

    alice = make_context(tmp_path / "alice")
    alice["env"]["XDG_CONFIG_HOME"] = str(tmp_path / "alice" / "keys")
    run_dir, code, output = start_and_interrupt(alice, ["train", "tiny"], signal.SIGTERM,
                                                at_step=3)
    assert code == 75, output
    bob = {**alice, "env": {**alice["env"], "XDG_CONFIG_HOME": str(tmp_path / "bob-keys")},
           "runs": tmp_path / "bob-runs"}
    shutil.copytree(run_dir, bob["runs"] / run_dir.name)

    done = harness(bob, "train", "--resume", run_dir.name)
    assert done.returncode == 6, done.stdout + done.stderr
    assert "resume of " + run_dir.name + " refused" in done.stderr
    assert "harness.data.IdxClassification (at data.dataset._target_)" in done.stderr
    assert not (bob["runs"] / run_dir.name / "harness.lock").exists()

    edited = tmp_path / "edited"
    shutil.copytree(bob["runs"], edited)
    config = edited / run_dir.name / "config.yaml"
    config.write_text(config.read_text() + "\n")
    done = harness({**bob, "runs": edited}, "train", "--resume", run_dir.name, "--trust")
    assert done.returncode == 6 and "signature INVALID: config.yaml changed" in done.stderr

    harness(bob, "train", "--resume", run_dir.name, "--trust", check_rc=0)
    assert (bob["runs"] / run_dir.name / "harness.lock").exists()
