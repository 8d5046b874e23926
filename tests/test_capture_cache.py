"""The replay's environment capture, remembered (harness/record/facts_cache.py): reused while the
environment is unchanged, and never trusted past a change, even one with its mtime put back.
End to end through the real CLI; the package that changes is a real distribution on the
replay's PYTHONPATH."""

import json
import os

from conftest import TESTS, run_dir_of

CONF = str(TESTS / "conf")
REUSED = "environment as captured before"


def install_package(site, version):
    """A distribution as pip leaves it: a dist-info directory with its METADATA."""
    info = site / "fakepkg-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {version}\n")
    return info / "METADATA"


def test_a_remembered_capture_is_reused_until_a_package_changes(cli, tmp_path, cache_home):
    site = tmp_path / "site"
    metadata = install_package(site, "1.0")
    env = {"PYTHONPATH": f"{TESTS / 'fixtures'}:{site}"}
    run = run_dir_of(cli("train", "hashy", "--config-dir", CONF, "--runs-dir", "runs",
                         env=env, check_rc=0))
    assert json.loads((run / "harness.lock").read_text())["software"]["packages"]["fakepkg"] \
        == "1.0"

    first = cli("replay", str(run), env=env, check_rc=0)
    assert REUSED not in first.stdout and "IDENTICAL" in first.stdout
    second = cli("replay", str(run), env=env, check_rc=0)
    assert REUSED in second.stdout and "IDENTICAL" in second.stdout
    assert "fakepkg" not in second.stdout  # the remembered capture has 1.0, as the run had

    # The package changes in place and its mtime is put back: the ctime still moves, so the
    # capture is taken again and the gate sees the new version.
    before = metadata.stat()
    metadata.write_text(metadata.read_text().replace("Version: 1.0", "Version: 2.0"))
    os.utime(metadata, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert metadata.stat().st_mtime_ns == before.st_mtime_ns
    changed = cli("replay", str(run), env=env, check_rc=0)
    assert REUSED not in changed.stdout
    assert "software.packages.fakepkg" in changed.stdout, changed.stdout


def test_a_stale_entry_is_caught_by_the_replays_own_lock_and_dropped(cli, tmp_path,
                                                                     cache_home):
    run = run_dir_of(cli("train", "hashy", "--config-dir", CONF, "--runs-dir", "runs",
                         check_rc=0))
    cli("replay", str(run), check_rc=0)  # captures, and remembers
    entries = list((cache_home / "harness" / "captures").glob("*.json"))
    entry = max(entries, key=lambda p: p.stat().st_mtime)
    # What a cache entry the stamps failed to invalidate would look like: facts that no
    # longer describe this environment (an informational field, so the gate lets it pass).
    cached = json.loads(entry.read_text())
    cached["facts"]["hardware"]["hostname"] = "elsewhere"
    entry.write_text(json.dumps(cached))

    stale = cli("replay", str(run), check_rc=0)
    assert REUSED in stale.stdout
    assert "the cached capture of this environment was stale (hardware.hostname" \
        in stale.stdout, stale.stdout
    assert not entry.exists()
    again = cli("replay", str(run), check_rc=0)  # captured afresh: nothing stale
    assert REUSED not in again.stdout, again.stdout
    assert "was stale" not in again.stdout
