"""Dataset lookup and verification, bad data through the CLI, and fetching from a local HTTP
server. (IDX reading in process: tests/unit/test_data.py.)"""

import gzip
import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, IN_CI, ROOT, make_tiny_idx, read_lock, require, run_dir_of

from harness.training import datasets


def test_fashion_mnist_debian_files_match_the_publishers_content(fashion):
    cfg = json.loads(json.dumps({"name": "fashion_mnist", "dirname": "fashion-mnist"}))
    from harness import config

    pins = config.load_yaml(config.BUILTIN_CONFIG_DIR / "data" / "fashion_mnist.yaml")["files"]
    cfg["files"] = pins
    directory, paths = datasets.locate({**cfg, "root": str(fashion)})
    record = datasets.verify(cfg, paths)
    assert {k: v["sha256"] for k, v in record.items()} == {k: v["sha256"] for k, v in pins.items()}


def test_missing_data_is_a_clear_error_and_leaves_no_run(cli, tiny_conf, tmp_path):
    done = cli("train", "tiny", "data.root=/nonexistent/data", "--config-dir", str(tiny_conf),
               "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 3, done.stderr
    for phrase in ("train-images-idx3-ubyte.gz", "/nonexistent/data", "harness data fetch tiny"):
        assert phrase in done.stderr
    assert not (tmp_path / "runs").exists()


def test_corrupt_local_data_is_refused(cli, tiny_conf, tmp_path):
    images = tmp_path / "tinydata" / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(images.read_bytes()))
    raw[100] ^= 0xFF  # one flipped byte
    images.write_bytes(gzip.compress(bytes(raw)))
    done = cli("train", "tiny", "--config-dir", str(tiny_conf),
               "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 3
    assert "content sha256" in done.stderr and "pins" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.long
def test_dataset_found_through_harness_data(cli, tiny_conf, tmp_path):
    """$HARNESS_DATA/<name>/ is searched when datasets.root is not set."""
    (tmp_path / "store").mkdir()
    (tmp_path / "tinydata").rename(tmp_path / "store" / "tiny")
    done = cli("train", "tiny", "data.root=null", "trainer.max_steps=2",
               "--config-dir", str(tiny_conf), env={"HARNESS_DATA": str(tmp_path / "store")},
               check_rc=0)
    lock = json.loads((run_dir_of(done) / "harness.lock").read_text())
    assert lock["data"]["root"] == str(tmp_path / "store" / "tiny")


def remembered_digests(cache_home: Path, path: Path) -> list:
    """The rows harness/hash_cache.py keeps for `path`."""
    import sqlite3

    with sqlite3.connect(cache_home / "harness" / "file-digests.sqlite") as cache:
        return cache.execute("SELECT kind, digest FROM digests WHERE path = ?",
                             (os.path.realpath(path),)).fetchall()


def test_edited_data_with_its_mtime_restored_is_refused_by_replay(cli, tiny_conf, tmp_path,
                                                                  cache_home):
    """A one-byte edit of a raw IDX file, with size, inode and mtime kept: the launch
    remembered the file's digest (keyed on its ctime too, which no call can restore), so
    the replay re-hashes it and refuses the data (exit 3) instead of training on it."""
    from harness.hash_cache import FRESH_S

    data_dir = tmp_path / "tinydata"
    for packed in data_dir.glob("*.gz"):  # raw IDX files, as a user may keep them
        (data_dir / packed.name[:-3]).write_bytes(gzip.decompress(packed.read_bytes()))
        packed.unlink()
    time.sleep(FRESH_S + 0.2)  # older than a timestamp tick: their digests are remembered
    runs = str(tmp_path / "runs")
    original = run_dir_of(cli("train", "tiny", "trainer.max_steps=2", "--config-dir",
                              str(tiny_conf), "--runs-dir", runs, check_rc=0))
    images = data_dir / "train-images-idx3-ubyte"
    [(kind, remembered)] = remembered_digests(cache_home, images)
    assert kind == "content-sha256"
    assert remembered == read_lock(original)["data"]["files"]["train_images"]["sha256"]
    before = images.stat()
    with open(images, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)[0]
        handle.seek(1000)
        handle.write(bytes([byte ^ 0x01]))
    os.utime(images, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert images.stat().st_mtime_ns == before.st_mtime_ns
    done = cli("replay", original.name, "--runs-dir", runs)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "train-images-idx3-ubyte" in done.stderr and "content sha256" in done.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 1  # no replay run was started


@pytest.mark.parametrize("damage", ["overwrite", "checksum", "truncate"])
def test_corrupt_gzip_data_is_a_clear_data_error(cli, tiny_conf, tmp_path, damage):
    """Four bytes overwritten in the middle of a .gz's compressed data, or in its trailer
    (CRC-32), or its last 100 bytes cut off: exit 3 with a message naming the file and
    what to do, no traceback, no run directory."""
    images = tmp_path / "tinydata" / "t10k-images-idx3-ubyte.gz"
    packed = bytearray(images.read_bytes())
    middle = len(packed) // 2
    if damage == "overwrite":
        packed[middle:middle + 4] = bytes(b ^ 0xFF for b in packed[middle:middle + 4])
    elif damage == "checksum":
        packed[-8:-4] = bytes(b ^ 0xFF for b in packed[-8:-4])
    else:
        packed = packed[:-100]
    images.write_bytes(bytes(packed))
    done = cli("train", "tiny", "--config-dir", str(tiny_conf), "--runs-dir",
               str(tmp_path / "runs"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert str(images) in done.stderr and "corrupt or truncated" in done.stderr
    assert "harness data fetch tiny" in done.stderr
    assert not (tmp_path / "runs").exists()


class _Server:
    """Serves files from a directory on 127.0.0.1 in a thread."""

    def __init__(self, directory: Path):
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
            *a, directory=str(directory), **k)
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a, **k: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path):
    files = make_tiny_idx(tmp_path / "served")
    server = _Server(tmp_path / "served")
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    yield server, files, conf
    server.close()


def write_data_conf(conf: Path, mirrors, files):
    (conf / "data" / "tiny.yaml").write_text(json.dumps({
        "name": "tiny", "mirrors": mirrors, "files": files,
        "dataset": {"_target_": "harness.data.IdxClassification"}}))


def test_fetch_downloads_and_verifies(cli, mirror, tmp_path):
    server, files, conf = mirror
    write_data_conf(conf, ["http://127.0.0.1:9/dead/", server.url], files)  # first one down
    dest = tmp_path / "dest"
    done = cli("data", "fetch", "tiny", "--dest", str(dest), "--config-dir", str(conf),
               "--retries", "1", check_rc=0)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f["file"] for f in files.values())
    for spec in files.values():
        assert datasets.content_sha256(dest / spec["file"]) == spec["sha256"]
    assert "127.0.0.1:9" in done.stderr  # the failed mirror is reported, then skipped


def test_fetch_rejects_a_corrupted_file(cli, mirror, tmp_path):
    server, files, conf = mirror
    served = tmp_path / "served" / "train-labels-idx1-ubyte.gz"
    served.write_bytes(gzip.compress(gzip.decompress(served.read_bytes())[:-1] + b"\x07"))
    write_data_conf(conf, [server.url], files)
    dest = tmp_path / "dest"
    done = cli("data", "fetch", "tiny", "--dest", str(dest), "--config-dir", str(conf))
    assert done.returncode == 3
    assert "does not match the pin" in done.stderr and "rejected" in done.stderr
    assert not (dest / "train-labels-idx1-ubyte.gz").exists()
    assert not any(p.name.endswith(".part") for p in dest.iterdir())


def test_fetch_with_server_down_fails_clearly(cli, mirror, tmp_path):
    server, files, conf = mirror
    url = server.url
    server.close()
    write_data_conf(conf, [url], files)
    dest = tmp_path / "dest"
    done = cli("data", "fetch", "tiny", "--dest", str(dest), "--config-dir", str(conf),
               "--retries", "2")
    assert done.returncode == 3
    assert "could not fetch" in done.stderr and "attempt 2/2" in done.stderr
    assert list(dest.iterdir()) == []


@pytest.mark.long
def test_train_fetches_missing_data_before_launch(cli, mirror, tmp_path):
    server, files, conf = mirror
    write_data_conf(conf, [server.url], files)
    (conf / "tiny.yaml").write_text(
        "defaults:\n  - model: cnn\n  - data: tiny\n  - optim: adam\n  - trainer: default\n"
        "  - determinism: strict\n  - backend: local\n  - _self_\nname: tiny\nseed: 0\n"
        "trainer:\n  max_steps: 2\n")
    done = cli("train", "tiny", "--config-dir", str(conf), check_rc=0)
    assert "fetching" in done.stderr
    lock = json.loads((run_dir_of(done) / "harness.lock").read_text())
    assert lock["data"]["root"].endswith("harness/data/tiny")


@pytest.mark.long
def test_train_installs_the_debian_dataset_package_when_it_is_missing(cli, tmp_path):
    """A fresh machine that reaches only Debian's archive and PyPI: the mirrors fail, the
    config names a Debian package, and as root `harness train` installs it, says so, and
    trains. Removes and reinstalls a system package, so it runs in CI (or when asked)."""
    require(os.geteuid() == 0, "removing and installing a Debian package needs root")
    if not (IN_CI or os.environ.get("HARNESS_TEST_APT") == "1"):
        pytest.skip("changes system packages: runs in CI, or with HARNESS_TEST_APT=1")
    subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "remove", "-y", "-q",
                    "dataset-fashion-mnist"], check=True, capture_output=True)
    try:
        done = cli("train", "fashion_mnist", *FAST, "data.mirrors=[http://127.0.0.1:9/]",
                   "--runs-dir", str(tmp_path / "runs"))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "installing Debian package dataset-fashion-mnist" in done.stderr
        lock = json.loads((run_dir_of(done) / "harness.lock").read_text())
        assert lock["data"]["root"] == "/usr/share/datasets/fashion-mnist"
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "debian-datasets.sh")], check=True)
