"""A full disk, as a user meets it: the runs directory on a small tmpfs. The harness says
what ran out and where (exit 4, the error in status.json), keeps the previous checkpoints,
and the run resumes to the same bits once there is space; a launch on a full disk leaves
no half-made run directory. Mounting needs root (CI runs as root)."""

import json
import os
import subprocess

import pytest
from conftest import harness, make_context, read_lock, require, run_dir_of, run_harness
from test_docker import engine  # noqa: F401 - fixture


@pytest.fixture
def small_disk(tmp_path):
    """(a tmpfs of 25 MiB of its own, resize(mb)): resize grows it, freeing space as a user
    would."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=25m", "tmpfs", str(mount)], check=True)

    def resize(mb):
        subprocess.run(["mount", "-o", f"remount,size={mb}m", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.long
def test_a_checkpoint_that_does_not_fit_is_said_and_the_run_resumes_exactly(tmp_path,
                                                                            small_disk):
    """A checkpoint of `tiny` is 10 MB (model, Adam state, RNG states): 25 MiB holds two
    (steps 2 and 4), not a third: the write at step 6 fails. Then the disk grows and the
    run resumes to the weights of a run that never stopped (the control: the reference
    run on an ordinary disk)."""
    disk, resize = small_disk
    ctx = make_context(tmp_path)
    reference = run_dir_of(harness(ctx, "train", "tiny", check_rc=0))

    ctx = {**ctx, "runs": disk / "runs"}
    done = harness(ctx, "train", "tiny")
    assert done.returncode == 4, done.stdout + done.stderr
    assert f"no space left on the device of {disk / 'runs'}" in done.stderr
    assert "checkpoint step-00000006.pt" in done.stderr and "--resume" in done.stderr
    assert "Traceback" not in done.stderr
    (run_dir,) = (disk / "runs").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 4
    assert "no space left" in status["error"]["message"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000002.pt", "step-00000002.pt.b3", "step-00000004.pt",
        "step-00000004.pt.b3"]  # intact, with their checksums, no partial file

    resize(64)
    harness(ctx, "train", "--resume", run_dir.name, check_rc=0)
    assert read_lock(run_dir)["results"]["weights_sha256"] == \
        read_lock(reference)["results"]["weights_sha256"]
    assert (run_dir / "metrics.jsonl").read_bytes() == \
        (reference / "metrics.jsonl").read_bytes()


def test_a_launch_on_a_full_disk_leaves_no_run_directory(tmp_path, small_disk):
    disk, _ = small_disk
    ctx = {**make_context(tmp_path), "runs": disk / "runs"}
    (disk / "runs").mkdir()
    filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(filler, b"\0" * (1 << 16)):
            pass
    except OSError:  # full
        pass
    finally:
        os.close(filler)
    done = harness(ctx, "train", "tiny")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "No space left on device" in done.stderr or "no space left" in done.stderr
    assert "Traceback" not in done.stderr
    assert list((disk / "runs").iterdir()) == []


def test_a_build_that_would_fill_the_disk_is_refused_before_it_starts(tmp_path, small_disk,
                                                                      engine):  # noqa: F811
    """The CUDA image's build peaks at about 3x its wheels; pip's ENOSPC halfway through
    names nothing useful. With the scratch directory on 25 MiB, the build of a new image
    (an extra ENV gives it a new tag) is refused at once, naming the place and the space,
    and no image is left behind."""
    disk, _ = small_disk
    tag_env = f"+image.env.HARNESS_TEST_ROOM={os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "HARNESS_SCRATCH": str(disk)}
    done = run_harness(["build", "fashion_mnist", "image=cpu", tag_env], cwd=tmp_path, env=env,
                       check_rc=4)
    assert "building the cpu image needs about" in done.stderr
    assert f"in the scratch directory (HARNESS_SCRATCH, else the system's temp dir) where " \
           f"the layers are normalized ({disk})" in done.stderr
    assert "Traceback" not in done.stderr
    assert not [image for image in engine.images.list()
                if any("HARNESS_TEST_ROOM" in str(env) for env in
                       ((image.attrs.get("Config") or {}).get("Env") or []))]
